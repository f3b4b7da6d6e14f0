"""PSIS / ArviZ diagnostics in the STORN product: ``pyro-storn evaluate`` (k-hat, IWAE, ESS under
"psis" in evaluation.json), ``pyro-storn diagnose`` (InferenceData + figures) and the report's
k-hat section, on a tiny trained run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyro
import pytest
import torch

from pyro_storn.cli import main
from pyro_storn.diagnostics import KHAT_THRESHOLD, ImportanceSummary
from pyro_storn.runs import _importance_draws, load_run, load_run_data

TINY = ["--hidden-dim", "6", "--epochs", "2", "--batch-size", "4", "--quiet"]
N_TEST, N_STEPS, N_FEATURES, LATENT = 2, 6, 5, 2


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("psis")
    data = root / "pend.npz"
    assert main(["simulate", "--out", str(data), "--n-sequences", "10", "--n-steps",
                 str(N_STEPS), "--seed", "1", "--with-action"]) == 0
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--flow", "radial",
                 "--flow-length", "2", "--latent-dim", str(LATENT), *TINY]) == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_evaluate_prints_khat_and_stores_psis_from_the_same_draws(run_copy, capsys):
    code, out, err = _run(capsys, "evaluate", run_copy, "--samples", 8, "--psis-samples", 8,
                          "--particle-batch-size", 4)
    assert code == 0, err
    assert "PSIS k =" in out and f"per item of plate 'sequences' (N = {N_TEST})" in out
    evaluation = json.loads((run_copy / "evaluation.json").read_text())
    psis = evaluation["psis"]
    assert psis["num_samples"] == 8 and psis["num_items"] == N_TEST
    assert len(psis["khat_per_item"]) == N_TEST and len(psis["ess_per_item"]) == N_TEST
    assert all(1.0 - 1e-9 <= ess <= 8 + 1e-9 for ess in psis["ess_per_item"])
    assert psis["num_items_khat_above_0.7"] == sum(k > KHAT_THRESHOLD for k in psis["khat_per_item"])
    # one set of draws: the bounds are the PSIS summary's per-sequence IWAE
    np.testing.assert_allclose(evaluation["neg_iwae"], -np.asarray(psis["iwae_per_item"]))
    np.testing.assert_allclose(-sum(evaluation["neg_iwae"]), psis["iwae"])
    np.testing.assert_allclose(-np.mean(evaluation["neg_elbo"]) * N_TEST, psis["elbo"], rtol=1e-5)
    assert all(e >= i - 1e-6 for e, i in zip(evaluation["neg_elbo"], evaluation["neg_iwae"]))
    # the printed summary is the stored one
    assert ImportanceSummary.from_dict(psis).format() in out


def test_evaluate_with_separate_psis_draws(run_copy, capsys):
    code, out, _ = _run(capsys, "evaluate", run_copy, "--samples", 5, "--psis-samples", 12)
    assert code == 0 and "-IWAE(5)" in out and "draws S = 12" in out
    evaluation = json.loads((run_copy / "evaluation.json").read_text())
    assert evaluation["num_samples"] == 5 and evaluation["psis"]["num_samples"] == 12


def test_psis_log_weights_are_the_bounds_log_weights(trained_run):
    """What lets evaluate share draws: the traced per-sequence log-weights equal
    log p(x|z) + log p(z) - log q(z|x) computed from STORN's own distributions."""
    storn, record = load_run(trained_run)
    data = load_run_data(record)
    x, mask = torch.from_numpy(data.x_test), torch.from_numpy(data.mask_test)
    pyro.set_rng_seed(3)
    draws = _importance_draws(storn, x, mask, 6, 3)
    z = draws.latents["z"]
    assert z.shape == (6, N_TEST, N_STEPS, LATENT)
    with torch.no_grad():
        log_w = (storn.emission(x, z, mask).log_prob(storn.clean(x, mask))
                 + storn.prior((N_TEST,), N_STEPS).log_prob(z)
                 - storn.posterior(x, mask).log_prob(z.clone()))
    torch.testing.assert_close(draws.log_weights_per_item, log_w, rtol=1e-5, atol=1e-3)


def test_evaluate_ignores_an_annealed_kl_weight(trained_run, run_copy, capsys):
    assert _run(capsys, "evaluate", trained_run, "--samples", 6, "--psis-samples", 6)[0] == 0
    reference = json.loads((trained_run / "evaluation.json").read_text())
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["kl_weight"] = 0.25  # as if saved halfway through KL warm-up
    (run_copy / "config.json").write_text(json.dumps(config))
    assert load_run(run_copy)[0].kl_weight == 0.25
    code, _, err = _run(capsys, "evaluate", run_copy, "--samples", 6, "--psis-samples", 6)
    assert code == 0 and "scaled" not in err
    annealed = json.loads((run_copy / "evaluation.json").read_text())
    assert annealed["psis"] == reference["psis"]
    assert annealed["neg_iwae"] == reference["neg_iwae"]


