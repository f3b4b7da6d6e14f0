"""The flow density: base N(0, I) pushed through registry flows and a fixed affine map that undoes
the training data's standardisation, as a Pyro :class:`~pyro.distributions.TransformedDistribution`
(so the flow sees unit-scale data and every number is in data units), with its test NLL in nats
per point.

:meth:`FlowDensity.model` is the Pyro model whose observed site ``"x"`` carries the density; SVI
with the empty :meth:`FlowDensity.guide` is maximum likelihood.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.distributions.transforms import AffineTransform

import transforms
from transforms.cnf import solver_options

__all__ = ["EVAL_SOLVER", "FlowDensity", "make_density", "split", "test_nll", "solver_settings"]

# A coordinate with (near) zero spread would be divided by zero when standardising.
MIN_SCALE = 1e-6

# Default evaluation solver for continuous flows: tight enough that the reported NLL does not
# move in its third decimal when the tolerance is tightened further.
EVAL_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "step_size": None}


class FlowDensity(nn.Module):
    """A normalizing-flow density :math:`p(x) = \\mathcal{N}(f^{-1}(x); 0, I)\\,
    |\\det \\partial f^{-1} / \\partial x|` with :math:`f = A \\circ f_K \\circ \\dots \\circ f_1`,
    :math:`A` the fixed affine map ``x = loc + scale * u`` that undoes standardisation.

    :param flow: the flow layers (a ``TransformModule``, e.g. ``transforms.flow(...)``).
    :param input_dim: the data dimension.
    :param loc: per-coordinate mean of the training data (zeros when ``None``).
    :param scale: per-coordinate standard deviation of the training data (ones when ``None``).
    """

    def __init__(
        self,
        flow: nn.Module,
        input_dim: int,
        loc: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.input_dim = input_dim
        self.register_buffer("loc", torch.zeros(input_dim) if loc is None else loc.clone())
        self.register_buffer("scale", torch.ones(input_dim) if scale is None else scale.clone())

    def transforms(self) -> list:
        """The transforms from the base to data space, in order."""
        return [self.flow, AffineTransform(self.loc, self.scale, event_dim=1)]

    def distribution(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.loc.new_zeros(self.input_dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))

    def to_base(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`f^{-1}(x)`, the data mapped to the base space."""
        for transform in reversed(self.transforms()):
            x = transform.inv(x)
        return x

    def to_data(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`f(z)`, base points mapped to data space."""
        for transform in self.transforms():
            z = transform(z)
        return z

    def model(self, x: torch.Tensor) -> None:
        """Pyro model: the observed site ``"x"`` has the flow density. (Pyro scores an observed
        site after the model returns, so a CNF regulariser integrated in that solve cannot be a
        factor of the same model: :func:`fit_density` adds it with ``engine="torch"``.)"""
        pyro.module("flow_density", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.distribution(), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """No latent variables: SVI with this guide is maximum likelihood."""


def make_density(
    name: str,
    data: torch.Tensor | int,
    length: int,
    *,
    standardize: bool = True,
    **flow_kwargs: Any,
) -> FlowDensity:
    """``length`` layers of registry flow ``name`` on the data's dimension; standardised by the
    data's mean and standard deviation when ``data`` is a tensor and ``standardize`` holds."""
    if isinstance(data, int):
        return FlowDensity(transforms.flow(name, data, length, **flow_kwargs), data)
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be an (N >= 2, D) tensor, got shape {tuple(data.shape)}")
    input_dim = data.shape[1]
    flow = transforms.flow(name, input_dim, length, **flow_kwargs).to(data.dtype)
    loc = scale = None
    if standardize:
        loc, scale = data.mean(0), data.std(0).clamp_min(MIN_SCALE)
    return FlowDensity(flow, input_dim, loc, scale).to(data.device)


def split(
    data: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random train/test split (the assignment's 80/20), reproducible from ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=generator).to(data.device)
    n_test = max(1, int(round(test_fraction * data.shape[0])))
    return data[order[n_test:]], data[order[:n_test]]


@contextlib.contextmanager
def solver_settings(density: nn.Module, settings: dict[str, Any] | None) -> Iterator[None]:
    if settings:
        with solver_options(density, **settings):
            yield
    else:
        yield


@torch.no_grad()
def test_nll(
    density: FlowDensity,
    data: torch.Tensor,
    *,
    batch_size: int = 4096,
    solver: dict[str, Any] | None = None,
) -> float:
    """Mean negative log-likelihood in nats per point; continuous flows are solved with
    ``solver`` (default :data:`EVAL_SOLVER`, tight tolerances)."""
    was_training = density.training
    density.eval()
    total = 0.0
    with solver_settings(density, EVAL_SOLVER if solver is None else solver):
        for start in range(0, data.shape[0], batch_size):
            total += -density.log_prob(data[start : start + batch_size]).sum().item()
    density.train(was_training)
    return total / data.shape[0]


