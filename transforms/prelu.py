r"""The PReLU bijector: an elementwise leaky ReLU whose negative slope is learned and kept positive,
so the map stays monotone and invertible (the PReLU of He et al. 2015 used as a flow layer, as in
the normalizing-flow survey of Kobyzev, Prince & Brubaker 2020)."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import DenseNN
from torch import nn
from torch.distributions import Transform, constraints

from .autoregressive import soft_bound
from .hypernet import context_hypernet
from .registry import register

__all__ = ["ConditionedPReLU", "PReLU", "ConditionalPReLU", "prelu", "conditional_prelu"]

# The slope stays in (e^-5, e^5) ~ (0.007, 148): a context network could otherwise push exp() to
# overflow, and a near-zero slope makes the inverse (a division by it) blow up at large |y|.
LOG_SLOPE_BOUND = 5.0


class ConditionedPReLU(Transform):
    r"""Elementwise PReLU with a positive slope on the negative side:

        :math:`y_i = x_i` for :math:`x_i \ge 0`, :math:`\ y_i = \alpha_i x_i` for :math:`x_i < 0`,
        :math:`\quad\alpha_i = \exp(b\tanh(a_i / b)) > 0`,

    with :math:`a_i` the free parameter and :math:`b` = ``log_slope_bound``. Because
    :math:`\alpha_i > 0` the map is strictly increasing, hence invertible, with the exact inverse
    :math:`x_i = y_i` for :math:`y_i \ge 0`, :math:`x_i = y_i/\alpha_i` otherwise.
    :math:`\log|\det J| = \sum_{i:\,x_i<0}\log\alpha_i`. The map is piecewise linear: at
    :math:`x_i = 0` the Jacobian is not defined (the slope 1 is used there), a set of measure zero
    that does not affect densities.

    :param params: ``a`` (the unconstrained log-slope, size :math:`D`, any leading batch dims) or
        a callable returning it.

    References:

    [1] Kaiming He, Xiangyu Zhang, Shaoqing Ren, Jian Sun. Delving Deep into Rectifiers.
    ICCV 2015. [arXiv:1502.01852]

    [2] Ivan Kobyzev, Simon J.D. Prince, Marcus A. Brubaker. Normalizing Flows: An Introduction
    and Review of Current Methods. IEEE TPAMI 2020. [arXiv:1908.09257]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, params: Any, *, log_slope_bound: float | None = LOG_SLOPE_BOUND):
        super().__init__(cache_size=1)
        self._params = params
        self.log_slope_bound = log_slope_bound
        # (x, log-slope) of the last forward or inverse call: the log-det at that same x object
        # reuses the log-slope instead of evaluating a context network again.
        self._last_log_slope: tuple[torch.Tensor, torch.Tensor] | None = None

    def log_slope(self) -> torch.Tensor:
        """:math:`\\log\\alpha`."""
        free = self._params() if callable(self._params) else self._params
        return soft_bound(free, self.log_slope_bound)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        log_slope = self.log_slope()
        self._last_log_slope = (x, log_slope)
        return torch.where(x >= 0, x, torch.exp(log_slope) * x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_slope = self.log_slope()
        x = torch.where(y >= 0, y, torch.exp(-log_slope) * y)
        self._last_log_slope = (x, log_slope)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._last_log_slope is not None and self._last_log_slope[0] is x:
            log_slope = self._last_log_slope[1]
        else:
            log_slope = self.log_slope()
        return torch.where(x >= 0, torch.zeros_like(log_slope), log_slope).sum(-1)


class PReLU(ConditionedPReLU, TransformModule):
    __doc__ = ConditionedPReLU.__doc__ + r"""

    Example:

    >>> import torch, transforms
    >>> layer = transforms.build("prelu", 3)
    >>> y = layer(torch.tensor([1.0, -1.0, -2.0]))         # [1, -alpha_1, -2 alpha_2]
    >>> bool(y[0] == 1.0 and (y[1:] < 0).all())
    True

    :param input_dim: the dimension :math:`D` of the vectors.
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, input_dim: int, *, log_slope_bound: float | None = LOG_SLOPE_BOUND):
        super().__init__(self._free_log_slope, log_slope_bound=log_slope_bound)
        self.input_dim = input_dim
        self.free_log_slope = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _free_log_slope(self) -> torch.Tensor:
        return self.free_log_slope

    def reset_parameters(self) -> None:
        """Slopes around 1 (log-slope uniform in :math:`\\pm 1/\\sqrt{D}`, as ``nn.Linear``'s bias),
        so the layer starts near the identity but not on it."""
        bound = 1.0 / self.input_dim**0.5
        nn.init.uniform_(self.free_log_slope, -bound, bound)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, log_slope_bound={self.log_slope_bound}"


class ConditionalPReLU(ConditionalTransformModule):
    r"""PReLU whose log-slopes are a function of a context :math:`\mathbf{c}`:
    :math:`\mathbf{a} = f(\mathbf{c})` (a :class:`pyro.nn.DenseNN`). ``condition(context)`` returns a
    :class:`ConditionedPReLU` with per-context slopes (same log-det and exact inverse).

    >>> import torch, transforms
    >>> layer = transforms.build("prelu", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])
    """

    def __init__(self, slope_net: DenseNN, *, log_slope_bound: float | None = LOG_SLOPE_BOUND):
        super().__init__()
        self.nn = slope_net
        self.log_slope_bound = log_slope_bound

    def condition(self, context: torch.Tensor) -> ConditionedPReLU:
        # The network runs at each call, so the conditioned map follows the current parameters.
        # (DenseNN with one output of size 1 keeps the trailing dim: (..., D) for all D.)
        return ConditionedPReLU(partial(self.nn, context), log_slope_bound=self.log_slope_bound)

    def reset_parameters(self) -> None:
        for layer in self.nn.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.nn.param_dims[0]}, context_dim={self.nn.input_dim}, "
            f"hidden_dims={list(self.nn.hidden_dims)}, log_slope_bound={self.log_slope_bound}"
        )


def conditional_prelu(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    log_slope_bound: float | None = LOG_SLOPE_BOUND,
) -> ConditionalPReLU:
    """A PReLU layer whose slopes come from the context (``hidden_dims`` default
    ``[10 * input_dim]``)."""
    hidden_dims = [10 * input_dim] if hidden_dims is None else hidden_dims
    slope_net = context_hypernet(input_dim, context_dim, [input_dim], hidden_dims)
    return ConditionalPReLU(slope_net, log_slope_bound=log_slope_bound)


@register(
    "prelu",
    exact_inverse=True,
    inverse="closed form",
    conditional=conditional_prelu,
    description="PReLU bijector: elementwise leaky ReLU with a learned positive slope",
)
def prelu(input_dim: int, *, log_slope_bound: float | None = LOG_SLOPE_BOUND) -> PReLU:
    """An elementwise PReLU layer with learnable per-dimension slopes."""
    return PReLU(input_dim, log_slope_bound=log_slope_bound)
