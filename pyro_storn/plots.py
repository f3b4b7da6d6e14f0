"""Figures of STORN runs (matplotlib, Agg backend): loss curves smoothed with a Savitzky-Golay
filter as in the thesis, the flow's terms over training (thesis Fig. 6.4), generated against
actual signals (thesis Fig. 6.5), and piano rolls (real, generated, the model's per-note
probabilities) for polyphonic music."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.signal import savgol_filter  # noqa: E402

from .rundir import save_figure  # noqa: E402

__all__ = [
    "smooth", "plot_losses", "plot_flow_terms", "plot_every_seed", "plot_generation",
    "plot_khat_per_sequence", "plot_piano_roll",
]

# Savitzky-Golay: a quadratic over about a fifth of the curve, at least 5 points.
_SAVGOL_ORDER = 2
_SAVGOL_MIN_WINDOW = 5

History = Sequence[Mapping[str, Any]]


def smooth(values: Sequence[float]) -> np.ndarray:
    """Savitzky-Golay smoothing; curves too short to smooth are returned as they are."""
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    window = max(_SAVGOL_MIN_WINDOW, n // 5)
    window -= 1 - window % 2  # odd
    if n < _SAVGOL_MIN_WINDOW or window > n or not np.isfinite(values).all():
        return values
    return savgol_filter(values, window, _SAVGOL_ORDER)


def _series(history: History, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["epoch"], r[key]) for r in history if key in r and r[key] is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    epochs, values = zip(*rows)
    return np.asarray(epochs), np.asarray(values, dtype=float)


def _curve(ax: plt.Axes, history: History, key: str, label: str, color: Any, style: str) -> None:
    epochs, values = _series(history, key)
    if epochs.size == 0:
        return
    ax.plot(epochs, values, style, color=color, alpha=0.25, linewidth=1)
    ax.plot(epochs, smooth(values), style, color=color, linewidth=1.8, label=label)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(histories: Mapping[str, History], path: str | os.PathLike) -> Path:
    """-ELBO, KL and reconstruction NLL per sequence over epochs, train (dashed) and test
    (solid), one colour per run; faint raw values under the smoothed curve."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("neg_elbo", "-ELBO / sequence"), ("kl", "KL / sequence"),
              ("recon_nll", "reconstruction NLL / sequence"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, history) in enumerate(histories.items()):
        color = colors[i % len(colors)]
        for ax, (key, title) in zip(axes, panels):
            _curve(ax, history, f"train/{key}", f"{name} train", color, "--")
            _curve(ax, history, f"test/{key}", f"{name} test", color, "-")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_flow_terms(histories: Mapping[str, History], path: str | os.PathLike) -> Path:
    """``E[log q0(z0)]``, ``E[log qK(zK)]``, ``E[Σ log|det J|]`` and ``E[log p(zK)]`` on the
    training set over epochs (thesis Fig. 6.4), one colour per run."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = (("log_q0", "E[log q0(z0)]"), ("log_qK", "E[log qK(zK)]"),
              ("sum_log_det", "E[Σ log|det J|]"), ("log_prior", "E[log p(zK)]"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, history) in enumerate(histories.items()):
        for ax, (key, title) in zip(axes, panels):
            _curve(ax, history, f"train/{key}", name, colors[i % len(colors)], "-")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_every_seed(
    runs: Mapping[str, Sequence[History]],
    key: str,
    title: str,
    path: str | os.PathLike,
    *,
    log_scale: bool = False,
    reference: float | None = None,
) -> Path:
    """``key`` over epochs for every run, raw (no smoothing: a jump is the point), one colour per
    group (e.g. a guide) and one line per seed; ``reference`` draws a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, histories) in enumerate(runs.items()):
        for j, history in enumerate(histories):
            epochs, values = _series(history, key)
            ax.plot(epochs, values, color=colors[i % len(colors)], linewidth=1.2, alpha=0.85,
                    label=name if j == 0 else None)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_generation(
    actual: np.ndarray,
    generated: np.ndarray,
    n_prefix: int,
    feature_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Generated (``(S, T, D)``, thin) against actual (``(T, D)``, black) signals, one panel
    per feature, the observed prefix shaded (thesis Fig. 6.5)."""
    n_steps, n_features = actual.shape
    names = list(feature_names) + [f"x{d}" for d in range(len(feature_names), n_features)]
    cols = min(n_features, 4)
    rows = int(np.ceil(n_features / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = np.arange(n_steps)
    for d, ax in enumerate(axes.flat):
        if d >= n_features:
            ax.axis("off")
            continue
        for s in range(generated.shape[0]):
            ax.plot(steps, generated[s, :, d], color="tab:orange", alpha=0.5, linewidth=0.9,
                    label="generated" if s == 0 else None)
        ax.plot(steps, actual[:, d], color="black", linewidth=1.4, label="actual")
        ax.axvspan(-0.5, n_prefix - 0.5, color="grey", alpha=0.2, label="observed")
        ax.set_title(names[d])
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_khat_per_sequence(
    khats: Sequence[float] | np.ndarray, path: str | os.PathLike, title: str = ""
) -> Path:
    """PSIS :math:`\\hat k` of each test sequence's importance weights
    (:func:`pyro_storn.diagnostics.plot_khat`), the 0.5 / 0.7 / 1 thresholds drawn."""
    from .diagnostics import plot_khat

    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_khat(np.asarray(khats, dtype=float), item_name="test sequence", ax=ax)
    if title:
        ax.set_title(f"{title}: {ax.get_title()}", fontsize=9)
    return _save(fig, path)


# Piano rolls: MIDI number of column 0 (the piano's lowest key), and the keys shown around the
# notes that sound anywhere in the figure.
_LOWEST_NOTE = 21
_NOTE_MARGIN = 2


def plot_piano_roll(
    real: np.ndarray,
    generated: np.ndarray,
    probabilities: np.ndarray,
    path: str | os.PathLike,
    n_prefix: int = 0,
    title: str = "",
    lowest_note: int = _LOWEST_NOTE,
) -> Path:
    """Piano rolls, time across and MIDI note up: a real sequence ``real`` (T, D) of 0/1, the
    model's per-note probabilities on it ``probabilities`` (T, D) (e.g.
    :meth:`~pyro_storn.STORN.step_probabilities`), and generated sequences ``generated``
    (S, T', D) (e.g. :meth:`~pyro_storn.STORN.generate` from the first ``n_prefix`` real
    frames, marked by a line). Only the range of keys that sound somewhere is drawn; column
    ``d`` is MIDI note ``lowest_note + d``."""
    real, probabilities = np.asarray(real, dtype=float), np.asarray(probabilities, dtype=float)
    generated = np.asarray(generated, dtype=float)
    if generated.ndim == 2:
        generated = generated[None]
    if real.ndim != 2 or probabilities.shape != real.shape:
        raise ValueError(f"real (T, D) and probabilities (T, D) must match, got shapes "
                         f"{real.shape} and {probabilities.shape}")
    if generated.ndim != 3 or generated.shape[-1] != real.shape[-1]:
        raise ValueError(f"generated must be (S, T, {real.shape[-1]}), got shape {generated.shape}")
    sounding = np.flatnonzero((real > 0).any(0) | (generated > 0).any((0, 1))
                              | (probabilities > 0.05).any(0))
    low, high = ((sounding.min(), sounding.max()) if sounding.size else (0, real.shape[-1] - 1))
    low, high = max(low - _NOTE_MARGIN, 0), min(high + _NOTE_MARGIN, real.shape[-1] - 1)
    keys = slice(low, high + 1)
    panels = [("real", real, "Greys", False),
              ("model's p(note on | past, z ~ q)", probabilities, "viridis", False)]
    panels += [(f"generated {s + 1}", roll, "Greys", True) for s, roll in enumerate(generated)]
    width = max(6.0, 0.06 * max(real.shape[0], generated.shape[1]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.0 * len(panels)), squeeze=False)
    for ax, (name, roll, cmap, is_generated) in zip(axes[:, 0], panels):
        extent = (-0.5, roll.shape[0] - 0.5, lowest_note + low - 0.5, lowest_note + high + 0.5)
        image = ax.imshow(roll[:, keys].T, origin="lower", aspect="auto", cmap=cmap, vmin=0,
                          vmax=1, interpolation="nearest", extent=extent)
        if is_generated and n_prefix > 0:  # the frames before the line are the real prefix
            ax.axvline(n_prefix - 0.5, color="tab:red", linewidth=1)
        if cmap == "viridis":
            fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("MIDI note")
    axes[-1, 0].set_xlabel("frame")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
