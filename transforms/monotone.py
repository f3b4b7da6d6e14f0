r"""Inverting increasing scalar maps: a bracketed Newton solver, run elementwise without autograd,
and the one differentiable Newton step from its root that gives the implicit-function gradient.

The flows whose coordinates are monotone maps without a closed-form inverse (NAF, BNAF, the
sum-of-squares polynomial flow) invert in their autoregressive order: coordinate :math:`i` solves
:math:`g_i(t) = y_i` given the coordinates before it. :func:`solve_increasing` finds :math:`t` in a
bracket :math:`[l, u]` with :math:`g(l) \le y \le g(u)` by ``rtsafe``: a Newton step when it stays
inside the shrinking bracket and at least halves the previous step, bisection otherwise, so it
converges from any start, quadratically near a simple root, to :data:`CONVERGED_ULPS` ulps of
the root or of the value.
:func:`implicit_step` then takes one Newton step with autograd on, whose value is the root again
and whose derivative is :math:`\partial t/\partial\theta = -(\partial g/\partial\theta)/g'(t)`,
without differentiating through the iterations (as :mod:`transforms.planar` does).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.distributions import Transform, constraints

from .autoregressive import solve_in_order

__all__ = [
    "CONVERGED_ULPS",
    "bracket_limit",
    "solve_increasing",
    "implicit_step",
    "MonotoneAutoregressive",
]

# A step (or bracket) within this many ulps of 1 + |t| counts as converged: the inverse is then
# exact to that relative tolerance (4 ulps: 9e-16 in float64, 5e-7 in float32).
CONVERGED_ULPS = 4.0

# Solver steps at most: bisection alone halves a bracket of 2 / eps (see bracket_limit) to 4 ulps
# in 2 log2(1 / eps) - 1 steps, 103 in float64 and 45 in float32; Newton takes over near the
# root, so most elements stop after a few steps.
_MAX_STEPS = {torch.float16: 32, torch.bfloat16: 32, torch.float32: 64, torch.float64: 128}

# Under torch.jit.trace no step can stop early, and the trace's size (its compile time, ~0.5 s a
# step for a 2-D NAF under JitTrace_ELBO) grows with every step: there the bracket is cut into
# _TRACED_CUTS pieces per round, all evaluated at once (8 bits a round), for the 46 (float32) or
# 104 (float64) bits from the widest bracket to 4 ulps, then _TRACED_NEWTON Newton steps polish.
_TRACED_CUTS = 256
_TRACED_ROUNDS = {torch.float16: 3, torch.bfloat16: 3, torch.float32: 6, torch.float64: 13}
_TRACED_NEWTON = 2

ValueAndSlope = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def bracket_limit(dtype: torch.dtype) -> float:
    """``1 / eps`` of ``dtype``: brackets are clipped to ``[-limit, limit]``, far beyond where
    any input of a flow lies (1.7e7 in float32, 4.5e15 in float64), so that their midpoints and
    the maps' arguments stay finite."""
    return 1.0 / torch.finfo(dtype).eps


def solve_increasing(
    func: ValueAndSlope,
    target: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    max_steps: int | None = None,
) -> torch.Tensor:
    r"""The root :math:`t` of :math:`g(t) = y` (``target``), elementwise, for an increasing
    :math:`g` given as ``func(t) -> (g(t), g'(t))`` and a bracket with
    :math:`g(l) \le y \le g(u)`, starting from its midpoint. Runs without autograd; see :func:`implicit_step` for gradients.
    Eagerly it stops once every element has converged (at most ``max_steps`` steps, by default
    :data:`_MAX_STEPS` of the dtype); under :func:`torch.jit.trace` it runs the fixed schedule of
    :func:`_solve_traced`. ``func`` must broadcast over a leading dim of ``t`` (the traced
    schedule evaluates many points at once)."""
    with torch.no_grad():
        target, lower, upper = torch.broadcast_tensors(target, lower, upper)
        limit = bracket_limit(target.dtype)
        lower, upper = lower.clamp(-limit, limit), upper.clamp(-limit, limit)
        if torch.jit.is_tracing():
            return _solve_traced(func, target, lower, upper)
        tolerance = CONVERGED_ULPS * torch.finfo(target.dtype).eps
        root = 0.5 * (lower + upper)
        previous_step = upper - lower
        steps = _MAX_STEPS.get(target.dtype, 128) if max_steps is None else max_steps
        for _ in range(steps):
            value, slope = func(root)
            residual = value - target
            lower = torch.where(residual < 0, root, lower)
            upper = torch.where(residual > 0, root, upper)
            step = residual / slope
            newton = root - step
            scale = tolerance * (1.0 + root.abs())
            # converged: the step, or the bracket, is at the root's rounding level, or the
            # residual at the value's (where g' < 1 a step can stay above the first for ever)
            converged = (
                (step.abs() <= scale)
                | (upper - lower <= scale)
                | (residual.abs() <= tolerance * (1.0 + value.abs()))
            )
            # A step at rounding level is always taken (refusing it would restart bisection from
            # a bracket end); a non-finite one (a zero slope) never is.
            use_newton = torch.isfinite(newton) & (
                converged
                | ((newton >= lower) & (newton <= upper) & (2.0 * step.abs() <= previous_step.abs()))
            )
            new_root = torch.where(use_newton, newton, 0.5 * (lower + upper))
            new_root = torch.where(residual == 0, root, new_root)
            previous_step = new_root - root
            root = new_root
            if bool(converged.all()):
                break
        return root


