"""Figures of the posterior diagnostics, and the one call that writes them all for a run.

:func:`write_diagnostics` is what ``pyro-storn diagnose RUN_DIR`` does once it has the trained
model and guide: InferenceData (netCDF), the importance summary (JSON), k-hat per item, the
log-weight histogram and a pair plot of a few latent coordinates.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..rundir import atomic_write_path, save_figure, write_text_atomic
from .draws import ImportanceDraws, draw_importance_samples
from .inference_data import draws_to_inference_data
from .psis import KHAT_THRESHOLD, ImportanceSummary, summarize_importance

__all__ = ["plot_khat", "plot_log_weights", "plot_latent_pairs", "write_diagnostics"]

# Pair plots of more coordinates than this are unreadable; the default picks the first ones.
MAX_PAIR_COORDINATES = 4


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_khat(
    khats: ImportanceSummary | Sequence[float] | np.ndarray,
    *,
    item_name: str = "sequence",
    ax: Any = None,
):
    """:func:`arviz.plot_khat` of :math:`\\hat k` per item, titled with how many exceed 0.7."""
    import arviz as az

    if isinstance(khats, ImportanceSummary):
        if khats.khat_per_item is None:
            raise ValueError("this summary has no per-item k-hat (the model has no item plate)")
        khats = khats.khat_per_item
    khats = np.asarray(khats, dtype=float)
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 3.5))
    with warnings.catch_warnings():
        # arviz would rather have ELPDData (for its draw count); plain k-hats are what we have.
        warnings.simplefilter("ignore", FutureWarning)
        az.plot_khat(np.where(np.isneginf(khats), np.nan, khats), show_hlines=True, ax=ax)
    above = int(np.sum(khats > KHAT_THRESHOLD))
    ax.set_xlabel(f"{item_name} index")
    ax.set_title(f"PSIS k-hat per {item_name}: {above} of {khats.size} above {KHAT_THRESHOLD}")
    return ax


def plot_log_weights(draws: ImportanceDraws, *, ax: Any = None):
    """Histogram of the self-normalised log importance weights (joint, and per item pooled):
    a long right tail is what a high k-hat measures."""
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 3.5))
    joint = draws.log_weights.double()
    ax.hist((joint - joint.max()).numpy(), bins=50, alpha=0.6, label="joint")
    if draws.log_weights_per_item is not None:
        per_item = draws.log_weights_per_item.double()
        centred = per_item - per_item.max(0, keepdim=True).values
        ax.hist(centred.flatten().numpy(), bins=50, alpha=0.6, label=f"per {draws.item_plate}")
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("draws")
    ax.legend()
    return ax


def _first_coordinates(idata: Any, var_names: Sequence[str]) -> tuple[dict[str, list], list[str]]:
    """A selection of index 0 along every dim but the last of each variable, and the variables
    whose selected coordinates, together, stay within :data:`MAX_PAIR_COORDINATES`."""
    selection: dict[str, list] = {}
    chosen: list[str] = []
    total = 0
    for var in var_names:
        array = idata.posterior[var]
        inner = [d for d in array.dims if d not in ("chain", "draw")]
        size = array.sizes[inner[-1]] if inner else 1
        if total + size > MAX_PAIR_COORDINATES and chosen:
            break
        for dim in inner[:-1]:
            selection.setdefault(dim, [array[dim].values[0]])
        chosen.append(var)
        total += size
    return selection, chosen


def plot_latent_pairs(
    idata: Any,
    *,
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    ax: Any = None,
    title: str | None = None,
    color: str = "C0",
):
    """:func:`arviz.plot_pair` of a few latent coordinates.

    :param coords: a selection (dim -> values); default: index 0 of every dim but the last of
        each variable (for STORN's ``z``: the first sequence and time step, all latent dims).
    :param reference: draws from the true posterior, ``{var: (n,) array}`` for a two-coordinate
        plot, drawn underneath in grey (the examples' exact funnel / banana samples).
    """
    import arviz as az

    var_names = list(var_names or idata.posterior.data_vars)
    if coords is None:
        coords, var_names = _first_coordinates(idata, var_names)
    axes = az.plot_pair(
        idata,
        var_names=var_names,
        coords=coords,
        kind="scatter",
        ax=ax,
        scatter_kwargs={"alpha": 0.35, "s": 5, "marker": "o", "color": color},
        textsize=9,
    )
    first = np.atleast_1d(axes).ravel()[0]
    if reference is not None:
        names = list(reference)
        if len(names) != 2:
            raise ValueError(f"reference must hold two coordinates, got {names}")
        first.scatter(
            reference[names[0]], reference[names[1]], s=3, alpha=0.15, color="0.5", zorder=0
        )
    if title is not None:
        first.set_title(title)
    return axes


def write_diagnostics(
    out_dir: str | Path,
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    item_plate: str | None = None,
    particle_batch_size: int | None = None,
    vectorize: bool = True,
    pair_coords: Mapping[str, Sequence[Any]] | None = None,
    item_name: str | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Draw, summarise and write every diagnostic of ``guide`` for ``model`` on ``args``.

    Writes into ``out_dir``: ``inference_data.nc`` (:func:`to_inference_data`),
    ``importance.json`` (:class:`ImportanceSummary`), ``khat.png`` (per item, when the model
    has an item plate), ``log_weights.png`` and ``pair.png``. Returns ``{kind: path}``.

    For a STORN run (``model(x, mask)``)::

        write_diagnostics(run_dir / "diagnostics", storn.model, storn.guide, x, mask,
                          dims={"z": ["sequence", "time", "latent"],
                                "x": ["sequence", "time", "feature"]})
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draws = draw_importance_samples(
        model,
        guide,
        *args,
        num_samples=num_samples,
        item_plate=item_plate,
        particle_batch_size=particle_batch_size,
        vectorize=vectorize,
        predictive=True,
        **kwargs,
    )
    summary = summarize_importance(draws)
    idata = draws_to_inference_data(draws, dims=dims, coords=coords)
    paths = {"inference_data": out_dir / "inference_data.nc", "summary": out_dir / "importance.json"}
    atomic_write_path(paths["inference_data"], lambda tmp: idata.to_netcdf(str(tmp)))
    write_text_atomic(paths["summary"], json.dumps(summary.to_dict(), indent=2) + "\n")

    if summary.khat_per_item is not None:
        item_dim = idata.sample_stats["log_weight_item"].dims[-1]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plot_khat(summary, item_name=item_name or item_dim, ax=ax)
        paths["khat"] = out_dir / "khat.png"
        fig.tight_layout()
        save_figure(fig, paths["khat"], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_log_weights(draws, ax=ax)
    paths["log_weights"] = out_dir / "log_weights.png"
    fig.tight_layout()
    save_figure(fig, paths["log_weights"], dpi=120)
    plt.close(fig)

    if draws.latents:
        axes = plot_latent_pairs(idata, coords=pair_coords)
        fig = np.atleast_1d(axes).flatten()[0].figure
        paths["pair"] = out_dir / "pair.png"
        save_figure(fig, paths["pair"], dpi=120)
        plt.close(fig)
    return paths
