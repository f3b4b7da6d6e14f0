"""Faults: a training process killed with SIGKILL, or stopped by SIGTERM or Ctrl-C, and resumed;
truncated and corrupted checkpoints (detected, reported in one line naming the file, the previous
one used, never loaded silently). Real ``pyro-storn`` subprocesses."""

from __future__ import annotations

import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch

from cli_processes import TIMEOUT_S, cli, cli_env, running, sigkill, wait_for
from pyro_storn.checkpoint import load_checkpoint, previous_path
from pyro_storn.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from pyro_storn.data.sequences import load_sequences
from pyro_storn.rundir import LOCK_NAME
from pyro_storn.runs import TrainConfig, train
from pyro_storn.training import CHECKPOINT_NAME, read_metrics

TINY = ["--hidden-dim", "6", "--latent-dim", "2", "--batch-size", "4", "--seed", "2", "--quiet"]


def _config(epochs: int) -> TrainConfig:
    return TrainConfig(hidden_dim=6, latent_dim=2, batch_size=4, seed=2, epochs=epochs)


def _uninterrupted(pendulum, run_dir, epochs: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses, so that sums reduce in the same order
    try:
        return train(load_sequences(pendulum), run_dir, _config(epochs), data_path=pendulum,
                     progress=False).history
    finally:
        torch.set_num_threads(threads)


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]


def test_sigkill_mid_run_then_resume_loses_only_the_epochs_since_the_checkpoint(tmp_path,
                                                                                pendulum):
    epochs, run = 15, tmp_path / "run"
    args = ("train", "--data", pendulum, "--out", run, "--epochs", epochs,
            "--checkpoint-every", "1", *TINY)
    with running(*args) as process:
        wait_for(run / CHECKPOINT_NAME, process)
        time.sleep(0.05)  # into the next epoch
        assert process.poll() is None, "the run finished before it could be killed"
        sigkill(process)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a kill during a write falls back to .prev: fine here
        saved_epoch = load_checkpoint(run / CHECKPOINT_NAME)["epoch"]
    before = read_metrics(run)
    assert 1 <= saved_epoch < epochs and saved_epoch <= len(before) <= saved_epoch + 1

    _resume_equals_uninterrupted(tmp_path, pendulum, run, epochs, before, saved_epoch)


