"""The generic fit loop: metrics, checkpoints, exact resume, Ctrl-C and NaN handling."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_storn import STORN
from pyro_storn.checkpoint import (
    FORMAT,
    MAGIC,
    CheckpointError,
    content_digest,
    load_checkpoint,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyro_storn.data.sequences import SequenceData
from pyro_storn.runs import TrainConfig, train
from pyro_storn.training import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    Optimizer,
    elbo_module,
    epoch_permutation,
    fit,
    read_metrics,
)

N, T, D = 12, 6, 2
LOSS_KEYS = ("train_loss", "train/neg_elbo", "test/neg_elbo", "test/kl", "train/sum_log_det")


def _data() -> SequenceData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, D)).cumsum(1).astype(np.float32)
    x_test = rng.normal(size=(4, T, D)).cumsum(1).astype(np.float32)
    mask = np.ones((N, T), dtype=bool)
    mask[0, 4:] = False
    return SequenceData(x, mask, x_test, np.ones((4, T), dtype=bool))


def _config(**kwargs) -> TrainConfig:
    values = dict(hidden_dim=6, epochs=4, batch_size=5, lr=1e-2, seed=3)
    values.update(kwargs)
    return TrainConfig(**values)


def _losses(history):
    return [[record[key] for key in LOSS_KEYS] for record in history]


def test_fit_writes_metrics_and_lowers_the_loss(tmp_path):
    result = train(_data(), tmp_path / "run", _config(epochs=6), progress=False)
    assert result.epochs_completed == 6 and not result.interrupted
    history = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in history] == list(range(1, 7))
    for key in ("train/neg_elbo_per_step", "test/recon_nll", "test/log_q0", "test/log_qK",
                "test/log_prior", "kl_weight", "epoch_seconds"):
        assert all(np.isfinite(r[key]) for r in history), key
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test/neg_elbo"] < history[0]["test/neg_elbo"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    data = _data()
    full = train(data, tmp_path / "full", _config(epochs=4), progress=False)
    train(data, tmp_path / "part", _config(epochs=2), progress=False)
    resumed = train(data, tmp_path / "part", _config(epochs=4), resume=True, progress=False)
    assert resumed.epochs_completed == 4
    assert _losses(resumed.history) == _losses(full.history)  # bit for bit


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    data = _data()
    full = train(data, tmp_path / "full", _config(epochs=3), progress=False)
    # A real SIGINT arrives during the 5th step (epoch 2, batch 2 of 3).
    original = STORN.model
    calls = {"n": 0}

    def model_with_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    STORN.model = model_with_ctrl_c
    try:
        stopped = train(data, tmp_path / "part", _config(epochs=3), progress=False)
    finally:
        STORN.model = original
    assert stopped.interrupted and stopped.epochs_completed == 1
    state = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = train(data, tmp_path / "part", _config(epochs=3), resume=True, progress=False)
    assert _losses(resumed.history) == _losses(full.history)


def test_kl_annealing_reaches_one(tmp_path):
    result = train(_data(), tmp_path / "run", _config(epochs=3, kl_anneal_epochs=2),
                   progress=False)
    assert [r["kl_weight"] for r in result.history] == [0.5, 1.0, 1.0]


def _nan_after(n_good_steps: int, how: str = "loss"):
    """A tiny model whose loss turns NaN after ``n_good_steps`` steps: the log-density itself
    (``how="loss"``), or its parameters (``how="params"``, which Pyro's argument validation
    reports as a ValueError in the next step)."""
    module = torch.nn.Linear(1, 1)
    calls = {"n": 0}

    def model(x):
        pyro.module("net", module)
        # A positive scale that underflows the density: a valid distribution, an infinite loss.
        scale = 1e-30 if how == "loss" and calls["n"] > n_good_steps else 1.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(module(x[:, None])[:, 0] + 1.0, scale), obs=x)

    def guide(x):
        calls["n"] += 1
        if how == "params" and calls["n"] > n_good_steps:
            with torch.no_grad():
                module.weight.fill_(float("nan"))

    return module, model, guide


@pytest.mark.parametrize("how", ["loss", "params"])
def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, how):
    module, model, guide = _nan_after(5, how)  # 4 batches per epoch: NaN in epoch 2, batch 2
    x = torch.randn(16)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 2;.*checkpoint.*is kept") as e:
        fit(pyro.infer.Trace_ELBO()(model, guide), module, (x,), optimizer=Optimizer(lr=0.1),
            epochs=5, batch_size=4, run_dir=tmp_path, progress=False, log_every=1)
    assert (e.value.epoch, e.value.batch) == (2, 2)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["module"].values())
    assert len(read_metrics(tmp_path)) == 1


def test_non_finite_in_first_epoch_writes_no_checkpoint(tmp_path):
    module, model, guide = _nan_after(n_good_steps=1)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        fit(pyro.infer.Trace_ELBO()(model, guide), module, (torch.randn(16),),
            optimizer=Optimizer(lr=0.1), epochs=2, batch_size=4, run_dir=tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_fit_argument_errors(tmp_path):
    module, model, guide = _nan_after(100)
    objective = pyro.infer.Trace_ELBO()(model, guide)
    with pytest.raises(ValueError, match="batch_size"):
        fit(objective, module, (torch.randn(4),), epochs=1, batch_size=0,
            run_dir=tmp_path)
    with pytest.raises(ValueError, match="share a non-zero first dim"):
        fit(objective, module, (torch.randn(4), torch.randn(3)), epochs=1,
            batch_size=2, run_dir=tmp_path)
    with pytest.raises(ValueError, match="no checkpoint"):
        fit(objective, module, (torch.randn(4),), epochs=1, batch_size=2,
            run_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="batch_size is required with data"):
        fit(objective, module, (torch.randn(4),), epochs=1, run_dir=tmp_path)


class _GaussianLocation(torch.nn.Module):
    """A model without data, z ~ N(0, 1), and its guide N(loc, 1): -ELBO = loc^2 / 2."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.tensor(2.0))

    def model(self):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(self):
        pyro.sample("z", dist.Normal(self.loc, 1.0))


