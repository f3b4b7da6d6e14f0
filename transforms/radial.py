r"""Radial flows (Rezende & Mohamed 2015) with an exact, closed-form inverse at every point.

Pyro's own :class:`~pyro.distributions.transforms.Radial` can only "invert" the one output it
has just produced (pyro-ppl issue 2718). The map only rescales :math:`\mathbf{x} - \mathbf{x}_0`,
so its inverse reduces to the radius, which solves a quadratic.
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
    "ConditionedRadial",
    "Radial",
    "ConditionalRadial",
    "radial",
    "conditional_radial",
]

RadialParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ConditionedRadial(Transform):
    r"""The radial map for given parameters :math:`(\mathbf{x}_0, \alpha', \beta')`, a tuple of
    tensors or a callable returning one; leading dims of the parameters broadcast against the
    input's batch dims (e.g. parameters ``(B, T, D)`` from a context, input ``(S, B, T, D)``).

    See :class:`Radial` for the equations.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, params: Union[RadialParams, Callable[[], RadialParams]]) -> None:
        super().__init__(cache_size=1)
        self._params = params
        # (x, alpha, alpha + beta, r) of the last forward call: the log-det of that same x object
        # reuses them instead of recomputing them (any other x recomputes).
        self._last_forward: Tuple[torch.Tensor, ...] | None = None

    def _constrained_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(x0, alpha, alpha + beta)`` with :math:`\alpha = \mathrm{softplus}(\alpha') > 0`
        and :math:`\beta = -\alpha + \mathrm{softplus}(\beta')` [1, A.2], so that
        :math:`\alpha + \beta = \mathrm{softplus}(\beta') > 0` is available without the
        cancellation of adding :math:`\alpha` back to :math:`\beta`."""
        x0, alpha_prime, beta_prime = self._params() if callable(self._params) else self._params
        return x0, F.softplus(alpha_prime), F.softplus(beta_prime)

    @staticmethod
    def _check_input(value: torch.Tensor, x0: torch.Tensor, what: str) -> None:
        if torch.jit.is_tracing():  # sizes are traced values then; shapes were checked eagerly
            return
        if value.dim() < 1 or value.size(-1) != x0.size(-1):
            raise ValueError(
                f"radial flow acts on vectors of size {x0.size(-1)}, got {what} of shape "
                f"{tuple(value.shape)}"
            )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        x0, alpha, alpha_plus_beta = self._constrained_params()
        self._check_input(x, x0, "x")
        offset = x - x0
        radius = torch.linalg.vector_norm(offset, dim=-1, keepdim=True)
        h = torch.reciprocal(alpha + radius)
        self._last_forward = (x, alpha, alpha_plus_beta, radius, h)
        beta = alpha_plus_beta - alpha
        # = x + beta h (x - x0), summed in place in the product (see planar.py: one temporary
        # of the input's size fewer)
        return ((beta * h) * offset).add_(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        r"""The output radius :math:`r_y = r(r + \alpha + \beta)/(\alpha + r)` gives the
        quadratic :math:`r^2 + (\alpha + \beta - r_y)\,r - \alpha r_y = 0`, whose one
        non-negative root is taken in the form free of cancellation for the sign of
        :math:`B = \alpha + \beta - r_y`; then
        :math:`\mathbf{x} = \mathbf{y} - \beta(\mathbf{y} - \mathbf{x}_0)/(r + \alpha
        + \beta)`, which never divides by :math:`r_y` and is exact at
        :math:`\mathbf{y} = \mathbf{x}_0`."""
        x0, alpha, alpha_plus_beta = self._constrained_params()
        self._check_input(y, x0, "y")
        offset = y - x0
        radius_y = torch.linalg.vector_norm(offset, dim=-1, keepdim=True)
        linear_coef = alpha_plus_beta - radius_y
        sqrt_discriminant = torch.sqrt(linear_coef.square() + 4.0 * alpha * radius_y)
        # |B| + sqrt(B^2 + 4 alpha r_y) > 0 unless softplus(beta') underflowed to 0 AND y = x0;
        # the placeholder 1 then gives r = 0, the right root.
        denominator = linear_coef.abs() + sqrt_discriminant
        safe_denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        radius = torch.where(
            linear_coef <= 0,
            0.5 * denominator,
            2.0 * alpha * radius_y / safe_denominator,
        )
        # x = y - beta (y - x0) / (r + alpha + beta), the mirror of the forward map's
        # x + beta (x - x0) / (alpha + r): no rounding of x0 is added back in, and beta -> 0
        # gives x = y exactly. The sum is 0 only in the same underflow case, with y = x0 = x.
        beta = alpha_plus_beta - alpha
        output_scale = radius + alpha_plus_beta
        safe_output_scale = torch.where(
            output_scale > 0, output_scale, torch.ones_like(output_scale)
        )
        return (beta / safe_output_scale * offset).neg_().add_(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`(D - 1)\log(1 + \beta h) + \log(1 + \beta h + \beta h' r)`, computed from
        ``x`` (from the last forward call's intermediates if it was this very ``x`` object,
        afresh otherwise; never from ``y``), with :math:`h = 1/(\alpha + r)` and both factors written as
        sums of non-negative bounded terms:
        :math:`1 + \beta h = (r + \alpha + \beta)\,h` and
        :math:`1 + \beta h + \beta h' r = r h(1 + \alpha h) + (\alpha h)(\alpha + \beta) h`:
        no cancellation as :math:`\beta \to -\alpha`, no overflow of :math:`r^2` for large
        :math:`|\mathbf{x}|`."""
        if self._last_forward is not None and self._last_forward[0] is x:
            _, alpha, alpha_plus_beta, radius, h = self._last_forward
        else:
            x0, alpha, alpha_plus_beta = self._constrained_params()
            radius = torch.linalg.vector_norm(x - x0, dim=-1, keepdim=True)
            h = torch.reciprocal(alpha + radius)
        # r h + alpha h = 1 exactly; each is taken from its own product, never as 1 minus the
        # other (which would cancel when one of them is small).
        radius_h = radius * h
        alpha_h = alpha * h
        alpha_plus_beta_h = alpha_plus_beta * h
        radial_factor = radius_h + alpha_plus_beta_h
        normal_factor = torch.addcmul(radius_h * (1.0 + alpha_h), alpha_h, alpha_plus_beta_h)
        log_det = torch.add(torch.log(normal_factor), torch.log(radial_factor), alpha=x.size(-1) - 1)
        return log_det.squeeze(-1)


