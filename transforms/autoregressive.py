r"""Autoregressive affine flows on MADE: IAF (Kingma et al. 2016) and MAF (Papamakarios et al. 2017).

Both use one masked autoencoder (MADE, :class:`pyro.nn.AutoRegressiveNN`) that outputs a shift and a
log-scale for coordinate :math:`i` from the coordinates before it. They differ only in which side of
the map the network reads:

- **IAF** reads the *input*: :math:`y = \sigma(x)\odot x + \mu(x)`. Sampling (forward) is one
  network call; the inverse is a sequential pass of :math:`D` calls.
- **MAF** reads the *output*: :math:`y = \sigma(y)\odot x + \mu(y)`, i.e.
  :math:`x = (y - \mu(y))\odot\sigma(y)^{-1}`. Density evaluation (inverse) is one network call;
  sampling (forward) is the sequential pass.

The math is that of Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive` (its
``stable=True`` update is the gated update of Kingma et al. eq. 14, offered here as ``gated=True``).
It is written out here rather than reused because, in pyro-ppl 1.9.2, that class's inverse seeds
the sequential pass with ``torch.zeros`` in the *default* dtype (so a float64 flow cannot be
inverted at a fresh point), its log-scale clip is a hard clamp with a straight-through gradient
(not the gradient of the map it computes), and it has no MAF direction. Here the log-scale is
bounded smoothly (:func:`soft_bound`), the sequential pass keeps the input's dtype and device, and
the MADE is built with the identity order so that seeds and saved state are reproducible (the
registry's :class:`~transforms.Reverse` between layers alternates the order instead of a random
permutation inside the network).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch.distributions import Transform, constraints

from .registry import register

__all__ = [
    "ConditionedInverseAutoregressive",
    "InverseAutoregressive",
    "ConditionalInverseAutoregressive",
    "ConditionedMaskedAutoregressive",
    "MaskedAutoregressive",
    "ConditionalMaskedAutoregressive",
    "iaf",
    "conditional_iaf",
    "maf",
    "conditional_maf",
    "made",
    "conditional_made",
    "soft_bound",
    "bind_context",
    "solve_in_order",
    "describe_made",
]

# One layer stretches or shrinks a coordinate by at most e^3 ~ 20. MADE's ReLU outputs grow
# linearly with |x|, so an unbounded exp overflows float32 for |x| ~ 1e3; the bound is smooth
# (tanh), so the gradient is that of the map actually computed.
LOG_SCALE_BOUND = 3.0
# The gate logit of the gated update is bounded the same way, keeping the gate in
# (sigmoid(-6), sigmoid(6)) ~ (0.0025, 0.9975): its inverse divides by the gate.
GATE_LOGIT_BOUND = 6.0
# Kingma et al. (2016) initialise the gate near 1 ("forget gate bias" of +1 or +2); Pyro's default.
SIGMOID_BIAS = 2.0

NetOutput = tuple[torch.Tensor, torch.Tensor]


def soft_bound(value: torch.Tensor, bound: float | None) -> torch.Tensor:
    r""":math:`b\tanh(v / b)`: the identity near 0, smoothly saturating at :math:`\pm b`;
    ``bound=None`` returns ``value`` unchanged (as a contiguous tensor, see below).

    The result is always a fresh contiguous tensor. The networks' log-scales are column slices of
    one output tensor (MADE's ``(..., 2, D)`` view, DenseNN's split), and torch's CPU ``exp``,
    which every caller applies next, runs 2-3x slower on such a strided view than on a copy
    (measured 199 vs 75 us, copy included, on 4096 x 16 floats; torch 2.13, AVX2)."""
    if bound is None:
        return value.contiguous()
    # Evaluated as 2b sigmoid(2v / b) - b, the same function: torch's CPU tanh kernel costs about
    # three sigmoids (measured 107 vs 31 us on 4096 x 8 floats, torch 2.13, AVX2), and this bound
    # runs on every coordinate of every autoregressive and coupling layer. The sigmoid and the
    # subtraction run in place on temporaries autograd does not keep (the product by 2/b; the
    # product by 2b, where the sigmoid's own output is kept for its backward): one allocation
    # fewer per layer, which at 4096 x 64 is most of the bound's cost here. Without a graph to
    # record, the product by 2b runs in place as well: one more allocation fewer.
    scaled = (value * (2.0 / bound)).sigmoid_()
    if torch.is_grad_enabled() and value.requires_grad:
        return scaled.mul(2.0 * bound).sub_(bound)
    return scaled.mul_(2.0 * bound).sub_(bound)


class _ContextBoundNet:
    """``net(x, context=context)`` as a one-argument callable; see :func:`bind_context`."""

    def __init__(self, net: Callable[..., Any], context: torch.Tensor):
        self.net = net
        self.context = context

    def __call__(self, x: torch.Tensor) -> Any:
        batch_shape = torch.broadcast_shapes(x.shape[:-1], self.context.shape[:-1])
        return self.net(
            x.expand(batch_shape + x.shape[-1:]),
            context=self.context.expand(batch_shape + self.context.shape[-1:]),
        )


def bind_context(net: Callable[..., Any], context: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """``x -> net(x, context=context)``, broadcasting the leading dims of ``x`` and ``context``
    against each other (Pyro's conditional networks only expand the context to ``x``, which fails
    when the context has more batch dims than ``x``, e.g. one ``x`` scored under many contexts)."""
    return _ContextBoundNet(net, context)


def made(
    input_dim: int, hidden_dims: Sequence[int] | None = None, param_dims: Sequence[int] = (1, 1)
) -> AutoRegressiveNN:
    """A MADE with the identity order (output ``i`` reads inputs ``< i``), returning a shift and
    a raw log-scale (or the outputs ``param_dims`` name, as :class:`pyro.nn.AutoRegressiveNN`).
    Default ``hidden_dims``: ``[3 * input_dim + 1]`` (Pyro's default)."""
    hidden_dims = list(hidden_dims) if hidden_dims is not None else [3 * input_dim + 1]
    with warnings.catch_warnings():
        # At input_dim 1 the MADE's outputs are learnable constants (nothing comes before x_0):
        # the layer is an elementwise map, which is what we want there.
        warnings.filterwarnings("ignore", message=".*input_dim = 1.*")
        return AutoRegressiveNN(
            input_dim, hidden_dims, param_dims=list(param_dims), permutation=torch.arange(input_dim)
        )


def conditional_made(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    param_dims: Sequence[int] = (1, 1),
) -> ConditionalAutoRegressiveNN:
    """A conditional MADE (Paige & Wood 2016) with the identity order; every output also reads
    the context. Default ``hidden_dims``: ``[10 * input_dim]`` (Pyro's default)."""
    hidden_dims = list(hidden_dims) if hidden_dims is not None else [10 * input_dim]
    with warnings.catch_warnings():
        # At input_dim 1 the outputs depend on the context only: an elementwise map.
        warnings.filterwarnings("ignore", message=".*input_dim = 1.*")
        return ConditionalAutoRegressiveNN(
            input_dim,
            context_dim,
            hidden_dims,
            param_dims=list(param_dims),
            permutation=torch.arange(input_dim),
        )


def solve_in_order(
    known: torch.Tensor, update: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """The sequential pass of an autoregressive map with the identity order: coordinate ``i`` of
    the solution is ``update(solution, i)`` (shape ``known.shape[:-1]``, or broader when a
    context broadens the batch), computed from a solution whose coordinates ``< i`` are fixed and
    the rest 0. Gradients flow through every step."""
    dim = known.size(-1)
    position = torch.arange(dim, device=known.device)
    solution = torch.zeros_like(known)
    for index in range(dim):
        solution = torch.where(position == index, update(solution, index).unsqueeze(-1), solution)
    return solution


def describe_made(net: Any, extra: str) -> str:
    """``extra_repr`` text of a layer on a (conditional) MADE: its sizes, then ``extra``."""
    context = f", context_dim={net.context_dim}" if getattr(net, "context_dim", 0) else ""
    return f"input_dim={net.input_dim}{context}, hidden_dims={list(net.hidden_dims)}, {extra}"


def _order_of(net: Any) -> tuple[int, ...] | None:
    """A MADE's autoregressive order (its ``permutation``), or None for the identity order."""
    permutation = getattr(net, "permutation", None)
    return None if permutation is None else tuple(int(i) for i in permutation)


class _MADEAffine(Transform):
    """What IAF and MAF share: the network, its order, the scale/shift of the affine update and a
    one-entry cache of the log-scale keyed by the identity of the tensor the network read."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = True

    def __init__(
        self,
        autoregressive_nn: Callable[[torch.Tensor], NetOutput],
        *,
        order: Sequence[int] | None = None,
        gated: bool = False,
        sigmoid_bias: float = SIGMOID_BIAS,
        log_scale_bound: float | None = LOG_SCALE_BOUND,
        gate_logit_bound: float | None = GATE_LOGIT_BOUND,
    ):
        super().__init__(cache_size=1)
        self.arn = autoregressive_nn
        self.gated = gated
        self.sigmoid_bias = sigmoid_bias
        self.log_scale_bound = log_scale_bound
        self.gate_logit_bound = gate_logit_bound
        # The order in which a sequential pass fixes coordinates, read once as a Python tuple so
        # that the pass has no tensor-to-int conversion under torch.jit.trace.
        self._order = _order_of(autoregressive_nn) if order is None else tuple(order)
        self._net_input: torch.Tensor | None = None
        self._net_log_scale: torch.Tensor | None = None

    def _scale_shift(self, net_input: torch.Tensor) -> NetOutput:
        """``(log_scale, shift)`` of the update ``out = exp(log_scale) * in + shift``."""
        mean, raw = self.arn(net_input)
        if self.gated:
            # Kingma et al. (2016) eq. 14: y = s * x + (1 - s) * m with s = sigmoid(logit)
            logit = soft_bound(raw + self.sigmoid_bias, self.gate_logit_bound)
            return F.logsigmoid(logit), torch.sigmoid(-logit) * mean
        return soft_bound(raw, self.log_scale_bound), mean

    def _remember(self, net_input: torch.Tensor, log_scale: torch.Tensor) -> None:
        self._net_input = net_input
        self._net_log_scale = log_scale

    def _log_scale_at(self, net_input: torch.Tensor) -> torch.Tensor:
        """The log-scale where the network reads ``net_input``: reused only when the very same
        tensor was read last, recomputed otherwise (never a stale value)."""
        if net_input is self._net_input and self._net_log_scale is not None:
            return self._net_log_scale
        return self._scale_shift(net_input)[0]

    def _sequence(self, dim: int) -> Sequence[int]:
        if self._order is None:
            return range(dim)
        # (under tracing, sizes are traced values: checking them would be baked in anyway)
        if not torch.jit.is_tracing() and len(self._order) != dim:
            raise ValueError(f"expected vectors of size {len(self._order)}, got size {dim}")
        return self._order

    def _solve(
        self, known: torch.Tensor, update: Callable[[torch.Tensor], NetOutput]
    ) -> NetOutput:
        """The sequential pass: one network call per coordinate, each fixing one more coordinate
        in the network's order (the identity order when the network has no ``permutation``).
        ``update(solution)`` gives ``(candidate, log_scale)``; returns the solution and the
        log-scale of the last call, which is the log-scale at the solution (the last coordinate
        in the order is read by no output). Unsolved coordinates stay 0, so values that are not
        yet meaningful never grow through the network (a 0 * inf in a masked weight is NaN)."""
        dim = known.size(-1)
        position = torch.arange(dim, device=known.device)
        solution = torch.zeros_like(known)
        log_scale = known.new_zeros(())
        for index in self._sequence(dim):
            candidate, log_scale = update(solution)
            solution = torch.where(position == index, candidate, solution)
        return solution, log_scale

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # cached tensors belong to one autograd graph; they are not state
        state["_net_input"] = state["_net_log_scale"] = None
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        return state


class ConditionedInverseAutoregressive(_MADEAffine):
    r"""Inverse autoregressive flow (IAF) from an autoregressive network that reads the input:

        :math:`\mathbf{y} = \exp(\mathbf{s}(\mathbf{x}))\odot\mathbf{x} + \boldsymbol{\mu}(\mathbf{x})`,

    where :math:`(\boldsymbol{\mu}, \mathbf{s})_i` depend on :math:`\mathbf{x}_{<i}` only (MADE)
    and :math:`\mathbf{s} = b\tanh(\mathbf{s}_{raw}/b)` with :math:`b` = ``log_scale_bound``. With
    ``gated=True`` it is the gated (LSTM-style) update of Kingma et al. (2016, eq. 14),

        :math:`\mathbf{y} = \boldsymbol{\sigma}\odot\mathbf{x} + (1-\boldsymbol{\sigma})\odot\mathbf{m}`,
        :math:`\boldsymbol{\sigma} = \mathrm{sigmoid}(\mathbf{s}_{raw} + \beta)`,

    :math:`\beta` = ``sigmoid_bias`` (the gate logit bounded smoothly by ``gate_logit_bound``).

    :math:`\log|\det J| = \sum_i s_i(\mathbf{x})` (resp. :math:`\sum_i\log\sigma_i(\mathbf{x})`): the
    Jacobian is triangular in the network's order with a positive diagonal, so the map is always
    invertible. Forward: one network call. Inverse: exact, a sequential pass of :math:`D` network
    calls at any point (not only from the cache).

    :param autoregressive_nn: callable ``x -> (mean, raw_log_scale)`` with MADE structure.
    :param order: the network's autoregressive order (default: its ``permutation`` attribute,
        else the identity), the order in which the sequential pass fixes coordinates.
    :param gated: use the gated update; ``sigmoid_bias``, ``log_scale_bound`` and
        ``gate_logit_bound`` as above (a bound of ``None`` removes it; then exp() may overflow
        for large inputs or far-moved parameters).

    References:

    [1] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling.
    Improving Variational Inference with Inverse Autoregressive Flow. NeurIPS 2016.
    [arXiv:1606.04934]

    [2] Mathieu Germain, Karol Gregor, Iain Murray, Hugo Larochelle. MADE: Masked Autoencoder for
    Distribution Estimation. ICML 2015. [arXiv:1502.03509]
    """

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        log_scale, shift = self._scale_shift(x)
        self._remember(x, log_scale)
        return (torch.exp(log_scale) * x).add_(shift)  # in place in the product (see planar.py)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        def update(x: torch.Tensor) -> NetOutput:
            log_scale, shift = self._scale_shift(x)
            return (y - shift) * torch.exp(-log_scale), log_scale

        x, log_scale = self._solve(y, update)
        self._remember(x, log_scale)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._log_scale_at(x).sum(-1)


class ConditionedMaskedAutoregressive(_MADEAffine):
    r"""Masked autoregressive flow (MAF): the same affine update as IAF with the network reading the
    *output* (the data side), so that density evaluation is one network call:

        :math:`\mathbf{y} = \exp(\mathbf{s}(\mathbf{y}))\odot\mathbf{x}
        + \boldsymbol{\mu}(\mathbf{y})`,

        :math:`\mathbf{x} = (\mathbf{y} - \boldsymbol{\mu}(\mathbf{y}))
        \odot\exp(-\mathbf{s}(\mathbf{y}))`,

    where :math:`(\boldsymbol{\mu}, \mathbf{s})_i` depend on :math:`\mathbf{y}_{<i}` only. It is the
    inverse of an IAF whose network outputs :math:`(-\boldsymbol{\mu}e^{-\mathbf{s}}, -\mathbf{s})`.
    ``gated=True`` uses the gated update :math:`y = \sigma x + (1-\sigma) m` with
    :math:`\sigma, m` read from :math:`\mathbf{y}_{<i}`.

    :math:`\log|\det J| = \sum_i s_i(\mathbf{y})` (resp. :math:`\sum_i\log\sigma_i(\mathbf{y})`),
    computed from ``y`` (one network call, or none right after the inverse at the same ``y``):
    the network reads ``y``, so this is exact wherever ``(x, y)`` is a pair of the map. Always
    invertible (triangular Jacobian, positive diagonal). Inverse: one network call. Forward
    (sampling): exact, a sequential pass of :math:`D` network calls.

    :param autoregressive_nn: callable ``y -> (mean, raw_log_scale)`` with MADE structure.

    References:

    [1] George Papamakarios, Theo Pavlakou, Iain Murray. Masked Autoregressive Flow for Density
    Estimation. NeurIPS 2017. [arXiv:1705.07057]

    [2] Diederik P. Kingma et al. Improving Variational Inference with Inverse Autoregressive
    Flow. NeurIPS 2016. [arXiv:1606.04934]
    """

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        def update(y: torch.Tensor) -> NetOutput:
            log_scale, shift = self._scale_shift(y)
            return (torch.exp(log_scale) * x).add_(shift), log_scale

        y, log_scale = self._solve(x, update)
        self._remember(y, log_scale)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_scale, shift = self._scale_shift(y)
        self._remember(y, log_scale)
        return (y - shift) * torch.exp(-log_scale)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._log_scale_at(y).sum(-1)


def _describe_update(gated: bool, sigmoid_bias: float, log_scale_bound, gate_logit_bound) -> str:
    if gated:
        return f"gated=True, sigmoid_bias={sigmoid_bias}, gate_logit_bound={gate_logit_bound}"
    return f"gated=False, log_scale_bound={log_scale_bound}"


def _describe(transform: _MADEAffine) -> str:
    arn = transform.arn
    update = _describe_update(
        transform.gated, transform.sigmoid_bias, transform.log_scale_bound, transform.gate_logit_bound
    )
    return f"input_dim={arn.input_dim}, hidden_dims={list(arn.hidden_dims)}, {update}"


class InverseAutoregressive(ConditionedInverseAutoregressive, TransformModule):
    __doc__ = ConditionedInverseAutoregressive.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> layer = transforms.build("iaf", 5)                 # one layer on a MADE
    >>> stack = transforms.flow("iaf", 5, 4)               # four layers, reversals between
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(5), 1.0).to_event(1), [stack])
    >>> q.log_prob(torch.randn(10, 5)).shape               # any point: sequential inverses
    torch.Size([10])

    :param autoregressive_nn: a :class:`pyro.nn.AutoRegressiveNN` (its parameters are this
        module's parameters); :func:`made` builds one with the identity order.
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, autoregressive_nn: AutoRegressiveNN, **kwargs: Any):
        super().__init__(autoregressive_nn, **kwargs)

    def reset_parameters(self) -> None:
        """Re-draws the network's weights as ``nn.Linear`` does."""
        for layer in self.arn.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()

    def extra_repr(self) -> str:
        return _describe(self)


class MaskedAutoregressive(ConditionedMaskedAutoregressive, TransformModule):
    __doc__ = ConditionedMaskedAutoregressive.__doc__ + r"""

    Example:

    >>> import torch, pyro.distributions as dist, transforms
    >>> density = dist.TransformedDistribution(
    ...     dist.Normal(torch.zeros(5), 1.0).to_event(1), [transforms.build("maf", 5)])
    >>> density.log_prob(torch.randn(10, 5)).shape         # one network call
    torch.Size([10])

    :param autoregressive_nn: a :class:`pyro.nn.AutoRegressiveNN`; :func:`made` builds one.
    """

    __repr__ = torch.nn.Module.__repr__

    def __init__(self, autoregressive_nn: AutoRegressiveNN, **kwargs: Any):
        super().__init__(autoregressive_nn, **kwargs)

    def reset_parameters(self) -> None:
        """Re-draws the network's weights as ``nn.Linear`` does."""
        for layer in self.arn.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()

    def extra_repr(self) -> str:
        return _describe(self)


class _ConditionalMADEAffine(ConditionalTransformModule):
    conditioned: type[_MADEAffine]

    def __init__(self, autoregressive_nn: ConditionalAutoRegressiveNN, **kwargs: Any):
        super().__init__()
        self.nn = autoregressive_nn
        self.kwargs = kwargs
        self._order = _order_of(autoregressive_nn)

    def condition(self, context: torch.Tensor) -> _MADEAffine:
        """The flow for this context (leading dims broadcast against those of the input)."""
        return self.conditioned(bind_context(self.nn, context), order=self._order, **self.kwargs)

    def reset_parameters(self) -> None:
        for layer in self.nn.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()

    def extra_repr(self) -> str:
        options = {"gated": False, "sigmoid_bias": SIGMOID_BIAS, "log_scale_bound": LOG_SCALE_BOUND,
                   "gate_logit_bound": GATE_LOGIT_BOUND, **self.kwargs}
        return (
            f"input_dim={self.nn.input_dim}, context_dim={self.nn.context_dim}, "
            f"hidden_dims={list(self.nn.hidden_dims)}, {_describe_update(**options)}"
        )


class ConditionalInverseAutoregressive(_ConditionalMADEAffine):
    r"""IAF whose shift and scale also read a context :math:`\mathbf{c}`:
    :math:`(\boldsymbol{\mu}, \mathbf{s})_i = f_i(\mathbf{x}_{<i}, \mathbf{c})` (conditional MADE,
    Paige & Wood 2016). ``condition(context)`` returns a :class:`ConditionedInverseAutoregressive`;
    same log-det and exact inverse as there.

    >>> import torch, transforms
    >>> layer = transforms.build("iaf", 2, context_dim=8)
    >>> z, h = torch.randn(4, 25, 2), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 2])
    """

    conditioned = ConditionedInverseAutoregressive


class ConditionalMaskedAutoregressive(_ConditionalMADEAffine):
    r"""MAF whose shift and scale also read a context :math:`\mathbf{c}`:
    :math:`(\boldsymbol{\mu}, \mathbf{s})_i = f_i(\mathbf{y}_{<i}, \mathbf{c})`.
    ``condition(context)`` returns a :class:`ConditionedMaskedAutoregressive`."""

    conditioned = ConditionedMaskedAutoregressive


def _check_options(gated: Any, **bounds: Any) -> None:
    if not isinstance(gated, bool):
        raise ValueError(f"gated must be True or False, got {gated!r}")
    for name, value in bounds.items():
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")


def _options(gated: bool, sigmoid_bias: float, log_scale_bound, gate_logit_bound) -> dict[str, Any]:
    _check_options(gated, log_scale_bound=log_scale_bound, gate_logit_bound=gate_logit_bound)
    return dict(
        gated=gated,
        sigmoid_bias=sigmoid_bias,
        log_scale_bound=log_scale_bound,
        gate_logit_bound=gate_logit_bound,
    )


def conditional_iaf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    gated: bool = False,
    sigmoid_bias: float = SIGMOID_BIAS,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
    gate_logit_bound: float | None = GATE_LOGIT_BOUND,
) -> ConditionalInverseAutoregressive:
    """A conditional IAF layer on a conditional MADE (identity order)."""
    options = _options(gated, sigmoid_bias, log_scale_bound, gate_logit_bound)
    return ConditionalInverseAutoregressive(
        conditional_made(input_dim, context_dim, hidden_dims), **options
    )


