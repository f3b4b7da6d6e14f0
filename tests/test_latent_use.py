"""pyro_storn.latent_use and examples/storn_latent_use.py: whether a STORN's decoder and posterior
use the latent, measured per feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from example_scripts import load_example

from pyro_storn import STORN
from pyro_storn.cli import main as cli_main
from pyro_storn.latent_use import latent_use

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


def test_the_example_prints_a_table_per_run(tmp_path, capsys):
    data, run = tmp_path / "pend.npz", tmp_path / "run"
    assert cli_main(["simulate", "--out", str(data), "--n-sequences", "10", "--n-steps", "6"]) == 0
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--hidden-dim", "6",
                     "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    example = load_example("storn_latent_use.py")
    assert example.main([str(run), "--features", "cos,sin,speed,reward"]) == 0
    out = capsys.readouterr().out
    assert f"### {run} (last state, epoch 1)" in out  # no validation split: the last state
    rows = [line for line in out.splitlines() if line.startswith("| ") and "feature" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| cos", "| sin", "| speed", "| reward"]
    with pytest.raises(ValueError, match="names 2 features, the run has 4"):
        example.main([str(run), "--features", "a,b"])
    with pytest.raises(SystemExit):
        example.parse_args([str(run), "--n-sequences", "0"])
    assert "--n-sequences must be >= 1" in capsys.readouterr().err


def test_the_examples_help_shows_its_use(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example("storn_latent_use.py").parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--n-sequences", "--features", "--seed"):
        assert option in text
    assert "python examples/storn_latent_use.py" in text and "collapsed run" in text
