r"""Rational-quadratic neural spline flows (Durkan et al. 2019): the spline math, and the
elementwise spline layer (plain and conditional). The coupling and autoregressive layers built on
the same math are in :mod:`transforms.spline_coupling` and :mod:`transforms.spline_autoregressive`.

On :math:`[-B, B]` each coordinate is mapped by a monotone rational-quadratic spline of :math:`K`
bins whose knots, heights and knot derivatives are parameters; outside it the map is the identity
("linear tails"), and the spline meets the tails with slope 1, so the map is :math:`C^1`. The
inverse is in closed form: in each bin it is the root of a quadratic.

The math is that of Pyro's ``_monotonic_rational_spline`` (order ``"quadratic"``). It is written
out here because Pyro's pads the boundary derivatives to :math:`1 - \delta_{min}` instead of 1
(measured: slope 0.999 just inside :math:`\pm B`, 1 just outside, so the density steps by 0.1%
there and the map is not the paper's :math:`C^1` one), its elementwise
:class:`~pyro.distributions.transforms.Spline` acts on event dim 0 (a log-det per coordinate,
where a layer of this registry gives one per vector), and its
``spline_autoregressive(order="quadratic")`` fails to run (its network has a fourth output that
the quadratic order does not unpack). Its default order, ``"linear"``,
is the linear rational spline of Dolatabadi et al. (2020), not this family.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .hypernet import context_hypernet
from .registry import check_positive_int, register

__all__ = [
    "rational_quadratic_spline",
    "SplineParams",
    "ConditionedSpline",
    "Spline",
    "ConditionalSpline",
    "spline",
    "conditional_spline",
    "check_spline_options",
    "split_spline_params",
    "logit_scale_of",
    "DEFAULT_BINS",
    "DEFAULT_BOUND",
]

# Pyro's defaults (and nflows' order of magnitude): 8 bins on [-3, 3].
DEFAULT_BINS = 8
DEFAULT_BOUND = 3.0
# Smallest bin width and height (as fractions of 2B) and knot derivative, as in Durkan et al.'s
# code: a bin that collapses, or a slope that reaches 0, would make the inverse ill-conditioned.
MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus of this is 1 - MIN_DERIVATIVE: unnormalised derivatives at it give knot slopes of 1.
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - MIN_DERIVATIVE))

# (unnormalised widths, heights, derivatives): (..., D, K), (..., D, K), (..., D, K - 1).
SplineParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _knots(unnormalised: torch.Tensor, bound: float, minimum: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sizes, knots)``: bin sizes from a softmax with a floor of ``minimum`` (of the total),
    spread over ``[-bound, bound]``; the end knots are exactly ``-bound`` and ``bound``."""
    count = unnormalised.size(-1)
    fractions = minimum + (1.0 - minimum * count) * torch.softmax(unnormalised, dim=-1)
    inner = torch.cumsum(fractions[..., :-1], dim=-1) * (2.0 * bound) - bound
    ends = inner.new_full(inner.shape[:-1] + (1,), bound)
    knots = torch.cat([-ends, inner, ends], dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]`` per element, broadcasting the leading dims of both."""
    shape = torch.broadcast_shapes(values.shape[:-1], index.shape)
    return values.expand(shape + values.shape[-1:]).gather(-1, index.expand(shape).unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    inputs: torch.Tensor,
    unnormalised_widths: torch.Tensor,
    unnormalised_heights: torch.Tensor,
    unnormalised_derivatives: torch.Tensor,
    *,
    bound: float = DEFAULT_BOUND,
    inverse: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The monotone rational-quadratic spline of [1] on :math:`[-B, B]`, the identity outside,
    applied elementwise: ``(outputs, log|d outputs / d inputs|)``, both of the broadcast shape
    of ``inputs`` and the parameters' leading dims.

    With bin :math:`k` of width :math:`w_k`, height :math:`h_k`, slope
    :math:`s_k = h_k / w_k` and knot derivatives :math:`\delta_k, \delta_{k+1}`, and
    :math:`\xi = (x - x_k) / w_k \in [0, 1]`,

    .. math::

        y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi(1 - \xi)]}
            {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1 - \xi)},
        \qquad
        \frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1}\xi^2 + 2 s_k \xi(1 - \xi)
            + \delta_k (1 - \xi)^2]}{[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1 - \xi)]^2}.

    The inverse solves the quadratic :math:`a\xi^2 + b\xi + c = 0` for :math:`\xi` in the
    bin of :math:`y`, by the root :math:`2c / (-b - \sqrt{b^2 - 4ac})`, free of cancellation.

    :param inputs: ``(..., D)`` points (outputs of the spline when ``inverse``).
    :param unnormalised_widths: ``(..., D, K)``, softmax-normalised into the bin widths.
    :param unnormalised_heights: ``(..., D, K)``, into the bin heights.
    :param unnormalised_derivatives: ``(..., D, K - 1)``, softplus + :data:`MIN_DERIVATIVE` into
        the inner knots' derivatives (the two end knots have derivative 1).
    :param bound: :math:`B`.
    :param inverse: compute the inverse map (and its log-derivative) instead.

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """
    widths, x_knots = _knots(unnormalised_widths, bound, MIN_BIN_WIDTH)
    heights, y_knots = _knots(unnormalised_heights, bound, MIN_BIN_HEIGHT)
    inner_derivatives = MIN_DERIVATIVE + F.softplus(unnormalised_derivatives)
    ones = inner_derivatives.new_ones(inner_derivatives.shape[:-1] + (1,))
    derivatives = torch.cat([ones, inner_derivatives, ones], dim=-1)

    inside = (inputs >= -bound) & (inputs <= bound)
    # The spline's formulas run on clamped inputs, so values (and gradients) that the tails
    # replace are finite and never put a NaN into the backward pass.
    clamped = inputs.clamp(-bound, bound)
    knots = y_knots if inverse else x_knots
    # the bin: how many inner knots lie at or below the input (0 .. K - 1)
    index = (clamped.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1)

    width = _gather(widths, index)
    height = _gather(heights, index)
    x_start = _gather(x_knots[..., :-1], index)
    y_start = _gather(y_knots[..., :-1], index)
    derivative_lo = _gather(derivatives[..., :-1], index)
    derivative_hi = _gather(derivatives[..., 1:], index)
    slope = height / width
    curvature = derivative_lo + derivative_hi - 2.0 * slope

    if inverse:
        offset = clamped - y_start
        a = offset * curvature + height * (slope - derivative_lo)
        b = height * derivative_lo - offset * curvature
        c = -slope * offset
        # b^2 - 4ac >= 0 in exact arithmetic; rounding can take it just below 0
        discriminant = (b.square() - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))
        spline_out = xi * width + x_start
    else:
        xi = (clamped - x_start) / width
        xi_one_minus_xi = xi * (1.0 - xi)
        numerator = height * (slope * xi.square() + derivative_lo * xi_one_minus_xi)
        spline_out = y_start + numerator / (slope + curvature * xi_one_minus_xi)
    xi_one_minus_xi = xi * (1.0 - xi)
    denominator = slope + curvature * xi_one_minus_xi
    derivative_numerator = slope.square() * (
        derivative_hi * xi.square() + 2.0 * slope * xi_one_minus_xi + derivative_lo * (1.0 - xi).square()
    )
    log_derivative = torch.log(derivative_numerator) - 2.0 * torch.log(denominator)
    if inverse:
        log_derivative = -log_derivative
    outputs = torch.where(inside, spline_out, inputs)
    return outputs, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))


