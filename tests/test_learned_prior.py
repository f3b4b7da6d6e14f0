"""STORN's learned prior (the VRNN's p(z_t | h_{t-1})) and emission dropout: the log-density is
the step-by-step product, sampling follows the same recursion, it starts as N(0, I), padding
stays exact, the emission shares the prior's decoder pass, and dropout acts only in training."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_storn import STORN
from storn_traces import moved_storn, padded_bernoulli_batch, per_sequence_log_weights
from pyro_storn.evaluation import sample_terms
from pyro_storn.runs import TrainConfig, build_storn
from pyro_storn.storn import DecoderStatePrior

D, Z, H = 4, 3, 6
LENGTHS = (8, 5, 6)
T = max(LENGTHS)
TOL = 1e-9


def _storn(**kwargs) -> STORN:
    options = dict(emission="bernoulli", encoder="backward", emission_hidden=5, prior="learned")
    options.update(kwargs)
    return moved_storn(STORN, (D, Z, H), **options)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_bernoulli_batch(LENGTHS, D)


def _step_by_step(storn: STORN, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(z | x) by the recursion itself, one decoder step at a time (no mask)."""
    x_prev = storn.decoder_inputs(x)
    state, hidden = x.new_zeros(x.shape[0], H), None
    total = x.new_zeros(x.shape[0])
    for t in range(x.shape[1]):
        loc, scale = storn.prior_params(state)
        total = total + torch.distributions.Normal(loc, scale).log_prob(z[:, t]).sum(-1)
        out, hidden = storn.decoder_rnn(torch.cat([x_prev[:, t], z[:, t]], -1)[:, None], hidden)
        state = out[:, 0]
    return total


def test_log_density_is_the_step_by_step_product():
    storn = _storn()
    x, _ = _batch()
    z = torch.randn(len(LENGTHS), T, Z, dtype=torch.float64)
    prior = storn.prior((len(LENGTHS),), T, None, x)
    assert isinstance(prior, DecoderStatePrior) and prior.event_shape == (T, Z)
    torch.testing.assert_close(prior.log_prob(z), _step_by_step(storn, x, z), rtol=TOL, atol=TOL)
    # with sample dims in front of the batch, as the IWAE draws them
    zs = torch.randn(2, len(LENGTHS), T, Z, dtype=torch.float64)
    expected = torch.stack([_step_by_step(storn, x, zs[s]) for s in range(2)])
    torch.testing.assert_close(prior.log_prob(zs), expected, rtol=TOL, atol=TOL)


def test_samples_follow_the_recursion():
    """z = loc + scale * eps step by step, so log p(z) = sum log N(eps) - sum log scale."""
    storn = _storn()
    x, _ = _batch()
    prior = storn.prior((len(LENGTHS),), T, None, x)
    torch.manual_seed(3)
    z = prior.rsample((2,))
    assert z.shape == (2, len(LENGTHS), T, Z)
    torch.manual_seed(3)
    noise = torch.stack([torch.randn(2 * len(LENGTHS), Z, dtype=torch.float64)
                         for _ in range(T)], 1).reshape(z.shape)
    x_prev = storn.decoder_inputs(x).expand(2, *x.shape).reshape(-1, T, D)
    flat_z = z.reshape(-1, T, Z)
    state = storn.decoder_state(x_prev, flat_z)
    loc, scale = storn.prior_params(torch.nn.functional.pad(state[:, :-1], (0, 0, 1, 0)))
    torch.testing.assert_close((flat_z - loc) / scale, noise.reshape(-1, T, Z), rtol=1e-7,
                               atol=1e-7)
    log_noise = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum((-2, -1))
    expected = log_noise - scale.log().sum((-2, -1)).reshape(2, -1)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-7, atol=1e-7)


