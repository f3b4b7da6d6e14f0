r"""Neural autoregressive flow (NAF, Huang et al. 2018) with the deep sigmoidal flow (DSF) as its
transformer, invertible at any point.

Pyro's :class:`~pyro.distributions.transforms.NeuralAutoregressive` has no inverse
(``log_prob`` at a data point raises ``NotImplementedError``, pyro-ppl issues 1993 and 3235), and
its log-det is that of the last forward call whatever point it is asked about, with
:math:`\log(a + 10^{-8})` for :math:`\log a`. Here the map and its log-derivative are computed
in log space from any point, and the inverse solves one increasing scalar equation per
coordinate, in the autoregressive order (:mod:`transforms.monotone`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN

from .autoregressive import bind_context, conditional_made, describe_made, made, soft_bound
from .coupling import _reset_linear_layers
from .monotone import MonotoneAutoregressive
from .registry import check_positive_int, register

__all__ = [
    "ConditionedNeuralAutoregressive",
    "NeuralAutoregressive",
    "ConditionalNeuralAutoregressive",
    "naf",
    "conditional_naf",
    "sigmoidal_flow",
]

# Pyro's default number of sigmoid units per coordinate (the "width" of the DSF).
DEFAULT_HIDDEN_UNITS = 16
# The units' log-slopes log a are bounded smoothly to (-5, 5): a MADE's outputs grow linearly with
# |x|, and at |x| ~ 1e3 an unbounded a reached e^-1000, a coordinate map flat to every float (no
# inverse to find) (cf. IAF's log-scale bound; e^5 ~ 150 still makes near-steps).
LOG_SLOPE_BOUND = 5.0
# Below this, log(softplus(v)) is v to within e^v / 2 < 1.2e-16, and computing it directly would
# underflow softplus to 0 (a NaN gradient, 0 / 0) in float32 for v < -87.
_LOG_SOFTPLUS_LINEAR_BELOW = -36.0

# (log a, b, log w), each (..., D, W): slopes, offsets and log-weights of the W sigmoid units of
# every coordinate.
DSFParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _log_softplus(value: torch.Tensor) -> torch.Tensor:
    clamped = value.clamp_min(_LOG_SOFTPLUS_LINEAR_BELOW)
    return torch.where(value < _LOG_SOFTPLUS_LINEAR_BELOW, value, torch.log(F.softplus(clamped)))


def sigmoidal_flow(
    t: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, log_w: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The deep sigmoidal flow [1, eq. 8] and its log-derivative, elementwise in ``t`` (the
    units along the last dim of the parameters):

    .. math::

        y = \sigma^{-1}\Big(\sum_j w_j\,\sigma(a_j t + b_j)\Big)
          = \log \sum_j w_j \sigma(c_j) - \log \sum_j w_j \sigma(-c_j),
        \qquad c_j = a_j t + b_j,

    .. math::

        \log \frac{dy}{dt} = \log \sum_j w_j a_j \sigma(c_j)\sigma(-c_j)
          - \log \sum_j w_j \sigma(c_j) - \log \sum_j w_j \sigma(-c_j),

    all as log-sum-exps of log-sigmoids, so that neither saturates for large :math:`|t|`."""
    c = torch.exp(log_a) * t.unsqueeze(-1) + b
    log_up, log_down = F.logsigmoid(c), F.logsigmoid(-c)
    log_mass_up = torch.logsumexp(log_w + log_up, dim=-1)
    log_mass_down = torch.logsumexp(log_w + log_down, dim=-1)
    log_slope = torch.logsumexp(log_w + log_a + log_up + log_down, dim=-1) - log_mass_up - log_mass_down
    return log_mass_up - log_mass_down, log_slope


class ConditionedNeuralAutoregressive(MonotoneAutoregressive):
    r"""A neural autoregressive flow [1] with the DSF transformer: coordinate :math:`i` goes
    through a monotone one-hidden-layer sigmoidal network whose parameters are read from the
    coordinates before it,

    .. math::

        y_i = \sigma^{-1}\Big(\sum_{j=1}^{W} w_{ij}\,\sigma(a_{ij} x_i + b_{ij})\Big),
        \qquad \log|\det J| = \sum_i \log \frac{\partial y_i}{\partial x_i}

    (:func:`sigmoidal_flow`), with :math:`\log a_{ij} = 5\tanh(\log\mathrm{softplus}(\cdot)/5)`
    (:data:`LOG_SLOPE_BOUND`: Pyro's :math:`a = \mathrm{softplus}(\cdot)`, kept in
    :math:`(e^{-5}, e^5)`),
    :math:`\mathbf{w}_i = \mathrm{softmax}(\cdot)` and :math:`b_{ij}` the outputs of a MADE on
    :math:`\mathbf{x}_{<i}`. Each :math:`y_i` is strictly increasing in :math:`x_i` and onto
    :math:`\mathbb{R}`, so the layer is invertible for any network. The inverse is numerical, at
    any point: coordinate by coordinate in the autoregressive order, :math:`x_i` is the root of
    :math:`y_i(t) = y_i` in the bracket :math:`[\min_j (y_i - b_{ij})/a_{ij},
    \max_j (y_i - b_{ij})/a_{ij}]` (as :math:`y_i` lies between the smallest and largest
    :math:`c_{ij}`), by bracketed Newton to 4 ulps (:func:`~transforms.monotone.solve_increasing`),
    with implicit-function gradients. Forward: one network call; inverse: :math:`D`.

    :param autoregressive_nn: callable ``x -> (a_raw, w_raw, b)``, each ``(..., W, D)``, with
        MADE structure in the identity order (:class:`pyro.nn.AutoRegressiveNN` with
        ``param_dims=[W, W, W]``).

    References:

    [1] Chin-Wei Huang, David Krueger, Alexandre Lacoste, Aaron Courville. Neural Autoregressive
    Flows. ICML 2018. [arXiv:1804.00779]

    [2] Mathieu Germain, Karol Gregor, Iain Murray, Hugo Larochelle. MADE: Masked Autoencoder for
    Distribution Estimation. ICML 2015. [arXiv:1502.03509]
    """

    def __init__(self, autoregressive_nn: Callable[[torch.Tensor], Sequence[torch.Tensor]]):
        super().__init__()
        self.arn = autoregressive_nn

    def _params(self, net_input: torch.Tensor) -> DSFParams:
        """``(log a, b, log w)`` at ``net_input``, each ``(..., D, W)``."""
        a_raw, w_raw, b = (p.transpose(-1, -2) for p in self.arn(net_input))
        log_a = soft_bound(_log_softplus(a_raw), LOG_SLOPE_BOUND)
        return log_a, b, torch.log_softmax(w_raw, dim=-1)

    def _coordinate(self, params: DSFParams, index: int) -> DSFParams:
        return tuple(p[..., index, :] for p in params)

    def _transformer(self, t, log_a, b, log_w):
        return sigmoidal_flow(t, log_a, b, log_w)

    def _bracket(self, target, log_a, b, log_w):
        ends = (target.unsqueeze(-1) - b) * torch.exp(-log_a)
        return ends.min(-1).values, ends.max(-1).values


