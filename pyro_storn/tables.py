"""Markdown tables and the statistics over seeds that the results pages report.

>>> print(markdown_table(["guide", "test -ELBO"], [["STORN", mean_sd([1.0, 2.0, 3.0])]]))
| guide | test -ELBO |
|---|---|
| STORN | 2.00 ± 1.00 |
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MISSING", "Stopwatch", "command_line", "markdown_table", "mean_sd", "paired_over_seeds"]

# What a cell shows when there is no value.
MISSING = "–"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` gives each column's ``"l"`` (default) or ``"r"``."""
    align = ["l"] * len(header) if align is None else list(align)
    if len(align) != len(header):
        raise ValueError(f"align names {len(align)} columns, the header {len(header)}")
    rules = "|" + "".join("---:|" if side == "r" else "---|" for side in align)
    lines = ["| " + " | ".join(header) + " |", rules]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: Iterable[float | None], digits: int = 2) -> str:
    """``"mean ± sd"`` (sample sd) of the values that are not None, to ``digits`` decimals; one
    value alone, and :data:`MISSING` for none."""
    present = [value for value in values if value is not None]
    if not present:
        return MISSING
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{np.mean(present):.{digits}f} ± {np.std(present, ddof=1):.{digits}f}"


def paired_over_seeds(runs: Sequence[Mapping[str, Any]], baseline: Mapping[int, Mapping[str, Any]],
                      key: str) -> str:
    """Mean ± sd over seeds of ``run[key] - baseline[seed][key]``, with how many seeds it was
    lower on: ``"-3.10 ± 1.20 (2/3 better)"``. The seeds' spread is mostly shared between a run
    and its baseline, so the paired difference is the sharper comparison. A run that is its own
    baseline, or a seed the baseline lacks, is left out."""
    diffs = [run[key] - baseline[run["seed"]][key] for run in runs
             if run["seed"] in baseline and run.get(key) is not None
             and run is not baseline[run["seed"]]]
    if not diffs:
        return MISSING
    wins = sum(diff < 0 for diff in diffs)
    return f"{mean_sd(diffs)} ({wins}/{len(diffs)} better)"


def command_line(script: str, argv: Sequence[str]) -> str:
    """``python <script> <argv>`` quoted as a shell would need it, for a page to name its run."""
    return " ".join(["python", script, *(shlex.quote(arg) for arg in argv)])


@dataclass
class Stopwatch:
    """Wall and CPU seconds since it was made: on a shared machine the CPU time is the steadier of
    the two."""

    _wall: float = field(default_factory=time.perf_counter, repr=False)
    _cpu: float = field(default_factory=time.process_time, repr=False)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._wall

    @property
    def cpu_s(self) -> float:
        return time.process_time() - self._cpu
