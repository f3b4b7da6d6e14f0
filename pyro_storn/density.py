"""Flow densities for plain vector data: base N(0, I) pushed through registry flows, fit by
maximum likelihood, scored in nats per point, and drawn.

The density is a Pyro :class:`~pyro.distributions.TransformedDistribution`: the base
:math:`\\mathcal{N}(0, I)`, the flow layers, then a fixed affine map that undoes the training
data's standardisation (so the flow sees unit-scale data and every number is in data units).
:meth:`FlowDensity.model` is the Pyro model whose observed site ``"x"`` carries it; SVI with the
empty :meth:`FlowDensity.guide` is maximum likelihood. :func:`fit_density` minimises the same
negative log-likelihood on minibatches directly (``engine="torch"``, no per-step Pyro trace
overhead) or through :class:`pyro.infer.SVI` (``engine="svi"``), under a wall-clock budget, and
records the test NLL as training goes. Given a validation set (carved from the training data, never
the test set), it keeps the parameters of the evaluation with the best validation NLL.

>>> fit_data, validation = split(train, 0.2, seed=0)                         # doctest: +SKIP
>>> density = make_density("realnvp", fit_data, length=8)                    # doctest: +SKIP
>>> result = fit_density(density, fit_data, test, validation=validation,     # doctest: +SKIP
...                      max_seconds=30, lr=1e-3, clip_norm=10.0)
>>> result.test_nll, result.final_test_nll                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.distributions.transforms import AffineTransform
from tqdm.auto import tqdm

import transforms
from transforms.cnf import regulariser, solver_options, total_nfe

__all__ = [
    "FlowDensity",
    "make_density",
    "HistoryPoint",
    "FitResult",
    "fit_density",
    "test_nll",
    "split",
    "grid_log_density",
    "plot_panels",
    "plot_heatmap",
    "plot_history",
    "animate_cnf",
]

# A coordinate with (near) zero spread would be divided by zero when standardising.
MIN_SCALE = 1e-6

# Default evaluation solver for continuous flows: tight enough that the reported NLL does not
# move in its third decimal when the tolerance is tightened further.
EVAL_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "step_size": None}


class FlowDensity(nn.Module):
    """A normalizing-flow density :math:`p(x) = \\mathcal{N}(f^{-1}(x); 0, I)\\,
    |\\det \\partial f^{-1} / \\partial x|` with :math:`f = A \\circ f_K \\circ \\dots \\circ f_1`,
    :math:`A` the fixed affine map ``x = loc + scale * u`` that undoes standardisation.

    :param flow: the flow layers (a ``TransformModule``, e.g. ``transforms.flow(...)``).
    :param input_dim: the data dimension.
    :param loc: per-coordinate mean of the training data (zeros when ``None``).
    :param scale: per-coordinate standard deviation of the training data (ones when ``None``).
    """

    def __init__(
        self,
        flow: nn.Module,
        input_dim: int,
        loc: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.input_dim = input_dim
        self.register_buffer("loc", torch.zeros(input_dim) if loc is None else loc.clone())
        self.register_buffer("scale", torch.ones(input_dim) if scale is None else scale.clone())

    def transforms(self) -> list:
        """The transforms from the base to data space, in order."""
        return [self.flow, AffineTransform(self.loc, self.scale, event_dim=1)]

    def distribution(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.loc.new_zeros(self.input_dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))

    def to_base(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`f^{-1}(x)`, the data mapped to the base space."""
        for transform in reversed(self.transforms()):
            x = transform.inv(x)
        return x

    def to_data(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`f(z)`, base points mapped to data space."""
        for transform in self.transforms():
            z = transform(z)
        return z

    def model(self, x: torch.Tensor) -> None:
        """Pyro model: the observed site ``"x"`` has the flow density. (Pyro scores an observed
        site after the model returns, so a CNF regulariser integrated in that solve cannot be a
        factor of the same model: :func:`fit_density` adds it with ``engine="torch"``.)"""
        pyro.module("flow_density", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.distribution(), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """No latent variables: SVI with this guide is maximum likelihood."""


def make_density(
    name: str,
    data: torch.Tensor | int,
    length: int,
    *,
    standardize: bool = True,
    **flow_kwargs: Any,
) -> FlowDensity:
    """``length`` layers of registry flow ``name`` on the data's dimension; standardised by the
    data's mean and standard deviation when ``data`` is a tensor and ``standardize`` holds."""
    if isinstance(data, int):
        return FlowDensity(transforms.flow(name, data, length, **flow_kwargs), data)
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be an (N >= 2, D) tensor, got shape {tuple(data.shape)}")
    input_dim = data.shape[1]
    flow = transforms.flow(name, input_dim, length, **flow_kwargs).to(data.dtype)
    loc = scale = None
    if standardize:
        loc, scale = data.mean(0), data.std(0).clamp_min(MIN_SCALE)
    return FlowDensity(flow, input_dim, loc, scale).to(data.device)


def split(
    data: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random train/test split (the assignment's 80/20), reproducible from ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=generator).to(data.device)
    n_test = max(1, int(round(test_fraction * data.shape[0])))
    return data[order[n_test:]], data[order[:n_test]]


@contextlib.contextmanager
def _solver(density: nn.Module, settings: dict[str, Any] | None) -> Iterator[None]:
    if settings:
        with solver_options(density, **settings):
            yield
    else:
        yield


@torch.no_grad()
def test_nll(
    density: FlowDensity,
    data: torch.Tensor,
    *,
    batch_size: int = 4096,
    solver: dict[str, Any] | None = None,
) -> float:
    """Mean negative log-likelihood in nats per point; continuous flows are solved with
    ``solver`` (default :data:`EVAL_SOLVER`, tight tolerances)."""
    was_training = density.training
    density.eval()
    total = 0.0
    with _solver(density, EVAL_SOLVER if solver is None else solver):
        for start in range(0, data.shape[0], batch_size):
            total += -density.log_prob(data[start : start + batch_size]).sum().item()
    density.train(was_training)
    return total / data.shape[0]


@dataclass
class HistoryPoint:
    """One evaluation during training: seconds of training so far (evaluations excluded), the
    step, the test NLL (nats/point), the last minibatch loss, the function evaluations of the
    test-set solve (``nfe``, under the evaluation solver; 0 for discrete flows), the validation
    NLL (``None`` without a validation set), and the function evaluations of the last training
    step's forward solve (``train_nfe``, under the training solver)."""

    wall_time: float
    step: int
    test_nll: float
    train_loss: float
    nfe: int = 0
    validation_nll: float | None = None
    train_nfe: int = 0


@dataclass
class FitResult:
    """What :func:`fit_density` measured. ``selected`` is the index in ``history`` of the
    evaluation whose parameters the density holds after the fit: the best validation NLL when a
    validation set was given (and ``restore_best``), else the last."""

    history: list[HistoryPoint] = field(default_factory=list)
    steps: int = 0
    wall_time: float = 0.0
    eval_time: float = 0.0
    selected: int = -1
    stopped_early: bool = False

    @property
    def selected_point(self) -> HistoryPoint | None:
        return self.history[self.selected] if self.history else None

    @property
    def test_nll(self) -> float:
        """The test NLL of the parameters the density holds after the fit (the selected
        evaluation: chosen on the validation set, never on the test set)."""
        return self.history[self.selected].test_nll if self.history else math.nan

    @property
    def final_test_nll(self) -> float:
        """The test NLL at the last evaluation, whatever the validation NLL said."""
        return self.history[-1].test_nll if self.history else math.nan

    def time_to(self, target_nll: float) -> float | None:
        """Training seconds until the test NLL first reached ``target_nll`` (None if never)."""
        for point in self.history:
            if point.test_nll <= target_nll:
                return point.wall_time
        return None


def _regularised(density: nn.Module) -> bool:
    from transforms.cnf import ConditionedCNF

    return any(
        isinstance(m, ConditionedCNF) and (m.kinetic_weight > 0 or m.jacobian_weight > 0)
        for m in density.modules()
    )


def _learning_rate(base: float, schedule: str, progress: float) -> float:
    if schedule == "constant":
        return base
    # Cosine to a tenth of the base rate: the last steps refine instead of jumping around.
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def fit_density(
    density: FlowDensity,
    train: torch.Tensor,
    test: torch.Tensor,
    *,
    max_seconds: float = 30.0,
    max_steps: int | None = None,
    eval_every: float = 5.0,
    batch_size: int = 256,
    lr: float = 5e-3,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    validation: torch.Tensor | None = None,
    restore_best: bool = True,
    patience: int | None = None,
    train_solver: dict[str, Any] | None = None,
    eval_solver: dict[str, Any] | None = None,
    engine: str = "torch",
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Maximum likelihood on minibatches of ``train`` with Adam until ``max_seconds`` of training
    (evaluations not counted) or ``max_steps`` steps, whichever comes first; the test NLL (and
    the validation NLL, given ``validation``) is measured every ``eval_every`` training seconds
    and at the end.

    :param clip_norm: rescale the gradient of all parameters together to at most this
        Euclidean norm before each step (``None``: no clipping); ``engine="torch"`` only.
    :param validation: held-out points from the *training* data; with ``restore_best`` the
        density ends with the parameters of the evaluation with the lowest validation NLL, and
        :attr:`FitResult.test_nll` is the test NLL of that evaluation. The test set never
        chooses anything.
    :param patience: stop once this many evaluations in a row have not improved the validation
        NLL (needs ``validation``; ``None``: train the whole budget).

    :param train_solver: solver settings for continuous flows while training (e.g.
        ``{"method": "rk4", "step_size": 0.25}``); their own settings when ``None``.
    :param eval_solver: solver settings for the test NLL (:data:`EVAL_SOLVER` when ``None``).
    :param schedule: ``"cosine"`` (decay over the budget, by time or steps, whichever runs out
        first) or ``"constant"``.
    :param engine: ``"torch"`` (the NLL of the Pyro distribution, minimised directly) or
        ``"svi"`` (:class:`pyro.infer.SVI` on :meth:`FlowDensity.model` with the empty guide).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if engine not in ("torch", "svi"):
        raise ValueError(f"engine must be 'torch' or 'svi', got {engine!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive or None, got {max_steps!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}")
    if clip_norm is not None and engine == "svi":
        raise ValueError(
            f"clip_norm={clip_norm!r} needs engine='torch' (Pyro's optimisers clip each "
            "parameter separately, not the joint gradient norm)"
        )
    if patience is not None and (validation is None or patience <= 0):
        raise ValueError(
            f"patience must be a positive int and needs a validation set, got {patience!r}"
            + ("" if validation is not None else " without validation")
        )
    if engine == "svi" and _regularised(density):
        raise ValueError(
            "engine='svi' cannot add the CNF kinetic/Jacobian regularisers (Pyro scores the "
            "observed site after the model has run); use engine='torch' or weights of 0"
        )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    density.train()
    parameters = [p for p in density.parameters() if p.requires_grad]
    if engine == "torch":
        optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    else:
        pyro.clear_param_store()
        svi = pyro.infer.SVI(
            density.model,
            density.guide,
            pyro.optim.Adam(lambda *_: {"lr": lr, "weight_decay": weight_decay}),
            pyro.infer.Trace_ELBO(),
        )
    result = FitResult()
    n_train = train.shape[0]
    order = torch.randperm(n_train, generator=generator)
    cursor = 0
    train_time = 0.0
    next_eval = eval_every
    loss_value = math.nan
    bar = tqdm(total=max_seconds, disable=not progress, unit="s", leave=False)
    best_state: dict[str, torch.Tensor] | None = None
    best_index: int | None = None  # in result.history, of the lowest finite validation NLL
    evaluations_without_gain = 0

    def evaluate() -> None:
        nonlocal best_state, best_index, evaluations_without_gain
        start = time.perf_counter()
        train_nfe = total_nfe(density)  # the last solve was the last training step's
        nll = test_nll(density, test, solver=eval_solver)
        nfe = total_nfe(density)  # of the test-set solve, before the validation one
        validation_nll = None
        if validation is not None:
            validation_nll = test_nll(density, validation, solver=eval_solver)
            # NaN never counts as an improvement; the first finite value always does.
            if math.isfinite(validation_nll) and (
                best_index is None or validation_nll < result.history[best_index].validation_nll
            ):
                best_index = len(result.history)
                evaluations_without_gain = 0
                if restore_best:
                    best_state = copy.deepcopy(density.state_dict())
            else:
                evaluations_without_gain += 1
        result.eval_time += time.perf_counter() - start
        result.history.append(
            HistoryPoint(train_time, result.steps, nll, loss_value, nfe, validation_nll, train_nfe)
        )
        restored = restore_best and best_index is not None
        result.selected = best_index if restored else len(result.history) - 1
        bar.set_postfix(step=result.steps, test_nll=f"{nll:.3f}")
        density.train()

    while train_time < max_seconds and (max_steps is None or result.steps < max_steps):
        start = time.perf_counter()
        if cursor + batch_size > n_train:
            order = torch.randperm(n_train, generator=generator)
            cursor = 0
        batch = train[order[cursor : cursor + batch_size].to(train.device)]
        cursor += batch_size
        fraction = train_time / max_seconds
        if max_steps is not None:
            fraction = max(fraction, result.steps / max_steps)
        rate = _learning_rate(lr, schedule, fraction)
        with _solver(density, train_solver):
            if engine == "torch":
                for group in optimizer.param_groups:
                    group["lr"] = rate
                optimizer.zero_grad(set_to_none=True)
                loss = -density.log_prob(batch).mean() + regulariser(density.flow)
                loss.backward()
                if clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
                optimizer.step()
                loss_value = loss.item()
            else:
                svi.optim.pt_optim_args = lambda *_: {"lr": rate, "weight_decay": weight_decay}
                for optim in svi.optim.optim_objs.values():
                    for group in optim.param_groups:
                        group["lr"] = rate
                loss_value = svi.step(batch) / batch.shape[0]
        result.steps += 1
        elapsed = time.perf_counter() - start
        train_time += elapsed
        bar.update(elapsed)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value} at step {result.steps}; "
                f"lower the learning rate (lr={lr})"
            )
        if train_time >= next_eval:
            evaluate()
            next_eval = train_time + eval_every
            if patience is not None and evaluations_without_gain >= patience:
                result.stopped_early = True
                break
    result.wall_time = train_time
    if not result.history or result.history[-1].step != result.steps:
        evaluate()
    if best_state is not None and result.selected != len(result.history) - 1:
        density.load_state_dict(best_state)
    bar.close()
    density.eval()
    return result


# ----------------------------------------------------------------------------------- figures


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
    with _solver(density, EVAL_SOLVER if solver is None else solver):
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
    with torch.no_grad(), _solver(density, EVAL_SOLVER if solver is None else solver):
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
    fig.savefig(path, dpi=80)
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
    fig.savefig(path, dpi=80)
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
    fig.savefig(path, dpi=80)
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
