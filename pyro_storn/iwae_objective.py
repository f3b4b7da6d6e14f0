r"""The importance-weighted bound as STORN's training objective (Burda et al. 2016).

For each sequence :math:`x` of a minibatch, :math:`K` reparameterised draws
:math:`z_k \sim q_K(z \mid x)` (the guide with its flow) give

.. math::

    -\mathrm{IWAE}_K(x) = -\log \frac1K \sum_{k=1}^K w_k,\qquad
    \log w_k = \log p(x \mid z_k) + \beta\,(\log p(z_k) - \log q_K(z_k \mid x)),

summed over the minibatch. :math:`\beta` is STORN's ``kl_weight`` (1 once KL annealing ends); at
:math:`K = 1` this is the single-sample -ELBO, and it tightens towards :math:`-\log p(x)` as
:math:`K` grows, so a guide trained on it is fitted to the bound the evaluation reports.

Pyro's :class:`~pyro.infer.RenyiELBO` with ``alpha=0`` is not used: it sums the log-weights over
the sequence plate before the log-mean-exp, so the K draws would weigh whole minibatches (the
bound of their joint, far looser than one per sequence), and it has no ``differentiable_loss``
for :mod:`torch.optim`.

>>> objective = IWAEObjective(storn, num_samples=5)     # doctest: +SKIP
>>> objective(x, mask).backward()                       # doctest: +SKIP

Reference: Yuri Burda, Roger Grosse, Ruslan Salakhutdinov. Importance Weighted Autoencoders.
ICLR 2016. arXiv:1509.00519
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .evaluation import sample_terms
from .storn import STORN
from .validation import check_positive_int

__all__ = ["IWAEObjective", "OBJECTIVES"]

OBJECTIVES = ("elbo", "iwae")


class IWAEObjective(nn.Module):
    """``forward(x, mask)``: minus the K-sample importance-weighted bound of each sequence,
    summed over the minibatch (the objective :func:`pyro_storn.training.fit` takes)."""

    def __init__(self, storn: STORN, num_samples: int) -> None:
        super().__init__()
        self.storn = storn
        self.num_samples = check_positive_int("num_samples", num_samples)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        terms, log_lik = sample_terms(self.storn, x, mask, self.num_samples)
        log_w = log_lik + self.storn.kl_weight * (terms.log_prior - terms.log_qK)
        return -(torch.logsumexp(log_w, 0) - math.log(self.num_samples)).sum()
