"""``pyro-storn``: simulate the pendulum, train / evaluate / diagnose STORN, generate, report.

Every subcommand has ``--help``. Bad input exits 2 with one line on stderr and writes nothing:
all arguments, the data and every output place (writable, no file replaced without ``--force``)
are checked before any file or directory is created and before the expensive work. The work is
done by library functions (:mod:`pyro_storn.runs`, :mod:`pyro_storn.report`), which the demo and
the examples call too; a run directory's identity, lock and recovery are
:mod:`pyro_storn.rundir`'s.

Exit codes: 0 done; 1 training stopped on a non-finite loss (the last good checkpoint kept);
2 bad input, one line on stderr; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, what
``kill``, systemd, SLURM and docker send): one line on stderr, and a training run stops at the end
of a step with a checkpoint that ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from .interrupts import exit_code, raise_on_stop, signal_of

if TYPE_CHECKING:
    from .data.sequences import SequenceData

__all__ = ["main", "build_parser", "OneLineParser"]

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1
EXIT_INTERRUPTED = exit_code(signal.SIGINT)  # 130
EXIT_TERMINATED = exit_code(signal.SIGTERM)  # 143
_STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
# What diagnose writes into its --out (pyro_storn.diagnostics.write_diagnostics).
DIAGNOSE_FILES = ("inference_data.nc", "importance.json", "khat.png", "log_weights.png",
                  "pair.png")
GENERATION_FIGURE = Path("figures") / "generation.png"
# What the report reads of a run's evaluation.json (pyro_storn.report.run_summary).
REPORT_EVALUATION_KEYS = ("neg_elbo_mean", "neg_elbo_sd", "neg_iwae_mean", "neg_iwae_sd",
                          "neg_elbo_per_step", "neg_iwae_per_step", "num_samples")
REPORT_PSIS_KEYS = ("num_samples", "khat", "ess", "iwae")
# The figures the report writes beside it (pyro_storn.report.write_report): for all runs, per run.
REPORT_FIGURES = ("losses.png", "flow_terms.png")
REPORT_RUN_FIGURES = ("khat", "generation")


class _InputError(Exception):
    """Bad input: reported as one line and exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit 2, for every entry point."""

    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# argparse type functions over the shared checks, in argparse's error style (it names the flag).
def _positive_int(text: str) -> int:
    from .validation import check_positive_int

    try:
        return check_positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _non_negative_int(text: str) -> int:
    from .validation import check_non_negative_int

    try:
        return check_non_negative_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _bounded_float(low: float, high: float, closed_high: bool, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low <= value and (value <= high if closed_high else value < high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_non_negative_float = _bounded_float(0.0, math.inf, False, "a non-negative number")
_decay = _bounded_float(math.ulp(0.0), 1.0, True, "a number in (0, 1]")
_beta = _bounded_float(0.0, 1.0, False, "a number in [0, 1)")  # also a dropout probability


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _checkpoint_option(parser: argparse.ArgumentParser) -> None:
    from .runs import CHECKPOINT_CHOICES

    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help="which trained state: best, the epoch of lowest validation -ELBO "
                        "when the run held out validation sequences (train "
                        "--validation-fraction), else the last; last, the last epoch's "
                        "(default: best)")


def _particle_batch_option(parser: argparse.ArgumentParser, samples_flag: str) -> None:
    from .runs import ROWS_PER_PASS

    parser.add_argument("--particle-batch-size", type=_positive_int, default=None,
                        help=f"draws per vectorised pass, bounding memory; must divide "
                        f"{samples_flag} (default: the most that keep draws x test sequences "
                        f"<= {ROWS_PER_PASS})")


def _force_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"replace {what} files that exist (default: refuse, change nothing)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyro-storn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("simulate", help="simulate the random-torque pendulum into an .npz",
                       description="Simulate gymnasium's Pendulum-v1 under a uniformly random "
                       "torque; writes x (train), x_test and the generating parameters.")
    p.add_argument("--out", required=True, help="output file, must end in .npz")
    p.add_argument("--n-sequences", type=_positive_int, default=1000)
    p.add_argument("--n-steps", type=_positive_int, default=100)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--with-action", action="store_true", help="add the torque as a last feature")
    _force_option(p, "--out")

    import transforms

    from .iwae_objective import OBJECTIVES
    from .runs import FLOW_STARTS, GENERATED_NAME
    from .storn import EMISSIONS, ENCODERS, PRIORS

    flows = ["none"] + transforms.available()
    p = sub.add_parser("train", help="train STORN (optionally with a flow guide)",
                       description="Train STORN by SVI; writes config.json, metrics.jsonl and "
                       "checkpoints into the run directory.")
    p.add_argument("--data", required=True,
                   help=".npz with x (N, T, D) [, mask, x_test], or a polyphonic pickle in Pyro's "
                   "format (e.g. jsb_chorales.pickle: its train / valid / test splits are used "
                   "as they are, valid for best.pt; read safely, never a plain pickle.load)")
    p.add_argument("--out", required=True,
                   help="run directory: new, empty, or left by a run that stopped before its "
                   "first checkpoint (started over); locked while training, so a second "
                   "process is refused")
    p.add_argument("--flow", default="none", help=f"flow guide: {', '.join(flows)}")
    p.add_argument("--flow-length", type=_non_negative_int, default=None,
                   help="flow layers K (default 0 without a flow, 4 with one)")
    p.add_argument("--latent-dim", type=_positive_int, default=2)
    p.add_argument("--hidden-dim", type=_positive_int, default=128)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=20)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--num-particles", type=_positive_int, default=1, metavar="K",
                   help="samples per sequence and step: of the ELBO's estimate, or the K of the "
                   "IWAE bound with --objective iwae (default: 1)")
    p.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                   help="what training minimises: 'elbo' (Pyro's Trace_ELBO), or 'iwae', minus "
                   "the importance-weighted bound of each sequence with K = --num-particles "
                   "draws (Burda et al. 2016), the bound evaluate reports")
    p.add_argument("--clip-norm", type=_positive_float, default=10.0,
                   help="clip the gradient of all parameters together to this norm")
    p.add_argument("--emission", choices=EMISSIONS, default="normal",
                   help="p(x_t | ...): 'normal' for real-valued data, 'bernoulli' for 0/1 data "
                   "such as piano rolls (refuses other values)")
    p.add_argument("--encoder", choices=ENCODERS, default="forward",
                   help="what q(z_t | ...) sees: 'forward' x_1:t (STORN's), 'backward' x_t:T "
                   "(as in DMM and SRNN), 'bidirectional' both")
    p.add_argument("--emission-hidden", type=_non_negative_int, default=0, metavar="H",
                   help="0 (default): STORN's linear emission of the decoder state; H > 0: an MLP "
                   "with two ReLU layers of width H of the decoder state and z_t (as the VRNN's)")
    p.add_argument("--prior", choices=PRIORS, default="standard",
                   help="p(z_t | ...): 'standard' N(0, I) (STORN's), 'learned' a Normal set by "
                   "the decoder state before the step (the VRNN's), so the latents form a "
                   "process over time")
    p.add_argument("--dropout", type=_beta, default=0.0, metavar="P",
                   help="drop the emission's inputs and hidden units with probability P while "
                   "training (0: none); evaluation never drops")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0,
                   help="L2 penalty added to the gradient by Adam (Pyro's DMM example uses 2.0)")
    p.add_argument("--lr-decay", type=_decay, default=1.0,
                   help="multiply the learning rate by this per epoch, spread over its steps "
                   "(default 1: constant)")
    p.add_argument("--adam-beta1", type=_beta, default=0.9,
                   help="Adam's first-moment decay (Pyro's DMM example uses 0.96)")
    p.add_argument("--kl-anneal-epochs", type=_non_negative_int, default=0,
                   help="linear KL warm-up over this many epochs (0: none)")
    p.add_argument("--validation-fraction", type=_fraction, default=0.0,
                   help="hold out this share of the training sequences (the same ones for "
                   "every run on the data file): not trained on, scored each epoch, and the "
                   "state of the epoch with the lowest validation -ELBO kept as best.pt, which "
                   "evaluate, diagnose and generate then use (default 0: none, the last epoch)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start every parameter this model shares by name with the trained run "
                   "RUN (its best state, else its last) from that run's value, the rest (e.g. a "
                   "flow RUN has not) from its own initialisation: to add a flow guide to a STORN "
                   "that already uses its latent")
    p.add_argument("--flow-start", choices=FLOW_STARTS, default="random",
                   help="'identity': the flow layers start as the identity map (their networks' "
                   "output layers zero), so a flow added with --init-from starts as exactly that "
                   "run's guide; iaf, maf, realnvp and nice only, with a --flow-length whose "
                   "permutations between layers cancel (odd for iaf and maf) (default: random, "
                   "each family's own initialisation)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1, help="epochs")
    p.add_argument("--metrics-every", type=_positive_int, default=1,
                   help="score the train / validation / test splits every this many epochs (and "
                   "after the last); best.pt is chosen among those epochs")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (its stored settings; --epochs is the total) "
                   "on the same data (checked by digest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training (DDP) on the process group torchrun starts, e.g. "
                   "`torchrun --nproc_per_node 4 -m pyro_storn.cli train --distributed ...`; "
                   "--batch-size is per process; without torchrun it runs as one process; "
                   "see docs/distributed.md")

    p = sub.add_parser("evaluate", help="test -ELBO, IWAE bound and PSIS k-hat of a trained run",
                       description="Test -ELBO and -IWAE per sequence and per step, and the "
                       "importance diagnostics of the guide on the test split: Pareto k-hat per "
                       "sequence and joint (above 0.7 the guide's importance weights are "
                       "unreliable), the IWAE bound and the importance-weight ESS. Writes "
                       "evaluation.json (the diagnostics under \"psis\") into the run directory, "
                       "replacing the run's previous evaluation.")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=_positive_int, default=100, help="importance samples S")
    p.add_argument("--psis-samples", type=_positive_int, default=100,
                   help="draws per test sequence for k-hat, IWAE and ESS (>= 2); equal to "
                   "--samples, one set of draws serves both (default: 100)")
    _particle_batch_option(p, "--psis-samples")
    _checkpoint_option(p)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the training device)")

    p = sub.add_parser("diagnose", help="ArviZ InferenceData and diagnostic figures of a run",
                       description="Draw S latents per test sequence from the trained guide, "
                       "score them under the model and write into --out: inference_data.nc "
                       "(ArviZ netCDF, read with arviz.from_netcdf: posterior z with dims "
                       "(chain, draw, sequence, time, latent), posterior predictive and pointwise "
                       "log-likelihood of x, observed data, log importance weights in "
                       "sample_stats), importance.json (PSIS k-hat, IWAE, ESS), khat.png (k-hat "
                       "per test sequence), log_weights.png and pair.png (the first sequence's "
                       "first-step latents).")
    p.add_argument("run_dir", help="a run directory written by `pyro-storn train`")
    p.add_argument("--num-samples", type=_positive_int, default=100,
                   help="draws S per test sequence (>= 2; default: 100)")
    _particle_batch_option(p, "--num-samples")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/diagnostics)")
    _force_option(p, "the output")
    _checkpoint_option(p)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the training device)")

    p = sub.add_parser("generate", help="generate sequences from an observed prefix",
                       description="Observe the first steps of test sequences, generate the "
                       "rest with z from the prior; writes generated.npz and a figure.")
    p.add_argument("run_dir")
    p.add_argument("--prefix", type=_positive_int, default=1, help="observed steps")
    p.add_argument("--sequences", type=_positive_int, default=4, help="test sequences")
    p.add_argument("--samples", type=_positive_int, default=5, help="generations per sequence")
    _checkpoint_option(p)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the training device)")
    _force_option(p, f"RUN_DIR/{GENERATED_NAME} and RUN_DIR/{GENERATION_FIGURE}")

    p = sub.add_parser("report", help="Markdown report with a metrics table and figures",
                       description="Write report.md (and figures/) over one or more runs.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="report file (default RUN_DIR/report.md)")
    _force_option(p, "the report")
    return parser


def _check_device(device: str | None) -> None:
    from .rundir import check_device

    if device is not None:
        check_device(device, "--device")


def _run_record(run_dir: str, device: str | None) -> dict:
    """The run's config.json (missing keys named), and the device it will run on checked."""
    from .rundir import check_device, read_run_record

    record = read_run_record(run_dir)
    if device is None:
        device = str(record["config"]["device"])  # the training device, unless --device
        check_device(device, "the run's device (config.json; override with --device)")
    else:
        check_device(device, "--device")
    return record


