"""Every registered per-vector flow works inside Pyro's AutoNormalizingFlow.

The parametrisation comes from the registry (``transforms.available(event_dim=1)``), so a newly
registered flow is covered the moment it is registered.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

import transforms
from example_scripts import load_example
from pyro_storn.autoguide_study import (
    GuideResult,
    SVISettings,
    final_elbo,
    fit_and_judge,
    guide_builders,
    prefixed_factory,
    verdict,
    write_page,
)
from pyro_storn.diagnostics import draw_importance_samples, summarize_importance
from pyro_storn.targets import Target

PER_VECTOR_FLOWS = transforms.available(event_dim=1)
NUM_OBS = 4


def small_model(data: torch.Tensor) -> None:
    """Three latent dims (a 2-vector location, a positive scale) and a plate of observations:
    AutoNormalizingFlow's flow acts on the 3-dim unconstrained latent vector."""
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("obs", data.shape[0]):
        pyro.sample("y", dist.Normal(loc, scale.unsqueeze(-1)).to_event(1), obs=data)


@pytest.fixture
def data() -> torch.Tensor:
    return torch.tensor([[0.5, -0.2], [1.0, 0.3], [0.2, 0.1], [0.8, -0.4]])


def test_registry_has_per_vector_flows():
    assert PER_VECTOR_FLOWS, "no per-vector flow registered"
    assert "planar" in PER_VECTOR_FLOWS


@pytest.mark.parametrize("name", PER_VECTOR_FLOWS)
def test_flow_in_auto_normalizing_flow_trains_and_predicts(name, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(small_model, transforms.factory(name, length=2))
    svi = SVI(small_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses), losses

    # The flow's parameters are the guide's, and training moved them.
    flow_params = [p for n, p in guide.named_parameters() if "transform" in n]
    assert flow_params, f"flow {name!r} registered no parameters with the guide"

    samples = Predictive(small_model, guide=guide, num_samples=7)(data)
    assert samples["loc"].shape == (7, 1, 2) or samples["loc"].shape == (7, 2)
    assert samples["scale"].reshape(7).gt(0).all()
    assert samples["y"].shape[-2:] == data.shape
    for value in samples.values():
        assert torch.isfinite(value).all()

    # Vectorised importance draws through the flow: finite log-weights, finite k-hat.
    draws = draw_importance_samples(small_model, guide, data, num_samples=64)
    assert torch.isfinite(draws.log_weights).all()
    assert np.isfinite(summarize_importance(draws).khat)


def test_factory_rejects_sequence_flows():
    sequence_flows = transforms.available(event_dim=2)
    if not sequence_flows:
        pytest.skip("no event-dim-2 flow registered")
    with pytest.raises(ValueError, match="per-vector"):
        transforms.factory(sequence_flows[0], length=2)


def test_guide_builders_name_each_guide_and_skip_unregistered_flows():
    with pytest.warns(UserWarning, match="'no_such_flow' not registered"):
        builders = guide_builders(["planar", "actnorm+radial", "no_such_flow"], {"planar": 3})
    assert list(builders) == ["AutoNormal", "AutoMultivariateNormal", "planar x3", "actnorm + radial x4"]
    # the prefix is one layer applied before the flow's own layers
    prefix, flow = prefixed_factory(["actnorm"], "radial", 4)(3).parts
    assert type(prefix) is type(transforms.build("actnorm", 3))
    assert len(list(flow.parts)) == 4


def test_final_elbo_averages_the_last_tenth_of_the_steps():
    assert final_elbo([5.0] * 18 + [1.0, 3.0]) == -2.0
    assert final_elbo([4.0, 2.0]) == -2.0  # at least the last step


def _result(target, guide, khat, iwae=-0.01):
    return GuideResult(target, guide, -1.0, khat, iwae, 50.0, 1.0, 1.0)


def test_verdict_names_the_flows_that_pass_and_those_that_miss_mass():
    results = [_result("funnel", "AutoNormal", 0.9), _result("funnel", "AutoMultivariateNormal", 0.4),
               _result("funnel", "planar x2", 1.2), _result("funnel", "iaf x2", 0.3, iwae=-0.5)]
    (line,) = verdict(results)
    assert line.startswith("- **funnel**: AutoNormal k-hat 0.90 (above 0.7)")
    assert "flows below 0.7: iaf x2; flows at or above: planar x2." in line
    assert "Caution: iaf x2 pass(es) k-hat" in line


def test_the_page_marks_high_khats_and_failed_fits(tmp_path):
    results = [_result("banana", "AutoNormal", 0.9),
               GuideResult.failed("banana", "planar x2", "non-finite loss at step 3", 0.5, 0.25)]
    page = write_page(tmp_path / "page.md", results, [tmp_path / "figures" / "pair_banana.png"],
                      SVISettings(steps=10, particles=2, lr=0.01, draws=100), "python x.py", 3.0, 2.0)
    text = page.read_text()
    assert "| banana | AutoNormal | -1.000 | 0.900 **>0.7** | -0.010 | 50 / 100 | 1.0 | 1.0 |" in text
    assert "| banana | planar x2 | non-finite loss at step 3 |" in text
    assert "- Command: `python x.py`" in text and "![pair_banana](figures/pair_banana.png)" in text


def test_a_fit_whose_loss_turns_non_finite_is_reported_not_raised():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("broken", x * 0.0 - math.inf)  # a valid factor, an infinite loss

    target = Target("broken", model, lambda n, generator: {}, ("x", "x"), "no density")
    result, idata = fit_and_judge(target, "AutoNormal", AutoNormal,
                                  SVISettings(steps=5, particles=2, lr=0.01, draws=10))
    assert result.status == "non-finite loss at step 0" and idata is None
    assert math.isnan(result.khat)


def _load_example():
    return load_example("autoguide_flows.py")


def test_example_quick_run_writes_table_and_figures(tmp_path):
    example = _load_example()
    doc = tmp_path / "autoguide_flows.md"
    results = example.main(
        ["--quick", "--quiet", "--steps", "20", "--draws", "100", "--flows", "planar",
         "--out", str(tmp_path / "figures"), "--doc", str(doc)]
    )
    guides = {(r.target, r.guide) for r in results}
    for target in ("funnel", "banana"):
        for guide in ("AutoNormal", "AutoMultivariateNormal", "planar x2"):
            assert (target, guide) in guides
    # (No bound on the IWAE values here: with k-hat > 1 one estimate may sit above log Z = 0;
    # the IWAE itself is checked against an exact evidence in test_diagnostics.py.)
    assert all(r.status == "ok" and math.isfinite(r.khat) and math.isfinite(r.iwae) for r in results)
    text = doc.read_text()
    assert "| funnel | AutoNormal |" in text and "Command:" in text and "Seed: 0" in text
    for name in ("pair_funnel.png", "pair_banana.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0


def test_example_rejects_bad_arguments(capsys):
    example = _load_example()
    for argv in (["--funnel-dim", "1"], ["--targets", "donut"], ["--steps", "0"], ["--draws", "-2"]):
        with pytest.raises(SystemExit) as error:
            example.parse_args(argv)
        assert error.value.code == 2
