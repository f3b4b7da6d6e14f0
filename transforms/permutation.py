"""A fixed reversal put between coupling / autoregressive layers.

Pyro's ``Permute`` stores an index tensor as a plain attribute (it does not follow ``.to(device)``)
and is not an ``nn.Module``; a reversal needs no state at all, so it lives in any ``ModuleList``,
saves and loads trivially, and runs on any device.
"""

from __future__ import annotations

import torch
from pyro.distributions import TransformModule
from torch.distributions import constraints

__all__ = ["Reverse", "Roll"]


class Reverse(TransformModule):
    r"""Reverses the order of the innermost event dimension.

    :math:`y_i = x_{D-1-i}`, volume preserving (:math:`\log|\det J| = 0`), its own inverse.
    With ``event_dim=1`` it reverses the features of each vector; with ``event_dim=2`` it reverses
    time in a ``(T, Z)`` sequence, so that a causal flow over time followed by a reversal and
    another causal layer lets every step depend on every other.
    """

    bijective = True
    volume_preserving = True

    def __init__(self, event_dim: int = 1):
        super().__init__(cache_size=1)
        if event_dim not in (1, 2):
            raise ValueError(f"event_dim must be 1 or 2, got {event_dim!r}")
        self._event_dim = event_dim

    @property
    def domain(self):
        return constraints.independent(constraints.real, self._event_dim)

    @property
    def codomain(self):
        return constraints.independent(constraints.real, self._event_dim)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-self._event_dim)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(-self._event_dim)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[: x.dim() - self._event_dim])

    def extra_repr(self) -> str:
        return f"event_dim={self._event_dim}"


class Roll(TransformModule):
    r"""Rotates the features of each vector: :math:`y_i = x_{(i + s) \bmod D}`.

    Between coupling layers split at ``s``, this brings the half just updated to the front, so
    the next layer conditions on it. A reversal cannot do that for odd ``D``: it leaves the middle
    coordinate in place, which a positional split then updates in every layer and conditions on in
    none. Volume preserving, :math:`\log|\det J| = 0`.
    """

    bijective = True
    volume_preserving = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, shift: int):
        super().__init__(cache_size=1)
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise ValueError(f"shift must be an int, got {shift!r}")
        self.shift = shift

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x.roll(-self.shift, dims=-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.roll(self.shift, dims=-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"shift={self.shift}"
