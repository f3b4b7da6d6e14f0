"""Maximum likelihood for a :class:`~pyro_storn.density.model.FlowDensity` through the one loop,
:func:`pyro_storn.training.fit`, under a budget of training seconds or steps, with the test NLL
(and a validation NLL) recorded as training goes.

The objective is the negative log-likelihood of a minibatch, either computed directly
(``engine="torch"``, with the CNF's kinetic / Jacobian regulariser when it has weights) or as
Pyro's ELBO of :meth:`FlowDensity.model` with the empty guide (``engine="svi"``): the same number,
the same Adam step. Given a validation set (carved from the training data, never the test set),
the density ends with the parameters of the evaluation with the best validation NLL.

>>> fit_data, validation = split(train, 0.2, seed=0)                         # doctest: +SKIP
>>> density = make_density("realnvp", fit_data, length=8)                    # doctest: +SKIP
>>> result = fit_density(density, fit_data, test, validation=validation,     # doctest: +SKIP
...                      max_seconds=30, lr=1e-3, clip_norm=10.0)
>>> result.test_nll, result.final_test_nll                                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
import torch.nn as nn

from transforms.cnf import regulariser, total_nfe

from ..training import NonFiniteLossError, Optimizer, elbo_module, fit, reraise_interrupt
from .model import FlowDensity, solver_settings, test_nll

__all__ = ["HistoryPoint", "FitResult", "fit_density"]

ENGINES = ("torch", "svi")
SCHEDULES = ("cosine", "constant")


@dataclass
class HistoryPoint:
    """One evaluation during training: seconds of training so far (evaluations excluded), the
    step, the test NLL (nats/point), the last minibatch loss, the function evaluations of the
    test-set solve (``nfe``, under the evaluation solver; 0 for discrete flows), the validation
    NLL (``None`` without a validation set), and the function evaluations of the last training
    step's forward solve (``train_nfe``, under the training solver)."""

    wall_time: float
    step: int
    test_nll: float
    train_loss: float
    nfe: int = 0
    validation_nll: float | None = None
    train_nfe: int = 0


@dataclass
class FitResult:
    """What :func:`fit_density` measured. ``selected`` is the index in ``history`` of the
    evaluation whose parameters the density holds after the fit: the best validation NLL when a
    validation set was given (and ``restore_best``), else the last."""

    history: list[HistoryPoint] = field(default_factory=list)
    steps: int = 0
    wall_time: float = 0.0
    eval_time: float = 0.0
    selected: int = -1
    stopped_early: bool = False

    @property
    def selected_point(self) -> HistoryPoint | None:
        return self.history[self.selected] if self.history else None

    @property
    def test_nll(self) -> float:
        """The test NLL of the parameters the density holds after the fit (the selected
        evaluation: chosen on the validation set, never on the test set)."""
        return self.history[self.selected].test_nll if self.history else math.nan

    @property
    def final_test_nll(self) -> float:
        """The test NLL at the last evaluation, whatever the validation NLL said."""
        return self.history[-1].test_nll if self.history else math.nan

    def time_to(self, target_nll: float) -> float | None:
        """Training seconds until the test NLL first reached ``target_nll`` (None if never)."""
        for point in self.history:
            if point.test_nll <= target_nll:
                return point.wall_time
        return None


def _regularised(density: nn.Module) -> bool:
    from transforms.cnf import ConditionedCNF

    return any(
        isinstance(m, ConditionedCNF) and (m.kinetic_weight > 0 or m.jacobian_weight > 0)
        for m in density.modules()
    )


def _learning_rate_factor(schedule: str, progress: float) -> float:
    if schedule == "constant":
        return 1.0
    # Cosine to a tenth of the base rate: the last steps refine instead of jumping around.
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class _NegativeLogLikelihood(nn.Module):
    """The minibatch's summed NLL (plus the CNF regulariser per point), under the training
    solver settings; ``inner`` replaces the NLL by another objective of the same value (SVI)."""

    def __init__(self, density: FlowDensity, solver: dict[str, Any] | None,
                 inner: nn.Module | None = None):
        super().__init__()
        self.density, self.solver, self.inner = density, solver, inner

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with solver_settings(self.density, self.solver):
            if self.inner is not None:
                return self.inner(batch)
            nll = -self.density.log_prob(batch).sum()
            return nll + batch.shape[0] * regulariser(self.density.flow)