def test_starts_as_storns_prior():
    storn = STORN(D, Z, H, prior="learned").double()
    x, _ = _batch()
    z = torch.randn(len(LENGTHS), T, Z, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((-2, -1))
    torch.testing.assert_close(storn.prior((len(LENGTHS),), T, None, x).log_prob(z), expected)


@pytest.mark.parametrize("flow", [None, "iaf", "conv_planar"])
def test_padded_sequence_scores_as_it_does_alone(flow):
    storn = _storn(flow=flow, flow_length=2 if flow else 0)
    x, mask = _batch()
    with torch.no_grad():
        log_w, z = per_sequence_log_weights(storn, x, mask)
        assert torch.isfinite(log_w).all()
        for i, steps in enumerate(LENGTHS):
            alone, _ = per_sequence_log_weights(storn, x[i : i + 1, :steps], None, z[i : i + 1, :steps])
            torch.testing.assert_close(alone[0], log_w[i], rtol=1e-7, atol=1e-7)


def test_padded_steps_get_no_gradient():
    storn = _storn()
    x, mask = _batch()
    z = torch.randn(len(LENGTHS), T, Z, dtype=torch.float64, requires_grad=True)
    prior = storn.prior((len(LENGTHS),), T, mask, x)
    prior.log_prob(z)[1].backward()
    padded = ~mask[1]
    assert torch.equal(z.grad[1][padded], torch.zeros_like(z.grad[1][padded]))
    assert z.grad[1][~padded].abs().sum() > 0


def test_emission_shares_the_priors_decoder_pass():
    """One ELBO step runs the decoder RNN once, not once for the prior and once more for the
    emission."""
    storn = _storn(flow="iaf", flow_length=1)
    x, mask = _batch()
    calls = []
    storn.decoder_rnn.register_forward_hook(lambda *_: calls.append(1))
    loss = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        storn.model, storn.guide, x, mask)
    assert len(calls) == 1
    loss.backward()
    assert storn.prior_head.weight.grad.abs().sum() > 0
    calls.clear()
    terms, log_lik = sample_terms(storn, x, mask, 3)
    assert len(calls) == 1 and log_lik.shape == terms.log_prior.shape == (3, len(LENGTHS))


def test_generation_and_predictive_sample_the_learned_prior():
    storn = _storn().eval()
    x, mask = _batch()
    rolls = storn.generate(x[:, :2], 7, num_samples=2)
    assert rolls.shape == (2, len(LENGTHS), 7, D)
    assert set(rolls.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(rolls[:, :, :2], x[:, :2].expand(2, -1, -1, -1))
    draws = pyro.infer.Predictive(storn.model, num_samples=3, return_sites=("z",))(x, mask)
    assert draws["z"].shape == (3, len(LENGTHS), T, Z) and torch.isfinite(draws["z"]).all()


def test_the_prior_needs_the_sequences():
    with pytest.raises(ValueError, match="pass x"):
        _storn().prior((1,), 4)


def test_dropout_acts_in_training_only():
    storn = _storn(dropout=0.5)
    x, _ = _batch()
    z = torch.randn(len(LENGTHS), T, Z, dtype=torch.float64)
    storn.train()
    torch.manual_seed(0)
    first = storn.decode(x, z)[0]
    second = storn.decode(x, z)[0]
    assert not torch.equal(first, second)
    storn.eval()
    torch.testing.assert_close(storn.decode(x, z)[0], storn.decode(x, z)[0], rtol=0, atol=0)


@pytest.mark.parametrize("hidden,keys", [(0, {"emission_head.weight", "emission_head.bias"}),
                                         (5, {"emission_head.0.weight", "emission_head.4.bias"})])
def test_without_dropout_the_heads_keep_their_layout(hidden, keys):
    """Checkpoints written before prior and dropout existed still load."""
    names = set(STORN(D, Z, H, emission_hidden=hidden).state_dict())
    assert keys <= names and not any(name.startswith("prior_head") for name in names)


def test_config_rebuilds_prior_and_dropout():
    storn = _storn(dropout=0.25)
    twin = STORN(**storn.config()).double()
    twin.load_state_dict(storn.state_dict())
    assert (twin.prior_type, twin.dropout) == ("learned", 0.25)
    built = build_storn(D, TrainConfig(prior="learned", dropout=0.1, emission_hidden=4).validate())
    assert built.prior_head is not None and built.dropout == 0.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(prior="vrnn"), "unknown prior 'vrnn'"),
    (dict(dropout=1.0), "dropout must be a number in \\[0, 1\\), got 1.0"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=True), "dropout"),
])
def test_bad_prior_and_dropout_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STORN(D, Z, H, **kwargs)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs).validate()


def test_the_prior_scale_starts_at_one():  # the bias gives softplus(b) + floor = 1
    storn = STORN(D, Z, H, prior="learned").double()
    loc, scale = storn.prior_params(torch.zeros(1, H, dtype=torch.float64))
    assert torch.equal(loc, torch.zeros_like(loc))
    assert math.isclose(float(scale[0, 0].detach()), 1.0, rel_tol=1e-6)
