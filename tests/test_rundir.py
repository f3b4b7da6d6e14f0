"""Files are written atomically (:func:`pyro_storn.rundir.save_figure`, :func:`write_text_atomic`,
:func:`atomic_write_path`): a write that fails part way leaves the old file or none at the final
path, and no temporary file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402

from pyro_storn.rundir import atomic_write_path, save_figure, write_text_atomic  # noqa: E402

# What each format's file starts with.
MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


class _DiskFull(Artist):
    """An artist whose drawing fails, as a full disk fails a write: matplotlib's PDF and SVG
    writers have already written the file's head by then."""

    def draw(self, renderer) -> None:
        raise OSError(28, "No space left on device")


def _figure(failing: bool = False):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    if failing:
        fig.add_artist(_DiskFull())
    return fig


@pytest.mark.parametrize("fmt", sorted(MAGIC))
def test_a_figure_is_written_in_its_suffix_format_and_replaces_the_old_one(tmp_path, fmt):
    path = tmp_path / "sub" / f"figure.{fmt}"
    fig = _figure()
    assert save_figure(fig, path, dpi=50) == path
    first = path.read_bytes()
    assert first.startswith(MAGIC[fmt])
    fig.axes[0].set_title("second")
    save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() != first and path.read_bytes().startswith(MAGIC[fmt])
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("fmt", sorted(MAGIC))
@pytest.mark.parametrize("old", [b"the previous figure", None], ids=["replacing", "new"])
def test_a_failed_write_leaves_the_old_file_or_none_and_no_temporary(tmp_path, fmt, old):
    path = tmp_path / f"figure.{fmt}"
    if old is not None:
        path.write_bytes(old)
    fig = _figure(failing=True)
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, path)
    plt.close(fig)
    if old is None:
        assert list(tmp_path.iterdir()) == []
    else:
        assert path.read_bytes() == old
        assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_explicit_format_wins_over_the_suffix(tmp_path):
    path = tmp_path / "figure.out"
    fig = _figure()
    save_figure(fig, path, format="pdf")
    plt.close(fig)
    assert path.read_bytes().startswith(MAGIC["pdf"])


@pytest.mark.parametrize("old", [b"the previous text", None], ids=["replacing", "new"])
def test_a_text_torn_by_a_full_disk_leaves_the_old_file_or_none(tmp_path, disk_full, old):
    path = tmp_path / "summary.json"
    if old is not None:
        path.write_bytes(old)
    disk_full("summary.json")
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, '{"a long": "new text"}\n')
    assert sorted(tmp_path.iterdir()) == ([] if old is None else [path])
    if old is not None:
        assert path.read_bytes() == old


def test_a_writer_that_needs_a_name_gets_a_temporary_beside_the_file_with_its_suffix(tmp_path):
    path = tmp_path / "posterior.nc"
    path.write_bytes(b"old")
    names = []

    def write(tmp: Path) -> None:
        names.append(tmp)
        tmp.write_bytes(b"new")

    assert atomic_write_path(path, write) == path
    assert path.read_bytes() == b"new" and list(tmp_path.iterdir()) == [path]
    assert names[0].parent == tmp_path and names[0].name.endswith(".tmp.nc")


def test_a_writer_that_needs_a_name_and_fails_part_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "posterior.nc"
    path.write_bytes(b"old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"\x89HDF\r\n")  # a netCDF4 file's head, then the disk is full
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_path(path, write)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_a_ctrl_c_as_the_temporary_is_created_leaves_no_temporary(tmp_path, monkeypatch):
    """The signal lands on the first instruction after the temporary file exists: the one
    moment when only its creator knows its name."""
    import os

    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    real_close = os.close
    landed = []

    def close_then_interrupt(fd: int) -> None:
        real_close(fd)
        if not landed:
            landed.append(fd)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert landed and path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
