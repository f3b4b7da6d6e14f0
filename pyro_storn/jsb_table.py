"""The JSB Chorales results page: STORN runs read from their run directories, bounds in nats per
frame as the literature reports them, each flow guide paired with the plain guide of the same
model and seed, time to quality, the published numbers beside ours, and a JSON of the rows.

A run directory is one ``pyro-storn train --data jsb_chorales.pickle`` run followed by
``pyro-storn evaluate`` (its ``evaluation.json``: test -ELBO and -IWAE per sequence at the
best-validation checkpoint). Nats per frame: minus a bound summed over the test sequences,
divided by their frames (Pyro's DMM example and Krishnan et al. 2017 report this).

``python -m pyro_storn.jsb_table RUN_DIR ... --out docs/storn_jsb_chorales.md``

Run directories hold their checkpoints (tens of megabytes each) and do not survive a change of
machine; with ``--archive DIR`` the files a row is made of (config, evaluation, metrics, generated
piano rolls) are copied to ``DIR/<run name>/``, small enough to commit, and the page can be written
again from those copies alone.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import paired_difference
from .cli import OneLineParser
from .rundir import (CONFIG_NAME, atomic_write, check_output_dir, check_output_file, read_json,
                     save_figure, write_text_atomic)
from .runs import EVALUATION_NAME, GENERATED_NAME, read_run_config
from .tables import MISSING, markdown_table, mean_sd
from .training import METRICS_NAME, read_metrics

__all__ = ["PUBLISHED", "TARGET_NEG_ELBO", "TARGET_NEG_IWAE", "TIME_TO_QUALITY", "run_row",
           "train_command",
           "pair_rows", "archive_runs", "write_page", "main"]

# Published test results on JSB Chorales, nats per frame: (model, value, kind, source).
PUBLISHED = [
    ("RNN", 8.71, "exact", "Boulanger-Lewandowski et al. 2012"),
    ("STORN", 6.91, "bound", "Bayer & Osendorfer 2014, as cited by Krishnan et al. 2017"),
    ("DMM", 6.926, "-ELBO", "Krishnan et al. 2017"),
    ("DMM", 6.388, "importance-sampled", "Krishnan et al. 2017"),
    ("Pyro's DMM example, 0 IAF, 5000 epochs", 6.87, "single-sample -ELBO", "Pyro examples/dmm"),
    ("Pyro's DMM example, 1 IAF, 5000 epochs", 6.82, "single-sample -ELBO", "Pyro examples/dmm"),
    ("Pyro's DMM example, 2 IAF, 5000 epochs", 6.80, "single-sample -ELBO", "Pyro examples/dmm"),
    ("RNN-NADE", 5.19, "exact", "Boulanger-Lewandowski et al. 2012"),
    ("SRNN", 4.74, "bound", "Fraccaro et al. 2016"),
]
# The page's targets: the best flow guide ahead of Pyro's DMM with 2 IAF (-ELBO) and of the DMM's
# importance-sampled figure (-IWAE); Pyro's DMM without IAF reached within an hour of training.
TARGET_NEG_ELBO = 6.80
TARGET_NEG_IWAE = 6.39
TIME_TO_QUALITY = 6.87
TIME_BUDGET_MINUTES = 60.0
CURVE_KEYS = ("validation/neg_elbo_per_step", "test/neg_elbo_per_step")
# What a row and the piano roll are read from; checkpoints stay behind.
ARCHIVED_FILES = (CONFIG_NAME, EVALUATION_NAME, METRICS_NAME, GENERATED_NAME)
# What a row reads of a run's evaluation.json (``pyro-storn evaluate`` writes them all).
EVALUATION_KEYS = ("checkpoint", "neg_elbo", "neg_iwae", "neg_elbo_per_step", "neg_iwae_per_step",
                   "num_samples", "n_steps")


def _guide(config: dict[str, Any]) -> str:
    flow, length = config.get("flow", "none"), int(config.get("flow_length", 0))
    return "plain" if flow in (None, "none") or length == 0 else f"{flow} K={length}"


def _objective_suffix(objective: str, num_particles: int) -> str:
    """What sets an IWAE-trained run apart from the ELBO-trained run of the same model."""
    return f", trained on IWAE K={num_particles}" if objective == "iwae" else ""


def _model(config: dict[str, Any]) -> str:
    """What the generative model and encoder are: runs pair only within one."""
    width = int(config.get("emission_hidden", 0))
    emission = f"MLP emission {width}" if width else "linear emission"
    prior = "learned prior, " if config.get("prior", "standard") == "learned" else ""
    dropout = f", dropout {config['dropout']}" if config.get("dropout") else ""
    objective = _objective_suffix(config.get("objective", "elbo"), config.get("num_particles", 1))
    return (f"{config.get('encoder', 'forward')} encoder, {prior}{emission}, latent "
            f"{config['latent_dim']}, GRU {config['hidden_dim']}, wd {config.get('weight_decay', 0)}"
            f"{dropout}{objective}")


# config.json key -> ``pyro-storn train`` flag, for the command that reproduces a run.
TRAIN_FLAGS = (("flow", "--flow"), ("flow_length", "--flow-length"), ("seed", "--seed"),
               ("emission", "--emission"), ("encoder", "--encoder"),
               ("emission_hidden", "--emission-hidden"), ("prior", "--prior"),
               ("dropout", "--dropout"), ("latent_dim", "--latent-dim"),
               ("hidden_dim", "--hidden-dim"), ("batch_size", "--batch-size"), ("lr", "--lr"),
               ("lr_decay", "--lr-decay"), ("weight_decay", "--weight-decay"),
               ("adam_beta1", "--adam-beta1"), ("clip_norm", "--clip-norm"),
               ("kl_anneal_epochs", "--kl-anneal-epochs"), ("objective", "--objective"),
               ("num_particles", "--num-particles"), ("epochs", "--epochs"))


def train_command(run_dir: str | Path, config: dict[str, Any]) -> str:
    """The ``pyro-storn train`` line that reproduces a run from its recorded configuration."""
    flags = " ".join(f"{flag} {config[key]}" for key, flag in TRAIN_FLAGS if key in config)
    # the run's name, not its path: the same line whether read from the run or its archive
    return f"pyro-storn train --data DATA --out {Path(run_dir).name} {flags}"


def run_row(run_dir: str | Path) -> dict[str, Any]:
    """One run's row: its configuration, best epoch, bounds per frame and the per-sequence values
    the pairing needs, training seconds, and when its test -ELBO first reached
    :data:`TIME_TO_QUALITY`."""
    run_dir = Path(run_dir)
    record = read_run_config(run_dir)
    config = record["config"]
    evaluation_path = run_dir / EVALUATION_NAME
    if not evaluation_path.exists():
        raise ValueError(f"{evaluation_path} does not exist: run `pyro-storn evaluate {run_dir}` "
                         "first")
    evaluation = read_json(evaluation_path)
    found = evaluation if isinstance(evaluation, dict) else {}
    missing = [key for key in EVALUATION_KEYS if key not in found]
    if not isinstance(found.get("checkpoint"), dict) or "epoch" not in found["checkpoint"]:
        missing.append("checkpoint.epoch")
    if missing:
        raise ValueError(f"{evaluation_path}: missing key {missing[0]} (not an evaluation.json "
                         "of `pyro-storn evaluate`)")
    history = read_metrics(run_dir)
    seconds = np.cumsum([row.get("epoch_seconds", 0.0) for row in history])
    best_epoch = int(evaluation["checkpoint"]["epoch"])
    best = next((row for row in history if row["epoch"] == best_epoch), {})
    reached = next(((row["epoch"], float(seconds[i]) / 60.0) for i, row in enumerate(history)
                    if row.get("test/neg_elbo_per_step", math.inf) <= TIME_TO_QUALITY), None)
    psis = evaluation.get("psis", {})
    return {
        "run": str(run_dir), "command": train_command(run_dir, config),
        "model": _model(config), "guide": _guide(config),
        "encoder": config.get("encoder", "forward"),
        "objective": config.get("objective", "elbo"),
        "num_particles": int(config.get("num_particles", 1)),
        "flow": config.get("flow", "none"), "K": int(config.get("flow_length", 0)),
        "seed": int(config["seed"]), "epochs": len(history), "best_epoch": best_epoch,
        "valid_neg_elbo_per_frame": best.get("validation/neg_elbo_per_step"),
        "test_neg_elbo_per_frame": evaluation["neg_elbo_per_step"],
        "test_neg_iwae_per_frame": evaluation["neg_iwae_per_step"],
        "iwae_samples": int(evaluation["num_samples"]),
        "test_frames": int(sum(evaluation["n_steps"])),
        "khat_above_0.7": (psis["num_items_khat_above_0.7"] / psis["num_items"]
                           if psis.get("num_items") else None),
        "khat_median": (float(np.median(psis["khat_per_item"])) if psis.get("khat_per_item")
                        else None),
        "khat_per_sequence": list(psis.get("khat_per_item", [])),
        "train_seconds": float(seconds[-1]) if len(seconds) else 0.0,
        "minutes_to_quality": None if reached is None else reached[1],
        "epoch_to_quality": None if reached is None else reached[0],
        "neg_elbo_per_sequence": evaluation["neg_elbo"],
        "neg_iwae_per_sequence": evaluation["neg_iwae"],
        "history": [{"epoch": row["epoch"], "minutes": float(seconds[i]) / 60.0,
                     **{key: row[key] for key in CURVE_KEYS if key in row}}
                    for i, row in enumerate(history) if CURVE_KEYS[0] in row],
    }


def archive_runs(run_dirs: Sequence[str | Path], archive: str | Path) -> list[Path]:
    """Copy each run's :data:`ARCHIVED_FILES` to ``archive/<run name>/`` (replacing an earlier
    copy of that run) and return the copies' directories, in order. Two runs of one name, or a
    run without ``evaluation.json``, are refused before anything is copied."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    names: dict[str, Path] = {}
    for run_dir in run_dirs:
        if not (run_dir / EVALUATION_NAME).exists():
            raise ValueError(f"{run_dir / EVALUATION_NAME} does not exist: run `pyro-storn "
                             f"evaluate {run_dir}` first")
        if run_dir.name in names and names[run_dir.name].resolve() != run_dir.resolve():
            raise ValueError(f"two runs named {run_dir.name!r} ({names[run_dir.name]} and "
                             f"{run_dir}) cannot share the archive")
        names[run_dir.name] = run_dir
    copies = []
    for run_dir in run_dirs:
        copy = Path(archive) / run_dir.name
        if copy.resolve() != run_dir.resolve():
            for name in ARCHIVED_FILES:
                if (run_dir / name).exists():
                    data = (run_dir / name).read_bytes()
                    atomic_write(copy / name, lambda handle, data=data: handle.write(data))
        copies.append(copy)
    return copies


