"""Timing harness: contenders interleaved (A B A B ...), warmed up, a fresh input every repetition.

Pyro transforms cache the last (x, y) pair by identity, so re-feeding one tensor would time the
cache, not the flow: every repetition calls ``make_input()`` for a new tensor, outside the timed
region. Absolute times drift on a shared machine; ratios taken within one interleaved run are what
we quote, as medians with min and max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Timing", "time_interleaved", "machine_info", "synchronize", "write_results"]


@dataclass
class Timing:
    """Seconds per call of one contender over the repetitions."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "repeats": len(self.seconds),
        }


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a GPU timing measures the work and not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    contenders: dict[str, Callable[[Any], Any]],
    make_input: Callable[[], Any],
    *,
    repeats: int = 15,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time each ``contender(input)``; one round calls every contender once, in an order that
    alternates between rounds (A B, B A, ...) so slow drifts of the machine hit all alike."""
    names = list(contenders)
    timings = {name: Timing(name) for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            inputs = make_input()
            synchronize(device)
            start = time.perf_counter()
            contenders[name](inputs)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
    return timings


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import pyro

        info["pyro"] = pyro.__version__
    except ImportError:  # pragma: no cover - pyro is a dependency
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_results(results: dict[str, Any], json_path: Path, markdown_path: Path, markdown: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable))
    markdown_path.write_text(markdown)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.summary()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
