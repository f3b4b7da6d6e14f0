"""Users' own sequences: an ``.npz`` with ``x`` ``(N, T, D)`` and an optional ``mask`` ``(N, T)``.

A file may also hold a held-out set as ``x_test`` (and ``mask_test``); without one the last 20 %
of the sequences are held out (:func:`pyro_storn.data.pendulum.split_train_test`). ``mask`` marks
the real steps of ragged sequences (1/True = observed); values under a 0 may be anything,
NaN included, since the model never reads them.

Every check raises ``ValueError`` naming the array, its shape and the first bad index, so the CLI
can print one line and exit 2 before it writes anything. That includes finite values too large
for float32 training (:func:`check_training_scale`): x = 1e30 is finite, but its variance is not.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .npz import zip_signature_problem
from .pendulum import TEST_FRACTION, split_train_test

__all__ = ["SequenceData", "validate_sequences", "check_training_scale", "load_sequences"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
# The loss sums squared standardised values over a batch of sequences and scales them: a sum of
# squares must stay this far below float32's largest value for the float32 loss to stay finite.
SCALE_HEADROOM = 1e6


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
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        _check_float32_range(x, mask, name)
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


def _check_float32_range(x: np.ndarray, mask: object, name: str) -> None:
    """Finite values beyond float32's range would become inf when cast: say so, not "inf"."""
    observed = np.ones(x.shape[:2], dtype=bool) if mask is None or np.shape(mask) != x.shape[:2] \
        else np.asarray(mask).astype(bool)
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(x) & (np.abs(x) > FLOAT32_MAX) & observed[..., None]
    if bad.any():
        index = _first_index(bad)
        raise ValueError(f"{name}: value {x[index]:.6g} at index {index} is beyond float32's "
                         f"range (±{FLOAT32_MAX:.3g}), shape {x.shape}; rescale the data")


def check_training_scale(data: SequenceData) -> None:
    """``ValueError`` naming the value and its index when training in float32 would overflow:
    the per-feature variance of the observed training steps (how the model standardises), or
    a sequence's sum of squared standardised values in any split."""
    limit = FLOAT32_MAX / SCALE_HEADROOM
    observed = data.x.astype(np.float64)[data.mask]  # (n_observed, D)
    loc = observed.mean(0)
    deviation = observed - loc
    sum_sq = np.square(deviation).sum(0)
    for feature in np.flatnonzero(~(sum_sq < limit)):
        where = np.argwhere(data.mask)[int(np.argmax(np.abs(deviation[:, feature])))]
        index = (int(where[0]), int(where[1]), int(feature))
        raise ValueError(
            f"x: value {data.x[index]:.6g} at index {index} is too large for float32 training: "
            f"the variance of feature {feature} overflows (sum of squared deviations "
            f"{sum_sq[feature]:.3g} >= {limit:.3g}); rescale the data")
    n = observed.shape[0]
    scale = np.sqrt(sum_sq / (n - 1)) if n > 1 else np.ones_like(loc)
    scale = np.where(scale > 0, scale, 1.0)
    splits = [("x", data.x, data.mask), ("x_test", data.x_test, data.mask_test)]
    if data.x_valid is not None:
        splits.append(("x_valid", data.x_valid, data.mask_valid))
    for name, x, mask in splits:
        z = np.where(mask[..., None], (x.astype(np.float64) - loc) / scale, 0.0)
        per_sequence = np.square(z).sum((1, 2))
        bad = ~(per_sequence < limit)
        if bad.any():
            sequence = int(np.argmax(bad))
            step, feature = np.unravel_index(int(np.argmax(np.abs(z[sequence]))), z.shape[1:])
            index = (sequence, int(step), int(feature))
            raise ValueError(
                f"{name}: value {x[index]:.6g} at index {index} is too large for float32 "
                f"training: standardised by the training data's mean {loc[feature]:.3g} and "
                f"std {scale[feature]:.3g} it is {z[index]:.3g}, whose square overflows; "
                "rescale the data")


def load_sequences(path: str | os.PathLike, test_fraction: float = TEST_FRACTION) -> SequenceData:
    """Read and validate an ``.npz`` of sequences (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory, not an .npz file")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    problem = zip_signature_problem(path)
    if problem is not None:
        if problem.startswith("cannot read"):
            raise ValueError(f"data file {str(path)!r}: {problem}")
        raise ValueError(f"data file {str(path)!r} is not a readable .npz: {problem}")
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
    data = SequenceData(x=x, mask=mask, x_test=x_test, mask_test=mask_test)
    check_training_scale(data)
    return data