def _fit_without_data(run_dir, epochs, **kwargs):
    owner = _GaussianLocation()
    elbo = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    losses, epochs_started = [], []
    result = fit(elbo_module(elbo, owner), owner, None, epochs=epochs, run_dir=run_dir,
                 optimizer=Optimizer(lr=0.1), before_epoch=epochs_started.append,
                 after_step=lambda step, seconds, loss: losses.append(float(loss)),
                 progress=False, **kwargs)
    return owner, result, losses, epochs_started


def test_a_model_without_data_takes_one_step_an_epoch_on_the_objective_alone(tmp_path):
    owner, result, losses, epochs_started = _fit_without_data(tmp_path / "full", 6)
    assert result.steps == result.epochs_completed == 6 and epochs_started == list(range(6))
    assert [r["train_loss"] for r in read_metrics(tmp_path / "full")] == pytest.approx(losses)
    # the first loss is the objective's value at the start, from the loop's seed
    pyro.set_rng_seed(0)
    start = elbo_module(pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True,
                                              max_plate_nesting=0), _GaussianLocation())()
    assert losses[0] == pytest.approx(start.item()) and owner.loc.item() < 2.0
    _fit_without_data(tmp_path / "part", 3)
    _, resumed, _, _ = _fit_without_data(tmp_path / "part", 6, resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in result.history]
    with pytest.raises(ValueError, match="takes no batch_size"):
        _fit_without_data(None, 1, batch_size=4)


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
    a = epoch_permutation(50, seed=1, epoch=3)
    assert torch.equal(a, epoch_permutation(50, seed=1, epoch=3))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_permutation(50, seed=1, epoch=4))
    assert not torch.equal(a, epoch_permutation(50, seed=2, epoch=3))


