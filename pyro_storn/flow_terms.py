"""The terms of a flow posterior, per sample: where the variational bound's entropy comes from.

For :math:`z_0 \\sim q_0` pushed through layers :math:`z_k = f_k(z_{k-1})`,

.. math::

    \\log q_K(z_K) = \\log q_0(z_0) - \\sum_{k=1}^{K} \\log\\left|\\det \\frac{\\partial f_k}
    {\\partial z_{k-1}}\\right|,

and the KL estimate is :math:`\\log q_K(z_K) - \\log p(z_K)`. A model whose flow learned nothing
shows :math:`\\sum \\log|\\det J| \\approx 0`; a collapsed posterior shows
:math:`\\log q_K \\approx \\log p`. STORN's per-epoch metrics, the flow VAE and the diagnostics all
read these four numbers from :func:`flow_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution, TransformedDistribution
from torch.distributions.utils import _sum_rightmost

__all__ = ["FlowTerms", "flow_terms"]


@dataclass
class FlowTerms:
    """Per-sample tensors of shape ``sample_shape + batch_shape`` (and the samples)."""

    z0: torch.Tensor
    zK: torch.Tensor
    log_q0: torch.Tensor
    sum_log_det: torch.Tensor
    log_qK: torch.Tensor
    log_prior: torch.Tensor

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample estimate of KL(q_K || p): ``log q_K(z_K) - log p(z_K)``."""
        return self.log_qK - self.log_prior


def flow_terms(
    posterior: Distribution,
    prior: Distribution,
    sample_shape: torch.Size | tuple[int, ...] = (),
    z0: torch.Tensor | None = None,
) -> FlowTerms:
    """``log q0(z0)``, ``Σ log|det J|``, ``log qK(zK)`` and ``log p(zK)`` for samples of a guide.

    :param posterior: a :class:`~torch.distributions.TransformedDistribution` (base ``q0`` and
        flow layers; a composed flow counts as its layers' sum), or any other distribution, read
        as a flow of length 0.
    :param prior: the prior over ``zK``, with the posterior's event shape.
    :param sample_shape: samples drawn (reparameterised when the base allows it).
    :param z0: base samples to push through instead of drawing them.
    """
    if isinstance(posterior, TransformedDistribution):
        base, layers = posterior.base_dist, list(posterior.transforms)
    else:
        base, layers = posterior, []
    event_dim = len(posterior.event_shape)
    if len(prior.event_shape) != event_dim:
        raise ValueError(
            f"prior event shape {tuple(prior.event_shape)} and posterior event shape "
            f"{tuple(posterior.event_shape)} differ in rank"
        )
    if z0 is None:
        sample_shape = torch.Size(sample_shape)
        z0 = base.rsample(sample_shape) if base.has_rsample else base.sample(sample_shape)
    log_q0 = _sum_rightmost(base.log_prob(z0), event_dim - len(base.event_shape))
    sum_log_det = torch.zeros_like(log_q0)
    z = z0
    for layer in layers:
        if layer.domain.event_dim != layer.codomain.event_dim:
            raise ValueError(f"{layer!r} changes the event dim; flow_terms needs bijections")
        z_next = layer(z)
        log_det = layer.log_abs_det_jacobian(z, z_next)
        sum_log_det = sum_log_det + _sum_rightmost(log_det, event_dim - layer.codomain.event_dim)
        z = z_next
    return FlowTerms(
        z0=z0,
        zK=z,
        log_q0=log_q0,
        sum_log_det=sum_log_det,
        log_qK=log_q0 - sum_log_det,
        log_prior=prior.log_prob(z),
    )
