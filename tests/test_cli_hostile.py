"""Hostile but realistic input to the ``pyro-storn`` CLI, as a table.

Every case runs the real CLI (``pyro_storn.cli.main``, the console script's function; a few
through a real subprocess) on its own copy of a small world: data files, trained runs, user files.
A refusal must exit 2 with one line on stderr that names the bad value, and leave every file of
the world as it was (size, mtime, sha256) and no file or directory more. Recovery cases (an
unreadable best.pt, a torn metrics line, a run killed before its first checkpoint) must succeed
and say what they did in one line. Lock and Ctrl-C cases use real processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from cli_processes import (TIMEOUT_S, cli, cli_env, cli_stopped_while_importing, running,
                           sigkill, wait_for)
from pyro_storn.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, main
from pyro_storn.interrupts import Terminated
from pyro_storn.rundir import LOCK_NAME, run_contents
from pyro_storn.training import read_metrics

TINY = ["--hidden-dim", "6", "--latent-dim", "2", "--batch-size", "4", "--seed", "2", "--quiet"]


def _argv(args) -> list[str]:
    return [str(a) for a in args]


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(_argv(argv))
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def _simulate(path: Path, *extra) -> None:
    assert main(_argv(["simulate", "--out", path, "--n-sequences", 10, "--n-steps", 6,
                       *extra])) == 0


def _train(data: Path, out: Path, *extra) -> None:
    assert main(_argv(["train", "--data", data, "--out", out, "--epochs", 2, *TINY,
                       *extra])) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Data files, trained runs and a user's files that the cases copy and attack."""
    root = tmp_path_factory.mktemp("world")
    _simulate(root / "data.npz", "--seed", 1)
    _simulate(root / "other.npz", "--seed", 2)  # same shape, other values
    _simulate(root / "wide.npz", "--seed", 1, "--with-action")  # another D
    with np.load(root / "data.npz") as data:
        x, x_test = data["x"], data["x_test"]
    mask_test = np.ones(x_test.shape[:2], dtype=bool)
    mask_test[0, 0] = False  # the first test sequence starts late
    x_masked = x_test.copy()
    x_masked[0, 0] = np.nan  # what a padded step may hold
    np.savez(root / "masked.npz", x=x, x_test=x_masked, mask_test=mask_test)
    huge = x.copy()
    huge[0, 2, 1] = 1e30  # finite in float32, but its variance is not
    np.savez(root / "huge.npz", x=huge)
    beyond = x.astype(np.float64)
    beyond[1, 3, 0] = 1e39  # finite in float64, inf in float32
    np.savez(root / "beyond.npz", x=beyond)
    huge_test = x_test.copy()
    huge_test[1, 4, 2] = 1e30
    np.savez(root / "huge_test.npz", x=x, x_test=huge_test)
    nan = x.copy()
    nan[2, 1, 3] = np.nan
    np.savez(root / "nan.npz", x=nan)
    np.savez(root / "objects.npz", x=np.array([{"a": 1}] * 3, dtype=object))
    (root / "text.npz").write_text("x,y\n1,2\n")  # a CSV someone named .npz
    (root / "empty.npz").write_bytes(b"")
    (root / "notes.txt").write_text("a user's file\n")
    (root / "dir.npz").mkdir()
    (root / "dir.md").mkdir()
    _train(root / "data.npz", root / "run", "--validation-fraction", "0.25")  # has best.pt
    _train(root / "data.npz", root / "run8", "--hidden-dim", 8)  # another size
    _train(root / "masked.npz", root / "masked_run")
    assert (root / "run" / "best.pt").exists()
    return root


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file's size, mtime and sha256, and every directory (lock files are part of it)."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_dir():
            state[name] = ("dir",)
        else:
            stat = path.stat()
            state[name] = (stat.st_size, stat.st_mtime_ns,
                           hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@pytest.fixture
def place(world, tmp_path, monkeypatch) -> Path:
    """A private copy of the world, the working directory; runs point at its own data."""
    root = tmp_path / "w"
    shutil.copytree(world, root)
    for config in root.glob("*/config.json"):
        record = json.loads(config.read_text())
        record["data"]["path"] = str(root / Path(record["data"]["path"]).name)
        config.write_text(json.dumps(record, indent=2) + "\n")
    monkeypatch.chdir(root)
    return root


# ----------------------------------------------------------------------------- set-ups


def _edit_config(run: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / run / "config.json"
        record = json.loads(path.read_text())
        edit(record)
        path.write_text(json.dumps(record) + "\n")
    return setup


def _drop(section: str, key: str | None = None) -> Callable[[dict], None]:
    def edit(record: dict) -> None:
        if key is None:
            del record[section]
        else:
            del record[section][key]
    return edit


def _write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return setup


def _mkdir(relative: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).mkdir(parents=True)


def _copy(source: str, target: str) -> Callable[[Path], None]:
    return lambda root: shutil.copy(root / source, root / target)


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for step in setups:
            step(root)
    return setup


def _other_size_checkpoint(root: Path) -> None:
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        shutil.copy(root / "run8" / name, root / "run" / name)
    for name in ("best.pt", "best.pt.prev"):
        (root / "run" / name).unlink(missing_ok=True)


def _corrupt_checkpoints(root: Path) -> None:
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        (root / "run" / name).write_bytes(b"junk" * 50)


def _left_before_first_checkpoint(root: Path) -> None:
    stale = root / "stale"
    stale.mkdir()
    shutil.copy(root / "run" / "config.json", stale / "config.json")
    (stale / "metrics.jsonl").write_text("")


def _blow_up_weights(root: Path) -> None:
    """A last state whose generations overflow (as a diverged run's would)."""
    from pyro_storn.checkpoint import load_checkpoint, save_checkpoint

    path = root / "run" / "checkpoint.pt"
    payload = load_checkpoint(path)
    payload["module"] = {name: value * 1e38 if value.is_floating_point() else value
                         for name, value in payload["module"].items()}
    save_checkpoint(path, payload)


def _change_data(root: Path) -> None:
    with np.load(root / "data.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["x_test"] = arrays["x_test"] + 1.0
    np.savez(root / "data.npz", **arrays)


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    argv: list
    expect: list  # substrings of the one stderr line: the bad value and what is wrong with it
    setup: Callable[[Path], None] | None = None
    code: int = EXIT_BAD_INPUT
    needs_cpu_only: bool = False


CASES = [
    # simulate: never replace a user's file; a directory is not a file
    Case("simulate-existing-data", ["simulate", "--out", "data.npz"], ["'data.npz'", "exists",
                                                                      "--force"]),
    Case("simulate-existing-text", ["simulate", "--out", "t.npz"], ["'t.npz'", "exists"],
         setup=_write("t.npz", "my own notes\n")),
    Case("simulate-into-directory", ["simulate", "--out", "dir.npz"],
         ["'dir.npz'", "is a directory"]),
    Case("simulate-parent-is-file", ["simulate", "--out", "notes.txt/x.npz"],
         ["notes.txt", "is not a directory"]),
    Case("simulate-not-npz", ["simulate", "--out", "x.txt"], ["'x.txt'", "must end in .npz"]),
    Case("simulate-unsplittable", ["simulate", "--out", "new.npz", "--n-sequences", 1],
         ["cannot split 1 sequence"]),
    Case("simulate-zero-steps", ["simulate", "--out", "new.npz", "--n-steps", 0], ["'0'"]),
    # train: the data
    Case("data-text-named-npz", ["train", "--data", "text.npz", "--out", "new"],
         ["'text.npz'", "not an npz (zip) file"]),
    Case("data-empty-file", ["train", "--data", "empty.npz", "--out", "new"],
         ["'empty.npz'", "not an npz (zip) file", "empty"]),
    Case("data-directory", ["train", "--data", "dir.npz", "--out", "new"],
         ["'dir.npz'", "is a directory"]),
    Case("data-missing", ["train", "--data", "missing.npz", "--out", "new"],
         ["'missing.npz'", "does not exist"]),
    Case("data-object-arrays", ["train", "--data", "objects.npz", "--out", "new"],
         ["'objects.npz'", "not a readable .npz"]),
    Case("data-huge-overflows-variance", ["train", "--data", "huge.npz", "--out", "new"],
         ["1e+30", "(0, 2, 1)", "float32", "variance"]),
    Case("data-beyond-float32", ["train", "--data", "beyond.npz", "--out", "new"],
         ["1e+39", "(1, 3, 0)", "float32"]),
    Case("data-huge-test-value", ["train", "--data", "huge_test.npz", "--out", "new"],
         ["x_test", "1e+30", "(1, 4, 2)"]),
    Case("data-nan-observed", ["train", "--data", "nan.npz", "--out", "new"],
         ["non-finite", "(2, 1, 3)"]),
    # train: the run directory
    Case("out-is-a-file", ["train", "--data", "data.npz", "--out", "notes.txt"],
         ["'notes.txt'", "is a file"]),
    Case("out-holds-a-trained-run", ["train", "--data", "data.npz", "--out", "run"],
         ["'run'", "not empty", "--resume"]),
    Case("out-holds-a-users-file", ["train", "--data", "data.npz", "--out", "mine"],
         ["'mine'", "not empty", "notes.txt"], setup=_both(_mkdir("mine"),
                                                           _copy("notes.txt", "mine/notes.txt"))),
    Case("resume-other-data", ["train", "--data", "other.npz", "--out", "run", "--resume"],
         ["'run'", "other data", "sha256"]),
    Case("resume-other-feature-dim", ["train", "--data", "wide.npz", "--out", "run", "--resume"],
         ["'run'", "other data"]),
    Case("resume-nothing-there", ["train", "--data", "data.npz", "--out", "nowhere", "--resume"],
         ["'nowhere'", "no checkpoint"]),
    Case("resume-before-first-checkpoint",
         ["train", "--data", "data.npz", "--out", "stale", "--resume"],
         ["'stale'", "no checkpoint", "without --resume to start over"],
         setup=_left_before_first_checkpoint),
    Case("resume-config-missing-keys", ["train", "--data", "data.npz", "--out", "run", "--resume"],
         ["config.json", "missing key data"], setup=_edit_config("run", _drop("data"))),
    Case("resume-checkpoint-of-other-size",
         ["train", "--data", "data.npz", "--out", "run", "--resume"],
         ["checkpoint.pt", "does not fit", "size mismatch"], setup=_other_size_checkpoint),
    Case("resume-no-usable-checkpoint", ["train", "--data", "data.npz", "--out", "run", "--resume"],
         ["no usable checkpoint", "checkpoint.pt.prev"], setup=_corrupt_checkpoints),
    Case("resume-metrics-bad-middle-line",
         ["train", "--data", "data.npz", "--out", "run", "--resume"],
         ["metrics.jsonl", "line 1 is not JSON"],
         setup=_write("run/metrics.jsonl", 'garbage\n{"epoch": 2}\n')),
    Case("device-bad-index", ["train", "--data", "data.npz", "--out", "new", "--device",
                              "cpu:foo"], ["'cpu:foo'"]),
    Case("device-missing-cuda", ["train", "--data", "data.npz", "--out", "new", "--device",
                                 "cuda:99"], ["'cuda:99'"]),
    Case("device-unknown", ["train", "--data", "data.npz", "--out", "new", "--device", "tpu"],
         ["'tpu'", "device must be cpu or cuda"]),
    Case("init-from-missing-keys", ["train", "--data", "data.npz", "--out", "new", "--init-from",
                                    "run"], ["config.json", "missing key model"],
         setup=_edit_config("run", _drop("model"))),
    Case("init-from-not-a-run", ["train", "--data", "data.npz", "--out", "new", "--init-from",
                                 "dir.npz"], ["'dir.npz'", "not a run directory"]),
    Case("init-from-other-size", ["train", "--data", "data.npz", "--out", "new", "--init-from",
                                  "run8"], ["'run8'", "has shape"]),
    Case("init-from-other-size-into-empty-dir",
         ["train", "--data", "data.npz", "--out", "empty_dir", "--init-from", "run8"],
         ["'run8'", "has shape"], setup=_mkdir("empty_dir")),
    Case("validation-holds-out-none", ["train", "--data", "data.npz", "--out", "new",
                                       "--validation-fraction", "0.01"],
         ["validation_fraction 0.01", "holds out 0"]),
    Case("batch-size-zero", ["train", "--data", "data.npz", "--out", "new", "--batch-size", 0],
         ["--batch-size", "'0'"]),
    # evaluate / diagnose / generate: the run directory and its files
    Case("evaluate-config-not-json", ["evaluate", "run"], ["config.json", "not valid JSON"],
         setup=_write("run/config.json", "{ truncated")),
    Case("evaluate-config-missing-model-key", ["evaluate", "run"],
         ["config.json", "missing key model.hidden_dim"],
         setup=_edit_config("run", lambda r: r["model"].pop("hidden_dim"))),
    Case("evaluate-checkpoint-of-other-size", ["evaluate", "run", "--checkpoint", "last"],
         ["checkpoint.pt", "does not fit"], setup=_other_size_checkpoint),
    Case("evaluate-a-file", ["evaluate", "notes.txt"], ["'notes.txt'", "not a run directory"]),
    Case("evaluate-device-bad", ["evaluate", "run", "--device", "cpu:foo"], ["'cpu:foo'"]),
    Case("evaluate-device-absent", ["evaluate", "run", "--device", "cuda:99"], ["'cuda:99'"]),
    Case("evaluate-too-few-psis-draws", ["evaluate", "run", "--psis-samples", 1],
         ["--psis-samples", "got 1"]),
    Case("evaluate-run-device-gone", ["evaluate", "run"], ["'cuda:0'", "the run's device"],
         setup=_edit_config("run", lambda r: r["config"].update(device="cuda:0")),
         needs_cpu_only=True),
    Case("evaluate-data-gone", ["evaluate", "run"], ["missing.npz", "is gone"],
         setup=_edit_config("run", lambda r: r["data"].update(path="missing.npz"))),
    Case("evaluate-data-changed", ["evaluate", "run"], ["data.npz", "changed since training"],
         setup=_change_data),
    Case("diagnose-out-is-file", ["diagnose", "run", "--out", "notes.txt"],
         ["'notes.txt'", "not a directory"]),
    Case("diagnose-would-replace", ["diagnose", "run", "--out", "diag"],
         ["importance.json", "exists", "--force"], setup=_write("diag/importance.json", "{}")),
    Case("diagnose-config-missing-keys", ["diagnose", "run"],
         ["config.json", "missing key config.device"],
         setup=_edit_config("run", _drop("config", "device"))),
    Case("generate-would-replace", ["generate", "run"], ["generated.npz", "exists", "--force"],
         setup=_write("run/generated.npz", b"a user's generations")),
    Case("generate-figure-is-directory", ["generate", "run"], ["generation.png", "directory"],
         setup=_mkdir("run/figures/generation.png")),
    Case("generate-unobserved-prefix", ["generate", "masked_run", "--prefix", 2],
         ["test sequence 0", "not observed at step 0"]),
    Case("generate-non-finite", ["generate", "run", "--checkpoint", "last"],
         ["non-finite", "nothing written"], setup=_blow_up_weights),
    Case("generate-prefix-too-long", ["generate", "run", "--prefix", 6],
         ["prefix length", "got 6"]),
    Case("generate-config-missing-keys", ["generate", "run"], ["config.json", "missing key config"],
         setup=_edit_config("run", _drop("config"))),
    # report
    Case("report-would-replace", ["report", "run", "--out", "notes.md"],
         ["'notes.md'", "exists", "--force"], setup=_write("notes.md", "# mine\n")),
    Case("report-would-replace-a-figure", ["report", "run", "--out", "rep/r.md"],
         ["losses.png", "exists", "--force"], setup=_write("rep/figures/losses.png", b"mine")),
    Case("report-out-is-directory", ["report", "run", "--out", "dir.md"],
         ["'dir.md'", "is a directory"]),
    Case("report-out-not-md", ["report", "run", "--out", "r.txt"], ["'r.txt'", "must end in .md"]),
    Case("report-figures-is-file", ["report", "run", "--out", "rep/r.md"],
         ["figures", "not a directory"], setup=_write("rep/figures", "not a directory\n")),
    Case("report-evaluation-not-json", ["report", "run", "--out", "r.md"],
         ["evaluation.json", "not valid JSON"], setup=_write("run/evaluation.json", "{")),
    Case("report-evaluation-missing-key", ["report", "run", "--out", "r.md"],
         ["evaluation.json", "missing key neg_elbo_mean"],
         setup=_write("run/evaluation.json", json.dumps({"num_samples": 3}))),
    Case("report-config-missing-keys", ["report", "run", "--out", "r.md"],
         ["config.json", "missing key config.flow"],
         setup=_edit_config("run", _drop("config", "flow"))),
    Case("report-metrics-bad-middle-line", ["report", "run", "--out", "r.md"],
         ["metrics.jsonl", "line 1 is not JSON"],
         setup=_write("run/metrics.jsonl", 'garbage\n{"epoch": 2}\n')),
    Case("report-no-epoch", ["report", "stale", "--out", "r.md"],
         ["'stale'", "no completed epoch"], setup=_left_before_first_checkpoint),
    Case("unknown-subcommand", ["frobnicate"], ["invalid choice", "'frobnicate'"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refused_with_one_line_and_nothing_changed(case, place, capsys):
    if case.needs_cpu_only and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if case.setup is not None:
        case.setup(place)
    before = _snapshot(place)
    code, out, err = _run(capsys, *case.argv)
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("pyro-storn") and ": error: " in lines[0], lines[0]
    for part in case.expect:
        assert part in lines[0], (part, lines[0])
    assert _snapshot(place) == before


def test_refused_resume_names_both_digests(place, capsys):
    recorded = json.loads((place / "run" / "config.json").read_text())["data"]["arrays_sha256"]
    code, _, err = _run(capsys, "train", "--data", "other.npz", "--out", "run", "--resume")
    assert code == 2 and recorded in err
    digests = [word.strip("(),;") for word in err.split() if len(word.strip("(),;")) == 64]
    assert len(set(digests)) == 2, err


# ----------------------------------------------------------------------------- read-only places


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` read-only for this process: by mode for a user, by a read-only bind mount for
    root (whom modes do not stop); skipped where neither is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mount = shutil.which("mount")
    done = mount and subprocess.run([mount, "--bind", str(path), str(path)],
                                    capture_output=True).returncode == 0
    if done and subprocess.run([mount, "-o", "remount,bind,ro", str(path)],
                               capture_output=True).returncode != 0:
        subprocess.run(["umount", str(path)], capture_output=True)
        done = False
    if not done:
        pytest.skip("cannot make a read-only directory here (root without mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=True)


@pytest.mark.parametrize("argv, expect", [
    (["evaluate", "run", "--samples", 4, "--psis-samples", 4], ["'run'", "not writable"]),
    (["diagnose", "run", "--num-samples", 4], ["diagnostics", "not writable"]),
    (["generate", "run"], ["generated.npz", "not writable"]),
    (["report", "run"], ["report.md", "not writable"]),
    (["train", "--data", "data.npz", "--out", "run/sub"], ["'run/sub'", "not writable"]),
    (["simulate", "--out", "run/new.npz"], ["new.npz", "not writable"]),
], ids=["evaluate", "diagnose", "generate", "report", "train", "simulate"])
def test_read_only_place_is_refused_before_any_work(argv, expect, place, capsys):
    before = _snapshot(place)
    with _read_only(place / "run"):
        started = time.perf_counter()
        code, _, err = _run(capsys, *argv)
        elapsed = time.perf_counter() - started
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert all(part in lines[0] for part in expect), lines[0]
    assert elapsed < 5, "refused only after the work"
    assert _snapshot(place) == before


# ----------------------------------------------------------------------------- recovery


def _one_warning(err: str, *parts: str) -> str:
    warnings_ = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings_) == 1, err
    assert all(part in warnings_[0] for part in parts), warnings_[0]
    return warnings_[0]


@pytest.mark.parametrize("argv", [
    ["evaluate", "run", "--samples", 4, "--psis-samples", 4],
    ["generate", "run", "--prefix", 2, "--sequences", 2],
    ["diagnose", "run", "--num-samples", 4],
], ids=["evaluate", "generate", "diagnose"])
def test_unreadable_best_falls_back_to_the_last_checkpoint(argv, place, capsys):
    (place / "run" / "best.pt").write_bytes(b"junk" * 40)
    (place / "run" / "best.pt.prev").unlink(missing_ok=True)
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    _one_warning(err, "best.pt", "using the last state", "checkpoint.pt")
    if argv[0] == "evaluate":
        state = json.loads((place / "run" / "evaluation.json").read_text())["checkpoint"]
        assert state == {"which": "last", "epoch": 2}


def test_unreadable_best_does_not_block_resume_or_report(place, capsys):
    (place / "run" / "best.pt").write_bytes(b"junk" * 40)
    (place / "run" / "best.pt.prev").unlink(missing_ok=True)  # validation improved only once
    code, _, err = _run(capsys, "train", "--data", "data.npz", "--out", "run", "--resume",
                        "--epochs", 3, "--quiet")
    assert code == 0, err
    _one_warning(err, "best.pt", "from epoch 3 on")
    assert [r["epoch"] for r in read_metrics(place / "run")] == [1, 2, 3]
    assert (place / "run" / "best.pt").stat().st_size > 200  # rewritten at epoch 3
    code, _, err = _run(capsys, "report", "run", "--out", "r.md")
    assert code == 0 and err == ""


def test_torn_last_metrics_line_resumes(place, capsys):
    metrics = place / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')  # killed mid-append
    code, _, err = _run(capsys, "train", "--data", "data.npz", "--out", "run", "--resume",
                        "--epochs", 3, "--quiet")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(place / "run")] == [1, 2, 3]
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


def test_a_run_left_before_its_first_checkpoint_starts_over(place, capsys):
    _left_before_first_checkpoint(place)
    (place / "stale" / LOCK_NAME).write_text("")  # the unlocked lock file of a killed process
    code, out, err = _run(capsys, "train", "--data", "data.npz", "--out", "stale",
                          "--epochs", 1, *TINY)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "starting over in 'stale'" in lines[0], err
    assert "config.json" in lines[0] and "metrics.jsonl" in lines[0]
    assert [r["epoch"] for r in read_metrics(place / "stale")] == [1]
    assert not (place / "stale" / LOCK_NAME).exists()  # released and removed


def test_forced_outputs_are_replaced(place, capsys):
    (place / "t.npz").write_text("old\n")
    code, _, err = _run(capsys, "simulate", "--out", "t.npz", "--n-sequences", 10, "--n-steps", 6,
                        "--force")
    assert code == 0, err
    with np.load(place / "t.npz") as data:
        assert data["x"].shape == (8, 6, 4)
    assert sorted(p.name for p in place.iterdir() if p.name.startswith(".t.npz")) == []
    assert _run(capsys, "generate", "run", "--sequences", 2)[0] == 0
    assert _run(capsys, "generate", "run", "--sequences", 2)[0] == 2
    assert _run(capsys, "generate", "run", "--sequences", 2, "--force")[0] == 0


@pytest.mark.parametrize("stop, code, word", [(KeyboardInterrupt, EXIT_INTERRUPTED, "interrupted"),
                                              (Terminated, EXIT_TERMINATED, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_before_any_work_is_one_line(place, capsys, monkeypatch, stop, code, word):
    import pyro_storn.cli as cli

    def interrupted(*args, **kwargs):
        raise stop

    monkeypatch.setattr(cli, "build_parser", interrupted)  # as if during the heavy imports
    before = _snapshot(place)
    exit_code, _, err = _run(capsys, "train", "--data", "data.npz", "--out", "new")
    assert exit_code == code and err.strip().splitlines() == [f"pyro-storn: {word}"]
    assert _snapshot(place) == before


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("argv, expect", [
    (["simulate", "--out", "data.npz"], ["'data.npz'", "exists"]),
    (["train", "--data", "other.npz", "--out", "run", "--resume"], ["other data"]),
], ids=["simulate-existing", "resume-other-data"])
def test_refusals_through_the_entry_point(argv, expect, place):
    before = _snapshot(place)
    done = subprocess.run(cli(*argv), env=cli_env(), cwd=place, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert all(part in lines[0] for part in expect), lines[0]
    assert _snapshot(place) == before


def test_lock_refuses_a_second_trainer_and_dies_with_the_first(place, capsys):
    """A second training into the directory is refused at once while the first runs; the first,
    killed before its first checkpoint, leaves a directory a fresh run starts over in."""
    long_data = place / "long.npz"
    assert main(_argv(["simulate", "--out", long_data, "--n-sequences", 3000, "--n-steps",
                       20])) == 0
    run = place / "busy"
    with running("train", "--data", long_data, "--out", run, "--epochs", 50, "--batch-size", 1,
                 "--hidden-dim", 6, "--quiet") as process:
        wait_for(run / "config.json", process)
        assert (run / LOCK_NAME).exists()
        started = time.perf_counter()
        code, _, err = _run(capsys, "train", "--data", "data.npz", "--out", run, *TINY)
        assert time.perf_counter() - started < 5  # at once, not after the other finishes
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "is in use" in lines[0], err
        assert str(run) in lines[0]
        assert not (run / "checkpoint.pt").exists(), "the first epoch ended too soon"
        sigkill(process)
    assert not (run / "checkpoint.pt").exists()
    code, _, err = _run(capsys, "train", "--data", "data.npz", "--out", run, "--epochs", 1,
                        *TINY)
    assert code == 0, err
    assert "starting over" in err and len(err.strip().splitlines()) == 1
    assert [r["epoch"] for r in read_metrics(run)] == [1]


STOPS = {signal.SIGINT: (EXIT_INTERRUPTED, "interrupted"),
         signal.SIGTERM: (EXIT_TERMINATED, "terminated")}


def _training(out: str, epochs: int = 100000) -> list[str]:
    # Epochs enough that a signal landing in training never lands in the last one (the run
    # would then be complete, and exit 0).
    return ["train", "--data", "data.npz", "--out", out, *TINY, "--epochs", str(epochs)]


def _start(place: Path, command: list[str]) -> subprocess.Popen:
    # SIGINT at its default in the child, as in a terminal.
    return subprocess.Popen(command, env=cli_env(), cwd=place, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _start_training(place: Path, out: str) -> subprocess.Popen:
    return _start(place, cli(*_training(out)))


@contextlib.contextmanager
def _side_by_side(place: Path, commands: list[list[str]]):
    """The processes of ``commands``, started at once; killed and reaped on the way out."""
    processes = [_start(place, command) for command in commands]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=TIMEOUT_S)


def _stopped_in_one_line(process: subprocess.Popen, signum: int, out: Path) -> None:
    """``process`` stopped by ``signum``: exit 128 + N, one line naming it, and ``out`` absent,
    resumable, or holding only what a run leaves before its first checkpoint."""
    code, word = STOPS[signum]
    _, err = process.communicate(timeout=TIMEOUT_S)
    lines = err.strip().splitlines()
    assert process.returncode == code and len(lines) == 1, err
    assert word in lines[0] and "Traceback" not in err
    if not out.exists():
        return
    contents = run_contents(out)
    assert not contents.other, contents
    if contents.trained:  # the signal came late, in training: a checkpoint to resume from
        assert "--resume" in lines[0]
    else:  # before the loop: what a fresh train starts over in
        assert contents.left_before_checkpoint or contents.empty, contents


@pytest.mark.parametrize("signum", sorted(STOPS), ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_the_first_second_is_one_line(place, signum):
    process = _start_training(place, "new")
    time.sleep(1.0)  # starting up: still importing torch on a loaded machine
    process.send_signal(signum)
    _stopped_in_one_line(process, signum, place / "new")


def _runs_main(pid: int) -> bool:
    """Whether ``pid`` catches SIGTERM, which pyro-storn's main sets up first (Python itself
    does not): the moment from which a stop is the program's to handle."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _signal_after_main_starts(process: subprocess.Popen, signum: int, delay: float) -> None:
    while process.poll() is None and not _runs_main(process.pid):
        time.sleep(0.001)
    time.sleep(delay)
    process.send_signal(signum)  # none to a process that ended: its exit code tells


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
def test_a_stop_at_any_moment_of_start_up_is_one_line(place):
    """Ctrl-C or SIGTERM at delays from the moment main runs, while torch, NumPy, SciPy and
    Pyro are imported (and torch._dynamo, which the first optimiser imports): one line, exit
    128 + N. Side by side, to keep this short; the narrow windows where a raise used to break
    start-up are hit on purpose in the next test."""
    cases = [(signal.SIGINT, delay) for delay in (0.05, 0.2, 0.4, 0.8)] + [(signal.SIGTERM, 0.2)]
    commands = [cli(*_training(f"new{i}")) for i in range(len(cases))]
    with _side_by_side(place, commands) as processes:
        senders = [threading.Thread(target=_signal_after_main_starts, args=(process, *case))
                   for process, case in zip(processes, cases)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        for i, (process, (signum, _)) in enumerate(zip(processes, cases)):
            _stopped_in_one_line(process, signum, place / f"new{i}")


def test_a_stop_inside_the_imports_torch_makes_is_one_line(place):
    """A signal that lands while torch's C init imports NumPy. Raised there, the
    KeyboardInterrupt was swallowed by torch (in numpy._core._multiarray_umath: the run went on
    to its end, exit 0) or left NumPy half-imported (in numpy.lib: RecursionError, exit 1)."""
    cases = [("numpy.lib", signal.SIGINT), ("numpy._core._multiarray_umath", signal.SIGTERM)]
    # 50 epochs: a lost signal shows as a run to its end in seconds, not a timeout
    commands = [cli_stopped_while_importing(module, signum, *_training(f"new{i}", epochs=50))
                for i, (module, signum) in enumerate(cases)]
    with _side_by_side(place, commands) as processes:
        for i, (process, (_, signum)) in enumerate(zip(processes, cases)):
            _stopped_in_one_line(process, signum, place / f"new{i}")