def check_spline_options(count_bins: int, bound: float) -> None:
    """ValueError naming ``count_bins`` (an int >= 2 that the bin floors leave room for) or
    ``bound`` (a positive finite number) when either is invalid."""
    check_positive_int("count_bins", count_bins)
    if count_bins < 2 or count_bins * max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT) >= 1.0:
        raise ValueError(
            f"count_bins must be an int in [2, {int(1.0 / MIN_BIN_WIDTH) - 1}], got {count_bins!r}"
        )
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")


def logit_scale_of(net: Any) -> float:
    """:math:`1/\\sqrt{H}` for a network whose last hidden layer has :math:`H` units (1 when it
    names none). Durkan et al.'s code divides the widths' and heights' logits by it: a network's
    outputs grow with :math:`\\sqrt{H}` once its weights move, and unscaled they would put most
    bins at their floor width, with slopes of 1e3 between them (a map no grid resolves and
    whose inverse loses 12 digits). A linear network (``hidden_dims == []``) reads its input
    directly, so :math:`H` is its input width."""
    hidden_dims = getattr(net, "hidden_dims", None)
    if hidden_dims == [] and isinstance(getattr(net, "input_dim", None), int):
        return 1.0 / math.sqrt(net.input_dim)
    return 1.0 / math.sqrt(hidden_dims[-1]) if hidden_dims else 1.0


