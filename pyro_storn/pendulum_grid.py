"""Plain STORN against flow guides on the random-torque pendulum: a resumable grid of runs over
guides (flow, length K) and seeds, its tables and its results page.

A :class:`Grid` names the runs; :func:`run_grid` trains and evaluates each one that is not
already finished with the same settings, and :func:`write_page` writes the grid's section of a
Markdown page: mean ± sd over seeds, the paired difference to plain STORN with the same seed,
and one row per run with the epoch from which it used its latent. One page holds the sections of
several grids, each between its own markers, beside text written by hand.

>>> grid = Grid(flows=["none", "planar"], lengths=[2], seeds=[0, 1],
...             base=TrainConfig(epochs=100))                               # doctest: +SKIP
>>> results = run_grid(grid, "runs/storn_pendulum")                         # doctest: +SKIP
>>> write_page(grid, results, "runs/storn_pendulum", "docs/storn_pendulum.md",
...            command)                                                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import transforms

from .data.pendulum import PendulumParams, load_or_simulate
from .data.sequences import SequenceData, load_sequences
from .diagnostics import KHAT_THRESHOLD
from .latent_use import LATENT_IN_USE_KL, latent_in_use_epoch
from .plots import plot_every_seed, plot_flow_terms, plot_losses
from .report import run_summary
from .rundir import write_text_atomic
from .runs import CONFIG_NAME, EVALUATION_NAME, TrainConfig, evaluate_run, train, validation_split
from .tables import MISSING, Stopwatch, markdown_table, mean_sd, paired_over_seeds
from .training import read_metrics
from .validation import check_positive_int

__all__ = [
    "COLUMNS",
    "DATA_NAME",
    "FLOW_START_NOTES",
    "TIMING_NAME",
    "Grid",
    "GridResults",
    "PAGE_TITLE",
    "guide_name",
    "run_cell",
    "run_grid",
    "run_is_finished",
    "run_name",
    "page_section",
    "run_table",
    "section_markers",
    "summary_table",
    "write_page",
]

# The mean ± sd table's columns: run summary key, title.
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
# How the page describes each flow start.
FLOW_START_NOTES = {
    "random": "at their own initialisation",
    "identity": "starting as the identity map (`--flow-start identity`)",
}
DATA_NAME = "pendulum.npz"
TIMING_NAME = "timing.json"
# The simulated data set is the same for every seed of every grid.
DATA_SEED = 0


def run_name(flow: str, k: int, seed: int) -> str:
    """The directory of one run of the grid, under the grid's runs directory."""
    return f"{flow}_K{k}_seed{seed}"


def guide_name(flow: str) -> str:
    return "STORN" if flow == "none" else f"STORN + {flow}"


