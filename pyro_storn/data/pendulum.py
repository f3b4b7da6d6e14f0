"""The inverted pendulum of gymnasium's ``Pendulum-v1`` under a uniformly random torque.

The thesis this package reproduces drove ``Pendulum-v0`` with a random action at every step and
learned the resulting sequences of ``[cos θ, sin θ, θ̇, reward]``. Stepping a gymnasium environment
in Python costs microseconds per step and per sequence; the dynamics are four lines of numpy, so
:func:`simulate` runs all sequences at once (1000 x 100 steps in a few milliseconds) and the tests
check it against ``gymnasium`` step for step.

The dynamics (gymnasium ``Pendulum-v1``, ``g = 10``, ``m = l = 1``, ``dt = 0.05``):

.. math::

    r_t = -(\\mathrm{wrap}(θ_t)^2 + 0.1\\,\\dot θ_t^2 + 0.001\\,u_t^2),\\quad
    \\dot θ_{t+1} = \\mathrm{clip}(\\dot θ_t + (\\tfrac{3g}{2l}\\sin θ_t + \\tfrac{3}{ml^2} u_t)\\,dt,
    \\pm 8),\\quad θ_{t+1} = θ_t + \\dot θ_{t+1}\\,dt,

with :math:`θ_0 \\sim U(-π, π)`, :math:`\\dot θ_0 \\sim U(-1, 1)` and :math:`u_t \\sim U(-2, 2)`.
Step ``t`` of a sequence is the observation after action ``u_t`` and the reward of that action:
``[cos θ_{t+1}, sin θ_{t+1}, θ̇_{t+1}, r_t]`` (and ``u_t`` last with ``with_action=True``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..rundir import atomic_write
from ..validation import check_non_negative_int, check_positive_int

__all__ = [
    "FEATURES",
    "PendulumParams",
    "simulate",
    "simulate_with_initial_state",
    "split_train_test",
    "load_or_simulate",
]

FEATURES = ("cos θ", "sin θ", "θ̇", "reward")
ACTION_FEATURE = "torque"

# gymnasium Pendulum-v1 constants (gymnasium/envs/classic_control/pendulum.py).
GRAVITY = 10.0
MASS = 1.0
LENGTH = 1.0
DT = 0.05
MAX_SPEED = 8.0
MAX_TORQUE = 2.0
INITIAL_ANGLE_HIGH = np.pi
INITIAL_SPEED_HIGH = 1.0

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class PendulumParams:
    """The generating parameters stored with a cached data set; a cache is reused only when
    they are equal."""

    n_sequences: int = 1000
    n_steps: int = 100
    seed: int = 0
    with_action: bool = False
    test_fraction: float = TEST_FRACTION


def _angle_normalize(theta: np.ndarray) -> np.ndarray:
    return ((theta + np.pi) % (2 * np.pi)) - np.pi


def simulate_with_initial_state(
    theta: np.ndarray, theta_dot: np.ndarray, actions: np.ndarray, with_action: bool = False
) -> np.ndarray:
    """Roll the pendulum from given initial states ``(N,)`` under given torques ``(N, T)``.

    Returns float32 ``(N, T, 4)`` (``(N, T, 5)`` with the action last). Torques are clipped to
    ``±2`` as gymnasium does.
    """
    theta = np.asarray(theta, dtype=np.float64).copy()
    theta_dot = np.asarray(theta_dot, dtype=np.float64).copy()
    actions = np.clip(np.asarray(actions, dtype=np.float64), -MAX_TORQUE, MAX_TORQUE)
    n, t_steps = actions.shape
    out = np.empty((n, t_steps, 5 if with_action else 4), dtype=np.float64)
    for t in range(t_steps):
        u = actions[:, t]
        cost = _angle_normalize(theta) ** 2 + 0.1 * theta_dot**2 + 0.001 * u**2
        theta_dot = theta_dot + (
            3 * GRAVITY / (2 * LENGTH) * np.sin(theta) + 3.0 / (MASS * LENGTH**2) * u
        ) * DT
        theta_dot = np.clip(theta_dot, -MAX_SPEED, MAX_SPEED)
        theta = theta + theta_dot * DT
        out[:, t, 0] = np.cos(theta)
        out[:, t, 1] = np.sin(theta)
        out[:, t, 2] = theta_dot
        out[:, t, 3] = -cost
        if with_action:
            out[:, t, 4] = u
    return out.astype(np.float32)


def _draw(n_sequences: int, n_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial states and torques, all from one generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-INITIAL_ANGLE_HIGH, INITIAL_ANGLE_HIGH, size=n_sequences)
    theta_dot = rng.uniform(-INITIAL_SPEED_HIGH, INITIAL_SPEED_HIGH, size=n_sequences)
    actions = rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=(n_sequences, n_steps))
    return theta, theta_dot, actions


def simulate(
    n_sequences: int = 1000, n_steps: int = 100, seed: int = 0, with_action: bool = False
) -> np.ndarray:
    """``n_sequences`` pendulum runs of ``n_steps`` random-torque steps, float32 ``(N, T, D)``.

    ``D = 4`` (``[cos θ, sin θ, θ̇, reward]``), 5 with ``with_action`` (the torque last).
    Deterministic for a ``seed``: the initial states and torques come from one
    ``numpy.random.default_rng(seed)``.

    >>> x = simulate(10, 20, seed=1)
    >>> x.shape
    (10, 20, 4)
    """
    theta, theta_dot, actions = _draw(check_positive_int("n_sequences", n_sequences),
                                      check_positive_int("n_steps", n_steps),
                                      check_non_negative_int("seed", seed))
    return simulate_with_initial_state(theta, theta_dot, actions, with_action=with_action)


def split_train_test(
    x: np.ndarray, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - test_fraction`` of the sequences for training, the rest for testing
    (sequences are i.i.d., so order is as good as a shuffle and keeps the split reproducible)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    if n_test == 0 or n_test == n:
        raise ValueError(
            f"cannot split {n} sequence(s) with test_fraction={test_fraction}: "
            "each side needs at least one"
        )
    return x[: n - n_test], x[n - n_test :]


def _read_params(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["params"]))
    except (OSError, KeyError, ValueError):
        return None


def save_split(path: str | os.PathLike, params: PendulumParams) -> tuple[np.ndarray, np.ndarray]:
    """Simulate, split and write ``x`` (train), ``x_test`` and ``params`` (JSON) to ``path``
    atomically (a failure leaves the old file, if any, and no temporary one); returns
    ``(x_train, x_test)``."""
    x = simulate(params.n_sequences, params.n_steps, params.seed, params.with_action)
    x_train, x_test = split_train_test(x, params.test_fraction)
    arrays = {"x": x_train, "x_test": x_test, "params": np.array(json.dumps(asdict(params)))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
    return x_train, x_test


def load_or_simulate(
    path: str | os.PathLike, params: PendulumParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(x_train, x_test)`` from the cache at ``path`` when it was generated with ``params``,
    else simulated afresh and written there."""
    params = params or PendulumParams()
    path = Path(path)
    if path.exists() and _read_params(path) == asdict(params):
        with np.load(path, allow_pickle=False) as data:
            return data["x"], data["x_test"]
    return save_split(path, params)
