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
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pyro_storn.rundir import write_text_atomic

__all__ = [
    "Timing", "time_interleaved", "paired_ratio", "paired_interval", "machine_info", "synchronize",
    "write_results",
]


@dataclass
class Timing:
    """Seconds per call of one contender over the repetitions."""

    name: str
    seconds: list[float] = field(default_factory=list)
    calls_per_repeat: int = 1

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
            "calls_per_repeat": self.calls_per_repeat,
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
    calls_per_repeat: int | str = 1,
) -> dict[str, Timing]:
    """Time each ``contender(input)``; one round calls every contender once, in an order that
    alternates between rounds (A B, B A, ...) so slow drifts of the machine hit all alike.

    With ``calls_per_repeat = n > 1`` a repetition times ``n`` back-to-back calls, each on its
    own fresh input (all made before the clock starts), and records the mean: a millisecond call
    is then timed over tens of milliseconds, where the timer's and the scheduler's jitter are
    small next to it. ``calls_per_repeat="auto"`` picks ``n`` so that a repetition of the fastest
    contender lasts about ``AUTO_REPEAT_SECONDS`` (at most ``AUTO_MAX_CALLS`` calls), from one
    untimed call of each."""
    names = list(contenders)
    if calls_per_repeat == "auto":
        calls_per_repeat = _auto_calls(contenders, make_input, device)
    if isinstance(calls_per_repeat, bool) or not isinstance(calls_per_repeat, int) or calls_per_repeat < 1:
        raise ValueError(f"calls_per_repeat must be an int >= 1 or 'auto', got {calls_per_repeat!r}")
    timings = {name: Timing(name, calls_per_repeat=calls_per_repeat) for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            inputs = [make_input() for _ in range(calls_per_repeat)]
            contender = contenders[name]
            synchronize(device)
            start = time.perf_counter()
            for value in inputs:
                contender(value)
            synchronize(device)
            elapsed = (time.perf_counter() - start) / calls_per_repeat
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
    return timings


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """The median over rounds of ``numerator / denominator`` timed in the same round (the two ran
    back to back, so a slow spell of the machine divides out); a check beside the ratio of the
    medians, which it matches when the machine is steady."""
    return statistics.median(_round_ratios(numerator, denominator))


def _round_ratios(numerator: Timing, denominator: Timing) -> list[float]:
    if len(numerator.seconds) != len(denominator.seconds) or not numerator.seconds:
        raise ValueError(
            f"a paired comparison needs timings of the same rounds, got {len(numerator.seconds)} and "
            f"{len(denominator.seconds)} repetitions"
        )
    return [a / b for a, b in zip(numerator.seconds, denominator.seconds)]


# Bootstrap resamples behind paired_interval. With an odd number of rounds every resampled median
# is one of the rounds' own ratios, so the interval's ends are order statistics that a different
# seed rarely moves; 2000 medians of 21 values take about 15 ms here.
INTERVAL_RESAMPLES = 2000


def paired_interval(
    numerator: Timing, denominator: Timing, *, level: float = 0.95,
    resamples: int = INTERVAL_RESAMPLES, seed: int = 0,
) -> tuple[float, float]:
    """A ``level`` bootstrap percentile interval for :func:`paired_ratio`: the rounds are drawn
    with replacement ``resamples`` times (a fixed ``seed``, so a run's table is reproducible from
    its timings) and the median of the per-round ratios taken each time. It says how far the
    row's paired ratio could move on a rerun of the same rounds' spread, so a target is judged
    against the interval and not the point: above a target when even its lower end is."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    ratios = _round_ratios(numerator, denominator)
    draw = random.Random(seed).choices
    medians = sorted(statistics.median(draw(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1 - tail) * (resamples - 1)))]
    return low, high


# "auto" repetitions last about this long (timer and scheduler jitter are ~0.1 ms here), with
# at most this many calls, so that one slow contender does not stretch a suite by minutes.
AUTO_REPEAT_SECONDS = 0.02
AUTO_MAX_CALLS = 20


def _auto_calls(contenders: dict[str, Callable[[Any], Any]], make_input: Callable[[], Any], device) -> int:
    fastest = float("inf")
    for contender in contenders.values():
        value = make_input()
        synchronize(device)
        start = time.perf_counter()
        contender(value)
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, min(AUTO_MAX_CALLS, round(AUTO_REPEAT_SECONDS / max(fastest, 1e-9))))


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
    write_text_atomic(json_path, json.dumps(results, indent=2, default=_jsonable))
    write_text_atomic(markdown_path, markdown)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.summary()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