@register(
    "iaf",
    exact_inverse=True,
    inverse="sequential pass, D network calls",
    conditional=conditional_iaf,
    permute_between=True,
    description="Inverse autoregressive flow on MADE (Kingma et al. 2016); gated=True for eq. 14",
)
def iaf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    gated: bool = False,
    sigmoid_bias: float = SIGMOID_BIAS,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
    gate_logit_bound: float | None = GATE_LOGIT_BOUND,
) -> InverseAutoregressive:
    """An IAF layer on a MADE (identity order; ``hidden_dims`` default ``[3 * input_dim + 1]``)."""
    options = _options(gated, sigmoid_bias, log_scale_bound, gate_logit_bound)
    return InverseAutoregressive(made(input_dim, hidden_dims), **options)


def conditional_maf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    gated: bool = False,
    sigmoid_bias: float = SIGMOID_BIAS,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
    gate_logit_bound: float | None = GATE_LOGIT_BOUND,
) -> ConditionalMaskedAutoregressive:
    """A conditional MAF layer on a conditional MADE (identity order)."""
    options = _options(gated, sigmoid_bias, log_scale_bound, gate_logit_bound)
    return ConditionalMaskedAutoregressive(
        conditional_made(input_dim, context_dim, hidden_dims), **options
    )


@register(
    "maf",
    exact_inverse=True,
    inverse="closed form, one network call",
    conditional=conditional_maf,
    permute_between=True,
    description="Masked autoregressive flow on MADE (Papamakarios et al. 2017): one-call density",
)
def maf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    gated: bool = False,
    sigmoid_bias: float = SIGMOID_BIAS,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
    gate_logit_bound: float | None = GATE_LOGIT_BOUND,
) -> MaskedAutoregressive:
    """A MAF layer on a MADE (identity order; ``hidden_dims`` default ``[3 * input_dim + 1]``)."""
    options = _options(gated, sigmoid_bias, log_scale_bound, gate_logit_bound)
    return MaskedAutoregressive(made(input_dim, hidden_dims), **options)
