"""Polyphonic music as piano rolls: a safe reader for Pyro's polyphonic pickle format (JSB
Chorales, Piano-midi.de, MuseData, Nottingham of Boulanger-Lewandowski et al. 2012) and a check
for users' own ``.npz`` of 0/1 sequences.

The format is a pickled dict ``{"train", "valid", "test"}``; each split is a list of sequences, a
sequence a list of frames, a frame a tuple of the MIDI note numbers sounding in it (numpy int64
scalars, possibly none). A frame becomes a row of 88 zeros and ones, column ``note - 21`` (the
piano's keys, MIDI 21..108, as Pyro's ``polyphonic_data_loader`` does); a split becomes
``x`` (N, T, 88) float32 padded with zeros to its longest sequence and ``mask`` (N, T) bool.

A pickle can run code when it is loaded (any global it names is imported and may be called).
:func:`load_polyphonic` therefore never calls a plain ``pickle.load``: its unpickler resolves only
the two numpy globals that this format holds (the scalar reconstructor and ``numpy.dtype``, the
latter only for numeric dtypes), plus ``_codecs.encode`` restricted to latin-1 strings (how
Python 3 writes a scalar's bytes at protocols 0-2), and refuses any other, naming it, before
anything is called.

>>> data = load_polyphonic("jsb_chorales.pickle")                      # doctest: +SKIP
>>> data.train.x.shape, data.train.mask.shape                          # doctest: +SKIP
((229, 129, 88), (229, 129))
>>> sequences = data.sequence_data()    # train and test as a SequenceData  # doctest: +SKIP

References:
[1] Nicolas Boulanger-Lewandowski, Yoshua Bengio, Pascal Vincent. Modeling Temporal
    Dependencies in High-Dimensional Sequences: Application to Polyphonic Music Generation and
    Transcription. ICML 2012. arXiv:1206.6392
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .sequences import SequenceData, load_sequences

__all__ = [
    "LOWEST_NOTE",
    "HIGHEST_NOTE",
    "N_NOTES",
    "SPLITS",
    "PolyphonicSplit",
    "PolyphonicData",
    "load_polyphonic",
    "read_polyphonic",
    "piano_roll",
    "check_binary",
    "load_binary_sequences",
]

# The piano's 88 keys: MIDI 21 (A0) .. 108 (C8); column = note - LOWEST_NOTE.
LOWEST_NOTE = 21
HIGHEST_NOTE = 108
N_NOTES = HIGHEST_NOTE - LOWEST_NOTE + 1
SPLITS = ("train", "valid", "test")

# The scalar reconstructor moved from numpy.core to numpy._core in numpy 2; pickles written by
# either name it by the module they were written with.
_SCALAR_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
# Notes are integers; floats are let through the unpickler so that the error can name the value.
_NUMERIC_DTYPE_KINDS = "biuf"


class _Refused(pickle.UnpicklingError):
    """A global or value outside the format, refused before anything is called."""


def _scalar_reconstructor() -> Any:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _numeric_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for numeric dtypes only: an object dtype would let a scalar carry any
    object, a structured one arbitrary fields."""
    dtype = np.dtype(*args)
    if dtype.kind not in _NUMERIC_DTYPE_KINDS or dtype.fields is not None:
        raise _Refused(
            f"refusing numpy dtype {dtype!r} in a polyphonic pickle: only numeric scalars are "
            "allowed"
        )
    return dtype


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into protocol 0-2 pickles (a scalar's raw
    bytes as a latin-1 string), for that use only: str to bytes by latin-1."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise _Refused(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 "
            "strings, as Python 3 writes a numpy scalar's bytes, are allowed"
        )
    return text.encode("latin1")


class _PolyphonicUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of the polyphonic format: numpy's scalar
    reconstructor, numeric ``numpy.dtype`` and (for the same file rewritten by Python 3 with
    protocol 0-2) latin-1 ``_codecs.encode``."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "scalar" and module in _SCALAR_MODULES:
            return _scalar_reconstructor()
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise _Refused(
            f"refusing global '{module}.{name}': a polyphonic pickle may only name "
            f"{', '.join(m + '.scalar' for m in _SCALAR_MODULES)}, numpy.dtype and "
            "_codecs.encode (latin-1)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refusing a persistent id: not part of the polyphonic format")


@dataclass(frozen=True)
class PolyphonicSplit:
    """One split as piano rolls: ``x`` (N, T, 88) float32 0/1, zero after each sequence's end;
    ``mask`` (N, T) bool, True on the ``lengths[i]`` frames of sequence i."""

    name: str
    x: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1)

    @property
    def n_frames(self) -> int:
        """Frames in the split: the denominator of nats per frame."""
        return int(self.mask.sum())

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class PolyphonicData:
    """The three splits of a polyphonic data set."""

    train: PolyphonicSplit
    valid: PolyphonicSplit
    test: PolyphonicSplit

    @property
    def input_dim(self) -> int:
        return N_NOTES

    def splits(self) -> dict[str, PolyphonicSplit]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def sequence_data(self) -> SequenceData:
        """The three splits as the :class:`~pyro_storn.data.sequences.SequenceData` the trainer
        reads (``valid`` as its own validation split)."""
        return SequenceData(
            x=self.train.x, mask=self.train.mask, x_test=self.test.x, mask_test=self.test.mask,
            x_valid=self.valid.x, mask_valid=self.valid.mask,
        )


