"""Posterior diagnostics on a conjugate model whose posterior and evidence are known exactly.

Model: for each item i (plate "data", N items), z_i ~ N(0, I_2) and M replicate observations
x_ij ~ N(z_i, sigma^2 I_2) (nested plate "reps"). Posterior: z_i | x_i ~ N(m_i, s^2 I) with
s^2 = 1 / (1 + M / sigma^2), m_i = s^2 sum_j x_ij / sigma^2. Evidence, per coordinate:
(x_i1..x_iM) ~ N(0, sigma^2 I_M + 1 1^T).
"""

from __future__ import annotations

import errno
import math
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import psis_diagnostic

from pyro_storn import diagnostics
from pyro_storn.diagnostics import (
    draw_importance_samples,
    importance_ess,
    iwae_bound,
    pareto_khat,
    summarize_importance,
    to_inference_data,
)

NUM_ITEMS, NUM_REPS, LATENT_DIM, SIGMA = 6, 3, 2, 0.7


def model(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT_DIM), 1.0).to_event(1))
        with pyro.plate("reps", x.shape[1], dim=-1):
            # z has batch shape (data, 1): it broadcasts against the reps dim as it is.
            pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)


def posterior_params(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    variance = 1.0 / (1.0 + x.shape[1] / SIGMA**2)
    # (N, 1, D): the batch shape (data, 1) of z under the two plates.
    return (variance * x.sum(1) / SIGMA**2).unsqueeze(-2), math.sqrt(variance)


def make_guide(scale_factor: float = 1.0, shift: float = 0.0):
    def guide(x: torch.Tensor) -> None:
        mean, std = posterior_params(x)
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(mean + shift, std * scale_factor).to_event(1))

    return guide


def log_evidence(x: torch.Tensor) -> torch.Tensor:
    """(N,) exact log p(x_i)."""
    m = x.shape[1]
    cov = SIGMA**2 * torch.eye(m, dtype=x.dtype) + torch.ones(m, m, dtype=x.dtype)
    marginal = dist.MultivariateNormal(x.new_zeros(m), covariance_matrix=cov)
    return marginal.log_prob(x.transpose(1, 2)).sum(-1)  # (N, D) coordinates -> sum over D


@pytest.fixture
def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(NUM_ITEMS, 1, LATENT_DIM, generator=generator, dtype=torch.float64)
    return z + SIGMA * torch.randn(NUM_ITEMS, NUM_REPS, LATENT_DIM, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------- draws


def test_draws_shapes_and_item_plate(data):
    pyro.set_rng_seed(0)
    draws = draw_importance_samples(model, make_guide(), data, num_samples=50, predictive=True)
    assert draws.item_plate == "data"
    # z's batch shape is (data, 1): the size-1 dim no plate of z declares is dropped.
    assert draws.latents["z"].shape == (50, NUM_ITEMS, LATENT_DIM)
    assert draws.log_weights.shape == (50,)
    assert draws.log_weights_per_item.shape == (50, NUM_ITEMS)
    assert draws.log_likelihood["x"].shape == (50, NUM_ITEMS, NUM_REPS)
    assert draws.posterior_predictive["x"].shape == (50, NUM_ITEMS, NUM_REPS, LATENT_DIM)
    # Per-item weights partition the joint weight (all sites are local to an item).
    torch.testing.assert_close(draws.log_weights_per_item.sum(-1), draws.log_weights)


def test_draws_log_weights_match_direct_computation(data):
    guide = make_guide(scale_factor=0.8, shift=0.1)
    pyro.set_rng_seed(1)
    draws = draw_importance_samples(model, guide, data, num_samples=20)
    z = draws.latents["z"].reshape(20, NUM_ITEMS, 1, LATENT_DIM)
    mean, std = posterior_params(data)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum((-1, -2))
    log_lik = dist.Normal(z, SIGMA).log_prob(data).sum((-1, -2))
    log_q = dist.Normal(mean + 0.1, std * 0.8).log_prob(z).sum((-1, -2))
    expected = log_prior + log_lik - log_q  # (S, N)
    torch.testing.assert_close(draws.log_weights_per_item, expected)
    torch.testing.assert_close(
        draws.log_likelihood["x"], dist.Normal(z, SIGMA).log_prob(data).sum(-1)
    )


def test_vectorized_and_looped_draws_agree(data):
    guide = make_guide(scale_factor=0.9)
    pyro.set_rng_seed(3)
    vectorized = draw_importance_samples(model, guide, data, num_samples=8)
    pyro.set_rng_seed(3)
    looped = draw_importance_samples(model, guide, data, num_samples=8, vectorize=False)
    pyro.set_rng_seed(3)
    chunked = draw_importance_samples(model, guide, data, num_samples=8, particle_batch_size=4)
    assert looped.latents["z"].shape == vectorized.latents["z"].shape
    # Each scheme draws different z; each must score its own z the same way.
    for draws in (looped, chunked):
        z = draws.latents["z"].reshape(8, NUM_ITEMS, 1, LATENT_DIM)
        mean, std = posterior_params(data)
        expected = (
            dist.Normal(0.0, 1.0).log_prob(z).sum((-1, -2))
            + dist.Normal(z, SIGMA).log_prob(data).sum((-1, -2))
            - dist.Normal(mean, std * 0.9).log_prob(z).sum((-1, -2))
        )
        torch.testing.assert_close(draws.log_weights_per_item, expected)


def test_global_latent_has_no_item_weights():
    def global_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def global_guide(x):
        pyro.sample("mu", dist.Normal(x.mean(), 0.5))

    x = torch.randn(5)
    draws = draw_importance_samples(global_model, global_guide, x, num_samples=10)
    assert draws.item_plate is None and draws.log_weights_per_item is None
    with pytest.raises(ValueError, match="mu"):
        draw_importance_samples(global_model, global_guide, x, num_samples=10, item_plate="data")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_samples": 0}, {"num_samples": 10, "particle_batch_size": 3}, {"max_plate_nesting": -1}],
)
def test_bad_arguments_raise(data, kwargs):
    kwargs.setdefault("num_samples", 10)
    with pytest.raises(ValueError):
        draw_importance_samples(model, make_guide(), data, **kwargs)


