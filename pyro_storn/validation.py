"""Argument checks shared by every module, so that a bad value is named the same way everywhere.

The positive-int check is the registry's own (:func:`transforms.registry.check_positive_int`):
``transforms`` cannot import ``pyro_storn``, so the one copy lives there. Both checks take numpy
integers as ints and return Python ints.
"""

from __future__ import annotations

from transforms.registry import check_positive_int, is_int

__all__ = ["check_positive_int", "check_non_negative_int", "check_probability"]


def check_non_negative_int(name: str, value: object) -> int:
    """``value`` as a Python int when it is an int >= 0 (a numpy int is, a bool is not);
    ``ValueError`` naming it otherwise."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_probability(name: str, value: object) -> float:
    """``value`` as a float when it is a number in [0, 1) (a bool is not); ``ValueError`` naming
    it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)