class Radial(ConditionedRadial, TransformModule):
    r"""A radial flow [1], contracting or expanding around a point :math:`\mathbf{x}_0`,

    .. math::

        \mathbf{y} = \mathbf{x} + \beta\, h(\alpha, r)\,(\mathbf{x} - \mathbf{x}_0),
        \qquad h(\alpha, r) = \frac{1}{\alpha + r},\quad r = \|\mathbf{x} - \mathbf{x}_0\|,

    with learnable :math:`\mathbf{x}_0 \in \mathbb{R}^D`, :math:`\alpha > 0`,
    :math:`\beta \in \mathbb{R}`. Its log-determinant is

    .. math::

        \log|\det J| = (D - 1)\log(1 + \beta h) + \log(1 + \beta h + \beta h'(r)\, r).

    It is invertible iff :math:`\beta \ge -\alpha`, guaranteed at every call by
    :math:`\alpha = \log(1 + e^{\alpha'})`, :math:`\beta = -\alpha + \log(1 + e^{\beta'})`.

    The inverse is exact, in closed form, at any point: the output radius
    :math:`r_y = r\,(1 + \beta/(\alpha + r))` is a quadratic in :math:`r`, and
    :math:`\mathbf{x} = \mathbf{y} - \beta\,(\mathbf{y} - \mathbf{x}_0)/(\alpha + \beta
    + r)`. So :meth:`~pyro.distributions.TransformedDistribution.log_prob` works at any point,
    not only at the last sample (pyro-ppl issue 2718).

    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> flow = Radial(2)
    >>> density = dist.TransformedDistribution(base, [flow])
    >>> density.log_prob(torch.randn(5, 2)).shape      # any point, not only samples
    torch.Size([5])

    :param input_dim: the size :math:`D` of the vectors transformed.

    References:

    [1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015. [arXiv:1505.05770]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, input_dim: int) -> None:
        check_positive_int("input_dim", input_dim)
        super().__init__(self._module_params)
        self.input_dim = input_dim
        self.x0 = nn.Parameter(torch.empty(input_dim))
        self.alpha_prime = nn.Parameter(torch.empty(1))
        self.beta_prime = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def _module_params(self) -> RadialParams:
        return self.x0, self.alpha_prime, self.beta_prime

    def reset_parameters(self) -> None:
        """All parameters ``~ U(-1/sqrt(D), 1/sqrt(D))``, as :class:`torch.nn.Linear` scales
        (and as Pyro's Radial, whose parameter names these are)."""
        bound = 1.0 / math.sqrt(self.input_dim)
        for parameter in (self.x0, self.alpha_prime, self.beta_prime):
            nn.init.uniform_(parameter, -bound, bound)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


class ConditionalRadial(ConditionalTransformModule):
    r"""A radial flow whose parameters :math:`(\mathbf{x}_0, \alpha', \beta')` are the outputs
    of a network of a context vector (amortised flows), with the same constraints
    (:math:`\alpha > 0`, :math:`\beta \ge -\alpha`) and exact inverse as :class:`Radial`.

    >>> flow = conditional_radial(2, context_dim=3)
    >>> context = torch.randn(4, 3)
    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> dist.ConditionalTransformedDistribution(base, [flow]).condition(context).log_prob(
    ...     torch.randn(4, 2)).shape
    torch.Size([4])

    :param nn: a callable ``context -> (x0, alpha', beta')`` with output sizes ``(D, 1, 1)``,
        e.g. :class:`~pyro.nn.DenseNN` with ``param_dims=[D, 1, 1]``.

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

    def condition(self, context: torch.Tensor) -> ConditionedRadial:
        # The network runs at each call, so the conditioned map follows the current parameters
        # (and each call has its own graph); a log-det right after a forward reuses that call's.
        return ConditionedRadial(partial(self.nn, context))


def conditional_radial(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalRadial:
    """One :class:`ConditionalRadial` layer whose parameters come from a
    :class:`~pyro.nn.DenseNN` of the context (hidden sizes default to
    ``[10 * input_dim, 10 * input_dim]``, as in Pyro)."""
    return ConditionalRadial(context_hypernet(input_dim, context_dim, [input_dim, 1, 1], hidden_dims))


@register(
    "radial",
    exact_inverse=True,
    inverse="closed form (a quadratic in the radius)",
    conditional=conditional_radial,
    description="Radial flow (Rezende & Mohamed 2015) with a closed-form inverse",
)
def radial(input_dim: int) -> Radial:
    """One :class:`Radial` layer acting on ``input_dim``-vectors."""
    return Radial(input_dim)
