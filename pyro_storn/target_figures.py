"""Figures of guides against the targets of :mod:`pyro_storn.targets`: exact learned densities beside
an energy, and a guide's draws over a posterior's exact draws."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch

from .diagnostics import plot_latent_pairs
from .rundir import save_figure
from .targets import BOX, Energy, Target, base_distribution, energy_grid

__all__ = ["plot_energy_fits", "plot_guide_draws"]

# Exact draws drawn under each guide's: as many as a guide shows, for a fair picture.
REFERENCE_DRAWS = 3000
# Share of the exact draws' range added on each side of a pair plot.
MARGIN = 0.2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def plot_energy_fits(name: str, energy: Energy, fits: Mapping[tuple[str, int], tuple[Any, float]],
                     out: str | os.PathLike, grid_points: int) -> Path:
    """``out/<name>.png``: the target exp(-U) beside the exact density q(z) of every fitted flow,
    one row per flow family; ``fits`` maps ``(family, K)`` to ``(flow, KL(q || p))``."""
    plt = _pyplot()
    _, grid = energy_grid(grid_points, BOX)
    target = torch.exp(-energy(grid))
    families = sorted({family for family, _ in fits})
    lengths = sorted({length for _, length in fits})
    fig, axes = plt.subplots(
        len(families), len(lengths) + 1, figsize=(2.6 * (len(lengths) + 1), 2.6 * len(families)),
        squeeze=False,
    )
    extent = (-BOX, BOX, -BOX, BOX)
    for row, family in enumerate(families):
        ax = axes[row, 0]
        ax.imshow(target.numpy(), origin="lower", extent=extent, cmap="viridis")
        ax.set_title(f"exp(-{name})", fontsize=9)
        ax.set_ylabel(family, fontsize=10)
        for col, length in enumerate(lengths, start=1):
            flow, kl = fits[(family, length)]
            q = dist.TransformedDistribution(base_distribution(), [flow])
            density = q.log_prob(grid.reshape(-1, 2)).reshape(grid_points, grid_points).exp()
            ax = axes[row, col]
            ax.imshow(density.numpy(), origin="lower", extent=extent, cmap="viridis")
            ax.set_title(f"{family} K={length}  KL={kl:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(out) / f"{name.lower()}.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _coordinate(label: str) -> tuple[str, dict[str, list[int]]]:
    """``"x[0]"`` -> (var ``x``, selection of its first event dim at 0)."""
    if "[" not in label:
        return label, {}
    var, index = label[:-1].split("[")
    return var, {f"{var}_dim_0": [int(index)]}


def _exact_values(draws: dict[str, torch.Tensor], label: str) -> np.ndarray:
    var, selection = _coordinate(label)
    values = draws[var]
    return (values[:, next(iter(selection.values()))[0]] if selection else values).numpy()


def plot_guide_draws(target: Target, idatas: Mapping[str, Any], khats: Mapping[str, float],
                     out: str | os.PathLike, seed: int) -> Path:
    """``out/pair_<target>.png``: per guide (``idatas``: name -> InferenceData of its
    importance draws, None for a failed fit), its draws of ``target.pair`` over exact ones."""
    plt = _pyplot()
    names = [name for name in idatas if idatas[name] is not None]
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    exact = target.sample(REFERENCE_DRAWS, torch.Generator().manual_seed(seed))
    (var_x, sel_x), (var_y, sel_y) = (_coordinate(c) for c in target.pair)
    reference = {label: _exact_values(exact, label) for label in target.pair}
    for ax, name in zip(axes.flat, names):
        thinned = idatas[name].sel(draw=slice(0, REFERENCE_DRAWS))
        plot_latent_pairs(
            thinned, var_names=[var_x, var_y] if var_x != var_y else [var_x],
            coords={**sel_x, **sel_y}, reference=reference, ax=ax,
            title=f"{name}\nk-hat {khats[name]:.2f}",
        )
        ax.set_xlabel(target.pair[0])
        ax.set_ylabel(target.pair[1])
        lo_x, hi_x = np.percentile(reference[target.pair[0]], [0.5, 99.5])
        lo_y, hi_y = np.percentile(reference[target.pair[1]], [0.5, 99.5])
        ax.set_xlim(lo_x - MARGIN * (hi_x - lo_x), hi_x + MARGIN * (hi_x - lo_x))
        ax.set_ylim(lo_y - MARGIN * (hi_y - lo_y), hi_y + MARGIN * (hi_y - lo_y))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{target.description}\nguide draws (colour) over exact draws (grey)", fontsize=9)
    fig.tight_layout()
    path = Path(out) / f"pair_{target.name}.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
