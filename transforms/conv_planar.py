r"""Convolution planar flows over time: a planar flow whose hyperplane term is a 1-D convolution
of the whole latent sequence (the flow over time of the STORN thesis, made to work).

For :math:`\mathbf{z} = (\mathbf{z}_1, \dots, \mathbf{z}_T)`, :math:`\mathbf{z}_t \in
\mathbb{R}^Z`, one layer maps

.. math::

    a_t = b_t + \sum_j \mathbf{w}_j^T \mathbf{z}_{t-j}, \qquad
    \mathbf{f}(\mathbf{z})_t = \mathbf{z}_t + \hat{\mathbf{u}}_t\, h(a_t), \qquad h = \tanh,

with a filter of width :math:`k` over time that mixes all :math:`Z` dims (zero padding at the
ends). Its Jacobian is :math:`I + \hat U\,\mathrm{diag}(h'(a))\,W` with :math:`W` the banded
Toeplitz matrix of the filter, so by Sylvester's identity
:math:`\det J = \det(I_T + \mathrm{diag}(h'(a))\, W \hat U)`, a banded :math:`T \times T`
matrix with entries :math:`\delta_{ts} + h'(a_t)\,\mathbf{w}_{t-s}^T\hat{\mathbf{u}}_s`.

- Causal filter (:math:`j = 0..k-1`, the default, registered as ``conv_planar``): that matrix
  is lower triangular, :math:`\log|\det J| = \sum_t \log(1 + h'(a_t)\,
  \mathbf{w}_0^T\hat{\mathbf{u}}_t)`, and the inverse is exact.
- Centred filter (:math:`j = -p..p`, :math:`k = 2p + 1`, registered as
  ``conv_planar_centered``): exact log-determinant from the :math:`T \times T` matrix, a
  bijection by construction; its inverse is a Newton solve without a convergence proof
  (``exact_inverse=False``).

Both constrain :math:`\hat{\mathbf{u}}_t` so that the current-step tap dominates the others
(see :class:`ConvPlanar`): that keeps the inverse well conditioned for any T.

The thesis's attempt failed for reasons its code shows (dense Jacobian by one gradient call per
entry, ``det`` without ``abs``, layers never composed, the untransformed ``z`` returned); here the
log-determinant is computed in closed form from the same preactivations that move ``z``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .conv_planar_solvers import (
    _centred_matrix,
    _centred_newton_step,
    _residual,
    _shift_lag_columns,
    _shifted,
    _solve_causal,
    _solve_lower_banded,
    solve_causal_preactivations,
    solve_centred_preactivations,
)
from .hypernet import context_hypernet
from .planar import _log_slope, _sech_sq, _slope
from .registry import check_positive_int, register

__all__ = [
    "ConditionedConvPlanar",
    "ConvPlanar",
    "ConditionalConvPlanar",
    "conv_planar",
    "conditional_conv_planar",
    "conv_planar_centered",
    "conditional_conv_planar_centered",
    "solve_causal_preactivations",
    "solve_centred_preactivations",
]

# (w, u, b): filter taps (k, Z); u (Z,) shared or (..., T, Z) per step; b (1,) or (..., T).
ConvPlanarParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# ---- the filter ----------------------------------------------------------------------------------


def _padding(kernel_size: int, causal: bool) -> Tuple[int, int]:
    """Zeros put before / after the sequence so that output step t sees its taps."""
    if causal:
        return kernel_size - 1, 0
    half = (kernel_size - 1) // 2
    return half, half


def _filter(x: torch.Tensor, w: torch.Tensor, causal: bool) -> torch.Tensor:
    r""":math:`\sum_j \mathbf{w}_j^T \mathbf{x}_{t-j}` for ``x`` (..., T, Z), taps ``w`` (k, Z)
    (row j is lag j for the causal filter, lag j - p for the centred one). One einsum over a
    strided window view, so any leading dims and any T (also T < k) work without reshapes."""
    before, after = _padding(w.size(0), causal)
    padded = F.pad(x, (0, 0, before, after))
    windows = padded.unfold(-2, w.size(0), 1)  # (..., T, Z, k), window index = increasing time
    # window index i is time t - before + i, i.e. lag before - i: tap row k - 1 - i either way
    return torch.einsum("...tzk,kz->...t", windows, w.flip(0))


# ---- the transform ------------------------------------------------------------------------------


class ConditionedConvPlanar(Transform):
    r"""The convolution planar map over time for given parameters ``(w, u, b)`` (a tuple of
    tensors, or a callable returning one): filter taps ``w`` (k, Z); ``u`` (Z,) shared by every
    step or (..., T, Z) per step; ``b`` (1,) shared or (..., T) per step. Acts on ``x``
    (..., T, Z), any T >= 1; parameter leading dims broadcast against the input's batch dims.

    A callable is evaluated at each call (forward, inverse, log-det; the log-det that follows a
    forward or inverse call on the same point reuses that call's evaluation), so a transform
    conditioned on a context is a function of the module's current parameters: it follows
    optimiser steps and can be differentiated any number of times.

    ``mask`` (..., T) bool, broadcastable against the input's (..., T), marks the steps that
    belong to the sequence (padding of a ragged batch is False). A step outside it is left
    unchanged, enters no other step's filter (it reads as the zero padding at a sequence's end)
    and adds nothing to the log-determinant: for a sequence padded at its end, the observed steps'
    values, the log-determinant and every gradient are those of the sequence alone. (Formally the
    layer acts on :math:`m \odot \mathbf{z}` with :math:`\hat{\mathbf{u}}_t = 0` off the mask,
    so its Sylvester matrix is the identity on those rows and columns.)

    See :class:`ConvPlanar` for the equations.
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        params: Union[ConvPlanarParams, Callable[[], ConvPlanarParams]],
        causal: bool = True,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(cache_size=1)
        self._params = params
        self.causal = causal
        self.mask = _check_mask(mask)
        # Causal: autoregressive over time steps (block lower-triangular Jacobian).
        self.autoregressive = causal
        # (x, a or None, constrained params) of the last forward / inverse call: the log-det of
        # the same point reuses them (one context-network evaluation per sample-and-score).
        self._cached_call: tuple[torch.Tensor, torch.Tensor | None, tuple] | None = None

    # -- parameters under the invertibility constraint --

    def _constrained_params(
        self,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(w, u_hat, b, 1 + c)`` with :math:`c_t = \mathbf{w}_0^T\hat{\mathbf{u}}_t` (the
        current step's tap) and ``b`` shaped to broadcast against (..., T).

        :math:`\hat{\mathbf{u}}_t = \mathbf{u}_t / (1 + \mathrm{softplus}(g(\mathbf{u}_t)))`
        with :math:`g(\mathbf{v}) = \sum_{j \ne 0} |\mathbf{w}_j^T\mathbf{v}| -
        \mathbf{w}_0^T\mathbf{v}`. As :math:`g` is positively homogeneous and
        :math:`\mathrm{softplus}(x) > x`, :math:`g(\hat{\mathbf{u}}_t) < 1` at every call: the
        current-step tap dominates the others (see :class:`ConvPlanar` for what that buys).
        No division by :math:`\|\mathbf{w}_0\|^2` (planar's :math:`\hat{\mathbf{u}}` would
        blow :math:`\mathbf{u}` up as :math:`\mathbf{w}_0 \to 0`, and with it every
        cross-step tap)."""
        w, u, b = self._params() if callable(self._params) else self._params
        if b.dim() == 1 and b.numel() == 1:
            b = b.reshape(())  # one bias shared by every step
        center = 0 if self.causal else (w.size(0) - 1) // 2
        taps = u @ w.transpose(0, 1)  # (..., k): w_j . u_t
        current = taps[..., center]
        others = taps.abs().sum(-1) - current.abs()
        shrink = 1.0 + F.softplus(others - current)
        u_hat = u / shrink.unsqueeze(-1)
        one_plus_c = 1.0 + current / shrink
        if self.mask is not None:  # the identity off the mask: u_hat = 0, so 1 + c = 1
            u_hat = torch.where(self.mask.unsqueeze(-1), u_hat, 0.0)
            one_plus_c = torch.where(self.mask, one_plus_c, 1.0)
        return w, u_hat, b, one_plus_c

    def _check_input(self, value: torch.Tensor, w: torch.Tensor, what: str) -> None:
        if value.dim() < 2 or value.size(-1) != w.size(-1):
            raise ValueError(
                f"convolution planar flow acts on sequences of shape (..., T, {w.size(-1)}), "
                f"got {what} of shape {tuple(value.shape)}"
            )

    def _preactivation(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:  # steps off the mask never reach another step's filter
            x = torch.where(self.mask.unsqueeze(-1), x, 0.0)
        return _filter(x, w, self.causal) + b

    # -- forward, inverse, log-det --

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        params = self._constrained_params()
        w, u_hat, b, _ = params
        self._check_input(x, w, "x")
        a = self._preactivation(x, w, b)
        self._cached_call = (x, a, params)
        return x + u_hat * torch.tanh(a).unsqueeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        r"""With :math:`\mathbf{x}_t = \mathbf{y}_t - \hat{\mathbf{u}}_t h(a_t)`,
        the preactivations solve :math:`a_t + \sum_j (\mathbf{w}_j^T\hat{\mathbf{u}}_{t-j})\,
        h(a_{t-j}) = b_t + \sum_j \mathbf{w}_j^T\mathbf{y}_{t-j}`: one scalar per step, lower
        triangular, the diagonal planar's monotone equation
        (:func:`solve_causal_preactivations`). Centred: the same equation with a banded, not
        triangular, coupling (:func:`solve_centred_preactivations`, dense Newton). Gradients: one
        Newton step with autograd from the detached root, i.e. the implicit-function
        derivative."""
        params = self._constrained_params()
        x = self._solve_inverse(y, *params)
        self._cached_call = (x, None, params)
        return x

    def _solve_inverse(
        self, y: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor,
        one_plus_c: torch.Tensor,
    ) -> torch.Tensor:
        self._check_input(y, w, "y")
        target = self._preactivation(y, w, b)
        steps, kernel_size = target.size(-1), w.size(0)
        taps = u_hat @ w.transpose(0, 1)  # w_j . u_hat_s: (k,) shared, (..., T, k) per step
        if taps.dim() == 1:
            taps = taps.expand(steps, kernel_size)
        if not self.causal:
            return y - u_hat * torch.tanh(self._centred_root(target, taps)).unsqueeze(-1)
        lag_coefficients = _shift_lag_columns(taps)
        batch_shape = torch.broadcast_shapes(
            target.shape[:-1], lag_coefficients.shape[:-2], one_plus_c.shape[:-1]
        )

        def flat(value: torch.Tensor, *tail: int, shareable: bool = True) -> torch.Tensor:
            """(N, T, *tail) over the flattened batch; (1, T, *tail) for coefficients shared
            by every sequence (shared u), so that they are never copied N times."""
            value = value.expand(*value.shape[: max(value.dim() - 1 - len(tail), 0)], steps, *tail)
            if shareable and value.shape[: -1 - len(tail)].numel() == 1:
                return value.reshape(1, steps, *tail)
            return value.expand(*batch_shape, steps, *tail).reshape(-1, steps, *tail)

        target_f = flat(target, shareable=False)
        lag_f, one_plus_c_f = flat(lag_coefficients, kernel_size), flat(one_plus_c)
        root, tanh_root = _solve_causal(target_f.detach(), lag_f.detach(), one_plus_c_f.detach())
        if torch.is_grad_enabled() and (target.requires_grad or lag_coefficients.requires_grad):
            # Value unchanged (the residual is at rounding level); derivative -J^{-1} dF, the
            # implicit-function derivative, with J at the root taken as a constant.
            residual = _residual(root, target_f, lag_f)
            with torch.no_grad():
                diag = _slope(root, one_plus_c_f)
                sech_sq = _sech_sq(root)
                sub = [lag_f[..., j] * _shifted(sech_sq, j) for j in range(1, kernel_size)]
            root, tanh_root = root + _solve_lower_banded(diag, sub, -residual), None
        tanh_root = torch.tanh(root) if tanh_root is None else tanh_root
        return y - u_hat * tanh_root.reshape(*batch_shape, steps, 1)

    @staticmethod
    def _centred_root(target: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        matrix = _centred_matrix(taps)
        batch_shape = torch.broadcast_shapes(target.shape[:-1], matrix.shape[:-2])
        steps = target.size(-1)
        target_b = target.expand(*batch_shape, steps)
        matrix_b = matrix.expand(*batch_shape, steps, steps)
        root = solve_centred_preactivations(
            target_b.detach().reshape(-1, steps), matrix_b.detach().reshape(-1, steps, steps)
        ).reshape(*batch_shape, steps)
        if torch.is_grad_enabled() and (target.requires_grad or matrix.requires_grad):
            _, step = _centred_newton_step(root, target_b, matrix_b)  # implicit-function step
            root = root + step
        return root

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Causal: :math:`\sum_t \log(1 + h'(a_t)\,\mathbf{w}_0^T\hat{\mathbf{u}}_t)`.
        Centred: :math:`\log|\det(I_T + \mathrm{diag}(h'(a))\,W\hat U)|` by ``slogdet`` of the
        banded :math:`T\times T` matrix. Steps off the mask add exactly 0. Computed from ``x``;
        the parameters (and preactivations) of the last forward or inverse call are reused only
        when ``x`` is that call's point."""
        cached = self._cached_call
        if cached is not None and cached[0] is x:
            _, a, params = cached
        else:
            a, params = None, self._constrained_params()
        w, u_hat, b, one_plus_c = params
        if a is None:
            self._check_input(x, w, "x")
            a = self._preactivation(x, w, b)
        if self.causal:
            log_slope = _log_slope(a, one_plus_c)
            if self.mask is not None:
                log_slope = torch.where(self.mask, log_slope, 0.0)
            return log_slope.sum(-1)
        return self._centred_logdet(a, w, u_hat, self.mask)

    @staticmethod
    def _centred_logdet(
        a: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        steps, kernel_size = a.size(-1), w.size(0)
        half = (kernel_size - 1) // 2
        taps = u_hat @ w.transpose(0, 1)  # (..., T or 1, k): w_j . u_hat_s
        taps = taps.expand(*taps.shape[:-2], steps, kernel_size)
        slope = _sech_sq(a)
        if mask is not None:  # rows off the mask are the identity too: the matrix is block
            slope = torch.where(mask, slope, 0.0)  # diagonal, its log-det the observed block's
        batch_shape = torch.broadcast_shapes(slope.shape[:-1], taps.shape[:-2])
        slope = slope.expand(*batch_shape, steps)
        taps = taps.expand(*batch_shape, steps, kernel_size)
        # S[t, s] = delta_ts + h'(a_t) w_{t-s} . u_hat_s, one diagonal per tap (lag t - s).
        sylvester = torch.eye(steps, dtype=a.dtype, device=a.device).expand(
            *batch_shape, steps, steps
        )
        for row in range(kernel_size):
            lag = row - half
            length = steps - abs(lag)
            if length <= 0:
                continue
            rows = slice(max(lag, 0), max(lag, 0) + length)  # t
            cols = slice(max(-lag, 0), max(-lag, 0) + length)  # s = t - lag
            band = slope[..., rows] * taps[..., cols, row]
            sylvester = sylvester + torch.diag_embed(band, offset=-lag)
        return torch.linalg.slogdet(sylvester).logabsdet


def _check_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1:
        raise ValueError(
            f"mask must be a tensor (..., T) of the steps in the sequence, got {mask!r}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (..., T), got dtype {mask.dtype}")
    return mask


def _check_kernel(kernel_size: int, causal: bool) -> None:
    check_positive_int("kernel_size", kernel_size)
    if not causal and kernel_size % 2 == 0:
        raise ValueError(
            f"a centred filter needs an odd kernel_size (taps -p..p), got {kernel_size!r}"
        )


class ConvPlanar(ConditionedConvPlanar, TransformModule):
    r"""A convolution planar flow over time, one layer acting on a sequence
    :math:`\mathbf{z} \in \mathbb{R}^{T \times Z}` (event dim 2, any :math:`T \ge 1`):

    .. math::

        a_t = b + \sum_{j=0}^{k-1} \mathbf{w}_j^T\mathbf{z}_{t-j}, \qquad
        \mathbf{f}(\mathbf{z})_t = \mathbf{z}_t + \hat{\mathbf{u}}\,\tanh(a_t),

    (zero padding before the start), with learnable taps :math:`\mathbf{w}_0, \dots,
    \mathbf{w}_{k-1} \in \mathbb{R}^Z`, :math:`\mathbf{u} \in \mathbb{R}^Z` and :math:`b`. The
    Jacobian :math:`I + \hat U\,\mathrm{diag}(h'(a))\,W` is lower block-triangular in time with
    diagonal blocks :math:`I + h'(a_t)\hat{\mathbf{u}}\mathbf{w}_0^T`, so

    .. math::

        \log|\det J| = \sum_{t=1}^{T} \log\left(1 + h'(a_t)\,\mathbf{w}_0^T\hat{\mathbf{u}}
        \right), \qquad O(TkZ).

    Each step is a planar map of :math:`\mathbf{z}_t` given the past, so the layer is a
    bijection iff :math:`\mathbf{w}_0^T\hat{\mathbf{u}} \ge -1`. That alone is not enough in
    practice: with planar's :math:`\hat{\mathbf{u}}` per step, the inverse recurrence
    :math:`a_t \leftarrow a_{t-j}` can amplify errors by
    :math:`|\mathbf{w}_j^T\hat{\mathbf{u}}| / (1 + \mathbf{w}_0^T\hat{\mathbf{u}}\,h')` per step,
    and after parameters moved by N(0, 0.5) a T = 25 round trip lost every digit (the inverse
    found a point 38 away whose image equals y to the last bit). So the constraint applied at
    every call is :math:`\hat{\mathbf{u}} = \mathbf{u}/(1 + \mathrm{softplus}(g(\mathbf{u})))`,
    :math:`g(\mathbf{v}) = \sum_{j\ne 0}|\mathbf{w}_j^T\mathbf{v}| - \mathbf{w}_0^T\mathbf{v}`,
    positively homogeneous, hence :math:`g(\hat{\mathbf{u}}) < 1`: the current-step tap
    dominates, :math:`\mathbf{w}_0^T\hat{\mathbf{u}} > -1` still (its whole range when the other
    taps vanish), and every :math:`I_T + D\,W\hat U` with :math:`D` diagonal in :math:`[0, 1]`
    is strictly column diagonally dominant with a positive diagonal. Consequences: the
    determinant is positive, :math:`\|(I_T + D W\hat U)^{-1}\|_1 \le 1/(1 - \max_t
    g(\hat{\mathbf{u}}_t))`, i.e. a well-conditioned inverse for any T, and the parallel solver's
    block responses never overflow.

    The exact inverse runs forward in t: given :math:`\mathbf{z}_{<t}`, :math:`a_t` solves
    planar's monotone scalar equation. It is computed as a whole: Newton's method on the T
    preactivations at once from an elementwise start, each step one banded triangular solve
    (dense for short sequences, :math:`O(T)` work in :math:`O(\sqrt{T})` sequential tensor ops
    by blocks otherwise); one or two steps reach rounding level, in 3-4x the forward's
    time on CPU. The step-by-step solver (:func:`~transforms.planar.solve_planar_equation` per
    step) is the fallback that always converges.

    With ``causal=False`` and odd :math:`k = 2p + 1` the filter is centred,
    :math:`a_t = b + \sum_{j=-p}^{p}\mathbf{w}_j^T\mathbf{z}_{t-j}`, and
    :math:`\log|\det J| = \log\det(I_T + \mathrm{diag}(h'(a))\,W\hat U)` is computed exactly by
    ``slogdet`` of that banded :math:`T \times T` matrix (:math:`O(T^3)` time, :math:`O(T^2)`
    memory: meant for T up to a few hundred). The same constraint (with :math:`\mathbf{w}_0`
    the centre tap) makes it a bijection: the determinant of every :math:`I_T + D W\hat U` is
    positive and :math:`\mathbf{f}(\mathbf{z}) - \mathbf{z}` is bounded, so Hadamard's global
    inverse theorem applies. Its inverse solves the T preactivations by Newton's method with
    dense :math:`T \times T` solves; it reaches machine precision in practice, but convergence
    from any start is not proven (it raises rather than return a wrong point), so it is
    registered as ``conv_planar_centered`` with ``exact_inverse=False``.

    Stacking: :func:`transforms.flow` puts no time reversal between layers
    (``permute_between=False``). A causal stack already gives :math:`q(\mathbf{z}) = \prod_t
    q(\mathbf{z}_t \mid \mathbf{z}_{<t})`, a factorisation that can represent any dependence
    across time, each layer widening the receptive field by :math:`k - 1` steps; and for the
    conditional flow a reversal of :math:`\mathbf{z}` alone would pair step :math:`t` of the
    latent with the context of step :math:`T - 1 - t`, breaking the per-step amortisation. For
    plain stacks, ``transforms.Reverse(event_dim=2)`` between layers adds the other direction.

    >>> base = dist.Normal(torch.zeros(50, 2), torch.ones(50, 2)).to_event(2)
    >>> flow = ConvPlanar(2, kernel_size=3)
    >>> density = dist.TransformedDistribution(base, [flow])
    >>> density.log_prob(torch.randn(8, 50, 2)).shape      # any point, not only samples
    torch.Size([8])

    :param input_dim: the size :math:`Z` of each step's vector.
    :param kernel_size: the filter width :math:`k` over time.
    :param causal: causal filter (exact inverse) or centred one (Newton inverse, no proof).

    References:

    [1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. [arXiv:1505.05770]

    [2] Justin Bayer, Christian Osendorfer. Learning Stochastic Recurrent Networks.
    [arXiv:1411.7610]
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, input_dim: int, kernel_size: int = 3, causal: bool = True) -> None:
        check_positive_int("input_dim", input_dim)
        _check_kernel(kernel_size, causal)
        super().__init__(self._module_params, causal=causal)
        self.input_dim, self.kernel_size = input_dim, kernel_size
        self.w = nn.Parameter(torch.empty(kernel_size, input_dim))
        self.u = nn.Parameter(torch.empty(input_dim))
        self.bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def _module_params(self) -> ConvPlanarParams:
        return self.w, self.u, self.bias

    def with_mask(self, mask: torch.Tensor) -> ConditionedConvPlanar:
        """This layer restricted to the steps of ``mask`` (..., T) (see
        :class:`ConditionedConvPlanar`); it reads the module's parameters at each call."""
        return ConditionedConvPlanar(self._module_params, causal=self.causal, mask=mask)

    def reset_parameters(self) -> None:
        """Taps ``U(-1/sqrt(kZ), 1/sqrt(kZ))`` (fan-in of the filter, as nn.Linear/Conv1d),
        ``u ~ U(-1/sqrt(Z), 1/sqrt(Z))``, ``b = 0``."""
        bound_w = 1.0 / math.sqrt(self.kernel_size * self.input_dim)
        bound_u = 1.0 / math.sqrt(self.input_dim)
        nn.init.uniform_(self.w, -bound_w, bound_w)
        nn.init.uniform_(self.u, -bound_u, bound_u)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, kernel_size={self.kernel_size}, "
                f"causal={self.causal}, nonlinearity=tanh")

    def __repr__(self) -> str:
        # Transform.__repr__ comes first in the MRO and would print "ConvPlanar()"
        return nn.Module.__repr__(self)


class ConditionalConvPlanar(ConditionalTransformModule):
    r"""A convolution planar flow over time whose per-step :math:`\mathbf{u}_t` (and, with
    ``per_step_bias``, :math:`b_t`) are outputs of a network of the per-step context
    :math:`\mathbf{h}_t` (e.g. STORN's encoder state, as in the thesis); the filter taps
    :math:`\mathbf{w}_j` are shared parameters:

    .. math::

        a_t = b_t + \sum_j \mathbf{w}_j^T\mathbf{z}_{t-j}, \qquad
        \mathbf{f}(\mathbf{z})_t = \mathbf{z}_t + \hat{\mathbf{u}}_t \tanh(a_t),

    with the log-determinant, invertibility constraint (per step, at call time) and exact
    inverse of :class:`ConvPlanar`. ``condition(context)`` takes a context (..., T, C) aligned
    with the sequence (..., T, Z).

    >>> flow = conditional_conv_planar(2, context_dim=8)
    >>> context = torch.randn(4, 30, 8)
    >>> base = dist.Normal(torch.zeros(30, 2), torch.ones(30, 2)).to_event(2)
    >>> dist.ConditionalTransformedDistribution(base, [flow]).condition(context).log_prob(
    ...     torch.randn(4, 30, 2)).shape
    torch.Size([4])

    :param nn: a callable ``context -> u`` (output size Z), or ``context -> (u, b)`` (sizes
        ``(Z, 1)``) when ``per_step_bias``, e.g. :class:`~pyro.nn.DenseNN`.
    :param input_dim: the size :math:`Z` of each step's vector.
    :param kernel_size: the filter width :math:`k`.
    :param causal: causal (exact inverse) or centred (Newton inverse) filter.
    :param per_step_bias: :math:`b_t` from the network rather than one shared :math:`b`.

    References:

    [1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. [arXiv:1505.05770]

    [2] Justin Bayer, Christian Osendorfer. Learning Stochastic Recurrent Networks.
    [arXiv:1411.7610]
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        nn: Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]],
        input_dim: int,
        kernel_size: int = 3,
        causal: bool = True,
        per_step_bias: bool = True,
    ) -> None:
        check_positive_int("input_dim", input_dim)
        _check_kernel(kernel_size, causal)
        super().__init__()
        self.nn = nn
        self.input_dim, self.kernel_size = input_dim, kernel_size
        self.causal, self.per_step_bias = causal, per_step_bias
        self.autoregressive = causal
        self.w = torch.nn.Parameter(torch.empty(kernel_size, input_dim))
        self.bias = None if per_step_bias else torch.nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound_w = 1.0 / math.sqrt(self.kernel_size * self.input_dim)
        torch.nn.init.uniform_(self.w, -bound_w, bound_w)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def _params(self, context: torch.Tensor) -> ConvPlanarParams:
        if context.dim() < 2:
            raise ValueError(
                f"the context of a flow over time is per step, shape (..., T, C); got shape "
                f"{tuple(context.shape)}"
            )
        out = self.nn(context)
        if self.per_step_bias:
            u, b = out
            return self.w, u, b.squeeze(-1)
        return self.w, out, self.bias

    def condition(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> ConditionedConvPlanar:
        """The layer for per-step ``context`` (..., T, C), restricted to the steps of ``mask``
        (..., T) when given. The network runs at each call of the result, not here, so the
        result follows the current parameters."""
        if not isinstance(context, torch.Tensor) or context.dim() < 2:
            raise ValueError(
                f"the context of a flow over time is per step, shape (..., T, C); got "
                f"{tuple(context.shape) if isinstance(context, torch.Tensor) else context!r}"
            )
        return ConditionedConvPlanar(
            functools.partial(self._params, context), causal=self.causal, mask=mask
        )

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, kernel_size={self.kernel_size}, "
                f"causal={self.causal}, per_step_bias={self.per_step_bias}")


# ---- helpers and registration -----------------------------------------------------------------


def _conditional(
    input_dim: int, context_dim: int, kernel_size: int, causal: bool,
    hidden_dims: Sequence[int] | None, per_step_bias: bool,
) -> ConditionalConvPlanar:
    param_dims = [input_dim, 1] if per_step_bias else [input_dim]
    hypernet = context_hypernet(input_dim, context_dim, param_dims, hidden_dims)
    return ConditionalConvPlanar(hypernet, input_dim, kernel_size, causal, per_step_bias)


def conditional_conv_planar(
    input_dim: int, context_dim: int, kernel_size: int = 3, causal: bool = True,
    hidden_dims: Sequence[int] | None = None, per_step_bias: bool = True,
) -> ConditionalConvPlanar:
    """One causal :class:`ConditionalConvPlanar` layer, ``u_t`` (and ``b_t``) from a
    :class:`~pyro.nn.DenseNN` of the per-step context (hidden sizes default to
    ``[10 * input_dim, 10 * input_dim]``). ``causal=False`` is refused: the centred filter has
    no exact inverse and is registered separately as ``conv_planar_centered``."""
    if causal is not True:
        raise ValueError(
            f"'conv_planar' is the causal flow (exact inverse); got causal={causal!r}. "
            "The centred filter is registered as 'conv_planar_centered'"
        )
    return _conditional(input_dim, context_dim, kernel_size, True, hidden_dims, per_step_bias)


def conditional_conv_planar_centered(
    input_dim: int, context_dim: int, kernel_size: int = 3,
    hidden_dims: Sequence[int] | None = None, per_step_bias: bool = True,
) -> ConditionalConvPlanar:
    """One centred :class:`ConditionalConvPlanar` layer (odd ``kernel_size``)."""
    return _conditional(input_dim, context_dim, kernel_size, False, hidden_dims, per_step_bias)


@register(
    "conv_planar",
    exact_inverse=True,
    conditional=conditional_conv_planar,
    event_dim=2,
    permute_between=False,
    description="Causal convolution planar flow over time (event (T, Z)), exact inverse",
)
def conv_planar(input_dim: int, kernel_size: int = 3, causal: bool = True) -> ConvPlanar:
    """One causal :class:`ConvPlanar` layer acting on ``(T, input_dim)`` sequences.
    ``causal=False`` is refused (see ``conv_planar_centered``), so the registry's
    ``exact_inverse=True`` holds for every layer this name builds."""
    if causal is not True:
        raise ValueError(
            f"'conv_planar' is the causal flow (exact inverse); got causal={causal!r}. "
            "The centred filter is registered as 'conv_planar_centered'"
        )
    return ConvPlanar(input_dim, kernel_size=kernel_size, causal=True)


@register(
    "conv_planar_centered",
    exact_inverse=False,
    conditional=conditional_conv_planar_centered,
    event_dim=2,
    permute_between=False,
    description="Centred convolution planar flow over time (event (T, Z)), exact log-det by "
    "T x T slogdet, Newton inverse without a convergence proof",
)
def conv_planar_centered(input_dim: int, kernel_size: int = 3) -> ConvPlanar:
    """One centred :class:`ConvPlanar` layer (odd ``kernel_size``; O(T^3) log-det and inverse)."""
    return ConvPlanar(input_dim, kernel_size=kernel_size, causal=False)