def _simulate(args: argparse.Namespace) -> None:
    from .data.pendulum import PendulumParams, save_split
    from .rundir import check_output_file

    if not args.out.endswith(".npz"):
        raise _InputError(f"--out must end in .npz, got {args.out!r}")
    check_output_file(args.out, "--out", force=args.force)
    params = PendulumParams(args.n_sequences, args.n_steps, args.seed, args.with_action)
    x_train, x_test = save_split(args.out, params)
    print(f"wrote {args.out}: x {x_train.shape}, x_test {x_test.shape}")


def _check_train_out(out: Path, resume: bool) -> None:
    """What --out holds allows this run: for --resume a trained run, else nothing or what a run
    left before its first checkpoint. Writes nothing."""
    from .rundir import check_writable_dir, run_contents

    if out.exists() and not out.is_dir():
        raise _InputError(f"--out {str(out)!r} is a file, not a directory")
    check_writable_dir(out, "--out")
    contents = run_contents(out)
    if resume:
        if not contents.trained:
            hint = (" (the run there stopped before its first checkpoint; train without "
                    "--resume to start over)" if contents.left_before_checkpoint else "")
            raise _InputError(f"--resume: no checkpoint in {str(out)!r} to resume from{hint}")
    elif not (contents.empty or contents.left_before_checkpoint):
        held = ", ".join((*(("a trained run",) if contents.trained else ()), *contents.other))
        raise _InputError(f"--out {str(out)!r} exists and is not empty ({held}); use --resume "
                          "or a new directory")