# ---------------------------------------------------------------------------------- PSIS


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_exact_posterior_gives_constant_weights_and_exact_evidence(data, dtype, tol):
    data = data.to(dtype)
    pyro.set_rng_seed(0)
    draws = draw_importance_samples(model, make_guide(), data, num_samples=200)
    assert draws.log_weights.dtype == dtype
    summary = summarize_importance(draws)
    expected = log_evidence(data.double())
    # With q = p(z|x), log w = log p(x) for every draw.
    torch.testing.assert_close(
        draws.log_weights_per_item.double(), expected.expand(200, NUM_ITEMS), rtol=0, atol=tol
    )
    np.testing.assert_allclose(summary.iwae_per_item, expected.numpy(), atol=tol)
    assert summary.iwae == pytest.approx(float(expected.sum()), abs=10 * tol)
    assert summary.elbo == pytest.approx(float(expected.sum()), abs=10 * tol)
    np.testing.assert_allclose(summary.ess_per_item, 200.0, rtol=tol)
    assert summary.ess == pytest.approx(200.0, rel=tol)
    # Constant weights: k-hat is at its lower limit, not "too few tail draws" (+inf).
    np.testing.assert_array_equal(summary.khat_per_item, -np.inf)
    assert summary.num_items_above() == 0


def test_too_narrow_guide_has_high_khat(data):
    pyro.set_rng_seed(0)
    draws = draw_importance_samples(model, make_guide(scale_factor=0.25), data, num_samples=2000)
    summary = summarize_importance(draws)
    assert np.all(summary.khat_per_item > 0.7)
    assert summary.khat > 0.7
    assert summary.num_items_above() == NUM_ITEMS
    assert np.all(summary.ess_per_item < 0.2 * 2000)
    # A lower bound still (to Monte Carlo error): the IWAE cannot exceed log p(x) by much.
    assert np.all(summary.iwae_per_item < log_evidence(data).numpy() + 0.5)


def test_slightly_wide_guide_is_fine_and_iwae_tightens(data):
    pyro.set_rng_seed(0)
    draws = draw_importance_samples(model, make_guide(scale_factor=1.3), data, num_samples=2000)
    summary = summarize_importance(draws)
    evidence = log_evidence(data).numpy()
    assert np.all(summary.khat_per_item < 0.5)
    # ELBO < IWAE <= log p(x) (per item, up to a small Monte Carlo error on the last one).
    elbo_per_item = draws.log_weights_per_item.mean(0).numpy()
    assert np.all(elbo_per_item < summary.iwae_per_item)
    np.testing.assert_allclose(summary.iwae_per_item, evidence, atol=0.02)


