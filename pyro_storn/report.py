"""A Markdown report over one or more STORN run directories: a metrics table and figures."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .data.pendulum import ACTION_FEATURE, FEATURES
from .diagnostics import KHAT_THRESHOLD
from .plots import (plot_flow_terms, plot_generation, plot_khat_per_sequence, plot_losses,
                    plot_piano_roll)
from .rundir import write_text_atomic
from .runs import EVALUATION_NAME, GENERATED_NAME, read_run_config
from .tables import MISSING, markdown_table
from .training import read_metrics

__all__ = ["run_summary", "write_report", "generation_figure", "read_generation", "format_table", "khat_sentence"]


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The numbers of a run: config, the evaluated epoch's metrics, test bounds (when evaluated).

    The evaluated epoch is the one whose state ``evaluation.json`` scored (its ``"checkpoint"``:
    the best validation epoch, see :func:`~pyro_storn.runs.load_run`), else the last one; the
    single-sample columns (train -ELBO, KL, Σ log-det) come from it, so that they describe the
    same parameters as the bounds."""
    run_dir = Path(run_dir)
    record = read_run_config(run_dir)
    history = read_metrics(run_dir)
    if not history:
        raise ValueError(f"{str(run_dir)!r} has no completed epoch in its metrics.jsonl")
    evaluation_path = run_dir / EVALUATION_NAME
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else None
    state = (evaluation or {}).get("checkpoint") or {}
    by_epoch = {r["epoch"]: r for r in history}
    evaluated = by_epoch.get(state.get("epoch"), history[-1]) if state.get("which") == "best" \
        else history[-1]
    config = record["config"]
    summary: dict[str, Any] = {
        "flow": config["flow"], "flow_length": config["flow_length"],
        "epochs": history[-1]["epoch"], "evaluated_epoch": evaluated["epoch"],
        "seed": config["seed"],
        "train_time_s": float(sum(r.get("epoch_seconds", 0.0) for r in history)),
        "train_neg_elbo": evaluated.get("train/neg_elbo"),
        "validation_neg_elbo": evaluated.get("validation/neg_elbo"),
        "test_neg_elbo_1": evaluated.get("test/neg_elbo"),
        "kl": evaluated.get("test/kl"), "recon_nll": evaluated.get("test/recon_nll"),
        "sum_log_det": evaluated.get("test/sum_log_det"), "n_steps": record["data"]["n_steps"],
    }
    if evaluation is not None:
        for key in ("neg_elbo_mean", "neg_elbo_sd", "neg_iwae_mean", "neg_iwae_sd",
                    "neg_elbo_per_step", "neg_iwae_per_step", "num_samples"):
            summary[f"test_{key}"] = evaluation[key]
        psis = evaluation.get("psis")
        if psis is not None:
            summary["psis_num_samples"] = psis["num_samples"]
            summary["psis_khat"] = psis["khat"]
            summary["psis_ess"] = psis["ess"]
            # per sequence, a loss like the table's other bounds
            summary["psis_neg_iwae"] = -psis["iwae"] / evaluation["n_sequences"]
            if psis.get("khat_per_item") is not None:
                summary["psis_khat_per_sequence"] = psis["khat_per_item"]
                summary["psis_ess_per_sequence"] = psis["ess_per_item"]
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(summaries: Mapping[str, dict[str, Any]]) -> str:
    """One Markdown row per run."""
    rows = []
    for name, s in summaries.items():
        iwae = (f"{_fmt(s.get('test_neg_iwae_mean'))} ({s['test_num_samples']})"
                if "test_num_samples" in s else MISSING)
        psis_iwae, psis_ess = MISSING, MISSING
        if "psis_num_samples" in s:
            psis_iwae = f"{_fmt(s['psis_neg_iwae'])} ({s['psis_num_samples']})"
            psis_ess = f"{_fmt(s['psis_ess'], 1)} of {s['psis_num_samples']}"
        epochs = str(s["epochs"])
        if s.get("evaluated_epoch", s["epochs"]) != s["epochs"]:
            epochs += f" (best {s['evaluated_epoch']})"  # the state evaluation.json scored
        rows.append([
            name, s["flow"], s["flow_length"], epochs, _fmt(s["train_neg_elbo"]),
            _fmt(s.get("test_neg_elbo_mean")), iwae, _fmt(s.get("test_neg_elbo_per_step"), 4),
            _fmt(s.get("test_neg_iwae_per_step"), 4), _fmt(s["kl"]), _fmt(s["sum_log_det"]),
            _fmt(s.get("psis_khat")), psis_iwae, psis_ess, _fmt(s["train_time_s"], 0),
        ])
    return markdown_table(
        ["run", "flow", "K", "epochs", "train -ELBO", "test -ELBO", "test -IWAE (S)",
         "test -ELBO / step", "test -IWAE / step", "KL", "Σ log-det", "PSIS k̂ (joint)",
         "PSIS -IWAE (S)", "PSIS ESS (joint)", "train time (s)"], rows)


def _feature_names(n_features: int) -> list[str]:
    names = list(FEATURES) if n_features >= len(FEATURES) else []
    if n_features == len(FEATURES) + 1:
        names.append(ACTION_FEATURE)
    return names


