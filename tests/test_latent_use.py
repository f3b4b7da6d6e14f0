"""pyro_storn.latent_use and examples/storn_latent_use.py: whether a STORN's decoder and posterior
use the latent, measured per feature, and from which epoch a run's KL says it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from example_scripts import load_example

from pyro_storn import STORN
from pyro_storn.cli import main as cli_main
from pyro_storn.latent_use import LATENT_IN_USE_KL, latent_in_use_epoch, latent_use, latent_use_table

D, Z = 3, 2


def _storn(flow=None, length=0):
    torch.manual_seed(0)
    storn = STORN(D, latent_dim=Z, hidden_dim=8, flow=flow, flow_length=length)
    storn.set_data_statistics(torch.randn(5, 7, D) * 2.0 + 1.0)
    return storn


@pytest.mark.parametrize("flow, length", [(None, 0), ("planar", 2), ("conv_planar", 2)])
def test_a_decoder_blind_to_z_changes_nothing_and_the_statistics_are_the_datas(flow, length):
    storn = _storn(flow, length)
    x = torch.randn(6, 9, D) * torch.tensor([1.0, 3.0, 0.1])
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[0, 5:] = False
    x[0, 5:] = 1e6  # padding: must reach no statistic
    use = latent_use(storn, x, mask)
    np.testing.assert_allclose(use["data_sd"], x[mask].double().std(0).numpy(), rtol=1e-10)
    assert np.all(use["emission_sd"] > 0) and np.all(use["decoder_change"] > 0)
    assert use["q0_scale"] > 0
    with torch.no_grad():  # cut the decoder's input weights from z: the latent is ignored
        storn.decoder_rnn.weight_ih_l0[:, D:] = 0.0
    use = latent_use(storn, x, mask)
    np.testing.assert_array_equal(use["decoder_change"], np.zeros(D))


def test_the_emission_scale_is_the_decoders_median_over_observed_steps():
    storn = _storn()
    x = torch.randn(4, 5, D)
    torch.manual_seed(3)
    use = latent_use(storn, x)
    torch.manual_seed(3)
    with torch.no_grad():
        z = storn.posterior(x).sample()
        _, scale = storn.decode(x, z)
    np.testing.assert_allclose(use["emission_sd"], scale.reshape(-1, D).median(0).values.numpy())


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(N, T, 3\)"):
        latent_use(_storn(), torch.randn(5, D))
    with pytest.raises(ValueError, match=r"\(N, T, 3\)"):
        latent_use(_storn(), torch.randn(2, 5, D + 1))


def test_the_table_has_a_row_per_feature_and_the_ratio_of_the_sds():
    use = {"data_sd": np.array([2.0, 0.0]), "emission_sd": np.array([1.0, 0.5]),
           "decoder_change": np.array([0.25, 0.0]), "q0_scale": 0.9}
    lines = latent_use_table(use, ["a", "b"]).splitlines()
    assert lines[0].startswith("| feature | data sd | emission sd (median) | emission sd / data sd")
    assert lines[2] == "| a | 2 | 1 | 0.5 | 0.25 |"
    assert lines[3].split(" | ")[3] == f"{0.5 / np.finfo(float).tiny:.3g}"  # no division by 0
    with pytest.raises(ValueError, match="1 feature names for 2 features"):
        latent_use_table(use, ["a"])


def test_latent_in_use_epoch_is_the_first_to_reach_the_threshold():
    history = [{"epoch": 1, "test/kl": 12.0}, {"epoch": 2, "test/kl": 2.0},
               {"epoch": 3, "test/kl": 15.0}, {"epoch": 4, "test/kl": 50.0},
               {"epoch": 5, "test/kl": 30.0}]
    assert LATENT_IN_USE_KL == 10.0
    # above from epoch 3 to the end; the early excursion at epoch 1 does not count
    assert latent_in_use_epoch(history) == 3
    assert latent_in_use_epoch(history, threshold=20.0) == 4
    assert latent_in_use_epoch(history, threshold=40.0) is None  # ends below
    assert latent_in_use_epoch(history[:2]) is None  # collapsed after one epoch


def test_the_example_prints_a_table_per_run(tmp_path, capsys, pendulum):
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(pendulum), "--out", str(run), "--hidden-dim", "6",
                     "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    example = load_example("storn_latent_use.py")
    assert example.main([str(run), "--features", "cos,sin,speed,reward"]) == 0
    out = capsys.readouterr().out
    assert f"### {run} (last state, epoch 1)" in out  # no validation split: the last state
    rows = [line for line in out.splitlines() if line.startswith("| ") and "feature" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| cos", "| sin", "| speed", "| reward"]
    assert example.main([str(run), "--features", "a,b"]) == 2  # before any run is measured
    assert capsys.readouterr().err == (f"storn_latent_use.py: error: --features names 2 features, "
                                       f"the run {run} has 4\n")
    with pytest.raises(SystemExit):
        example.parse_args([str(run), "--n-sequences", "0"])
    assert "--n-sequences must be a positive int, got 0" in capsys.readouterr().err


def test_the_examples_help_shows_its_use(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example("storn_latent_use.py").parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--n-sequences", "--features", "--seed"):
        assert option in text
    assert "python examples/storn_latent_use.py" in text and "collapsed run" in text


def test_a_bernoulli_emission_is_refused_by_name():
    storn = STORN(4, 2, 8, emission="bernoulli")
    with pytest.raises(ValueError, match="emission='bernoulli'"):
        latent_use(storn, torch.zeros(2, 3, 4))
