"""Helpers shared by the flow tests: moving parameters far from initialisation, and treating
plain and conditional layers alike."""

from __future__ import annotations

import torch

# "Moved far from initialisation": every parameter + N(0, 0.5^2), the standard of every log-det check.
PARAM_NOISE = 0.5


def move_parameters(module: torch.nn.Module, seed: int, scale: float = PARAM_NOISE) -> None:
    """Add ``scale`` * N(0, 1) noise, from a generator seeded with ``seed``, to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise)


def conditioned(layer, context):
    """The plain layer when ``context`` is None, else ``layer.condition(context)``."""
    return layer if context is None else layer.condition(context)
