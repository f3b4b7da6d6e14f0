"""Helpers shared by the STORN tests: per-sequence log-weights from Pyro's traces."""

from __future__ import annotations

import torch
from pyro import poutine


def per_sequence_log_weights(storn, x, mask, z=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x, z) - log q(z) per sequence from Pyro's traces of the model and the guide, and
    the draws; with ``z``, the guide's density at those draws (through the flow's inverse)."""
    guide_trace = poutine.trace(storn.guide).get_trace(x, mask)
    if z is not None:
        guide_trace.nodes["z"]["value"] = z
    model_trace = poutine.trace(poutine.replay(storn.model, trace=guide_trace)).get_trace(x, mask)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_p = model_trace.nodes["z"]["log_prob"] + model_trace.nodes["x"]["log_prob"]
    return log_p - guide_trace.nodes["z"]["log_prob"], guide_trace.nodes["z"]["value"]


def moved_storn(storn_class, dims, **options):
    """A float64 STORN (seed 0) with every parameter moved by N(0, 0.5) noise: far from the
    initialisation, where a learned prior is N(0, I) and a flow near the identity."""
    import pyro

    pyro.set_rng_seed(0)
    storn = storn_class(*dims, **options).double()
    with torch.no_grad():
        for parameter in storn.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return storn


def padded_bernoulli_batch(lengths, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 sequences (p = 0.4, seed 1) of the given lengths, padded to the longest, and the
    mask of their observed steps."""
    n_steps = max(lengths)
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((len(lengths), n_steps, dim), 0.4, dtype=torch.float64),
                        generator=generator)
    return x, torch.arange(n_steps) < torch.tensor(lengths)[:, None]
