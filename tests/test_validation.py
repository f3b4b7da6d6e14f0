"""The shared argument checks (pyro_storn.validation, the positive-int one being the registry's)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import transforms
from pyro_storn.validation import check_non_negative_int, check_positive_int


def test_numpy_integers_are_ints_and_come_back_as_python_ints():
    for good in (3, np.int64(3), np.int32(3), np.uint8(3)):
        value = check_positive_int("size", good)
        assert value == 3 and type(value) is int
    value = check_non_negative_int("seed", np.int64(0))
    assert value == 0 and type(value) is int
    assert transforms.build("planar", np.int64(3))(torch.zeros(2, 3)).shape == (2, 3)


@pytest.mark.parametrize("bad", [True, np.True_, 3.0, np.float64(3.0), 0, np.int64(-1), "3", None])
def test_bools_floats_and_non_positive_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=f"^size must be a positive int, got {re.escape(repr(bad))}$"):
        check_positive_int("size", bad)


@pytest.mark.parametrize("bad", [False, 0.0, np.float32(1.0), -1, np.int64(-2)])
def test_the_non_negative_check_refuses_bools_floats_and_negatives_by_name(bad):
    with pytest.raises(ValueError, match=f"^seed must be a non-negative int, got {re.escape(repr(bad))}$"):
        check_non_negative_int("seed", bad)
