r"""The solvers behind the inverse of the convolution planar flow over time
(:mod:`transforms.conv_planar`): the preactivations :math:`a` of the inverse solve

.. math::

    a_t + \sum_j G_{tj}\tanh(a_{t-j}) = r_t,

lower triangular in time for the causal filter (a monotone scalar equation per step given the
past: Newton's method on the whole sequence at once, each step one banded triangular solve,
dense for short sequences and by blocks for long ones, with a step-by-step fallback that always
converges) and banded for the centred one (Newton's method with dense solves). Kept apart from
the transform so that its file reads as the paper's equations; every function here is a pure
tensor function, run without autograd (the transform adds the implicit-function step).

References:
[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. arXiv:1505.05770
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .planar import _sech_sq, solve_planar_equation

__all__ = ["solve_causal_preactivations", "solve_centred_preactivations"]

# Parallel Newton over the whole sequence reaches rounding level in 1-2 steps from the
# elementwise start (3-4 from a = 0) for initial and randomly moved parameters alike; a sequence
# still short of machine precision after this many is handed to the sequential solver, which
# always converges.
_MAX_PARALLEL_NEWTON = 30
# A residual of a_t + sum_j G_tj tanh(a_{t-j}) - r_t within this many ulps of the size of its
# terms is where one more Newton step has always ended (measured: 0.15-0.7 ulps): the root is
# found, stop without that step. Looser (4 ulps) measurably costs round-trip accuracy in float32.
_ROUNDING_ULPS = 1.0
# Sweeps of the elementwise start (see _planar_start): each cuts the error ~10x; after 3 one
# Newton step reaches float32 rounding and two float64 (from a = 0: three and four).
_START_SWEEPS = 3
# Within this many ulps Newton is converging (the rounding-level test may be out of reach for a
# few elements): one last step, then stop.
_RESIDUAL_ULPS = 16.0


# ---- lag structure of the filter ----------------------------------------------------------------


def _lagged(values: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``out[..., t, j] = values[..., t - j]`` (0 before the start), for ``values`` (..., T)."""
    padded = F.pad(values, (kernel_size - 1, 0))
    return padded.unfold(-1, kernel_size, 1).flip(-1)


def _shifted(values: torch.Tensor, lag: int) -> torch.Tensor:
    """``out[..., t] = values[..., t - lag]`` (0 for t < lag), for ``values`` (..., T)."""
    steps = values.size(-1)
    return F.pad(values[..., : max(steps - lag, 0)], (min(lag, steps), 0))


def _shift_lag_columns(coefficients: torch.Tensor) -> torch.Tensor:
    """``out[..., t, j] = coefficients[..., t - j, j]`` (0 for t < j): the coefficient with which
    step t - j enters the equation of step t, for ``coefficients`` (..., T, k)."""
    steps, kernel_size = coefficients.shape[-2:]
    columns = [
        F.pad(coefficients[..., : max(steps - j, 0), j], (min(j, steps), 0))
        for j in range(kernel_size)
    ]
    return torch.stack(columns, dim=-1)


# ---- the causal inverse: a scalar recurrence for the preactivations ----------------------------

# Below this many matrix entries (N * T * T) each Newton system is solved as one dense
# triangular matrix (one LAPACK call, fewest tensor ops: what matters for short sequences);
# above it by the blocked recurrence (work and memory linear in T). Measured on CPU for the
# whole inverse (N = 16, 40, 256): dense is faster up to ~2^21 entries (T ~ 360 for N = 16),
# the two are even there, and blocked wins by far beyond (25x at N = 16, T = 1000).
_DENSE_SOLVE_MAX_ENTRIES = 1 << 21


