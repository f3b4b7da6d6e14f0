"""The thesis experiment: plain STORN against flow guides on the random-torque pendulum.

For every flow in ``--flows`` (``none`` = plain STORN), every length in ``--lengths`` and every seed
in ``--seeds``: train STORN (latent 2, hidden 128, batch 20, Adam 1e-3 by default), evaluate the
test -ELBO and the IWAE bound (S = 100), and write a table of mean ± sd over seeds, with wall
time, into ``--out`` (Markdown). Unregistered flow names are skipped with a warning.

The full thesis grid::

    python examples/storn_pendulum.py --flows none,planar,radial,conv_planar \\
        --lengths 2,4,8 --seeds 0,1,2 --epochs 100

Runs already finished with the same settings (their evaluation present) are reused, so the grid
can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import transforms
from pyro_storn.data.pendulum import PendulumParams, load_or_simulate
from pyro_storn.data.sequences import load_sequences
from pyro_storn.diagnostics import KHAT_THRESHOLD
from pyro_storn.plots import plot_every_seed, plot_flow_terms, plot_losses
from pyro_storn.report import run_summary
from pyro_storn.runs import (
    CONFIG_NAME,
    EVALUATION_NAME,
    FLOW_STARTS,
    TrainConfig,
    evaluate_run,
    train,
    validation_split,
)
from pyro_storn.training import read_metrics

COLUMNS = (
    ("train_neg_elbo", "train -ELBO"),
    ("test_neg_elbo_mean", "test -ELBO"),
    ("test_neg_iwae_mean", "test -IWAE"),
    ("test_neg_iwae_per_step", "test -IWAE / step"),
    ("kl", "KL"),
    ("sum_log_det", "Σ log-det"),
    ("psis_khat_median", "median k̂"),
    ("psis_khat_share_above", f"share k̂ > {KHAT_THRESHOLD}"),
    ("evaluated_epoch", "evaluated epoch"),
    ("wall_s", "wall time (s)"),
    ("cpu_s", "CPU time (s)"),
)

# The test KL per 100-step sequence above which a run counts as using its latent. Collapsed runs
# sit at 1-3 nats (the posterior is the prior, the decoder treats the torque as noise); a run that
# encodes the torque in z_t climbs past 100 within ~20 epochs. 10 nats lies well between the two.
LATENT_IN_USE_KL = 10.0
# How the page describes each --flow-start.
FLOW_START_NOTES = {
    "random": "at their own initialisation",
    "identity": "starting as the identity map (`--flow-start identity`)",
}


def run_name(flow: str, k: int, seed: int) -> str:
    """The directory of one run of the grid, under ``--runs``."""
    return f"{flow}_K{k}_seed{seed}"


def guide_name(flow: str) -> str:
    return "STORN" if flow == "none" else f"STORN + {flow}"


def _csv(text: str, kind=str) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", default="none,planar,radial", type=_csv,
                        help="comma-separated guides: 'none' (plain STORN) or registered flow "
                             "names (default: %(default)s)")
    parser.add_argument("--lengths", default="2,4,8", type=lambda t: _csv(t, int),
                        help="flow lengths K, one run per flow and K (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", type=lambda t: _csv(t, int),
                        help="training seeds, one run each; the data set is always seed 0 "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run (default: 100)")
    parser.add_argument("--n-sequences", type=int, default=1000,
                        help="pendulum sequences simulated, split 80/20 (default: 1000)")
    parser.add_argument("--n-steps", type=int, default=100,
                        help="time steps per sequence (default: 100)")
    parser.add_argument("--latent-dim", type=int, default=2, help="latent size Z (default: 2)")
    parser.add_argument("--hidden-dim", type=int, default=128,
                        help="GRU hidden size of the encoder and decoder (default: 128)")
    parser.add_argument("--batch-size", type=int, default=20, help="sequences per SVI step "
                                                                   "(default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate "
                                                               "(default: 0.001)")
    parser.add_argument("--kl-anneal-epochs", type=int, default=0,
                        help="linear KL warm-up over this many epochs; 0: none (default: 0)")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="share of the training sequences held out for validation; each "
                             "run is then evaluated at its epoch of lowest validation -ELBO "
                             "instead of its last (default: 0, the last epoch)")
    parser.add_argument("--init-from-runs", default=None, metavar="DIR",
                        help="warm-start every run with seed S from DIR/none_K0_seedS, a plain "
                             "STORN run of an earlier grid on the same data and sizes (its best "
                             "state): a flow then joins a STORN that already uses its latent, and "
                             "plain STORN continues from it (default: none, a fresh start)")
    parser.add_argument("--flow-start", choices=FLOW_STARTS, default="random",
                        help="how the flow layers start: 'identity' makes each flow guide start "
                             "as exactly the plain guide it extends (iaf, maf, realnvp, nice "
                             "only; with --init-from-runs, exactly the source run's guide); "
                             "plain STORN runs are unaffected (default: random)")
    parser.add_argument("--iwae-samples", type=int, default=100,
                        help="importance samples S of the test IWAE bound (default: 100)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--runs", default="runs/storn_pendulum",
                        help="directory of the run directories and the simulated data; "
                             "finished runs with the same settings are reused "
                             "(default: %(default)s)")
    parser.add_argument("--out", default="docs/storn_pendulum.md",
                        help="Markdown table written here, its figures beside it in "
                             "figures/<name>_losses.png and _flow_terms.png "
                             "(default: %(default)s)")
    parser.add_argument("--notes-file", default=None,
                        help="Markdown appended to the results (discussion)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    cells = []
    for flow in args.flows:
        if flow == "none":
            cells.append(("none", 0))
        elif flow not in transforms.available():
            warnings.warn(f"flow {flow!r} is not registered; skipped "
                          f"(available: {', '.join(transforms.available())})", stacklevel=2)
        else:
            cells += [(flow, k) for k in args.lengths]
    return cells


def _finished(run_dir: Path, config: TrainConfig, samples: int) -> bool:
    try:
        stored = json.loads((run_dir / CONFIG_NAME).read_text())["config"]
        evaluation = json.loads((run_dir / EVALUATION_NAME).read_text())
    except (OSError, ValueError, KeyError):
        return False
    # a stored config from before a field existed reads as that field's default
    return (TrainConfig.from_dict(stored) == config
            and len(read_metrics(run_dir)) == config.epochs
            and evaluation.get("num_samples") == samples)


def run_cell(data, data_path: Path, run_dir: Path, config: TrainConfig, args) -> dict:
    timing_path = run_dir / "timing.json"
    if not _finished(run_dir, config, args.iwae_samples) or not timing_path.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        wall, cpu = time.perf_counter(), time.process_time()
        train(data, run_dir, config, data_path=data_path, progress=not args.quiet)
        evaluate_run(run_dir, num_samples=args.iwae_samples, seed=config.seed)
        timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  # how busy the machine was: the 1-minute load average when the run ended
                  "load_average": os.getloadavg()[0]}
        timing_path.write_text(json.dumps(timing))
    summary = run_summary(run_dir)
    summary.update(json.loads(timing_path.read_text()))
    # PSIS k̂ of the guide per test sequence (Vehtari et al.): above the threshold the importance
    # weights are too heavy-tailed for the IWAE bound to be trusted, i.e. the guide misses the
    # posterior
    khat = summary.get("psis_khat_per_sequence")
    if khat:
        summary["psis_khat_median"] = float(np.median(khat))
        summary["psis_khat_share_above"] = float(np.mean(np.asarray(khat) > KHAT_THRESHOLD))
    return summary


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _paired(summaries: list[dict], baseline: dict[int, dict], key: str) -> str:
    """Mean ± sd over seeds of (this run - plain STORN with the same seed): the seeds' spread
    is mostly shared, so the paired difference is the sharper comparison."""
    diffs = [s[key] - baseline[s["seed"]][key] for s in summaries
             if s["seed"] in baseline and s.get(key) is not None
             and s is not baseline[s["seed"]]]
    if not diffs:
        return "–"
    wins = sum(d < 0 for d in diffs)
    return f"{_mean_sd(diffs)} ({wins}/{len(diffs)} better)"


def table(results: dict[tuple[str, int], list[dict]]) -> str:
    header = ("| guide | K | seeds | " + " | ".join(title for _, title in COLUMNS)
              + " | Δ test -ELBO vs STORN | Δ test -IWAE vs STORN |")
    lines = [header, "|" + "---|" * (len(COLUMNS) + 5)]
    baseline = {s["seed"]: s for s in results.get(("none", 0), [])}
    for (flow, k), summaries in results.items():
        cells = [_mean_sd([s.get(key) for s in summaries]) for key, _ in COLUMNS]
        cells += [_paired(summaries, baseline, "test_neg_elbo_mean"),
                  _paired(summaries, baseline, "test_neg_iwae_mean")]
        lines.append(f"| {guide_name(flow)} | {k} | {len(summaries)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latent_in_use_epoch(history: list[dict], threshold: float = LATENT_IN_USE_KL) -> int | None:
    """The epoch from which the test KL per sequence stays at or above ``threshold`` to the last
    epoch; None if the last epoch is below it. (Runs often start above it for an epoch or two
    and then collapse: the first epoch to reach it would say nothing.)"""
    start = None
    for record in history:
        if record.get("test/kl", 0.0) >= threshold:
            start = int(record["epoch"]) if start is None else start
        else:
            start = None
    return start


def run_table(results: dict[tuple[str, int], list[dict]], histories: dict[str, list[dict]]) -> str:
    """One row per run: the seed-level view the mean ± sd table averages away; ``histories`` by
    :func:`run_name`."""
    lines = ["| guide | K | seed | evaluated epoch | test -ELBO | test -IWAE | KL at the evaluated "
             f"epoch | test KL ≥ {LATENT_IN_USE_KL:g} from epoch to the end |", "|" + "---|" * 8]
    for (flow, k), summaries in results.items():
        for s in summaries:
            epoch = latent_in_use_epoch(histories[run_name(flow, k, s["seed"])])
            lines.append(
                f"| {guide_name(flow)} | {k} | {s['seed']} | {s.get('evaluated_epoch', '–')} | "
                f"{s['test_neg_elbo_mean']:.2f} | {s['test_neg_iwae_mean']:.2f} | "
                f"{s['kl']:.2f} | {'never' if epoch is None else epoch} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python examples/storn_pendulum.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    runs = Path(args.runs)
    data_path = runs / "pendulum.npz"
    load_or_simulate(data_path, PendulumParams(args.n_sequences, args.n_steps, seed=0))
    data = load_sequences(data_path)
    # before any run, a bad fraction is named (its range, then the count it holds out)
    TrainConfig(validation_fraction=args.validation_fraction).validate()
    n_validation = len(validation_split(data.x.shape[0], args.validation_fraction)[1])
    results: dict[tuple[str, int], list[dict]] = {}
    started = time.perf_counter()
    for flow, k in grid(args):
        for seed in args.seeds:
            config = TrainConfig(
                flow=flow, flow_length=k, latent_dim=args.latent_dim,
                hidden_dim=args.hidden_dim, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, seed=seed, device=args.device,
                kl_anneal_epochs=args.kl_anneal_epochs,
                validation_fraction=args.validation_fraction,
                init_from=(None if args.init_from_runs is None
                           else str(Path(args.init_from_runs) / run_name("none", 0, seed))),
                flow_start="random" if flow == "none" else args.flow_start,
            )
            run_dir = runs / run_name(flow, k, seed)
            print(f"[storn_pendulum] {run_dir.name}", file=sys.stderr)
            results.setdefault((flow, k), []).append(run_cell(data, data_path, run_dir, config,
                                                              args))
    rerun = time.perf_counter() - started
    out = Path(args.out)
    figures = out.parent / "figures"
    first_seed = {f"{flow} K={k}": read_metrics(runs / run_name(flow, k, args.seeds[0]))
                  for flow, k in results}
    # named after the table, so that tables of several grids can share one docs/ folder
    losses = plot_losses(first_seed, figures / f"{out.stem}_losses.png")
    terms = plot_flow_terms(first_seed, figures / f"{out.stem}_flow_terms.png")
    histories = {run_name(flow, k, s["seed"]): read_metrics(runs / run_name(flow, k, s["seed"]))
                 for (flow, k), summaries in results.items() for s in summaries}
    every_seed = {("STORN" if flow == "none" else f"{flow} K={k}"):
                  [histories[run_name(flow, k, s["seed"])] for s in summaries]
                  for (flow, k), summaries in results.items()}
    kl_figure = plot_every_seed(
        every_seed, "test/kl", "test KL per sequence, every run (dashed: latent in use)",
        figures / f"{out.stem}_kl_every_seed.png", log_scale=True, reference=LATENT_IN_USE_KL)
    elbo_figure = plot_every_seed(every_seed, "test/neg_elbo", "test -ELBO per sequence, every run",
                                  figures / f"{out.stem}_neg_elbo_every_seed.png")
    cpu_total = sum(s["cpu_s"] for summaries in results.values() for s in summaries)
    loads = [s.get("load_average") for summaries in results.values() for s in summaries]
    recorded = [load for load in loads if load is not None]
    load_note = (f"the 1-minute load average at the runs' ends was {min(recorded):.1f}-"
                 f"{max(recorded):.1f} on {os.cpu_count()} cores"
                 if recorded else "its load was not recorded for these runs")
    if recorded and len(recorded) < len(loads):
        load_note += f" (recorded for {len(recorded)} of {len(loads)} runs)"
    wall_total = sum(s["wall_s"] for summaries in results.values() for s in summaries)
    psis_draws = ", ".join(sorted({str(s["psis_num_samples"]) for summaries in results.values()
                                   for s in summaries if "psis_num_samples" in s}))
    psis_draws = f"{psis_draws} draws each" if psis_draws else "not computed for these runs"
    if args.validation_fraction:
        selection = (f"{n_validation} of the training sequences ({args.validation_fraction:g}) are "
                     "held out for validation, and each run is evaluated at its epoch of lowest "
                     "validation -ELBO (column 'evaluated epoch')")
    else:
        selection = "each run is evaluated at its last epoch"
    if args.init_from_runs:
        selection += (f"; every run with seed S starts from the plain STORN run "
                      f"`{args.init_from_runs}/none_K0_seedS` (its best state; flow layers "
                      f"{FLOW_START_NOTES[args.flow_start]}), and its epochs count from there")
    elif args.flow_start != "random":
        selection += f"; flow layers {FLOW_START_NOTES[args.flow_start]}"
    parts = [
        "# STORN with flow guides on the inverted pendulum", "",
        "Written by `examples/storn_pendulum.py`. Command:", "", f"    {command}", "",
        f"Data: gymnasium `Pendulum-v1` under uniformly random torque, {args.n_sequences} "
        f"sequences x {args.n_steps} steps, features [cos θ, sin θ, θ̇, reward], 80/20 "
        f"train/test split (data seed 0). Model: latent {args.latent_dim}, hidden "
        f"{args.hidden_dim} (GRU), batch {args.batch_size}, Adam {args.lr}, "
        f"{args.epochs} epochs, KL annealing over {args.kl_anneal_epochs} epochs; {selection}. Seeds "
        f"{', '.join(map(str, args.seeds))}. Flows are conditioned on the encoder state when "
        "they can be.", "",
        "Losses in nats per sequence (lower is better), mean ± sd over seeds. Train -ELBO, KL "
        "and Σ log-det: the evaluated epoch's single-sample averages (test set for KL and "
        "Σ log-det); "
        f"test -ELBO and -IWAE: S = {args.iwae_samples} importance samples per test sequence. "
        "Δ columns: paired difference to plain STORN with the same seed (negative: the flow is "
        "better), with how many seeds it was better on. k̂: PSIS Pareto k̂ of the guide as an "
        f"importance proposal for each test sequence ({psis_draws}), its median and the share "
        f"of sequences above {KHAT_THRESHOLD}, where the IWAE bound cannot be trusted. Wall time per run (training + "
        f"evaluation) on this machine, where {load_note}; CPU time is the steadier measure "
        f"when the machine is shared: the runs took {wall_total:.0f} s wall and "
        f"{cpu_total:.0f} s CPU in all (this invocation {rerun:.0f} s; finished runs are "
        "reused).", "",
        table(results), "",
        f"![losses]({losses.relative_to(out.parent)})", "",
        f"![flow terms]({terms.relative_to(out.parent)})", "",
        "## Every run", "",
        "Single-sample test KL of each epoch's parameters; a run counts as using its latent from "
        f"the epoch where it reaches {LATENT_IN_USE_KL:g} nats per sequence and stays there to "
        "the last epoch ('never': it ended below; collapsed runs sit at 1-3).", "",
        run_table(results, histories), "",
        f"![KL, every run]({kl_figure.relative_to(out.parent)})", "",
        f"![-ELBO, every run]({elbo_figure.relative_to(out.parent)})", "",
    ]
    if args.notes_file:
        parts += [Path(args.notes_file).read_text(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
