r"""Does a trained STORN use its latent? Three measurements on a set of sequences.

A collapsed STORN (KL near 0) has a decoder that ignores :math:`z_t` and a posterior equal to the
prior; whatever its latent could explain then shows up as emission noise. Per feature, over the
observed steps of ``x``:

- ``data_sd``: the feature's standard deviation in the data;
- ``emission_sd``: the median emission scale :math:`\sigma_x(h^g_t)` with :math:`z \sim q(z \mid x)`;
- ``decoder_change``: the median of :math:`|\mu_x(z) - \mu_x(0)|`, how far the emission mean moves
  when the sampled latent is replaced by the prior's mean (0 for a decoder that ignores it);

and ``q0_scale``, the median of the base posterior's scales :math:`\sigma_t` (1 is the prior's).

Over training, :func:`latent_in_use_epoch` reads from a run's metrics when the test KL rose to
stay above :data:`LATENT_IN_USE_KL`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .storn import STORN
from .tables import markdown_table

__all__ = ["LATENT_IN_USE_KL", "latent_in_use_epoch", "latent_use", "latent_use_table"]

# The test KL per 100-step pendulum sequence above which a run counts as using its latent:
# collapsed runs sit at 1-3 nats, runs that encode the torque in z_t climb past 100.
LATENT_IN_USE_KL = 10.0


@torch.no_grad()
def latent_use(storn: STORN, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """``{"data_sd", "emission_sd", "decoder_change"}`` (arrays over features) and ``q0_scale``
    (a float) for ``x`` (N, T, D); one posterior draw per sequence from the global RNG."""
    if storn.emission_type != "normal":  # the emission sd is what it reads; a Bernoulli has none
        raise ValueError(f"latent_use compares the data's sd with the Normal emission's; this "
                         f"STORN has emission={storn.emission_type!r}")
    if x.dim() != 3 or x.shape[-1] != storn.input_dim:
        raise ValueError(f"expected sequences (N, T, {storn.input_dim}), got shape {tuple(x.shape)}")
    x = x.to(storn.data_loc.device)
    mask = None if mask is None else mask.to(device=x.device, dtype=torch.bool)
    steps = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if mask is None else mask
    z = storn.posterior(x, mask).sample()
    loc, scale = storn.decode(x, z, mask)
    loc_without, _ = storn.decode(x, torch.zeros_like(z), mask)
    _, q0_scale, _ = storn.encode(x, mask)

    def per_feature(values: torch.Tensor) -> torch.Tensor:
        return values[steps]  # (observed steps, D)

    data = per_feature(storn.clean(x, mask)).double()
    return {
        "data_sd": data.std(0).cpu().numpy(),
        "emission_sd": per_feature(scale).median(0).values.cpu().numpy().astype(np.float64),
        "decoder_change": per_feature((loc - loc_without).abs()).median(0).values.cpu().numpy()
        .astype(np.float64),
        "q0_scale": float(q0_scale[steps].median()),
    }


def latent_use_table(use: dict[str, Any], features: Sequence[str]) -> str:
    """Markdown: per feature, the data's sd, the emission sd, their ratio and the decoder change
    of :func:`latent_use`'s ``use``."""
    if len(features) != len(use["data_sd"]):
        raise ValueError(f"{len(features)} feature names for {len(use['data_sd'])} features")
    rows = [[name, f"{data_sd:.4g}", f"{emission_sd:.4g}",
             f"{emission_sd / max(data_sd, np.finfo(float).tiny):.3g}", f"{change:.3g}"]
            for name, data_sd, emission_sd, change in zip(features, use["data_sd"],
                                                          use["emission_sd"], use["decoder_change"])]
    return markdown_table(["feature", "data sd", "emission sd (median)", "emission sd / data sd",
                           "decoder change with z = 0 (median)"], rows)


def latent_in_use_epoch(history: Sequence[dict[str, Any]],
                        threshold: float = LATENT_IN_USE_KL) -> int | None:
    """The epoch from which the test KL per sequence (``"test/kl"`` of each metrics record) stays
    at or above ``threshold`` to the last epoch; None if the last epoch is below it. Runs often
    start above it for an epoch or two and then collapse, so the first epoch to reach it would
    say nothing."""
    start = None
    for record in history:
        if record.get("test/kl", 0.0) >= threshold:
            start = int(record["epoch"]) if start is None else start
        else:
            start = None
    return start
