r"""Target densities with known answers, for judging guides: the four 2-D energies of Rezende &
Mohamed (2015, Fig. 3), and two normalised posteriors with exact samplers (Neal's funnel and a
Rosenbrock banana).

An energy :math:`U` defines the unnormalised density :math:`\exp(-U(z))`. As a Pyro model
(:func:`energy_model`) it is a flat improper prior on ``"z"`` plus ``pyro.factor(-U(z))``, so
that SVI with a flow guide (:func:`flow_guide`) minimises :math:`\mathrm{KL}(q \,\|\, p)` up to
:math:`\log Z` (:func:`pyro_storn.target_fit.fit_energy` runs it through the one training loop);
:func:`log_normaliser` gives :math:`\log Z` by quadrature, and :func:`energy_kl` the KL itself.

>>> flow = transforms.flow("planar", 2, 8)                                   # doctest: +SKIP
>>> svi = SVI(energy_model, flow_guide, Adam({"lr": 1e-2}), Trace_ELBO())    # doctest: +SKIP
>>> svi.step(flow, ENERGIES["U1"], 1.0)                                      # doctest: +SKIP

References:
[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
ICML 2015. arXiv:1505.05770
[2] Radford M. Neal. Slice Sampling. Annals of Statistics 31(3), 2003.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = [
    "BOX",
    "ENERGIES",
    "FUNNEL_SCALE",
    "Energy",
    "Target",
    "banana_target",
    "base_distribution",
    "energy_grid",
    "energy_kl",
    "energy_model",
    "flow_guide",
    "funnel_target",
    "log_normaliser",
    "u1",
    "u2",
    "u3",
    "u4",
]

Energy = Callable[[torch.Tensor], torch.Tensor]

# The plotting box of [1]'s Fig. 3, and where the confinement below starts.
BOX = 4.0
# U2-U4 do not depend on |z1| far away, so exp(-U) has infinite mass. Outside the box a quadratic
# wall of this width (zero inside, so [1]'s energies are untouched there) makes them proper; this
# is what "the density on [-4, 4]^2" of [1]'s figure implies.
WALL_WIDTH = 0.2
# The quadrature grid of log Z: wide enough to hold all the mass the walls leave.
QUADRATURE_POINTS = 801
QUADRATURE_HALF_WIDTH = 7.0
FUNNEL_SCALE = 3.0


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
    """A ring of radius 2 with two lobes on the z1 axis."""
    ring = 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2
    lobes = _neg_logsumexp(-0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2)
    return ring + lobes


def u2(z: torch.Tensor) -> torch.Tensor:
    """A sine wave."""
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _wall(z)


def u3(z: torch.Tensor) -> torch.Tensor:
    """A sine wave and a copy of it bent down by a bump at z1 = 1."""
    return (
        _neg_logsumexp(
            -0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2,
            -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2,
        )
        + _wall(z)
    )


def u4(z: torch.Tensor) -> torch.Tensor:
    """A sine wave and its copy shifted down for z1 > 1."""
    return (
        _neg_logsumexp(
            -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2,
            -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2,
        )
        + _wall(z)
    )


ENERGIES: dict[str, Energy] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def base_distribution() -> dist.Distribution:
    """The flow guide's base, a standard normal on R^2."""
    return dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)


def energy_model(flow, energy: Energy, inverse_temperature: float) -> None:
    """``exp(-inverse_temperature * energy(z))`` as a Pyro model; ``flow`` is the guide's (SVI
    hands model and guide the same arguments)."""
    # never sampled: Trace_ELBO replays z from the guide
    z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    pyro.factor("energy", -inverse_temperature * energy(z))


def flow_guide(flow, energy: Energy, inverse_temperature: float) -> None:
    """``z = flow(z0)``, ``z0 ~ N(0, I)``, with the flow's parameters registered."""
    pyro.module("flow", flow)
    pyro.sample("z", dist.TransformedDistribution(base_distribution(), [flow]))


def energy_grid(points: int, half_width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(axis, grid)``: ``points`` values over ``[-half_width, half_width]`` and the
    ``(points, points, 2)`` grid of their pairs (z1 along the columns)."""
    axis = torch.linspace(-half_width, half_width, points)
    return axis, torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)


@torch.no_grad()
def log_normaliser(energy: Energy, points: int = QUADRATURE_POINTS,
                   half_width: float = QUADRATURE_HALF_WIDTH) -> float:
    """:math:`\\log \\int \\exp(-U(z)) dz` by a Riemann sum over a square grid."""
    axis, grid = energy_grid(points, half_width)
    cell = (axis[1] - axis[0]).item() ** 2
    return (torch.logsumexp(-energy(grid).reshape(-1), 0) + math.log(cell)).item()


@torch.no_grad()
def energy_kl(flow, energy: Energy, samples: int) -> tuple[float, float, float]:
    """``(-ELBO, log Z, KL(q || p))`` of the flow guide against the target, the -ELBO from
    ``samples`` draws of the guide."""
    q = dist.TransformedDistribution(base_distribution(), [flow])
    z = q.sample((samples,))
    neg_elbo = (q.log_prob(z) + energy(z)).mean().item()
    log_z = log_normaliser(energy)
    return neg_elbo, log_z, neg_elbo + log_z


@dataclass(frozen=True)
class Target:
    """A normalised posterior (log Z = 0) as a Pyro model without data, with an exact sampler
    ``sample(n, generator) -> {site: (n, ...) draws}``; ``pair`` names the two coordinates a
    figure shows, as ``"site"`` or ``"site[i]"``."""

    name: str
    model: Callable[[], None]
    sample: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    pair: tuple[str, str]
    description: str


def funnel_target(dim: int) -> Target:
    """Neal's funnel [2] in ``dim`` dims: y ~ N(0, 3), x_i | y ~ N(0, exp(y / 2))."""
    if dim < 2:
        raise ValueError(f"the funnel needs dim >= 2, got {dim}")

    def model() -> None:
        y = pyro.sample("y", dist.Normal(0.0, FUNNEL_SCALE))
        pyro.sample("x", dist.Normal(torch.zeros(dim - 1), torch.exp(y / 2).unsqueeze(-1)).to_event(1))

    def sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        y = FUNNEL_SCALE * torch.randn(n, generator=generator)
        return {"y": y, "x": torch.exp(y / 2).unsqueeze(-1) * torch.randn(n, dim - 1, generator=generator)}

    return Target(
        "funnel", model, sample, ("x[0]", "y"),
        f"Neal's funnel, {dim} dims: y ~ N(0, 3), x_i ~ N(0, exp(y/2)), i = 1..{dim - 1}",
    )


def banana_target() -> Target:
    """log p(x1, x2) = -[(1 - x1)^2 + 2 (x2 - x1^2)^2] / 2 + const: x1 ~ N(1, 1),
    x2 | x1 ~ N(x1^2, 1/2)."""

    def model() -> None:
        x1 = pyro.sample("x1", dist.Normal(1.0, 1.0))
        pyro.sample("x2", dist.Normal(x1**2, math.sqrt(0.5)))

    def sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x1 = 1.0 + torch.randn(n, generator=generator)
        return {"x1": x1, "x2": x1**2 + math.sqrt(0.5) * torch.randn(n, generator=generator)}

    return Target(
        "banana", model, sample, ("x1", "x2"),
        "Rosenbrock banana: log p = -[(1 - x1)^2 + 2 (x2 - x1^2)^2] / 2 (x1 ~ N(1, 1), "
        "x2 ~ N(x1^2, 1/2))",
    )
