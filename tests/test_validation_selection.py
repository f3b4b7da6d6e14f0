"""Held-out validation sequences and best.pt: the split, the selection, resume, and who loads it."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_storn.checkpoint import load_checkpoint
from pyro_storn.cli import main
from pyro_storn.data.sequences import SequenceData
from random_walks import random_walk_data
from pyro_storn.report import format_table, run_summary
from pyro_storn.runs import (
    VALIDATION_METRIC,
    TrainConfig,
    evaluate_run,
    load_run,
    train,
    validation_split,
)
from pyro_storn.training import BEST_NAME, CHECKPOINT_NAME, Optimizer, fit, read_metrics

N, T, D = 20, 6, 2


def _data() -> SequenceData:
    return random_walk_data(N, 4, T, D, seed=1)


def _config(**kwargs) -> TrainConfig:
    values = dict(hidden_dim=6, epochs=5, batch_size=4, lr=3e-2, seed=2, validation_fraction=0.25)
    values.update(kwargs)
    return TrainConfig(**values)


def test_split_is_disjoint_complete_and_the_same_for_every_training_seed():
    fit_index, validation_index = validation_split(40, 0.25)
    assert len(validation_index) == 10 and len(fit_index) == 30
    assert sorted(torch.cat([fit_index, validation_index]).tolist()) == list(range(40))
    again = validation_split(40, 0.25)
    assert torch.equal(again[1], validation_index)  # not a function of any training seed
    assert len(validation_split(40, 0.0)[1]) == 0


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_a_fraction_that_leaves_a_split_empty_is_named(fraction):
    with pytest.raises(ValueError, match=f"validation_fraction {fraction} of 20"):
        validation_split(20, fraction)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, True, "0.2"])
def test_config_refuses_a_bad_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction must be a number in"):
        _config(validation_fraction=fraction).validate()


def test_best_pt_holds_the_state_of_the_lowest_validation_elbo(tmp_path):
    run = tmp_path / "run"
    result = train(_data(), run, _config(), progress=False)
    history = read_metrics(run)
    values = [r["validation/neg_elbo"] for r in history]
    assert all(np.isfinite(values))
    assert result.best_epoch == history[int(np.argmin(values))]["epoch"]
    best = load_checkpoint(run / BEST_NAME)
    assert best["epoch"] == result.best_epoch and best["value"] == min(values)
    assert best["metric"] == "validation/neg_elbo"

    record = json.loads((run / "config.json").read_text())
    assert record["data"]["n_train"] == N and record["data"]["n_validation"] == 5

    storn, loaded = load_run(run)
    assert loaded["checkpoint"] == {"which": "best", "epoch": result.best_epoch}
    for name, value in storn.state_dict().items():
        torch.testing.assert_close(value, best["module"][name], rtol=0, atol=0)
    _, last = load_run(run, checkpoint="last")
    assert last["checkpoint"] == {"which": "last", "epoch": 5}
    with pytest.raises(ValueError, match="checkpoint must be one of best, last, got 'first'"):
        load_run(run, checkpoint="first")


def test_best_differs_from_last_when_validation_gets_worse(tmp_path):
    """A learning rate high enough that the validation -ELBO does not fall monotonically: the
    selection must then pick an earlier epoch than the last (or the test could not fail)."""
    run, data, data_path = tmp_path / "run", _data(), tmp_path / "data.npz"
    np.savez(data_path, x=data.x, mask=data.mask, x_test=data.x_test, mask_test=data.mask_test)
    result = train(data, run, _config(epochs=8, lr=0.1), data_path=data_path, progress=False)
    values = [r["validation/neg_elbo"] for r in read_metrics(run)]
    assert int(np.argmin(values)) + 1 == result.best_epoch
    assert result.best_epoch < 8  # the premise (seeded): validation -ELBO rose at the end
    last = load_checkpoint(run / CHECKPOINT_NAME)["module"]
    best = load_checkpoint(run / BEST_NAME)["module"]
    assert any(not torch.equal(last[name], best[name]) for name in last)
    # the report's single-sample columns describe the evaluated (best) epoch, and say which
    evaluate_run(run, num_samples=3, psis_samples=None)
    summary = run_summary(run)
    chosen = read_metrics(run)[result.best_epoch - 1]
    assert summary["evaluated_epoch"] == result.best_epoch and summary["epochs"] == 8
    assert summary["kl"] == chosen["test/kl"] and summary["train_neg_elbo"] == chosen["train/neg_elbo"]
    assert f"| 8 (best {result.best_epoch}) |" in format_table({"run": summary})


def test_the_held_out_sequences_are_not_trained_on(tmp_path):
    """The normalising statistics come from the fit split only: changing a held-out sequence
    changes nothing in training, changing a fitted one does."""
    fit_index, validation_index = validation_split(N, 0.25)
    base, moved_validation, moved_fit = _data(), _data(), _data()
    moved_validation.x[validation_index[0]] += 100.0
    moved_fit.x[fit_index[0]] += 100.0
    losses = {}
    for name, data in (("base", base), ("validation", moved_validation), ("fit", moved_fit)):
        history = train(data, tmp_path / name, _config(epochs=2), progress=False).history
        losses[name] = [r["train_loss"] for r in history]
    assert losses["validation"] == losses["base"]
    assert losses["fit"] != losses["base"]


def test_resume_keeps_the_best_and_equals_an_uninterrupted_run(tmp_path):
    data = _data()
    full = train(data, tmp_path / "full", _config(epochs=5), progress=False)
    train(data, tmp_path / "part", _config(epochs=2), progress=False)
    resumed = train(data, tmp_path / "part", _config(epochs=5), resume=True, progress=False)
    assert resumed.best_epoch == full.best_epoch
    assert [r["validation/neg_elbo"] for r in resumed.history] == \
        [r["validation/neg_elbo"] for r in full.history]
    a = load_checkpoint(tmp_path / "full" / BEST_NAME)["module"]
    b = load_checkpoint(tmp_path / "part" / BEST_NAME)["module"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_without_validation_there_is_no_best_and_loading_falls_back_to_last(tmp_path):
    run = tmp_path / "run"
    result = train(_data(), run, _config(epochs=2, validation_fraction=0.0), progress=False)
    assert result.best_epoch is None and not (run / BEST_NAME).exists()
    assert not any(key.startswith("validation/") for key in result.history[-1])
    _, record = load_run(run)
    assert record["checkpoint"] == {"which": "last", "epoch": 2}


def test_fit_names_a_keep_best_key_the_metrics_lack(tmp_path):
    module = torch.nn.Linear(1, 1)

    def model(x):
        pyro.module("m", module)
        with pyro.plate("n", x.shape[0]):
            pyro.sample("x", dist.Normal(module(x).squeeze(-1), 1.0), obs=x.squeeze(-1))

    with pytest.raises(ValueError, match="keep_best='validation/loss' is not in the epoch "
                       "metrics; they have epoch, epoch_seconds, lr, train_loss"):
        fit(pyro.infer.Trace_ELBO()(model, lambda x: None), module, (torch.randn(8, 1),),
            optimizer=Optimizer(lr=0.01), epochs=1, batch_size=4, run_dir=tmp_path / "run",
            keep_best="validation/loss", progress=False)


def test_cli_trains_with_validation_and_evaluates_either_state(tmp_path, capsys):
    data = tmp_path / "pend.npz"
    assert main(["simulate", "--out", str(data), "--n-sequences", "12", "--n-steps", "8",
                 "--seed", "1"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--hidden-dim", "6",
                 "--epochs", "3", "--batch-size", "4", "--validation-fraction", "0.25",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    best_epoch = load_checkpoint(run / BEST_NAME)["epoch"]
    assert f"at epoch {best_epoch} (best.pt)" in out
    assert main(["evaluate", str(run), "--samples", "4", "--psis-samples", "4"]) == 0
    assert f"best state, epoch {best_epoch}:" in capsys.readouterr().out
    assert json.loads((run / "evaluation.json").read_text())["checkpoint"]["which"] == "best"
    assert main(["evaluate", str(run), "--samples", "4", "--psis-samples", "4",
                 "--checkpoint", "last"]) == 0
    assert "last state, epoch 3:" in capsys.readouterr().out
    assert evaluate_run(run, num_samples=4, psis_samples=None)["checkpoint"]["which"] == "best"


@pytest.mark.parametrize("value", ["1", "-0.2", "a"])
def test_cli_refuses_a_bad_validation_fraction(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "run"),
              "--validation-fraction", value])
    assert exit_info.value.code == 2
    assert f"expected a number in [0, 1), got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_distributed_run_keeps_the_best_validation_state_too(tmp_path):
    alone = train(_data(), tmp_path / "alone", _config(), progress=False, example_noise=True)
    ddp = train(_data(), tmp_path / "ddp", _config(), progress=False, distributed=True)
    assert ddp.best_epoch == alone.best_epoch is not None
    assert [r[VALIDATION_METRIC] for r in ddp.history] == [r[VALIDATION_METRIC]
                                                           for r in alone.history]
    assert (tmp_path / "ddp" / BEST_NAME).exists()