def pair_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Add to every flow row its paired difference to the plain guide of the same model and seed,
    per frame with its standard error over test sequences (negative: the flow is better)."""
    plain = {(row["model"], row["seed"]): row for row in rows if row["guide"] == "plain"}
    for row in rows:
        base = plain.get((row["model"], row["seed"]))
        for bound in ("elbo", "iwae"):
            key = f"delta_neg_{bound}_per_frame"
            row[key] = row[f"{key}_se"] = None
            if base is None or base is row:
                continue
            row[key], row[f"{key}_se"] = _per_frame_difference(row, base, bound)


def _per_frame_difference(row: dict[str, Any], base: dict[str, Any],
                          bound: str) -> tuple[float, float]:
    """Run ``row`` minus run ``base`` on the same test sequences, per frame, with its standard
    error (negative: ``row`` is better)."""
    mean, se = paired_difference(row[f"neg_{bound}_per_sequence"],
                                 base[f"neg_{bound}_per_sequence"])
    sequences_per_frame = len(row[f"neg_{bound}_per_sequence"]) / row["test_frames"]
    return mean * sequences_per_frame, se * sequences_per_frame


def _objective_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each IWAE-trained run against the ELBO-trained run of the same model, guide and seed."""
    lines = []
    for row in rows:
        if row.get("objective", "elbo") != "iwae":
            continue
        suffix = _objective_suffix(row["objective"], row["num_particles"])
        base = next((other for other in rows if other.get("objective", "elbo") == "elbo"
                     and other["model"] == row["model"].removesuffix(suffix)
                     and (other["guide"], other["seed"]) == (row["guide"], row["seed"])), None)
        if base is None:
            lines.append(f"- {row['guide']}{suffix} (seed {row['seed']}): no ELBO-trained run of "
                         "the same model, guide and seed to pair.")
            continue
        (iwae, iwae_se), (elbo, elbo_se) = (_per_frame_difference(row, base, bound)
                                            for bound in ("iwae", "elbo"))
        lines.append(f"- {row['guide']}{suffix}, against the same guide trained on the ELBO "
                     f"({base['model']}, seed {row['seed']}): Δ test -IWAE per frame "
                     f"{iwae:.3f} ± {iwae_se:.3f}, Δ test -ELBO {elbo:.3f} ± {elbo_se:.3f}.")
    return lines


