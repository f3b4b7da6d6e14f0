"""Exact padding in STORN: a sequence alone and the same sequence padded inside a ragged batch give
the same log p(x, z) - log q(z) (through Pyro's traces), the same IWAE and flow log-det for the
same draws, and the same gradients; padded steps' inputs get exactly zero gradient. For every
encoder, for per-step and over-time flows (conditioned and not), and every registry flow."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import transforms
from pyro_storn import STORN
from storn_traces import per_sequence_log_weights
from pyro_storn.flow_terms import flow_terms
from pyro_storn.storn import ENCODERS, reverse_within_length, within_length

D, Z, H = 3, 2, 6
LENGTHS = (9, 5, 7)  # the first sequence sets T; the others are padded
T = max(LENGTHS)
TOL = 1e-5
SAMPLES = 4
# (flow, flow_length, condition_flow): none, per-step conditioned (planar), per-step shared
# (planar), over time conditioned and shared (conv_planar), over time centred (both inverses).
FLOWS = [
    (None, 0, True),
    ("planar", 2, True),
    ("iaf", 2, False),
    ("conv_planar", 2, True),
    ("conv_planar", 2, False),
    ("conv_planar_centered", 2, True),
]
FLOW_IDS = [f"{f or 'none'}-{'cond' if c else 'plain'}" for f, _, c in FLOWS]


def _storn(flow, length, condition_flow=True, encoder="forward") -> STORN:
    pyro.set_rng_seed(0)
    entry_kwargs = transforms.info(flow).test_kwargs if flow else {}
    storn = STORN(D, Z, H, flow=flow, flow_length=length, encoder=encoder,
                  condition_flow=condition_flow, flow_kwargs=dict(entry_kwargs)).double()
    with torch.no_grad():  # flows away from their initialisation, so that they matter
        for parameter in storn.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    storn.set_data_statistics(_batch()[0], _batch()[1])
    return storn


def _batch(fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(LENGTHS), T, D, generator=generator, dtype=torch.float64)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    x[~mask] = fill  # never read
    return x, mask


def _alone(x: torch.Tensor, i: int) -> torch.Tensor:
    return x[i : i + 1, : LENGTHS[i]]


def _terms(storn, x, mask, z0):
    """Flow terms and log-weights for base draws ``z0`` (S, N, T, Z)."""
    posterior = storn.posterior(x, mask)
    prior = storn.prior(x.shape[:-2], x.shape[-2], mask)
    terms = flow_terms(posterior, prior, z0=z0)
    log_lik = storn.emission(x, terms.zK, mask).log_prob(storn.clean(x, mask))
    return terms, log_lik + terms.log_prior - terms.log_qK


def _iwae(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL, msg=lambda m: f"{what}\n{m}")


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("flow,length,condition_flow", FLOWS, ids=FLOW_IDS)
def test_padded_sequence_scores_as_it_does_alone(flow, length, condition_flow, encoder):
    storn = _storn(flow, length, condition_flow, encoder)
    x, mask = _batch()
    with torch.no_grad():
        log_w, z = per_sequence_log_weights(storn, x, mask)
        assert torch.isfinite(log_w).all()
        z0 = torch.randn(SAMPLES, *z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(2))
        terms, log_w_samples = _terms(storn, x, mask, z0)
        for i in range(len(LENGTHS)):
            steps = LENGTHS[i]
            alone_log_w, _ = per_sequence_log_weights(
                storn, _alone(x, i), None, z[i : i + 1, :steps])
            _close(alone_log_w[0], log_w[i], f"sequence {i}: log p(x, z) - log q(z)")
            alone_terms, alone_samples = _terms(storn, _alone(x, i), None, z0[:, i : i + 1, :steps])
            _close(alone_terms.zK[:, 0], terms.zK[:, i, :steps], f"sequence {i}: z_K")
            _close(alone_terms.sum_log_det[:, 0], terms.sum_log_det[:, i], f"sequence {i}: log-det")
            _close(alone_samples[:, 0], log_w_samples[:, i], f"sequence {i}: log-weights")
            _close(_iwae(alone_samples)[0], _iwae(log_w_samples)[i], f"sequence {i}: IWAE")
    if flow is not None:
        assert (terms.sum_log_det != 0).any()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("flow,length,condition_flow", FLOWS, ids=FLOW_IDS)
def test_padding_gets_no_gradient(flow, length, condition_flow, encoder):
    """Every parameter's gradient of a padded sequence's log-weight equals the one of the
    sequence alone (same base draws), and the padded steps' observations and base draws get
    exactly zero gradient."""
    storn = _storn(flow, length, condition_flow, encoder)
    x, mask = _batch(fill=3.0)
    x.requires_grad_(True)
    noise = torch.randn(1, *x.shape[:-1], Z, dtype=x.dtype,
                        generator=torch.Generator().manual_seed(4))

    def log_weights(xs, ms, eps):
        loc, scale, _ = storn.encode(xs, ms)
        z0 = loc + scale * eps
        z0.retain_grad()
        return _terms(storn, xs, ms, z0)[1], z0

    i = 1
    storn.zero_grad()
    log_w, z0 = log_weights(x, mask, noise)
    log_w[0, i].backward()
    padded = ~mask[i]
    assert torch.equal(x.grad[i][padded], torch.zeros_like(x.grad[i][padded]))
    assert torch.equal(z0.grad[0, i][padded], torch.zeros_like(z0.grad[0, i][padded]))
    batch_grads = {n: p.grad.clone() for n, p in storn.named_parameters() if p.grad is not None}

    storn.zero_grad()
    alone, _ = log_weights(_alone(x.detach(), i), None, noise[:, i : i + 1, : LENGTHS[i]])
    alone[0, 0].backward()
    alone_grads = {n: p.grad.clone() for n, p in storn.named_parameters() if p.grad is not None}
    assert batch_grads.keys() == alone_grads.keys()
    for name, grad in alone_grads.items():
        _close(batch_grads[name], grad, f"gradient of {name}")


@pytest.mark.parametrize("flow", transforms.available())
def test_every_registry_flow_scores_padding_exactly(flow):
    """Every registered flow (conditioned on the bidirectional state when it can be) in a ragged
    batch: per-sequence log-weights equal the sequences' own, and an SVI step is finite."""
    storn = _storn(flow, 2, True, "bidirectional")
    x, mask = _batch()
    with torch.no_grad():
        log_w, z = per_sequence_log_weights(storn, x, mask)
        for i in (1, 2):
            alone, _ = per_sequence_log_weights(storn, _alone(x, i), None, z[i : i + 1, : LENGTHS[i]])
            _close(alone[0], log_w[i], f"{flow}: sequence {i}")
    loss = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        storn.model, storn.guide, x, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in storn.parameters() if p.grad is not None)


