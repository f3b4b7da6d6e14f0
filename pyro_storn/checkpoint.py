"""Checkpoints that survive a crash at any moment and detect their own corruption.

A checkpoint file is ``MAGIC``, the sha256 of the payload in hex, a newline, then the payload as
written by :func:`torch.save`. :func:`save_checkpoint` writes a temporary file, fsyncs it, moves the
current (verified) checkpoint to ``<name>.prev`` and renames the new one into place, so at every
instant one complete, verified checkpoint exists. :func:`load_checkpoint` verifies the digest and
falls back to ``<name>.prev`` when the newest file is truncated or corrupt.

Payloads must be plain (tensors, numbers, strings, lists, tuples, dicts) since they are read with
``torch.load(weights_only=True)``; :func:`rng_state` gives the RNG states in that form.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "rng_state",
    "set_rng_state",
]

MAGIC = b"PYRO-STORN-CHECKPOINT-1\n"
_DIGEST_HEX_LEN = 64


class CheckpointError(ValueError):
    """No readable, uncorrupted checkpoint."""


def previous_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_verified(path: Path) -> bytes:
    """The payload bytes of ``path``; :class:`CheckpointError` saying why not."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    header_len = len(MAGIC) + _DIGEST_HEX_LEN + 1
    if not raw.startswith(MAGIC) or len(raw) < header_len:
        raise CheckpointError(f"{path}: not a pyro-storn checkpoint (bad or truncated header)")
    digest = raw[len(MAGIC) : len(MAGIC) + _DIGEST_HEX_LEN].decode("ascii", "replace")
    payload = raw[header_len:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: sha256 mismatch (file truncated or corrupt)")
    return payload


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically, keeping the previous good file as ``.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(MAGIC)
        handle.write(hashlib.sha256(data).hexdigest().encode("ascii"))
        handle.write(b"\n")
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if path.exists():
        try:
            _read_verified(path)
        except CheckpointError:
            pass  # a corrupt newest file never replaces the good previous one
        else:
            os.replace(path, previous_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _load_bytes(payload: bytes, map_location: Any) -> dict[str, Any]:
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The newest verified payload at ``path``, else the previous one (with a warning)."""
    path = Path(path)
    try:
        return _load_bytes(_read_verified(path), map_location)
    except CheckpointError as newest_error:
        prev = previous_path(path)
        try:
            payload = _load_bytes(_read_verified(prev), map_location)
        except CheckpointError as prev_error:
            raise CheckpointError(f"no usable checkpoint: {newest_error}; {prev_error}") from None
        warnings.warn(f"{newest_error}; using the previous checkpoint {prev}", stacklevel=2)
        return payload


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global RNGs, in plain form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
