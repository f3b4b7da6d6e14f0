"""Starting a flow at the identity (``transforms.start_at_identity``, ``TrainConfig.flow_start``,
``train --flow-start identity``): the flow is then exactly the identity map with log-det 0, plain
or conditional; it leaves the identity after one step; what cannot start there is refused before
anything changes; and a flow guide warm-started this way has exactly its source's guide."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

import transforms
from pyro_storn.evaluation import sample_terms
from pyro_storn.runs import TrainConfig, build_storn, train, warm_start
from random_walks import random_walk_data

DIM, CONTEXT = 4, 3


def _flow(name: str, length: int, conditional: bool, **kwargs):
    flow = transforms.flow(name, DIM, length, context_dim=CONTEXT if conditional else None, **kwargs)
    return flow.double()


def _applied(flow, conditional: bool, context: torch.Tensor):
    return flow.condition(context) if conditional else flow


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("name", transforms.STARTS_AT_IDENTITY)
def test_the_flow_is_the_identity_with_log_det_zero(name, conditional):
    torch.manual_seed(0)
    flow = _flow(name, 3, conditional)
    x = torch.randn(16, DIM, dtype=torch.float64)
    context = torch.randn(16, CONTEXT, dtype=torch.float64)
    before = _applied(flow, conditional, context)(x)
    assert not torch.allclose(before, x)  # the random initialisation is not the identity
    assert transforms.start_at_identity(flow) is flow
    transform = _applied(flow, conditional, context)
    x = x.clone()  # a fresh tensor: Pyro transforms cache the last pair by identity
    y = transform(x)
    assert torch.equal(y, x)
    assert torch.equal(transform.log_abs_det_jacobian(x, y), torch.zeros(16, dtype=torch.float64))
    assert torch.equal(transform.inv(x.clone()), x)  # the exact inverse, at a fresh point


@pytest.mark.parametrize("name", transforms.STARTS_AT_IDENTITY)
def test_one_step_moves_it_off_the_identity(name):
    torch.manual_seed(1)
    flow = transforms.start_at_identity(_flow(name, 3, conditional=False))
    x = torch.randn(32, DIM, dtype=torch.float64)
    target = torch.randn(32, DIM, dtype=torch.float64)
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.1)
    ((flow(x) - target) ** 2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    optimizer.step()
    assert not torch.allclose(flow(x.clone()), x)


def test_a_single_layer_starts_at_the_identity_too():
    torch.manual_seed(2)
    layer = transforms.build("iaf", DIM).double()
    x = torch.randn(8, DIM, dtype=torch.float64)
    assert torch.equal(transforms.start_at_identity(layer)(x), x)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_permutations_that_do_not_cancel_are_refused_and_nothing_changes():
    torch.manual_seed(3)
    flow = _flow("iaf", 2, conditional=False)  # iaf, reversal, iaf: a reversal remains
    state = _state(flow)
    with pytest.raises(ValueError, match=r"compose to \[3, 2, 1, 0\], not the identity.*odd length"):
        transforms.start_at_identity(flow)
    assert all(torch.equal(flow.state_dict()[k], v) for k, v in state.items())
    # RealNVP rolls by its split (2 of 4): two rolls cancel, one does not
    transforms.start_at_identity(_flow("realnvp", 3, conditional=True))
    with pytest.raises(ValueError, match="not the identity"):
        transforms.start_at_identity(_flow("realnvp", 2, conditional=True))


def test_layers_without_an_identity_start_are_named_before_anything_changes():
    torch.manual_seed(4)
    mixed = ComposeTransformModule([transforms.build("iaf", DIM), transforms.build("planar", DIM)])
    state = _state(mixed)
    with pytest.raises(ValueError, match="Planar has no identity start.*iaf, maf, nice, realnvp"):
        transforms.start_at_identity(mixed)
    assert all(torch.equal(mixed.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="ConditionalRadial has no identity start"):
        transforms.start_at_identity(transforms.flow("radial", DIM, 1, context_dim=CONTEXT))
    for conditional in (False, True):
        with pytest.raises(ValueError, match="gated=True cannot start at the identity"):
            transforms.start_at_identity(_flow("iaf", 1, conditional, gated=True))


def test_the_config_names_a_bad_flow_start():
    with pytest.raises(ValueError, match="flow_start must be one of random, identity, got 'zero'"):
        TrainConfig(flow_start="zero").validate()
    with pytest.raises(ValueError, match=r"needs a flow that can start at the identity.*'planar'"):
        TrainConfig(flow="planar", flow_length=1, flow_start="identity").validate()
    with pytest.raises(ValueError, match="got flow 'none'"):
        TrainConfig(flow_start="identity").validate()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("identity_start") / "plain"
    config = TrainConfig(hidden_dim=6, epochs=2, batch_size=4, lr=3e-2, seed=1)
    train(random_walk_data(12, 4, 6, 2, seed=4), run, config, progress=False)
    return run


@pytest.mark.parametrize("flow, length", [("iaf", 3), ("realnvp", 1)])
def test_a_warm_started_flow_guide_is_exactly_its_sources_guide(plain_run, flow, length):
    data = random_walk_data(12, 4, 6, 2, seed=4)
    x, mask = torch.from_numpy(data.x_test), torch.from_numpy(data.mask_test)
    models = {}
    for name, config in {
        "plain": TrainConfig(hidden_dim=6),
        "flow": TrainConfig(hidden_dim=6, flow=flow, flow_length=length, flow_start="identity"),
        "random": TrainConfig(hidden_dim=6, flow=flow, flow_length=length),
    }.items():
        storn = build_storn(2, config)
        storn.set_data_statistics(torch.from_numpy(data.x), torch.from_numpy(data.mask))
        warm_start(storn, plain_run)
        models[name] = storn
    results = {}
    for name, storn in models.items():
        pyro.set_rng_seed(5)
        with torch.no_grad():
            terms, log_lik = sample_terms(storn, x, mask, 3)
        results[name] = (terms.kl, log_lik)
    for plain, flow_guide in zip(results["plain"], results["flow"]):
        torch.testing.assert_close(flow_guide, plain, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(results["random"][1], results["plain"][1])  # the check can fail


def test_the_cli_trains_from_the_identity_and_refuses_what_cannot_start_there(tmp_path, capsys):
    import json

    from pyro_storn.cli import main

    data = tmp_path / "d.npz"
    assert main(["simulate", "--out", str(data), "--n-sequences", "8", "--n-steps", "5"]) == 0
    common = ["train", "--data", str(data), "--hidden-dim", "6", "--epochs", "1", "--quiet"]
    source = tmp_path / "plain"
    assert main(common + ["--out", str(source)]) == 0
    run = tmp_path / "iaf"
    assert main(common + ["--out", str(run), "--flow", "iaf", "--flow-length", "3",
                          "--flow-start", "identity", "--init-from", str(source)]) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["flow_start"] == "identity" and "init_from" in record
    capsys.readouterr()
    for flow, length, message in (("planar", "1", "needs a flow that can start at the identity"),
                                  ("iaf", "2", "not the identity")):
        out = tmp_path / f"refused_{flow}_{length}"
        assert main(common + ["--out", str(out), "--flow", flow, "--flow-length", length,
                              "--flow-start", "identity"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
        assert not out.exists()
