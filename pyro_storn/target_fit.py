r"""Fitting a guide to a model without data (an energy, a normalised target of
:mod:`pyro_storn.targets`) by SVI through the one loop, :func:`pyro_storn.training.fit`:
Trace_ELBO with vectorised particles, Adam whose rate falls tenfold over the run, and the loop's
clipping rule (the gradient's global norm at most :data:`CLIP_NORM`).

For an energy :math:`U`, :func:`fit_energy` anneals the inverse temperature :math:`\beta_t` of
:math:`\exp(-\beta_t U(z))` from 0.01 to 1 over the first steps, as Rezende & Mohamed do [1].

>>> flow = transforms.flow("planar", 2, 8)                                          # doctest: +SKIP
>>> losses = fit_energy(flow, ENERGIES["U1"], steps=600, particles=256, lr=5e-2,    # doctest: +SKIP
...                     anneal_fraction=0.3)

References:
[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
ICML 2015. arXiv:1505.05770
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from torch import nn

from .distributed import ProgramModule
from .targets import Energy, energy_model, flow_guide
from .training import Optimizer, fit, reraise_interrupt

__all__ = [
    "CLIP_NORM",
    "FINAL_LR_FRACTION",
    "INITIAL_INVERSE_TEMPERATURE",
    "TemperedEnergy",
    "annealed_inverse_temperature",
    "fit_energy",
    "fit_guide",
]

# The loop's global-norm bound; Pyro's ClippedAdam, which these fits used before, clamped each
# gradient entry at the same 10.
CLIP_NORM = 10.0
# The step size at the end of a run, as a fraction of the first: fast early progress, a settled end.
FINAL_LR_FRACTION = 0.1
# Where [1]'s annealing starts: a nearly flat target keeps early q wide, so it finds every mode.
INITIAL_INVERSE_TEMPERATURE = 0.01


def fit_guide(model: Callable[[], None], guide: nn.Module, *, steps: int, particles: int,
              lr: float, seed: int = 0, max_plate_nesting: float = float("inf"),
              before_step: Callable[[int], None] | None = None,
              progress: bool = False) -> list[float]:
    """Fit ``guide`` (a module holding the guide's parameters, e.g. an AutoGuide) to ``model``
    (a Pyro program without arguments) for ``steps`` steps; returns each step's loss (the
    -ELBO estimate from ``particles`` draws).

    Clears Pyro's param store first (an AutoGuide would otherwise take parameters of the same
    names from an earlier fit) and seeds with ``seed``. The learning rate of step ``t`` (0-based)
    is ``lr * FINAL_LR_FRACTION ** ((t + 1) / steps)``, the schedule of Pyro's ``ClippedAdam``
    with ``lrd``; ``before_step(t)`` is called before step ``t`` (e.g. annealing).

    :raises pyro_storn.training.NonFiniteLossError: when a loss is NaN or infinite; its
        ``epoch`` is the step (1-based).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide()  # AutoGuides make their parameters on their first call, and the optimiser needs them
    elbo = pyro.infer.Trace_ELBO(num_particles=particles, vectorize_particles=True,
                                 max_plate_nesting=max_plate_nesting)
    decay = FINAL_LR_FRACTION ** (1.0 / steps)
    losses: list[torch.Tensor] = []

    def record(step: int, seconds: float, loss: torch.Tensor) -> bool:
        losses.append(loss)
        return False

    reraise_interrupt(fit(elbo(model, guide), guide, None, epochs=steps, run_dir=None,
                          optimizer=Optimizer(lr=lr, clip_norm=CLIP_NORM,
                                              lr_factor=lambda step, _: decay ** (step + 1)),
                          seed=seed, before_epoch=before_step, after_step=record,
                          progress=progress))
    return torch.stack(losses).tolist()


class TemperedEnergy(nn.Module):
    """The Pyro model :math:`\\exp(-\\beta U(z))` (:func:`~pyro_storn.targets.energy_model`) and
    its flow guide (:func:`~pyro_storn.targets.flow_guide`) as methods of one module holding the
    flow; ``inverse_temperature`` (:math:`\\beta`) may change between steps."""

    def __init__(self, flow: nn.Module, energy: Energy, inverse_temperature: float = 1.0):
        super().__init__()
        self.flow, self.energy, self.inverse_temperature = flow, energy, inverse_temperature

    def model(self) -> None:
        energy_model(self.flow, self.energy, self.inverse_temperature)

    def guide(self) -> None:
        flow_guide(self.flow, self.energy, self.inverse_temperature)

    def extra_repr(self) -> str:
        return f"energy={getattr(self.energy, '__name__', self.energy)}, " \
               f"inverse_temperature={self.inverse_temperature:g}"


def annealed_inverse_temperature(step: int, anneal_steps: int) -> float:
    """:math:`\\beta_t`, rising linearly from :data:`INITIAL_INVERSE_TEMPERATURE` at step 0 to 1
    at step ``anneal_steps``, then 1."""
    if step >= anneal_steps:
        return 1.0
    return INITIAL_INVERSE_TEMPERATURE + (1.0 - INITIAL_INVERSE_TEMPERATURE) * step / anneal_steps


def fit_energy(flow: nn.Module, energy: Energy, *, steps: int, particles: int, lr: float,
               anneal_fraction: float, seed: int = 0, progress: bool = False) -> list[float]:
    """Fit the flow guide ``z = flow(z0)``, ``z0 ~ N(0, I)``, to ``exp(-energy(z))`` by
    :func:`fit_guide`, the inverse temperature annealed over the first ``anneal_fraction`` of
    the steps (:func:`annealed_inverse_temperature`); returns each step's loss."""
    if not 0.0 <= anneal_fraction < 1.0:
        raise ValueError(f"anneal_fraction must be in [0, 1), got {anneal_fraction!r}")
    tempered = TemperedEnergy(flow, energy)
    anneal_steps = int(anneal_fraction * steps)

    def anneal(step: int) -> None:
        tempered.inverse_temperature = annealed_inverse_temperature(step, anneal_steps)

    return fit_guide(tempered.model, ProgramModule(tempered, "guide"), steps=steps,
                     particles=particles, lr=lr, seed=seed, max_plate_nesting=0,
                     before_step=anneal, progress=progress)
