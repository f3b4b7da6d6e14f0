"""The thesis-grid script (examples/storn_pendulum.py) on a tiny grid: it trains, evaluates,
writes the table with its figures, and reuses finished runs."""

from __future__ import annotations

import json

import pytest
from example_scripts import load_example as _load


def load_example():
    return _load("storn_pendulum.py")


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example().parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--flows", "--lengths", "--seeds", "--epochs", "--n-sequences", "--hidden-dim",
                   "--kl-anneal-epochs", "--iwae-samples", "--runs", "--out", "--quiet"):
        assert option in text
    assert "plain STORN" in text and "finished runs with the same settings are reused" in text


def test_tiny_grid_writes_the_table_and_reuses_runs(tmp_path, capsys):
    example = load_example()
    out = tmp_path / "docs" / "pendulum.md"
    argv = ["--flows", "none,radial", "--lengths", "2", "--seeds", "0,1", "--epochs", "1",
            "--n-sequences", "20", "--n-steps", "8", "--hidden-dim", "8", "--iwae-samples", "3",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--quiet"]
    assert example.main(argv) == 0
    text = out.read_text()
    summary, per_run = text.split("## Every run")
    rows = [line for line in summary.splitlines() if line.startswith("| STORN")]
    assert [row.split(" | ")[:3] for row in rows] == [["| STORN", "0", "2"], ["| STORN + radial", "2", "2"]]
    assert "(2/2 better)" in rows[1] or "(1/2 better)" in rows[1] or "(0/2 better)" in rows[1]
    assert "1-minute load average at the runs' ends was" in text
    header = next(line for line in text.splitlines() if line.startswith("| guide"))
    columns = header.split(" | ")
    khat_share = [float(row.split(" | ")[columns.index("share k̂ > 0.7")].split(" ")[0]) for row in rows]
    assert all(0.0 <= share <= 1.0 for share in khat_share)
    # the per-run table: one row per (guide, K, seed), the KL threshold epoch from the metrics
    run_rows = [line for line in per_run.splitlines() if line.startswith("| STORN")]
    assert [row.split(" | ")[2] for row in run_rows] == ["0", "1", "0", "1"]
    history = [json.loads(line) for line in
               (tmp_path / "runs" / "radial_K2_seed1" / "metrics.jsonl").read_text().splitlines()]
    expected = "never" if history[-1]["test/kl"] < example.LATENT_IN_USE_KL else "1"
    assert run_rows[3].rstrip(" |").split(" | ")[-1] == expected
    for figure in ("pendulum_losses.png", "pendulum_flow_terms.png", "pendulum_kl_every_seed.png",
                   "pendulum_neg_elbo_every_seed.png"):  # named after the table
        assert (out.parent / "figures" / figure).stat().st_size > 0
        assert f"](figures/{figure})" in text
    timing = json.loads((tmp_path / "runs" / "radial_K2_seed1" / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0 and timing["load_average"] >= 0
    # a second invocation reuses the finished runs: same table, nothing retrained
    before = (tmp_path / "runs" / "radial_K2_seed1" / "timing.json").stat().st_mtime_ns
    assert example.main(argv) == 0
    assert (tmp_path / "runs" / "radial_K2_seed1" / "timing.json").stat().st_mtime_ns == before
    assert [line for line in out.read_text().splitlines() if line.startswith("| STORN")] == \
        rows + run_rows


def test_latent_in_use_epoch_is_the_first_to_reach_the_threshold():
    example = load_example()
    history = [{"epoch": 1, "test/kl": 12.0}, {"epoch": 2, "test/kl": 2.0},
               {"epoch": 3, "test/kl": 15.0}, {"epoch": 4, "test/kl": 50.0},
               {"epoch": 5, "test/kl": 30.0}]
    # above from epoch 3 to the end; the early excursion at epoch 1 does not count
    assert example.latent_in_use_epoch(history) == 3
    assert example.latent_in_use_epoch(history, threshold=20.0) == 4
    assert example.latent_in_use_epoch(history, threshold=40.0) is None  # ends below
    assert example.latent_in_use_epoch(history[:2]) is None  # collapsed after one epoch


def test_validation_fraction_evaluates_the_best_epoch(tmp_path):
    example = load_example()
    out = tmp_path / "pendulum.md"
    argv = ["--flows", "none", "--seeds", "0", "--epochs", "3", "--n-sequences", "25",
            "--n-steps", "8", "--hidden-dim", "8", "--iwae-samples", "3", "--runs",
            str(tmp_path / "runs"), "--out", str(out), "--quiet", "--validation-fraction", "0.25"]
    assert example.main(argv) == 0
    run = tmp_path / "runs" / "none_K0_seed0"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda record: record["validation/neg_elbo"])["epoch"]
    assert json.loads((run / "evaluation.json").read_text())["checkpoint"] == \
        {"which": "best", "epoch": best}
    text = out.read_text()
    assert "5 of the training sequences (0.25) are held out for validation" in text
    header = next(line for line in text.splitlines() if line.startswith("| guide")).split(" | ")
    row = next(line for line in text.splitlines() if line.startswith("| STORN")).split(" | ")
    assert float(row[header.index("evaluated epoch")]) == best


def test_a_validation_fraction_that_holds_out_nothing_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="validation_fraction 0.01 of 20 training sequences"):
        load_example().main(["--flows", "none", "--seeds", "0", "--epochs", "1",
                             "--n-sequences", "25", "--n-steps", "8", "--runs",
                             str(tmp_path / "runs"), "--out", str(tmp_path / "t.md"),
                             "--validation-fraction", "0.01"])
    assert not (tmp_path / "runs" / "none_K0_seed0").exists()


def test_init_from_runs_warm_starts_each_seed_from_plain_storn(tmp_path):
    example = load_example()
    common = ["--seeds", "0", "--epochs", "1", "--n-sequences", "16", "--n-steps", "6",
              "--hidden-dim", "6", "--iwae-samples", "2", "--quiet"]
    first = tmp_path / "first"
    assert example.main(["--flows", "none", *common, "--runs", str(first),
                         "--out", str(tmp_path / "first.md")]) == 0
    second = tmp_path / "second"
    second.mkdir()
    (second / "pendulum.npz").write_bytes((first / "pendulum.npz").read_bytes())
    out = tmp_path / "second.md"
    assert example.main(["--flows", "none,radial", "--lengths", "2", *common, "--runs", str(second),
                         "--out", str(out), "--init-from-runs", str(first)]) == 0
    record = json.loads((second / "radial_K2_seed0" / "config.json").read_text())
    assert record["init_from"]["run"] == str((first / "none_K0_seed0").resolve())
    assert record["init_from"]["parameters"] and not any(
        name.startswith("flow") for name in record["init_from"]["parameters"])
    assert f"starts from the plain STORN run `{first}/none_K0_seedS`" in out.read_text()
