"""The flow density: change of variables with standardisation, the Pyro model, maximum-likelihood
fitting under a budget (torch and SVI engines agree), the NLL, the figures; and, marked slow, the
CNF against RealNVP on two moons."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import transforms
from pyro_storn.data import toy2d
from transforms.cnf import regulariser
from pyro_storn.density import (
    FlowDensity,
    animate_cnf,
    fit_density,
    make_density,
    plot_heatmap,
    plot_history,
    plot_panels,
    split,
    test_nll as nll_of,
)

SMALL_CNF = {"hidden_dims": (8, 8), "rtol": 1e-7, "atol": 1e-7}


def small_data(n: int = 200, seed: int = 0) -> torch.Tensor:
    return toy2d.two_moons(n, seed=seed, dtype=torch.float64)


def test_log_prob_is_change_of_variables_with_standardisation():
    torch.manual_seed(0)
    data = 3.0 * small_data() + torch.tensor([5.0, -2.0], dtype=torch.float64)
    density = make_density("cnf", data, 1, **SMALL_CNF)
    x = data[:7]
    flow = density.flow
    u = (x - density.loc) / density.scale
    z = flow.inv(u)
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    expected = base.log_prob(z) - flow.log_abs_det_jacobian(z, u) - density.scale.log().sum()
    torch.testing.assert_close(density.log_prob(x), expected)
    torch.testing.assert_close(density.loc, data.mean(0))
    # The round trip through the whole density (flow and standardisation).
    torch.testing.assert_close(density.to_data(density.to_base(x)), x, atol=1e-5, rtol=0)


def test_standardised_density_integrates_to_one():
    torch.manual_seed(1)
    data = 2.0 * small_data() + 1.0
    density = make_density("cnf", data, 1, hidden_dims=(8,), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for parameter in density.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    low, high = data.min(0).values - 6 * density.scale, data.max(0).values + 6 * density.scale
    axes = [torch.linspace(low[i].item(), high[i].item(), 150, dtype=torch.float64) for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        values = density.log_prob(grid).exp().reshape(150, 150)
    mass = torch.trapezoid(torch.trapezoid(values, axes[1], dim=1), axes[0])
    assert mass.item() == pytest.approx(1.0, abs=1e-2)


def test_model_observes_x_with_the_flow_density():
    torch.manual_seed(2)
    data = small_data(50)
    density = make_density("cnf", data, 1, **SMALL_CNF)
    trace = pyro.poutine.trace(density.model).get_trace(data)
    site = trace.nodes["x"]
    assert site["is_observed"] and isinstance(site["fn"], dist.TransformedDistribution)
    assert trace.log_prob_sum().item() == pytest.approx(density.log_prob(data).sum().item(), rel=1e-10)
    same_solver = {"rtol": SMALL_CNF["rtol"], "atol": SMALL_CNF["atol"]}
    assert nll_of(density, data, solver=same_solver) == pytest.approx(-density.log_prob(data).mean().item(), rel=1e-10)


def test_cnf_regulariser_needs_the_torch_engine():
    torch.manual_seed(3)
    data = small_data(50)
    density = make_density("cnf", data, 1, kinetic_weight=0.1, jacobian_weight=0.1, **SMALL_CNF)
    with pytest.raises(ValueError, match="engine='svi'"):
        fit_density(density, data, data, engine="svi", max_steps=1)
    with torch.enable_grad():
        density.log_prob(data)
    assert regulariser(density).item() > 0


def test_fit_improves_and_records_history():
    data = small_data(400)
    train, test = split(data, 0.25, seed=0)
    torch.manual_seed(4)
    density = make_density("cnf", train, 1, hidden_dims=(16, 16))
    before = nll_of(density, test)
    result = fit_density(
        density, train, test, max_seconds=60, max_steps=60, eval_every=1e9, batch_size=128, lr=1e-2,
        train_solver={"method": "rk4", "step_size": 0.5},
    )
    assert result.steps == 60
    assert result.history[-1].step == 60 and result.history[-1].nfe > 0
    assert result.test_nll < before - 0.2
    assert result.wall_time > 0 and result.eval_time > 0
    assert result.time_to(result.test_nll) == result.history[-1].wall_time
    assert result.time_to(-1e9) is None


def test_torch_and_svi_engines_take_the_same_step():
    """SVI with the empty guide is maximum likelihood: its first Adam step equals ours."""
    data = small_data(64)
    states = []
    for engine in ("torch", "svi"):
        torch.manual_seed(5)
        density = make_density("cnf", data, 1, hidden_dims=(8,), rtol=1e-8, atol=1e-8)
        fit_density(density, data, data, max_steps=1, max_seconds=60, batch_size=64, engine=engine, lr=1e-3)
        states.append({k: v.clone() for k, v in density.state_dict().items()})
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-7, rtol=1e-6)


def test_split_is_reproducible_and_disjoint():
    data = torch.arange(100.0).reshape(50, 2)
    train, test = split(data, 0.2, seed=3)
    again, _ = split(data, 0.2, seed=3)
    assert train.shape == (40, 2) and test.shape == (10, 2)
    assert torch.equal(train, again)
    assert set(train[:, 0].tolist()).isdisjoint(test[:, 0].tolist())


@pytest.mark.parametrize(
    "kwargs, word",
    [({"schedule": "linear"}, "linear"), ({"engine": "jax"}, "jax"), ({"max_seconds": -1}, "-1"), ({"batch_size": 0}, "0")],
)
def test_fit_rejects_bad_arguments(kwargs, word):
    data = small_data(20)
    density = FlowDensity(transforms.flow("cnf", 2, 1, hidden_dims=(4,)), 2)
    with pytest.raises(ValueError, match=word):
        fit_density(density, data, data, **kwargs)
    with pytest.raises(ValueError, match="1.5"):
        split(data, 1.5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        make_density("cnf", torch.zeros(5), 1)


def test_figures_are_written(tmp_path):
    torch.manual_seed(6)
    data = small_data(60)
    density = make_density("cnf", data, 1, hidden_dims=(8,))
    result = fit_density(density, data, data, max_steps=2, max_seconds=60, eval_every=1e9)
    plot_panels(density, data, str(tmp_path / "panels.png"), n_prior=50)
    plot_heatmap(density, data, str(tmp_path / "heat.png"), resolution=12)
    plot_history({"cnf": result}, str(tmp_path / "history.png"))
    animate_cnf(density, data, str(tmp_path / "flow.gif"), frames=3, n_samples=40, resolution=8)
    for name in ("panels.png", "heat.png", "history.png", "flow.gif"):
        assert (tmp_path / name).stat().st_size > 1000, name
    with pytest.raises(ValueError, match="found 2"):
        animate_cnf(make_density("cnf", data, 2, hidden_dims=(4,)), data, str(tmp_path / "x.gif"))


@pytest.mark.slow
def test_cnf_comes_within_005_nats_of_realnvp_on_two_moons():
    """The issue's goal, at a reduced scale of time: the CNF, with the same wall-clock budget as
    RealNVP, ends within 0.05 nats of RealNVP's test NLL on two moons (noise 0.05)."""
    if "realnvp" not in transforms.available():
        pytest.skip("realnvp is not registered")
    data = toy2d.two_moons(5000, seed=0)
    train, test = split(data, 0.2, seed=0)
    results = {}
    for name, length, flow_kwargs, fit_kwargs in [
        ("realnvp", 8, {"hidden_dims": (64, 64)}, {}),
        (
            "cnf", 1, {"hidden_dims": (64, 64), "kinetic_weight": 0.01, "jacobian_weight": 0.01},
            {"train_solver": {"method": "rk4", "step_size": 0.25}},
        ),
    ]:
        torch.manual_seed(0)
        density = make_density(name, train, length, **flow_kwargs)
        results[name] = fit_density(density, train, test, max_seconds=120, lr=5e-3, eval_every=30, **fit_kwargs)
    assert math.isfinite(results["cnf"].test_nll)
    assert results["cnf"].test_nll <= results["realnvp"].test_nll + 0.05, {
        k: v.test_nll for k, v in results.items()
    }
