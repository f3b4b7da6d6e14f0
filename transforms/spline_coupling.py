r"""Rational-quadratic spline coupling (Durkan et al. 2019), plain and conditional.

Pyro's :class:`~pyro.distributions.transforms.SplineCoupling` has no conditional version (the
conditional one is built here), and its spline math is restated in :mod:`transforms.spline`
(see there why). Its coupling also moves the kept half by an elementwise spline by default;
here, as in the paper, the kept half passes unchanged (put an elementwise ``spline`` layer in
the stack for that).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import ConditionalDenseNN, DenseNN

from .autoregressive import bind_context
from .coupling import _Coupling, _describe, _layout, _reset_linear_layers, roll_by_split
from .registry import register
from .spline import (
    DEFAULT_BINS,
    DEFAULT_BOUND,
    SplineParams,
    check_spline_options,
    logit_scale_of,
    rational_quadratic_spline,
    split_spline_params,
)

__all__ = [
    "ConditionedSplineCoupling",
    "SplineCoupling",
    "ConditionalSplineCoupling",
    "spline_coupling",
    "conditional_spline_coupling",
]


class ConditionedSplineCoupling(_Coupling):
    r"""A coupling layer whose moved half goes through rational-quadratic splines [1] with
    parameters from a network of the kept half:

    .. math::

        \mathbf{y}_{1:d} = \mathbf{x}_{1:d}, \qquad
        y_i = g_{\theta_i(\mathbf{x}_{1:d})}(x_i) \quad (i > d),
        \qquad \log|\det J| = \sum_{i > d} \log g_{\theta_i}'(x_i),

    with :math:`g_\theta` the spline of :func:`~transforms.spline.rational_quadratic_spline`
    on :math:`[-B, B]` (identity outside). The Jacobian is block triangular with a positive
    diagonal, so the layer is invertible for any network: the inverse reads
    :math:`\theta(\mathbf{y}_{1:d})` (one network call) and inverts each spline in closed form.

    :param split_dim: :math:`d`, the number of leading coordinates kept.
    :param hypernet: callable ``x_{1:d} -> (widths, heights, derivatives)`` of sizes
        ``((D - d) K, (D - d) K, (D - d)(K - 1))``.
    :param count_bins: :math:`K`.
    :param bound: :math:`B`.
    :param logit_scale: the factor of the widths' and heights' logits (default: one over the
        square root of the hypernet's last hidden width, as in [1]'s code).

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """

    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        split_dim: int,
        hypernet: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        *,
        count_bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
        logit_scale: float | None = None,
    ):
        check_spline_options(count_bins, bound)
        super().__init__(split_dim, hypernet)
        self.count_bins = count_bins
        self.bound = float(bound)
        self.logit_scale = logit_scale_of(hypernet) if logit_scale is None else logit_scale
        # (x, log-derivatives of the moved half at x) of the last forward or inverse call
        self._last: Tuple[torch.Tensor, torch.Tensor] | None = None

    def _spline_params(self, kept: torch.Tensor, whole: torch.Tensor, moved_dim: int) -> SplineParams:
        return self._net(
            kept, whole, lambda flat: split_spline_params(flat, moved_dim, self.count_bins, self.logit_scale)
        )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(x)
        params = self._spline_params(kept, x, moved.size(-1))
        y_moved, log_derivative = rational_quadratic_spline(moved, *params, bound=self.bound)
        self._last = (x, log_derivative)
        return self._join(kept, y_moved)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(y)
        params = self._spline_params(kept, y, moved.size(-1))
        x_moved, log_derivative = rational_quadratic_spline(moved, *params, bound=self.bound, inverse=True)
        x = self._join(kept, x_moved)
        # the kept half is the same in x and y: the network's output holds at x too
        self._net_input = x
        self._last = (x, -log_derivative)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1].sum(-1)
        kept, moved = self._split(x)
        params = self._spline_params(kept, x, moved.size(-1))
        return rational_quadratic_spline(moved, *params, bound=self.bound)[1].sum(-1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_last"] = None  # tensors of one autograd graph, not state
        return state


def _spline_extra(layer: Any) -> str:
    return f", count_bins={layer.count_bins}, bound={layer.bound}"


class SplineCoupling(ConditionedSplineCoupling, TransformModule):
    __doc__ = ConditionedSplineCoupling.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> stack = transforms.flow("spline_coupling", 4, 4)   # halves rolled between layers
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), [stack])
    >>> q.log_prob(torch.randn(10, 4)).shape               # any point
    torch.Size([10])

    :param hypernet: a :class:`pyro.nn.DenseNN` (its parameters are this module's parameters).
    """

    __repr__ = torch.nn.Module.__repr__

    def reset_parameters(self) -> None:
        """Re-draws the network's weights as ``nn.Linear`` does."""
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn, _spline_extra(self))