def _fmt(value: float | None, digits: int = 2, se: float | None = None) -> str:
    if value is None:
        return MISSING
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["model", "guide", "seed", "epochs (best)", "valid -ELBO", "test -ELBO",
              "test -IWAE (S)", "Δ -ELBO vs plain", "Δ -IWAE vs plain", "k̂ > 0.7 (median)",
              "train min", "min to 6.87"]
    body = [[row["model"], row["guide"], row["seed"], f"{row['epochs']} ({row['best_epoch']})",
             _fmt(row["valid_neg_elbo_per_frame"], 3), _fmt(row["test_neg_elbo_per_frame"], 3),
             f"{_fmt(row['test_neg_iwae_per_frame'], 3)} ({row['iwae_samples']})",
             _fmt(row["delta_neg_elbo_per_frame"], 3, row["delta_neg_elbo_per_frame_se"]),
             _fmt(row["delta_neg_iwae_per_frame"], 3, row["delta_neg_iwae_per_frame_se"]),
             MISSING if row["khat_above_0.7"] is None else
             f"{100 * row['khat_above_0.7']:.0f}%"
             + ("" if row["khat_median"] is None else f" ({row['khat_median']:.1f})"),
             f"{row['train_seconds'] / 60:.1f}",
             MISSING if row["minutes_to_quality"] is None
             else f"{row['minutes_to_quality']:.1f} (epoch {row['epoch_to_quality']})"]
            for row in rows]
    return markdown_table(header, body)


