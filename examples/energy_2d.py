"""Fit planar and radial flows to the four 2-D energies of Rezende & Mohamed (2015), Fig. 3.

Each target is an unnormalised density exp(-U(z)). The model puts an improper flat "prior" on z
and adds ``pyro.factor("energy", -U(z))``; the guide pushes z0 ~ N(0, I) through a flow of K
layers (``transforms.flow``). SVI then minimises KL(q || p) up to log Z. Because our planar and
radial layers invert exactly at any point, the learned density q is drawn exactly on a grid
(``TransformedDistribution.log_prob``), not as a histogram of samples.

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
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402
from torch.distributions import constraints  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import transforms  # noqa: E402

# The plotting box of the paper's Fig. 3, and where the confinement below starts.
BOX = 4.0
# U2-U4 do not depend on |z1| far away, so exp(-U) has infinite mass. Outside the box a quadratic
# wall of this width (zero inside, so the paper's energies are untouched there) makes them
# proper; this is what "the density on [-4, 4]^2" of the paper's figure implies.
WALL_WIDTH = 0.2


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * math.pi * z[..., 0] / 4.0)


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def _wall(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(z[..., 0].abs() - BOX) / WALL_WIDTH) ** 2


def _neg_logsumexp(*terms: torch.Tensor) -> torch.Tensor:
    return -torch.logsumexp(torch.stack(terms), dim=0)


def u1(z: torch.Tensor) -> torch.Tensor:
    ring = 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2
    lobes = _neg_logsumexp(-0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2)
    return ring + lobes


def u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _wall(z)


def u3(z: torch.Tensor) -> torch.Tensor:
    return (
        _neg_logsumexp(
            -0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2,
            -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2,
        )
        + _wall(z)
    )


def u4(z: torch.Tensor) -> torch.Tensor:
    return (
        _neg_logsumexp(
            -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2,
            -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2,
        )
        + _wall(z)
    )


ENERGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def model(flow, energy: Callable[[torch.Tensor], torch.Tensor], inverse_temperature: float) -> None:
    # The flat "prior" is never sampled: Trace_ELBO replays z from the guide. (``flow`` is the
    # guide's; SVI hands model and guide the same arguments.)
    z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    pyro.factor("energy", -inverse_temperature * energy(z))


def guide(flow, energy, inverse_temperature: float) -> None:
    pyro.module("flow", flow)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    pyro.sample("z", dist.TransformedDistribution(base, [flow]))


def fit(
    energy: Callable[[torch.Tensor], torch.Tensor],
    flow_name: str,
    length: int,
    steps: int,
    particles: int,
    learning_rate: float,
    anneal_fraction: float,
    seed: int,
    progress: bool,
    label: str,
):
    """SVI for one (energy, flow, length); returns the trained flow."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    flow = transforms.flow(flow_name, 2, length)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    # The step size decays tenfold over the run: fast early progress, a settled end.
    decay = 0.1 ** (1.0 / steps)
    optimiser = ClippedAdam({"lr": learning_rate, "clip_norm": 10.0, "lrd": decay})
    svi = SVI(model, guide, optimiser, elbo)
    anneal_steps = int(anneal_fraction * steps)
    # Annealing as in [1] (beta_t rising from 0.01 to 1) keeps early q wide, so it finds every mode.
    for step in tqdm(range(steps), desc=label, leave=False, disable=not progress, mininterval=1.0):
        beta = 1.0 if step >= anneal_steps else 0.01 + 0.99 * step / max(anneal_steps, 1)
        svi.step(flow, energy, beta)
    return flow


def _grid(points: int, half_width: float) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-half_width, half_width, points)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
    return axis, grid


@torch.no_grad()
def evaluate(flow, energy, samples: int) -> tuple[float, float, float]:
    """(-ELBO, log Z, KL(q || p)) with log Z by quadrature on a grid that holds the mass."""
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    z = q.sample((samples,))
    neg_elbo = (q.log_prob(z) + energy(z)).mean().item()
    axis, grid = _grid(801, 7.0)
    log_density = -energy(grid)
    cell = (axis[1] - axis[0]).item() ** 2
    log_z = (torch.logsumexp(log_density.reshape(-1), 0) + math.log(cell)).item()
    return neg_elbo, log_z, neg_elbo + log_z


