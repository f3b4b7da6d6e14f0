"""STORN with a Bernoulli emission: the logits head and its likelihood, refusal of non-binary data,
piano-roll generation and per-note probabilities, checkpoints and the figure (learning: in
test_storn.py)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_storn import STORN
from pyro_storn.plots import plot_piano_roll

B, T, D, Z, H = 6, 10, 12, 2, 16


def _rolls(seed: int = 0, n: int = B) -> torch.Tensor:
    """Piano-roll-like data: a few notes held for a few steps."""
    generator = torch.Generator().manual_seed(seed)
    notes = torch.randint(0, D, (n, T // 2, 3), generator=generator)
    rolls = torch.zeros(n, T // 2, D).scatter_(-1, notes, 1.0)
    return rolls.repeat_interleave(2, dim=1)


def _storn(**kwargs) -> STORN:
    pyro.set_rng_seed(0)
    storn = STORN(D, Z, H, emission="bernoulli", **kwargs)
    storn.set_data_statistics(_rolls())
    return storn


def test_logits_head_and_likelihood():
    storn = _storn()
    assert storn.emission_head.out_features == D
    # the networks read the 0/1 values as they are
    assert torch.equal(storn.data_loc, torch.zeros(D)) and torch.equal(storn.data_scale, torch.ones(D))
    x = _rolls()
    mask = torch.arange(T) < torch.tensor([T, 4, T, 7, T, 1])[:, None]
    z = torch.randn(B, T, Z)
    (logits,) = storn.decode(x, z, mask)
    expected = dist.Bernoulli(logits=logits).log_prob(x).masked_fill(~mask[..., None], 0).sum((-1, -2))
    torch.testing.assert_close(storn.emission(x, z, mask).log_prob(storn.clean(x, mask)), expected)


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_non_binary_data_is_refused_with_its_place(value):
    storn = _storn()
    x = _rolls()
    x[2, 3, 5] = value
    with pytest.raises(ValueError, match=r"emission='bernoulli' models 0/1 data; x\[2, 3, 5\]"):
        pyro.infer.Trace_ELBO().differentiable_loss(storn.model, storn.guide, x)
    with pytest.raises(ValueError, match="0/1 data"):
        storn.set_data_statistics(x)
    # ... but only where the step is observed
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    assert torch.isfinite(pyro.infer.Trace_ELBO().differentiable_loss(storn.model, storn.guide, x, mask))


def test_unknown_emission_lists_the_choices():
    with pytest.raises(ValueError, match="unknown emission 'poisson'.*normal, bernoulli"):
        STORN(D, emission="poisson")


def test_generate_samples_piano_rolls():
    storn = _storn()
    x = _rolls()
    rolls = storn.generate(x[:2, :3], n_steps=T, num_samples=4)
    assert rolls.shape == (4, 2, T, D)
    assert set(rolls.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(rolls[:, :, :3], x[:2, :3].expand(4, 2, 3, D))
    means = storn.generate(x[:2, :3], n_steps=T, num_samples=2, sample_observations=False)
    assert ((means[:, :, 3:] > 0) & (means[:, :, 3:] < 1)).all()  # probabilities
    with pytest.raises(ValueError, match="0/1 data"):
        storn.generate(x[:2, :3] * 0.5, n_steps=T)


def test_step_probabilities():
    storn = _storn(flow="planar", flow_length=1)
    x = _rolls()
    mask = torch.arange(T) < torch.tensor([T, 4, T, 7, T, 1])[:, None]
    probs = storn.step_probabilities(x, mask, num_samples=3)
    assert probs.shape == (B, T, D)
    assert ((probs > 0) & (probs < 1))[mask].all() and (probs[~mask] == 0).all()
    with pytest.raises(ValueError, match="emission='bernoulli'"):
        STORN(D, Z, H).step_probabilities(x)


def test_config_rebuilds_the_bernoulli_model():
    storn = _storn(encoder="bidirectional", flow="conv_planar", flow_length=1)
    rebuilt = STORN(**storn.config())
    rebuilt.load_state_dict(storn.state_dict())
    assert rebuilt.emission_type == "bernoulli" and rebuilt.encoder_type == "bidirectional"
    x = _rolls()
    pyro.set_rng_seed(5)
    a = storn.step_probabilities(x)
    pyro.set_rng_seed(5)
    torch.testing.assert_close(rebuilt.step_probabilities(x), a)


def test_piano_roll_figure(tmp_path):
    storn = _storn()
    x = _rolls()
    generated = storn.generate(x[0, :3], n_steps=T, num_samples=2)
    probs = storn.step_probabilities(x[:1])[0]
    path = plot_piano_roll(x[0].numpy(), generated.numpy(), probs.numpy(), tmp_path / "roll.png",
                           n_prefix=3, title="test")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="must match"):
        plot_piano_roll(x[0].numpy(), generated.numpy(), probs[:3].numpy(), tmp_path / "bad.png")