def test_padded_latents_are_free_but_interior_gaps_are_not():
    """Past the last observed step the prior counts nothing; an unobserved step inside the
    length is missing data, whose latent keeps its prior term."""
    storn = _storn(None, 0)
    mask = torch.tensor([[True, False, True, False, False]])
    z = torch.randn(1, 5, Z, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, :3]).sum((-1, -2))
    _close(storn.prior((1,), 5, mask).log_prob(z), expected, "prior with a gap")
    assert within_length(mask).tolist() == [[True, True, True, False, False]]


def test_reverse_within_length_is_an_involution_that_keeps_padding_in_place():
    values = torch.arange(2 * 5, dtype=torch.float64).reshape(2, 5, 1)
    lengths = torch.tensor([5, 3])
    reversed_ = reverse_within_length(values, lengths)
    assert reversed_[..., 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(reverse_within_length(reversed_, lengths), values)


def test_sequence_flow_without_a_step_mask_is_refused_for_padded_batches():
    storn = _storn("conv_planar", 1, False)
    storn.flow = transforms.flow("planar", Z, 1)  # a stand-in over time with no with_mask
    storn.flow_event_dim = 2
    x, mask = _batch()
    with pytest.raises(ValueError, match="takes no step mask"):
        storn.posterior(x, mask)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_analytic_kl_of_the_mean_field_elbo_excludes_padding(encoder):
    """TraceMeanField_ELBO (plain STORN's loss) takes KL(q || p) in closed form from the masked
    sites: per sequence it is the sequence's own."""
    storn = _storn(None, 0, encoder=encoder)
    x, mask = _batch()
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(storn.posterior(x, mask),
                                               storn.prior((len(LENGTHS),), T, mask))
        for i, steps in enumerate(LENGTHS):
            alone = torch.distributions.kl_divergence(storn.posterior(_alone(x, i)),
                                                      storn.prior((1,), steps))
            _close(kl[i], alone[0], f"sequence {i}: KL")


@pytest.mark.parametrize("flow,length,condition_flow", FLOWS[:2], ids=FLOW_IDS[:2])
def test_evaluation_terms_leave_padding_out_of_the_prior(flow, length, condition_flow):
    """The per-epoch metrics and the IWAE of pyro_storn.evaluation score only observed steps."""
    from pyro_storn.evaluation import sample_terms

    storn = _storn(flow, length, condition_flow)
    x, mask = _batch()
    terms, _ = sample_terms(storn, x, mask, SAMPLES)
    per_step = torch.distributions.Normal(0.0, 1.0).log_prob(terms.zK).sum(-1)
    _close(terms.log_prior, (per_step * mask).sum(-1), "log p(z) over observed steps")


@pytest.mark.parametrize("encoder", ["backward", "bidirectional"])
def test_mlp_emission_keeps_padding_exact(encoder):
    """``emission_hidden``: the emission MLP reads [h_t, z_t] per step, so a padded sequence
    still scores as it does alone."""
    pyro.set_rng_seed(0)
    storn = STORN(D, Z, H, flow="planar", flow_length=2, encoder=encoder,
                  emission_hidden=5).double()
    x, mask = _batch()
    storn.set_data_statistics(x, mask)
    with torch.no_grad():
        log_w, z = per_sequence_log_weights(storn, x, mask)
        for i in range(len(LENGTHS)):
            alone, _ = per_sequence_log_weights(storn, _alone(x, i), None, z[i : i + 1, : LENGTHS[i]])
            _close(alone[0], log_w[i], f"sequence {i}: log p(x, z) - log q(z)")
