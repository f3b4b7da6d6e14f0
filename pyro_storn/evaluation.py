"""Bounds and per-epoch metrics of a STORN on a set of sequences.

For ``S`` samples :math:`z^{(s)} \\sim q(z \\mid x)` of a sequence with log-weights
:math:`\\log w_s = \\log p(x \\mid z^{(s)}) + \\log p(z^{(s)}) - \\log q_K(z^{(s)} \\mid x)`,

.. math::

    \\mathrm{ELBO} = \\frac1S \\sum_s \\log w_s,\\qquad
    \\mathrm{IWAE}_S = \\log \\frac1S \\sum_s w_s \\;\\le\\; \\log p(x),

and ELBO ≤ IWAE. Everything is reported as a loss (negated, nats) per sequence and per observed
time step. The flow's own terms come from :func:`pyro_storn.flow_terms.flow_terms`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import bounds
from .flow_terms import FlowTerms, flow_terms
from .storn import STORN

__all__ = ["sample_terms", "sequence_metrics", "evaluate_bounds", "bounds_summary", "METRIC_NAMES"]

METRIC_NAMES = (
    "neg_elbo", "neg_elbo_per_step", "recon_nll", "kl", "log_q0", "log_qK", "sum_log_det",
    "log_prior",
)
# Rows (sequences x samples) per forward pass: bounds memory for S = 100 samples on any device.
_ROWS_PER_CHUNK = 4096


def sample_terms(
    storn: STORN, x: torch.Tensor, mask: torch.Tensor | None, num_samples: int = 1
) -> tuple[FlowTerms, torch.Tensor]:
    """Flow terms and ``log p(x | z)`` for ``num_samples`` posterior samples, each ``(S, N)``."""
    posterior = storn.posterior(x, mask)
    prior = storn.prior(x.shape[:-2], x.shape[-2], mask, x)
    terms = flow_terms(posterior, prior, sample_shape=(num_samples,))
    log_lik = storn.emission(x, terms.zK, mask, prior).log_prob(storn.clean(x, mask))
    return terms, log_lik


def _batches(x: torch.Tensor, mask: torch.Tensor | None, size: int, device: torch.device):
    for start in range(0, x.shape[0], size):
        stop = start + size
        yield (x[start:stop].to(device),
               None if mask is None else mask[start:stop].to(device))


@torch.no_grad()
def sequence_metrics(
    storn: STORN, x: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 256
) -> dict[str, float]:
    """Single-sample estimates averaged over sequences: -ELBO per sequence and per step,
    reconstruction NLL, KL, ``E[log q0(z0)]``, ``E[log qK(zK)]``, ``E[Σ log|det J|]``,
    ``E[log p(zK)]`` (the KL is not annealed here, whatever the training used)."""
    device = storn.data_loc.device
    sums = {name: torch.zeros((), device=device, dtype=torch.float64) for name in METRIC_NAMES}
    n_steps = 0
    for xb, mb in _batches(x, mask, batch_size, device):
        terms, log_lik = sample_terms(storn, xb, mb, 1)
        kl = terms.kl
        values = {
            "neg_elbo": -(log_lik - kl), "recon_nll": -log_lik, "kl": kl, "log_q0": terms.log_q0,
            "log_qK": terms.log_qK, "sum_log_det": terms.sum_log_det,
            "log_prior": terms.log_prior,
        }
        for name, value in values.items():
            sums[name] += value.double().sum()
        n_steps += int(xb.shape[0] * xb.shape[1]) if mb is None else int(mb.sum())
    n = x.shape[0]
    out = {name: float(value) / n for name, value in sums.items() if name != "neg_elbo_per_step"}
    out["neg_elbo_per_step"] = float(sums["neg_elbo"]) / n_steps
    return out


@torch.no_grad()
def evaluate_bounds(
    storn: STORN, x: torch.Tensor, mask: torch.Tensor | None = None, num_samples: int = 100
) -> dict[str, Any]:
    """-ELBO and -IWAE (``num_samples`` samples) per sequence and per time step.

    Returns per-sequence arrays (``neg_elbo``, ``neg_iwae``, ``n_steps``) and their summaries
    (``*_mean``, ``*_sd``, ``*_se`` per sequence; ``*_per_step`` pooled over observed steps),
    through :mod:`pyro_storn.bounds`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = storn.data_loc.device
    size = max(1, _ROWS_PER_CHUNK // num_samples)
    elbo, iwae, steps = [], [], []
    for xb, mb in _batches(x, mask, size, device):
        def draw(count: int) -> torch.Tensor:
            terms, log_lik = sample_terms(storn, xb, mb, count)
            return log_lik + terms.log_prior - terms.log_qK

        per_sequence = bounds.log_weight_bounds(
            draw, num_samples, bounds.samples_per_chunk(xb.shape[0], num_samples, _ROWS_PER_CHUNK))
        elbo.append(per_sequence["neg_elbo"].cpu())
        iwae.append(per_sequence["neg_iwae"].cpu())
        steps.append(torch.full((xb.shape[0],), xb.shape[1]) if mb is None else mb.sum(-1).cpu())
    neg_elbo = torch.cat(elbo).numpy()
    neg_iwae = torch.cat(iwae).numpy()
    n_steps = torch.cat(steps).numpy().astype(np.int64)
    return bounds_summary(neg_elbo, neg_iwae, n_steps, num_samples)


def bounds_summary(
    neg_elbo: np.ndarray, neg_iwae: np.ndarray, n_steps: np.ndarray, num_samples: int
) -> dict[str, Any]:
    """Per-sequence -ELBO and -IWAE with their means, sds, standard errors and per-step values
    (observed steps): :func:`pyro_storn.bounds.summarize` per sequence and per frame."""
    return bounds.summarize(neg_elbo, neg_iwae, num_samples, count_name="n_sequences",
                            n_frames=n_steps)
