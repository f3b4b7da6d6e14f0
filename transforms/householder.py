r"""Householder flow (Tomczak & Welling 2016), reused from Pyro.

Pyro's :class:`~pyro.distributions.transforms.Householder` and
:class:`~pyro.distributions.transforms.ConditionalHouseholder` are right as they stand, so they are
re-used, not rewritten: the map is a product of reflections (orthogonal, so
:math:`\log|\det J| = 0` exactly, which is what Pyro returns, computed from nothing cached), and
its inverse applies the same reflections in reverse order, analytically, at any point (no
one-entry cache involved). At ``input_dim = 1`` a reflection is :math:`x \mapsto -x`, which Pyro
computes correctly. ``tests/test_sylvester_householder.py`` checks all of this. What is added
here: the registry entry, typed builders with defaults shared by the plain and conditional flow,
and ``extra_repr`` so that a printed flow reads well.
"""

from __future__ import annotations

from typing import Sequence

from pyro.distributions.transforms.householder import (
    ConditionalHouseholder as _PyroConditionalHouseholder,
)
from pyro.distributions.transforms.householder import ConditionedHouseholder
from pyro.distributions.transforms.householder import Householder as _PyroHouseholder
from torch import nn

from .hypernet import context_hypernet
from .registry import register

__all__ = [
    "ConditionedHouseholder",
    "Householder",
    "ConditionalHouseholder",
    "householder",
    "conditional_householder",
]


class Householder(_PyroHouseholder):
    __doc__ = _PyroHouseholder.__doc__
    __repr__ = nn.Module.__repr__  # Transform.__repr__ comes first in the MRO and shows no state

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_transforms={self.u_unnormed.size(-2)}"


class ConditionalHouseholder(_PyroConditionalHouseholder):
    __doc__ = _PyroConditionalHouseholder.__doc__
    volume_preserving = True

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_transforms={self.count_transforms}"


def _count(input_dim: int, count_transforms: int | None) -> int:
    """Default: D reflections, enough for any orthogonal matrix (Cartan-Dieudonne); more than D
    only over-parametrises (Pyro warns)."""
    count = input_dim if count_transforms is None else count_transforms
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count_transforms must be a positive int, got {count_transforms!r}")
    return count


def conditional_householder(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_transforms: int | None = None,
) -> ConditionalHouseholder:
    """A :class:`ConditionalHouseholder` whose reflection vectors are the outputs of a
    :class:`pyro.nn.DenseNN` of the context (hidden dims default to ``[10 D, 10 D]``)."""
    count = _count(input_dim, count_transforms)
    hypernet = context_hypernet(input_dim, context_dim, [input_dim] * count, hidden_dims)
    return ConditionalHouseholder(input_dim, hypernet, count)


@register(
    "householder",
    exact_inverse=True,
    inverse="closed form (reflections are their own inverse)",
    conditional=conditional_householder,
    description="Householder flow (Tomczak & Welling 2016): volume-preserving product of "
    "reflections, Pyro's",
)
def householder(input_dim: int, count_transforms: int | None = None) -> Householder:
    """A :class:`Householder` layer of ``count_transforms`` reflections (default ``input_dim``)."""
    return Householder(input_dim, _count(input_dim, count_transforms))
