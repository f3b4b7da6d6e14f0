"""Flow densities for plain vector data, in three modules with one job each: the density
(:mod:`.model`), its maximum-likelihood fit through the one training loop (:mod:`.fit`), and its
figures (:mod:`.figures`). Every name is importable from here.

>>> fit_data, validation = split(train, 0.2, seed=0)                         # doctest: +SKIP
>>> density = make_density("realnvp", fit_data, length=8)                    # doctest: +SKIP
>>> result = fit_density(density, fit_data, test, validation=validation,     # doctest: +SKIP
...                      max_seconds=30, lr=1e-3, clip_norm=10.0)
"""

from .figures import animate_cnf, grid_log_density, plot_heatmap, plot_history, plot_panels
from .fit import FitResult, HistoryPoint, fit_density
from .model import EVAL_SOLVER, MIN_SCALE, FlowDensity, make_density, solver_settings, split, test_nll

__all__ = [
    "EVAL_SOLVER",
    "MIN_SCALE",
    "FlowDensity",
    "make_density",
    "split",
    "test_nll",
    "solver_settings",
    "HistoryPoint",
    "FitResult",
    "fit_density",
    "grid_log_density",
    "plot_panels",
    "plot_heatmap",
    "plot_history",
    "animate_cnf",
]