@dataclass(frozen=True)
class Grid:
    """Every guide in ``flows`` (``"none"``: plain STORN, at K = 0; a flow at each of
    ``lengths``) times every seed, with the settings of ``base`` otherwise; the data set is
    ``n_sequences`` pendulum sequences of ``n_steps`` steps, split 80/20.

    :param init_from_runs: warm-start the run with seed S from ``<init_from_runs>/none_K0_seedS``.
    :param flow_start: how a flow guide's layers start (plain STORN runs are unaffected).
    """

    flows: Sequence[str]
    lengths: Sequence[int]
    seeds: Sequence[int]
    base: TrainConfig = field(default_factory=TrainConfig)
    n_sequences: int = 1000
    n_steps: int = 100
    iwae_samples: int = 100
    init_from_runs: str | None = None
    flow_start: str = "random"

    def cells(self) -> list[tuple[str, int]]:
        """``(flow, K)`` of every guide, unregistered flows left out with a warning."""
        cells = []
        for flow in self.flows:
            if flow == "none":
                cells.append(("none", 0))
            elif flow not in transforms.available():
                warnings.warn(f"flow {flow!r} is not registered; skipped "
                              f"(available: {', '.join(transforms.available())})", stacklevel=2)
            else:
                cells += [(flow, k) for k in self.lengths]
        return cells

    def checked_cells(self) -> list[tuple[str, int]]:
        """:meth:`cells`, once the data sizes and every run's settings are checked:
        ``ValueError`` naming the first bad one (or that no run is left), so that a grid fails
        before anything is simulated or trained, not hours in."""
        for name in ("n_sequences", "n_steps", "iwae_samples"):
            check_positive_int(name, getattr(self, name))
        if not self.seeds:
            raise ValueError("the grid has no seeds")
        if not any(flow == "none" or flow in transforms.available() for flow in self.flows):
            raise ValueError(f"the grid has no run: no flow of {', '.join(map(repr, self.flows))} "
                             f"is registered (available: none, "
                             f"{', '.join(transforms.available())})")
        cells = self.cells()
        for flow, k in cells:
            for seed in self.seeds:
                self.config(flow, k, seed).validate()
        return cells

    def config(self, flow: str, k: int, seed: int) -> TrainConfig:
        init_from = (None if self.init_from_runs is None
                     else str(Path(self.init_from_runs) / run_name("none", 0, seed)))
        return dataclasses.replace(
            self.base, flow=flow, flow_length=k, seed=seed, init_from=init_from,
            flow_start="random" if flow == "none" else self.flow_start)


def run_is_finished(run_dir: Path, config: TrainConfig, samples: int) -> bool:
    """Whether ``run_dir`` holds a run of ``config`` trained to its last epoch and evaluated with
    ``samples`` importance samples."""
    try:
        stored = json.loads((run_dir / CONFIG_NAME).read_text())["config"]
        evaluation = json.loads((run_dir / EVALUATION_NAME).read_text())
    except (OSError, ValueError, KeyError):
        return False
    # a stored config from before a field existed reads as that field's default
    return (TrainConfig.from_dict(stored) == config
            and len(read_metrics(run_dir)) == config.epochs
            and evaluation.get("num_samples") == samples)


def run_cell(data: SequenceData, data_path: Path, run_dir: Path, config: TrainConfig,
             iwae_samples: int, progress: bool = True) -> dict[str, Any]:
    """The run's :func:`~pyro_storn.report.run_summary` with its wall and CPU seconds and the
    median and share above the threshold of its PSIS k̂ per test sequence; trained and evaluated
    first unless it is finished."""
    timing_path = run_dir / TIMING_NAME
    if not run_is_finished(run_dir, config, iwae_samples) or not timing_path.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        clock = Stopwatch()
        train(data, run_dir, config, data_path=data_path, progress=progress)
        evaluate_run(run_dir, num_samples=iwae_samples, seed=config.seed)
        timing = {"wall_s": clock.wall_s, "cpu_s": clock.cpu_s,
                  # how busy the machine was: the 1-minute load average when the run ended
                  "load_average": os.getloadavg()[0]}
        write_text_atomic(timing_path, json.dumps(timing))
    summary = run_summary(run_dir)
    summary.update(json.loads(timing_path.read_text()))
    # above the threshold the importance weights are too heavy-tailed for the IWAE bound to be
    # trusted (Vehtari et al.): the guide misses the posterior
    khat = summary.get("psis_khat_per_sequence")
    if khat:
        summary["psis_khat_median"] = float(np.median(khat))
        summary["psis_khat_share_above"] = float(np.mean(np.asarray(khat) > KHAT_THRESHOLD))
    return summary


@dataclass
class GridResults:
    """The summaries of every run by ``(flow, K)`` in seed order, their metrics by
    :func:`run_name`, how many training sequences were held out for validation, and the seconds
    this invocation took."""

    runs: dict[tuple[str, int], list[dict[str, Any]]]
    histories: dict[str, list[dict[str, Any]]]
    n_validation: int
    seconds: float