def _group_device(args: argparse.Namespace, out: Path) -> str:
    """The device training will run on: the run's own on ``--resume`` (its stored settings),
    else ``--device``."""
    from .rundir import CONFIG_NAME, read_run_record

    if args.resume and (out / CONFIG_NAME).is_file():
        return str(read_run_record(out)["config"]["device"])
    return args.device


def _train(args: argparse.Namespace) -> int:
    from .distributed import DistributedEnv, init_distributed, primary_failure_stops_all
    from .rundir import read_run_record
    from .runs import TrainConfig, load_training_data, train
    from .training import NonFiniteLossError

    length = args.flow_length if args.flow_length is not None else (0 if args.flow == "none"
                                                                    else 4)
    config = TrainConfig(
        flow=args.flow, flow_length=length, latent_dim=args.latent_dim,
        hidden_dim=args.hidden_dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, num_particles=args.num_particles,
        clip_norm=args.clip_norm, kl_anneal_epochs=args.kl_anneal_epochs,
        checkpoint_every=args.checkpoint_every, validation_fraction=args.validation_fraction,
        init_from=args.init_from, flow_start=args.flow_start, emission=args.emission,
        encoder=args.encoder, emission_hidden=args.emission_hidden, prior=args.prior,
        dropout=args.dropout, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
        adam_beta1=args.adam_beta1, metrics_every=args.metrics_every, objective=args.objective,
    )
    _check_device(args.device)
    config.validate()
    if args.init_from is not None:
        read_run_record(args.init_from)  # a broken source is named before any work
    out = Path(args.out)
    # Every rank joins the group before rank 0, which alone checks and locks --out, may refuse:
    # its refusal then reaches the others instead of leaving them waiting for it.
    env = (init_distributed(_group_device(args, out)) if args.distributed
           else DistributedEnv())
    with ExitStack() as held:
        held.callback(env.close)
        with primary_failure_stops_all(env):
            if env.is_primary:
                _check_train_out(out, args.resume)
        data = load_training_data(args.data)
        with primary_failure_stops_all(env):
            if env.is_primary:
                _prepare_run_dir(out, args, data, held)
        try:
            result = train(data, out, config, data_path=args.data, resume=args.resume,
                           progress=not args.quiet, distributed=args.distributed)
        except NonFiniteLossError as error:
            print(f"pyro-storn train: {error}", file=sys.stderr)
            return EXIT_TRAINING_FAILED
    if result.interrupted:
        signum = result.stop_signal or signal.SIGINT
        print(f"{_STOPPED[signum]} after {result.epochs_completed} epoch(s); checkpoint "
              f"{result.checkpoint}; continue with --resume", file=sys.stderr)
        return exit_code(signum)
    if not env.is_primary:
        return 0  # rank 0 reports
    last = result.history[-1] if result.history else {}
    print(f"trained {args.out}: {result.epochs_completed} epochs, test -ELBO "
          f"{last.get('test/neg_elbo', float('nan')):.3f} per sequence")
    if getattr(result, "best_epoch", None) is not None:
        best = next(r for r in result.history if r["epoch"] == result.best_epoch)
        print(f"best validation -ELBO {best['validation/neg_elbo']:.3f} per sequence at epoch "
              f"{result.best_epoch} (best.pt)")
    return 0


