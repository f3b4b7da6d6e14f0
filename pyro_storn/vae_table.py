"""The flow-VAE results table: one row per trained model, the paired comparison with the plain
VAE, where each validation curve stood, the published numbers beside ours, the JSON records, and
the figure of the flow's terms over training.

A *result* is the dict a comparison script stores per model: ``flow`` (``"none"`` for the plain
VAE), ``flow_spec`` (the flow with its builder options, ``"householder:count_transforms=1"``),
``K``, ``train_seconds``, ``history`` (the epoch records of ``metrics.jsonl``), ``best_epoch``,
``test`` (:func:`pyro_storn.vae_fit.evaluate_bounds` on the test images), optionally ``iwae``
(the same on a subset of them, with many samples) and ``eval_seconds``; or ``failed`` with a
message.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import paired_difference
from .rundir import save_figure

__all__ = [
    "PUBLISHED",
    "PUBLISHED_PROTOCOLS",
    "TARGET_NEG_ELBO",
    "TARGET_NEG_IWAE",
    "parse_flow_spec",
    "label",
    "model_name",
    "published_for",
    "validation_curve",
    "study_protocol",
    "record",
    "write_table",
    "plot_terms",
]

# Published test bounds on the statically binarized MNIST with MLP networks, in nats:
# (flow spec, K) -> [(source, value, what)].
STUDY = "Henrion & Welleck"
PUBLISHED: dict[tuple[str, int], list[tuple[str, float, str]]] = {
    ("none", 0): [(STUDY, 94.8, "-ELBO"), ("Tomczak & Welling 2016", 93.9, "-ELBO")],
    ("iaf", 2): [(STUDY, 93.5, "-ELBO")],
    ("householder:count_transforms=1", 1): [(STUDY, 95.1, "-ELBO")],
    ("householder:count_transforms=1", 10): [("Tomczak & Welling 2016", 87.7, "-ELBO")],
    ("planar", 1): [(STUDY, 96.6, "-ELBO")],
    ("planar", 10): [("Rezende & Mohamed 2015", 87.5, "-log p(x) <=")],
}
# How each source obtained its numbers, where its paper or code says; the page prints these.
PUBLISHED_PROTOCOLS: dict[str, str] = {
    STUDY: "the study's protocol above (2000 epochs, lr 0.0002 / (1 + t / 100), batch "
           "normalisation)",
    "Tomczak & Welling 2016": "from their released code (github.com/jmtomczak/"
        "vae_householder_flow: utils/mnist_data.py, utils/VAE_config.py, models/VAE_model.py): "
        "their own static binarisation of MNIST (numpy seed 777, the first 10,000 training "
        "images for validation), tanh MLP (300, 300), latent 40, Adam lr 0.0002, KL warm-up over "
        "200 epochs, up to 1500 epochs with early stopping after 100 without improvement; the "
        "test bound is a one-sample -ELBO (analytic KL of the base Gaussian, exact for an "
        "orthogonal flow under N(0, I)) at the best-validation epoch",
    "Rezende & Mohamed 2015": "an upper bound on -log p(x) (≤); we set our -IWAE beside it, "
        "itself such a bound and the tighter of our two",
}
# The best flow's test -ELBO should reach Rezende & Mohamed's planar K = 10; the moonshot -IWAE.
TARGET_NEG_ELBO = 87.5
TARGET_NEG_IWAE = 84.0
# The study's training protocol (Henrion & Welleck, after Rezende & Mohamed and Kingma et al.).
STUDY_EPOCHS = 2000
STUDY_LR = 2e-4
STUDY_LR_DECAY_EPOCHS = 100
# Epochs over which the table reports how far each validation curve still moved.
CURVE_TAIL_EPOCHS = 3

TERM_PANELS = (
    ("train_log_q0", "E[log q0(z0)]"),
    ("train_log_qK", "E[log qK(zK)]"),
    ("train_sum_log_det", "E[Σ log|det J|]"),
    ("train_log_prior", "E[log p(zK)]"),
)


def parse_flow_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"householder:count_transforms=1"`` -> ``("householder", {"count_transforms": 1})``:
    a flow name and the options passed to its builder; values are Python literals (ints,
    floats, True, None, ...), anything else is kept as a string."""
    name, *options = spec.split(":")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"flow option {option!r} in {spec!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


