"""Figures of a benchmark run: the scaling curves, the transform ratios and the density race.

Drawn from the same results dictionary that is written as JSON, so a figure never shows a number
the JSON does not hold; each figure is drawn only when its suite ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["draw_figures"]

TRANSFORM_RATIO_TARGET = 1.05
STORN_RATIO_TARGET = 1.10
INVERSE_RATIO_TARGET = 5.0


def draw_figures(results: dict[str, Any], out_dir: Path, stem: str = "benchmarks") -> list[Path]:
    """Draw every figure whose suite is in ``results["suites"]`` into ``out_dir``; returns the
    paths written (PNG files named ``{stem}_<figure>.png``)."""
    suites = results.get("suites", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = (
        ("transforms", "transform_ratios", _transform_ratios),
        ("storn", "storn_scaling", _storn_scaling),
        ("conv_planar", "conv_planar_scaling", _conv_planar_scaling),
        ("density", "density_race", _density_race),
    )
    written = []
    for suite, name, drawer in drawers:
        if suite not in suites:
            continue
        figure = drawer(suites[suite]["results"])
        if figure is None:
            continue
        path = out_dir / f"{stem}_{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _transform_ratios(results: dict[str, Any]):
    rows = results.get("throughput", [])
    if not rows:
        return None
    modes = sorted({row["mode"] for row in rows})
    per_mode = max(sum(row["mode"] == mode for row in rows) for mode in modes)
    figure, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 0.3 * per_mode + 1.5), sharey=True, squeeze=False)
    for axis, mode in zip(axes[0], modes):
        selected = [row for row in rows if row["mode"] == mode]
        labels = [f"{row['flow']} D={row['dim']}" for row in selected]
        ratios = [row["ratio"] for row in selected]
        colors = ["tab:green" if r <= TRANSFORM_RATIO_TARGET else "tab:red" for r in ratios]
        axis.barh(range(len(ratios)), ratios, color=colors)
        # the A/A control of each row (Pyro's stack against a second copy of it): noise alone
        controls = [row.get("control_ratio") for row in selected]
        if all(control is not None for control in controls):
            axis.scatter(controls, range(len(controls)), marker="|", s=120, color="black", zorder=3, label="A/A control (Pyro / Pyro)")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.axvline(TRANSFORM_RATIO_TARGET, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {TRANSFORM_RATIO_TARGET}")
        axis.set_yticks(range(len(ratios)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(f"{mode}: ours / Pyro's")
        axis.set_xlabel("median time ratio (lower is faster)")
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _storn_scaling(results: dict[str, Any]):
    panels = [("scaling_T", "T", "sequence length T (batch 20)"), ("scaling_batch", "batch", "batch size (T = 100)")]
    panels = [panel for panel in panels if results.get(panel[0])]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (key, x_key, label) in zip(axes[0], panels):
        rows = sorted(results[key], key=lambda row: row[x_key])
        xs = [row[x_key] for row in rows]
        for contender, style in (("pyro", "o-"), ("plain", "s--")):
            axis.plot(xs, [1e3 * row[contender]["median_s"] for row in rows], style, label=contender)
        for x, row in zip(xs, rows):
            axis.annotate(f"{row['ratio']:.2f}x", (x, 1e3 * row["pyro"]["median_s"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("ms per SVI step (median)")
        axis.set_title(f"STORN step, {rows[0]['flow']}: Pyro vs plain PyTorch")
        axis.legend()
    figure.tight_layout()
    return figure


def _conv_planar_scaling(results: dict[str, Any]):
    rows = sorted(results.get("rows", []), key=lambda row: row["T"])
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 4))
    ts = [row["T"] for row in rows]
    axis.plot(ts, [1e3 * row["forward"]["median_s"] for row in rows], "o-", label="forward + log-det")
    axis.plot(ts, [1e3 * row["inverse"]["median_s"] for row in rows], "s-", label="exact inverse")
    for t, row in zip(ts, rows):
        axis.annotate(f"{row['ratio']:.1f}x", (t, 1e3 * row["inverse"]["median_s"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("sequence length T")
    axis.set_ylabel("ms per call (median)")
    axis.set_title(f"conv_planar, one causal layer (inverse target <= {INVERSE_RATIO_TARGET:g}x)")
    axis.legend()
    figure.tight_layout()
    return figure


def _density_race(results: dict[str, Any]):
    flows = results.get("flows", {})
    if not flows:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, flow in flows.items():
        history = flow.get("history", [])
        axis.plot([h["train_s"] for h in history], [h["test_nll"] for h in history], "o-", label=name)
    target = results.get("target_nll")
    if target is not None:
        axis.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
    axis.set_xlabel("training seconds")
    axis.set_ylabel("test NLL (nats per point)")
    axis.set_title("two moons: CNF against RealNVP")
    axis.legend()
    figure.tight_layout()
    return figure
