r"""Rational-quadratic spline autoregressive flow (Durkan et al. 2019), plain and conditional.

Pyro's :class:`~pyro.distributions.transforms.SplineAutoregressive` is not reused: its helper
``spline_autoregressive(order="quadratic")``, the rational-quadratic family, builds a network
with a fourth output that the quadratic spline then fails to unpack, and its spline math is
restated in :mod:`transforms.spline` (see there why). The layer here reads its spline parameters
from a MADE with the identity order (as our IAF and MAF do); its inverse is the sequential pass
of :math:`D` network calls, each inverting one coordinate's spline in closed form.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch.distributions import Transform, constraints

from .autoregressive import bind_context, conditional_made, describe_made, made, solve_in_order
from .coupling import _reset_linear_layers
from .registry import register
from .spline import (
    DEFAULT_BINS,
    DEFAULT_BOUND,
    SplineParams,
    check_spline_options,
    logit_scale_of,
    rational_quadratic_spline,
)

__all__ = [
    "ConditionedSplineAutoregressive",
    "SplineAutoregressive",
    "ConditionalSplineAutoregressive",
    "spline_autoregressive",
    "conditional_spline_autoregressive",
]


class ConditionedSplineAutoregressive(Transform):
    r"""An autoregressive layer of rational-quadratic splines [1]: coordinate :math:`i` goes
    through a spline whose parameters are read from the coordinates before it,

    .. math::

        y_i = g_{\theta_i(\mathbf{x}_{<i})}(x_i), \qquad
        \log|\det J| = \sum_i \log g_{\theta_i}'(x_i),

    with :math:`g_\theta` the spline of :func:`~transforms.spline.rational_quadratic_spline` on
    :math:`[-B, B]` (identity outside) and :math:`\theta` the output of a MADE. The Jacobian is
    triangular with a positive diagonal, so the layer is invertible for any network. Forward and
    log-det: one network call. Inverse: exact at any point, a sequential pass of :math:`D`
    network calls, coordinate :math:`i` inverted in closed form once :math:`\mathbf{x}_{<i}` is
    known.

    :param autoregressive_nn: callable ``x -> (widths, heights, derivatives)`` of shapes
        ``(..., K, D)``, ``(..., K, D)``, ``(..., K - 1, D)`` with MADE structure in the
        identity order (:class:`pyro.nn.AutoRegressiveNN` with ``param_dims=[K, K, K - 1]``).
    :param count_bins: :math:`K`.
    :param bound: :math:`B`.
    :param logit_scale: the factor of the widths' and heights' logits (default: one over the
        square root of the network's last hidden width, as in [1]'s code).

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]

    [2] Mathieu Germain, Karol Gregor, Iain Murray, Hugo Larochelle. MADE: Masked Autoencoder for
    Distribution Estimation. ICML 2015. [arXiv:1502.03509]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = True
    volume_preserving = False

    def __init__(
        self,
        autoregressive_nn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        *,
        count_bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
        logit_scale: float | None = None,
    ):
        check_spline_options(count_bins, bound)
        super().__init__(cache_size=1)
        self.arn = autoregressive_nn
        self.count_bins = count_bins
        self.bound = float(bound)
        self.logit_scale = logit_scale_of(autoregressive_nn) if logit_scale is None else logit_scale
        # (x, per-coordinate log-derivatives at x) of the last forward or inverse call
        self._last: Tuple[torch.Tensor, torch.Tensor] | None = None

    def _params(self, net_input: torch.Tensor) -> SplineParams:
        """The network's outputs ``(..., P, D)`` as ``(..., D, P)``: coordinate-major."""
        widths, heights, derivatives = self.arn(net_input)
        scale = self.logit_scale
        return (
            scale * widths.transpose(-1, -2),
            scale * heights.transpose(-1, -2),
            derivatives.transpose(-1, -2),
        )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, log_derivative = rational_quadratic_spline(x, *self._params(x), bound=self.bound)
        self._last = (x, log_derivative)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_derivatives = []

        def update(solution: torch.Tensor, index: int) -> torch.Tensor:
            params = [p[..., index : index + 1, :] for p in self._params(solution)]
            value, log_derivative = rational_quadratic_spline(
                y[..., index : index + 1], *params, bound=self.bound, inverse=True
            )
            log_derivatives.append(-log_derivative.squeeze(-1))
            return value.squeeze(-1)

        x = solve_in_order(y, update)
        self._last = (x, torch.stack(torch.broadcast_tensors(*log_derivatives), dim=-1))
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1].sum(-1)
        return rational_quadratic_spline(x, *self._params(x), bound=self.bound)[1].sum(-1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_last"] = None  # tensors of one autograd graph, not state
        return state


def _describe(net: Any, count_bins: int, bound: float) -> str:
    return describe_made(net, f"count_bins={count_bins}, bound={bound}")


class SplineAutoregressive(ConditionedSplineAutoregressive, TransformModule):
    __doc__ = ConditionedSplineAutoregressive.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> stack = transforms.flow("spline_autoregressive", 3, 2)   # a reversal between layers
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [stack])
    >>> q.log_prob(torch.randn(10, 3)).shape               # any point: sequential inverses
    torch.Size([10])

    :param autoregressive_nn: a :class:`pyro.nn.AutoRegressiveNN` (its parameters are this
        module's parameters).
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, autoregressive_nn: AutoRegressiveNN, **kwargs: Any):
        super().__init__(autoregressive_nn, **kwargs)

    def reset_parameters(self) -> None:
        """Re-draws the network's weights as ``nn.Linear`` does."""
        _reset_linear_layers(self.arn)

    def extra_repr(self) -> str:
        return _describe(self.arn, self.count_bins, self.bound)