def test_khat_agrees_with_pyro_psis_diagnostic(data):
    guide = make_guide(scale_factor=0.6, shift=0.05)
    pyro.set_rng_seed(7)
    expected = psis_diagnostic(model, guide, data, num_particles=1000, max_plate_nesting=2)
    pyro.set_rng_seed(7)
    draws = draw_importance_samples(model, guide, data, num_samples=1000)
    assert summarize_importance(draws).khat == pytest.approx(expected, abs=1e-6)


def test_khat_agrees_with_pyro_psis_diagnostic_on_autoguide():
    """A trained AutoNormal on a model without an item plate: same draws, same k-hat."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    def correlated():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(2.0 * a, 0.3))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(correlated)
    svi = SVI(correlated, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(100):
        svi.step()
    pyro.set_rng_seed(11)
    expected = psis_diagnostic(correlated, guide, num_particles=2000)
    pyro.set_rng_seed(11)
    draws = draw_importance_samples(correlated, guide, num_samples=2000)
    assert draws.item_plate is None
    assert summarize_importance(draws).khat == pytest.approx(expected, abs=1e-6)
    assert expected > 0.7  # mean field misses a 0.96 correlation badly


def test_psis_helpers_on_known_weights():
    log_w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 1e-300, 1e-300, 1e-300]], dtype=torch.float64).log()
    np.testing.assert_allclose(importance_ess(log_w), [4.0, 1.0], rtol=1e-9)
    np.testing.assert_allclose(iwae_bound(log_w), [0.0, 0.0], atol=1e-12)
    rng = np.random.default_rng(0)
    # Weights with a Pareto(1/k) tail: k-hat estimates k.
    for k in (0.3, 0.9):
        weights = rng.pareto(1.0 / k, size=20000) + 1.0
        assert pareto_khat(np.log(weights)) == pytest.approx(k, abs=0.1)
    with pytest.raises(ValueError):
        pareto_khat(np.zeros(1))


def test_summary_format_and_dict(data):
    pyro.set_rng_seed(0)
    summary = summarize_importance(
        draw_importance_samples(model, make_guide(0.25), data, num_samples=500)
    )
    text = summary.format()
    assert "PSIS k" in text and f"of {NUM_ITEMS} above 0.7" in text
    as_dict = summary.to_dict()
    assert as_dict["num_items"] == NUM_ITEMS and len(as_dict["khat_per_item"]) == NUM_ITEMS


# ---------------------------------------------------------------------------------- ArviZ


def test_inference_data_groups_dims_and_arviz_functions(data, tmp_path):
    pyro.set_rng_seed(0)
    idata = to_inference_data(
        model,
        make_guide(1.1),
        data,
        num_samples=400,
        dims={"z": ["item", "latent"], "x": ["item", "rep", "coordinate"]},
        coords={"latent": ["z1", "z2"]},
    )
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        assert group in idata.groups()
    posterior_z = idata.posterior["z"]
    assert posterior_z.dims == ("chain", "draw", "item", "latent")
    assert posterior_z.shape == (1, 400, NUM_ITEMS, LATENT_DIM)
    assert list(posterior_z["latent"].values) == ["z1", "z2"]
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "item", "rep")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "item", "rep", "coordinate")
    assert idata.observed_data["x"].dims == ("item", "rep", "coordinate")
    np.testing.assert_allclose(idata.observed_data["x"].values, data.numpy())
    assert idata.sample_stats["log_weight_item"].dims == ("chain", "draw", "item")
    np.testing.assert_allclose(
        idata.sample_stats["log_weight"].values,
        idata.sample_stats["lp"].values - idata.sample_stats["log_q"].values,
    )
    # The posterior means are those of the exact posterior (the guide is centred on it).
    mean, _ = posterior_params(data)
    np.testing.assert_allclose(posterior_z.mean(("chain", "draw")).values, mean.squeeze(1).numpy(), atol=0.06)

    summary = az.summary(idata, var_names=["z"], kind="stats")
    assert len(summary) == NUM_ITEMS * LATENT_DIM
    loo = az.loo(idata, var_name="x")
    assert np.isfinite(loo.elpd_loo)
    axes = az.plot_posterior(idata, var_names=["z"], coords={"item": [0]})
    assert np.size(axes) == LATENT_DIM
    az.plot_pair(idata, var_names=["z"], coords={"item": [0, 1]})
    import matplotlib.pyplot as plt

    plt.close("all")

    path = tmp_path / "posterior.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    np.testing.assert_allclose(loaded.posterior["z"].values, posterior_z.values)
    assert loaded.sample_stats.attrs["psis_khat"] == pytest.approx(idata.sample_stats.attrs["psis_khat"])


def test_inference_data_default_dims_use_plate_names(data):
    pyro.set_rng_seed(0)
    idata = to_inference_data(model, make_guide(), data, num_samples=20)
    assert idata.posterior["z"].dims == ("chain", "draw", "data", "z_dim_0")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data", "reps")
    assert idata.sample_stats["log_weight_item"].dims == ("chain", "draw", "data")


def test_inference_data_rejects_bad_dims(data):
    with pytest.raises(ValueError, match="z"):
        to_inference_data(model, make_guide(), data, num_samples=5, dims={"z": ["item"]})
    with pytest.raises(ValueError, match="nope"):
        to_inference_data(model, make_guide(), data, num_samples=5, dims={"nope": ["a"]})


def test_write_diagnostics_files(data, tmp_path):
    pyro.set_rng_seed(0)
    paths = diagnostics.write_diagnostics(
        tmp_path / "diag", model, make_guide(0.5), data, num_samples=300,
        dims={"z": ["item", "latent"], "x": ["item", "rep", "coordinate"]},
    )
    for kind in ("inference_data", "summary", "khat", "log_weights", "pair"):
        assert paths[kind].exists() and paths[kind].stat().st_size > 0
    import json

    summary = json.loads(paths["summary"].read_text())
    assert summary["num_items"] == NUM_ITEMS
    assert az.from_netcdf(str(paths["inference_data"])).posterior["z"].shape[1] == 300


@pytest.mark.parametrize("name", ["inference_data.nc", "importance.json"])
def test_write_diagnostics_torn_mid_write_keeps_the_old_file(data, tmp_path, monkeypatch,
                                                               disk_full, name):
    out = tmp_path / "diag"
    out.mkdir()
    old = {n: f"the previous {n}".encode() for n in ("inference_data.nc", "importance.json")}
    for n, content in old.items():
        (out / n).write_bytes(content)
    netcdf_paths = []
    if name == "inference_data.nc":
        def torn_netcdf(self, filename, *args, **kwargs):
            netcdf_paths.append(Path(filename))
            Path(filename).write_bytes(b"\x89HDF\r\n")  # a netCDF4 file's head, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(az.InferenceData, "to_netcdf", torn_netcdf)
    else:
        disk_full(name)
    pyro.set_rng_seed(0)
    with pytest.raises(OSError, match="No space left"):
        diagnostics.write_diagnostics(out, model, make_guide(0.5), data, num_samples=20)
    assert (out / name).read_bytes() == old[name]
    assert sorted(p.name for p in out.iterdir()) == sorted(old)  # no temporary left
    if netcdf_paths:  # written beside the file, under a name with its suffix
        assert netcdf_paths[0].parent == out and netcdf_paths[0].suffix == ".nc"


def test_scaled_sites_warn(data):
    def annealed_model(x):
        with pyro.poutine.scale(scale=0.5):
            model(x)

    def annealed_guide(x):
        with pyro.poutine.scale(scale=0.5):
            make_guide()(x)

    with pytest.warns(UserWarning, match="scaled"):
        draw_importance_samples(annealed_model, annealed_guide, data, num_samples=4)


def test_khat_of_log_weights_spread_over_thousands_of_nats_does_not_warn():
    import warnings

    rng = np.random.default_rng(1)
    # a guide far from the posterior: log-weights spread over ~5000 nats (expm1 would overflow)
    log_w = rng.standard_normal((3, 500)) * 1000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        khat = pareto_khat(log_w)
    assert khat.shape == (3,) and np.all(khat > 0.7)
    # the constant-weights test still holds just above and below its tolerance
    eps = np.finfo(np.float64).eps
    assert pareto_khat(np.array([0.0, 0.5 * np.sqrt(eps)] * 50))[()] == -np.inf
    assert pareto_khat(np.array([0.0, 4 * np.sqrt(eps)] * 50))[()] != -np.inf