def _describe(net: Any) -> str:
    return describe_made(net, f"hidden_units={net.param_dims[0]}")


class NeuralAutoregressive(ConditionedNeuralAutoregressive, TransformModule):
    __doc__ = ConditionedNeuralAutoregressive.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> layer = transforms.build("naf", 3, hidden_units=16)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
    >>> q.log_prob(torch.randn(10, 3)).shape               # at data points, unlike Pyro's
    torch.Size([10])

    :param autoregressive_nn: a :class:`pyro.nn.AutoRegressiveNN` (its parameters are this
        module's parameters).
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, autoregressive_nn: AutoRegressiveNN):
        super().__init__(autoregressive_nn)

    def reset_parameters(self) -> None:
        """Re-draws the network's weights as ``nn.Linear`` does."""
        _reset_linear_layers(self.arn)

    def extra_repr(self) -> str:
        return _describe(self.arn)


class ConditionalNeuralAutoregressive(ConditionalTransformModule):
    r"""A NAF layer whose DSF parameters also read a context :math:`\mathbf{c}`:
    :math:`(a, w, b)_i = f_i(\mathbf{x}_{<i}, \mathbf{c})` (a conditional MADE).
    ``condition(context)`` returns a :class:`ConditionedNeuralAutoregressive` (same log-det, same
    numerical inverse) that runs the network at each call.

    >>> import torch, transforms
    >>> layer = transforms.build("naf", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])

    :param autoregressive_nn: a :class:`pyro.nn.ConditionalAutoRegressiveNN` with
        ``param_dims=[W, W, W]`` and the identity order.

    References:

    [1] Chin-Wei Huang, David Krueger, Alexandre Lacoste, Aaron Courville. Neural Autoregressive
    Flows. ICML 2018. [arXiv:1804.00779]
    """

    def __init__(self, autoregressive_nn: ConditionalAutoRegressiveNN):
        super().__init__()
        self.nn = autoregressive_nn

    def condition(self, context: torch.Tensor) -> ConditionedNeuralAutoregressive:
        return ConditionedNeuralAutoregressive(bind_context(self.nn, context))

    def reset_parameters(self) -> None:
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.nn)


def _layout(input_dim: int, hidden_dims: Sequence[int] | None, hidden_units: int) -> list[int]:
    check_positive_int("hidden_units", hidden_units)
    # Pyro's default for its NAF networks
    return [3 * input_dim + 1] if hidden_dims is None else list(hidden_dims)


def conditional_naf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    hidden_units: int = DEFAULT_HIDDEN_UNITS,
) -> ConditionalNeuralAutoregressive:
    """A conditional NAF layer on a conditional MADE (identity order; hidden sizes default to
    ``[3 * input_dim + 1]``, as in Pyro)."""
    hidden = _layout(input_dim, hidden_dims, hidden_units)
    net = conditional_made(input_dim, context_dim, hidden, [hidden_units] * 3)
    return ConditionalNeuralAutoregressive(net)


@register(
    "naf",
    exact_inverse=True,
    inverse="numerical: bracketed Newton per coordinate in autoregressive order, to 4 ulps",
    conditional=conditional_naf,
    permute_between=True,
    description="Neural autoregressive flow, deep sigmoidal (Huang et al. 2018), inverse at any point",
)
def naf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    hidden_units: int = DEFAULT_HIDDEN_UNITS,
) -> NeuralAutoregressive:
    """A NAF layer (DSF of ``hidden_units`` sigmoids per coordinate) on a MADE (identity order;
    hidden sizes default to ``[3 * input_dim + 1]``, as in Pyro)."""
    hidden = _layout(input_dim, hidden_dims, hidden_units)
    return NeuralAutoregressive(made(input_dim, hidden, [hidden_units] * 3))
