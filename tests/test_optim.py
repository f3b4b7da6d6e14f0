"""MultiTensorAdam makes the same updates as pyro.optim.Adam with clip_norm, and saves/restores."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_storn.optim import MultiTensorAdam
from pyro_storn.training import svi_step

OPTIM_ARGS = {"lr": 0.05, "betas": (0.9, 0.99)}
CLIP = {"clip_norm": 0.5}  # small: the clip is active for most tensors at most steps


def _program(extra_after: int):
    """A model/guide pair whose guide creates a new parameter at step ``extra_after``."""
    data = torch.randn(30, 3, dtype=torch.float64) * 4.0 + 2.0
    # plain pyro.param sites only: a resumed run restores them from the param store state
    steps = {"n": 0}

    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros(3, dtype=torch.float64), 10.0).to_event(1))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data)

    def guide():
        weight = pyro.param("weight", 0.3 * torch.eye(3, dtype=torch.float64) + 0.1)
        q_loc = pyro.param("q_loc", torch.zeros(3, dtype=torch.float64))
        q_scale = pyro.param("q_scale", torch.ones(3, dtype=torch.float64), constraint=dist.constraints.positive)
        shift = weight @ q_loc + 1.0
        if steps["n"] >= extra_after:
            shift = shift + pyro.param("late", torch.full((3,), 0.3, dtype=torch.float64))
        steps["n"] += 1
        pyro.sample("loc", dist.Normal(q_loc + shift, q_scale).to_event(1))

    return model, guide


def _run(make_optim, n_steps, *, extra_after=3, state=None, first_step=0):
    """``n_steps`` SVI steps from ``first_step``; every step draws its noise from its own seed,
    so a resumed run sees the noise an uninterrupted one would."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = _program(extra_after - first_step)
    optim = make_optim()
    elbo = pyro.infer.Trace_ELBO()
    if state is not None:
        param_state, optim_state = state
        pyro.get_param_store().set_state(param_state)
        optim.set_state(optim_state)
    for step in range(first_step, first_step + n_steps):
        torch.manual_seed(100 + step)
        svi_step(model, guide, optim, elbo)
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    return params, optim, pyro.get_param_store().get_state()


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)


def test_same_updates_as_pyros_adam_with_clip_norm_including_a_late_parameter():
    ours, _, _ = _run(lambda: MultiTensorAdam(OPTIM_ARGS, CLIP), 8)
    pyros, _, _ = _run(lambda: pyro.optim.Adam(OPTIM_ARGS, CLIP), 8)
    _close(ours, pyros)
    # and the clip mattered: without it the parameters end elsewhere
    unclipped, _, _ = _run(lambda: MultiTensorAdam(OPTIM_ARGS), 8)
    assert any((unclipped[k] - ours[k]).abs().max() > 1e-3 for k in ours)


@pytest.mark.parametrize("first", ["ours", "pyro"])
def test_state_round_trip_continues_like_an_uninterrupted_run(first):
    make_first = (lambda: MultiTensorAdam(OPTIM_ARGS, CLIP)) if first == "ours" else (lambda: pyro.optim.Adam(OPTIM_ARGS, CLIP))
    straight, _, _ = _run(lambda: MultiTensorAdam(OPTIM_ARGS, CLIP), 6, extra_after=2)
    # 4 steps, save (ours or Pyro's format), then 2 more with a fresh MultiTensorAdam
    _, optim, param_state = _run(make_first, 4, extra_after=2)
    resumed, _, _ = _run(
        lambda: MultiTensorAdam(OPTIM_ARGS, CLIP), 2, extra_after=2, state=(param_state, optim.get_state()), first_step=4
    )
    _close(resumed, straight)
    # and the restored moments mattered: a fresh optimiser state ends elsewhere
    cold, _, _ = _run(lambda: MultiTensorAdam(OPTIM_ARGS, CLIP), 2, extra_after=2, state=(param_state, {}), first_step=4)
    assert any((cold[k] - straight[k]).abs().max() > 1e-4 for k in straight)


def test_state_for_parameters_not_seen_yet_survives_get_state():
    optim = MultiTensorAdam(OPTIM_ARGS)
    optim.set_state({"format": "pyro_storn.MultiTensorAdam/1", "state": {"later": {"step": torch.tensor(3.0)}}})
    assert "later" in optim.get_state()["state"]


@pytest.mark.parametrize(
    "args, clip, match",
    [
        ({"lr": -1.0}, None, "learning rate"),
        ({"lr": 1e-3}, {"clip_norm": 0.0}, "clip_norm"),
        ({"lr": 1e-3}, {"clip_value": 1.0}, "clip_value"),
        ([1e-3], None, "optim_args"),
    ],
)
def test_bad_arguments_are_refused_by_name(args, clip, match):
    with pytest.raises(ValueError, match=match):
        MultiTensorAdam(args, clip)


def test_unrecognised_state_is_refused_by_name():
    with pytest.raises(ValueError, match="q_loc"):
        MultiTensorAdam({"lr": 1e-3}).set_state({"q_loc": 3})
