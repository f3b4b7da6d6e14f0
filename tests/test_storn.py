"""STORN's sites and shapes, masking, learning, generation, flow terms and bounds."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import transforms
from pyro_storn import STORN
from pyro_storn.evaluation import evaluate_bounds, sample_terms, sequence_metrics
from pyro_storn.flow_terms import flow_terms

B, T, D, Z, H = 5, 7, 3, 2, 8


def _flows(event_dim: int) -> list[str]:
    preferred = {1: ("planar", "radial", "iaf"), 2: ("conv_planar",)}[event_dim]
    return [name for name in preferred if name in transforms.available(event_dim=event_dim)]


FLOW_CASES = [(None, 0)] + [(name, 2) for name in _flows(1) + _flows(2)]


def _data(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def _storn(flow=None, length=0, **kwargs) -> STORN:
    pyro.set_rng_seed(0)
    storn = STORN(D, Z, H, flow=flow, flow_length=length, **kwargs)
    binary = kwargs.get("emission", "normal") == "bernoulli"
    storn.set_data_statistics(_binary_walks() if binary else _data(1))
    return storn


@pytest.mark.parametrize("flow, length", FLOW_CASES)
def test_sites_and_shapes(flow, length):
    storn = _storn(flow, length)
    x = _data()
    guide_trace = poutine.trace(storn.guide).get_trace(x)
    z_site = guide_trace.nodes["z"]
    assert z_site["value"].shape == (B, T, Z)
    assert z_site["fn"].event_shape == (T, Z) and z_site["fn"].batch_shape == (B,)
    assert [f.name for f in z_site["cond_indep_stack"]] == ["sequences"]
    model_trace = poutine.trace(poutine.replay(storn.model, trace=guide_trace)).get_trace(x)
    x_site = model_trace.nodes["x"]
    assert x_site["is_observed"] and x_site["fn"].event_shape == (T, D)
    assert x_site["fn"].batch_shape == (B,)
    assert model_trace.nodes["z"]["fn"].event_shape == (T, Z)
    # one latent site for the whole sequence, not one per step
    assert [n for n in model_trace.stochastic_nodes if n != "sequences"] == ["z"]
    assert model_trace.observation_nodes == ["x"]
    if flow is not None:
        assert isinstance(z_site["fn"], dist.TransformedDistribution)
        assert storn.flow_conditional == transforms.info(flow).conditional


@pytest.mark.parametrize("flow, length", FLOW_CASES)
def test_flow_terms_agree_with_the_guide_density(flow, length):
    storn = _storn(flow, length)
    x = _data()
    with torch.no_grad():
        posterior = storn.posterior(x)
        terms = flow_terms(posterior, storn.prior((B,), T), sample_shape=(4,))
        assert terms.log_q0.shape == terms.log_qK.shape == terms.log_prior.shape == (4, B)
        torch.testing.assert_close(terms.log_qK, terms.log_q0 - terms.sum_log_det)
        # The change of variables computed layer by layer equals the distribution's log_prob.
        torch.testing.assert_close(posterior.log_prob(terms.zK), terms.log_qK,
                                   rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(terms.log_prior,
                                   dist.Normal(0.0, 1.0).log_prob(terms.zK).sum((-1, -2)))
    if flow is None:
        assert torch.all(terms.sum_log_det == 0)
    else:
        assert torch.all(terms.sum_log_det != 0)


@pytest.mark.parametrize("flow, length", FLOW_CASES[:2])
def test_mask_hides_padding(flow, length):
    storn = _storn(flow, length)
    x = _data()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    x_other = x.clone()
    x_other[~mask] = torch.randn(int((~mask).sum()), D) * 100
    x_nan = x.clone()
    x_nan[~mask] = float("nan")
    elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)

    def loss_and_grads(xs):
        pyro.clear_param_store()
        storn.zero_grad()
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(storn.model, storn.guide, xs, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in storn.parameters()]

    reference, reference_grads = loss_and_grads(x)
    for xs in (x_other, x_nan):
        loss, grads = loss_and_grads(xs)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, reference, rtol=0, atol=0)
        for g, r in zip(grads, reference_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
    # ... while an observed value does change the loss.
    x_seen = x.clone()
    x_seen[0, 0] += 1.0
    assert not torch.equal(loss_and_grads(x_seen)[0], reference)


def test_mask_counts_only_observed_steps_in_the_likelihood():
    storn = _storn()
    x = _data()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 3:] = False
    z = torch.randn(B, T, Z)
    masked = storn.emission(x, z, mask).log_prob(storn.clean(x, mask))
    short = storn.emission(x[:, :3], z[:, :3]).log_prob(x[:, :3])
    torch.testing.assert_close(masked, short)


def _binary_walks() -> torch.Tensor:
    """0/1 sequences with memory: the sign of each feature's random walk."""
    return (torch.randn(16, T, D, generator=torch.Generator().manual_seed(5)).cumsum(1) > 0).float()