class ConditionalSplineCoupling(ConditionalTransformModule):
    r"""A spline coupling whose spline parameters also read a context :math:`\mathbf{c}`:
    :math:`\theta = f(\mathbf{x}_{1:d}, \mathbf{c})` (Pyro has no conditional spline coupling).
    ``condition(context)`` returns a :class:`ConditionedSplineCoupling` (same log-det, same
    closed-form inverse) that runs the network at each call.

    >>> import torch, transforms
    >>> layer = transforms.build("spline_coupling", 4, context_dim=8)
    >>> z, h = torch.randn(4, 25, 4), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 4])

    :param split_dim: :math:`d`.
    :param hypernet: a :class:`pyro.nn.ConditionalDenseNN` ``(x_{1:d}, context) -> (widths,
        heights, derivatives)``.
    :param count_bins: :math:`K`.
    :param bound: :math:`B`.

    References:

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows.
    NeurIPS 2019. [arXiv:1906.04032]
    """

    def __init__(
        self,
        split_dim: int,
        hypernet: ConditionalDenseNN,
        *,
        count_bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ):
        check_spline_options(count_bins, bound)
        super().__init__()
        self.split_dim = split_dim
        self.nn = hypernet
        self.count_bins = count_bins
        self.bound = float(bound)

    def condition(self, context: torch.Tensor) -> ConditionedSplineCoupling:
        return ConditionedSplineCoupling(
            self.split_dim,
            bind_context(self.nn, context),
            count_bins=self.count_bins,
            bound=self.bound,
            logit_scale=logit_scale_of(self.nn),
        )

    def reset_parameters(self) -> None:
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn, _spline_extra(self))


def _param_dims(moved_dim: int, count_bins: int) -> list[int]:
    return [moved_dim * count_bins, moved_dim * count_bins, moved_dim * (count_bins - 1)]


def conditional_spline_coupling(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
    count_bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> ConditionalSplineCoupling:
    """A conditional spline coupling layer on a :class:`pyro.nn.ConditionalDenseNN` (split at
    ``input_dim // 2``; hidden sizes default to ``[10 * input_dim]``)."""
    check_spline_options(count_bins, bound)
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    param_dims = _param_dims(input_dim - split_dim, count_bins)
    hypernet = ConditionalDenseNN(split_dim, context_dim, hidden_dims, param_dims=param_dims)
    return ConditionalSplineCoupling(split_dim, hypernet, count_bins=count_bins, bound=bound)


@register(
    "spline_coupling",
    exact_inverse=True,
    inverse="closed form, one network call",
    conditional=conditional_spline_coupling,
    min_input_dim=2,
    permute_between=roll_by_split,
    description="Rational-quadratic spline coupling (Durkan et al. 2019), halves rolled between layers",
)
def spline_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
    count_bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> SplineCoupling:
    """A spline coupling layer on a :class:`pyro.nn.DenseNN` (split at ``input_dim // 2``;
    hidden sizes default to ``[10 * input_dim]``)."""
    check_spline_options(count_bins, bound)
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    hypernet = DenseNN(split_dim, hidden_dims, param_dims=_param_dims(input_dim - split_dim, count_bins))
    return SplineCoupling(split_dim, hypernet, count_bins=count_bins, bound=bound)
