"""Normalizing flows as Pyro TransformModules, and the registry that names them.

>>> import transforms
>>> transforms.available()                                  # doctest: +SKIP
>>> layer = transforms.build("planar", 2)                   # one layer
>>> stack = transforms.flow("radial", 2, 4)                 # four layers, composed
>>> amortised = transforms.flow("planar", 2, 4, context_dim=8)
>>> step = amortised.condition(torch.randn(8))              # doctest: +SKIP
"""

# Importing a flow family's module registers it.
from . import (  # noqa: F401
    autoregressive,
    block_autoregressive,
    cnf,
    conv_planar,
    coupling,
    glow,
    householder,
    matrix_exponential,
    neural_autoregressive,
    planar,
    polynomial,
    prelu,
    radial,
    spline,
    spline_autoregressive,
    spline_coupling,
    sylvester,
)
from .identity_start import STARTS_AT_IDENTITY, start_at_identity
from .permutation import Reverse, Roll
from .registry import FlowInfo, available, build, condition, factory, flow, info, register

__all__ = [
    "FlowInfo",
    "Reverse",
    "STARTS_AT_IDENTITY",
    "Roll",
    "available",
    "build",
    "condition",
    "factory",
    "flow",
    "info",
    "register",
    "start_at_identity",
]