def _verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    flows = [row for row in rows if row["guide"] != "plain"]
    best_elbo = min(rows, key=lambda row: row["test_neg_elbo_per_frame"])
    best_iwae = min(rows, key=lambda row: row["test_neg_iwae_per_frame"])
    lines = ["## Against the targets", ""]
    for what, best, key, target in (
            ("test -ELBO", best_elbo, "test_neg_elbo_per_frame", TARGET_NEG_ELBO),
            ("test -IWAE", best_iwae, "test_neg_iwae_per_frame", TARGET_NEG_IWAE)):
        value = best[key]
        verdict = "met" if value <= target else f"missed by {value - target:.2f}"
        lines.append(f"- Best {what}: {value:.3f} nats per frame ({best['guide']}, {best['model']}, "
                     f"seed {best['seed']}); target <= {target}: {verdict}.")
    for model, value, kind, _ in PUBLISHED:
        if model in ("STORN", "Pyro's DMM example, 0 IAF, 5000 epochs") or kind == "-ELBO":
            gap = best_elbo["test_neg_elbo_per_frame"] - value
            lines.append(f"- Against {model} ({value} nats per frame, {kind}): our best test -ELBO "
                         f"is {abs(gap):.3f} {'behind' if gap > 0 else 'ahead'}.")
    fastest = [row for row in rows if row["minutes_to_quality"] is not None]
    if fastest:
        row = min(fastest, key=lambda row: row["minutes_to_quality"])
        within = row["minutes_to_quality"] <= TIME_BUDGET_MINUTES
        lines.append(f"- Time to quality: test -ELBO <= {TIME_TO_QUALITY} after "
                     f"{row['minutes_to_quality']:.1f} min of training ({row['guide']}, "
                     f"{row['model']}, seed {row['seed']}); within {TIME_BUDGET_MINUTES:.0f} min: "
                     f"{'yes' if within else 'no'}.")
    else:
        lines.append(f"- Time to quality: no run's test -ELBO (the per-epoch single-sample pass) "
                     f"reached {TIME_TO_QUALITY}; the best reached "
                     f"{min(min((h['test/neg_elbo_per_step'] for h in row['history']), default=math.inf) for row in rows):.3f}.")
    by_flow: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in flows:
        by_flow.setdefault((row["model"], row["guide"]), []).append(row)
    for (model, guide), group in by_flow.items():
        paired = [row for row in group if row["delta_neg_iwae_per_frame"] is not None]
        if not paired:
            lines.append(f"- {guide} ({model}): no plain guide of the same model and seed to pair.")
            continue
        wins = sum(row["delta_neg_iwae_per_frame"] < 0 for row in paired)
        # a sign alone can be noise: count the seeds where the gain is beyond two standard errors
        clear = sum(row["delta_neg_iwae_per_frame"] < -2 * row["delta_neg_iwae_per_frame_se"]
                    for row in paired)
        lines.append(f"- {guide} against the plain guide ({model}): Δ test -IWAE per frame "
                     f"{mean_sd([row['delta_neg_iwae_per_frame'] for row in paired], 3)} over "
                     f"{len(paired)} seed(s), better on {wins}/{len(paired)}, by more than two "
                     f"standard errors on {clear}/{len(paired)}.")
    return lines + _objective_lines(rows) + [""]


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd over seeds per model and guide: the table to read first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["guide"]), []).append(row)
    body = []
    for (model, guide), group in groups.items():
        deltas = [row["delta_neg_iwae_per_frame"] for row in group
                  if row["delta_neg_iwae_per_frame"] is not None]
        body.append([model, guide, len(group),
                     mean_sd([row["test_neg_elbo_per_frame"] for row in group], 3),
                     mean_sd([row["test_neg_iwae_per_frame"] for row in group], 3),
                     mean_sd(deltas, 3) if deltas else MISSING])
    return markdown_table(["model", "guide", "seeds", "test -ELBO", "test -IWAE",
                           "Δ -IWAE vs plain"], body)


