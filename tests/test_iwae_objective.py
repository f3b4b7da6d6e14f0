"""The IWAE training objective: minus the per-sequence importance-weighted bound at the draws it
makes, against Pyro's traces of the model and guide at the same draws; Jensen's inequality
against the ELBO of those draws; the KL weight; and training through the one loop and the CLI."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from storn_traces import moved_storn, padded_bernoulli_batch, per_sequence_log_weights

from pyro_storn import STORN
from pyro_storn.evaluation import sample_terms
from pyro_storn.iwae_objective import IWAEObjective

D, Z, H = 3, 2, 4
LENGTHS = (6, 4, 5)
T = max(LENGTHS)


def _storn(**kwargs) -> STORN:
    options = dict(emission="bernoulli", encoder="backward", prior="learned", flow="iaf",
                   flow_length=2)
    options.update(kwargs)
    return moved_storn(STORN, (D, Z, H), **options)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_bernoulli_batch(LENGTHS, D)


@pytest.mark.parametrize("flow", ["iaf", "conv_planar", None])
def test_the_objective_is_minus_the_iwae_of_pyros_log_weights_at_its_draws(flow):
    storn, (x, mask) = _storn(flow=flow, flow_length=2 if flow else 0), _batch()
    K = 4
    pyro.set_rng_seed(3)
    value = IWAEObjective(storn, K)(x, mask)
    pyro.set_rng_seed(3)
    draws = sample_terms(storn, x, mask, K)[0].zK.detach()
    log_w = torch.stack([per_sequence_log_weights(storn, x, mask, z=draws[k].clone())[0]
                         for k in range(K)])
    expected = -(torch.logsumexp(log_w, 0) - math.log(K)).sum()
    torch.testing.assert_close(value, expected, atol=1e-8, rtol=1e-10)


def test_it_is_below_the_elbo_of_the_same_draws_and_equals_it_at_one_draw():
    storn, (x, mask) = _storn(), _batch()
    for K in (1, 8):
        pyro.set_rng_seed(5)
        value = IWAEObjective(storn, K)(x, mask)
        pyro.set_rng_seed(5)
        terms, log_lik = sample_terms(storn, x, mask, K)
        neg_elbo = -(log_lik + terms.log_prior - terms.log_qK).mean(0).sum()
        if K == 1:
            torch.testing.assert_close(value, neg_elbo)
        else:
            assert value < neg_elbo  # log-mean-exp > mean unless every weight is equal


def test_the_kl_weight_scales_the_prior_and_guide_terms():
    storn, (x, mask) = _storn(), _batch()
    storn.kl_weight = 0.25
    pyro.set_rng_seed(7)
    value = IWAEObjective(storn, 3)(x, mask)
    pyro.set_rng_seed(7)
    terms, log_lik = sample_terms(storn, x, mask, 3)
    log_w = log_lik + 0.25 * (terms.log_prior - terms.log_qK)
    torch.testing.assert_close(value, -(torch.logsumexp(log_w, 0) - math.log(3)).sum())


def test_every_parameter_gets_a_gradient():
    storn, (x, mask) = _storn(), _batch()
    IWAEObjective(storn, 3)(x, mask).backward()
    missing = [name for name, p in storn.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing


def test_a_bad_sample_count_is_named():
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        IWAEObjective(_storn(), 0)


def test_the_cli_trains_and_resumes_with_it_and_records_it(pendulum, tmp_path):
    from pyro_storn.cli import main

    out = tmp_path / "run"
    common = ["train", "--data", str(pendulum), "--out", str(out), "--flow", "iaf",
              "--flow-length", "1", "--hidden-dim", "4", "--batch-size", "4", "--objective",
              "iwae", "--num-particles", "3", "--quiet"]
    assert main(common + ["--epochs", "1"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["objective"], config["num_particles"]) == ("iwae", 3)
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_an_unknown_objective_is_refused_naming_it(pendulum, tmp_path, capsys):
    from pyro_storn.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data", str(pendulum), "--out", str(out), "--objective", "renyi"])
    assert stop.value.code == 2 and "'renyi'" in capsys.readouterr().err
    assert not out.exists()


def test_per_example_noise_is_refused_before_anything_is_written(pendulum, tmp_path):
    from pyro_storn.data.sequences import load_sequences
    from pyro_storn.runs import TrainConfig, train

    config = TrainConfig(objective="iwae", num_particles=2, epochs=1, hidden_dim=4)
    with pytest.raises(ValueError, match="objective 'iwae'.*per-example noise"):
        train(load_sequences(pendulum), tmp_path / "run", config, example_noise=True)
    assert not (tmp_path / "run").exists()
