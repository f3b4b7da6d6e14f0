r"""Other libraries' implementations of our flows, for the throughput benchmark: normflows and zuko.

Both are optional (``pip install -e ".[bench]"``); with neither installed this module imports
fine and :data:`EXTERNAL_TWINS` is empty. A twin is built by ``builder(dim, length)`` and returns
a :class:`TwinStack` with one call, ``forward_and_logdet(x) -> (y, log_det)``, for ``x`` of
shape ``(batch, dim)`` and ``log_det`` of shape ``(batch,)``. It computes the same direction as
our :func:`transforms.flow` stack's forward (``y = stack(x)``, from the base side toward the data
side, as Pyro's ``TransformModule.__call__``), with the same number of layers, the same hidden
sizes, and our own permutation module between layers where our flow has one
(:attr:`transforms.FlowInfo.permute_between`), so that a ratio of timings compares the layers.

Directions. normflows' ``Flow.forward`` is its sampling direction (base to data; its
``NormalizingFlow.sample`` calls it) and returns ``(y, log|det J|)`` of that map: the twin calls
``forward``, or, for MAF, the library's own ``normflows.flows.Reverse`` wrapper whose ``forward``
is the layer's sequential ``inverse``. zuko's transforms map data to noise (``Flow.log_prob``
applies ``transform(x)``), and ``t.call_and_ladj(x)`` returns ``(t(x), log|det J_t(x)|)``: the
IAF twin calls a masked autoregressive layer forward (one network pass reading the input, as our
IAF), the MAF twin calls ``t.inv.call_and_ladj`` (the sequential pass whose network reads the
output, as our MAF, i.e. zuko's own MAF sampling direction).

What each twin computes, and where its math differs from ours, is in :data:`TWIN_NOTES`.
Neither library has a Householder, Sylvester, CNF (as our layer), conv-planar, Glow or PReLU
layer with the same math, so those flows have no twin here (Pyro's Householder is the one in
``bench_transforms.PYRO_TWINS``).

Example (what ``bench_transforms`` does with it)::

    from benchmarks.external_twins import EXTERNAL_TWINS
    for flow, builders in EXTERNAL_TWINS.items():
        for library, build in builders.items():
            stack = build(16, 8).to(device)
            y, log_det = stack.forward_and_logdet(torch.randn(4096, 16, device=device))
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Sequence

import torch
from torch import nn

import transforms

__all__ = [
    "LIBRARIES",
    "TwinStack",
    "TWIN_NOTES",
    "EXTERNAL_TWINS",
    "available_libraries",
    "twin_builders",
]

LIBRARIES = ("normflows", "zuko")


@functools.cache
def _importable(library: str) -> bool:
    try:
        importlib.import_module(library)
    except Exception:  # not installed, or broken against this torch: no twin either way
        return False
    return True


def available_libraries() -> list[str]:
    """The libraries of :data:`LIBRARIES` that import in this environment."""
    return [library for library in LIBRARIES if _importable(library)]


# How one part of a stack is called: (module, x) -> (y, log|det J| of shape (batch,)).
Call = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _normflows_forward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(x)


def _zuko_forward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a zuko LazyTransform builds its torch Transform on call (context None): part of its cost
    return layer().call_and_ladj(x)


def _zuko_inverse(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer().inv.call_and_ladj(x)


def _permute(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(x), x.new_zeros(x.shape[:-1])


class TwinStack(nn.Module):
    """``length`` layers of another library's flow (with our permutation between them where our
    flow has one), called uniformly through :meth:`forward_and_logdet`. An ``nn.Module``: move it
    with ``.to(device)``; its ``parameters()`` are the layers'."""

    def __init__(self, library: str, flow: str, parts: Sequence[tuple[nn.Module, Call]]):
        super().__init__()
        self.library = library
        self.flow = flow
        self.parts = nn.ModuleList(module for module, _ in parts)
        self._calls = tuple(call for _, call in parts)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` for ``x`` of shape ``(batch, dim)``; ``log_det``: ``(batch,)``."""
        if x.dim() != 2:
            raise ValueError(f"a twin stack takes x of shape (batch, dim), got {tuple(x.shape)}")
        log_det = x.new_zeros(x.shape[:-1])
        for module, call in zip(self.parts, self._calls):
            x, layer_log_det = call(module, x)
            log_det = log_det + layer_log_det
        return x, log_det

    forward = forward_and_logdet

    def extra_repr(self) -> str:
        return f"library={self.library}, flow={self.flow}"


def _stack(library: str, flow: str, dim: int, length: int,
           make_layer: Callable[[], tuple[nn.Module, Call]]) -> TwinStack:
    """``length`` layers from ``make_layer()``, with our permutation between consecutive layers
    exactly where :func:`transforms.flow` puts one."""
    entry = transforms.info(flow)
    for name, value in (("dim", dim), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim < entry.min_input_dim:
        raise ValueError(f"flow {flow!r} needs dim >= {entry.min_input_dim}, got {dim}")
    parts: list[tuple[nn.Module, Call]] = []
    for k in range(length):
        if k > 0 and entry.permute_between and dim > 1:
            permutation = (entry.permute_between(dim) if callable(entry.permute_between)
                           else transforms.Reverse())
            parts.append((permutation, _permute))
        parts.append(make_layer())
    return TwinStack(library, flow, parts)


def _made_hidden(dim: int) -> int:
    # our MADE default (transforms.autoregressive.made): one hidden layer of 3 D + 1 (Pyro's)
    return 3 * dim + 1


def _coupling_hidden(dim: int) -> int:
    # our coupling hypernet default (transforms.coupling._layout): one hidden layer of 10 D
    return 10 * dim


def _even_split(flow: str, dim: int) -> int:
    if dim % 2:
        # normflows' "channel" split keeps the first ceil(D/2) coordinates; ours keeps floor(D/2)
        raise ValueError(f"the normflows twin of {flow!r} needs an even dim (same split), got {dim}")
    return dim // 2


# --- normflows -------------------------------------------------------------------------------

def _normflows_planar(dim: int, length: int) -> TwinStack:
    import normflows as nf

    return _stack("normflows", "planar", dim, length,
                  lambda: (nf.flows.Planar((dim,), act="tanh"), _normflows_forward))


def _normflows_radial(dim: int, length: int) -> TwinStack:
    import normflows as nf

    return _stack("normflows", "radial", dim, length,
                  lambda: (nf.flows.Radial((dim,)), _normflows_forward))


def _normflows_made_layer(dim: int) -> nn.Module:
    import normflows as nf

    # num_blocks=0 without residual blocks: input layer, ReLU, output layer, i.e. one hidden
    # layer as our MADE (normflows' default is two residual blocks of hidden_features).
    return nf.flows.MaskedAffineAutoregressive(
        dim, _made_hidden(dim), num_blocks=0, use_residual_blocks=False
    )


def _normflows_iaf(dim: int, length: int) -> TwinStack:
    return _stack("normflows", "iaf", dim, length,
                  lambda: (_normflows_made_layer(dim), _normflows_forward))


def _normflows_maf(dim: int, length: int) -> TwinStack:
    import normflows as nf

    return _stack("normflows", "maf", dim, length,
                  lambda: (nf.flows.Reverse(_normflows_made_layer(dim)), _normflows_forward))


def _normflows_coupling(flow: str, dim: int, length: int, *, scale: bool) -> TwinStack:
    import normflows as nf

    kept = _even_split(flow, dim)
    moved = dim - kept

    def layer() -> tuple[nn.Module, Call]:
        net = nf.nets.MLP([kept, _coupling_hidden(dim), (2 if scale else 1) * moved])
        block = nf.flows.AffineCouplingBlock(net, scale=scale, scale_map="exp", split_mode="channel")
        return block, _normflows_forward

    return _stack("normflows", flow, dim, length, layer)


def _normflows_realnvp(dim: int, length: int) -> TwinStack:
    return _normflows_coupling("realnvp", dim, length, scale=True)


def _normflows_nice(dim: int, length: int) -> TwinStack:
    return _normflows_coupling("nice", dim, length, scale=False)


# --- zuko ------------------------------------------------------------------------------------

def _zuko_made_layer(dim: int) -> nn.Module:
    from zuko.flows import MaskedAutoregressiveTransform

    # identity order in every layer: the alternation comes from our Reversal between layers
    return MaskedAutoregressiveTransform(
        features=dim, passes=None, order=torch.arange(dim), hidden_features=[_made_hidden(dim)]
    )


def _zuko_iaf(dim: int, length: int) -> TwinStack:
    return _stack("zuko", "iaf", dim, length, lambda: (_zuko_made_layer(dim), _zuko_forward))


def _zuko_maf(dim: int, length: int) -> TwinStack:
    return _stack("zuko", "maf", dim, length, lambda: (_zuko_made_layer(dim), _zuko_inverse))


def _zuko_coupling(flow: str, dim: int, length: int, *, additive: bool) -> TwinStack:
    from zuko.flows import GeneralCouplingTransform
    from zuko.transforms import AdditiveTransform

    # mask True = the kept (conditioning) part: the first D // 2 coordinates, as ours
    mask = torch.arange(dim) < dim // 2
    options = dict(univariate=AdditiveTransform, shapes=((),)) if additive else {}

    def layer() -> tuple[nn.Module, Call]:
        coupling = GeneralCouplingTransform(
            features=dim, mask=mask, hidden_features=[_coupling_hidden(dim)], **options
        )
        return coupling, _zuko_forward

    return _stack("zuko", flow, dim, length, layer)


def _zuko_realnvp(dim: int, length: int) -> TwinStack:
    return _zuko_coupling("realnvp", dim, length, additive=False)


def _zuko_nice(dim: int, length: int) -> TwinStack:
    return _zuko_coupling("nice", dim, length, additive=True)


_ALL_TWINS: dict[str, dict[str, Callable[[int, int], TwinStack]]] = {
    "planar": {"normflows": _normflows_planar},
    "radial": {"normflows": _normflows_radial},
    "iaf": {"normflows": _normflows_iaf, "zuko": _zuko_iaf},
    "maf": {"normflows": _normflows_maf, "zuko": _zuko_maf},
    "realnvp": {"normflows": _normflows_realnvp, "zuko": _zuko_realnvp},
    "nice": {"normflows": _normflows_nice, "zuko": _zuko_nice},
}

# (flow, library) -> what the twin computes and how its math differs from our layer's.
TWIN_NOTES: dict[tuple[str, str], str] = {
    ("planar", "normflows"): (
        "normflows.flows.Planar(act='tanh'): y = x + u_hat tanh(w.x + b) with the same u_hat "
        "reparameterisation (written log(1 + exp(w.u)), which overflows for w.u > ~88 in float32 "
        "where ours uses softplus); the same map and log-det. Its init differs (u ~ U(+-sqrt 2), "
        "w ~ U(+-sqrt(2/D))); no inverse for tanh (ours: exact Newton inverse)."
    ),
    ("radial", "normflows"): (
        "normflows.flows.Radial: y = x + beta h (x - x0), h = 1/(|alpha| + r), beta = "
        "softplus(beta') - |alpha|; ours alpha = softplus(alpha') > 0. The same map with "
        "alpha = |alpha_nf| (equal to ours when alpha_nf = softplus(alpha'_ours)); x0 starts at "
        "N(0, 1), ours at U(+-1/sqrt D); no inverse (ours: closed form)."
    ),
    ("iaf", "normflows"): (
        "normflows.flows.MaskedAffineAutoregressive forward (one MADE pass reading the input, as "
        "our IAF), MADE with one hidden layer of 3D+1 (num_blocks=0, no residual blocks). Math "
        "differs: scale = sigmoid(a + 2) + 1e-3 in (0.001, 1.001) with a free shift, "
        "y = scale x + shift (a gated, contracting update, nearest to our iaf(gated=True), "
        "whose shift is (1 - s) m and whose gate logit is soft-bounded); ours by default is "
        "exp(3 tanh(a/3)). nflows-style hidden degrees (k mod (D-1) + 1) instead of Pyro's "
        "evenly spaced ones; interleaved (scale, shift) outputs."
    ),
    ("maf", "normflows"): (
        "normflows.flows.Reverse(MaskedAffineAutoregressive): forward is the layer's sequential "
        "inverse, D MADE passes, the network reading the output (as our MAF): "
        "y = (x - shift(y)) / scale(y), scale = sigmoid(a + 2) + 1e-3, so x is stretched by "
        "1/scale in (0.999, 1000); ours y = exp(s(y)) x + mu(y), s = 3 tanh(a/3). "
        "Same MADE as the iaf twin."
    ),
    ("realnvp", "normflows"): (
        "normflows.flows.AffineCouplingBlock(scale_map='exp', split_mode='channel') on "
        "normflows.nets.MLP([D/2, 10D, D]) (ReLU): keeps x[:D/2], y2 = x2 exp(s) + t. The same "
        "map as our realnvp(log_scale_bound=None); ours bounds s smoothly (3 tanh(s/3)). "
        "(shift, scale) interleaved in the net output. Even D only (its split keeps ceil(D/2))."
    ),
    ("nice", "normflows"): (
        "normflows.flows.AffineCouplingBlock(scale=False) on MLP([D/2, 10D, D/2]): y2 = x2 + m(x1), "
        "log-det 0 (returned as zeros). The same map as ours. Even D only."
    ),
    ("iaf", "zuko"): (
        "zuko.flows.MaskedAutoregressiveTransform (identity order, hidden [3D+1], ReLU), called "
        "forward: one pass reading the input, as our IAF, y = exp(s) x + mu. Same update as ours "
        "except the smooth bound on the log-scale: zuko s = a / (1 + |a| / ln 1000) (|s| < 6.9), "
        "ours s = 3 tanh(a / 3) (|s| < 3). zuko's own hidden-unit masks (k-th unit of a "
        "cyclic assignment) instead of Pyro's evenly spaced degrees; interleaved (shift, scale) "
        "outputs; the Transform object is rebuilt on every call (zuko's lazy API)."
    ),
    ("maf", "zuko"): (
        "The same zuko layer called as t.inv.call_and_ladj: D sequential passes reading the "
        "output, then one more pass for the log-det (ours reuses the last pass's log-scale). "
        "x = (y - mu(y)) exp(-s(y)) read as y -> x: the same family as our MAF with the scale "
        "inverted; bound as in the iaf twin."
    ),
    ("realnvp", "zuko"): (
        "zuko.flows.GeneralCouplingTransform(mask = first D//2 kept, hidden [10D], ReLU), "
        "MonotonicAffineTransform: y2 = exp(s) x2 + t with s = a / (1 + |a| / ln 1000); ours "
        "s = 3 tanh(a/3). Split and merge by index tensors (x[..., idx]) rather than slices."
    ),
    ("nice", "zuko"): (
        "zuko.flows.GeneralCouplingTransform with univariate=AdditiveTransform: y2 = x2 + m(x1), "
        "the same map as ours (log-det returned as zeros of x2's shape, then summed)."
    ),
}


Builder = Callable[[int, int], TwinStack]


def twin_builders(libraries: Sequence[str] | None = None) -> dict[str, dict[str, Builder]]:
    """``{our flow name: {library: builder(dim, length) -> TwinStack}}`` for ``libraries``
    (default: those installed), leaving out flows of ours not registered in :mod:`transforms`."""
    wanted = available_libraries() if libraries is None else list(libraries)
    unknown = [library for library in wanted if library not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown libraries {unknown}; known: {', '.join(LIBRARIES)}")
    registered = set(transforms.available())
    table = {
        flow: {library: build for library, build in builders.items() if library in wanted}
        for flow, builders in _ALL_TWINS.items()
        if flow in registered
    }
    return {flow: builders for flow, builders in table.items() if builders}


# Everything installed here, by our flow name; empty when neither library is installed.
EXTERNAL_TWINS: dict[str, dict[str, Builder]] = twin_builders()