def _published(rows: Sequence[dict[str, Any]]) -> list[str]:
    best = min(row["test_neg_elbo_per_frame"] for row in rows)
    best_iwae = min(row["test_neg_iwae_per_frame"] for row in rows)
    body = [[model, f"{value:.3f}", kind, source] for model, value, kind, source in PUBLISHED]
    body += [["ours, best -ELBO (this page)", f"{best:.3f}", "-ELBO", "this page"],
             ["ours, best -IWAE (this page)", f"{best_iwae:.3f}", "-IWAE", "this page"]]
    return ["## Published numbers beside ours", "",
            "Test set, nats per frame (lower is better). Exact likelihoods and bounds are not the "
            "same kind of number: a bound is above the model's -log p(x).", "",
            markdown_table(["model", "nats per frame", "kind", "source"], body), ""]


def _piano_roll(rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """The piano rolls of the best run (lowest test -IWAE) that ``pyro-storn generate`` has written
    a generated.npz for; the page names the best run when that one has none."""
    from .report import generation_figure, read_generation

    ranked = sorted(rows, key=lambda row: row["test_neg_iwae_per_frame"])
    for rank, row in enumerate(ranked):
        generation = read_generation(row["run"])
        if generation is not None and "probabilities" in generation:
            break
    else:
        return []
    figure = generation_figure(generation, out.with_name(out.stem + "_piano_roll.png"),
                               title=f"{row['guide']}, {row['model']}, seed {row['seed']}")
    if rank == 0:
        heading, which = "## Piano rolls of the best run", ""
    else:
        heading = "## Piano rolls of the best run with generated sequences"
        which = (f" The run is number {rank + 1} by test -IWAE: the runs above it "
                 f"({', '.join(Path(r['run']).name for r in ranked[:rank])}) have no "
                 f"generated.npz.")
    return [heading, "",
            f"The first test chorale, the model's per-note probabilities on it (z from the guide), "
            f"and {generation['generated'].shape[0]} continuations after its first "
            f"{int(generation['n_prefix'])} frame(s) with z from the prior (`pyro-storn generate "
            f"RUN` on the run {Path(row['run']).name}).{which}", "",
            f"![piano roll]({figure.name})", ""]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Validation and test -ELBO per frame against training minutes, one colour per run."""
    from .plots import plt  # with the Agg backend plots sets

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for index, row in enumerate(rows):
        color = f"C{index % 10}"
        minutes = [h["minutes"] for h in row["history"]]
        for ax, key in zip(axes, CURVE_KEYS):
            values = [h.get(key, math.nan) for h in row["history"]]
            ax.plot(minutes, values, color=color, lw=1.2,
                    label=f"{row['guide']}, {row['model']}, seed {row['seed']}")
    for ax, key in zip(axes, CURVE_KEYS):
        ax.axhline(TIME_TO_QUALITY, color="k", ls="--", lw=0.8)
        ax.axhline(TARGET_NEG_ELBO, color="k", ls=":", lw=0.8)
        ax.axvline(TIME_BUDGET_MINUTES, color="grey", lw=0.6)
        ax.set_xlabel("training minutes (one thread)")
        ax.set_title(key.split("/")[0] + " -ELBO per frame")
        values = [h[key] for row in rows for h in row["history"] if key in h]
        if values:
            ax.set_ylim(min(min(values), TARGET_NEG_ELBO) - 0.1, min(max(values), 10.0))
    axes[0].set_ylabel("nats per frame (single sample)")
    # Below the panels: inside, ten runs' labels covered the test curves.
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=6)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * math.ceil(len(rows) / 2), 1, 1))
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_khat(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Each run's PSIS k̂ per test sequence, one strip per run, with the 0.7 line above which the
    importance weights (and the IWAE bound) are unreliable; None when no run has k̂."""
    from .plots import plt  # with the Agg backend plots sets

    shown = [row for row in rows if row["khat_per_sequence"]]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.2))
    jitter = np.random.default_rng(0)
    for index, row in enumerate(shown):
        khat = np.asarray(row["khat_per_sequence"], dtype=float)
        ax.scatter(khat, index + jitter.uniform(-0.2, 0.2, khat.size), s=6, alpha=0.6,
                   color=f"C{index % 10}")
    ax.axvline(0.7, color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(shown)),
                  [f"{row['guide']}, seed {row['seed']}"
                   f"{_objective_suffix(row['objective'], row['num_particles'])}" for row in shown],
                  fontsize=7)
    ax.set_xlabel("PSIS k̂ per test sequence (dashed: 0.7)")
    fig.tight_layout()
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_page(run_dirs: Sequence[str | Path], out: str | Path, command: str = "",
               notes: str = "", archive: str | Path | None = None) -> list[dict[str, Any]]:
    """Write ``out`` (Markdown), the JSON of its rows beside it and its figure; returns the rows.
    With ``archive``, the runs are first copied there (:func:`archive_runs`) and the page is made
    from the copies."""
    out = Path(out)
    rows = [run_row(run_dir) for run_dir in run_dirs]  # every run read before anything is copied
    if not rows:
        raise ValueError("no run directories given")
    if archive is not None:
        rows = [run_row(copy) for copy in archive_runs(run_dirs, archive)]
    # the model with the most runs first, then its plain guide, flows, seeds
    counts = {model: sum(row["model"] == model for row in rows) for model in {r["model"] for r in rows}}
    rows.sort(key=lambda row: (-counts[row["model"]], row["model"], row["guide"] != "plain",
                               row["guide"], row["seed"]))
    pair_rows(rows)
    figure = plot_curves(rows, out.with_name(out.stem + "_curves.png"))
    samples = sorted({row["iwae_samples"] for row in rows})
    parts = [
        "# STORN on JSB Chorales", "",
        "- Written by `python -m pyro_storn.jsb_table` from the run directories; do not edit by "
        "hand." + (f" Command: `{command}`" if command else ""),
        "- Data: JSB Chorales (Boulanger-Lewandowski et al. 2012), Pyro's copy, 229 / 76 / 77 "
        f"sequences; test frames {rows[0]['test_frames']}. Bernoulli emission over 88 keys.",
        f"- Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}; total training "
        f"time {sum(row['train_seconds'] for row in rows) / 60:.1f} min summed over runs.",
    ]
    parts += ["- Speed: seconds per epoch of these models against Pyro's DMM example, timed side "
              "by side, in [benchmarks.md](benchmarks.md#jsb) (`python -m benchmarks --suite jsb`)."]
    if notes:
        parts += [f"- {notes}"]
    parts += [
        "",
        "Nats per frame: minus the bound summed over the test sequences, divided by their frames. "
        "Test -ELBO: the mean log-weight of S posterior samples per sequence (the single-sample "
        "ELBO, estimated with S draws); test -IWAE: the log-mean-exp of the same "
        f"S = {', '.join(map(str, samples))} importance weights; both at the best-validation "
        "checkpoint (epoch in brackets). Valid -ELBO: the single-sample pass at that epoch. Δ vs "
        "plain: the paired difference to the plain guide of the same model and seed over the test "
        "sequences, per frame, ± its standard error (negative: the flow is better). k̂ > 0.7: "
        "the share of test sequences whose PSIS k̂ says the guide's importance weights are "
        "unreliable. Train min: the optimiser steps' time, one thread; min to 6.87: training "
        "minutes until the per-epoch test -ELBO first read <= 6.87 (Pyro's DMM without IAF "
        "after 5000 epochs).", "",
        "Mean ± sd over seeds:", "", _summary(rows), "", "Every run:", "",
        _table(rows), "",
    ]
    parts += ["Each run's training, from its config.json (then `pyro-storn evaluate RUN "
              "--samples S`):", ""]
    parts += [f"- `{row['command']}`" for row in rows] + [""]
    parts += _verdicts(rows)
    parts += ["## Curves", "", f"![curves]({figure.name})", "",
              "Dashed: 6.87 (Pyro's DMM, no IAF); dotted: 6.80 (the -ELBO target); grey: 60 "
              "minutes.", ""]
    khat_figure = plot_khat(rows, out.with_name(out.stem + "_khat.png"))
    if khat_figure is not None:
        parts += ["## PSIS k̂ per test sequence", "", f"![k-hat]({khat_figure.name})", "",
                  "Each point is one test chorale: the guide as an importance proposal for its "
                  "posterior, from the evaluation's draws. Above 0.7 the weights are too "
                  "heavy-tailed for the IWAE estimate to be trusted.", ""]
    parts += _piano_roll(rows, out)
    parts += _published(rows)
    write_text_atomic(out, "\n".join(parts))
    records = [{key: value for key, value in row.items()
                if key not in ("neg_elbo_per_sequence", "neg_iwae_per_sequence", "history",
                               "khat_per_sequence")}
               for row in rows]
    write_text_atomic(out.with_suffix(".json"), json.dumps(records, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m pyro_storn.jsb_table",
        description="Write the JSB Chorales results page (Markdown, JSON rows, curves figure) "
        "from evaluated STORN run directories.")
    parser.add_argument("run_dirs", nargs="+", help="run directories with evaluation.json")
    parser.add_argument("--out", default="docs/storn_jsb_chorales.md", help="page to write")
    parser.add_argument("--command", default="", help="the command that made the runs, quoted "
                        "on the page")
    parser.add_argument("--notes", default="", help="one more line for the page's header")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help="first copy each run's config, evaluation, metrics and generated "
                        "piano rolls (no checkpoints) to DIR/<run name>/, and make the page from "
                        "those copies, so it can be written again on a machine without the runs")
    args = parser.parse_args(argv)
    try:  # the page (its JSON and figures beside it) and the archive, before any run is read
        check_output_file(args.out, "--out", force=True)
        if args.archive is not None:
            check_output_dir(args.archive, "--archive")
    except ValueError as error:
        parser.error(str(error))
    try:
        write_page(args.run_dirs, args.out, args.command, args.notes, args.archive)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