def label(result: dict[str, Any]) -> str:
    """The model's name in the table: its flow spec (the flow name for results stored before
    specs existed), or VAE."""
    return "VAE" if result["flow"] == "none" else result.get("flow_spec", result["flow"])


def model_name(result: dict[str, Any]) -> str:
    """The label with the flow length, ``householder:count_transforms=1 K=2`` (the VAE: VAE)."""
    return "VAE" if result["flow"] == "none" else f"{label(result)} K={result['K']}"


def published_for(result: dict[str, Any]) -> list[tuple[str, float, str]]:
    spec = "none" if result["flow"] == "none" else result.get("flow_spec", result["flow"])
    return PUBLISHED.get((spec, result["K"]), [])


def validation_curve(history: list[dict[str, Any]], key: str = "valid_neg_elbo",
                     tail: int = CURVE_TAIL_EPOCHS) -> dict[str, Any] | None:
    """Where a validation curve stood: the best value and its epoch, the last epoch, and how much
    the curve fell over the last ``tail`` epochs (positive: still improving). ``None`` when the
    records have no ``key``."""
    points = [(h["epoch"], h[key]) for h in history if key in h]
    if not points:
        return None
    best_epoch, best = min(points, key=lambda p: p[1])
    last_epoch, last = points[-1]
    earlier = points[-1 - tail][1] if len(points) > tail else points[0][1]
    return {"best_epoch": best_epoch, "best": best, "last_epoch": last_epoch, "last": last,
            "fall_over_tail": earlier - last, "tail": min(tail, len(points) - 1)}


def study_protocol(epochs: int, lr: float, lr_decay_epochs: float | None,
                   batch_norm: bool = False) -> str:
    """One line saying which of the study's settings (2,000 epochs, lr 0.0002 / (1 + t / 100),
    batch normalisation) a run follows."""
    followed, changed = [], []
    (followed if epochs >= STUDY_EPOCHS else changed).append(
        f"{epochs} epochs (the study: {STUDY_EPOCHS})")
    (followed if lr_decay_epochs == STUDY_LR_DECAY_EPOCHS else changed).append(
        f"the schedule lr / (1 + t / {STUDY_LR_DECAY_EPOCHS}), t in epochs"
        if lr_decay_epochs == STUDY_LR_DECAY_EPOCHS else
        f"the schedule {'constant' if lr_decay_epochs is None else f'lr / (1 + t / {lr_decay_epochs:g})'}"
        f" (the study: lr / (1 + t / {STUDY_LR_DECAY_EPOCHS}))")
    (followed if lr == STUDY_LR else changed).append(
        f"base lr {lr:g}" + ("" if lr == STUDY_LR else f" (the study: {STUDY_LR:g})"))
    (followed if batch_norm else changed).append(
        "batch normalisation" if batch_norm else "no batch normalisation (the study: with)")
    return (f"Against the study's protocol: follows {'; '.join(followed) or 'none of it'}; "
            f"differs in {'; '.join(changed) or 'nothing'}.")


