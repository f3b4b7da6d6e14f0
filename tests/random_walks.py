"""Small random-walk sequence data sets for the training tests."""

from __future__ import annotations

import numpy as np

from pyro_storn.data.sequences import SequenceData


def random_walk_data(n_train: int, n_test: int, n_steps: int, dim: int, seed: int) -> SequenceData:
    """Gaussian random walks, every step observed, ``n_train`` to train on and ``n_test`` held out."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train, n_steps, dim)).cumsum(1).astype(np.float32)
    x_test = rng.normal(size=(n_test, n_steps, dim)).cumsum(1).astype(np.float32)
    return SequenceData(x, np.ones((n_train, n_steps), dtype=bool), x_test,
                        np.ones((n_test, n_steps), dtype=bool))