def run_grid(grid: Grid, runs: str | os.PathLike, progress: bool = True) -> GridResults:
    """Simulate (or reuse) the data in ``runs``, then run every cell of ``grid`` there; a bad
    setting of any run is named before the data are simulated (:meth:`Grid.checked_cells`)."""
    cells = grid.checked_cells()
    runs = Path(runs)
    data_path = runs / DATA_NAME
    load_or_simulate(data_path, PendulumParams(grid.n_sequences, grid.n_steps, seed=DATA_SEED))
    data = load_sequences(data_path)
    n_validation = len(validation_split(data.x.shape[0], grid.base.validation_fraction)[1])
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    clock = Stopwatch()
    for flow, k in cells:
        for seed in grid.seeds:
            run_dir = runs / run_name(flow, k, seed)
            print(f"[storn_pendulum] {run_dir.name}", file=sys.stderr)
            results.setdefault((flow, k), []).append(
                run_cell(data, data_path, run_dir, grid.config(flow, k, seed), grid.iwae_samples,
                         progress))
    histories = {run_name(flow, k, s["seed"]): read_metrics(runs / run_name(flow, k, s["seed"]))
                 for (flow, k), summaries in results.items() for s in summaries}
    return GridResults(results, histories, n_validation, clock.wall_s)