def khat_sentence(khats: Any) -> str:
    """"M of N test sequences have k̂ > 0.7"."""
    khats = np.asarray(khats, dtype=float)
    above = int(np.sum(khats > KHAT_THRESHOLD))
    return f"{above} of {khats.size} test sequences have k̂ > {KHAT_THRESHOLD}"


def _khat_sections(
    summaries: Mapping[str, dict[str, Any]], figures: Path, report_dir: Path
) -> list[str]:
    """A k̂-per-sequence figure and sentence for every evaluated run with PSIS diagnostics."""
    parts: list[str] = []
    for name, s in summaries.items():
        khats = s.get("psis_khat_per_sequence")
        if khats is None:
            continue
        khats = np.asarray(khats, dtype=float)
        png = plot_khat_per_sequence(khats, figures / f"khat_{name}.png", title=name)
        parts += [
            f"## PSIS k̂ per test sequence: {name}", "",
            f"{khat_sentence(khats)} (S = {s['psis_num_samples']} draws from the guide per "
            f"sequence; k̂ max {np.max(khats):.2f}, median {np.median(khats):.2f}; "
            f"importance ESS per sequence median "
            f"{np.median(s['psis_ess_per_sequence']):.1f} of {s['psis_num_samples']}). "
            f"Above {KHAT_THRESHOLD} the guide's importance weights for that sequence have too "
            f"heavy a tail to trust (Yao et al. 2018). The joint k̂ in the table treats the "
            f"whole test set as one draw, so it grows with the number of sequences.", "",
            f"![k-hat {name}]({png.relative_to(report_dir)})", "",
        ]
    return parts


def read_generation(run_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The arrays of ``run_dir``'s ``generated.npz`` (:func:`~pyro_storn.runs.generate_run`), or
    ``None`` when ``pyro-storn generate`` has not written one."""
    path = Path(run_dir) / GENERATED_NAME
    if not path.exists():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def generation_figure(generation: Mapping[str, np.ndarray], path: str | os.PathLike,
                      title: str = "") -> Path:
    """The figure of a ``generated.npz`` (:func:`~pyro_storn.runs.generate_run`) for its first
    sequence: piano rolls when it carries the Bernoulli model's ``probabilities``, signals
    against time otherwise; padding after the real sequence's last observed step is cut."""
    actual, generated = generation["actual"][0], generation["generated"][:, 0]
    n_prefix = int(generation["n_prefix"])
    if "probabilities" not in generation:
        return plot_generation(actual, generated, n_prefix, _feature_names(actual.shape[-1]),
                               path, title=title)
    observed = np.flatnonzero(generation["mask"][0])
    length = int(observed[-1]) + 1 if observed.size else actual.shape[0]
    return plot_piano_roll(actual[:length], generated[:, :length],
                           generation["probabilities"][0][:length], path, n_prefix=n_prefix,
                           title=title)


def write_report(
    run_dirs: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    title: str = "STORN on the inverted pendulum",
    notes: str = "",
) -> Path:
    """Write ``out`` (Markdown) with a table over ``run_dirs`` (name -> directory) and figures
    in ``<out dir>/figures``: losses, flow terms, PSIS k̂ per test sequence for every run
    evaluated with PSIS diagnostics, and generated against actual signals for every run that
    has ``generated.npz``."""
    out = Path(out)
    figures = out.parent / "figures"
    summaries = {name: run_summary(path) for name, path in run_dirs.items()}
    histories = {name: read_metrics(path) for name, path in run_dirs.items()}
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    parts += [
        "Losses in nats (negated bounds; lower is better). Train -ELBO, KL and Σ log-det are "
        "the last epoch's single-sample averages over the sets; test -ELBO and -IWAE use S "
        "importance samples per sequence. PSIS k̂, -IWAE (per sequence) and ESS come from "
        "`pyro-storn evaluate`'s importance draws on the test split (k̂ and ESS of the joint "
        "weights of all test sequences; per sequence below).", "", format_table(summaries), "",
    ]
    loss_png = plot_losses(histories, figures / "losses.png")
    parts += ["## Training curves (Savitzky-Golay smoothed)", "",
              f"![losses]({loss_png.relative_to(out.parent)})", ""]
    flow_png = plot_flow_terms(histories, figures / "flow_terms.png")
    parts += ["## Flow terms over training", "",
              "E[log q0(z0)], E[log qK(zK)] = E[log q0] - E[Σ log|det J|], and the prior "
              "E[log p(zK)] on the training set.", "",
              f"![flow terms]({flow_png.relative_to(out.parent)})", ""]
    parts += _khat_sections(summaries, figures, out.parent)
    for name, path in run_dirs.items():
        generation = read_generation(path)
        if generation is None:
            continue
        png = generation_figure(generation, figures / f"generation_{name}.png", title=name)
        n_prefix, count = int(generation["n_prefix"]), generation["generated"].shape[0]
        what = ("Piano rolls: the real test sequence, the model's per-note probabilities on it, "
                "and " if "probabilities" in generation else "")
        parts += [f"## Generated vs actual: {name}", "",
                  f"{what}the first {n_prefix} step(s) of a test sequence observed and the rest "
                  f"generated {count} times with z from the prior.", "",
                  f"![generation {name}]({png.relative_to(out.parent)})", ""]
    return write_text_atomic(out, "\n".join(parts))
