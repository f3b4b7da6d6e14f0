"""ArviZ ``InferenceData`` for a variational posterior.

:func:`arviz.from_pyro` reads only MCMC runs, so the groups are built here from importance draws
(:func:`~pyro_storn.diagnostics.draws.draw_importance_samples`): ``S`` draws of the guide become
one chain of ``S`` draws. Groups:

- ``posterior``: every latent site, dims named after their plates (or ``dims``);
- ``posterior_predictive``: every observed site, resampled given each draw;
- ``log_likelihood``: pointwise log-likelihood of each observed site, one value per plate entry,
  so that :func:`arviz.loo` / :func:`arviz.waic` work;
- ``observed_data``: the data;
- ``sample_stats``: ``log_weight`` (:math:`\\log p(x, z) - \\log q(z|x)`), ``lp``
  (:math:`\\log p(x, z)`), ``log_q``, and ``log_weight_item`` per data item when the model has
  an item plate. Its attrs hold the PSIS summary (k-hat, IWAE, ESS).

With local latents (one per item, as in STORN or a VAE) ``az.loo`` still runs, but what it
estimates is the predictive of an item given its own amortised posterior, not a held-out one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .draws import ImportanceDraws, SiteDims, draw_importance_samples
from .psis import summarize_importance

__all__ = ["to_inference_data", "draws_to_inference_data"]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _plate_dim_names(
    draws: ImportanceDraws, dims: Mapping[str, Sequence[str]]
) -> dict[str, str]:
    """Plate name -> dim name, taken from the user's ``dims`` where a site's plate dim is named
    there (e.g. ``{"z": ["sequence", "time", "latent"]}`` names the sequences plate)."""
    names: dict[str, str] = {}
    for var, site_dims in draws.site_dims.items():
        given = dims.get(var)
        if given is None:
            continue
        for position, plate in enumerate(site_dims.plates):
            if plate is not None and position < len(given):
                names.setdefault(plate, given[position])
    return names


def _site_dims(
    var: str,
    site_dims: SiteDims,
    rank: int,
    dims: Mapping[str, Sequence[str]],
    plate_names: Mapping[str, str],
) -> list[str]:
    """Names for every dim (after chain, draw) of site ``var``'s value."""
    if var in dims:
        given = list(dims[var])
        if len(given) != rank:
            raise ValueError(
                f"dims[{var!r}] = {given} names {len(given)} dims, but site {var!r} has {rank} "
                f"(batch dims from plates {list(site_dims.plates)} + {site_dims.event_dims} "
                f"event dims)"
            )
        return given
    batch = [
        plate_names.get(plate, plate) if plate is not None else f"{var}_batch_{i}"
        for i, plate in enumerate(site_dims.plates)
    ]
    return batch + [f"{var}_dim_{k}" for k in range(rank - len(batch))]


def _chain(array: torch.Tensor) -> np.ndarray:
    """``(S, ...)`` draws -> ``(1, S, ...)``: one chain."""
    return _numpy(array)[None]