def _resume_equals_uninterrupted(tmp_path, pendulum, run, epochs: int, before: list[dict],
                                 saved_epoch: int) -> None:
    """``--resume`` finishes the run, keeps the checkpointed epochs' records and equals a run that
    was never stopped."""
    done = subprocess.run(cli("train", "--data", pendulum, "--out", run, "--epochs", epochs,
                               "--resume", "--quiet"),
                          env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert f"{epochs} epochs" in done.stdout
    after = read_metrics(run)
    assert [r["epoch"] for r in after] == list(range(1, epochs + 1))  # each epoch once
    assert after[:saved_epoch] == before[:saved_epoch]  # checkpointed epochs are not redone
    assert load_checkpoint(run / CHECKPOINT_NAME)["epoch"] == epochs
    expected = _uninterrupted(pendulum, tmp_path / "full", epochs)
    got = _without_time(after)
    for record, reference in zip(got, _without_time(expected)):
        assert record.keys() == reference.keys()
        np.testing.assert_allclose(list(record.values()), list(reference.values()), rtol=1e-5)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, EXIT_TERMINATED, "terminated"),
                                                (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_signal_mid_run_stops_at_a_step_then_resume_equals_uninterrupted(tmp_path, pendulum,
                                                                         signum, code, word):
    """SIGTERM (kill, systemd, SLURM, docker) does what Ctrl-C does: the run stops at the end of
    a step, writes a checkpoint there, releases the lock, says so in one line and exits 128 + N;
    ``--resume`` then continues exactly."""
    epochs, run = 30, tmp_path / "run"
    with running("train", "--data", pendulum, "--out", run, "--epochs", epochs, *TINY) as process:
        wait_for(run / CHECKPOINT_NAME, process)
        time.sleep(0.05)  # into the next epoch
        assert process.poll() is None, "the run finished before the signal"
        process.send_signal(signum)
        assert process.wait(timeout=TIMEOUT_S) == code
        lines = process.stderr.read().decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{word} after"), lines
    assert "--resume" in lines[0] and str(run / CHECKPOINT_NAME) in lines[0]
    assert not (run / LOCK_NAME).exists()  # released
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint itself is good, not its .prev
        state = load_checkpoint(run / CHECKPOINT_NAME)
    before = read_metrics(run)
    assert 1 <= state["epoch"] < epochs and len(before) == state["epoch"]
    _resume_equals_uninterrupted(tmp_path, pendulum, run, epochs, before, state["epoch"])


def _two_epoch_run(pendulum, run_dir) -> list[dict]:
    history = _uninterrupted(pendulum, run_dir, 2)
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["epoch"] == 2
    assert load_checkpoint(previous_path(run_dir / CHECKPOINT_NAME))["epoch"] == 1
    return history


def _truncate(path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def _flip_bytes(path) -> None:
    raw = bytearray(path.read_bytes())
    for offset in (len(raw) // 2, len(raw) - 7):  # in the payload, past the header
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _resume_warning(err: str, run_dir) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(run_dir / CHECKPOINT_NAME) in lines[0]
    assert "using the previous checkpoint" in lines[0] and lines[0].endswith(".prev")
    return lines[0]


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(tmp_path, pendulum):
    run = tmp_path / "run"
    history = _two_epoch_run(pendulum, run)
    _truncate(run / CHECKPOINT_NAME)
    done = subprocess.run(cli("train", "--data", pendulum, "--out", run, "--epochs", "3",
                               "--resume", "--quiet"),
                          env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    line = _resume_warning(done.stderr, run)
    assert "sha256 mismatch" in line or "truncated" in line
    after = read_metrics(run)
    assert [r["epoch"] for r in after] == [1, 2, 3]
    # Epoch 2 was run again from the epoch-1 checkpoint, and came out as it did the first time.
    np.testing.assert_allclose(list(_without_time(after)[1].values()),
                               list(_without_time(history)[1].values()), rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both files are good again
        assert load_checkpoint(run / CHECKPOINT_NAME)["epoch"] == 3
        assert load_checkpoint(previous_path(run / CHECKPOINT_NAME))["epoch"] == 2


@pytest.mark.parametrize("corrupt, reason", [(_flip_bytes, "sha256 mismatch"),
                                             (lambda p: p.write_bytes(b"junk" * 100),
                                              "not a pyro-storn checkpoint")])
def test_corrupt_checkpoint_is_reported_for_resume_and_evaluate(tmp_path, pendulum, capsys,
                                                                corrupt, reason):
    run = tmp_path / "run"
    _two_epoch_run(pendulum, run)
    corrupt(run / CHECKPOINT_NAME)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "2"]) == 0
    assert reason in _resume_warning(capsys.readouterr().err, run)
    assert main(["train", "--data", str(pendulum), "--out", str(run), "--epochs", "3",
                 "--resume", "--quiet"]) == 0
    assert reason in _resume_warning(capsys.readouterr().err, run)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_no_good_checkpoint_is_an_error_not_a_silent_load(tmp_path, pendulum, capsys):
    run = tmp_path / "run"
    _two_epoch_run(pendulum, run)
    _truncate(run / CHECKPOINT_NAME)
    _flip_bytes(previous_path(run / CHECKPOINT_NAME))
    stamp = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--data", str(pendulum), "--out", str(run), "--epochs", "3",
                 "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable checkpoint" in err[0]
    assert str(run / CHECKPOINT_NAME) in err[0] and f"{CHECKPOINT_NAME}.prev" in err[0]
    assert (run / "metrics.jsonl").read_text() == stamp  # nothing was written
    assert main(["evaluate", str(run)]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
