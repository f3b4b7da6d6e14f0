"""The context network of a conditional (amortised) flow layer: one :class:`pyro.nn.DenseNN` from
a context vector to the layer's parameters, shared by every family's ``conditional_*`` builder so
that they validate and default the same way."""

from __future__ import annotations

from typing import Sequence

from pyro.nn import DenseNN

from .registry import check_positive_int

__all__ = ["context_hypernet"]


def context_hypernet(
    input_dim: int,
    context_dim: int,
    param_dims: Sequence[int],
    hidden_dims: Sequence[int] | None = None,
) -> DenseNN:
    """``DenseNN(context_dim, hidden_dims, param_dims)``: the network ``context -> parameters`` of
    one layer acting on ``input_dim``-vectors. ``hidden_dims`` defaults to
    ``[10 * input_dim, 10 * input_dim]``, Pyro's default for its conditional flows. Raises
    :class:`ValueError` naming a dimension or width that is not a positive int."""
    check_positive_int("input_dim", input_dim)
    check_positive_int("context_dim", context_dim)
    hidden_dims = [10 * input_dim, 10 * input_dim] if hidden_dims is None else list(hidden_dims)
    if not hidden_dims:  # DenseNN needs one hidden layer at least (it reads hidden_dims[0])
        raise ValueError("hidden_dims must list at least one layer width, got []")
    for index, width in enumerate(hidden_dims):
        check_positive_int(f"hidden_dims[{index}]", width)
    return DenseNN(context_dim, hidden_dims, param_dims=list(param_dims))
