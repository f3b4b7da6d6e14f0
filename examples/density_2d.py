"""Flow densities on the ProbAI 2022 2-D data sets: planar, radial, RealNVP, NICE, MAF and the
continuous flow (CNF), each fit by maximum likelihood, and the CNF and RealNVP side by side on
two moons.

Each data set is split 80/20 into train and test; 20% of the train part is held out again as a
validation set. Each flow trains on the rest for its number of steps (discrete flows, capped by
``--seconds``) or ``--cnf-seconds`` (the CNF), and keeps the parameters of the evaluation with the
best validation NLL; the table reports the test NLL of those parameters (and, beside it, of the
last ones). The test set chooses nothing.

Writes to ``--out`` (default ``docs``):

- ``density_2d/<data>_<flow>_panels.png``: data X, f(X) in base space, g(Z) in data space, Z;
- ``density_2d/<data>_<flow>_density.png``: the density heatmap;
- ``density_2d/<data>_cnf.gif``: CNF samples and density moving from the prior to the data;
- ``density_2d/two_moons_cnf_vs_realnvp.png``: test NLL against training seconds;
- ``density_2d.md``: the table (test NLL per flow per data set, training seconds, steps) and the
  side-by-side comparison.

    python examples/density_2d.py                      # the full run (about 12 minutes)
    python examples/density_2d.py --quick              # a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

import transforms
from pyro_storn.data import toy2d
from pyro_storn.density import (
    FitResult,
    animate_cnf,
    fit_density,
    make_density,
    plot_heatmap,
    plot_history,
    plot_panels,
    split,
)
from pyro_storn.cli import OneLineParser
from pyro_storn.density_table import Protocol, SideBySide, write_page
from pyro_storn.rundir import check_output_dir, check_output_file
from pyro_storn.tables import Stopwatch, command_line
from pyro_storn.validation import check_non_negative_int, check_positive_int

DATASETS = ("two_moons", "two_blobs", "boomerang")
FLOWS = ("planar", "radial", "realnvp", "nice", "maf", "cnf")

# One minibatch with a point in a near-empty region of a sharp density can otherwise throw a
# coupling flow far off in one step.
CLIP_NORM = 10.0

# Fraction of the training points held out to choose the checkpoint (never the test set).
VALIDATION_FRACTION = 0.2

# Per flow: layers, builder options, fit options, chosen on the two-moons validation NLL (the
# page's notes say why). Discrete flows train for a number of steps so that the table does not
# depend on the machine's load.
CONFIGS: dict[str, dict[str, Any]] = {
    "planar": {"length": 16, "flow": {"init_scale": 0.1}, "fit": {"lr": 1e-2, "max_steps": 500}},
    "radial": {"length": 32, "flow": {}, "fit": {"lr": 1e-2, "max_steps": 400}},
    "realnvp": {"length": 8, "flow": {"hidden_dims": (32, 32)}, "fit": {"lr": 1e-3, "max_steps": 500}},
    "nice": {"length": 8, "flow": {"hidden_dims": (32, 32)}, "fit": {"lr": 1e-3, "max_steps": 500}},
    "maf": {"length": 5, "flow": {"hidden_dims": (32, 32)}, "fit": {"lr": 1e-3, "max_steps": 500}},
    "cnf": {
        "length": 1,
        # straight paths (kinetic + Jacobian penalties): 4 RK4 steps suffice in training
        "flow": {"hidden_dims": (64, 64), "kinetic_weight": 0.01, "jacobian_weight": 0.01},
        "fit": {"lr": 5e-3, "train_solver": {"method": "rk4", "step_size": 0.25}},
    },
}

# The side-by-side run keeps the protocol of the slow test in tests/test_density.py.
COMPARE_FIT: dict[str, Any] = {"lr": 5e-3}
COMPARE_FLOW: dict[str, dict[str, Any]] = {
    "realnvp": {"hidden_dims": (64, 64)},
    "cnf": CONFIGS["cnf"]["flow"],
}


def _names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=_names, default=",".join(FLOWS),
                        help="comma-separated registry names")
    parser.add_argument("--datasets", type=_names, default=",".join(DATASETS),
                        help="comma-separated data sets")
    parser.add_argument(
        "--seconds", type=float, default=60.0,
        help="cap on the training seconds of a discrete flow (they train for a set number of steps)",
    )
    parser.add_argument("--cnf-seconds", type=float, default=60.0, help="training budget per CNF fit")
    parser.add_argument(
        "--compare-seconds", type=float, default=120.0,
        help="budget of each of RealNVP and CNF in the side-by-side two-moons run (0: skip it)",
    )
    parser.add_argument("--compare-points", type=int, default=5000, help="generated two-moons points for it")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budgets and figures, for a smoke test")
    parser.add_argument("--no-figures", action="store_true", help="only the table")
    args = parser.parse_args(argv)
    for name in args.datasets:
        if name not in DATASETS:
            parser.error(f"unknown data set {name!r}; valid choices: {', '.join(DATASETS)}")
    for name in args.flows:
        if name not in CONFIGS:
            parser.error(f"no configuration for flow {name!r}; valid choices: {', '.join(CONFIGS)}")
    for option in ("seconds", "cnf_seconds"):
        if not 0 < getattr(args, option) < math.inf:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if not 0 <= args.compare_seconds < math.inf:
        parser.error(f"--compare-seconds must be >= 0 (0: skip), got {args.compare_seconds}")
    try:
        check_positive_int("--compare-points", args.compare_points)
        check_non_negative_int("--seed", args.seed)
        # before any fit: the figure folder and the page
        for folder in (args.out, args.out / "density_2d"):
            check_output_dir(folder, "--out")
        check_output_file(args.out / "density_2d.md", "--out", force=True)
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.seconds, args.cnf_seconds = 2.0, 4.0
        args.compare_seconds = min(args.compare_seconds, 4.0)
        args.compare_points = min(args.compare_points, 1000)
    return args


def fit(
    name: str,
    train: torch.Tensor,
    test: torch.Tensor,
    seconds: float,
    seed: int,
    validation: torch.Tensor | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    eval_every: float | None = None,
    flow_kwargs: dict[str, Any] | None = None,
):
    """One fit of flow ``name`` with its configuration (``fit_kwargs`` and ``flow_kwargs``
    replace its settings, e.g. for the side-by-side run)."""
    config = CONFIGS[name]
    torch.manual_seed(seed)
    flow_settings = config["flow"] if flow_kwargs is None else flow_kwargs
    density = make_density(name, train, config["length"], **flow_settings)
    settings = dict(config["fit"] if fit_kwargs is None else fit_kwargs)
    if validation is not None:
        settings.setdefault("clip_norm", CLIP_NORM)
    result = fit_density(
        density, train, test, validation=validation, max_seconds=seconds,
        eval_every=eval_every or max(seconds / 6, 1.0),
        seed=seed, progress=sys.stderr.isatty(), **settings,
    )
    return density, result


def eval_interval(name: str, seconds: float) -> float:
    """Seconds of training between evaluations: ~30 per discrete fit (they are cheap, and the
    checkpoint can only be one of them), 6 per CNF fit (a tight ODE solve each)."""
    if name == "cnf":
        return max(seconds / 6, 1.0)
    return 0.5


def figures(name: str, data_name: str, density, data: torch.Tensor, folder: Path, quick: bool) -> None:
    stem = folder / f"{data_name}_{name}"
    title = f"{name} on {data_name}"
    plot_panels(density, data, f"{stem}_panels.png", title=title, n_prior=300 if quick else 1000)
    plot_heatmap(density, data, f"{stem}_density.png", title=title, resolution=30 if quick else 120)
    if name == "cnf":
        animate_cnf(
            density, data, str(folder / f"{data_name}_cnf.gif"),
            frames=4 if quick else 25, n_samples=200 if quick else 1000, resolution=15 if quick else 50,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Stopwatch()
    folder = args.out / "density_2d"
    folder.mkdir(parents=True, exist_ok=True)
    available = set(transforms.available())
    rows: list[tuple[str, str, FitResult | None]] = []
    for data_name in args.datasets:
        data = toy2d.load(data_name, seed=args.seed)
        source = "published file" if toy2d.find_file(data_name) else "generator"
        train, test = split(data, 0.2, seed=args.seed)
        fit_data, validation = split(train, VALIDATION_FRACTION, seed=args.seed + 1)
        print(
            f"{data_name}: {data.shape[0]} points ({source}), {fit_data.shape[0]} fit / "
            f"{validation.shape[0]} validation / {test.shape[0]} test"
        )
        for name in args.flows:
            if name not in available:
                print(f"  {name}: not registered, skipped")
                rows.append((data_name, name, None))
                continue
            seconds = args.cnf_seconds if name == "cnf" else args.seconds
            density, result = fit(
                name, fit_data, test, seconds, args.seed, validation=validation,
                eval_every=eval_interval(name, seconds),
            )
            chosen = result.selected_point
            print(
                f"  {name:8s} test NLL {result.test_nll:7.3f} (validation {chosen.validation_nll:.3f} "
                f"at step {chosen.step}; last {result.final_test_nll:.3f})  "
                f"{result.wall_time:6.1f} s  {result.steps} steps"
            )
            rows.append((data_name, name, result))
            if not args.no_figures:
                figures(name, data_name, density, data, folder, args.quick)

    comparison: dict[str, FitResult] = {}
    if args.compare_seconds > 0 and {"realnvp", "cnf"} <= available:
        data = toy2d.two_moons(args.compare_points, seed=args.seed)
        train, test = split(data, 0.2, seed=args.seed)
        print(f"side by side on generated two moons (noise {toy2d.MOONS_NOISE}, {args.compare_points} points)")
        for name in ("realnvp", "cnf"):
            fit_kwargs = {**CONFIGS[name]["fit"], **COMPARE_FIT}
            fit_kwargs.pop("max_steps", None)
            _, comparison[name] = fit(
                name, train, test, args.compare_seconds, args.seed, fit_kwargs=fit_kwargs,
                flow_kwargs=COMPARE_FLOW[name],
            )
            print(f"  {name:8s} test NLL {comparison[name].test_nll:7.3f}")
        plot_history(
            comparison, str(folder / "two_moons_cnf_vs_realnvp.png"),
            title=f"two moons, {args.compare_points} points: test NLL vs training time",
        )
    protocol = Protocol(args.seed, args.seconds, args.cnf_seconds, VALIDATION_FRACTION, CLIP_NORM,
                        args.quick)
    side = SideBySide(args.compare_points, args.compare_seconds, COMPARE_FIT["lr"], comparison)
    command = command_line("examples/density_2d.py", sys.argv[1:] if argv is None else argv)
    page = write_page(args.out / "density_2d.md", rows, CONFIGS, protocol, side, command,
                      clock.wall_s)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