def summary_table(results: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    """One row per guide: mean ± sd over seeds of :data:`COLUMNS`, and the paired difference of
    the test bounds to plain STORN with the same seed."""
    baseline = {s["seed"]: s for s in results.get(("none", 0), [])}
    rows = []
    for (flow, k), summaries in results.items():
        rows.append([guide_name(flow), k, len(summaries),
                     *(mean_sd([s.get(key) for s in summaries]) for key, _ in COLUMNS),
                     paired_over_seeds(summaries, baseline, "test_neg_elbo_mean"),
                     paired_over_seeds(summaries, baseline, "test_neg_iwae_mean")])
    return markdown_table(["guide", "K", "seeds", *(title for _, title in COLUMNS),
                           "Δ test -ELBO vs STORN", "Δ test -IWAE vs STORN"], rows)


def run_table(results: dict[tuple[str, int], list[dict[str, Any]]],
              histories: dict[str, list[dict[str, Any]]]) -> str:
    """One row per run: the seed-level view the mean ± sd table averages away; ``histories`` by
    :func:`run_name`."""
    rows = []
    for (flow, k), summaries in results.items():
        for s in summaries:
            epoch = latent_in_use_epoch(histories[run_name(flow, k, s["seed"])])
            rows.append([guide_name(flow), k, s["seed"], s.get("evaluated_epoch", MISSING),
                         f"{s['test_neg_elbo_mean']:.2f}", f"{s['test_neg_iwae_mean']:.2f}",
                         f"{s['kl']:.2f}", "never" if epoch is None else epoch])
    return markdown_table(["guide", "K", "seed", "evaluated epoch", "test -ELBO", "test -IWAE",
                           "KL at the evaluated epoch",
                           f"test KL ≥ {LATENT_IN_USE_KL:g} from epoch to the end"], rows)


def _figures(grid: Grid, results: GridResults, runs: Path, out: Path,
             name: str) -> dict[str, Path]:
    """The section's figures, named after it so that the grids of a page share one folder."""
    figures = out.parent / "figures"
    first_seed = {f"{flow} K={k}": read_metrics(runs / run_name(flow, k, grid.seeds[0]))
                  for flow, k in results.runs}
    every_seed = {("STORN" if flow == "none" else f"{flow} K={k}"):
                  [results.histories[run_name(flow, k, s["seed"])] for s in summaries]
                  for (flow, k), summaries in results.runs.items()}
    return {
        "losses": plot_losses(first_seed, figures / f"{name}_losses.png"),
        "flow terms": plot_flow_terms(first_seed, figures / f"{name}_flow_terms.png"),
        "KL, every run": plot_every_seed(
            every_seed, "test/kl", "test KL per sequence, every run (dashed: latent in use)",
            figures / f"{name}_kl_every_seed.png", log_scale=True,
            reference=LATENT_IN_USE_KL),
        "-ELBO, every run": plot_every_seed(
            every_seed, "test/neg_elbo", "test -ELBO per sequence, every run",
            figures / f"{name}_neg_elbo_every_seed.png"),
    }


def _load_note(summaries: list[dict[str, Any]]) -> str:
    loads = [s.get("load_average") for s in summaries]
    recorded = [load for load in loads if load is not None]
    note = (f"the 1-minute load average at the runs' ends was {min(recorded):.1f}-"
            f"{max(recorded):.1f} on {os.cpu_count()} cores"
            if recorded else "its load was not recorded for these runs")
    if recorded and len(recorded) < len(loads):
        note += f" (recorded for {len(recorded)} of {len(loads)} runs)"
    return note


def _selection(grid: Grid, n_validation: int) -> str:
    """Which state of each run is evaluated, and where it started."""
    fraction = grid.base.validation_fraction
    if fraction:
        selection = (f"{n_validation} of the training sequences ({fraction:g}) are held out for "
                     "validation, and each run is evaluated at its epoch of lowest validation "
                     "-ELBO (column 'evaluated epoch')")
    else:
        selection = "each run is evaluated at its last epoch"
    if grid.init_from_runs:
        selection += (f"; every run with seed S starts from the plain STORN run "
                      f"`{grid.init_from_runs}/none_K0_seedS` (its best state; flow layers "
                      f"{FLOW_START_NOTES[grid.flow_start]}), and its epochs count from there")
    elif grid.flow_start != "random":
        selection += f"; flow layers {FLOW_START_NOTES[grid.flow_start]}"
    return selection


# A section name goes into an HTML comment, where "--" would end it.
_SECTION_NAME = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*")
PAGE_TITLE = "# STORN with flow guides on the inverted pendulum"


def section_markers(name: str) -> tuple[str, str]:
    """The lines that open and close grid ``name``'s section of a page."""
    if not _SECTION_NAME.fullmatch(name):
        raise ValueError(f"a section name is letters, digits, '_', '.' and single '-', "
                         f"got {name!r}")
    return f"<!-- pendulum_grid:{name} begin -->", f"<!-- pendulum_grid:{name} end -->"


def _spliced(page: str, name: str, section: str, path: Path) -> str:
    """``page`` with the lines between ``name``'s markers (included) replaced by ``section``,
    or with ``section`` appended when it has none; every other line as it was."""
    begin, end = section_markers(name)
    lines = page.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if not starts and not ends:
        return page + ("" if page.endswith("\n") or not page else "\n") + "\n" + section
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{path}: section {name!r} must be one {begin!r} line followed by one "
                         f"{end!r} line, found {len(starts)} and {len(ends)}; fix the page by "
                         "hand, it was not changed")
    return "".join(lines[: starts[0]]) + section + "".join(lines[ends[0] + 1 :])


def page_section(out: str | os.PathLike, runs: str | os.PathLike,
                 section: str | None = None) -> str:
    """The name of the section :func:`write_page` writes into page ``out`` (``section``, or the
    runs folder's name), once the name and the page's markers are checked: ``ValueError``
    otherwise, so that a grid can be checked before it runs for hours."""
    out = Path(out)
    name = Path(runs).resolve().name if section is None else section
    section_markers(name)
    if out.exists():
        _spliced(out.read_text(), name, "", out)
    return name


