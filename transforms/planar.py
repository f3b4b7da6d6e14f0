r"""Planar flows (Rezende & Mohamed 2015) with an exact inverse at every point.

Pyro's own :class:`~pyro.distributions.transforms.Planar` can only "invert" the one output it
has just produced (anything else raises ``KeyError``, pyro-ppl issue 2718). The inverse exists
everywhere, though: along :math:`\mathbf{w}` it is the root of a monotone scalar equation, solved
here by a safeguarded Newton iteration, with gradients given by the implicit function theorem.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .hypernet import context_hypernet
from .registry import check_positive_int, register

__all__ = [
    "ConditionedPlanar",
    "Planar",
    "ConditionalPlanar",
    "planar",
    "conditional_planar",
    "solve_planar_equation",
]

PlanarParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Upper bound on solver iterations, and the exact count under torch.jit.trace (no data-dependent
# exit is traceable). Regular roots converge in 2-6 Newton steps; the worst case is a nearly flat
# root (w.u_hat -> -1, where g(a) ~ a^3 / 3), where the safeguard falls back to bisection of a
# bracket |w.u_hat| wide, about one bit per step: measured <= 27 steps in float32 and <= 54 in
# float64 over 1 + w.u_hat in [1e-30, 1e4] and |s| in [1e-8, 1e5]; these add a margin.
_MAX_SOLVER_STEPS = {torch.float16: 20, torch.bfloat16: 20, torch.float32: 32, torch.float64: 64}

# w.u at which the reparameterised u_hat equals u (softplus(w.u) = 1 + w.u): log(e - 1). The
# near-identity initialisation puts w.u there, so that w.u_hat = 0 and the layer is a shear.
_IDENTITY_W_DOT_U = math.log(math.e - 1.0)

# Eager early stop: a Newton step this many ulps of (1 + |a|) or smaller means converged. The
# final differentiable Newton step taken after the solve refines the root once more.
_CONVERGED_ULPS = 4.0

# Plain Newton steps tried before the safeguarded solver (eagerly): from the blended start, roots
# away from the flat w.u_hat -> -1 case converge in 2-5 (measured), and each plain step is ~14
# tensor ops against ~35 for a safeguarded one, which on small batches is what the inverse costs.
_PLAIN_NEWTON_STEPS = 6

# Where |a| is clamped for sech^2 a = cosh(a)^-2: cosh(a)^2 overflows at log(max-float) / 2; a
# margin of 0.5 below it.
_SECH_CLAMP = {
    dtype: 0.5 * math.log(torch.finfo(dtype).max) - 0.5
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _sech_sq(a: torch.Tensor) -> torch.Tensor:
    r""":math:`h'(a) = \mathrm{sech}^2 a = \cosh(a)^{-2}`, to a few ulps relative wherever it is
    representable (``1 - tanh(a)^2`` rounds to 0 long before). :math:`|a|` is clamped where
    :math:`\cosh(a)^2` would overflow: sech^2 is ~4 / max-float there either way, and the clamp
    keeps ``sinh`` (cosh's derivative) finite, so the gradient has no ``0 * inf``."""
    bound = _SECH_CLAMP[a.dtype]
    return torch.cosh(a.clamp(-bound, bound)).pow(-2)


def _slope(
    a: torch.Tensor, one_plus_c: torch.Tensor, tanh_a: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`g'(a) = 1 + c\,h'(a)` written as :math:`\tanh^2 a + (1 + c)\,\mathrm{sech}^2 a`:
    two non-negative terms (as :math:`1 + c \ge 0`), each to a few ulps relative, so the sum
    keeps full relative precision for any ``a`` (no ``1 - tanh^2``, which rounds to 0 where tanh
    saturates) and any ``1 + c`` (never formed from ``c``, which cancels as :math:`c \to -1`).
    ``tanh_a`` is the forward pass's ``tanh(a)`` when the caller has it."""
    tanh_a = torch.tanh(a) if tanh_a is None else tanh_a
    return torch.addcmul(tanh_a.square(), one_plus_c, _sech_sq(a))


def _log_slope(
    a: torch.Tensor, one_plus_c: torch.Tensor, tanh_a: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`\log(1 + c\,h'(a))`, finite and precise wherever :func:`_slope` is. (Six tensor
    ops given ``tanh_a``: on small batches their count, not their arithmetic, is the cost.)"""
    return torch.log(_slope(a, one_plus_c, tanh_a))


def solve_planar_equation(
    target: torch.Tensor, one_plus_c: torch.Tensor, max_steps: int | None = None
) -> torch.Tensor:
    r"""Solve :math:`a + c \tanh(a) = s` for :math:`a`, elementwise, given
    :math:`s` (``target``) and :math:`1 + c \ge 0` (``one_plus_c``).

    :math:`g(a) = a + c\tanh(a)` is non-decreasing when :math:`c \ge -1`, and since
    :math:`|\tanh| \le 1` the root lies in :math:`[s - |c|, s + |c|]`. Newton steps are taken
    while they stay inside the shrinking bracket and at least halve the previous step, bisection
    otherwise (``rtsafe``), so it converges from any start, quadratically near simple roots.

    Eagerly, up to :data:`_PLAIN_NEWTON_STEPS` plain Newton steps come first; when every
    element meets the same convergence test within them, that is the root (it is unique, as g is
    monotone), and otherwise the safeguarded iteration starts afresh from the same start, so a
    plain step that diverges or oscillates (near :math:`c = -1`) costs time, never accuracy.

    Runs without autograd; callers attach gradients with one Newton step from the root
    (see :meth:`ConditionedPlanar._inverse`). Under :func:`torch.jit.trace` it always takes
    ``max_steps`` safeguarded steps; eagerly it stops once every element has converged.
    """
    with torch.no_grad():
        target, one_plus_c = torch.broadcast_tensors(target, one_plus_c)
        c = one_plus_c - 1.0
        half_width = c.abs()
        lower, upper = target - half_width, target + half_width
        # Start at s - c tanh(s / (1 + c)): the linearised root s / (1 + c) (tanh a ~ a) for
        # small |s|, the saturated one s - c sign(s) (tanh a ~ sign a) for large |s|, and a
        # blend between them, in four ops (the clamp keeps 0 / 0 out when 1 + c = 0).
        linear = target / one_plus_c.clamp_min(torch.finfo(target.dtype).tiny)
        root = torch.addcmul(target, c, torch.tanh(linear), value=-1.0).clamp(min=lower, max=upper)
        tracing = torch.jit.is_tracing()
        tolerance = _CONVERGED_ULPS * torch.finfo(target.dtype).eps
        if not tracing:
            plain = _plain_newton(root, target, c, one_plus_c, tolerance)
            if plain is not None:
                return plain
        previous_step = upper - lower
        if max_steps is None:
            max_steps = _MAX_SOLVER_STEPS.get(target.dtype, 128)
        for _ in range(max_steps):
            residual, newton_step, converged = _newton_step(root, target, c, one_plus_c, tolerance)
            lower = torch.where(residual < 0, root, lower)
            upper = torch.where(residual > 0, root, upper)
            newton = root - newton_step
            # A step at rounding level is always taken: refusing it (it need not halve the
            # previous one, nor stay inside a bracket that shrank onto the root) would restart
            # bisection from a far bracket end and undo the converged root.
            use_newton = converged | (
                (newton >= lower)
                & (newton <= upper)
                & (2.0 * newton_step.abs() <= previous_step.abs())
            )
            new_root = torch.where(use_newton, newton, 0.5 * (lower + upper))
            previous_step = new_root - root
            root = new_root
            if not tracing and bool(converged.all()):
                break
        return root


def _newton_step(
    root: torch.Tensor, target: torch.Tensor, c: torch.Tensor, one_plus_c: torch.Tensor,
    tolerance: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(residual, step, converged)`` of one Newton step on :math:`g(a) - s` at ``root``: the
    residual :math:`a + c\tanh a - s`, the Newton correction :math:`\text{residual} / g'(a)` (to
    subtract), and whether it is within ``tolerance * (1 + |a|)``. The slope is
    :math:`\tanh^2 a + (1 + c)(1 - \tanh^2 a)`, two non-negative terms: cheaper than
    :func:`_slope`, and its rounding (for saturated tanh) only scales a step, never moves the
    root."""
    tanh_root = torch.tanh(root)
    residual = torch.addcmul(root - target, c, tanh_root)
    tanh_sq = tanh_root.square()
    step = residual / torch.addcmul(tanh_sq, one_plus_c, 1.0 - tanh_sq)
    return residual, step, step.abs() <= tolerance * (1.0 + root.abs())


def _plain_newton(
    root: torch.Tensor, target: torch.Tensor, c: torch.Tensor, one_plus_c: torch.Tensor,
    tolerance: float,
) -> torch.Tensor | None:
    """Unsafeguarded Newton steps for :func:`solve_planar_equation`: the root once every
    step is within ``tolerance * (1 + |a|)``, ``None`` if that takes more than
    :data:`_PLAIN_NEWTON_STEPS` (a NaN or infinite step never passes the test)."""
    for _ in range(_PLAIN_NEWTON_STEPS):
        _, step, converged = _newton_step(root, target, c, one_plus_c, tolerance)
        root = root - step
        if bool(converged.all()):
            return root
    return None


class ConditionedPlanar(Transform):
    r"""The planar map for given parameters :math:`(b, \mathbf{u}, \mathbf{w})`, a tuple of
    tensors or a callable returning one; leading dims of the parameters broadcast against the
    input's batch dims (e.g. parameters ``(B, T, D)`` from a context, input ``(S, B, T, D)``).

    See :class:`Planar` for the equations.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, params: Union[PlanarParams, Callable[[], PlanarParams]]) -> None:
        super().__init__(cache_size=1)
        self._params = params
        # (x, w.x + b, tanh(w.x + b), 1 + w.u_hat) of the last forward call: the log-det of that
        # same x object reuses them instead of recomputing them (any other x recomputes).
        self._last_forward: Tuple[torch.Tensor, ...] | None = None

    def _constrained_params(
        self,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(b, u_hat, w, 1 + w.u_hat)``: the invertibility reparameterisation of [1, A.1],
        :math:`\hat{\mathbf{u}} = \mathbf{u} + (m(\mathbf{w}^T\mathbf{u}) - \mathbf{w}^T
        \mathbf{u})\,\mathbf{w}/\|\mathbf{w}\|^2`, :math:`m(x) = -1 + \mathrm{softplus}(x)`,
        so :math:`1 + \mathbf{w}^T\hat{\mathbf{u}} = \mathrm{softplus}(\mathbf{w}^T\mathbf{u})`.

        At :math:`\mathbf{w} = 0` the correction is undefined (its limit depends on the
        direction of approach) and not needed: the map is the translation by
        :math:`\mathbf{u}\tanh(b)`, so :math:`\hat{\mathbf{u}} = \mathbf{u}` and
        :math:`1 + \mathbf{w}^T\hat{\mathbf{u}} = 1`, selected without dividing by zero."""
        bias, u, w = self._params() if callable(self._params) else self._params
        w_dot_u = torch.linalg.vecdot(w, u).unsqueeze(-1)
        w_norm_sq = torch.linalg.vecdot(w, w).unsqueeze(-1)
        w_is_zero = w_norm_sq == 0
        # At w = 0 the divisor is +inf: the correction is 0 and so is its gradient, with no NaN
        # (0/0) and no second select. masked_fill, not torch.where with a Python scalar: where
        # wraps and converts the scalar on every call, and on these (D,)-sized tensors that
        # dispatch overhead, not arithmetic, is the cost (measured ~30 us per layer).
        softplus_w_dot_u = F.softplus(w_dot_u)
        correction = (softplus_w_dot_u - w_dot_u - 1.0) / w_norm_sq.masked_fill(w_is_zero, math.inf)
        u_hat = torch.addcmul(u, correction, w)
        one_plus_c = softplus_w_dot_u.masked_fill(w_is_zero, 1.0)
        return bias, u_hat, w, one_plus_c

    @staticmethod
    def _check_input(value: torch.Tensor, w: torch.Tensor, what: str) -> None:
        if torch.jit.is_tracing():  # sizes are traced values then; shapes were checked eagerly
            return
        if value.dim() < 1 or value.size(-1) != w.size(-1):
            raise ValueError(
                f"planar flow acts on vectors of size {w.size(-1)}, got {what} of shape "
                f"{tuple(value.shape)}"
            )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        bias, u_hat, w, one_plus_c = self._constrained_params()
        self._check_input(x, w, "x")
        preactivation = self._preactivation(x, w, bias)
        tanh_a = torch.tanh(preactivation)
        self._last_forward = (x, preactivation, tanh_a, one_plus_c)
        # x + u_hat tanh(a) in one op with one (..., D) allocation. (Freeing and allocating
        # megabyte temporaries in turn makes glibc return and re-fault the pages: at batch 4096,
        # D = 64 a separate product and sum cost ~0.8 ms per layer, measured, against ~0.04 ms.)
        return torch.addcmul(x, u_hat, tanh_a)

    @staticmethod
    def _preactivation(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathbf{w}^T\mathbf{x} + b` with a trailing dim of 1: one fused matrix product
        and sum when ``w`` is one vector for the whole batch (an unconditional layer) and ``x`` a
        matrix, one product then the sum for more batch dims, else a product per row."""
        if w.dim() == 1:
            if x.dim() == 2 and bias.dim() <= 1:
                return torch.addmm(bias, x, w.unsqueeze(-1))
            return torch.matmul(x, w.unsqueeze(-1)) + bias
        return torch.linalg.vecdot(w, x).unsqueeze(-1) + bias

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        r"""With :math:`a = \mathbf{w}^T\mathbf{x} + b`, :math:`\mathbf{x} = \mathbf{y} -
        \hat{\mathbf{u}}\tanh(a)` and :math:`a + c\tanh(a) = \mathbf{w}^T\mathbf{y} + b`,
        :math:`c = \mathbf{w}^T\hat{\mathbf{u}} \ge -1`: one monotone scalar equation."""
        bias, u_hat, w, one_plus_c = self._constrained_params()
        self._check_input(y, w, "y")
        target = self._preactivation(y, w, bias)
        root = solve_planar_equation(target, one_plus_c)
        if not (torch.is_grad_enabled() and (target.requires_grad or one_plus_c.requires_grad)):
            return (u_hat * torch.tanh(root)).neg_().add_(y)  # y - u_hat tanh(a), in place
        # One Newton step with autograd on, from the converged (detached) root: its value is the
        # root again, and its derivative is the implicit-function derivative
        # da/d(s, c) = (1, -tanh a) / g'(a), without differentiating through the iterations.
        c = one_plus_c - 1.0
        residual = root + c * torch.tanh(root) - target
        preactivation = root - residual / _slope(root, one_plus_c)
        return (u_hat * torch.tanh(preactivation)).neg_().add_(y)  # as in _call

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log|1 + h'(\mathbf{w}^T\mathbf{x} + b)\,\mathbf{w}^T\hat{\mathbf{u}}|`,
        computed from ``x``: from the last forward call's intermediates if it was this very
        ``x`` object, afresh otherwise (never from the output ``y``)."""
        if self._last_forward is not None and self._last_forward[0] is x:
            _, preactivation, tanh_a, one_plus_c = self._last_forward
        else:
            bias, _, w, one_plus_c = self._constrained_params()
            preactivation = self._preactivation(x, w, bias)
            tanh_a = None
        return _log_slope(preactivation, one_plus_c, tanh_a).squeeze(-1)


class Planar(ConditionedPlanar, TransformModule):
    r"""A planar flow [1],

    .. math::

        \mathbf{y} = \mathbf{x} + \hat{\mathbf{u}}\, h(\mathbf{w}^T\mathbf{x} + b),
        \qquad h = \tanh,

    with learnable :math:`b \in \mathbb{R}`, :math:`\mathbf{u}, \mathbf{w} \in \mathbb{R}^D`. Its
    log-determinant is

    .. math::

        \log|\det J| = \log\left|1 + h'(\mathbf{w}^T\mathbf{x} + b)\,
        \mathbf{w}^T\hat{\mathbf{u}}\right|.

    It is invertible iff :math:`\mathbf{w}^T\hat{\mathbf{u}} \ge -1`, which the
    reparameterisation :math:`\hat{\mathbf{u}} = \mathbf{u} + (m(\mathbf{w}^T\mathbf{u}) -
    \mathbf{w}^T\mathbf{u})\,\mathbf{w}/\|\mathbf{w}\|^2`, :math:`m(x) = -1 +
    \log(1 + e^x)`, guarantees at every call (no clamping of parameters).

    The inverse is exact at any point: with :math:`a = \mathbf{w}^T\mathbf{x} + b` and
    :math:`c = \mathbf{w}^T\hat{\mathbf{u}}`, :math:`a` solves the monotone scalar equation
    :math:`a + c\,\tanh(a) = \mathbf{w}^T\mathbf{y} + b` (safeguarded Newton, to machine
    precision) and :math:`\mathbf{x} = \mathbf{y} - \hat{\mathbf{u}}\tanh(a)`. So
    :meth:`~pyro.distributions.TransformedDistribution.log_prob` works at any point, not only at
    the last sample (pyro-ppl issue 2718), and gradients flow through the inverse.

    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> flow = Planar(2)
    >>> density = dist.TransformedDistribution(base, [flow])
    >>> density.log_prob(torch.randn(5, 2)).shape      # any point, not only samples
    torch.Size([5])

    Initialisation. By default (``init_scale=None``) as Pyro's: :math:`\mathbf{u},
    \mathbf{w} \sim U(-1/\sqrt{D}, 1/\sqrt{D})`, :math:`b = 0`. That layer is *not* close to
    the identity, whatever the scale of :math:`\mathbf{u}, \mathbf{w}`: near
    :math:`\mathbf{w}^T\mathbf{u} = 0` the reparameterisation gives
    :math:`\mathbf{w}^T\hat{\mathbf{u}} = \log 2 - 1`, so each layer contracts by 0.69 along
    :math:`\mathbf{w}` near its hyperplane, and a deep stack (e.g. 32 layers for a density)
    starts far from any sensible map. ``init_scale=s`` (a number :math:`\ge 0`) starts near the
    identity instead: :math:`\mathbf{w}` a random unit vector, :math:`b = 0`, and
    :math:`\mathbf{u}` with :math:`\mathbf{w}^T\mathbf{u} = \log(e - 1)`, where
    :math:`\hat{\mathbf{u}}` is :math:`\mathbf{u}` less its component along :math:`\mathbf{w}`,
    so :math:`\mathbf{w}^T\hat{\mathbf{u}} = 0`: the layer is the volume-preserving shear
    :math:`\mathbf{x} + \hat{\mathbf{u}}\tanh(\mathbf{w}^T\mathbf{x})` with
    :math:`\hat{\mathbf{u}} \perp \mathbf{w}` of entries :math:`U(-s/\sqrt{D}, s/\sqrt{D})`
    before the projection (the identity itself when :math:`s = 0` or :math:`D = 1`).

    >>> stack = transforms.flow("planar", 2, 32, init_scale=0.1)   # near the identity

    :param input_dim: the size :math:`D` of the vectors transformed.
    :param init_scale: ``None`` for Pyro's initialisation, or the scale :math:`s \ge 0` of the
        near-identity one (see above); :meth:`reset_parameters` uses it.

    References:

    [1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. [arXiv:1505.05770]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, input_dim: int, init_scale: float | None = None) -> None:
        check_positive_int("input_dim", input_dim)
        if init_scale is not None and not (
            isinstance(init_scale, (int, float))
            and not isinstance(init_scale, bool)
            and math.isfinite(init_scale)
            and init_scale >= 0
        ):
            raise ValueError(f"init_scale must be None or a finite number >= 0, got {init_scale!r}")
        super().__init__(self._module_params)
        self.input_dim = input_dim
        self.init_scale = init_scale
        self.bias = nn.Parameter(torch.empty(1))
        self.u = nn.Parameter(torch.empty(input_dim))
        self.w = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _module_params(self) -> PlanarParams:
        return self.bias, self.u, self.w

    def reset_parameters(self) -> None:
        """``u, w ~ U(-1/sqrt(D), 1/sqrt(D))``, ``b = 0``, as :class:`torch.nn.Linear` scales,
        when ``init_scale`` is ``None``; the near-identity shear of the class docstring
        otherwise."""
        bound = 1.0 / math.sqrt(self.input_dim)
        nn.init.zeros_(self.bias)
        if self.init_scale is None:
            nn.init.uniform_(self.u, -bound, bound)
            nn.init.uniform_(self.w, -bound, bound)
            return
        with torch.no_grad():
            # A unit w (not a small one): the correction in u_hat divides by |w|^2, so a small w
            # would make u's component along w, and its gradients, large.
            nn.init.normal_(self.w)
            self.w.div_(self.w.norm().clamp_min(torch.finfo(self.w.dtype).tiny))
            nn.init.uniform_(self.u, -self.init_scale * bound, self.init_scale * bound)
            w_dot_u = (self.w * self.u).sum()
            self.u.add_((_IDENTITY_W_DOT_U - w_dot_u) * self.w)

    def extra_repr(self) -> str:
        init = "" if self.init_scale is None else f", init_scale={self.init_scale}"
        return f"input_dim={self.input_dim}, nonlinearity=tanh{init}"


class ConditionalPlanar(ConditionalTransformModule):
    r"""A planar flow whose parameters :math:`(b, \mathbf{u}, \mathbf{w})` are the outputs of a
    network of a context vector (amortised flows); the same constraint
    :math:`\mathbf{w}^T\hat{\mathbf{u}} \ge -1` and the same exact inverse as :class:`Planar`.

    >>> flow = conditional_planar(2, context_dim=3)
    >>> context = torch.randn(4, 3)
    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> dist.ConditionalTransformedDistribution(base, [flow]).condition(context).log_prob(
    ...     torch.randn(4, 2)).shape
    torch.Size([4])

    :param nn: a callable ``context -> (b, u, w)`` with output sizes ``(1, D, D)``, e.g.
        :class:`~pyro.nn.DenseNN` with ``param_dims=[1, D, D]``.

    References:

    [1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. [arXiv:1505.05770]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, nn: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.nn = nn

    def condition(self, context: torch.Tensor) -> ConditionedPlanar:
        # The network runs at each call, so the conditioned map follows the current parameters
        # (and each call has its own graph); a log-det right after a forward reuses that call's.
        return ConditionedPlanar(partial(self.nn, context))


def conditional_planar(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalPlanar:
    """One :class:`ConditionalPlanar` layer whose parameters come from a
    :class:`~pyro.nn.DenseNN` of the context (hidden sizes default to
    ``[10 * input_dim, 10 * input_dim]``, as in Pyro)."""
    return ConditionalPlanar(context_hypernet(input_dim, context_dim, [1, input_dim, input_dim], hidden_dims))


@register(
    "planar",
    exact_inverse=True,
    inverse="numerical: safeguarded Newton on one monotone scalar, to machine precision",
    conditional=conditional_planar,
    description="Planar flow (Rezende & Mohamed 2015) with an exact inverse at every point",
)
def planar(input_dim: int, init_scale: float | None = None) -> Planar:
    """One :class:`Planar` layer acting on ``input_dim``-vectors; ``init_scale`` as in
    :class:`Planar` (``None``: Pyro's initialisation; a number: near the identity)."""
    return Planar(input_dim, init_scale=init_scale)
