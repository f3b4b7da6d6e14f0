"""The one bounds path: chunked log-sum-exp, summaries per example and per frame, paired
differences, and STORN's and the VAE's evaluate_bounds going through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_storn import bounds


def fixed_draws(log_w: torch.Tensor):
    """``draw(s)`` handing out the rows of ``log_w`` in order, recording each call's size."""
    calls, position = [], [0]

    def draw(count: int) -> torch.Tensor:
        calls.append(count)
        rows = log_w[position[0] : position[0] + count]
        position[0] += count
        return rows

    return draw, calls


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 50])
def test_chunked_bounds_equal_the_direct_formulas(chunk):
    generator = torch.Generator().manual_seed(0)
    # log-weights far below 0 (as for images): a naive exp would underflow to 0.
    log_w = -800.0 + 30.0 * torch.randn(23, 5, generator=generator, dtype=torch.float64)
    draw, calls = fixed_draws(log_w)
    result = bounds.log_weight_bounds(draw, 23, chunk)
    assert sum(calls) == 23 and all(c == (chunk or 23) for c in calls[:-1])
    np.testing.assert_allclose(result["neg_iwae"], -(torch.logsumexp(log_w, 0) - math.log(23)),
                               rtol=1e-13)
    np.testing.assert_allclose(result["neg_elbo"], -log_w.mean(0), rtol=1e-13)
    np.testing.assert_allclose(result["log_weight_var"], log_w.var(0), rtol=1e-9)
    assert torch.all(torch.isfinite(result["neg_iwae"]))
    assert torch.all(result["neg_iwae"] <= result["neg_elbo"])


def test_one_sample_bounds_coincide():
    log_w = torch.tensor([[-3.0, -1.5]], dtype=torch.float64)
    result = bounds.log_weight_bounds(fixed_draws(log_w)[0], 1)
    np.testing.assert_allclose(result["neg_iwae"], result["neg_elbo"])
    assert torch.all(result["log_weight_var"] == 0)


def test_bad_sample_counts_are_named():
    with pytest.raises(ValueError, match="num_samples"):
        bounds.log_weight_bounds(lambda s: torch.zeros(s, 2), 0)
    with pytest.raises(ValueError, match="chunk"):
        bounds.log_weight_bounds(lambda s: torch.zeros(s, 2), 3, 0)


def test_samples_per_chunk():
    assert bounds.samples_per_chunk(7, 23, 21) == 3
    assert bounds.samples_per_chunk(100, 5000, 10_000) == 100
    assert bounds.samples_per_chunk(20_000, 5000, 10_000) == 1
    assert bounds.samples_per_chunk(1, 5, 10_000) == 5


def test_summaries_per_example_and_per_frame():
    neg_elbo, neg_iwae = np.array([10.0, 20.0, 30.0]), np.array([9.0, 18.0, 29.0])
    frames = np.array([1, 2, 7])
    out = bounds.summarize(neg_elbo, neg_iwae, 50, count_name="n_sequences", n_frames=frames)
    assert out["n_sequences"] == 3 and out["num_samples"] == 50
    assert out["neg_elbo_mean"] == 20.0 and out["neg_iwae_mean"] == pytest.approx(56 / 3)
    assert out["neg_elbo_se"] == pytest.approx(10.0 / math.sqrt(3))
    assert out["neg_elbo_per_step"] == pytest.approx(60 / 10)
    assert out["neg_iwae_per_step"] == pytest.approx(56 / 10)
    per_image = bounds.summarize(neg_elbo, neg_iwae, 50, count_name="n_images")
    assert "neg_elbo_per_step" not in per_image and per_image["n_images"] == 3
    assert math.isnan(bounds.summarize(neg_elbo[:1], neg_iwae[:1], 5)["neg_elbo_se"])


def test_paired_difference_cancels_the_examples_spread():
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 50, 400)           # images differ a lot...
    noise = rng.normal(0, 0.1, 400)
    mean, se = bounds.paired_difference(spread - 1.0 + noise, spread)  # ...the models by 1
    assert abs(mean + 1.0) < 4 * se and se < 0.02
    with pytest.raises(ValueError, match="same examples"):
        bounds.paired_difference(np.zeros(3), np.zeros(4))


def test_storn_and_vae_bounds_come_from_the_one_path(monkeypatch):
    from pyro_storn import STORN, VAE
    from pyro_storn.evaluation import evaluate_bounds as storn_bounds
    from pyro_storn.vae_fit import evaluate_bounds as vae_bounds

    seen = []
    original = bounds.log_weight_bounds

    def recording(draw, num_samples, chunk=None):
        seen.append(num_samples)
        return original(draw, num_samples, chunk)

    monkeypatch.setattr(bounds, "log_weight_bounds", recording)
    torch.manual_seed(0)
    storn = STORN(input_dim=2, latent_dim=2, hidden_dim=8)
    x = torch.randn(3, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out = storn_bounds(storn, x, mask, num_samples=7)
    assert seen == [7] and out["n_steps"].tolist() == [3, 5, 5]
    assert out["neg_elbo_per_step"] == pytest.approx(out["neg_elbo"].sum() / 13)
    assert np.all(out["neg_iwae"] <= out["neg_elbo"]) and "neg_iwae_se" in out
    vae = VAE(input_dim=6, latent_dim=2, hidden_dims=(8,))
    images = torch.bernoulli(torch.full((4, 6), 0.5))
    out = vae_bounds(vae, images, num_samples=9)
    assert seen == [7, 9] and out["n_images"] == 4 and np.all(out["neg_iwae"] <= out["neg_elbo"])
