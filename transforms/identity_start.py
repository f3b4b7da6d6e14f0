r"""Starting a flow at the identity map.

An autoregressive or coupling layer computes :math:`y = e^{s}\odot x + \mu` from a network's
output :math:`(\mu, s_{raw})`, with :math:`s = b\tanh(s_{raw}/b)` (or :math:`s_{raw}` unbounded;
NICE has no :math:`s`). When the network's output layer is zero, :math:`\mu = 0` and :math:`s = 0`
for every input and context, so the layer is the identity and its log-det is 0. Gradients still
reach that output layer (its input, the hidden activations, is not zero), so the first step moves
it off zero: the usual zero initialisation of a residual branch.

Why this matters: a flow added to a guide that is already trained (``train --init-from``) starts,
at its default random initialisation, as a random bijection of that guide's samples. On the
pendulum that costs hundreds of nats in the first epoch, which then have to be won back. From the
identity, the flow guide starts as exactly the guide it extends.

Planar, radial, Sylvester, Householder, Glow and the other families have no such start (planar's
:math:`\hat u` reparameterisation, for one, is not zero at :math:`u = 0`), and the gated IAF/MAF
update :math:`\sigma x + (1-\sigma) m` is not the identity at any finite gate logit: those raise.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

from .autoregressive import _ConditionalMADEAffine, _MADEAffine
from .coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
)

__all__ = ["start_at_identity", "STARTS_AT_IDENTITY"]

# The registered families whose layers start_at_identity can set to the identity.
STARTS_AT_IDENTITY = ("iaf", "maf", "nice", "realnvp")

_COUPLINGS = (AffineCoupling, AdditiveCoupling, ConditionalAffineCoupling, ConditionalAdditiveCoupling)


def _network(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The network whose zero output makes ``layer`` the identity; None when there is none."""
    if isinstance(layer, _MADEAffine):
        gated, network = layer.gated, layer.arn
    elif isinstance(layer, _ConditionalMADEAffine):
        gated, network = bool(layer.kwargs.get("gated", False)), layer.nn
    elif isinstance(layer, _COUPLINGS):
        return layer.nn
    else:
        return None
    if gated:
        raise ValueError(
            f"{type(layer).__name__} with gated=True cannot start at the identity: its update "
            "sigmoid(logit) * x + (1 - sigmoid(logit)) * m is not the identity at any finite logit"
        )
    return network


def _layers(flow: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(flow, (ComposeTransformModule, ConditionalComposeTransformModule)):
        return list(flow.children())
    return [flow]


def _input_dim(layer: torch.nn.Module, network: torch.nn.Module) -> int:
    """The vector size an autoregressive or coupling layer acts on."""
    if isinstance(layer, _COUPLINGS):
        return int(layer.split_dim + network.param_dims[0])
    return int(network.input_dim)


def _check_permutations_cancel(permutations: list[torch.nn.Module], dim: int) -> None:
    """The permutations between the layers stay when the layers become the identity: unless they
    compose to the identity (e.g. an even number of reversals), the flow would start as a
    permutation of the coordinates, and a decoder trained on them would read them swapped."""
    index = torch.arange(dim, dtype=torch.float64)
    probe = index
    for permutation in permutations:
        probe = permutation(probe)
    if not torch.equal(probe, index):
        order = [int(i) for i in probe]
        raise ValueError(
            f"the permutations between this flow's layers compose to {order}, not the identity: "
            "with its layers at the identity the flow would still reorder the coordinates. Use "
            "a length whose permutations cancel (with reversals between layers, an odd length)"
        )


def start_at_identity(flow: torch.nn.Module) -> torch.nn.Module:
    """Zeroes the output layer of the network of every layer of ``flow`` (one layer, or a
    composition from :func:`transforms.flow`, plain or conditional), so that ``flow`` is the
    identity map with log-det 0 until its parameters move; returns ``flow``.

    Layers without parameters (the permutations between layers) are left as they are, so they
    must compose to the identity: with a reversal between layers, the length must be odd. A layer
    with parameters but no identity start (planar, radial, ..., or a gated IAF/MAF), or
    permutations that do not cancel, raise :class:`ValueError` naming them, before any layer is
    changed."""
    outputs, permutations, dim = [], [], None
    for layer in _layers(flow):
        network = _network(layer)
        if network is None:
            if any(True for _ in layer.parameters()):
                raise ValueError(
                    f"{type(layer).__name__} has no identity start; the flows that have one: "
                    f"{', '.join(STARTS_AT_IDENTITY)}"
                )
            permutations.append(layer)
            continue
        dim = _input_dim(layer, network) if dim is None else dim
        outputs.append([m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1])
    if dim is not None:
        _check_permutations_cancel(permutations, dim)
    with torch.no_grad():
        for output in outputs:
            output.weight.zero_()
            if output.bias is not None:
                output.bias.zero_()
    return flow
