r"""The sum-of-squares polynomial flow (Jaini et al. 2019), plain and conditional, invertible at
any point.

Pyro's :class:`~pyro.distributions.transforms.Polynomial` has no inverse (``log_prob`` at a
point it did not produce raises ``KeyError``), adds 1e-8 inside its log-det's logarithm, and has
no conditional version. Here the polynomial is evaluated by Horner's rule, its derivative as the
sum of squares it is (never below 0), and the inverse solves one increasing polynomial equation
per coordinate, in the autoregressive order (:mod:`transforms.monotone`), in a bracket from
Fujiwara's bound on the roots of a polynomial (clipped to where its terms stay finite). The
family is Pyro's, parameterised to bend on a length scale of 3 rather than 1
(:data:`LENGTH_SCALE`) and started around :math:`y = c + x`: from Pyro's parameterisation a
stack of two layers overflows float32 in an ``AutoNormalizingFlow``'s first steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import nn

from .autoregressive import bind_context, conditional_made, describe_made, made
from .coupling import _reset_linear_layers
from .monotone import MonotoneAutoregressive
from .registry import check_positive_int, register

__all__ = [
    "ConditionedPolynomial",
    "Polynomial",
    "ConditionalPolynomial",
    "polynomial",
    "conditional_polynomial",
    "sum_of_squares_polynomial",
]

# Pyro's defaults: squares of 3 polynomials of degree 4, so each coordinate map has degree 9.
DEFAULT_DEGREE = 4
DEFAULT_COUNT_SUM = 3

ShiftParam = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _horner(coefficients: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_n c_n t^n` for coefficients ``(..., N)`` in rising order."""
    value = coefficients[..., -1]
    for n in range(coefficients.size(-1) - 2, -1, -1):
        value = value * t + coefficients[..., n]
    return value


def _integral_coefficients(a: torch.Tensor) -> torch.Tensor:
    r"""The coefficients :math:`Q_1 .. Q_{2R+1}` of :math:`\int_0^t \sum_k (\sum_r a_{kr}u^r)^2
    du`, for ``a`` of shape ``(..., K, R + 1)``: :math:`Q_{m+1} = q_m / (m + 1)` with
    :math:`q_m = \sum_k \sum_{r+s=m} a_{kr} a_{ks}`."""
    degree = a.size(-1) - 1
    products = (a.unsqueeze(-1) * a.unsqueeze(-2)).sum(-3)  # (..., R + 1, R + 1), summed over k
    q = sum(F.pad(products[..., r, :], (r, degree - r)) for r in range(degree + 1))
    return q / torch.arange(1, 2 * degree + 2, dtype=a.dtype, device=a.device)