def draws_to_inference_data(
    draws: ImportanceDraws,
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    summary: bool = True,
):
    """The :class:`arviz.InferenceData` of existing draws (see :func:`to_inference_data`)."""
    import arviz as az
    import pyro

    dims = dict(dims or {})
    unknown = sorted(set(dims) - set(draws.site_dims))
    if unknown:
        raise ValueError(
            f"dims names sites the model does not have: {', '.join(unknown)}; "
            f"sites: {', '.join(sorted(draws.site_dims))}"
        )
    coords = {name: np.asarray(values) for name, values in (coords or {}).items()}
    plate_names = _plate_dim_names(draws, dims)

    def full_dims(var: str) -> list[str]:
        site = draws.site_dims[var]
        return _site_dims(var, site, len(site.plates) + site.event_dims, dims, plate_names)

    def dataset(data: dict[str, np.ndarray], var_dims: dict[str, list[str]], **extra: Any):
        return az.dict_to_dataset(data, library=pyro, coords=coords, dims=var_dims, **extra)

    posterior_dims = {var: full_dims(var) for var in draws.latents}
    groups: dict[str, Any] = {
        "posterior": dataset(
            {var: _chain(value) for var, value in draws.latents.items()}, posterior_dims
        )
    }

    log_lik_dims = {
        var: full_dims(var)[: len(draws.site_dims[var].plates)]
        for var in draws.log_likelihood
    }
    if draws.log_likelihood:
        observed_dims = {}
        for var, value in draws.observed.items():
            # The data has the site's kept batch + event shape unless the model broadcasts it.
            rank = len(draws.site_dims[var].plates) + draws.site_dims[var].event_dims
            observed_dims[var] = (
                full_dims(var)
                if value.dim() == rank
                else [f"{var}_obs_dim_{k}" for k in range(value.dim())]
            )
        groups["log_likelihood"] = dataset(
            {var: _chain(value) for var, value in draws.log_likelihood.items()}, log_lik_dims
        )
        groups["observed_data"] = dataset(
            {var: _numpy(value) for var, value in draws.observed.items()},
            observed_dims,
            default_dims=[],
        )
    if draws.posterior_predictive:
        groups["posterior_predictive"] = dataset(
            {var: _chain(value) for var, value in draws.posterior_predictive.items()},
            {var: full_dims(var) for var in draws.posterior_predictive},
        )

    stats = {
        "log_weight": _chain(draws.log_weights),
        "lp": _chain(draws.log_p),
        "log_q": _chain(draws.log_q),
    }
    stats_dims: dict[str, list[str]] = {}
    if draws.log_weights_per_item is not None:
        stats["log_weight_item"] = _chain(draws.log_weights_per_item)
        stats_dims["log_weight_item"] = [plate_names.get(draws.item_plate, draws.item_plate)]
    attrs = {}
    if summary and draws.num_samples >= 2:
        result = summarize_importance(draws)
        attrs = {
            "psis_khat": result.khat,
            "iwae": result.iwae,
            "iwae_joint": result.iwae_joint,
            "elbo": result.elbo,
            "importance_ess": result.ess,
        }
        if result.khat_per_item is not None:
            # k-hat per item is recomputed from log_weight_item; the count is kept for readers.
            attrs["num_items_khat_above_0.7"] = result.num_items_above()
    groups["sample_stats"] = dataset(stats, stats_dims, attrs=attrs)
    return az.InferenceData(**groups)


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    item_plate: str | None = None,
    max_plate_nesting: int | None = None,
    particle_batch_size: int | None = None,
    vectorize: bool = True,
    **kwargs: Any,
):
    """An :class:`arviz.InferenceData` from ``num_samples`` draws of ``guide`` for ``model``.

    :param model, guide: any Pyro model with observed sites and a guide for its latents; both
        called with ``*args, **kwargs``.
    :param num_samples: draws (one chain of ``num_samples`` draws for ArviZ).
    :param dims: names for the dims of each site's value (without chain/draw), e.g. for STORN
        ``{"z": ["sequence", "time", "latent"], "x": ["sequence", "time", "feature"]}``. A
        plate dim named here names it everywhere (log-likelihood, per-item weights). Default:
        plate names for plate dims, ``<site>_dim_<k>`` for event dims.
    :param coords: coordinate values per dim name, e.g. ``{"latent": ["z1", "z2"]}``.
    :param item_plate, max_plate_nesting, particle_batch_size, vectorize: as in
        :func:`~pyro_storn.diagnostics.draws.draw_importance_samples`.

    Example::

        idata = to_inference_data(model, guide, data, num_samples=500)
        az.summary(idata); az.loo(idata); idata.to_netcdf("posterior.nc")
    """
    draws = draw_importance_samples(
        model,
        guide,
        *args,
        num_samples=num_samples,
        item_plate=item_plate,
        max_plate_nesting=max_plate_nesting,
        particle_batch_size=particle_batch_size,
        vectorize=vectorize,
        predictive=True,
        **kwargs,
    )
    return draws_to_inference_data(draws, dims=dims, coords=coords)
