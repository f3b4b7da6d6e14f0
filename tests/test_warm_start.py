"""Warm-starting a run from a trained one (``TrainConfig.init_from``, ``train --init-from``): the
shared parameters come from the source, a flow it lacks keeps its own initialisation, and a bad
source fails before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_storn.cli import main
from pyro_storn.data.sequences import SequenceData
from random_walks import random_walk_data
from pyro_storn.runs import TrainConfig, build_storn, load_run, train, warm_start

N, T, D = 12, 6, 2


def _data() -> SequenceData:
    return random_walk_data(N, 4, T, D, seed=4)


def _config(**kwargs) -> TrainConfig:
    values = dict(hidden_dim=6, epochs=2, batch_size=4, lr=3e-2, seed=1)
    values.update(kwargs)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("warm") / "plain"
    train(_data(), run, _config(), progress=False)
    return run


def test_shared_parameters_come_from_the_source_and_the_flow_keeps_its_own(source):
    trained, _ = load_run(source)
    trained_parameters = dict(trained.named_parameters())
    torch.manual_seed(7)
    storn = build_storn(D, _config(flow="planar", flow_length=2))
    fresh = {name: p.detach().clone() for name, p in storn.named_parameters()}
    info = warm_start(storn, source)
    assert info["checkpoint"] == {"which": "last", "epoch": 2}
    assert info["parameters"] == sorted(trained_parameters)  # every plain STORN parameter
    for name, parameter in storn.named_parameters():
        if name in trained_parameters:
            assert torch.equal(parameter, trained_parameters[name]), name
            assert not torch.equal(parameter, fresh[name]), name  # it did change
        else:
            assert name.startswith("flow"), name
            assert torch.equal(parameter, fresh[name]), name


def test_a_shape_mismatch_or_nothing_shared_is_named(source):
    with pytest.raises(ValueError, match=r"its encoder_rnn\.weight_ih_l0 has shape \(18, 2\), "
                                         r"this model's \(24, 2\)"):
        warm_start(build_storn(D, _config(hidden_dim=8)), source)
    with pytest.raises(ValueError, match="shares no parameter"):
        warm_start(torch.nn.Linear(2, 2), source)
    with pytest.raises(ValueError, match="not a run directory"):
        warm_start(build_storn(D, _config()), source.parent / "missing")
    with pytest.raises(ValueError, match="init_from must be a run directory"):
        _config(init_from=3).validate()


def test_train_starts_from_the_source_and_records_it(source, tmp_path):
    run = tmp_path / "flow"
    # a step size so small that one epoch leaves the warm-started values in place
    train(_data(), run, _config(flow="radial", flow_length=2, epochs=1, lr=1e-12,
                                init_from=str(source)), progress=False)
    trained, _ = load_run(source)
    started, record = load_run(run)
    for name, parameter in trained.named_parameters():
        torch.testing.assert_close(dict(started.named_parameters())[name], parameter,
                                   rtol=0, atol=1e-9)
    stored = json.loads((run / "config.json").read_text())
    assert stored["config"]["init_from"] == str(source)
    assert stored["init_from"]["run"] == str(source.resolve())
    assert stored["init_from"]["checkpoint"] == {"which": "last", "epoch": 2}
    # a resumed run keeps the record and does not warm-start again over its checkpoint
    train(_data(), run, _config(epochs=2), resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["init_from"] == stored["init_from"]


def test_a_bad_source_fails_before_anything_is_written(source, tmp_path, capsys):
    run = tmp_path / "never"
    with pytest.raises(ValueError, match="shape"):
        train(_data(), run, _config(hidden_dim=8, init_from=str(source)), progress=False)
    assert not run.exists()
    data = tmp_path / "d.npz"
    assert main(["simulate", "--out", str(data), "--n-sequences", "8", "--n-steps", "5"]) == 0
    capsys.readouterr()
    out = tmp_path / "cli"
    assert main(["train", "--data", str(data), "--out", str(out), "--init-from",
                 str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err
    assert not out.exists()


def test_the_distributed_run_warm_starts_the_same_way(source, tmp_path):
    alone = train(_data(), tmp_path / "alone", _config(init_from=str(source), epochs=1),
                  progress=False, example_noise=True)
    ddp = train(_data(), tmp_path / "ddp", _config(init_from=str(source), epochs=1),
                progress=False, distributed=True)
    assert ddp.history[0]["train_loss"] == alone.history[0]["train_loss"]
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert record["init_from"]["run"] == str(source.resolve())
