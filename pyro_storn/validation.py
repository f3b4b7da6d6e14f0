"""Argument checks shared by every module, so that a bad value is named the same way everywhere."""

from __future__ import annotations

__all__ = ["check_positive_int", "check_non_negative_int"]


def check_positive_int(name: str, value: object) -> int:
    """``value`` when it is an int >= 1 (not a bool); ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    """``value`` when it is an int >= 0 (not a bool); ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value
