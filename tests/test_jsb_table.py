"""The JSB Chorales page from real (tiny) runs: plain and flow guides trained and evaluated by the
library, paired per frame on the same test sequences, the JSON rows beside the page, the curves
figure, and a run without evaluation.json named."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pyro_storn import jsb_table
from pyro_storn.data.polyphonic import load_polyphonic
from pyro_storn.runs import TrainConfig, evaluate_run, train


def _chorales(path, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        return [[tuple(np.int64(note) for note in rng.choice(np.arange(55, 70), size=3))
                 for _ in range(rng.integers(3, 7))] for _ in range(n)]

    path.write_bytes(pickle.dumps({"train": split(8), "valid": split(3), "test": split(4)}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsb")
    data_path = _chorales(root / "tiny.pickle")
    data = load_polyphonic(data_path).sequence_data()
    dirs = []
    for flow, length in (("none", 0), ("planar", 1)):
        config = TrainConfig(flow=flow, flow_length=length, latent_dim=2, hidden_dim=8, epochs=2,
                             batch_size=4, emission="bernoulli", encoder="backward")
        run_dir = root / f"{flow}_K{length}"
        train(data, run_dir, config, data_path=data_path, progress=False)
        evaluate_run(run_dir, num_samples=3, psis_samples=3)
        dirs.append(run_dir)
    return dirs


def test_page_rows_pair_flow_with_plain(runs, tmp_path):
    out = tmp_path / "page.md"
    rows = jsb_table.write_page(runs, out, command="examples/jsb_chorales.sh")
    plain, flow = rows
    assert plain["guide"] == "plain" and flow["guide"] == "planar K=1"
    assert plain["delta_neg_iwae_per_frame"] is None
    evaluations = [json.loads((run / "evaluation.json").read_text()) for run in runs]
    frames = sum(evaluations[0]["n_steps"])
    expected = (np.sum(evaluations[1]["neg_iwae"]) - np.sum(evaluations[0]["neg_iwae"])) / frames
    assert flow["delta_neg_iwae_per_frame"] == pytest.approx(expected)
    assert flow["delta_neg_iwae_per_frame_se"] > 0
    assert flow["test_neg_iwae_per_frame"] == evaluations[1]["neg_iwae_per_step"]
    page = out.read_text()
    assert "examples/jsb_chorales.sh" in page and "planar K=1" in page and "6.926" in page
    records = json.loads(out.with_suffix(".json").read_text())
    assert [record["guide"] for record in records] == ["plain", "planar K=1"]
    assert [record["encoder"] for record in records] == ["backward", "backward"]
    assert "neg_iwae_per_sequence" not in records[0]
    assert (tmp_path / "page_curves.png").stat().st_size > 0
    assert (tmp_path / "page_khat.png").stat().st_size > 0 and "## PSIS k̂ per test sequence" in page
    khat = json.loads((runs[1] / "evaluation.json").read_text())["psis"]["khat_per_item"]
    assert records[1]["khat_median"] == pytest.approx(float(np.median(khat)))
    assert "khat_per_sequence" not in records[1]
    clear = flow["delta_neg_iwae_per_frame"] < -2 * flow["delta_neg_iwae_per_frame_se"]
    better = flow["delta_neg_iwae_per_frame"] < 0
    assert (f"better on {int(better)}/1, by more than two standard errors on {int(clear)}/1."
            in page)
    summary = next(line for line in page.splitlines() if line.startswith("| backward encoder")
                   and "| planar K=1 | 1 |" in line)
    assert f"{flow['test_neg_iwae_per_frame']:.3f}" in summary


def test_mean_sd_keeps_the_digits_asked_for():
    from pyro_storn.tables import mean_sd

    assert mean_sd([0.0311, 0.0882]) == "0.06 ± 0.04"
    assert mean_sd([0.0311, 0.0882], 3) == "0.060 ± 0.040"
    assert mean_sd([None, 6.5], 3) == "6.500"


def test_unevaluated_run_is_named(runs, tmp_path):
    (tmp_path / "run").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / "run" / name).write_bytes((runs[0] / name).read_bytes())
    assert jsb_table.main([str(tmp_path / "run"), "--out", str(tmp_path / "page.md")]) == 2
    with pytest.raises(ValueError, match="evaluation.json"):
        jsb_table.run_row(tmp_path / "run")


def test_bernoulli_generation_and_report_show_piano_rolls(runs, tmp_path):
    from pyro_storn.report import write_report
    from pyro_storn.runs import generate_run

    out = generate_run(runs[1], n_prefix=2, n_sequences=2, num_samples=3)
    probabilities = out["probabilities"]
    assert probabilities.shape == out["actual"].shape
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert (probabilities[~out["mask"]] == 0).all()  # padding: nothing
    report = write_report({"planar": runs[1]}, tmp_path / "report.md")
    text = report.read_text()
    assert "Piano rolls" in text
    assert (tmp_path / "figures" / "generation_planar.png").stat().st_size > 0


def test_train_command_reproduces_the_recorded_flags(runs):
    from pyro_storn.cli import build_parser

    row = jsb_table.run_row(runs[1])
    argv = row["command"].split()[1:]
    args = build_parser().parse_args(argv)
    config = json.loads((runs[1] / "config.json").read_text())["config"]
    assert (args.flow, args.flow_length, args.encoder, args.emission) == (
        config["flow"], config["flow_length"], config["encoder"], config["emission"])
    assert args.epochs == config["epochs"] and args.hidden_dim == config["hidden_dim"]


def test_page_shows_the_best_runs_piano_roll_once_generated(runs, tmp_path):
    from pyro_storn.runs import generate_run

    rows = [jsb_table.run_row(run) for run in runs]
    best = min(rows, key=lambda row: row["test_neg_iwae_per_frame"])
    generate_run(best["run"], n_prefix=2, n_sequences=1, num_samples=2)
    out = tmp_path / "page.md"
    jsb_table.write_page(runs, out)
    assert "## Piano rolls of the best run\n" in out.read_text()
    assert (tmp_path / "page_piano_roll.png").stat().st_size > 0


def test_without_the_best_runs_generation_the_next_run_is_shown_and_the_best_named(runs, tmp_path):
    import shutil

    from pyro_storn.runs import generate_run

    copies = [shutil.copytree(run, tmp_path / run.name) for run in runs]
    for copy in copies:
        (copy / "generated.npz").unlink(missing_ok=True)
    rows = sorted((jsb_table.run_row(copy) for copy in copies),
                  key=lambda row: row["test_neg_iwae_per_frame"])
    generate_run(rows[1]["run"], n_prefix=2, n_sequences=1, num_samples=2)
    out = tmp_path / "page.md"
    jsb_table.write_page(copies, out)
    text = out.read_text()
    assert "## Piano rolls of the best run with generated sequences\n" in text
    assert f"on the run {Path(rows[1]['run']).name})" in text
    assert f"the runs above it ({Path(rows[0]['run']).name}) have no generated.npz" in text


def test_page_is_written_again_from_the_archive_alone(runs, tmp_path):
    from pyro_storn.runs import generate_run

    generate_run(runs[1], n_prefix=2, n_sequences=1, num_samples=2)
    archive = tmp_path / "archive"
    first = jsb_table.write_page(runs, tmp_path / "page.md", archive=archive)
    assert sorted(path.name for path in archive.iterdir()) == sorted(run.name for run in runs)
    copied = {path.name for path in (archive / runs[1].name).iterdir()}
    assert copied == {"config.json", "evaluation.json", "metrics.jsonl", "generated.npz"}
    assert not list(archive.glob("*/*.pt*"))  # no checkpoint
    again = jsb_table.write_page(sorted(archive.iterdir()), tmp_path / "again.md")
    for key in ("guide", "seed", "test_neg_iwae_per_frame", "delta_neg_iwae_per_frame",
                "command", "history", "khat_per_sequence"):
        assert [row[key] for row in first] == [row[key] for row in again]
    assert "## Piano rolls of the best run" in (tmp_path / "again.md").read_text()
    assert f"--out {runs[0].name} " in first[0]["command"]


def test_archive_refuses_two_runs_of_one_name(runs, tmp_path):
    other = tmp_path / "elsewhere" / runs[0].name
    other.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "evaluation.json"):
        (other / name).write_bytes((runs[0] / name).read_bytes())
    archive = tmp_path / "archive"
    assert jsb_table.main([str(runs[0]), str(other), "--out", str(tmp_path / "page.md"),
                           "--archive", str(archive)]) == 2
    assert not archive.exists()


def test_iwae_trained_runs_pair_only_among_themselves():
    config = {"encoder": "backward", "emission_hidden": 256, "prior": "learned", "latent_dim": 32,
              "hidden_dim": 128, "weight_decay": 0.01}
    elbo = jsb_table._model({**config, "objective": "elbo", "num_particles": 1})
    iwae = jsb_table._model({**config, "objective": "iwae", "num_particles": 5})
    assert elbo != iwae and iwae.endswith("trained on IWAE K=5") and "IWAE" not in elbo
    command = jsb_table.train_command("run", {"objective": "iwae", "num_particles": 5, "seed": 0})
    from pyro_storn.cli import build_parser

    args = build_parser().parse_args(command.split()[1:])
    assert (args.objective, args.num_particles) == ("iwae", 5)


def test_an_iwae_trained_run_is_paired_with_its_elbo_trained_twin(runs, tmp_path):
    data_path = _chorales(tmp_path / "tiny.pickle")
    data = load_polyphonic(data_path).sequence_data()
    config = TrainConfig(flow="planar", flow_length=1, latent_dim=2, hidden_dim=8, epochs=2,
                         batch_size=4, emission="bernoulli", encoder="backward",
                         objective="iwae", num_particles=2)
    iwae_dir = tmp_path / "planar_K1_iwae2"
    train(data, iwae_dir, config, data_path=data_path, progress=False)
    evaluate_run(iwae_dir, num_samples=3, psis_samples=3)
    rows = jsb_table.write_page([*runs, iwae_dir], tmp_path / "page.md")
    iwae_row = next(row for row in rows if row["objective"] == "iwae")
    elbo_row = next(row for row in rows if row["guide"] == "planar K=1" and row is not iwae_row)
    assert iwae_row["delta_neg_iwae_per_frame"] is None  # no IWAE-trained plain guide
    frames = iwae_row["test_frames"]
    expected = (np.sum(iwae_row["neg_iwae_per_sequence"])
                - np.sum(elbo_row["neg_iwae_per_sequence"])) / frames
    page = (tmp_path / "page.md").read_text()
    line = next(line for line in page.splitlines()
                if line.startswith("- planar K=1, trained on IWAE K=2, against"))
    assert f"Δ test -IWAE per frame {expected:.3f} ± " in line


def test_the_committed_archive_keeps_every_archived_file():
    """The docs archive is what rewrites the page on another machine: git must not ignore any
    of its files (a blanket ``*.npz`` rule once dropped the piano rolls' generated.npz)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [f"docs/storn_jsb_chorales_runs/any_run/{name}" for name in jsb_table.ARCHIVED_FILES]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root,
                             capture_output=True, text=True).stdout.split()
    assert ignored == []
