"""Users' own sequences: an ``.npz`` with ``x`` ``(N, T, D)`` and an optional ``mask`` ``(N, T)``.

A file may also hold a held-out set as ``x_test`` (and ``mask_test``); without one the last 20 %
of the sequences are held out (:func:`pyro_storn.data.pendulum.split_train_test`). ``mask`` marks
the real steps of ragged sequences (1/True = observed); values under a 0 may be anything,
NaN included, since the model never reads them.

Every check raises ``ValueError`` naming the array, its shape and the first bad index, so the CLI
can print one line and exit 2 before it writes anything.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pendulum import TEST_FRACTION, split_train_test

__all__ = ["SequenceData", "validate_sequences", "load_sequences"]


@dataclass
class SequenceData:
    """Validated training and held-out sequences, float32, with boolean masks ``(N, T)``."""

    x: np.ndarray
    mask: np.ndarray
    x_test: np.ndarray
    mask_test: np.ndarray
    # A validation split of its own (e.g. JSB's "valid"); None: carve one from x if asked.
    x_valid: np.ndarray | None = None
    mask_valid: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        return int(self.x.shape[-1])


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def validate_sequences(
    x: object, mask: object = None, *, name: str = "x", mask_name: str = "mask"
) -> tuple[np.ndarray, np.ndarray]:
    """Check ``x`` ``(N, T, D)`` and ``mask`` ``(N, T)``; return them as float32 and bool.

    Non-finite values are an error only where the mask observes them.
    """
    try:
        x = np.asarray(x)
    except Exception as error:  # noqa: BLE001 - anything numpy cannot read is the user's input
        raise ValueError(f"{name}: cannot be read as an array ({error})") from None
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected a numeric array, got dtype {x.dtype} shape {x.shape}")
    if x.ndim != 3:
        raise ValueError(f"{name}: expected rank 3 (N, T, D), got shape {x.shape} (rank {x.ndim})")
    if 0 in x.shape:
        raise ValueError(f"{name}: empty array, shape {x.shape}")
    x = x.astype(np.float32)
    if mask is None:
        mask = np.ones(x.shape[:2], dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"{mask_name}: expected shape {x.shape[:2]} (N, T) to match {name} {x.shape}, "
                f"got {mask.shape}"
            )
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"{mask_name}: expected 0/1 or bool values, got dtype {mask.dtype}")
        bad = ~np.isin(mask, (0, 1))
        if bad.any():
            index = _first_index(bad)
            raise ValueError(
                f"{mask_name}: values must be 0/1 or bool, shape {mask.shape}, "
                f"first bad index {index} = {mask[index]!r}"
            )
        mask = mask.astype(bool)
        empty = ~mask.any(axis=1)
        if empty.any():
            raise ValueError(
                f"{mask_name}: sequence with no observed step, shape {mask.shape}, "
                f"first bad index ({int(np.argmax(empty))},)"
            )
    bad = ~np.isfinite(x) & mask[..., None]
    if bad.any():
        index = _first_index(bad)
        raise ValueError(
            f"{name}: non-finite value {x[index]} in an observed step, shape {x.shape}, "
            f"first bad index {index}"
        )
    return x, mask


def load_sequences(path: str | os.PathLike, test_fraction: float = TEST_FRACTION) -> SequenceData:
    """Read and validate an ``.npz`` of sequences (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"data file {str(path)!r} is not a readable .npz ({error})") from None
    if "x" not in arrays:
        raise ValueError(
            f"data file {str(path)!r} has no array 'x' (N, T, D); it holds: "
            f"{', '.join(sorted(arrays)) or 'nothing'}"
        )
    x, mask = validate_sequences(arrays["x"], arrays.get("mask"))
    if "x_test" in arrays:
        x_test, mask_test = validate_sequences(
            arrays["x_test"], arrays.get("mask_test"), name="x_test", mask_name="mask_test"
        )
        if x_test.shape[2] != x.shape[2]:
            raise ValueError(
                f"x_test: feature dim {x_test.shape[2]} (shape {x_test.shape}) differs from "
                f"x's {x.shape[2]} (shape {x.shape})"
            )
    else:
        x, x_test = split_train_test(x, test_fraction)
        mask, mask_test = split_train_test(mask, test_fraction)
    return SequenceData(x=x, mask=mask, x_test=x_test, mask_test=mask_test)
