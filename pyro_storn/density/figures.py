"""Figures of a 2-D flow density: panels (data, samples, density, base-space map), a heat map,
test-NLL histories side by side, and the CNF's flow as an animation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineTransform

from transforms.cnf import solver_options

from ..rundir import save_figure
from .fit import FitResult
from .model import EVAL_SOLVER, FlowDensity, solver_settings

__all__ = ["grid_log_density", "plot_panels", "plot_heatmap", "plot_history", "animate_cnf"]


def _grid(
    bounds: tuple[float, float, float, float], resolution: int
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    x_min, x_max, y_min, y_max = bounds
    xs = np.linspace(x_min, x_max, resolution)
    ys = np.linspace(y_min, y_max, resolution)
    grid_x, grid_y = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack([grid_x.ravel(), grid_y.ravel()], axis=1))
    return grid_x, grid_y, points


def _bounds(data: torch.Tensor, margin: float = 0.15) -> tuple[float, float, float, float]:
    low, high = data.min(0).values.cpu().numpy(), data.max(0).values.cpu().numpy()
    pad = margin * (high - low)
    return float(low[0] - pad[0]), float(high[0] + pad[0]), float(low[1] - pad[1]), float(high[1] + pad[1])


@torch.no_grad()
def grid_log_density(
    density: FlowDensity,
    bounds: tuple[float, float, float, float],
    resolution: int = 100,
    solver: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log p`` on a ``resolution``² grid over ``bounds`` = (x_min, x_max, y_min, y_max)."""
    grid_x, grid_y, points = _grid(bounds, resolution)
    dtype = density.loc.dtype
    with solver_settings(density, EVAL_SOLVER if solver is None else solver):
        log_p = density.log_prob(points.to(dtype=dtype, device=density.loc.device))
    return grid_x, grid_y, log_p.reshape(grid_x.shape).cpu().numpy()


def plot_panels(
    density: FlowDensity,
    data: torch.Tensor,
    path: str,
    *,
    title: str = "",
    n_prior: int = 1000,
    solver: dict[str, Any] | None = None,
    seed: int = 0,
) -> None:
    """The assignment's four panels: data X, f(X) (data mapped to the base space), g(Z) (prior
    samples mapped to data space) and prior samples Z; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    density.eval()
    with torch.no_grad(), solver_settings(density, EVAL_SOLVER if solver is None else solver):
        base = density.to_base(data).cpu().numpy()
        prior = torch.randn(n_prior, density.input_dim, dtype=data.dtype, device=data.device)
        generated = density.to_data(prior).cpu().numpy()
    prior_np = prior.cpu().numpy()
    data_np = data.cpu().numpy()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = [
        (data_np, "data X", "tab:blue"),
        (base, "f(X): data in base space", "tab:orange"),
        (generated, "g(Z): prior samples in data space", "tab:green"),
        (prior_np, "Z: prior samples", "tab:red"),
    ]
    for ax, (points, label, colour) in zip(axes, panels):
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6, color=colour)
        ax.set_title(label)
    for ax in (axes[0], axes[2]):
        ax.set_xlim(*_bounds(data)[:2])
        ax.set_ylim(*_bounds(data)[2:])
    for ax in (axes[1], axes[3]):
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def plot_heatmap(
    density: FlowDensity,
    data: torch.Tensor,
    path: str,
    *,
    title: str = "",
    resolution: int = 120,
    solver: dict[str, Any] | None = None,
) -> None:
    """The density p(x) on a grid around the data, data points on top; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_x, grid_y, log_p = grid_log_density(density, _bounds(data), resolution, solver)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    mesh = ax.pcolormesh(grid_x, grid_y, np.exp(log_p), shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="p(x)")
    points = data.cpu().numpy()
    ax.scatter(points[:, 0], points[:, 1], s=2, color="white", alpha=0.4)
    ax.set_title(title or "density")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def plot_history(results: dict[str, FitResult], path: str, *, title: str = "") -> None:
    """Test NLL against training seconds for several fits, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, result in results.items():
        times = [p.wall_time for p in result.history]
        nlls = [p.test_nll for p in result.history]
        ax.plot(times, nlls, marker="o", markersize=3, label=label)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test NLL (nats / point)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def animate_cnf(
    density: FlowDensity,
    data: torch.Tensor,
    path: str,
    *,
    frames: int = 25,
    n_samples: int = 1000,
    resolution: int = 60,
    fps: int = 8,
    seed: int = 0,
) -> None:
    """A GIF of prior samples (and the density) moving to the data as t runs from 0 to T, for a
    density whose flow is a single continuous layer (pillow writer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    from transforms.cnf import ConditionedCNF

    layers = [m for m in density.flow.modules() if isinstance(m, ConditionedCNF)]
    if len(layers) != 1:
        raise ValueError(f"animate_cnf needs exactly one CNF layer in the flow, found {len(layers)}")
    layer = layers[0]
    torch.manual_seed(seed)
    dtype, device = density.loc.dtype, density.loc.device
    prior = torch.randn(n_samples, density.input_dim, dtype=dtype, device=device)
    bounds = _bounds(data)
    grid_x, grid_y, points = _grid(bounds, resolution)
    points = points.to(dtype=dtype, device=device)
    affine = AffineTransform(density.loc, density.scale, event_dim=1)
    standard_points = affine.inv(points)
    base_log_prob = dist.Normal(prior.new_zeros(density.input_dim), 1.0).to_event(1)
    original_time = layer.time_length
    sample_frames, density_frames, times = [], [], []
    try:
        with solver_options(density, **EVAL_SOLVER):
            for index in range(frames):
                t = original_time * index / (frames - 1)
                times.append(t)
                if t == 0:
                    moved, log_p = prior, base_log_prob.log_prob(standard_points)
                else:
                    # The flow up to time t is the same ODE integrated over [0, t].
                    layer.time_length = t
                    layer._cached_x_logdet = None
                    moved = layer(prior)
                    back = layer.inv(standard_points)
                    log_p = base_log_prob.log_prob(back) - layer.log_abs_det_jacobian(
                        back, standard_points
                    )
                log_p = log_p - density.scale.log().sum()
                sample_frames.append(affine(moved).cpu().numpy())
                density_frames.append(log_p.exp().reshape(grid_x.shape).cpu().numpy())
    finally:
        layer.time_length = original_time
        layer._cached_x_logdet = None

    fig, (ax_samples, ax_density) = plt.subplots(1, 2, figsize=(9, 4.2))
    scatter = ax_samples.scatter([], [], s=3, color="tab:green")
    ax_samples.set_xlim(*bounds[:2])
    ax_samples.set_ylim(*bounds[2:])
    mesh = ax_density.pcolormesh(grid_x, grid_y, density_frames[0], shading="auto", cmap="viridis")
    ax_density.set_xlim(*bounds[:2])
    ax_density.set_ylim(*bounds[2:])

    def draw(index: int):
        scatter.set_offsets(sample_frames[index])
        mesh.set_array(density_frames[index].ravel())
        mesh.set_clim(0.0, float(density_frames[index].max()))
        ax_samples.set_title(f"samples at t = {times[index]:.2f}")
        ax_density.set_title(f"density at t = {times[index]:.2f}")
        return scatter, mesh

    animation = FuncAnimation(fig, draw, frames=frames, blit=False)
    animation.save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)