def sum_of_squares_polynomial(
    t: torch.Tensor, a: torch.Tensor, shift: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(y, log dy/dt)`` of :math:`y = c + \int_0^t \sum_k (\sum_r a_{kr} u^r)^2 du`,
    elementwise in ``t`` (``(...)``), for ``a`` of shape ``(..., K, R + 1)`` and ``shift``
    :math:`c` broadcasting with ``t``. The value by Horner's rule; the log-derivative as
    :math:`\log \sum_k (\sum_r a_{kr} t^r)^2`, a sum of squares."""
    integral = _integral_coefficients(a)
    value = shift + _horner(integral, t) * t
    slope = _horner(a, t.unsqueeze(-1)).square().sum(-1)
    return value, torch.log(slope)


def _fujiwara_bound(integral: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    r"""Fujiwara's bound on the roots of :math:`P(t) = P_0 + \sum_{n \ge 1} Q_n t^n`:
    :math:`|t| \le 2\max_j |P_{M-j}/P_M|^{1/j}`, the last term :math:`|P_0 / (2P_M)|^{1/M}`
    (infinite if the leading coefficient is 0 and another is not: callers clip it)."""
    coefficients = torch.cat([constant.unsqueeze(-1), integral], dim=-1)  # P_0 .. P_M
    degree = coefficients.size(-1) - 1
    leading = coefficients[..., -1:].abs()
    lower = coefficients[..., :-1].abs().flip(-1)  # |P_{M-1}|, ..., |P_0|
    lower = torch.cat([lower[..., :-1], 0.5 * lower[..., -1:]], dim=-1)
    powers = 1.0 / torch.arange(1, degree + 1, dtype=coefficients.dtype, device=coefficients.device)
    # a zero coefficient bounds nothing (not 0 / 0 where the leading one is 0 as well)
    ratios = torch.where(lower == 0, torch.zeros_like(lower), lower / leading)
    return 2.0 * ratios.pow(powers).max(-1).values


def _finite_range(integral: torch.Tensor) -> torch.Tensor:
    r"""The largest :math:`|t|` at which every term :math:`Q_n t^n` stays below
    :math:`\max / (2R + 2)` of the dtype, so their sum is finite: a root beyond it would need a
    target no float holds. (Fujiwara's bound is infinite where the leading coefficient is 0, and a
    solver evaluating the polynomial out there would meet inf - inf.)"""
    room = torch.finfo(integral.dtype).max / (integral.size(-1) + 1)
    powers = torch.arange(1, integral.size(-1) + 1, dtype=integral.dtype, device=integral.device)
    return (room / integral.abs()).pow(1.0 / powers).min(-1).values


class ConditionedPolynomial(MonotoneAutoregressive):
    r"""The sum-of-squares polynomial flow [1]: coordinate :math:`i` goes through an increasing
    polynomial whose coefficients are read from the coordinates before it,

    .. math::

        y_i = c_i + \int_0^{x_i} \sum_{k=1}^{K} \Big(\sum_{r=0}^{R} a^{(i)}_{kr} u^r\Big)^2 du,
        \qquad \log|\det J| = \sum_i \log \sum_k \Big(\sum_r a^{(i)}_{kr} x_i^r\Big)^2,

    with :math:`a^{(i)}_{kr} = b^{(i)}_{kr} / L^r`, :math:`b^{(i)}` the outputs of a MADE on
    :math:`\mathbf{x}_{<i}`, :math:`L` = :data:`LENGTH_SCALE` (so the map is
    :math:`c_i + L\,P(x_i / L)` for the sum of squares :math:`P` of the :math:`b`'s: Pyro's
    family, bending on the scale :math:`L` instead of 1) and :math:`c_i` learnable. The integrand is a sum of squares, zero at no more than :math:`R` points unless
    every :math:`a^{(i)}_{k\cdot}` vanishes, so each :math:`y_i` is strictly increasing, a
    polynomial of odd degree :math:`2R + 1` onto :math:`\mathbb{R}`: the layer is invertible.
    The inverse is numerical, at any point: coordinate by coordinate in the autoregressive
    order, :math:`x_i` is the real root of :math:`y_i(t) = y_i`, found by bracketed Newton to
    4 ulps (:func:`~transforms.monotone.solve_increasing`) within Fujiwara's bound on the roots
    (and the range where the polynomial's terms stay finite), with implicit-function gradients. Forward: one network call; inverse: :math:`D`.

    :param autoregressive_nn: callable ``x -> a`` of shape ``(..., K (R + 1), D)`` with MADE
        structure in the identity order (:class:`pyro.nn.AutoRegressiveNN` with
        ``param_dims=[K (R + 1)]``).
    :param shift: :math:`\mathbf{c}` (``(D,)``), or a callable returning it.
    :param count_degree: :math:`R`.
    :param count_sum: :math:`K`.

    References:

    [1] Priyank Jaini, Kira A. Selby, Yaoliang Yu. Sum-of-Squares Polynomial Flow. ICML 2019.
    [arXiv:1905.02325]
    """

    def __init__(
        self,
        autoregressive_nn: Callable[[torch.Tensor], torch.Tensor],
        shift: ShiftParam,
        *,
        count_degree: int = DEFAULT_DEGREE,
        count_sum: int = DEFAULT_COUNT_SUM,
    ):
        super().__init__()
        self.arn = autoregressive_nn
        self._shift = shift
        self.count_degree = count_degree
        self.count_sum = count_sum

    def shift(self) -> torch.Tensor:
        return self._shift() if callable(self._shift) else self._shift

    def _params(self, net_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)`` at ``net_input``: ``(..., D, K, R + 1)`` and ``(D,)``."""
        flat = self.arn(net_input)  # (..., K (R + 1), D)
        b = flat.reshape(flat.shape[:-2] + (self.count_sum, self.count_degree + 1, flat.size(-1)))
        return b.movedim(-1, -3) * self._degree_scales(b), self.shift()

    def _degree_scales(self, like: torch.Tensor) -> torch.Tensor:
        """:math:`L^{-r}`, :math:`r = 0..R` (:data:`LENGTH_SCALE`)."""
        degrees = torch.arange(self.count_degree + 1, dtype=like.dtype, device=like.device)
        return LENGTH_SCALE ** -degrees

    def _coordinate(self, params, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        a, c = params
        return a[..., index, :, :], c[..., index]

    def _transformer(self, t, a, c):
        return sum_of_squares_polynomial(t, a, c)

    def _bracket(self, target, a, c):
        integral = _integral_coefficients(a)
        bound = torch.minimum(_fujiwara_bound(integral, c - target), _finite_range(integral))
        return -bound, bound


# The length scale L on which the polynomial bends: the network's degree-r outputs b_r give the
# coefficients a_r = b_r / L^r, so y = c + L P(x / L) for the sum-of-squares P of the b's (the
# same family). With L = 1 (Pyro's) two stacked degree-9 layers at initialisation map N(0, 1)
# draws to ~1e23, and one Adam step of 1e-2 on the network moves a_4^2 x^9 at x = 3 by ~1e2:
# an AutoNormalizingFlow's first ELBO steps overflow.
LENGTH_SCALE = 3.0


def _reset(shift: nn.Parameter, net: nn.Module, count_sum: int, count_degree: int) -> None:
    r"""Around :math:`y = c + x`: :math:`c_i \sim U(\pm 1/\sqrt{D})` (as Pyro), the network as
    ``nn.Linear`` does, its output biases 0 except :math:`b_{k0} = 1/\sqrt{K}`, so that
    :math:`\sum_k b_{k0}^2 = 1`."""
    bound = 1.0 / math.sqrt(shift.numel())
    nn.init.uniform_(shift, -bound, bound)
    _reset_linear_layers(net)
    output = net.layers[-1]
    with torch.no_grad():
        # outputs are laid out (K, R + 1, D): parameter m = k (R + 1) + r of coordinate d is m D + d
        bias = output.bias.view(count_sum, count_degree + 1, -1)
        bias.zero_()
        bias[:, 0, :] = 1.0 / math.sqrt(count_sum)


class Polynomial(ConditionedPolynomial, TransformModule):
    __doc__ = ConditionedPolynomial.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> layer = transforms.build("polynomial", 3, count_degree=4, count_sum=3)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
    >>> q.log_prob(torch.randn(10, 3)).shape               # at data points, unlike Pyro's
    torch.Size([10])

    :param autoregressive_nn: a :class:`pyro.nn.AutoRegressiveNN` (its parameters, and
        :math:`\mathbf{c}`, are this module's parameters).
    :param input_dim: :math:`D`.
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, autoregressive_nn: AutoRegressiveNN, input_dim: int, **kwargs: Any):
        super().__init__(autoregressive_nn, self._module_shift, **kwargs)
        self.c = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _module_shift(self) -> torch.Tensor:
        return self.c

    def reset_parameters(self) -> None:
        """Near :math:`y = c + x`; see :func:`_reset`."""
        _reset(self.c, self.arn, self.count_sum, self.count_degree)

    def extra_repr(self) -> str:
        return describe_made(self.arn, f"count_degree={self.count_degree}, count_sum={self.count_sum}")


class ConditionalPolynomial(ConditionalTransformModule):
    r"""A sum-of-squares polynomial flow whose coefficients also read a context
    :math:`\mathbf{c}`: :math:`a^{(i)} = f_i(\mathbf{x}_{<i}, \mathbf{c})` (a conditional MADE;
    Pyro has no conditional polynomial flow). ``condition(context)`` returns a
    :class:`ConditionedPolynomial` (same log-det, same numerical inverse) that runs the network
    at each call.

    >>> import torch, transforms
    >>> layer = transforms.build("polynomial", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])

    :param autoregressive_nn: a :class:`pyro.nn.ConditionalAutoRegressiveNN` with
        ``param_dims=[K (R + 1)]`` and the identity order.
    :param input_dim: :math:`D`.
    :param count_degree: :math:`R`.
    :param count_sum: :math:`K`.

    References:

    [1] Priyank Jaini, Kira A. Selby, Yaoliang Yu. Sum-of-Squares Polynomial Flow. ICML 2019.
    [arXiv:1905.02325]
    """

    def __init__(
        self,
        autoregressive_nn: ConditionalAutoRegressiveNN,
        input_dim: int,
        *,
        count_degree: int = DEFAULT_DEGREE,
        count_sum: int = DEFAULT_COUNT_SUM,
    ):
        super().__init__()
        self.nn = autoregressive_nn
        self.count_degree = count_degree
        self.count_sum = count_sum
        self.c = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _shift(self) -> torch.Tensor:
        return self.c

    def condition(self, context: torch.Tensor) -> ConditionedPolynomial:
        return ConditionedPolynomial(
            bind_context(self.nn, context),
            self._shift,
            count_degree=self.count_degree,
            count_sum=self.count_sum,
        )

    def reset_parameters(self) -> None:
        """Near :math:`y = c + x`; see :func:`_reset`."""
        _reset(self.c, self.nn, self.count_sum, self.count_degree)

    def extra_repr(self) -> str:
        return describe_made(self.nn, f"count_degree={self.count_degree}, count_sum={self.count_sum}")


def _layout(
    input_dim: int, hidden_dims: Sequence[int] | None, count_degree: int, count_sum: int
) -> Tuple[list[int], list[int]]:
    """``(hidden_dims, param_dims)``: hidden sizes default to ``[10 * input_dim]`` (Pyro's)."""
    check_positive_int("count_degree", count_degree)
    check_positive_int("count_sum", count_sum)
    hidden = [10 * input_dim] if hidden_dims is None else list(hidden_dims)
    return hidden, [count_sum * (count_degree + 1)]


def conditional_polynomial(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    count_degree: int = DEFAULT_DEGREE,
    count_sum: int = DEFAULT_COUNT_SUM,
) -> ConditionalPolynomial:
    """A conditional sum-of-squares polynomial layer on a conditional MADE (identity order)."""
    hidden, param_dims = _layout(input_dim, hidden_dims, count_degree, count_sum)
    net = conditional_made(input_dim, context_dim, hidden, param_dims)
    return ConditionalPolynomial(net, input_dim, count_degree=count_degree, count_sum=count_sum)


@register(
    "polynomial",
    exact_inverse=True,
    inverse="numerical: bracketed Newton per coordinate in autoregressive order, to 4 ulps",
    conditional=conditional_polynomial,
    permute_between=True,
    description="Sum-of-squares polynomial flow (Jaini et al. 2019), inverse at any point",
)
def polynomial(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    count_degree: int = DEFAULT_DEGREE,
    count_sum: int = DEFAULT_COUNT_SUM,
) -> Polynomial:
    """A sum-of-squares polynomial layer (``count_sum`` squares of degree-``count_degree``
    polynomials per coordinate) on a MADE (identity order; hidden sizes default to
    ``[10 * input_dim]``, as in Pyro)."""
    hidden, param_dims = _layout(input_dim, hidden_dims, count_degree, count_sum)
    return Polynomial(
        made(input_dim, hidden, param_dims), input_dim, count_degree=count_degree, count_sum=count_sum
    )
