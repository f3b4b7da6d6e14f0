"""Fit planar and radial flows to the four 2-D energies of Rezende & Mohamed (2015), Fig. 3.

Each target is an unnormalised density exp(-U(z)). The model puts an improper flat "prior" on z
and adds ``pyro.factor("energy", -U(z))``; the guide pushes z0 ~ N(0, I) through a flow of K
layers (``transforms.flow``). SVI (``pyro_storn.target_fit.fit_energy``) then minimises
KL(q || p) up to log Z. Because our planar and radial layers invert exactly at any point, the
learned density q is drawn exactly on a grid (``TransformedDistribution.log_prob``), not as a
histogram of samples.

    python examples/energy_2d.py --quick                 # < 1 minute
    python examples/energy_2d.py                         # K = 8, 16, 32; writes docs/energy_2d/

References:
[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
ICML 2015. [arXiv:1505.05770]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pyro

import transforms
from pyro_storn.cli import OneLineParser
from pyro_storn.rundir import check_output_dir
from pyro_storn.tables import Stopwatch
from pyro_storn.target_figures import plot_energy_fits
from pyro_storn.target_fit import fit_energy
from pyro_storn.targets import ENERGIES, energy_kl
from pyro_storn.validation import check_non_negative_int, check_positive_int


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        description=(
            "Fit planar and radial flows by SVI to the 2-D energies U1-U4 of Rezende & Mohamed "
            "(2015, Fig. 3) and plot the exact learned densities beside the targets."
        )
    )
    parser.add_argument("--steps", type=int, default=600, help="SVI steps per fit (default 600)")
    parser.add_argument(
        "--flow-length", type=_ints, default=[8, 16, 32],
        help="comma-separated flow lengths K (default 8,16,32)",
    )
    parser.add_argument(
        "--flows", default="planar,radial",
        help="comma-separated registered flow names (default planar,radial)",
    )
    parser.add_argument(
        "--energies", default="U1,U2,U3,U4", help="comma-separated subset of U1,U2,U3,U4"
    )
    parser.add_argument("--particles", type=int, default=256, help="samples per SVI step (default 256)")
    parser.add_argument(
        "--lr", type=float, default=5e-2,
        help="initial Adam learning rate, decayed tenfold over the run (default 5e-2)",
    )
    parser.add_argument(
        "--anneal-fraction", type=float, default=0.3,
        help="fraction of the steps over which the inverse temperature rises from 0.01 to 1 (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("docs/energy_2d"), help="folder for the PNGs")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run under a minute: K = 4, 200 steps, 64 particles, coarse grid",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.flow_length:
        parser.error("--flow-length needs at least one length")
    try:
        for option, values in (("--steps", [args.steps]), ("--flow-length", args.flow_length),
                               ("--particles", [args.particles])):
            for value in values:
                check_positive_int(option, value)
        check_non_negative_int("--seed", args.seed)
        check_output_dir(args.out, "--out")  # before any fit
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.steps, args.flow_length, args.particles = 200, [4], 64
    flows = [name.strip() for name in args.flows.split(",") if name.strip()]
    if not flows:
        parser.error(f"--flows needs at least one flow name, got {args.flows!r}")
    args.flows = flows
    for name in args.flows:
        if name not in transforms.available():
            parser.error(f"unknown flow {name!r}; valid choices: {', '.join(transforms.available())}")
        if transforms.info(name).event_dim != 1:
            parser.error(f"flow {name!r} acts on whole sequences; choose a per-vector flow")
        if not transforms.info(name).exact_inverse:
            parser.error(f"flow {name!r} has no exact inverse, so its density cannot be drawn on a grid")
    energies = [name.strip().upper() for name in args.energies.split(",") if name.strip()]
    if not energies:
        parser.error(f"--energies needs at least one of U1, U2, U3, U4, got {args.energies!r}")
    args.energies = energies
    for name in args.energies:
        if name not in ENERGIES:
            parser.error(f"unknown energy {name!r}; valid choices: {', '.join(ENERGIES)}")
    if not 0.0 <= args.anneal_fraction < 1.0:
        parser.error(f"--anneal-fraction must be in [0, 1), got {args.anneal_fraction}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    grid_points = 100 if args.quick else 300
    index = 0
    for energy_name in args.energies:
        energy = ENERGIES[energy_name]
        fits = {}
        for family in args.flows:
            for length in args.flow_length:
                pyro.set_rng_seed(args.seed + index)  # the flow's initial parameters
                flow = transforms.flow(family, 2, length)
                fit_energy(flow, energy, steps=args.steps, particles=args.particles, lr=args.lr,
                           anneal_fraction=args.anneal_fraction, seed=args.seed + index,
                           progress=not args.no_progress)
                index += 1
                neg_elbo, log_z, kl = energy_kl(flow, energy, samples=4096 if not args.quick else 1024)
                fits[(family, length)] = (flow, kl)
                print(
                    f"{energy_name} {family:>7s} K={length:<3d} -ELBO {neg_elbo:7.3f}  "
                    f"log Z {log_z:6.3f}  KL(q||p) {kl:6.3f}",
                    flush=True,
                )
        path = plot_energy_fits(energy_name, energy, fits, args.out, grid_points)
        print(f"wrote {path}", flush=True)
    print(f"wall time {clock.wall_s:.1f} s (CPU time {clock.cpu_s:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
