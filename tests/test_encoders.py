"""STORN's encoders: what each state sees (forward x_{1:t}, backward x_{t:T}, bidirectional all),
reversal within each sequence's length, parameter names and state sizes, and the flow's context."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_storn import STORN
from pyro_storn.storn import ENCODERS

B, T, D, Z, H = 2, 8, 3, 2, 5
PROBE = 4  # the step whose input is changed


def _storn(encoder: str, **kwargs) -> STORN:
    pyro.set_rng_seed(0)
    return STORN(D, Z, H, encoder=encoder, **kwargs).double()


def _changed_states(storn: STORN, mask=None) -> torch.Tensor:
    """Which steps' encoder states move when x at PROBE changes: (T,) bool."""
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_changed = x.clone()
    x_changed[:, PROBE] += 1.0
    with torch.no_grad():
        before, after = storn.encode(x, mask)[2], storn.encode(x_changed, mask)[2]
    return (before != after).any(-1).any(0)


@pytest.mark.parametrize("encoder,sees", [
    ("forward", lambda t: t >= PROBE),
    ("backward", lambda t: t <= PROBE),
    ("bidirectional", lambda t: True),
])
def test_each_state_sees_what_its_encoder_promises(encoder, sees):
    changed = _changed_states(_storn(encoder))
    assert changed.tolist() == [bool(sees(t)) for t in range(T)]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padding_reaches_no_observed_state(encoder):
    """Changing a padded step's value (and the padding's length) changes no observed state."""
    storn = _storn(encoder)
    x = torch.randn(B, T, D, dtype=torch.float64)
    lengths = torch.tensor([T, 5])
    mask = torch.arange(T) < lengths[:, None]
    x_other = x.clone()
    x_other[~mask] = 1e3
    with torch.no_grad():
        state = storn.encode(x, mask)[2]
        state_other = storn.encode(x_other, mask)[2]
        alone = storn.encode(x[1:, :5])[2]
    assert torch.equal(state[mask], state_other[mask])
    torch.testing.assert_close(state[1, :5], alone[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoder,names,state_dim", [
    ("forward", {"encoder_rnn"}, H),
    ("backward", {"encoder_rnn_backward"}, H),
    ("bidirectional", {"encoder_rnn", "encoder_rnn_backward"}, 2 * H),
])
def test_parameters_and_state_sizes(encoder, names, state_dim):
    storn = _storn(encoder, flow="planar", flow_length=1)
    encoders = {name.split(".")[0] for name, _ in storn.named_parameters()
                if name.startswith("encoder_rnn")}
    assert encoders == names
    assert storn.encoder_state_dim == state_dim
    loc, scale, state = storn.encode(torch.zeros(B, T, D, dtype=torch.float64))
    assert loc.shape == scale.shape == (B, T, Z) and state.shape == (B, T, state_dim)
    # the flow is conditioned on the encoder state
    assert torch.isfinite(storn.posterior(torch.zeros(B, T, D, dtype=torch.float64)).rsample()).all()
    rebuilt = STORN(**storn.config())
    assert rebuilt.encoder_type == encoder
    rebuilt.double().load_state_dict(storn.state_dict())


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(ValueError, match="unknown encoder 'sideways'.*forward, backward, bidirectional"):
        STORN(D, encoder="sideways")


@pytest.mark.parametrize("rnn", ["lstm", "rnn"])
def test_backward_encoder_with_other_cells(rnn):
    storn = _storn("bidirectional", rnn=rnn)
    mask = torch.arange(T) < torch.tensor([T, 3])[:, None]
    loss = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        storn.model, storn.guide, torch.randn(B, T, D, dtype=torch.float64), mask)
    assert torch.isfinite(loss)
    assert STORN(**storn.config()).rnn_type == rnn
