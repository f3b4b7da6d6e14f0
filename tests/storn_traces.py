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