def _prepare_run_dir(out: Path, args: argparse.Namespace, data: SequenceData,
                     held: ExitStack) -> None:
    """Rank 0, before training: what resuming reads, read now (a refusal rewrites nothing); the
    lock taken (held until ``held`` closes); what a run left before its first checkpoint
    cleared."""
    from .rundir import check_same_data, lock_run, read_run_record, run_contents, start_over
    from .runs import load_run
    from .training import read_metrics

    if args.resume:
        check_same_data(read_run_record(out)["data"], data, args.data, out)
        read_metrics(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback to .prev is reported by the run
            load_run(out, device="cpu", checkpoint="last")  # readable, and of this model's size
    held.enter_context(lock_run(out))
    _check_train_out(out, args.resume)  # again, now that no other process can change it
    contents = run_contents(out)
    if not args.resume and contents.left_before_checkpoint:
        removed = start_over(out, contents)
        print(f"pyro-storn train: starting over in {str(out)!r}: the run there stopped "
              f"before its first checkpoint (removed {', '.join(removed)})", file=sys.stderr)


def _check_draws(samples: int, batch: int | None, flag: str) -> None:
    if samples < 2:
        raise _InputError(f"{flag} must be >= 2 (PSIS k-hat needs two draws or more), got "
                          f"{samples}")
    if batch is not None and samples % batch:
        raise _InputError(f"--particle-batch-size {batch} does not divide {flag} {samples}")


def _evaluate(args: argparse.Namespace) -> None:
    from .diagnostics import ImportanceSummary
    from .runs import evaluate_run

    _check_draws(args.psis_samples, args.particle_batch_size, "--psis-samples")
    _run_record(args.run_dir, args.device)
    result = evaluate_run(args.run_dir, num_samples=args.samples, seed=args.seed,
                          device=args.device, psis_samples=args.psis_samples,
                          particle_batch_size=args.particle_batch_size, checkpoint=args.checkpoint)
    state = result["checkpoint"]
    print(f"{state['which']} state, epoch {state['epoch']}:")
    print(f"test -ELBO {result['neg_elbo_mean']:.3f} ± {result['neg_elbo_sd']:.3f} per sequence "
          f"({result['neg_elbo_per_step']:.4f} per step); -IWAE({args.samples}) "
          f"{result['neg_iwae_mean']:.3f} ({result['neg_iwae_per_step']:.4f} per step)")
    print("PSIS diagnostics of the guide on the test split:")
    print(ImportanceSummary.from_dict(result["psis"]).format())


def _diagnose(args: argparse.Namespace) -> None:
    from .rundir import check_output_dir
    from .runs import DIAGNOSTICS_DIR, diagnose_run

    _check_draws(args.num_samples, args.particle_batch_size, "--num-samples")
    _run_record(args.run_dir, args.device)
    out = args.out if args.out is not None else str(Path(args.run_dir) / DIAGNOSTICS_DIR)
    check_output_dir(out, "--out", DIAGNOSE_FILES, force=args.force)
    paths = diagnose_run(args.run_dir, out, num_samples=args.num_samples,
                         particle_batch_size=args.particle_batch_size, seed=args.seed,
                         device=args.device, checkpoint=args.checkpoint)
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


def _generate(args: argparse.Namespace) -> None:
    from .report import generation_figure
    from .rundir import check_output_file
    from .runs import GENERATED_NAME, generate_run

    _run_record(args.run_dir, args.device)
    run_dir = Path(args.run_dir)
    for path in (run_dir / GENERATED_NAME, run_dir / GENERATION_FIGURE):
        check_output_file(path, "output", force=args.force)
    out = generate_run(args.run_dir, n_prefix=args.prefix, n_sequences=args.sequences,
                       num_samples=args.samples, seed=args.seed, device=args.device,
                       checkpoint=args.checkpoint)
    figure = generation_figure(out, run_dir / GENERATION_FIGURE)
    print(f"wrote {run_dir / GENERATED_NAME} and {figure}")


def _check_evaluation(run_dir: str) -> None:
    """The run's evaluation.json, when there is one, readable and with what the report reads."""
    from .rundir import read_json
    from .runs import EVALUATION_NAME

    path = Path(run_dir) / EVALUATION_NAME
    if not path.exists():
        return
    evaluation = read_json(path)
    psis = evaluation.get("psis") if isinstance(evaluation, dict) else None
    required = [(evaluation, key, "") for key in REPORT_EVALUATION_KEYS]
    if psis is not None:
        required += [(evaluation, "n_sequences", "")]
        required += [(psis, key, "psis.") for key in REPORT_PSIS_KEYS]
    for values, key, prefix in required:
        if not isinstance(values, dict) or key not in values:
            raise _InputError(f"{path}: missing key {prefix}{key}")


def _report(args: argparse.Namespace) -> None:
    from .report import run_summary, write_report
    from .rundir import check_output_dir, check_output_file, read_run_record

    names = {}
    for run_dir in args.run_dirs:  # every run is read before anything is written
        read_run_record(run_dir)
        _check_evaluation(run_dir)
        try:
            run_summary(run_dir)
        except KeyError as error:
            raise _InputError(f"{run_dir}: a record lacks key {error} (config.json, "
                              "metrics.jsonl or evaluation.json)") from None
        names[Path(run_dir).resolve().name or run_dir] = run_dir
    out = args.out or str(Path(args.run_dirs[0]) / "report.md")
    if not out.endswith(".md"):
        raise _InputError(f"--out must end in .md, got {out!r}")
    check_output_file(out, "--out", force=args.force)
    figures = [*REPORT_FIGURES, *(f"{kind}_{name}.png" for kind in REPORT_RUN_FIGURES
                                  for name in names)]
    check_output_dir(Path(out).parent / "figures", "--out: figures directory", figures,
                     force=args.force)
    path = write_report(names, out)
    print(f"wrote {path}")


def _one_line_warnings(command: str):
    """A ``warnings.showwarning`` that prints one line naming the subcommand (e.g. a corrupt
    checkpoint and the fallback to ``.prev``), not Python's two-line form."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"pyro-storn {command}: warning: {message}", file=sys.stderr if file is None
              else file)

    return show


def _stopped(prog: str, stop: KeyboardInterrupt) -> int:
    """One line saying which signal stopped ``prog``; its exit code."""
    signum = signal_of(stop)
    print(f"{prog}: {_STOPPED[signum]}", file=sys.stderr)
    return exit_code(signum)


def main(argv: Sequence[str] | None = None) -> int:
    with raise_on_stop():  # SIGTERM unwinds as Ctrl-C does; neither cuts an import
        try:
            return _main(argv)
        except KeyboardInterrupt as stop:  # also while the heavy modules are being imported
            return _stopped("pyro-storn", stop)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    command = {"simulate": _simulate, "train": _train, "evaluate": _evaluate,
               "diagnose": _diagnose, "generate": _generate, "report": _report}[args.command]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            code = command(args)
    except (_InputError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"pyro-storn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # a disk that fills up, a permission the checks could not foresee
        where = f"{error.filename}: " if error.filename else ""
        print(f"pyro-storn {args.command}: error: {where}{error.strerror or error}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as stop:
        return _stopped(f"pyro-storn {args.command}", stop)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
