"""The one registry that names every flow layer.

A flow family registers its plain builder with :func:`register`; the builder takes
``(input_dim, **kwargs)`` and returns one :class:`~pyro.distributions.TransformModule`. Its
conditional builder, when it has one, takes ``(input_dim, context_dim, **kwargs)`` and returns one
:class:`~pyro.distributions.ConditionalTransformModule`. Users reach the registry through
:func:`available`, :func:`info`, :func:`build`, :func:`flow` and :func:`factory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from pyro.distributions import ConditionalTransformModule, TransformModule
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

__all__ = [
    "FlowInfo",
    "register",
    "available",
    "info",
    "build",
    "flow",
    "factory",
    "condition",
]

PlainBuilder = Callable[..., TransformModule]
ConditionalBuilder = Callable[..., ConditionalTransformModule]


@dataclass(frozen=True)
class FlowInfo:
    """What a registered flow layer is.

    :param name: the registry name.
    :param exact_inverse: the inverse is computed (analytically, or by a solver run to machine
        precision) at any point of the codomain, not only at the last forward output.
    :param inverse: how the inverse is computed, for the docs and ``--help`` texts (e.g.
        ``"closed form"``, ``"numerical: bracketed Newton per coordinate, to 4 ulps"``); defaults
        to ``"exact"`` or ``"not exact"`` from ``exact_inverse``.
    :param conditional: ``build(..., context_dim=C)`` is supported.
    :param event_dim: 1 for a map of vectors (broadcast over any batch dims, e.g. time),
        2 for a map of a whole ``(T, Z)`` sequence.
    :param min_input_dim: the smallest ``input_dim`` the flow acts on (2 for couplings).
    :param permute_between: :func:`flow` puts a permutation between consecutive layers, so that
        every coordinate is eventually transformed and conditioned on: ``True`` for a reversal
        (:class:`~transforms.Reverse`), or a callable ``(input_dim, **kwargs) -> TransformModule``
        that builds the permutation a family needs (couplings roll by their split).
    :param test_kwargs: keyword arguments the generated tests pass to the builder in float64
        (e.g. tight ODE tolerances); never a loosening of the test's own tolerances.
    :param description: one line for ``--help`` texts and the docs.
    """

    name: str
    builder: PlainBuilder
    conditional_builder: ConditionalBuilder | None
    exact_inverse: bool
    event_dim: int = 1
    min_input_dim: int = 1
    permute_between: bool | Callable[..., TransformModule] = False
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    inverse: str = ""

    @property
    def conditional(self) -> bool:
        return self.conditional_builder is not None


_REGISTRY: dict[str, FlowInfo] = {}


def register(
    name: str,
    *,
    exact_inverse: bool,
    conditional: ConditionalBuilder | None = None,
    event_dim: int = 1,
    min_input_dim: int = 1,
    permute_between: bool | Callable[..., TransformModule] = False,
    test_kwargs: dict[str, Any] | None = None,
    description: str = "",
    inverse: str | None = None,
) -> Callable[[PlainBuilder], PlainBuilder]:
    """Decorator for a flow family's plain builder ``builder(input_dim, **kwargs)``."""

    def decorate(builder: PlainBuilder) -> PlainBuilder:
        if name in _REGISTRY:
            raise ValueError(f"flow {name!r} is registered twice")
        if event_dim not in (1, 2):
            raise ValueError(f"event_dim must be 1 or 2, got {event_dim!r} for flow {name!r}")
        _REGISTRY[name] = FlowInfo(
            name=name,
            builder=builder,
            conditional_builder=conditional,
            exact_inverse=exact_inverse,
            event_dim=event_dim,
            min_input_dim=min_input_dim,
            permute_between=permute_between,
            test_kwargs=dict(test_kwargs or {}),
            description=description or (builder.__doc__ or "").strip().split("\n")[0],
            inverse=inverse or ("exact" if exact_inverse else "not exact"),
        )
        return builder

    return decorate


def available(*, conditional: bool | None = None, event_dim: int | None = None) -> list[str]:
    """Sorted names of the registered flows, optionally only those that can be conditioned
    (``conditional=True``) or that act on a given event dim."""
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if (conditional is None or entry.conditional == conditional)
        and (event_dim is None or entry.event_dim == event_dim)
    )