class ConditionalSplineAutoregressive(ConditionalTransformModule):
    r"""A spline autoregressive layer whose spline parameters also read a context
    :math:`\mathbf{c}`: :math:`\theta_i = f_i(\mathbf{x}_{<i}, \mathbf{c})` (a conditional
    MADE). ``condition(context)`` returns a :class:`ConditionedSplineAutoregressive` that runs
    the network at each call.

    >>> import torch, transforms
    >>> layer = transforms.build("spline_autoregressive", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])

    :param autoregressive_nn: a :class:`pyro.nn.ConditionalAutoRegressiveNN` with
        ``param_dims=[K, K, K - 1]`` and the identity order.
    :param count_bins: :math:`K`.
    :param bound: :math:`B`.

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """

    def __init__(
        self,
        autoregressive_nn: ConditionalAutoRegressiveNN,
        *,
        count_bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ):
        check_spline_options(count_bins, bound)
        super().__init__()
        self.nn = autoregressive_nn
        self.count_bins = count_bins
        self.bound = float(bound)

    def condition(self, context: torch.Tensor) -> ConditionedSplineAutoregressive:
        return ConditionedSplineAutoregressive(
            bind_context(self.nn, context),
            count_bins=self.count_bins,
            bound=self.bound,
            logit_scale=logit_scale_of(self.nn),
        )

    def reset_parameters(self) -> None:
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.nn, self.count_bins, self.bound)


def _hidden(input_dim: int, hidden_dims: Sequence[int] | None) -> list[int]:
    # Pyro's default for its spline autoregressive networks (3K - 1 outputs per coordinate)
    return [10 * input_dim, 10 * input_dim] if hidden_dims is None else list(hidden_dims)


def conditional_spline_autoregressive(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    count_bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> ConditionalSplineAutoregressive:
    """A conditional spline autoregressive layer on a conditional MADE (identity order; hidden
    sizes default to ``[10 * input_dim, 10 * input_dim]``, as in Pyro)."""
    check_spline_options(count_bins, bound)
    net = conditional_made(
        input_dim, context_dim, _hidden(input_dim, hidden_dims), [count_bins, count_bins, count_bins - 1]
    )
    return ConditionalSplineAutoregressive(net, count_bins=count_bins, bound=bound)


@register(
    "spline_autoregressive",
    exact_inverse=True,
    inverse="sequential pass, D network calls, each spline inverted in closed form",
    conditional=conditional_spline_autoregressive,
    permute_between=True,
    description="Rational-quadratic spline autoregressive flow on MADE (Durkan et al. 2019)",
)
def spline_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    count_bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> SplineAutoregressive:
    """A spline autoregressive layer on a MADE (identity order; hidden sizes default to
    ``[10 * input_dim, 10 * input_dim]``, as in Pyro)."""
    check_spline_options(count_bins, bound)
    net = made(input_dim, _hidden(input_dim, hidden_dims), [count_bins, count_bins, count_bins - 1])
    return SplineAutoregressive(net, count_bins=count_bins, bound=bound)
