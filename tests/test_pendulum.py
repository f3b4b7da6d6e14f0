"""The pendulum simulator against gymnasium, its cache, and the validation of users' sequences."""

from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np
import pytest

from pyro_storn.data.pendulum import (
    PendulumParams,
    _draw,
    load_or_simulate,
    simulate,
    simulate_with_initial_state,
    split_train_test,
)
from pyro_storn.data.sequences import load_sequences, validate_sequences


def test_shapes_dtype_and_action_channel():
    x = simulate(7, 13, seed=3)
    assert x.shape == (7, 13, 4) and x.dtype == np.float32
    xa = simulate(7, 13, seed=3, with_action=True)
    assert xa.shape == (7, 13, 5)
    np.testing.assert_array_equal(xa[..., :4], x)
    assert np.all(np.abs(xa[..., 4]) <= 2.0)
    np.testing.assert_allclose(x[..., 0] ** 2 + x[..., 1] ** 2, 1.0, atol=1e-5)
    assert np.all(np.abs(x[..., 2]) <= 8.0) and np.all(x[..., 3] <= 0.0)


def test_deterministic_for_a_seed():
    np.testing.assert_array_equal(simulate(5, 20, seed=1), simulate(5, 20, seed=1))
    assert not np.allclose(simulate(5, 20, seed=1), simulate(5, 20, seed=2))


def test_matches_gymnasium_step_for_step():
    theta, theta_dot, actions = _draw(6, 60, seed=4)
    # Large torques and speeds so that the speed clip is exercised too.
    theta_dot[0], actions[0] = 7.5, 2.0
    ours = simulate_with_initial_state(theta, theta_dot, actions, with_action=True)
    env = gym.make("Pendulum-v1").unwrapped
    env.reset(seed=0)
    for n in range(6):
        env.state = np.array([theta[n], theta_dot[n]])
        for t in range(60):
            obs, reward, *_ = env.step(np.array([actions[n, t]]))
            np.testing.assert_allclose(ours[n, t, :3], obs, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ours[n, t, 3], reward, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(ours[n, t, 4], actions[n, t], rtol=1e-6)
    assert np.isclose(np.abs(ours[0, :, 2]).max(), 8.0)


def test_initial_states_follow_gymnasium_reset_ranges():
    theta, theta_dot, actions = _draw(2000, 3, seed=0)
    assert np.abs(theta).max() <= np.pi and np.abs(theta).max() > 3.0
    assert np.abs(theta_dot).max() <= 1.0 and np.abs(actions).max() <= 2.0


def test_default_size_is_fast():
    started = time.perf_counter()
    x = simulate()
    assert x.shape == (1000, 100, 4)
    assert time.perf_counter() - started < 5.0


def test_bad_arguments():
    for kwargs in ({"n_sequences": 0}, {"n_steps": -1}, {"seed": -3}, {"n_sequences": 2.5},
                   {"n_steps": True}, {"seed": False}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            simulate(**{"n_sequences": 3, "n_steps": 3, **kwargs})


def test_numpy_integers_are_ints():
    np.testing.assert_array_equal(simulate(np.int64(3), np.int32(4), seed=np.int64(2)),
                                  simulate(3, 4, seed=2))


def test_split_is_80_20():
    x = simulate(10, 4)
    train, test = split_train_test(x)
    assert train.shape[0] == 8 and test.shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([train, test]), x)


def test_cache_reused_and_regenerated_when_params_change(tmp_path):
    path = tmp_path / "pendulum.npz"
    params = PendulumParams(n_sequences=10, n_steps=5, seed=1)
    train, test = load_or_simulate(path, params)
    assert train.shape == (8, 5, 4) and test.shape == (2, 5, 4)
    stamp = os.stat(path).st_mtime_ns
    again = load_or_simulate(path, params)
    assert os.stat(path).st_mtime_ns == stamp
    np.testing.assert_array_equal(again[0], train)
    other = load_or_simulate(path, PendulumParams(n_sequences=10, n_steps=5, seed=2))
    assert not np.allclose(other[0], train)
    assert load_or_simulate(path, PendulumParams(10, 5, 2, with_action=True))[0].shape[-1] == 5
    data = load_sequences(path)
    assert data.x.shape == (8, 5, 5) and data.mask.all() and data.x_test.shape == (2, 5, 5)


def test_validate_accepts_masked_nan_and_returns_bool_mask():
    x = np.random.default_rng(0).normal(size=(3, 4, 2))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    x[1, 2:] = np.nan
    x[2, 1:] = np.inf
    x_out, mask_out = validate_sequences(x, mask)
    assert x_out.dtype == np.float32 and mask_out.dtype == bool
    np.testing.assert_array_equal(mask_out, mask.astype(bool))


@pytest.mark.parametrize(
    "x, mask, match",
    [
        (np.zeros((3, 4)), None, r"x: expected rank 3 \(N, T, D\), got shape \(3, 4\)"),
        (np.zeros((0, 4, 2)), None, r"x: empty array, shape \(0, 4, 2\)"),
        (np.zeros((2, 0, 2)), None, r"x: empty array"),
        (np.array([[[0.0], [np.nan]]]), None, r"x: non-finite .*shape \(1, 2, 1\).*index \(0, 1, 0\)"),
        (np.array([[[0.0], [np.inf]]]), None, r"x: non-finite .*index \(0, 1, 0\)"),
        (np.zeros((2, 3, 1)), np.ones((2, 4)), r"mask: expected shape \(2, 3\).*got \(2, 4\)"),
        (np.zeros((2, 3, 1)), np.array([[1, 1, 2], [1, 1, 1]]),
         r"mask: values must be 0/1.*shape \(2, 3\).*index \(0, 2\)"),
        (np.zeros((2, 3, 1)), np.array([[1, 1, 1], [0, 0, 0]]),
         r"mask: sequence with no observed step.*index \(1,\)"),
        (np.array([["a"]]), None, r"x: expected a numeric array"),
    ],
)
def test_validate_errors_name_array_shape_and_index(x, mask, match):
    with pytest.raises(ValueError, match=match):
        validate_sequences(x, mask)


def test_load_sequences_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_sequences(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_x.npz", y=np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="no array 'x'.*holds: y"):
        load_sequences(tmp_path / "no_x.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_sequences(tmp_path / "junk.npz")
    np.savez(tmp_path / "bad_test.npz", x=np.zeros((4, 3, 2)), x_test=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="x_test: feature dim 3"):
        load_sequences(tmp_path / "bad_test.npz")
    bad = np.zeros((2, 3, 2))
    bad[1, 1, 0] = np.nan
    np.savez(tmp_path / "nan_test.npz", x=np.zeros((4, 3, 2)), x_test=bad)
    with pytest.raises(ValueError, match=r"x_test: non-finite.*index \(1, 1, 0\)"):
        load_sequences(tmp_path / "nan_test.npz")


def test_load_sequences_with_mask_and_split(tmp_path):
    x = np.random.default_rng(1).normal(size=(10, 6, 3)).astype(np.float32)
    mask = np.ones((10, 6), dtype=np.int64)
    mask[9, 3:] = 0
    x[9, 3:] = np.nan
    np.savez(tmp_path / "mine.npz", x=x, mask=mask)
    data = load_sequences(tmp_path / "mine.npz")
    assert data.x.shape == (8, 6, 3) and data.x_test.shape == (2, 6, 3)
    assert data.mask_test[1].tolist() == [True] * 3 + [False] * 3