class _Blocks:
    r"""The inverse's working layout: a sequence of T steps cut into ``blocks`` blocks of
    ``block`` steps (zero-padded at the end), stored step-major as (block, N, blocks), so that
    step b of every block of every sequence is one contiguous row. The blocked recurrence reads
    those rows one by one; elementwise Newton arithmetic does not care about the layout, so
    the whole solve stays in it (the transposes in and out are paid once, not per step).
    ``blocks == 1`` (short sequences) is the dense-solve layout."""

    def __init__(self, count: int, steps: int, order: int) -> None:
        self.count, self.steps, self.order = count, steps, order
        if order == 0 or count * steps * steps <= _DENSE_SOLVE_MAX_ENTRIES:
            self.block = steps
        else:
            # m ops per step of a block, one per block: ~2 sqrt(mT) sequential ops in all
            self.block = max(order, math.ceil(math.sqrt(steps / order)))
        self.blocks = -(-steps // self.block)

    def split(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(N or 1, T) -> (block, N or 1, blocks); padded steps get ``fill``."""
        pad = self.blocks * self.block - self.steps
        padded = F.pad(values, (0, pad), value=fill) if pad else values
        return padded.reshape(-1, self.blocks, self.block).permute(2, 0, 1).contiguous()

    def merge(self, values: torch.Tensor) -> torch.Tensor:
        """(block, N, blocks) -> (N, T)."""
        natural = values.permute(1, 2, 0).reshape(values.size(1), -1)
        return natural[:, : self.steps]

    def add_lagged(
        self,
        out: torch.Tensor,
        coefficient: torch.Tensor,
        values: torch.Tensor,
        lag: int,
        value: float = 1.0,
    ) -> torch.Tensor:
        """``out += value * coefficient * (values at step t - lag)`` (0 before the start), in
        place, without materialising the shifted copy: rows b >= lag of a block read the same
        block, rows b < lag the end of the block before."""
        block = values.size(0)
        if lag < block:
            out[lag:].addcmul_(coefficient[lag:], values[: block - lag], value=value)
        if self.blocks > 1:  # then block >= lag; the first block has nothing before it
            before = values[block - lag :, :, :-1]
            out[:lag, :, 1:].addcmul_(coefficient[:lag, :, 1:], before, value=value)
        return out


def _blocked_recurrence(forcing: torch.Tensor, feedback: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""All :math:`x_t = f_t + \sum_{j=1}^{m} \phi_{tj}\, x_{t-j}` (zero before the start), for
    ``forcing`` f and ``feedback[j - 1]`` :math:`\phi_{\cdot j}` in the :class:`_Blocks` layout
    (block B, N, blocks :math:`n_b`; feedback zero before the start).

    One sweep over the B steps of every block at once gives each block's solution from a zero
    incoming state and its responses to each of the m incoming lag values (m + 1 columns, m
    tensor ops per step). The lag values entering block i + 1 are then
    :math:`s_{i+1} = P_i + H_i s_i` (:math:`P_i`, :math:`H_i` the solution and responses at the
    end of block i), a unit block-bidiagonal triangular system solved in one LAPACK call (or
    block by block when it would be large); the incoming values are added in through the
    responses. :math:`O(TmN)` work in about :math:`m\sqrt{T/m}` sequential tensor ops
    (B ~ :math:`\sqrt{T/m}`): far fewer than a sequential pass's T steps, and than a parallel
    scan's :math:`\lceil\log_2 T\rceil` levels of ~:math:`m^3` elementwise ops each (the scan
    this replaced: 3-4x slower at T = 1000). The responses stay bounded: under
    :class:`ConvPlanar`'s constraint the Jacobians are column diagonally dominant.
    Differentiable in the forcing (the feedback, a Jacobian, is taken as constant)."""
    block, count, blocks = forcing.shape
    order = len(feedback)
    lanes = count * blocks  # one lane per (sequence, block)
    # Column 0 of the state is the block's solution from a zero incoming state (forcing in),
    # column j its response to a unit x_{-j} (forcing 0). Without autograd each step's state
    # overwrites its row of the drive in place (no allocation per step, no final stack).
    sweep = F.pad(forcing.reshape(block, 1, lanes), (0, 0, 0, order))  # (B, m + 1, lanes)
    in_place = not torch.is_grad_enabled() or not (
        sweep.requires_grad or any(phi.requires_grad for phi in feedback)
    )
    rows = sweep.unbind(0)
    gains = [phi.reshape(block, 1, lanes).unbind(0) for phi in feedback]
    units = torch.eye(order + 1, dtype=forcing.dtype, device=forcing.device)[1:]
    history = list(units.unsqueeze(-1).expand(order, order + 1, lanes).unbind(0))[::-1]
    for t in range(block):
        if in_place:
            state = rows[t].addcmul_(gains[0][t], history[-1])
        else:
            state = torch.addcmul(rows[t], gains[0][t], history[-1])
        for j in range(1, order):
            state = state.addcmul_(gains[j][t], history[-1 - j])
        history.append(state)
    if not in_place:
        sweep = torch.stack(history[order:])
    # Lag values leaving block i, (x_end, ..., x_end-m+1) = P_i + H_i (lag values entering it).
    tails = torch.stack(history[-1 : -order - 1 : -1]).reshape(order, order + 1, count, blocks)
    tails = tails.permute(2, 3, 0, 1)  # (N, blocks, m, m + 1)
    particular, response = tails[:, :-1, :, :1], tails[:, 1:-1, :, 1:].detach()
    unknowns = (blocks - 1) * order
    if count * unknowns * unknowns <= _DENSE_SOLVE_MAX_ENTRIES:
        # s_{i+1} - H_i s_i = P_i (s_0 = 0), i < blocks - 1: a unit block-bidiagonal
        # triangular system, one LAPACK call (the H_i depend on the feedback only, so carry
        # no gradient).
        coupling = forcing.new_zeros(count, blocks - 1, order, blocks - 1, order)
        coupling.diagonal(offset=-1, dim1=1, dim2=3).copy_(response.permute(0, 2, 3, 1).neg())
        incoming = torch.linalg.solve_triangular(
            coupling.reshape(count, unknowns, unknowns),
            particular.reshape(count, unknowns, 1),
            upper=False,
            unitriangular=True,
        ).reshape(count, blocks - 1, order)
    else:  # block by block, one batched m x m matrix-vector product each
        incoming_lags = [particular[:, 0]]
        for i in range(1, blocks - 1):
            incoming_lags.append(
                torch.baddbmm(particular[:, i], response[:, i - 1], incoming_lags[-1])
            )
        incoming = torch.stack(incoming_lags, 1).squeeze(-1)
    incoming = F.pad(incoming, (0, 0, 1, 0)).transpose(1, 2)  # (N, m, blocks); s_0 = 0
    solution = sweep[:, 0].reshape(block, count, blocks)
    for j in range(order):
        solution = torch.addcmul(
            solution, sweep[:, j + 1].reshape(block, count, blocks), incoming[:, j]
        )
    return solution


def _solve_blocks(
    diag: torch.Tensor,
    sub: Sequence[torch.Tensor],
    rhs: torch.Tensor,
    matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Solve :math:`J\delta = \mathrm{rhs}` for a lower-triangular banded :math:`J` with
    ``J[t, t] = diag[t]`` and ``J[t, t-j] = sub[j-1][t]`` (zero where t < j), all in the
    :class:`_Blocks` layout (coefficients may be shared by the N sequences): the linear
    recurrence :math:`\delta_t = (\mathrm{rhs}_t - \sum_j J_{t,t-j}\delta_{t-j}) / J_{tt}`.
    One block: a dense triangular solve (in ``matrix`` (N, T, T), zero off the band, when
    given: a workspace reused across Newton steps); several: :func:`_blocked_recurrence`.
    Differentiable in ``rhs`` (it also serves the implicit-function step)."""
    steps, count, blocks = rhs.shape
    if not sub or steps == 1:
        return rhs / diag
    if blocks > 1:
        inverse_diag = diag.reciprocal()
        feedback = [(s * inverse_diag).neg_().expand_as(rhs) for s in sub]
        return _blocked_recurrence(rhs * inverse_diag, feedback)
    natural = lambda v: v.squeeze(-1).T  # noqa: E731  (T, N, 1) -> (N, T) view
    if matrix is None:
        matrix = rhs.new_zeros(count, steps, steps)
    with torch.no_grad():  # J carries no gradient: only rhs does
        matrix.diagonal(dim1=-2, dim2=-1).copy_(natural(diag))
        for j in range(1, min(len(sub), steps - 1) + 1):
            matrix.diagonal(offset=-j, dim1=-2, dim2=-1).copy_(natural(sub[j - 1])[:, j:])
    solution = torch.linalg.solve_triangular(matrix, natural(rhs).unsqueeze(-1), upper=False)
    return solution.squeeze(-1).T.unsqueeze(-1)


def _solve_lower_banded(
    diag: torch.Tensor, sub: Sequence[torch.Tensor], rhs: torch.Tensor
) -> torch.Tensor:
    """:func:`_solve_blocks` for tensors in the natural layout: ``rhs`` (N, T), ``diag`` and
    each ``sub[j-1]`` (N or 1, T)."""
    layout = _Blocks(rhs.size(0), rhs.size(-1), len(sub))
    solution = _solve_blocks(
        layout.split(diag, fill=1.0), [layout.split(s) for s in sub], layout.split(rhs)
    )
    return layout.merge(solution)


def _residual(
    a: torch.Tensor, target: torch.Tensor, lag_coefficients: torch.Tensor
) -> torch.Tensor:
    r""":math:`a_t + \sum_j G_{tj}\tanh(a_{t-j}) - r_t`, zero at the preactivations of the
    inverse."""
    lagged_tanh = _lagged(torch.tanh(a), lag_coefficients.size(-1))
    return a + (lag_coefficients * lagged_tanh).sum(-1) - target


def _solve_sequential(
    target: torch.Tensor, lag_coefficients: torch.Tensor, one_plus_c: torch.Tensor
) -> torch.Tensor:
    """Forward in t, each step planar's monotone scalar equation (always converges); vectorised
    over the batch, T Python steps."""
    kernel_size = lag_coefficients.size(-1)
    lag_coefficients = lag_coefficients.expand(*target.shape, kernel_size)
    one_plus_c = one_plus_c.expand_as(target)
    history: list[torch.Tensor] = []
    for t in range(target.size(-1)):
        shifted = target[..., t]
        for j in range(1, min(t, kernel_size - 1) + 1):
            shifted = shifted - lag_coefficients[..., t, j] * torch.tanh(history[t - j])
        history.append(solve_planar_equation(shifted, one_plus_c[..., t]))
    return torch.stack(history, dim=-1)


def _planar_start(
    target: torch.Tensor, lags: Sequence[torch.Tensor], one_plus_c: torch.Tensor, layout: _Blocks
) -> torch.Tensor:
    r"""A start for Newton's method on :math:`a_t + c_t\tanh a_t + \sum_{j \ge 1} G_{tj}
    \tanh a_{t-j} = r_t` from elementwise ops only (no solve): ``_START_SWEEPS`` sweeps, each
    taking the lag terms from the previous sweep (none in the first) and answering every
    step's scalar planar equation :math:`a + c\tanh a = s` with :math:`a = s - c\tanh(s/(1 +
    c))`, the linearised root :math:`s/(1 + c)` for small :math:`s` and the saturated one
    :math:`s - c\,\mathrm{sign}(s)` for large (planar's two starts in one formula). The lag
    terms are the contraction of :class:`ConvPlanar`'s constraint, so each sweep cuts the
    error about tenfold: measured, 3 sweeps leave one Newton step to float32 rounding, where
    starting from :math:`a = 0` (the linearised system) takes three."""
    c = one_plus_c - 1.0
    shifted = target
    for sweep in range(_START_SWEEPS):
        a = shifted - c * torch.tanh(shifted / one_plus_c)
        if sweep + 1 < _START_SWEEPS:
            tanh = torch.tanh(a)
            shifted = target.clone()
            for j, g in enumerate(lags, 1):
                layout.add_lagged(shifted, g, tanh, j, value=-1.0)
    return a


def solve_causal_preactivations(
    target: torch.Tensor, lag_coefficients: torch.Tensor, one_plus_c: torch.Tensor
) -> torch.Tensor:
    r"""The preactivations :math:`a` of the inverse of a causal convolution planar layer: the root
    of :math:`a_t + \sum_{j=0}^{k-1} G_{tj}\tanh(a_{t-j}) = r_t` with :math:`G_{tj} =
    \mathbf{w}_j^T\hat{\mathbf{u}}_{t-j}` (``lag_coefficients`` (N, T, k)),
    :math:`1 + G_{t0} > 0` (``one_plus_c`` (N, T)) and :math:`r = b + W\mathbf{y}` (``target``
    (N, T)); the coefficients may also be shared by all N sequences (leading size 1). Runs
    without autograd.

    The system is lower triangular with a monotone scalar equation on its diagonal, so it has
    one root, reachable forward in t. Eagerly, Newton's method runs on the whole sequence at
    once, each step one banded triangular solve (:func:`_solve_blocks`: dense for short
    sequences, blocked otherwise), from an elementwise start (:func:`_planar_start`) that
    leaves 1 step in float32 and 2 in float64 (measured). It stops as soon as every residual
    is at rounding level (no step after that: the residual test's tanh is reused for the
    output), takes one last step when they are within ``_RESIDUAL_ULPS`` of it, and hands any
    sequence still short after ``_MAX_PARALLEL_NEWTON`` steps to the sequential solver; under
    :func:`torch.jit.trace` only the sequential solver runs (fixed iteration counts, no
    data-dependent exits).
    """
    return _solve_causal(target, lag_coefficients, one_plus_c)[0]


def _solve_causal(
    target: torch.Tensor, lag_coefficients: torch.Tensor, one_plus_c: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`solve_causal_preactivations`, and tanh of the root when the last residual test
    computed it (the inverse reuses it: on CPU, tanh of a long sequence costs as much as a
    Newton step's elementwise work)."""
    with torch.no_grad():
        if torch.jit.is_tracing():
            return _solve_sequential(target, lag_coefficients, one_plus_c), None
        kernel_size = lag_coefficients.size(-1)
        layout = _Blocks(target.size(0), target.size(-1), kernel_size - 1)
        # Padded steps: r = 0, G = 0, 1 + c = 1, so a = 0 there, and causality keeps them out
        # of the real steps.
        r = layout.split(target)
        current = layout.split(lag_coefficients[..., 0])
        lags = [layout.split(lag_coefficients[..., j]) for j in range(1, kernel_size)]
        one_plus_c_b = layout.split(one_plus_c, fill=1.0)
        matrix = r.new_zeros(r.size(1), r.size(0), r.size(0)) if layout.blocks == 1 else None
        ulp = torch.finfo(target.dtype).eps
        spread = sum((g.abs() for g in lags), current.abs())
        # |a_t - r_t| <= sum_j |G_tj| since |tanh| <= 1: a box that holds the root.
        lower, upper = r - spread, r + spread
        size = r.abs().add_(spread).add_(1.0)  # of the residual's terms, |a| added per step
        a = _planar_start(r, lags, one_plus_c_b, layout)
        a = torch.minimum(torch.maximum(a, lower), upper)
        worst = math.inf
        for _ in range(_MAX_PARALLEL_NEWTON):
            tanh = torch.tanh(a)
            residual = (a - r).addcmul_(current, tanh)
            for j, g in enumerate(lags, 1):
                layout.add_lagged(residual, g, tanh, j)
            worst = (residual.abs() / (size + a.abs())).amax().item()
            if math.isnan(worst):
                break  # e.g. 1 + c rounded to 0: the sequential solver copes, Newton cannot
            if worst <= _ROUNDING_ULPS * ulp:  # at rounding level: another step adds noise
                return layout.merge(a), layout.merge(tanh)
            # h' = 1 - tanh^2 (its relative precision in saturation does not matter: the
            # Jacobian only sets the step); J_tt = tanh^2 + (1 + c) h', two terms >= 0.
            tanh_sq = tanh.square_()
            slope = 1.0 - tanh_sq
            diag = tanh_sq.addcmul_(one_plus_c_b, slope)
            sub = [
                layout.add_lagged(torch.zeros_like(slope), g, slope, j)
                for j, g in enumerate(lags, 1)
            ]
            a = a - _solve_blocks(diag, sub, residual, matrix)
            a = torch.minimum(torch.maximum(a, lower), upper)
            if worst <= _RESIDUAL_ULPS * ulp:
                break  # within a few ulps: quadratic convergence takes this step to rounding
        a = layout.merge(a)
        if not worst <= _RESIDUAL_ULPS * ulp:  # also NaN
            converged = (
                _residual(a, target, lag_coefficients).abs()
                <= _RESIDUAL_ULPS * ulp * (layout.merge(size) + a.abs())
            ).all(-1)
            stragglers = ~converged
            a = a.clone()
            a[stragglers] = _solve_sequential(
                target[stragglers],
                lag_coefficients.expand(*target.shape, kernel_size)[stragglers],
                one_plus_c.expand_as(target)[stragglers],
            )
        return a, None


def _centred_matrix(taps: torch.Tensor) -> torch.Tensor:
    r"""Dense :math:`M = W\hat U` (..., T, T), ``M[t, s] = w_{t-s} . u_hat_s`` for a centred
    filter, from ``taps`` (..., T, k) = ``w_j . u_hat_s`` (row j is lag j - p)."""
    steps, kernel_size = taps.shape[-2:]
    half = (kernel_size - 1) // 2
    matrix = taps.new_zeros(*taps.shape[:-2], steps, steps)
    for row in range(kernel_size):
        lag = row - half
        length = steps - abs(lag)
        if length <= 0:
            continue
        cols = slice(max(-lag, 0), max(-lag, 0) + length)  # s = t - lag
        matrix = matrix + torch.diag_embed(taps[..., cols, row], offset=-lag)
    return matrix


def _centred_newton_step(a: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor):
    """Residual of :math:`a + M\tanh(a) = r` and the Newton step (dense solve; J carries no
    gradient, the residual does)."""
    residual = a + (matrix @ torch.tanh(a).unsqueeze(-1)).squeeze(-1) - target
    with torch.no_grad():
        jacobian = matrix * _sech_sq(a).unsqueeze(-2) + torch.eye(
            a.size(-1), dtype=a.dtype, device=a.device)
    step = torch.linalg.solve(jacobian, -residual.unsqueeze(-1)).squeeze(-1)
    return residual, step


def solve_centred_preactivations(target: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    r"""The preactivations of the inverse of a centred layer: the root of :math:`a + M	anh(a) =
    r` (``target`` (N, T), ``matrix`` M (N, T, T)), by Newton's method with dense solves
    (:math:`O(T^3)`). The root is unique (the map is a bijection, see :class:`ConvPlanar`) and
    every Jacobian :math:`I + M D` is non-singular, but Newton's convergence from any start is
    not proven: a sequence not at machine precision after ``_MAX_PARALLEL_NEWTON`` steps raises
    (never a silent wrong answer). Under tracing a fixed number of steps runs."""
    with torch.no_grad():
        ulp = torch.finfo(target.dtype).eps
        spread = matrix.abs().sum(-1)
        lower, upper = target - spread, target + spread
        a = torch.zeros_like(target)
        converged = torch.zeros(target.shape[:-1], dtype=torch.bool, device=target.device)
        tracing = torch.jit.is_tracing()
        for _ in range(_MAX_PARALLEL_NEWTON):
            residual, step = _centred_newton_step(a, target, matrix)
            size = 1.0 + target.abs() + a.abs() + spread
            converged = (residual.abs() <= _RESIDUAL_ULPS * ulp * size).all(-1)
            a = torch.minimum(torch.maximum(a + step, lower), upper)
            if not tracing and bool(converged.all()):
                break
        if not tracing and not bool(converged.all()):
            raise RuntimeError(
                f"centred convolution planar inverse: Newton did not converge for "
                f"{int((~converged).sum())} sequence(s) in {_MAX_PARALLEL_NEWTON} steps"
            )
        return a