def write_page(grid: Grid, results: GridResults, runs: str | os.PathLike,
               out: str | os.PathLike, command: str, notes: str | None = None,
               section: str | None = None) -> Path:
    """Write grid ``section``'s part of the Markdown page ``out`` (the runs folder's name by
    default), its figures in ``<out dir>/figures``; ``command`` is the invocation it names,
    ``notes`` Markdown appended to it.

    The section lies between the lines :func:`section_markers` gives. On an existing page it
    replaces the section of the same name, or is appended when there is none; the rest of the
    page is left exactly as it was. A new page gets a title first.
    """
    out, runs = Path(out), Path(runs)
    name = page_section(out, runs, section)  # a broken page stops here, before any figure
    begin, end = section_markers(name)
    figures = {key: path.relative_to(out.parent)
               for key, path in _figures(grid, results, runs, out, name).items()}
    summaries = [s for runs_of_guide in results.runs.values() for s in runs_of_guide]
    psis_draws = ", ".join(sorted({str(s["psis_num_samples"]) for s in summaries
                                   if "psis_num_samples" in s}))
    psis_draws = f"{psis_draws} draws each" if psis_draws else "not computed for these runs"
    base = grid.base
    parts = [
        begin, f"### Grid `{name}`", "",
        "Written by `examples/storn_pendulum.py`. Command:", "", f"    {command}", "",
        f"Data: gymnasium `Pendulum-v1` under uniformly random torque, {grid.n_sequences} "
        f"sequences x {grid.n_steps} steps, features [cos θ, sin θ, θ̇, reward], 80/20 "
        f"train/test split (data seed {DATA_SEED}). Model: latent {base.latent_dim}, hidden "
        f"{base.hidden_dim} (GRU), {base.encoder} encoder, batch {base.batch_size}, Adam {base.lr} "
        f"(gradient norm clipped to {base.clip_norm:g}), "
        f"{base.epochs} epochs, KL annealing over {base.kl_anneal_epochs} epochs; "
        f"{_selection(grid, results.n_validation)}. Seeds {', '.join(map(str, grid.seeds))}. "
        "Flows are conditioned on the encoder state when they can be.", "",
        "Losses in nats per sequence (lower is better), mean ± sd over seeds. Train -ELBO, KL "
        "and Σ log-det: the evaluated epoch's single-sample averages (test set for KL and "
        "Σ log-det); "
        f"test -ELBO and -IWAE: S = {grid.iwae_samples} importance samples per test sequence. "
        "Δ columns: paired difference to plain STORN with the same seed (negative: the flow is "
        "better), with how many seeds it was better on. k̂: PSIS Pareto k̂ of the guide as an "
        f"importance proposal for each test sequence ({psis_draws}), its median and the share "
        f"of sequences above {KHAT_THRESHOLD}, where the IWAE bound cannot be trusted. Wall "
        f"time per run (training + evaluation) on this machine, where {_load_note(summaries)}; "
        "CPU time is the steadier measure when the machine is shared: the runs took "
        f"{sum(s['wall_s'] for s in summaries):.0f} s wall and "
        f"{sum(s['cpu_s'] for s in summaries):.0f} s CPU in all (this invocation "
        f"{results.seconds:.0f} s; finished runs are reused).", "",
        summary_table(results.runs), "",
        f"![losses]({figures['losses']})", "",
        f"![flow terms]({figures['flow terms']})", "",
        "#### Every run", "",
        "Single-sample test KL of each epoch's parameters; a run counts as using its latent from "
        f"the epoch where it reaches {LATENT_IN_USE_KL:g} nats per sequence and stays there to "
        "the last epoch ('never': it ended below; collapsed runs sit at 1-3).", "",
        run_table(results.runs, results.histories), "",
        f"![KL, every run]({figures['KL, every run']})", "",
        f"![-ELBO, every run]({figures['-ELBO, every run']})", "",
    ]
    if notes is not None:
        parts += [notes.rstrip("\n"), ""]
    parts.append(end)
    page = out.read_text() if out.exists() else f"{PAGE_TITLE}\n"
    return write_text_atomic(out, _spliced(page, name, "\n".join(parts) + "\n", out))