def _solve_traced(
    func: ValueAndSlope, target: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> torch.Tensor:
    """The same root by a schedule with no data-dependent exit: rounds of multisection (the
    bracket cut into :data:`_TRACED_CUTS` pieces, the one holding the root kept), then Newton
    steps kept inside the final bracket."""
    cuts = _TRACED_CUTS
    fractions = torch.arange(1, cuts, dtype=target.dtype, device=target.device) / cuts
    fractions = fractions.reshape((cuts - 1,) + (1,) * target.dim())
    for _ in range(_TRACED_ROUNDS.get(target.dtype, 18)):
        width = upper - lower
        below = (func(lower + width * fractions)[0] < target).sum(0)
        lower, upper = lower + width * (below / cuts), lower + width * ((below + 1) / cuts)
    root = 0.5 * (lower + upper)
    for _ in range(_TRACED_NEWTON):
        value, slope = func(root)
        newton = root - (value - target) / slope
        root = torch.where(torch.isfinite(newton), newton, root).clamp(min=lower, max=upper)
    return root


def implicit_step(
    root: torch.Tensor, target: torch.Tensor, value: torch.Tensor, log_slope: torch.Tensor
) -> torch.Tensor:
    r"""One Newton step :math:`t - (g(t) - y) / g'(t)` from a converged, detached ``root``, with
    ``value`` :math:`= g(t)` and ``log_slope`` :math:`= \log g'(t)` computed with autograd on:
    the value is the root (polished once more), the derivative the implicit-function one."""
    return root.detach() - (value - target) * torch.exp(-log_slope)


Params = Tuple[torch.Tensor, ...]


class MonotoneAutoregressive(Transform):
    r"""What NAF and the polynomial flow share: :math:`y_i = g(x_i; \theta_i(\mathbf{x}_{<i}))`
    for a transformer :math:`g` increasing in :math:`x_i` and onto :math:`\mathbb{R}`, with
    :math:`\log|\det J| = \sum_i \log g'(x_i; \theta_i)`; the inverse solves
    :math:`g(t; \theta_i) = y_i` coordinate by coordinate in the identity order
    (:func:`solve_increasing`, then :func:`implicit_step` for the gradients).

    Subclasses give :meth:`_params` (the parameters of every coordinate at a network input),
    :meth:`_coordinate` (those of coordinate ``i``), :meth:`_transformer` (``(g, log g')``,
    elementwise, for either) and :meth:`_bracket` (an interval holding the root).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = True
    volume_preserving = False

    def __init__(self) -> None:
        super().__init__(cache_size=1)
        # (x, per-coordinate log-derivatives at x) of the last forward or inverse call
        self._last: Tuple[torch.Tensor, torch.Tensor] | None = None

    def _params(self, net_input: torch.Tensor) -> Params:
        raise NotImplementedError

    def _coordinate(self, params: Params, index: int) -> Params:
        raise NotImplementedError

    def _transformer(self, t: torch.Tensor, *params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _bracket(self, target: torch.Tensor, *params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _value_and_slope(self, params: Params) -> ValueAndSlope:
        def value_and_slope(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            value, log_slope = self._transformer(t, *params)
            return value, torch.exp(log_slope)

        return value_and_slope

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, log_slope = self._transformer(x, *self._params(x))
        self._last = (x, log_slope)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_slopes = []

        def update(solution: torch.Tensor, index: int) -> torch.Tensor:
            params = self._coordinate(self._params(solution), index)
            target = y[..., index]
            # detached as well as without grad: torch.jit.trace records no grad mode, and a
            # traced solve would otherwise be differentiated (0 * inf = NaN in its bracket)
            constants = tuple(p.detach() for p in params)
            with torch.no_grad():
                lower, upper = self._bracket(target.detach(), *constants)
                root = solve_increasing(self._value_and_slope(constants), target.detach(), lower, upper)
            x_i = implicit_step(root, target, *self._transformer(root, *params))
            log_slopes.append(self._transformer(x_i, *params)[1])
            return x_i

        x = solve_in_order(y, update)
        self._last = (x, torch.stack(torch.broadcast_tensors(*log_slopes), dim=-1))
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """From ``x``: the last call's log-derivatives when it produced or read this very
        ``x``, one network call otherwise (never from ``y``)."""
        if self._last is not None and self._last[0] is x:
            return self._last[1].sum(-1)
        return self._transformer(x, *self._params(x))[1].sum(-1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_last"] = None  # tensors of one autograd graph, not state
        return state