@pytest.mark.parametrize("flow, length, emission, encoder", [
    *((flow, length, "normal", "forward") for flow, length in FLOW_CASES[:2]),
    (None, 0, "bernoulli", "forward"),
    (None, 0, "bernoulli", "backward"),
    (*FLOW_CASES[1], "normal", "bidirectional"),
])
def test_short_run_lowers_the_loss(flow, length, emission, encoder):
    storn = _storn(flow, length, emission=emission, encoder=encoder)
    if emission == "normal":
        x = torch.randn(16, T, D, generator=torch.Generator().manual_seed(5)).cumsum(1)
    else:
        x = _binary_walks()
    storn.set_data_statistics(x)
    pyro.clear_param_store()

    def bound() -> float:
        pyro.set_rng_seed(11)
        return evaluate_bounds(storn, x, num_samples=20)["neg_elbo_mean"]

    before = bound()
    svi = pyro.infer.SVI(storn.model, storn.guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.Trace_ELBO(max_plate_nesting=1))
    for _ in range(60):
        svi.step(x)
    assert bound() < before - 0.1 * abs(before)


def test_vectorised_particles_broadcast_over_leading_dims():
    storn = _storn(*FLOW_CASES[1]) if len(FLOW_CASES) > 1 else _storn()
    x = _data()
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(elbo.differentiable_loss(storn.model, storn.guide, x))


def test_generate_shapes_and_prefix():
    storn = _storn()
    x = _data()
    out = storn.generate(x[:, :2], n_steps=T, num_samples=3)
    assert out.shape == (3, B, T, D)
    assert torch.equal(out[:, :, :2], x[:, :2].expand(3, B, 2, D))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0, :, 2:], out[1, :, 2:])  # samples differ
    single = storn.generate(x[0, :1], n_steps=T + 5)
    assert single.shape == (1, T + 5, D) and torch.equal(single[0, :1], x[0, :1])
    mean = storn.generate(x[:, :1], n_steps=T, num_samples=2, sample_observations=False)
    # Only z differs between the two mean paths; both start from the observed step.
    assert torch.equal(mean[0, :, 0], mean[1, :, 0])
    with pytest.raises(ValueError, match="x_prefix must be"):
        storn.generate(torch.zeros(B, 2, D + 1), n_steps=T)
    with pytest.raises(ValueError, match="prefix length"):
        storn.generate(x, n_steps=T - 1)


def test_generation_prefix_sets_the_decoder_state():
    """The first generated step's distribution depends on the observed prefix."""
    storn = _storn()
    x = _data()
    pyro.set_rng_seed(0)
    a = storn.generate(x[:1, :3], n_steps=4, sample_observations=False)
    pyro.set_rng_seed(0)
    b = storn.generate(x[1:2, :3], n_steps=4, sample_observations=False)
    assert not torch.allclose(a[0, 0, 3], b[0, 0, 3])