def _where(source: str, split: str, sequence: int | None = None, frame: int | None = None) -> str:
    place = f"{source}: split {split!r}"
    if sequence is not None:
        place += f", sequence {sequence}"
    if frame is not None:
        place += f", frame {frame}"
    return place


def _note_column(note: Any, where: str) -> int:
    if isinstance(note, (bool, np.bool_)) or not isinstance(note, (int, np.integer)):
        raise ValueError(f"{where}: note {note!r} is not an integer MIDI note number")
    if not LOWEST_NOTE <= int(note) <= HIGHEST_NOTE:
        raise ValueError(
            f"{where}: note {int(note)} is outside the piano's range "
            f"{LOWEST_NOTE}..{HIGHEST_NOTE}"
        )
    return int(note) - LOWEST_NOTE


def piano_roll(sequences: Any, split: str = "train", source: str = "data") -> PolyphonicSplit:
    """Frames of note numbers (a list of sequences, each a list of frames, each an iterable of
    MIDI notes) as a padded 0/1 :class:`PolyphonicSplit`; any bad entry is a ``ValueError``
    naming ``source``, the split, the sequence, the frame and the value."""
    if not isinstance(sequences, (list, tuple)):
        raise ValueError(
            f"{_where(source, split)}: expected a list of sequences, got {type(sequences).__name__}"
        )
    if len(sequences) == 0:
        raise ValueError(f"{_where(source, split)}: the split holds no sequence")
    rows: list[list[list[int]]] = []
    for i, sequence in enumerate(sequences):
        if not isinstance(sequence, (list, tuple)):
            raise ValueError(f"{_where(source, split, i)}: expected a list of frames, got "
                             f"{type(sequence).__name__}")
        if len(sequence) == 0:
            raise ValueError(f"{_where(source, split, i)}: the sequence has no frame")
        columns = []
        for t, frame in enumerate(sequence):
            if not isinstance(frame, (list, tuple)):
                raise ValueError(f"{_where(source, split, i, t)}: expected a tuple of notes, got "
                                 f"{type(frame).__name__} {frame!r}")
            columns.append([_note_column(note, _where(source, split, i, t)) for note in frame])
        rows.append(columns)
    n_steps = max(len(columns) for columns in rows)
    x = np.zeros((len(rows), n_steps, N_NOTES), dtype=np.float32)
    mask = np.zeros((len(rows), n_steps), dtype=bool)
    for i, columns in enumerate(rows):
        mask[i, : len(columns)] = True
        for t, notes in enumerate(columns):
            x[i, t, notes] = 1.0
    return PolyphonicSplit(name=split, x=x, mask=mask)


def read_polyphonic(raw: bytes, source: str = "data") -> PolyphonicData:
    """Parse the bytes of a polyphonic pickle (see the module docstring); ``source`` names it in
    errors."""
    try:
        # latin1: the format was written by Python 2, whose str holds the scalars' raw bytes.
        content = _PolyphonicUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as error:
        raise ValueError(f"{source}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError) as error:
        raise ValueError(f"{source}: not a readable polyphonic pickle ({type(error).__name__}: "
                         f"{error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{source}: expected a dict with keys {', '.join(SPLITS)}, got "
                         f"{type(content).__name__}")
    missing = [name for name in SPLITS if name not in content]
    if missing:
        raise ValueError(f"{source}: missing split(s) {', '.join(missing)}; it holds "
                         f"{', '.join(map(repr, content)) or 'nothing'}")
    return PolyphonicData(*(piano_roll(content[name], name, source) for name in SPLITS))


def load_polyphonic(path: str | os.PathLike) -> PolyphonicData:
    """Read a polyphonic pickle (e.g. Pyro's ``jsb_chorales.pickle``) safely: no global outside
    the format's two numpy ones is ever imported or called."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    return read_polyphonic(path.read_bytes(), source=str(path))


def check_binary(x: np.ndarray, mask: np.ndarray | None = None, name: str = "x") -> None:
    """``ValueError`` naming the first observed entry of ``x`` (N, T, D) that is not 0 or 1."""
    x = np.asarray(x)
    observed = np.ones(x.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, bool)
    bad = ~np.isin(x, (0, 1)) & observed[..., None]
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: a Bernoulli emission needs 0/1 values; shape {x.shape}, first bad index "
            f"{index} (sequence, frame, feature) = {x[index]!r}"
        )


def load_binary_sequences(path: str | os.PathLike) -> SequenceData:
    """A user's ``.npz`` of 0/1 sequences (:func:`~pyro_storn.data.sequences.load_sequences`'s
    format), with every observed value checked to be 0 or 1."""
    data = load_sequences(path)
    check_binary(data.x, data.mask, "x")
    check_binary(data.x_test, data.mask_test, "x_test")
    return data