def test_diagnose_writes_inference_data_and_figures(run_copy, tmp_path, capsys):
    import arviz as az

    out_dir = tmp_path / "diag"
    code, out, err = _run(capsys, "diagnose", run_copy, "--num-samples", 6,
                          "--particle-batch-size", 3, "--out", out_dir)
    assert code == 0, err
    assert "inference_data.nc" in out
    idata = az.from_netcdf(str(out_dir / "inference_data.nc"))
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "sequence", "time", "latent")
    assert z.shape == (1, 6, N_TEST, N_STEPS, LATENT)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "sequence", "time", "feature")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "sequence")
    assert idata.sample_stats["log_weight_item"].shape == (1, 6, N_TEST)
    assert np.isfinite(idata.sample_stats["log_weight"].values).all()
    summary = json.loads((out_dir / "importance.json").read_text())
    assert summary["num_samples"] == 6 and summary["num_items"] == N_TEST
    for figure in ("khat.png", "log_weights.png", "pair.png"):
        assert (out_dir / figure).stat().st_size > 0
    assert not (run_copy / "diagnostics").exists()  # --out was honoured


def test_diagnose_defaults_to_the_run_directory(run_copy, capsys):
    code, _, err = _run(capsys, "diagnose", run_copy, "--num-samples", 4)
    assert code == 0, err
    assert (run_copy / "diagnostics" / "inference_data.nc").stat().st_size > 0


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose", "missing_run"], "is not a run directory"),
        (["diagnose", "{no_checkpoint}"], "has no checkpoint yet"),
        (["diagnose", "{run}", "--num-samples", "1"], "--num-samples must be >= 2"),
        (["diagnose", "{run}", "--num-samples", "6", "--particle-batch-size", "4"],
         "does not divide"),
        (["diagnose", "{run}", "--num-samples", "0"], "expected a positive integer"),
        (["diagnose", "{run}", "--out", "{file}"], "is not a directory"),
        (["diagnose", "{run}", "--device", "tpu"], "--device must be cpu or cuda"),
        (["evaluate", "{run}", "--psis-samples", "1"], "--psis-samples must be >= 2"),
        (["evaluate", "{run}", "--psis-samples", "10", "--particle-batch-size", "3"],
         "does not divide"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(run_copy, tmp_path, capsys,
                                                            monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run_copy / "config.json", no_checkpoint / "config.json")
    (tmp_path / "a_file").write_text("not a directory\n")
    names = {"run": str(run_copy), "no_checkpoint": str(no_checkpoint),
             "file": str(tmp_path / "a_file")}
    argv = [a.format(**names) for a in argv]
    before = _listing(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert _listing(tmp_path) == before


def test_report_has_the_khat_sentence_figure_and_table_columns(run_copy, tmp_path, capsys):
    assert _run(capsys, "evaluate", run_copy, "--samples", 6, "--psis-samples", 6)[0] == 0
    psis = json.loads((run_copy / "evaluation.json").read_text())["psis"]
    code, _, err = _run(capsys, "report", run_copy, "--out", tmp_path / "rep" / "report.md")
    assert code == 0, err
    report = (tmp_path / "rep" / "report.md").read_text()
    above = sum(k > KHAT_THRESHOLD for k in psis["khat_per_item"])
    assert f"{above} of {N_TEST} test sequences have k̂ > 0.7" in report
    assert "PSIS k̂ (joint)" in report and "PSIS ESS (joint)" in report
    row = next(line for line in report.splitlines() if line.startswith("| run | radial"))
    assert f"{-psis['iwae'] / N_TEST:.2f} (6)" in row and f"{psis['ess']:.1f} of 6" in row
    assert (tmp_path / "rep" / "figures" / "khat_run.png").stat().st_size > 0
    assert "](figures/khat_run.png)" in report


def test_report_without_psis_has_no_khat_section(run_copy, tmp_path, capsys):
    evaluation = run_copy / "evaluation.json"
    assert _run(capsys, "evaluate", run_copy, "--samples", 4)[0] == 0
    record = json.loads(evaluation.read_text())
    del record["psis"]  # an evaluation.json written before PSIS existed
    evaluation.write_text(json.dumps(record))
    assert _run(capsys, "report", run_copy, "--out", tmp_path / "report.md")[0] == 0
    report = (tmp_path / "report.md").read_text()
    assert "test sequences have k̂" not in report and not (tmp_path / "figures" / "khat_run.png").exists()


def test_importance_summary_round_trips_through_its_dict(run_copy, capsys):
    assert _run(capsys, "evaluate", run_copy, "--samples", 4, "--psis-samples", 4)[0] == 0
    stored = json.loads((run_copy / "evaluation.json").read_text())["psis"]
    assert ImportanceSummary.from_dict(stored).to_dict() == stored


def test_report_torn_mid_write_keeps_the_old_report(run_copy, tmp_path, capsys, disk_full):
    out = tmp_path / "report.md"
    out.write_text("the previous report\n")
    disk_full("report.md")
    code, _, err = _run(capsys, "report", run_copy, "--out", out, "--force")
    assert code == 2 and err.strip().splitlines() == ["pyro-storn report: error: No space left "
                                                      "on device"]
    assert out.read_text() == "the previous report\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.md")]