def split_spline_params(
    flat: Sequence[torch.Tensor], dim: int, count_bins: int, logit_scale: float = 1.0
) -> SplineParams:
    """A dense network's three outputs ``(..., dim * K)``, ``(..., dim * K)``,
    ``(..., dim * (K - 1))`` as ``(..., dim, K)``, ``(..., dim, K)``, ``(..., dim, K - 1)``, the
    widths' and heights' logits multiplied by ``logit_scale`` (see :func:`logit_scale_of`)."""
    widths, heights, derivatives = flat
    lead = widths.shape[:-1]
    return (
        logit_scale * widths.reshape(lead + (dim, count_bins)),
        logit_scale * heights.reshape(lead + (dim, count_bins)),
        derivatives.reshape(derivatives.shape[:-1] + (dim, count_bins - 1)),
    )


class ConditionedSpline(Transform):
    r"""The elementwise rational-quadratic spline for given parameters (a :data:`SplineParams`
    tuple of unnormalised widths, heights and derivatives, or a callable returning one; leading
    dims broadcast against the input's). See :class:`Spline` for the equations.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = False
    volume_preserving = False

    def __init__(
        self, params: Union[SplineParams, Callable[[], SplineParams]], *, bound: float = DEFAULT_BOUND
    ) -> None:
        super().__init__(cache_size=1)
        self._params = params
        self.bound = bound
        # (x, log-derivatives at x) of the last forward or inverse call
        self._last: Tuple[torch.Tensor, torch.Tensor] | None = None

    def _spline(self, value: torch.Tensor, inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        params = self._params() if callable(self._params) else self._params
        return rational_quadratic_spline(value, *params, bound=self.bound, inverse=inverse)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, log_derivative = self._spline(x, inverse=False)
        self._last = (x, log_derivative)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x, log_derivative = self._spline(y, inverse=True)
        self._last = (x, -log_derivative)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of the log-derivatives at ``x``: those of the last call when it produced or
        read this very ``x``, computed afresh otherwise (never from ``y``)."""
        if self._last is not None and self._last[0] is x:
            return self._last[1].sum(-1)
        return self._spline(x, inverse=False)[1].sum(-1)


