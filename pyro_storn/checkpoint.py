"""Checkpoints that any PyTorch user can open, that survive a crash at any moment and that detect
their own corruption.

A checkpoint is a plain :func:`torch.save` file of a dict, readable with
``torch.load(path, weights_only=True)``. Beside the payload's own keys it holds ``"format"`` and
``"sha256"``: a digest of the payload's content (every key, number, string and tensor's dtype,
shape and bytes, in a fixed order), so a flipped byte that still unpickles is caught too.
:func:`save_checkpoint` writes a temporary file, fsyncs it, moves the current (verified) checkpoint
to ``<name>.prev`` and renames the new one into place, so at every instant one complete, verified
checkpoint exists. :func:`load_checkpoint` verifies the digest and falls back to ``<name>.prev``
when the newest file is truncated or corrupt.

Files of the older format (``MAGIC``, the hex sha256 of the bytes that follow, a newline, then the
:func:`torch.save` bytes) still load.

Payloads must be plain (tensors, numbers, strings, lists, tuples, dicts) since they are read with
``weights_only=True``; :func:`rng_state` gives the RNG states in that form.

>>> save_checkpoint("run/checkpoint.pt", {"module": model.state_dict(), "epoch": 3})  # doctest: +SKIP
>>> torch.load("run/checkpoint.pt", weights_only=True)["epoch"]                     # doctest: +SKIP
3
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
    "FORMAT",
    "content_digest",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "rng_state",
    "set_rng_state",
]

FORMAT = "pyro_storn.checkpoint/2"
# The header of the first format, which started with this line and the hex digest.
MAGIC = b"PYRO-STORN-CHECKPOINT-1\n"
_DIGEST_HEX_LEN = 64
# torch.save writes a zip archive; its first bytes are the zip local-file signature.
_ZIP_SIGNATURE = b"PK\x03\x04"
_RESERVED = ("format", "sha256")


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


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` with its type, so that distinct payloads hash apart."""
    if isinstance(value, dict):
        digest.update(b"d%d:" % len(value))
        for key in sorted(value, key=repr):  # keys may mix ints and strings (optimiser state)
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"l%d:" % len(value) if isinstance(value, list) else b"t%d:" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (bytes, bytearray)):
        digest.update(b"b%d:" % len(value) + bytes(value))
    else:  # None, bool, int, float, str, torch.Size entries, dtypes
        text = f"{type(value).__name__}:{value!r}".encode()
        digest.update(b"s%d:" % len(text) + text)


def content_digest(payload: dict[str, Any]) -> str:
    """The sha256 of ``payload``'s content, its own ``"format"`` and ``"sha256"`` keys left out."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k not in _RESERVED})
    return digest.hexdigest()


def _read(path: Path, map_location: Any) -> dict[str, Any]:
    """The verified payload of ``path`` (either format); :class:`CheckpointError` saying why not."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    if raw.startswith(MAGIC):
        return _read_first_format(path, raw, map_location)
    if not raw.startswith(_ZIP_SIGNATURE):
        raise CheckpointError(f"{path}: not a pyro-storn checkpoint (not a torch.save file)")
    try:
        payload = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged archive fails in zip, pickle or storage code alike
        raise CheckpointError(f"{path}: file truncated or corrupt, torch.load fails "
                              f"({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "sha256" not in payload:
        raise CheckpointError(f"{path}: not a pyro-storn checkpoint (no {FORMAT!r} digest)")
    if content_digest(payload) != payload["sha256"]:
        raise CheckpointError(f"{path}: sha256 mismatch (file corrupt)")
    return {k: v for k, v in payload.items() if k not in _RESERVED}


def _read_first_format(path: Path, raw: bytes, map_location: Any) -> dict[str, Any]:
    header_len = len(MAGIC) + _DIGEST_HEX_LEN + 1
    digest = raw[len(MAGIC) : len(MAGIC) + _DIGEST_HEX_LEN].decode("ascii", "replace")
    payload = raw[header_len:]
    if len(raw) < header_len or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: sha256 mismatch (file truncated or corrupt)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically, keeping the previous good file as ``.prev``."""
    path = Path(path)
    clash = [key for key in _RESERVED if key in payload]
    if clash:
        raise ValueError(f"payload keys {clash} are reserved for the checkpoint's own digest")
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {**payload, "format": FORMAT, "sha256": content_digest(payload)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(stored, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if path.exists():
        try:
            _read(path, "cpu")
        except CheckpointError:
            pass  # a corrupt newest file never replaces the good previous one
        else:
            os.replace(path, previous_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The newest verified payload at ``path``, else the previous one (with a warning)."""
    path = Path(path)
    try:
        return _read(path, map_location)
    except CheckpointError as newest_error:
        prev = previous_path(path)
        try:
            payload = _read(prev, map_location)
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
