r"""Coupling flows: RealNVP's affine coupling (Dinh et al. 2016) and NICE's additive coupling
(Dinh et al. 2014).

A coupling layer splits :math:`\mathbf{x} = (\mathbf{x}_{1:d}, \mathbf{x}_{d+1:D})`, keeps the first
part and moves the second by a function of the first, so forward, inverse and log-det each cost one
network call. The registry's :func:`~transforms.flow` puts a :class:`~transforms.Reverse` between
layers, so consecutive layers update alternate halves. (For an odd ``input_dim`` a reversal fixes
the middle coordinate, which the split at ``input_dim // 2`` then always moves and never reads:
the other coordinates never depend on it. A permutation that is not symmetric about the middle,
e.g. a roll by ``input_dim // 2``, between couplings would fix this in the registry.)

The math of the affine layer is that of Pyro's :class:`~pyro.distributions.transforms.AffineCoupling`
(same split, same ``(mean, log_scale)`` hypernet convention, same :class:`pyro.nn.DenseNN`). It is
restated here because Pyro clips the log-scale with a hard clamp whose gradient is passed straight
through (not the gradient of the map computed); here the bound is smooth
(:func:`~transforms.autoregressive.soft_bound`), and with ``log_scale_bound=None`` the layer is
Pyro's exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.nn import ConditionalDenseNN, DenseNN
from torch.distributions import Transform, constraints

from .autoregressive import LOG_SCALE_BOUND, bind_context, soft_bound
from .permutation import Roll
from .registry import register

__all__ = [
    "roll_by_split",
    "ConditionedAffineCoupling",
    "AffineCoupling",
    "ConditionalAffineCoupling",
    "ConditionedAdditiveCoupling",
    "AdditiveCoupling",
    "ConditionalAdditiveCoupling",
    "realnvp",
    "conditional_realnvp",
    "nice",
    "conditional_nice",
]


class _Coupling(Transform):
    """What both couplings share: the split, the hypernet on the kept part, and a one-entry cache
    of the hypernet's output keyed by the identity of the input it read."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, split_dim: int, hypernet: Callable[[torch.Tensor], Any]):
        super().__init__(cache_size=1)
        self.split_dim = split_dim
        self.nn = hypernet
        self._net_input: torch.Tensor | None = None
        self._net_output: Any = None

    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (under tracing, sizes are traced values: a check on them would be baked in anyway)
        if not torch.jit.is_tracing() and not 0 < self.split_dim < v.size(-1):
            raise ValueError(
                f"a coupling splitting at {self.split_dim} needs vectors of size > "
                f"{self.split_dim}, got size {v.size(-1)}"
            )
        return v[..., : self.split_dim], v[..., self.split_dim :]

    def _net(
        self, kept: torch.Tensor, whole: torch.Tensor, finish: Callable[[Any], Any] | None = None
    ) -> Any:
        """The hypernet at ``kept``, passed through ``finish`` if given; reused only when
        ``whole`` is the tensor it was last run for (so a log-det right after the forward call
        neither reruns the network nor its output's post-processing)."""
        if whole is self._net_input and self._net_output is not None:
            return self._net_output
        output = self.nn(kept)
        if finish is not None:
            output = finish(output)
        self._net_input, self._net_output = whole, output
        return output

    @staticmethod
    def _join(kept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        # a context may broaden the batch shape of the moved part
        kept = kept.expand(moved.shape[:-1] + kept.shape[-1:])
        return torch.cat([kept, moved], dim=-1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # cached tensors belong to one autograd graph; they are not state
        state["_net_input"] = state["_net_output"] = None
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        return state


class ConditionedAffineCoupling(_Coupling):
    r"""RealNVP's affine coupling layer:

        :math:`\mathbf{y}_{1:d} = \mathbf{x}_{1:d}`,
        :math:`\quad\mathbf{y}_{d+1:D} = \exp(\mathbf{s}(\mathbf{x}_{1:d}))\odot\mathbf{x}_{d+1:D}
        + \boldsymbol{\mu}(\mathbf{x}_{1:d})`,

    with :math:`\mathbf{s} = b\tanh(\mathbf{s}_{raw}/b)`, :math:`b` = ``log_scale_bound``.
    :math:`\log|\det J| = \sum_i s_i(\mathbf{x}_{1:d})`. The Jacobian is block triangular with a
    positive diagonal, so the layer is invertible for any hypernet; the inverse is exact,
    :math:`\mathbf{x}_{d+1:D} = (\mathbf{y}_{d+1:D} - \boldsymbol{\mu}(\mathbf{y}_{1:d}))\odot
    \exp(-\mathbf{s}(\mathbf{y}_{1:d}))`, one network call.

    :param split_dim: :math:`d`, the number of leading coordinates kept.
    :param hypernet: callable ``x_{1:d} -> (mean, raw_log_scale)``, each of size :math:`D - d`.

    References:

    [1] Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation using Real NVP.
    ICLR 2017. [arXiv:1605.08803]
    """

    def __init__(
        self,
        split_dim: int,
        hypernet: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        *,
        log_scale_bound: float | None = LOG_SCALE_BOUND,
    ):
        super().__init__(split_dim, hypernet)
        self.log_scale_bound = log_scale_bound

    def _scale_shift(
        self, kept: torch.Tensor, whole: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._net(kept, whole, self._bounded)

    def _bounded(self, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = output
        return soft_bound(raw, self.log_scale_bound), mean

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(x)
        log_scale, shift = self._scale_shift(kept, x)
        return self._join(kept, (torch.exp(log_scale) * moved).add_(shift))  # see planar.py

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(y)
        log_scale, shift = self._scale_shift(kept, y)
        x = self._join(kept, (moved - shift) * torch.exp(-log_scale))
        # the kept half is the same in x and y: the hypernet output holds at x too
        self._net_input = x
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kept, _ = self._split(x)
        log_scale, _ = self._scale_shift(kept, x)
        return log_scale.sum(-1)


class ConditionedAdditiveCoupling(_Coupling):
    r"""NICE's additive coupling layer:

        :math:`\mathbf{y}_{1:d} = \mathbf{x}_{1:d}`,
        :math:`\quad\mathbf{y}_{d+1:D} = \mathbf{x}_{d+1:D} + \mathbf{m}(\mathbf{x}_{1:d})`.

    Volume preserving: the Jacobian is unit triangular, :math:`\log|\det J| = 0`, and the layer is
    invertible for any :math:`\mathbf{m}`, with the exact inverse
    :math:`\mathbf{x}_{d+1:D} = \mathbf{y}_{d+1:D} - \mathbf{m}(\mathbf{y}_{1:d})` (one network call).

    NICE ends its stack of couplings with a diagonal scaling layer :math:`\mathbf{y} =
    \exp(\mathbf{s})\odot\mathbf{x}`, the only part of the model that changes volume. It is
    optional and not part of this layer: in a variational guide the couplings sit on top of a
    learned Gaussian base whose scale already plays that role; for density estimation, end the
    stack with ``transforms.build("actnorm", D)``, a learnable diagonal scaling (plus shift).

    :param split_dim: :math:`d`, the number of leading coordinates kept.
    :param hypernet: callable ``x_{1:d} -> shift`` of size :math:`D - d`.

    References:

    [1] Laurent Dinh, David Krueger, Yoshua Bengio. NICE: Non-linear Independent Components
    Estimation. ICLR 2015 workshop. [arXiv:1410.8516]
    """

    volume_preserving = True

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(x)
        return self._join(kept, moved + self._net(kept, x))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, moved = self._split(y)
        return self._join(kept, moved - self._net(kept, y))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch_shape = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
        return x.new_zeros(batch_shape)


def _reset_linear_layers(module: torch.nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()


def _describe(split_dim: int, net: torch.nn.Module, extra: str = "") -> str:
    dims = f"input_dim={net.input_dim}" if not net.context_dim else (
        f"input_dim={net.input_dim}, context_dim={net.context_dim}"
    )
    return f"split_dim={split_dim}, conditioner {dims}, hidden_dims={list(net.hidden_dims)}{extra}"


class AffineCoupling(ConditionedAffineCoupling, TransformModule):
    __doc__ = ConditionedAffineCoupling.__doc__ + r"""

    Example:

    >>> import torch, transforms
    >>> layer = transforms.build("realnvp", 4)             # keeps x[:2], moves x[2:]
    >>> stack = transforms.flow("realnvp", 4, 6)           # alternating halves
    >>> stack(torch.randn(10, 4)).shape
    torch.Size([10, 4])

    :param hypernet: a :class:`pyro.nn.DenseNN` (its parameters are this module's parameters).
    """

    __repr__ = torch.nn.Module.__repr__

    def reset_parameters(self) -> None:
        """Re-draws the hypernet's weights as ``nn.Linear`` does."""
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn, f", log_scale_bound={self.log_scale_bound}")


class AdditiveCoupling(ConditionedAdditiveCoupling, TransformModule):
    __doc__ = ConditionedAdditiveCoupling.__doc__ + r"""

    Example:

    >>> import torch, transforms
    >>> stack = transforms.flow("nice", 4, 4)              # four additive couplings
    >>> x = torch.randn(10, 4)
    >>> stack.log_abs_det_jacobian(x, stack(x)).abs().max()
    tensor(0.)

    :param hypernet: a :class:`pyro.nn.DenseNN` (its parameters are this module's parameters).
    """

    __repr__ = torch.nn.Module.__repr__

    def reset_parameters(self) -> None:
        """Re-draws the hypernet's weights as ``nn.Linear`` does."""
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn)


class ConditionalAffineCoupling(ConditionalTransformModule):
    r"""RealNVP's affine coupling whose shift and scale also read a context :math:`\mathbf{c}`:
    :math:`(\boldsymbol{\mu}, \mathbf{s}) = f(\mathbf{x}_{1:d}, \mathbf{c})`. ``condition(context)``
    returns a :class:`ConditionedAffineCoupling` (same log-det, same exact inverse).

    >>> import torch, transforms
    >>> layer = transforms.build("realnvp", 4, context_dim=8)
    >>> z, h = torch.randn(4, 25, 4), torch.randn(4, 25, 8)  # (B, T, Z), (B, T, C)
    >>> layer.condition(h)(z).shape
    torch.Size([4, 25, 4])
    """

    def __init__(self, split_dim: int, hypernet: ConditionalDenseNN, **kwargs: Any):
        super().__init__()
        self.split_dim = split_dim
        self.nn = hypernet
        self.kwargs = kwargs

    def condition(self, context: torch.Tensor) -> ConditionedAffineCoupling:
        return ConditionedAffineCoupling(self.split_dim, bind_context(self.nn, context), **self.kwargs)

    def reset_parameters(self) -> None:
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn)


class ConditionalAdditiveCoupling(ConditionalTransformModule):
    r"""NICE's additive coupling whose shift also reads a context :math:`\mathbf{c}`:
    :math:`\mathbf{m} = f(\mathbf{x}_{1:d}, \mathbf{c})`; still volume preserving.
    ``condition(context)`` returns a :class:`ConditionedAdditiveCoupling`."""

    def __init__(self, split_dim: int, hypernet: ConditionalDenseNN):
        super().__init__()
        self.split_dim = split_dim
        self.nn = hypernet

    def condition(self, context: torch.Tensor) -> ConditionedAdditiveCoupling:
        return ConditionedAdditiveCoupling(self.split_dim, bind_context(self.nn, context))

    def reset_parameters(self) -> None:
        _reset_linear_layers(self.nn)

    def extra_repr(self) -> str:
        return _describe(self.split_dim, self.nn)


def _layout(
    input_dim: int, split_dim: int | None, hidden_dims: Sequence[int] | None
) -> tuple[int, list[int]]:
    """``split_dim`` (default ``input_dim // 2``, Pyro's) and ``hidden_dims`` (default
    ``[10 * input_dim]``, Pyro's), checked."""
    if input_dim < 2:
        raise ValueError(f"a coupling layer needs input_dim >= 2, got input_dim={input_dim}")
    split_dim = input_dim // 2 if split_dim is None else split_dim
    if isinstance(split_dim, bool) or not isinstance(split_dim, int) or not 0 < split_dim < input_dim:
        raise ValueError(f"split_dim must be an int in [1, {input_dim - 1}], got {split_dim!r}")
    hidden_dims = [10 * input_dim] if hidden_dims is None else list(hidden_dims)
    return split_dim, hidden_dims


def roll_by_split(input_dim: int, *, split_dim: int | None = None, **_: Any) -> Roll:
    """The permutation :func:`transforms.flow` puts between couplings: the half a layer just
    updated moves to the front, so the next layer conditions on it (a reversal would leave the
    middle coordinate of an odd-sized vector updated by every layer and conditioning none)."""
    return Roll(input_dim // 2 if split_dim is None else split_dim)


def conditional_realnvp(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
) -> ConditionalAffineCoupling:
    """A conditional affine coupling layer on a :class:`pyro.nn.ConditionalDenseNN`."""
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    moved = input_dim - split_dim
    hypernet = ConditionalDenseNN(split_dim, context_dim, hidden_dims, param_dims=[moved, moved])
    return ConditionalAffineCoupling(split_dim, hypernet, log_scale_bound=log_scale_bound)


@register(
    "realnvp",
    exact_inverse=True,
    inverse="closed form, one network call",
    conditional=conditional_realnvp,
    min_input_dim=2,
    permute_between=roll_by_split,
    description="RealNVP affine coupling (Dinh et al. 2016), halves alternating between layers",
)
def realnvp(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
    log_scale_bound: float | None = LOG_SCALE_BOUND,
) -> AffineCoupling:
    """An affine coupling layer on a :class:`pyro.nn.DenseNN` (split at ``input_dim // 2``)."""
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    moved = input_dim - split_dim
    hypernet = DenseNN(split_dim, hidden_dims, param_dims=[moved, moved])
    return AffineCoupling(split_dim, hypernet, log_scale_bound=log_scale_bound)


def conditional_nice(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
) -> ConditionalAdditiveCoupling:
    """A conditional additive coupling layer on a :class:`pyro.nn.ConditionalDenseNN`."""
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    moved = input_dim - split_dim
    hypernet = ConditionalDenseNN(split_dim, context_dim, hidden_dims, param_dims=[moved])
    return ConditionalAdditiveCoupling(split_dim, hypernet)


@register(
    "nice",
    exact_inverse=True,
    inverse="closed form, one network call",
    conditional=conditional_nice,
    min_input_dim=2,
    permute_between=roll_by_split,
    description="NICE additive coupling (Dinh et al. 2014), volume preserving",
)
def nice(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    split_dim: int | None = None,
) -> AdditiveCoupling:
    """An additive coupling layer on a :class:`pyro.nn.DenseNN` (split at ``input_dim // 2``)."""
    split_dim, hidden_dims = _layout(input_dim, split_dim, hidden_dims)
    hypernet = DenseNN(split_dim, hidden_dims, param_dims=[input_dim - split_dim])
    return AdditiveCoupling(split_dim, hypernet)
