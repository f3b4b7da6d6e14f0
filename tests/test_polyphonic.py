"""The polyphonic pickle reader: JSB Chorales as the README describes it, piano rolls and masks,
errors that name split, sequence, frame and value, and pickles that try to run code (never run)."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pyro_storn.data.polyphonic import (
    N_NOTES,
    PolyphonicData,
    check_binary,
    load_binary_sequences,
    load_polyphonic,
    piano_roll,
    read_polyphonic,
)
from pyro_storn.data.sequences import SequenceData

# ../shared/data beside the checkout (the README's place), or where PYRO_STORN_JSB says.
JSB = Path(os.environ.get(
    "PYRO_STORN_JSB",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "jsb_chorales" / "jsb_chorales.pickle",
))


def _notes(*values):
    return tuple(np.int64(v) for v in values)


def _dataset(**overrides):
    data = {
        "train": [[_notes(60, 64, 67), _notes(), _notes(21, 108)], [_notes(62)]],
        "valid": [[_notes(43), _notes(96)]],
        "test": [[_notes(70)]],
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_piano_rolls_masks_and_padding(protocol):
    data = read_polyphonic(pickle.dumps(_dataset(), protocol=protocol))
    assert isinstance(data, PolyphonicData) and data.input_dim == N_NOTES == 88
    train = data.train
    assert train.x.shape == (2, 3, 88) and train.x.dtype == np.float32
    assert train.mask.tolist() == [[True, True, True], [True, False, False]]
    assert np.flatnonzero(train.x[0, 0]).tolist() == [60 - 21, 64 - 21, 67 - 21]
    assert train.x[0, 1].sum() == 0  # a silent frame is a frame
    assert np.flatnonzero(train.x[0, 2]).tolist() == [0, 87]
    assert train.x[1, 1:].sum() == 0  # padding is zero
    assert train.lengths.tolist() == [3, 1] and train.n_frames == 4 and len(train) == 2
    sequences = data.sequence_data()
    assert isinstance(sequences, SequenceData)
    assert np.array_equal(sequences.x, train.x) and np.array_equal(sequences.mask_test, data.test.mask)
    assert set(data.splits()) == {"train", "valid", "test"}


@pytest.mark.skipif(not JSB.is_file(), reason="JSB Chorales not in ../shared/data")
def test_jsb_chorales_as_its_readme_describes():
    data = load_polyphonic(JSB)
    expected = {"train": (229, 13807, 25, 129), "valid": (76, 4602, 32, 144),
                "test": (77, 4725, 32, 160)}
    for name, split in data.splits().items():
        lengths = split.lengths
        assert (len(split), split.n_frames, lengths.min(), lengths.max()) == expected[name]
        assert split.x.shape == (len(split), lengths.max(), 88)
        sounding = np.flatnonzero(split.x.any((0, 1))) + 21
        assert sounding.min() >= 43 and sounding.max() <= 96
        assert set(np.unique(split.x)) <= {0.0, 1.0}
        assert split.x.sum(-1).max() <= 4  # four-part chorales


@pytest.mark.parametrize("split,sequence,frame,note,message", [
    ("train", 1, 0, 20, "outside the piano's range 21..108"),
    ("valid", 0, 1, 109, "outside the piano's range 21..108"),
    ("test", 0, 0, 60.5, "not an integer"),
    ("train", 0, 2, "60", "not an integer"),
    ("train", 0, 1, True, "not an integer"),
])
def test_bad_notes_are_named(split, sequence, frame, note, message):
    data = _dataset()
    frames = list(data[split][sequence])
    frames[frame] = (note,)
    data[split][sequence] = frames
    with pytest.raises(ValueError, match=message) as error:
        read_polyphonic(pickle.dumps(data, protocol=2), source="music.pickle")
    text = str(error.value)
    assert f"split {split!r}" in text and f"sequence {sequence}" in text
    assert f"frame {frame}" in text and str(note if note is not True else "True") in text
    assert text.startswith("music.pickle")


@pytest.mark.parametrize("overrides,message", [
    ({"test": []}, "split 'test': the split holds no sequence"),
    ({"valid": [[]]}, "split 'valid', sequence 0: the sequence has no frame"),
    ({"train": [[_notes(60), 61]]}, "split 'train', sequence 0, frame 1: expected a tuple"),
    ({"train": "abc"}, "split 'train': expected a list of sequences"),
])
def test_empty_or_malformed_splits_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        read_polyphonic(pickle.dumps(_dataset(**overrides), protocol=2))


def test_missing_splits_and_wrong_containers():
    data = _dataset()
    del data["valid"]
    with pytest.raises(ValueError, match="missing split.*valid"):
        read_polyphonic(pickle.dumps(data))
    with pytest.raises(ValueError, match="expected a dict"):
        read_polyphonic(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not a readable polyphonic pickle"):
        read_polyphonic(b"\x80\x02}q")
    with pytest.raises(ValueError, match="does not exist"):
        load_polyphonic("/no/such/file.pickle")


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsSubprocess:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


class _Evaluates:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsSubprocess, _Evaluates])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_pickle_never_runs(tmp_path, payload, protocol):
    marker = tmp_path / "ran"
    data = _dataset(train=[[_notes(60)], payload(marker)])
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(ValueError, match="refusing global '[^']+'") as error:
        load_polyphonic(path)
    assert not marker.exists()
    # the refused global is named
    assert any(name in str(error.value) for name in ("system", "call", "eval"))
    assert str(path) in str(error.value)


def test_object_dtypes_are_refused():
    """numpy.dtype is allowed for the scalars' dtype only: an object dtype would let a scalar
    carry any object."""
    raw = pickle.dumps({"train": [[(np.dtype(object),)]], "valid": [], "test": []}, protocol=2)
    with pytest.raises(ValueError, match="refusing numpy dtype"):
        read_polyphonic(raw)


def test_binary_check_names_the_first_bad_entry(tmp_path):
    x = np.zeros((2, 4, 3), dtype=np.float32)
    mask = np.ones((2, 4), dtype=bool)
    mask[1, 2:] = False
    x[1, 3, 0] = 0.5  # unobserved: ignored
    check_binary(x, mask)
    x[1, 1, 2] = 2.0
    with pytest.raises(ValueError, match=r"first bad index \(1, 1, 2\).*2\.0"):
        check_binary(x, mask)
    path = tmp_path / "rolls.npz"
    np.savez(path, x=x, mask=mask, x_test=x[:1], mask_test=mask[:1])
    with pytest.raises(ValueError, match="x: a Bernoulli emission needs 0/1"):
        load_binary_sequences(path)
    x[1, 1, 2] = 1.0
    np.savez(path, x=x, mask=mask, x_test=x[:1])
    data = load_binary_sequences(path)
    assert data.x.shape == (2, 4, 3) and data.x_test.shape == (1, 4, 3)


def test_piano_roll_from_python_lists():
    split = piano_roll([[[60], [60, 62]], [[]]], split="mine")
    assert split.name == "mine" and split.mask.tolist() == [[True, True], [True, False]]
    assert split.x[0, 1, [39, 41]].tolist() == [1.0, 1.0]
