"""The ``pyro-storn`` CLI on a tiny problem: every subcommand, --help, and bad input (exit 2,
one line on stderr, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import transforms
from pyro_storn.cli import main

SUBCOMMANDS = ("simulate", "train", "evaluate", "diagnose", "generate", "report")
TINY = ["--hidden-dim", "6", "--epochs", "2", "--batch-size", "4", "--quiet"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pyro-storn " + command in capsys.readouterr().out


def test_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "pyro_storn.cli", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and all(c in done.stdout for c in SUBCOMMANDS)


@pytest.fixture
def data_file(tmp_path, capsys):
    path = tmp_path / "pend.npz"
    code, out, _ = _run(capsys, "simulate", "--out", str(path), "--n-sequences", "10",
                        "--n-steps", "6", "--seed", "1", "--with-action")
    assert code == 0 and "x (8, 6, 5)" in out
    return path


def test_pipeline_on_a_tiny_problem(tmp_path, data_file, capsys):
    flow = next(n for n in ("radial", "planar", *transforms.available(event_dim=1))
                if n in transforms.available())
    run = tmp_path / "run"
    code, out, _ = _run(capsys, "train", "--data", str(data_file), "--out", str(run),
                        "--flow", flow, "--flow-length", "2", "--latent-dim", "2", *TINY)
    assert code == 0 and "2 epochs" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["flow"] == flow and config["model"]["flow_length"] == 2
    code, out, _ = _run(capsys, "train", "--data", str(data_file), "--out", str(run),
                        "--epochs", "3", "--resume", "--quiet")
    assert code == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 3
    code, out, _ = _run(capsys, "evaluate", str(run), "--samples", "5")
    assert code == 0 and "-IWAE(5)" in out
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert len(evaluation["neg_iwae"]) == 2 and evaluation["num_samples"] == 5
    code, out, _ = _run(capsys, "generate", str(run), "--prefix", "2", "--samples", "3",
                        "--sequences", "2")
    assert code == 0
    with np.load(run / "generated.npz") as generated:
        assert generated["generated"].shape == (3, 2, 6, 5)
        np.testing.assert_array_equal(generated["generated"][:, :, :2],
                                      np.broadcast_to(generated["actual"][:, :2], (3, 2, 2, 5)))
    assert (run / "figures" / "generation.png").stat().st_size > 0
    plain = tmp_path / "plain"
    assert _run(capsys, "train", "--data", str(data_file), "--out", str(plain), *TINY)[0] == 0
    code, out, _ = _run(capsys, "report", str(run), str(plain), "--out",
                        str(tmp_path / "rep" / "report.md"))
    assert code == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | flow |" in report and "| plain | none | 0 |" in report
    for figure in ("losses.png", "flow_terms.png", "generation_run.png"):
        assert (tmp_path / "rep" / "figures" / figure).stat().st_size > 0


def _bad_npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 3))}, "x: expected rank 3"),
        ({"x": np.full((6, 3, 2), np.nan)}, "first bad index (0, 0, 0)"),
        ({"x": np.zeros((6, 3, 2)), "mask": np.ones((6, 2))}, "mask: expected shape (6, 3)"),
        ({"x": np.zeros((6, 3, 2)), "mask": np.full((6, 3), 3)}, "mask: values must be 0/1"),
    ],
)
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, arrays, message):
    data = _bad_npz(tmp_path, "bad.npz", **arrays)
    out_dir = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--data", data, "--out", str(out_dir), *TINY)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "R", "--flow", "no_such_flow"], "unknown flow 'no_such_flow'"),
        (["train", "--out", "R", "--flow-length", "3"], "flow_length 3 given without a flow"),
        (["train", "--out", "R", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["train", "--out", "R", "--lr", "-1"], "--lr: expected a positive number"),
        (["train", "--out", "R", "--device", "tpu"], "device must be cpu or cuda"),
        (["train", "--out", "R", "--resume"], "no checkpoint"),
        (["train", "--data", "missing.npz", "--out", "R"], "does not exist"),
        (["simulate", "--out", "x.txt"], "--out must end in .npz"),
        (["simulate", "--out", "S.npz", "--n-sequences", "1"], "cannot split 1 sequence"),
        (["evaluate", "R"], "is not a run directory"),
        (["diagnose", "R"], "is not a run directory"),
        (["generate", "R"], "is not a run directory"),
        (["report", "R"], "is not a run directory"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, data_file, capsys, monkeypatch, argv,
                                            message):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if argv[0] == "train" and "--data" not in argv:
        argv = [*argv, "--data", str(data_file)]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_run_needs_resume(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", "--data", str(data_file), "--out", str(run), *TINY)[0] == 0
    stamp = (run / "metrics.jsonl").read_text()
    code, _, err = _run(capsys, "train", "--data", str(data_file), "--out", str(run), *TINY)
    assert code == 2 and "exists and is not empty" in err
    assert (run / "metrics.jsonl").read_text() == stamp


def test_cuda_unavailable_is_a_clear_error(tmp_path, data_file, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(capsys, "train", "--data", str(data_file), "--out",
                        str(tmp_path / "run"), "--device", "cuda", *TINY)
    assert code == 2 and "CUDA is not available" in err
    assert not (tmp_path / "run").exists()