def _fmt(value: float | None, se: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if se is None or not math.isfinite(se) else f"{value:.2f} ± {se:.2f}"


def _iwae(result: dict[str, Any]) -> dict[str, Any]:
    return result.get("iwae") or result["test"]


def record(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of one model: ``model``, ``K``, ``test_neg_elbo``, ``test_neg_iwae``,
    ``iwae_samples``, ``epochs``, ``train_seconds``, with standard errors, the images each bound
    was taken on, the best epoch and the paired differences to ``baseline`` (the plain VAE)."""
    out: dict[str, Any] = {"model": label(result), "K": result["K"],
                           "epochs": len(result.get("history") or []),
                           "train_seconds": round(float(result.get("train_seconds", 0.0)), 1)}
    if "failed" in result:
        out["failed"] = result["failed"]
        return out
    test, iwae = result["test"], _iwae(result)
    out.update(
        test_neg_elbo=test["neg_elbo_mean"], test_neg_elbo_se=test["neg_elbo_se"],
        elbo_samples=test["num_samples"], elbo_images=test["n_images"],
        test_neg_iwae=iwae["neg_iwae_mean"], test_neg_iwae_se=iwae["neg_iwae_se"],
        iwae_samples=iwae["num_samples"], iwae_images=iwae["n_images"],
        best_epoch=result.get("best_epoch"),
        eval_seconds=round(float(result.get("eval_seconds", 0.0)), 1),
    )
    curve = validation_curve(result.get("history") or [])
    if curve is not None:
        out["valid_neg_elbo_best"] = curve["best"]
        out["valid_neg_elbo_last"] = curve["last"]
        out["valid_fall_over_last_epochs"] = curve["fall_over_tail"]
    if baseline is not None and baseline is not result and "failed" not in baseline:
        for name, mine, theirs in (("elbo", test, baseline["test"]),
                                   ("iwae", iwae, _iwae(baseline))):
            if len(mine[f"neg_{name}"]) == len(theirs[f"neg_{name}"]):
                mean, se = paired_difference(mine[f"neg_{name}"], theirs[f"neg_{name}"])
                out[f"delta_neg_{name}_vs_vae"], out[f"delta_neg_{name}_vs_vae_se"] = mean, se
    out["published"] = [{"source": s, "value": v, "bound": w} for s, v, w in published_for(result)]
    return out


def write_table(
    results: list[dict[str, Any]], *, title: str, preamble: list[str], skipped: list[str],
    layers: list[str], figure_name: str | None, planned: list[str] | None = None,
    seed: int | None = None,
) -> str:
    """The Markdown page: ``title``, the ``preamble`` bullets (command, data, budget, machine),
    one row per result, the paired verdicts, the anchors and targets, and notes.

    :param layers: one line per flow saying what one layer is (``name: Class(repr)``).
    :param planned: model names still to run (listed as such).
    """
    baseline = next((r for r in results if r["flow"] == "none" and "test" in r), None)
    records = [record(r, baseline) for r in results]
    done = [(r, rec) for r, rec in zip(results, records) if "failed" not in r]
    elbo_s = {rec["elbo_samples"] for _, rec in done}
    iwae_s = {rec["iwae_samples"] for _, rec in done}
    iwae_n = {rec["iwae_images"] for _, rec in done}
    elbo_n = {rec["elbo_images"] for _, rec in done}
    describe = lambda values: "/".join(str(v) for v in sorted(values)) or "-"  # noqa: E731
    lines = [f"# {title}", "", *[f"- {line}" for line in preamble], ""]
    subset = iwae_n != elbo_n
    lines.append(
        f"All bounds in nats per image (lower is better), ± the standard error over images. "
        f"Test -ELBO: the mean log-weight of S = {describe(elbo_s)} posterior samples per image "
        f"on {describe(elbo_n)} test images; test -IWAE: S = {describe(iwae_s)} samples per "
        f"image on {describe(iwae_n)} test images"
        + (" (a subset spread evenly over the test set, whose images are sorted by digit; "
           "-ELBO and -IWAE of that subset come from the same samples)" if subset else
           " (the same samples)")
        + ". Δ vs VAE: the mean per-image difference to the plain VAE on the same images, ± "
        "its paired standard error (negative: better than the VAE). Valid -ELBO: the "
        "single-sample -ELBO of the validation images at the best epoch, whose state is the "
        f"one evaluated; 'still falling': its drop over the last {CURVE_TAIL_EPOCHS} epochs. "
        "Train s: seconds of optimiser steps; eval s: seconds of the final bounds.")
    if subset and done:
        n_test = max(elbo_n)
        minutes = sum(r.get("eval_seconds", 0.0) * n_test / rec["iwae_images"]
                      for r, rec in done) / 60
        lines[-1] += (f" At the rates measured here, -IWAE with S = {describe(iwae_s)} on all "
                      f"{n_test} test images would take about {minutes:.0f} min for these "
                      f"{len(done)} models instead of the subset's "
                      f"{sum(r.get('eval_seconds', 0.0) for r, _ in done) / 60:.0f} min.")
    lines += [
        "",
        f"| model | K | epochs (best) | valid -ELBO (still falling) | test -ELBO "
        f"| test -IWAE | Δ -ELBO vs VAE | Δ -IWAE vs VAE | IWAE ≤ ELBO | published "
        f"| train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, rec in zip(results, records):
        name = label(r)
        if "failed" in r:
            lines.append(f"| {name} | {r['K']} | failed: {r['failed']} | | | | | | | | "
                         f"{rec['train_seconds']:.0f} | |")
            continue
        curve = validation_curve(r.get("history") or [])
        valid = "-" if curve is None else f"{curve['best']:.2f} ({curve['fall_over_tail']:+.2f})"
        deltas = [
            _fmt(rec.get(f"delta_neg_{b}_vs_vae"), rec.get(f"delta_neg_{b}_vs_vae_se"))
            if r is not baseline else "-" for b in ("elbo", "iwae")
        ]
        iwae = _iwae(r)
        jensen = "yes" if np.all(np.asarray(iwae["neg_iwae"]) <= np.asarray(iwae["neg_elbo"])) \
            else "NO"
        published = "; ".join(f"{w.replace(' <=', '')} {'≤ ' if '<=' in w else ''}{v} ({s})"
                              for s, v, w in published_for(r)) or ""
        best = f" ({rec['best_epoch']})" if rec.get("best_epoch") else ""
        lines.append(
            f"| {name} | {r['K']} | {rec['epochs']}{best} | {valid} "
            f"| {_fmt(rec['test_neg_elbo'], rec['test_neg_elbo_se'])} "
            f"| {_fmt(rec['test_neg_iwae'], rec['test_neg_iwae_se'])} | {deltas[0]} "
            f"| {deltas[1]} | {jensen} | {published} | {rec['train_seconds']:.0f} "
            f"| {rec['eval_seconds']:.0f} |"
        )
    if planned:
        lines += ["", f"Still to run (in this order): {', '.join(planned)}."]
    lines += _invocations(results)
    if skipped:
        lines += ["", f"Not run (not registered in this install): {', '.join(skipped)}."]
    if baseline is not None:
        lines += _verdicts(results, records, baseline, seed)
    lines += _anchors(results, records)
    if layers:
        note = ("K counts layers as `transforms.flow(name, latent_dim, K, **options)` builds "
                "them, with the registry's defaults where the spec gives no option: "
                + "; ".join(layers) + ".")
        if any(label(r) == "householder" for r in results):
            note += (" So one `householder` layer is a product of `count_transforms` "
                     "reflections, not the single reflection per step of Tomczak & Welling; "
                     "`householder:count_transforms=1` gives theirs (K reflections).")
        lines += ["", note]
    failed = [model_name(r) for r in results if "failed" in r]
    lines += ["", f"Runs stopped by a non-finite loss: {', '.join(failed) or 'none'}."]
    if figure_name:
        lines += ["", f"![flow terms over training]({figure_name})", "",
                  "The figure shows, per epoch, the flow's terms on the first 1000 training "
                  "images: E[log q0(z0)], E[log qK(zK)], E[Σ log|det J|] and the prior "
                  "log-density of the posterior samples E[log p(zK)] (the study's Figs. 3-4)."]
    return "\n".join(lines) + "\n"


def _invocations(results: list[dict[str, Any]]) -> list[str]:
    invocations: dict[str, list[str]] = {}
    for r in results:
        when = r.get("invocation") or (
            "runs resumed from a checkpoint (train times span invocations)" if r.get("resumed")
            else "an earlier invocation (time not recorded)")
        invocations.setdefault(when, []).append(model_name(r))
    if len(invocations) < 2:
        return []
    groups = "; ".join(f"{when}: {', '.join(models)}" for when, models in invocations.items())
    return ["", "Times come from more than one invocation (stored models are reused), each under "
                "its own machine load: compare train s and eval s only within one. By invocation: "
                f"{groups}."]


def _verdicts(results: list[dict[str, Any]], records: list[dict[str, Any]],
              baseline: dict[str, Any], seed: int | None) -> list[str]:
    better, worse, tied = [], [], []
    for r, rec in zip(results, records):
        if r is baseline or "failed" in r or "delta_neg_iwae_vs_vae" not in rec:
            continue
        mean, se = rec["delta_neg_iwae_vs_vae"], rec["delta_neg_iwae_vs_vae_se"]
        (better if mean < -2 * se else worse if mean > 2 * se else tied).append(model_name(r))
    seeds = "" if seed is None else f" (seed {seed})"
    return ["", "Against the plain VAE under this budget (test -IWAE, paired difference beyond "
                f"2 standard errors): better: {', '.join(better) or 'none'}; worse: "
                f"{', '.join(worse) or 'none'}; not distinguishable: {', '.join(tied) or 'none'}. "
                f"Each model is one training run{seeds}: the standard errors cover the test "
                "images and the Monte Carlo samples, not the spread between training runs."]


def _anchors(results: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Published numbers (statically binarized MNIST, MLP networks) and ours:", ""]
    shown = set()
    for r, rec in zip(results, records):
        for source, value, what in published_for(r):
            shown.add((label(r), r["K"], source))
            if "failed" in r:
                continue
            ours = rec["test_neg_iwae"] if what.startswith("-log") else rec["test_neg_elbo"]
            kind = "-IWAE" if what.startswith("-log") else "-ELBO"
            verdict = "beaten" if ours < value else f"short by {ours - value:.2f}"
            lines.append(f"- {model_name(r)}: {source} {what} {value}; ours {kind} {ours:.2f} "
                         f"({verdict}).")
    for (spec, k), anchors in PUBLISHED.items():
        name = "VAE" if spec == "none" else f"{spec} K={k}"
        for source, value, what in anchors:
            if (("VAE" if spec == "none" else spec), k, source) not in shown:
                lines.append(f"- {name}: {source} {what} {value}; not run yet.")
    sources = dict.fromkeys(source for anchors in PUBLISHED.values() for source, _, _ in anchors)
    lines += ["", "How those numbers were obtained:", ""]
    lines += [f"- {source}: {PUBLISHED_PROTOCOLS[source]}." for source in sources]
    flows = [rec for r, rec in zip(results, records) if r["flow"] != "none" and "failed" not in r]
    if flows:
        best_elbo = min(flows, key=lambda rec: rec["test_neg_elbo"])
        best_iwae = min(flows, key=lambda rec: rec["test_neg_iwae"])
        lines += ["", f"Targets: the best flow's test -ELBO ≤ {TARGET_NEG_ELBO} (ours: "
                      f"{best_elbo['model']} K={best_elbo['K']}, {best_elbo['test_neg_elbo']:.2f}"
                      f", short by {max(best_elbo['test_neg_elbo'] - TARGET_NEG_ELBO, 0):.2f}); "
                      f"moonshot test -IWAE ≤ {TARGET_NEG_IWAE} (ours: {best_iwae['model']} "
                      f"K={best_iwae['K']}, {best_iwae['test_neg_iwae']:.2f}, short by "
                      f"{max(best_iwae['test_neg_iwae'] - TARGET_NEG_IWAE, 0):.2f})."]
    return lines


def plot_terms(results: list[dict[str, Any]], path: Path) -> None:
    """Four panels of the flow's terms per epoch (:data:`TERM_PANELS`), one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per flow family, one line style per length: 13+ curves stay readable.
    families = list(dict.fromkeys(label(r) for r in results))
    lengths = sorted({r["K"] for r in results if r["K"] > 0})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for r in results:
        history = r.get("history") or []
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        color = plt.get_cmap("tab10")(families.index(label(r)) % 10)
        style = "-" if r["K"] == 0 else styles[lengths.index(r["K"]) % len(styles)]
        for ax, (key, title) in zip(axes.flat, TERM_PANELS):
            ax.plot(epochs, [h[key] for h in history], label=model_name(r), color=color,
                    linestyle=style)
            ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
