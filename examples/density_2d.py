"""Flow densities on the ProbAI 2022 2-D data sets: planar, radial, RealNVP, NICE, MAF and the
continuous flow (CNF), each fit by maximum likelihood under a wall-clock budget, and the CNF and
RealNVP side by side on two moons.

Writes to ``--out`` (default ``docs``):

- ``density_2d/<data>_<flow>_panels.png``: data X, f(X) in base space, g(Z) in data space, Z;
- ``density_2d/<data>_<flow>_density.png``: the density heatmap;
- ``density_2d/<data>_cnf.gif``: CNF samples and density moving from the prior to the data;
- ``density_2d/two_moons_cnf_vs_realnvp.png``: test NLL against training seconds;
- ``density_2d.md``: the table (test NLL per flow per data set, training seconds, steps) and the
  side-by-side comparison.

    python examples/density_2d.py                      # the full run (about 20 minutes)
    python examples/density_2d.py --quick              # a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
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

DATASETS = ("two_moons", "two_blobs", "boomerang")
FLOWS = ("planar", "radial", "realnvp", "nice", "maf", "cnf")

# Per flow: layers, builder keyword arguments, fit keyword arguments. Planar and radial layers
# are weak one at a time, so they get many; the CNF is one continuous layer.
CONFIGS: dict[str, dict[str, Any]] = {
    "planar": {"length": 32, "flow": {}, "fit": {"lr": 5e-3}},
    "radial": {"length": 32, "flow": {}, "fit": {"lr": 5e-3}},
    "realnvp": {"length": 8, "flow": {"hidden_dims": (64, 64)}, "fit": {"lr": 5e-3}},
    "nice": {"length": 8, "flow": {"hidden_dims": (64, 64)}, "fit": {"lr": 5e-3}},
    "maf": {"length": 5, "flow": {"hidden_dims": (64, 64)}, "fit": {"lr": 5e-3}},
    "cnf": {
        "length": 1,
        # Kinetic + Jacobian-Frobenius penalties keep the paths straight, so 4 RK4 steps in
        # training are accurate and the tight evaluation solve needs few evaluations.
        "flow": {"hidden_dims": (64, 64), "kinetic_weight": 0.01, "jacobian_weight": 0.01},
        "fit": {"lr": 5e-3, "train_solver": {"method": "rk4", "step_size": 0.25}},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", default=",".join(FLOWS), help="comma-separated registry names")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data sets")
    parser.add_argument("--seconds", type=float, default=20.0, help="training budget per discrete flow")
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
    args.flows = [f for f in args.flows.split(",") if f]
    args.datasets = [d for d in args.datasets.split(",") if d]
    for name in args.datasets:
        if name not in DATASETS:
            parser.error(f"unknown data set {name!r}; valid choices: {', '.join(DATASETS)}")
    for name in args.flows:
        if name not in CONFIGS:
            parser.error(f"no configuration for flow {name!r}; valid choices: {', '.join(CONFIGS)}")
    for option in ("seconds", "cnf_seconds"):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.quick:
        args.seconds, args.cnf_seconds = 2.0, 4.0
        args.compare_seconds = min(args.compare_seconds, 4.0)
        args.compare_points = min(args.compare_points, 1000)
    return args


def fit(name: str, train: torch.Tensor, test: torch.Tensor, seconds: float, seed: int):
    config = CONFIGS[name]
    torch.manual_seed(seed)
    density = make_density(name, train, config["length"], **config["flow"])
    result = fit_density(
        density, train, test, max_seconds=seconds, eval_every=max(seconds / 6, 1.0),
        seed=seed, progress=sys.stderr.isatty(), **config["fit"],
    )
    return density, result


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
    folder = args.out / "density_2d"
    folder.mkdir(parents=True, exist_ok=True)
    available = set(transforms.available())
    rows: list[tuple[str, str, FitResult | None]] = []
    for data_name in args.datasets:
        data = toy2d.load(data_name, seed=args.seed)
        source = "published file" if toy2d.find_file(data_name) else "generator"
        train, test = split(data, 0.2, seed=args.seed)
        print(f"{data_name}: {data.shape[0]} points ({source}), {train.shape[0]} train / {test.shape[0]} test")
        for name in args.flows:
            if name not in available:
                print(f"  {name}: not registered, skipped")
                rows.append((data_name, name, None))
                continue
            seconds = args.cnf_seconds if name == "cnf" else args.seconds
            density, result = fit(name, train, test, seconds, args.seed)
            print(f"  {name:8s} test NLL {result.test_nll:7.3f}  {result.wall_time:6.1f} s  {result.steps} steps")
            rows.append((data_name, name, result))
            if not args.no_figures:
                figures(name, data_name, density, data, folder, args.quick)

    comparison: dict[str, FitResult] = {}
    if args.compare_seconds > 0 and {"realnvp", "cnf"} <= available:
        data = toy2d.two_moons(args.compare_points, seed=args.seed)
        train, test = split(data, 0.2, seed=args.seed)
        print(f"side by side on generated two moons (noise {toy2d.MOONS_NOISE}, {args.compare_points} points)")
        for name in ("realnvp", "cnf"):
            _, comparison[name] = fit(name, train, test, args.compare_seconds, args.seed)
            print(f"  {name:8s} test NLL {comparison[name].test_nll:7.3f}")
        plot_history(
            comparison, str(folder / "two_moons_cnf_vs_realnvp.png"),
            title=f"two moons, {args.compare_points} points: test NLL vs training time",
        )
    write_table(args, rows, comparison)
    return 0


def write_table(args: argparse.Namespace, rows, comparison: dict[str, FitResult]) -> None:
    threads = torch.get_num_threads()
    lines = [
        "# Flow densities on 2-D data",
        "",
        "Written by `examples/density_2d.py`"
        + (" --quick (smoke run: budgets too short to mean anything)" if args.quick else "")
        + f" on {platform.machine()} with {threads} torch thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {time.strftime('%Y-%m-%d')}.",
        "Data: the published ProbAI 2022 files (500 points each), split 80/20 at random (seed "
        f"{args.seed}). Test NLL in nats per point, in data units. Budgets: {args.seconds:g} s of "
        f"training per discrete flow, {args.cnf_seconds:g} s per CNF (evaluation not counted). "
        "The CNF is evaluated with dopri5 at rtol = atol = 1e-6 and trained with 4 RK4 steps.",
        "",
        "| data | flow | layers | test NLL | train s | steps |",
        "|---|---|---|---|---|---|",
    ]
    for data_name, name, result in rows:
        if result is None:
            lines.append(f"| {data_name} | {name} | - | not registered | - | - |")
            continue
        lines.append(
            f"| {data_name} | {name} | {CONFIGS[name]['length']} | {result.test_nll:.3f} | "
            f"{result.wall_time:.1f} | {result.steps} |"
        )
    if comparison:
        lines += [
            "",
            "## CNF and RealNVP side by side",
            "",
            f"Generated two moons (noise {toy2d.MOONS_NOISE}), {args.compare_points} points split 80/20, "
            f"{args.compare_seconds:g} s of training each, in one process.",
            "",
            "| flow | train s | step | test NLL | NFE (eval solve) |",
            "|---|---|---|---|---|",
        ]
        for name, result in comparison.items():
            for point in result.history:
                lines.append(
                    f"| {name} | {point.wall_time:.1f} | {point.step} | {point.test_nll:.3f} | {point.nfe or '-'} |"
                )
        reference = comparison["realnvp"].test_nll
        reached = comparison["cnf"].time_to(reference + 0.05)
        lines += [
            "",
            f"RealNVP's final test NLL: {reference:.3f}. The CNF first came within 0.05 nats of it "
            + (f"after {reached:.1f} s of training." if reached is not None else "not at all in its budget."),
            "",
            "![history](density_2d/two_moons_cnf_vs_realnvp.png)",
        ]
    (args.out / "density_2d.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'density_2d.md'}")


if __name__ == "__main__":
    sys.exit(main())
