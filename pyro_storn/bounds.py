r"""-ELBO and -IWAE from importance log-weights: the one bounds path of the VAE and STORN.

For ``S`` samples :math:`z_s \sim q(z \mid x)` of one example with log-weights
:math:`\log w_s = \log p(x, z_s) - \log q(z_s \mid x)`,

.. math::

    -\mathrm{ELBO} = -\frac1S\sum_s \log w_s,\qquad
    -\mathrm{IWAE}_S = -\log\frac1S\sum_s w_s \;\ge\; -\log p(x),

and -IWAE <= -ELBO for every example by Jensen's inequality [1]. :func:`log_weight_bounds` draws
the samples in chunks (so that S = 5000 fits in memory) and accumulates the log-sum-exp, the sum
and the sum of squares of the log-weights in float64 across chunks. :func:`summarize` reports
the per-example bounds as the literature does: nats per example (an image) with the standard
error over examples, and, for sequences, nats per frame (Σ bound / Σ observed frames).
:func:`paired_difference` compares two models on the same examples.

References:
[1] Yuri Burda, Roger Grosse, Ruslan Salakhutdinov. Importance Weighted Autoencoders.
    arXiv:1509.00519
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .validation import check_positive_int

__all__ = [
    "log_weight_bounds",
    "samples_per_chunk",
    "standard_error",
    "summarize",
    "paired_difference",
]


def samples_per_chunk(n_examples: int, num_samples: int, max_rows: int) -> int:
    """Samples per forward pass so that ``n_examples x samples`` stays within ``max_rows``
    (at least one sample, at most ``num_samples``)."""
    return max(1, min(num_samples, max_rows // max(n_examples, 1)))


def log_weight_bounds(
    draw: Callable[[int], torch.Tensor], num_samples: int, chunk: int | None = None
) -> dict[str, torch.Tensor]:
    """Per-example ``neg_elbo``, ``neg_iwae`` and ``log_weight_var`` (the sample variance of the
    log-weights, for Monte Carlo errors), float64 tensors ``(N,)``, from ``num_samples``
    log-weights per example.

    :param draw: ``draw(s)`` returns ``(s, N)`` log-weights of ``s`` fresh samples for the same
        ``N`` examples on every call.
    :param chunk: samples per call of ``draw`` (all of them by default); the last call takes the
        rest.
    """
    check_positive_int("num_samples", num_samples)
    chunk = num_samples if chunk is None else check_positive_int("chunk", chunk)
    log_sum_exp = total = total_sq = None
    for start in range(0, num_samples, chunk):
        log_w = draw(min(chunk, num_samples - start)).double()
        if log_sum_exp is None:
            log_sum_exp = torch.full(log_w.shape[1:], -math.inf, dtype=torch.float64,
                                     device=log_w.device)
            total, total_sq = torch.zeros_like(log_sum_exp), torch.zeros_like(log_sum_exp)
        log_sum_exp = torch.logaddexp(log_sum_exp, torch.logsumexp(log_w, 0))
        total += log_w.sum(0)
        total_sq += log_w.square().sum(0)
    mean = total / num_samples
    variance = (total_sq / num_samples - mean.square()).clamp_min(0.0)
    return {
        "neg_elbo": -mean,
        "neg_iwae": math.log(num_samples) - log_sum_exp,
        "log_weight_var": variance * num_samples / max(num_samples - 1, 1),
    }


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (NaN for fewer than two)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return math.nan
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def summarize(
    neg_elbo: np.ndarray, neg_iwae: np.ndarray, num_samples: int, *,
    count_name: str = "n_examples", n_frames: np.ndarray | None = None,
) -> dict[str, Any]:
    """The per-example bounds with their means, spreads (``*_sd``) and standard errors of the
    means (``*_se``) in nats per example; with ``n_frames`` (observed frames per example) also
    ``n_steps`` and ``*_per_step``, nats per frame pooled over all observed frames.

    :param count_name: the key of the number of examples (``"n_images"``, ``"n_sequences"``).
    """
    neg_elbo = np.asarray(neg_elbo, dtype=np.float64)
    neg_iwae = np.asarray(neg_iwae, dtype=np.float64)
    out: dict[str, Any] = {"num_samples": num_samples, count_name: int(neg_elbo.shape[0]),
                           "neg_elbo": neg_elbo, "neg_iwae": neg_iwae}
    if n_frames is not None:
        out["n_steps"] = np.asarray(n_frames)
    for name, values in (("neg_elbo", neg_elbo), ("neg_iwae", neg_iwae)):
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_sd"] = float(values.std())
        out[f"{name}_se"] = standard_error(values)
    if n_frames is not None:
        total_frames = int(np.asarray(n_frames).sum())
        out["neg_elbo_per_step"] = float(neg_elbo.sum() / total_frames)
        out["neg_iwae_per_step"] = float(neg_iwae.sum() / total_frames)
    return out


def paired_difference(values: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``values - baseline`` over the same examples: the comparison
    that cancels the examples' own spread (negative: ``values`` is the lower bound)."""
    values, baseline = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"paired values need the same examples, got shapes {values.shape} and "
                         f"{baseline.shape}")
    difference = values - baseline
    return float(difference.mean()), standard_error(difference)
