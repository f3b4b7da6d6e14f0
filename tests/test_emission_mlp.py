"""STORN's optional MLP emission of [h_t, z_t] (``emission_hidden``): z_t reaches the emission
directly, the module rebuilds from its config, generation runs, bad widths are refused."""

from __future__ import annotations

import pytest
import torch

from pyro_storn import STORN


def test_mlp_emission_reads_z_directly():
    storn = STORN(4, 3, 8, emission="bernoulli", encoder="backward", emission_hidden=6)
    with torch.no_grad():  # cut z's path through the decoder RNN: only the emission's is left
        storn.decoder_rnn.weight_ih_l0[:, 4:].zero_()
    x = torch.bernoulli(torch.full((2, 5, 4), 0.5))
    z = torch.randn(2, 5, 3, requires_grad=True)
    (logits,) = storn.decode(x, z)
    logits[0, 2].sum().backward()
    assert z.grad[0, 2].abs().sum() > 0  # the step's own z_t, through the MLP
    assert torch.equal(z.grad[0, 3:], torch.zeros_like(z.grad[0, 3:]))  # later z_t: none
    assert torch.equal(z.grad[1], torch.zeros_like(z.grad[1]))  # other sequences: none


def test_linear_emission_is_storns():
    storn = STORN(4, 3, 8)
    assert isinstance(storn.emission_head, torch.nn.Linear)
    assert storn.emission_head.in_features == 8


def test_mlp_emission_rebuilds_from_config_and_generates():
    torch.manual_seed(0)
    storn = STORN(4, 3, 8, emission="bernoulli", emission_hidden=6)
    twin = STORN(**storn.config())
    twin.load_state_dict(storn.state_dict())
    x = torch.bernoulli(torch.full((2, 5, 4), 0.5))
    z = torch.randn(2, 5, 3)
    torch.testing.assert_close(twin.decode(x, z)[0], storn.decode(x, z)[0])
    rolls = storn.generate(x[:, :2], 7, num_samples=3)
    assert rolls.shape == (3, 2, 7, 4)
    assert set(rolls.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_emission_hidden_is_named(bad):
    with pytest.raises(ValueError, match="emission_hidden"):
        STORN(4, 3, 8, emission_hidden=bad)