def test_posterior_predictive_reconstructions():
    storn = _storn(*FLOW_CASES[-1])
    x = _data()
    recon = storn.reconstruct(x, num_samples=4)
    assert recon.shape == (4, B, T, D) and torch.isfinite(recon).all()
    assert not torch.equal(recon[0], x)


def test_bounds_order_and_metrics_keys():
    storn = _storn(*FLOW_CASES[-1])
    x = _data()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    result = evaluate_bounds(storn, x, mask, num_samples=16)
    assert result["neg_elbo"].shape == (B,) and result["n_steps"].tolist()[0] == 5
    assert (result["neg_iwae"] <= result["neg_elbo"] + 1e-9).all()
    assert result["neg_elbo_per_step"] == pytest.approx(result["neg_elbo"].sum() / mask.sum())
    metrics = sequence_metrics(storn, x, mask, batch_size=2)
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon_nll"] + metrics["kl"], rel=1e-6)
    assert metrics["log_qK"] == pytest.approx(metrics["log_q0"] - metrics["sum_log_det"],
                                              rel=1e-6, abs=1e-6)
    terms, log_lik = sample_terms(storn, x, mask, 2)
    assert log_lik.shape == (2, B)


def test_kl_weight_scales_the_latent_terms():
    storn = _storn()
    x = _data()
    guide_trace = poutine.trace(storn.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(storn.model, trace=guide_trace)).get_trace(x)
    storn.kl_weight = 0.25
    guide_trace_scaled = poutine.trace(poutine.replay(storn.guide, trace=guide_trace)).get_trace(x)
    model_trace_scaled = poutine.trace(poutine.replay(storn.model, trace=guide_trace)).get_trace(x)
    for full, scaled in ((guide_trace, guide_trace_scaled), (model_trace, model_trace_scaled)):
        full.compute_log_prob()
        scaled.compute_log_prob()
        torch.testing.assert_close(scaled.nodes["z"]["log_prob_sum"],
                                   0.25 * full.nodes["z"]["log_prob_sum"])
    torch.testing.assert_close(model_trace_scaled.nodes["x"]["log_prob_sum"],
                               model_trace.nodes["x"]["log_prob_sum"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_dim"):
        STORN(0)
    with pytest.raises(ValueError, match="flow_length"):
        STORN(3, flow_length=-1)
    with pytest.raises(ValueError, match="needs flow_length"):
        STORN(3, flow=(transforms.available() or ["planar"])[0])
    with pytest.raises(ValueError, match="unknown flow"):
        STORN(3, flow="no_such_flow", flow_length=2)
    with pytest.raises(ValueError, match="unknown rnn"):
        STORN(3, rnn="transformer")
    for name, value in (("latent_dim", True), ("hidden_dim", 4.0), ("emission_hidden", False)):
        with pytest.raises(ValueError, match=f"{name} must be a .*int, got {value!r}"):
            STORN(3, **{name: value})


def test_sizes_read_from_arrays_are_ints():
    storn = STORN(np.int64(3), np.int32(2), np.int64(4), flow="planar", flow_length=np.int64(1))
    assert (storn.input_dim, storn.latent_dim, storn.hidden_dim) == (3, 2, 4)
    assert all(type(v) is int for v in (storn.input_dim, storn.latent_dim, storn.hidden_dim))


@pytest.mark.parametrize("rnn", ["lstm", "rnn"])
def test_other_rnn_cells(rnn):
    storn = _storn(rnn=rnn)
    x = _data()
    assert torch.isfinite(pyro.infer.Trace_ELBO().differentiable_loss(storn.model, storn.guide, x))
    assert storn.generate(x[:, :1], T).shape == (1, B, T, D)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_and_generate():
    storn = _storn(*FLOW_CASES[1]).cuda()
    x = _data().cuda()
    loss = pyro.infer.Trace_ELBO().differentiable_loss(storn.model, storn.guide, x)
    loss.backward()
    assert loss.device.type == "cuda"
    assert storn.generate(x[:, :1], T).device.type == "cuda"
    assert evaluate_bounds(storn, x, num_samples=4)["neg_elbo"].shape == (B,)