def test_checkpoint_roundtrip_corruption_and_fallback(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(3.0)})
    save_checkpoint(path, {"epoch": 2, "w": torch.arange(4.0)})
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(previous_path(path))["epoch"] == 1
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.warns(UserWarning, match="sha256 mismatch|truncated"):
        assert load_checkpoint(path)["epoch"] == 1
    flipped = bytearray(raw)
    at = raw.index(torch.arange(4.0).numpy().tobytes())  # the tensor's bytes in the archive
    flipped[at + 5] ^= 0xFF  # one corrupt byte in the payload
    path.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        assert load_checkpoint(path)["epoch"] == 1
    # A corrupt newest file is not rotated over the good previous one.
    save_checkpoint(path, {"epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    assert load_checkpoint(previous_path(path))["epoch"] == 1
    previous_path(path).write_bytes(b"junk")
    path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_checkpoint(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_opens_with_plain_torch_load(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"epoch": 4, "w": torch.arange(3.0)})
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 4 and torch.equal(payload["w"], torch.arange(3.0))
    assert payload["format"] == FORMAT and payload["sha256"] == content_digest(payload)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"sha256": "x"})


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(2)})
    save_checkpoint(path, {"epoch": 2, "w": torch.arange(5.0), "names": ["a", "b"]})
    raw = path.read_bytes()
    at = raw.index(torch.arange(5.0).numpy().tobytes())
    tensor_bytes = set(range(at, at + 20))
    caught = set()
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x41
        path.write_bytes(bytes(flipped))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            payload = load_checkpoint(path)
        fallback = [w for w in seen if "using the previous checkpoint" in str(w.message)]
        if fallback:  # detected: the previous checkpoint
            caught.add(offset)
            assert payload["epoch"] == 1
        else:  # archive bytes that do not change the content (e.g. zip padding)
            assert payload["epoch"] == 2 and torch.equal(payload["w"], torch.arange(5.0))
            assert payload["names"] == ["a", "b"]
    assert tensor_bytes <= caught  # a changed value is always caught


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    buffer = io.BytesIO()
    torch.save({"epoch": 7, "w": torch.ones(2)}, buffer)
    data = buffer.getvalue()
    path = tmp_path / "old.pt"
    path.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    assert load_checkpoint(path)["epoch"] == 7
    path.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data[:-9])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)


def test_rng_state_roundtrip(tmp_path):
    import random

    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_metrics_lines_are_json_and_truncated_on_resume(tmp_path):
    data = _data()
    train(data, tmp_path / "run", _config(epochs=3, checkpoint_every=2), progress=False)
    # The checkpoint is from epoch 3 (the last); fake a stale line from a lost epoch 4.
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 4, "train_loss": -1.0}) + "\n")
    result = train(data, tmp_path / "run", _config(epochs=4), resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["train_loss"] != -1.0


def test_a_run_checkpointed_by_the_replaced_pyro_optimiser_loop_resumes(tmp_path):
    """Checkpoints of the first format with a Pyro optimiser state ({param store name: that
    parameter's Adam state}) resume: the state is matched to the parameters by name."""
    data = _data()
    full = train(data, tmp_path / "full", _config(epochs=3), progress=False)
    part = tmp_path / "part"
    train(data, part, _config(epochs=2), progress=False)
    state = load_checkpoint(part / CHECKPOINT_NAME)
    names = [name for name, _ in STORN(D, 2, 6).named_parameters()]
    adam = state.pop("optim")
    state.pop("optimizer")
    state["optim"] = {f"storn$$${name}": {"state": {0: adam["state"][i]},
                                          "param_groups": adam["param_groups"]}
                      for i, name in enumerate(names)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    for path in (part / CHECKPOINT_NAME, previous_path(part / CHECKPOINT_NAME)):
        path.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    resumed = train(data, part, _config(epochs=3), resume=True, progress=False)
    assert _losses(resumed.history) == _losses(full.history)
