"""The context network of a conditional (amortised) flow layer: one :class:`pyro.nn.DenseNN` from
a context vector to the layer's parameters, shared by every family's ``conditional_*`` builder so
that they validate and default the same way. ``hidden_dims=[]`` gives a linear map
(:class:`LinearHypernet`): the amortisation of van den Berg et al.'s Sylvester flow code (2018),
whose flow parameters are linear in the encoder's last hidden layer, at a fraction of the cost."""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.nn import DenseNN

from .registry import check_positive_int

__all__ = ["LinearHypernet", "context_hypernet"]


class LinearHypernet(DenseNN):
    """``context -> parameters`` by one linear map, split into ``param_dims`` as
    :class:`~pyro.nn.DenseNN` splits its output (a subclass, so that every ``Conditional*``
    layer reads it as it reads a DenseNN; DenseNN itself needs one hidden layer at least).

    >>> bias, u, w = LinearHypernet(5, [1, 3, 3])(torch.randn(7, 5))
    >>> bias.shape, u.shape, w.shape
    (torch.Size([7, 1]), torch.Size([7, 3]), torch.Size([7, 3]))
    """

    def __init__(self, context_dim: int, param_dims: Sequence[int]) -> None:
        super().__init__(context_dim, [1], param_dims=list(param_dims))
        self.hidden_dims = []
        self.layers = torch.nn.ModuleList([torch.nn.Linear(context_dim, self.output_multiplier)])


def context_hypernet(
    input_dim: int,
    context_dim: int,
    param_dims: Sequence[int],
    hidden_dims: Sequence[int] | None = None,
) -> DenseNN:
    """``DenseNN(context_dim, hidden_dims, param_dims)``: the network ``context -> parameters`` of
    one layer acting on ``input_dim``-vectors. ``hidden_dims`` defaults to
    ``[10 * input_dim, 10 * input_dim]``, Pyro's default for its conditional flows; ``[]`` gives
    a :class:`LinearHypernet`. Raises :class:`ValueError` naming a dimension or width that is not
    a positive int."""
    check_positive_int("input_dim", input_dim)
    check_positive_int("context_dim", context_dim)
    if hidden_dims is not None and not isinstance(hidden_dims, Sequence):
        raise ValueError(f"hidden_dims must be a list of positive ints ([] for one linear map), "
                         f"got {hidden_dims!r}")
    hidden_dims = [10 * input_dim, 10 * input_dim] if hidden_dims is None else list(hidden_dims)
    if not hidden_dims:
        return LinearHypernet(context_dim, param_dims)
    for index, width in enumerate(hidden_dims):
        check_positive_int(f"hidden_dims[{index}]", width)
    return DenseNN(context_dim, hidden_dims, param_dims=list(param_dims))