def info(name: str) -> FlowInfo:
    """The :class:`FlowInfo` of a registered flow; ``ValueError`` naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown flow {name!r}; valid choices: {', '.join(available())}"
        ) from None


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: a Python or numpy int (sizes read from arrays are numpy
    ints), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int; ValueError ``"<name> must be a positive int, got <value>"``
    unless it is an int >= 1 (:func:`is_int`: a numpy int is, a bool or a float is not): the one
    check of sizes, counts and lengths, in ``transforms`` and ``pyro_storn`` alike."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_dims(entry: FlowInfo, input_dim: Any, context_dim: Any) -> None:
    check_positive_int("input_dim", input_dim)
    if input_dim < entry.min_input_dim:
        able = [n for n in available() if _REGISTRY[n].min_input_dim <= input_dim]
        raise ValueError(
            f"flow {entry.name!r} needs input_dim >= {entry.min_input_dim}, got {input_dim}; "
            f"flows that act on {input_dim} dimension(s): {', '.join(able)}"
        )
    if context_dim is None:
        return
    if not is_int(context_dim) or context_dim <= 0:
        raise ValueError(f"context_dim must be a positive int or None, got {context_dim!r}")
    if not entry.conditional:
        raise ValueError(
            f"flow {entry.name!r} cannot be conditioned on a context; "
            f"conditional flows: {', '.join(available(conditional=True))}"
        )


def build(name: str, input_dim: int, *, context_dim: int | None = None, **kwargs: Any):
    """One layer of flow ``name`` acting on ``input_dim``-vectors (or ``(T, input_dim)``
    sequences for event-dim-2 flows); a conditional layer when ``context_dim`` is given."""
    entry = info(name)
    _check_dims(entry, input_dim, context_dim)
    if context_dim is None:
        return entry.builder(input_dim, **kwargs)
    return entry.conditional_builder(input_dim, context_dim, **kwargs)


def _permutation(entry: FlowInfo, input_dim: int, kwargs: dict[str, Any]) -> TransformModule:
    if callable(entry.permute_between):
        return entry.permute_between(input_dim, **kwargs)
    from .permutation import Reverse

    return Reverse(event_dim=entry.event_dim)


def flow(
    name: str,
    input_dim: int,
    length: int,
    *,
    context_dim: int | None = None,
    **kwargs: Any,
) -> ComposeTransformModule | ConditionalComposeTransformModule:
    """``length`` layers of flow ``name`` composed, with a permutation between layers of flows
    that need one (see :class:`FlowInfo`). Plain: a :class:`ComposeTransformModule` (a Transform and an
    ``nn.Module``). Conditional: a :class:`ConditionalComposeTransformModule` whose
    ``condition(context)`` gives the composed transform."""
    entry = info(name)
    check_positive_int("flow length", length)
    layers = []
    for k in range(length):
        if k > 0 and entry.permute_between and input_dim > 1:
            layers.append(_permutation(entry, input_dim, kwargs))
        layers.append(build(name, input_dim, context_dim=context_dim, **kwargs))
    if context_dim is None:
        return ComposeTransformModule(layers)
    return ConditionalComposeTransformModule(layers)


def factory(name: str, length: int = 1, **kwargs: Any) -> Callable[[int], ComposeTransformModule]:
    """A callable ``input_dim -> TransformModule`` (the layers composed), the form that
    :class:`pyro.infer.autoguide.AutoNormalizingFlow` takes::

        AutoNormalizingFlow(model, transforms.factory("iaf", length=4))
    """
    entry = info(name)
    if entry.event_dim != 1:
        raise ValueError(
            f"flow {name!r} acts on whole sequences (event dim {entry.event_dim}); "
            f"AutoNormalizingFlow needs a per-vector flow: {', '.join(available(event_dim=1))}"
        )
    check_positive_int("flow length", length)

    def make(input_dim: int) -> ComposeTransformModule:
        return flow(name, input_dim, length, **kwargs)

    make.__name__ = f"{name}_x{length}"
    return make


def condition(transform: Any, context: torch.Tensor):
    """``transform.condition(context)`` for conditional transforms, the transform itself
    otherwise: lets a guide treat plain and amortised flows alike."""
    if isinstance(transform, ConditionalTransformModule) or hasattr(transform, "condition"):
        return transform.condition(context)
    return transform