@torch.no_grad()
def plot_energy(name: str, energy, fits: dict, out: Path, grid_points: int) -> Path:
    """Target exp(-U) beside the exact learned densities q(z), one row per flow family."""
    axis, grid = _grid(grid_points, BOX)
    target = torch.exp(-energy(grid))
    families = sorted({family for family, _ in fits})
    lengths = sorted({length for _, length in fits})
    fig, axes = plt.subplots(
        len(families), len(lengths) + 1, figsize=(2.6 * (len(lengths) + 1), 2.6 * len(families)),
        squeeze=False,
    )
    extent = (-BOX, BOX, -BOX, BOX)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    for row, family in enumerate(families):
        ax = axes[row, 0]
        ax.imshow(target.numpy(), origin="lower", extent=extent, cmap="viridis")
        ax.set_title(f"exp(-{name})", fontsize=9)
        ax.set_ylabel(family, fontsize=10)
        for col, length in enumerate(lengths, start=1):
            flow, kl = fits[(family, length)]
            q = dist.TransformedDistribution(base, [flow])
            density = q.log_prob(grid.reshape(-1, 2)).reshape(grid_points, grid_points).exp()
            ax = axes[row, col]
            ax.imshow(density.numpy(), origin="lower", extent=extent, cmap="viridis")
            ax.set_title(f"{family} K={length}  KL={kl:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = out / f"{name.lower()}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive int, got {text!r}")
    return values[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Fit planar and radial flows by SVI to the 2-D energies U1-U4 of Rezende & Mohamed "
            "(2015, Fig. 3) and plot the exact learned densities beside the targets."
        )
    )
    parser.add_argument("--steps", type=_positive_int, default=600, help="SVI steps per fit (default 600)")
    parser.add_argument(
        "--flow-length", type=_positive_ints, default=[8, 16, 32],
        help="comma-separated flow lengths K (default 8,16,32)",
    )
    parser.add_argument(
        "--flows", default="planar,radial",
        help="comma-separated registered flow names (default planar,radial)",
    )
    parser.add_argument(
        "--energies", default="U1,U2,U3,U4", help="comma-separated subset of U1,U2,U3,U4"
    )
    parser.add_argument("--particles", type=_positive_int, default=256, help="samples per SVI step (default 256)")
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
    if args.quick:
        args.steps, args.flow_length, args.particles = 200, [4], 64
    args.flows = [name.strip() for name in args.flows.split(",") if name.strip()]
    for name in args.flows:
        if name not in transforms.available():
            parser.error(f"unknown flow {name!r}; valid choices: {', '.join(transforms.available())}")
        if transforms.info(name).event_dim != 1:
            parser.error(f"flow {name!r} acts on whole sequences; choose a per-vector flow")
        if not transforms.info(name).exact_inverse:
            parser.error(f"flow {name!r} has no exact inverse, so its density cannot be drawn on a grid")
    args.energies = [name.strip().upper() for name in args.energies.split(",") if name.strip()]
    for name in args.energies:
        if name not in ENERGIES:
            parser.error(f"unknown energy {name!r}; valid choices: {', '.join(ENERGIES)}")
    if not 0.0 <= args.anneal_fraction < 1.0:
        parser.error(f"--anneal-fraction must be in [0, 1), got {args.anneal_fraction}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    grid_points = 100 if args.quick else 300
    rows = []
    index = 0
    for energy_name in args.energies:
        energy = ENERGIES[energy_name]
        fits = {}
        for family in args.flows:
            for length in args.flow_length:
                flow = fit(
                    energy, family, length, args.steps, args.particles, args.lr,
                    args.anneal_fraction, args.seed + index, not args.no_progress,
                    f"{energy_name} {family} K={length}",
                )
                index += 1
                neg_elbo, log_z, kl = evaluate(flow, energy, samples=4096 if not args.quick else 1024)
                fits[(family, length)] = (flow, kl)
                rows.append((energy_name, family, length, neg_elbo, log_z, kl))
                print(
                    f"{energy_name} {family:>7s} K={length:<3d} -ELBO {neg_elbo:7.3f}  "
                    f"log Z {log_z:6.3f}  KL(q||p) {kl:6.3f}",
                    flush=True,
                )
        path = plot_energy(energy_name, energy, fits, args.out, grid_points)
        print(f"wrote {path}", flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"wall time {wall:.1f} s (CPU time {cpu:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