class Spline(ConditionedSpline, TransformModule):
    r"""An elementwise rational-quadratic spline flow [1]: each coordinate :math:`x_i` is mapped
    by its own monotone spline :math:`g_i` of :math:`K` bins on :math:`[-B, B]` and by the
    identity outside,

    .. math::

        y_i = g_i(x_i), \qquad \log|\det J| = \sum_i \log g_i'(x_i),

    with :math:`g_i` and :math:`g_i'` as in :func:`rational_quadratic_spline` (in bin :math:`k`,
    a ratio of two quadratics in :math:`\xi = (x_i - x_k)/w_k`). The widths and heights are a
    softmax of free parameters (each at least :data:`MIN_BIN_WIDTH` of :math:`2B`) and the inner
    knot derivatives a softplus (at least :data:`MIN_DERIVATIVE`), so every :math:`g_i` is
    strictly increasing for any parameters: the layer is invertible, with the exact closed-form
    inverse (the root of a quadratic in each bin) at any point.

    >>> import torch, pyro.distributions as dist, transforms
    >>> layer = transforms.build("spline", 2, count_bins=8, bound=3.0)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [layer])
    >>> q.log_prob(torch.randn(5, 2)).shape                # any point
    torch.Size([5])

    :param input_dim: the size :math:`D` of the vectors.
    :param count_bins: :math:`K`.
    :param bound: :math:`B`, the half-width of the box the spline acts on.

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """

    __repr__ = nn.Module.__repr__

    def __init__(
        self, input_dim: int, count_bins: int = DEFAULT_BINS, bound: float = DEFAULT_BOUND
    ) -> None:
        check_positive_int("input_dim", input_dim)
        check_spline_options(count_bins, bound)
        super().__init__(self._module_params, bound=float(bound))
        self.input_dim = input_dim
        self.count_bins = count_bins
        self.unnormalised_widths = nn.Parameter(torch.empty(input_dim, count_bins))
        self.unnormalised_heights = nn.Parameter(torch.empty(input_dim, count_bins))
        self.unnormalised_derivatives = nn.Parameter(torch.empty(input_dim, count_bins - 1))
        self.reset_parameters()

    def _module_params(self) -> SplineParams:
        return self.unnormalised_widths, self.unnormalised_heights, self.unnormalised_derivatives

    def reset_parameters(self) -> None:
        """Near the identity: equal bins and unit knot slopes (the identity itself), each free
        parameter then moved by :math:`U(-1/\\sqrt{K}, 1/\\sqrt{K})`."""
        spread = 1.0 / math.sqrt(self.count_bins)
        nn.init.uniform_(self.unnormalised_widths, -spread, spread)
        nn.init.uniform_(self.unnormalised_heights, -spread, spread)
        nn.init.uniform_(self.unnormalised_derivatives, IDENTITY_DERIVATIVE - spread, IDENTITY_DERIVATIVE + spread)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_bins={self.count_bins}, bound={self.bound}"


class ConditionalSpline(ConditionalTransformModule):
    r"""An elementwise rational-quadratic spline whose parameters are the outputs of a network of
    a context, :math:`(\mathbf{w}, \mathbf{h}, \boldsymbol{\delta}) = f(\mathbf{c})`;
    ``condition(context)`` gives a :class:`ConditionedSpline` (same log-det, same closed-form
    inverse) that runs the network at each call, so it follows the current parameters.

    >>> import torch, transforms
    >>> layer = transforms.build("spline", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])

    :param nn: a callable ``context -> (widths, heights, derivatives)`` of sizes
        ``(D * K, D * K, D * (K - 1))``, e.g. :class:`~pyro.nn.DenseNN` (the widths' and heights'
        logits are divided by the square root of its last hidden width, as in [1]'s code).
    :param input_dim: :math:`D`.
    :param count_bins: :math:`K`.
    :param bound: :math:`B`.

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        nn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        input_dim: int,
        count_bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ) -> None:
        check_spline_options(count_bins, bound)
        super().__init__()
        self.nn = nn
        self.input_dim = input_dim
        self.count_bins = count_bins
        self.bound = float(bound)
        self.logit_scale = logit_scale_of(nn)

    def _params(self, context: torch.Tensor) -> SplineParams:
        return split_spline_params(self.nn(context), self.input_dim, self.count_bins, self.logit_scale)

    def condition(self, context: torch.Tensor) -> ConditionedSpline:
        return ConditionedSpline(partial(self._params, context), bound=self.bound)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_bins={self.count_bins}, bound={self.bound}"


def conditional_spline(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    count_bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> ConditionalSpline:
    """A :class:`ConditionalSpline` on a :class:`~pyro.nn.DenseNN` of the context (hidden sizes
    default to ``[10 * input_dim, 10 * input_dim]``, as in Pyro)."""
    check_spline_options(count_bins, bound)
    sizes = [input_dim * count_bins, input_dim * count_bins, input_dim * (count_bins - 1)]
    return ConditionalSpline(
        context_hypernet(input_dim, context_dim, sizes, hidden_dims), input_dim, count_bins, bound
    )


@register(
    "spline",
    exact_inverse=True,
    inverse="closed form (a quadratic per bin)",
    conditional=conditional_spline,
    description="Elementwise rational-quadratic spline (Durkan et al. 2019), identity tails",
)
def spline(input_dim: int, count_bins: int = DEFAULT_BINS, bound: float = DEFAULT_BOUND) -> Spline:
    """One elementwise :class:`Spline` layer of ``count_bins`` bins on ``[-bound, bound]``."""
    return Spline(input_dim, count_bins, bound)
