"""Posterior diagnostics for any Pyro model/guide pair: importance draws, PSIS k-hat, IWAE and
ESS (per data item and joint), ArviZ InferenceData, and their figures.

>>> from pyro_storn import diagnostics
>>> draws = diagnostics.draw_importance_samples(model, guide, data, num_samples=1000)  # doctest: +SKIP
>>> print(diagnostics.summarize_importance(draws).format())                            # doctest: +SKIP
>>> idata = diagnostics.to_inference_data(model, guide, data, num_samples=1000)       # doctest: +SKIP

The flow terms tracked over training (E[log q0], E[log qK], E[sum log|det J|], E[log p(zK)])
live in :mod:`pyro_storn.flow_terms`.
"""

from .draws import ImportanceDraws, SiteDims, draw_importance_samples, guess_max_plate_nesting
from .figures import plot_khat, plot_latent_pairs, plot_log_weights, write_diagnostics
from .inference_data import draws_to_inference_data, to_inference_data
from .psis import (
    KHAT_THRESHOLD,
    ImportanceSummary,
    importance_ess,
    iwae_bound,
    pareto_khat,
    summarize_importance,
)

__all__ = [
    "KHAT_THRESHOLD",
    "ImportanceDraws",
    "ImportanceSummary",
    "SiteDims",
    "draw_importance_samples",
    "draws_to_inference_data",
    "guess_max_plate_nesting",
    "importance_ess",
    "iwae_bound",
    "pareto_khat",
    "plot_khat",
    "plot_latent_pairs",
    "plot_log_weights",
    "summarize_importance",
    "to_inference_data",
    "write_diagnostics",
]
