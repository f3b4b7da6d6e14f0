r"""Pareto-smoothed importance sampling diagnostics of a guide against its model.

Given log-weights :math:`\log w_s = \log p(x, z_s) - \log q(z_s|x)`, :math:`z_s \sim q`:

- :math:`\hat k`, the shape of a generalized Pareto fit to the largest weights [1, 2]:
  below 0.5 the guide is good, 0.5-0.7 usable, above 0.7 the importance weights (and with them
  the guide's estimates of posterior expectations) are unreliable;
- the importance-weighted bound :math:`\mathcal{L}_S = \log \frac1S \sum_s w_s \le \log p(x)` [3];
- the effective sample size :math:`(\sum_s w_s)^2 / \sum_s w_s^2` of the self-normalised weights.

Each is computed for the whole model (joint weights, as
:func:`pyro.infer.importance.psis_diagnostic` does) and per data item when the model has a plate
over items (:attr:`ImportanceDraws.log_weights_per_item`).

References:
    [1] Yao, Vehtari, Simpson, Gelman. Yes, but Did It Work?: Evaluating Variational Inference.
    ICML 2018. arXiv:1802.02538
    [2] Vehtari, Simpson, Gelman, Yao, Gabry. Pareto Smoothed Importance Sampling.
    arXiv:1507.02646
    [3] Burda, Grosse, Salakhutdinov. Importance Weighted Autoencoders. arXiv:1509.00519
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .draws import ImportanceDraws

__all__ = [
    "KHAT_THRESHOLD",
    "ImportanceSummary",
    "pareto_khat",
    "iwae_bound",
    "importance_ess",
    "summarize_importance",
]

# Yao et al. (2018), sec. 3: above 0.7 the PSIS estimate's error no longer falls at a usable
# rate with more draws, so the guide cannot be trusted for posterior expectations.
KHAT_THRESHOLD = 0.7


def _as_numpy(log_weights: Any) -> np.ndarray:
    if torch.is_tensor(log_weights):
        log_weights = log_weights.detach().cpu().double().numpy()
    return np.asarray(log_weights, dtype=float)


def _machine_eps(log_weights: Any) -> float:
    if torch.is_tensor(log_weights):
        return torch.finfo(log_weights.dtype).eps if log_weights.is_floating_point() else 2.0**-52
    dtype = np.asarray(log_weights).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 2.0**-52


def pareto_khat(log_weights: Any) -> np.ndarray:
    """:math:`\\hat k` of the log-weights along the LAST axis (``(..., S)`` -> ``(...)``),
    by :func:`arviz.psislw`.

    Weights that are all equal up to rounding (largest ratio within :math:`\\sqrt{\\epsilon}`
    of 1 in the input's precision) mean the guide IS the posterior: the tail fit is then
    meaningless (arviz returns ``inf`` for want of distinct tail draws) and :math:`\\hat k` is
    reported as ``-inf``, the limit for weights bounded ever more tightly. ``+inf`` still means
    too few tail draws to fit, as in arviz and Pyro."""
    import arviz as az

    # Rounding in log p - log q, not the guide, is all that varies between such weights.
    constant_tolerance = math.sqrt(_machine_eps(log_weights))
    array = _as_numpy(log_weights)
    if array.ndim == 0 or array.shape[-1] < 2:
        raise ValueError(f"need log-weights of shape (..., S) with S >= 2, got {array.shape}")
    _, khat = az.psislw(array)
    khat = np.array(khat, dtype=float)
    spread = np.max(array, -1) - np.min(array, -1)
    # expm1(spread) <= tol, compared on the log side: a spread of log-weights beyond ~709 nats
    # (a guide far from the posterior) would overflow expm1 and warn
    return np.where(spread <= math.log1p(constant_tolerance), -np.inf, khat)


def iwae_bound(log_weights: Any) -> np.ndarray:
    """:math:`\\log \\frac1S \\sum_s w_s` along the LAST axis."""
    array = torch.as_tensor(_as_numpy(log_weights))
    return (torch.logsumexp(array, -1) - math.log(array.shape[-1])).numpy()


def importance_ess(log_weights: Any) -> np.ndarray:
    """Effective sample size :math:`1 / \\sum_s \\bar w_s^2` of the self-normalised weights
    :math:`\\bar w_s = w_s / \\sum_r w_r`, along the LAST axis (between 1 and S)."""
    array = torch.as_tensor(_as_numpy(log_weights))
    normalized = array - torch.logsumexp(array, -1, keepdim=True)
    return torch.exp(-torch.logsumexp(2.0 * normalized, -1)).numpy()


@dataclass(frozen=True)
class ImportanceSummary:
    """Importance-sampling diagnostics of one guide on one data set.

    :param num_samples: draws ``S`` used.
    :param elbo: :math:`\\frac1S\\sum_s \\log w_s` (a Monte Carlo ELBO, summed over items).
    :param iwae: the IWAE bound on :math:`\\log p(x)`: the sum over items of the per-item
        bounds when items are known (each item's latents drawn independently), else the bound
        from the joint weights.
    :param iwae_joint: the bound from the joint weights (looser when there are many items).
    :param khat: :math:`\\hat k` of the joint weights (what ``psis_diagnostic`` reports).
    :param ess: ESS of the joint weights.
    :param khat_per_item, iwae_per_item, ess_per_item: ``(N,)`` arrays, or ``None``.
    """

    num_samples: int
    elbo: float
    iwae: float
    iwae_joint: float
    khat: float
    ess: float
    khat_per_item: np.ndarray | None = None
    iwae_per_item: np.ndarray | None = None
    ess_per_item: np.ndarray | None = None
    item_plate: str | None = None

    def num_items_above(self, threshold: float = KHAT_THRESHOLD) -> int | None:
        """How many items have :math:`\\hat k` above ``threshold`` (``None`` without items)."""
        if self.khat_per_item is None:
            return None
        return int(np.sum(self.khat_per_item > threshold))

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists, ready for ``json.dump``."""
        out: dict[str, Any] = {
            "num_samples": self.num_samples,
            "elbo": self.elbo,
            "iwae": self.iwae,
            "iwae_joint": self.iwae_joint,
            "khat": self.khat,
            "ess": self.ess,
            "item_plate": self.item_plate,
        }
        if self.khat_per_item is not None:
            out["num_items"] = int(self.khat_per_item.shape[0])
            out["num_items_khat_above_0.7"] = self.num_items_above()
            out["khat_per_item"] = self.khat_per_item.tolist()
            out["iwae_per_item"] = self.iwae_per_item.tolist()
            out["ess_per_item"] = self.ess_per_item.tolist()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImportanceSummary":
        """The summary that :meth:`to_dict` wrote (e.g. read back from ``evaluation.json``)."""
        per_item = {
            name: (np.asarray(values[name], dtype=float) if name in values else None)
            for name in ("khat_per_item", "iwae_per_item", "ess_per_item")
        }
        return cls(
            num_samples=int(values["num_samples"]),
            elbo=float(values["elbo"]),
            iwae=float(values["iwae"]),
            iwae_joint=float(values["iwae_joint"]),
            khat=float(values["khat"]),
            ess=float(values["ess"]),
            item_plate=values.get("item_plate"),
            **per_item,
        )

    def format(self) -> str:
        """A few lines for a terminal (``pyro-storn evaluate``)."""
        lines = [
            f"draws S = {self.num_samples}",
            f"ELBO   = {self.elbo:.4f}",
            f"IWAE   = {self.iwae:.4f}" + (" (sum of per-item bounds)" if self.item_plate else ""),
            f"PSIS k = {self.khat:.3f} (joint weights; > {KHAT_THRESHOLD} means unreliable)",
            f"ESS    = {self.ess:.1f} of {self.num_samples} (joint weights)",
        ]
        if self.khat_per_item is not None:
            n = self.khat_per_item.shape[0]
            lines += [
                f"per item of plate {self.item_plate!r} (N = {n}): k max {np.max(self.khat_per_item):.3f}, "
                f"median {np.median(self.khat_per_item):.3f}; "
                f"{self.num_items_above()} of {n} above {KHAT_THRESHOLD}",
                f"per-item ESS: min {np.min(self.ess_per_item):.1f}, "
                f"median {np.median(self.ess_per_item):.1f}",
            ]
        return "\n".join(lines)


def summarize_importance(draws: ImportanceDraws) -> ImportanceSummary:
    """All the diagnostics of :mod:`pyro_storn.diagnostics.psis` for one set of draws."""
    joint = draws.log_weights
    per_item = None
    if draws.log_weights_per_item is not None:
        per_item = draws.log_weights_per_item.transpose(0, 1)  # (N, S): draws on the last axis
    iwae_joint = float(iwae_bound(joint))
    iwae_per_item = iwae_bound(per_item) if per_item is not None else None
    return ImportanceSummary(
        num_samples=draws.num_samples,
        elbo=float(joint.double().mean()),
        iwae=float(np.sum(iwae_per_item)) if iwae_per_item is not None else iwae_joint,
        iwae_joint=iwae_joint,
        khat=float(pareto_khat(joint)),
        ess=float(importance_ess(joint)),
        khat_per_item=pareto_khat(per_item) if per_item is not None else None,
        iwae_per_item=iwae_per_item,
        ess_per_item=importance_ess(per_item) if per_item is not None else None,
        item_plate=draws.item_plate,
    )