def fit_density(
    density: FlowDensity,
    train: torch.Tensor,
    test: torch.Tensor,
    *,
    max_seconds: float = 30.0,
    max_steps: int | None = None,
    eval_every: float = 5.0,
    batch_size: int = 256,
    lr: float = 5e-3,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    validation: torch.Tensor | None = None,
    restore_best: bool = True,
    patience: int | None = None,
    train_solver: dict[str, Any] | None = None,
    eval_solver: dict[str, Any] | None = None,
    engine: str = "torch",
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Maximum likelihood on minibatches of ``train`` with Adam until ``max_seconds`` of training
    (evaluations not counted) or ``max_steps`` steps, whichever comes first; the test NLL (and
    the validation NLL, given ``validation``) is measured every ``eval_every`` training seconds
    and at the end. Each epoch is a fresh shuffle; its last, incomplete batch is skipped.

    :param clip_norm: rescale the gradient of all parameters together to at most this
        Euclidean norm before each step (``None``: no clipping), the loop's one rule.
    :param validation: held-out points from the *training* data; with ``restore_best`` the
        density ends with the parameters of the evaluation with the lowest validation NLL, and
        :attr:`FitResult.test_nll` is the test NLL of that evaluation. The test set never
        chooses anything.
    :param patience: stop once this many evaluations in a row have not improved the validation
        NLL (needs ``validation``; ``None``: train the whole budget).
    :param train_solver: solver settings for continuous flows while training (e.g.
        ``{"method": "rk4", "step_size": 0.25}``); their own settings when ``None``.
    :param eval_solver: solver settings for the test NLL (:data:`EVAL_SOLVER` when ``None``).
    :param schedule: ``"cosine"`` (decay over the budget, by time or steps, whichever runs out
        first) or ``"constant"``.
    :param engine: ``"torch"`` (the NLL of the Pyro distribution, minimised directly) or
        ``"svi"`` (Pyro's :class:`~pyro.infer.Trace_ELBO` of :meth:`FlowDensity.model` with the
        empty guide, as a module).
    :raises FloatingPointError: when the training loss becomes NaN or infinite.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'torch' or 'svi', got {engine!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive or None, got {max_steps!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}")
    if patience is not None and (validation is None or patience <= 0):
        raise ValueError(
            f"patience must be a positive int and needs a validation set, got {patience!r}"
            + ("" if validation is not None else " without validation")
        )
    if engine == "svi" and _regularised(density):
        raise ValueError(
            "engine='svi' cannot add the CNF kinetic/Jacobian regularisers (Pyro scores the "
            "observed site after the model has run); use engine='torch' or weights of 0"
        )
    density.train()  # the loop seeds the RNGs with ``seed``
    inner = None
    if engine == "svi":
        pyro.clear_param_store()
        inner = elbo_module(pyro.infer.Trace_ELBO(), density)
    objective = _NegativeLogLikelihood(density, train_solver, inner)

    def lr_factor(step: int, seconds: float) -> float:
        fraction = seconds / max_seconds
        if max_steps is not None:
            fraction = max(fraction, step / max_steps)
        return _learning_rate_factor(schedule, fraction)

    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_index: int | None = None  # in result.history, of the lowest finite validation NLL
    evaluations_without_gain = 0
    next_eval = eval_every
    clock = {"steps": 0, "seconds": 0.0, "loss": math.nan}

    def evaluate() -> None:
        nonlocal best_state, best_index, evaluations_without_gain
        start = time.perf_counter()
        train_nfe = total_nfe(density)  # the last solve was the last training step's
        nll = test_nll(density, test, solver=eval_solver)
        nfe = total_nfe(density)  # of the test-set solve, before the validation one
        validation_nll = None
        if validation is not None:
            validation_nll = test_nll(density, validation, solver=eval_solver)
            # NaN never counts as an improvement; the first finite value always does.
            if math.isfinite(validation_nll) and (
                best_index is None or validation_nll < result.history[best_index].validation_nll
            ):
                best_index = len(result.history)
                evaluations_without_gain = 0
                if restore_best:
                    best_state = copy.deepcopy(density.state_dict())
            else:
                evaluations_without_gain += 1
        result.eval_time += time.perf_counter() - start
        result.history.append(HistoryPoint(clock["seconds"], clock["steps"], nll, clock["loss"],
                                           nfe, validation_nll, train_nfe))
        restored = restore_best and best_index is not None
        result.selected = best_index if restored else len(result.history) - 1
        density.train()

    def after_step(step: int, seconds: float, loss: torch.Tensor) -> bool:
        nonlocal next_eval
        clock.update(steps=step, seconds=seconds)
        if seconds < next_eval:
            return False
        clock["loss"] = float(loss)
        evaluate()
        next_eval = seconds + eval_every
        if patience is not None and evaluations_without_gain >= patience:
            result.stopped_early = True
            return True
        return False

    try:
        fitted = reraise_interrupt(fit(
            objective, density, (train,), epochs=None, batch_size=min(batch_size, len(train)),
            run_dir=None, optimizer=Optimizer(lr=lr, weight_decay=weight_decay,
                                              clip_norm=clip_norm, lr_factor=lr_factor),
            seed=seed, device=train.device, after_step=after_step, max_steps=max_steps,
            max_seconds=max_seconds, drop_last=True, progress=progress, log_every=1,
        ))
    except NonFiniteLossError as error:
        step = clock["steps"] + 1
        raise FloatingPointError(f"training loss became {error.value} at step {step}; lower the "
                                 f"learning rate (lr={lr})") from None
    result.steps, result.wall_time = fitted.steps, fitted.train_seconds
    clock.update(steps=fitted.steps, seconds=fitted.train_seconds)
    if not result.history or result.history[-1].step != result.steps:
        evaluate()
    if best_state is not None and result.selected != len(result.history) - 1:
        density.load_state_dict(best_state)
    density.eval()
    return result
