"""Data-parallel SVI (DDP under torchrun, gloo on loopback), per-example noise, and the host
syncs of the training loops (the device-generic code paths, exercised on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pyro_storn import STORN
from pyro_storn.checkpoint import load_checkpoint
from pyro_storn.cli import main
from pyro_storn.data.sequences import load_sequences
from pyro_storn.distributed import (
    DistributedEnv,
    ExampleNoise,
    ProgramModule,
    init_distributed,
)
from pyro_storn.rundir import LOCK_NAME, lock_run
from pyro_storn.runs import TrainConfig, build_storn, train
from pyro_storn.training import CHECKPOINT_NAME, NonFiniteLossError, Optimizer, fit, read_metrics

REPO = Path(__file__).resolve().parents[1]
FLOW = ["--flow", "planar", "--flow-length", "2"]
TINY = ["--hidden-dim", "6", "--latent-dim", "2", "--quiet"]
RANKS, PER_RANK_BATCH = 2, 2
LAUNCH_TIMEOUT_S = 240  # generous: a loaded 2-core machine needs ~20 s to start two workers


def _storn(seed: int = 0, flow: str | None = "planar") -> STORN:
    pyro.set_rng_seed(seed)
    storn = STORN(3, 2, 6, flow=flow, flow_length=2 if flow else 0)
    storn.set_data_statistics(torch.randn(8, 5, 3))
    return storn


# ---- the loss as a module ----------------------------------------------------------------------


def test_elbo_module_owns_every_storn_parameter():
    storn = _storn()
    loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"), ProgramModule(storn, "guide"))
    assert {id(p) for p in loss.parameters()} == {id(p) for p in storn.parameters()}
    value = loss(torch.randn(4, 5, 3))
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in storn.parameters())
    with pytest.raises(ValueError, match="no program 'prior_only'"):
        ProgramModule(storn, "prior_only")


def test_example_noise_is_a_function_of_the_example_not_the_batch():
    storn = _storn()
    x = torch.randn(6, 5, 3)
    noise = ExampleNoise("z", seed=7)
    guide = ProgramModule(storn, "guide", noise)
    noise.set_batch(epoch=2, index=[10, 11, 12, 13, 14, 15])
    z_all = guide(x)
    noise.set_batch(epoch=2, index=[13, 11])  # the same examples, another batch, another order
    z_pair = guide(x[[3, 1]])
    torch.testing.assert_close(z_pair, z_all[[3, 1]], rtol=0, atol=1e-6)
    noise.set_batch(epoch=3, index=[13, 11])
    assert not torch.allclose(guide(x[[3, 1]]), z_pair)
    # Two draws in one step (particles) are different draws.
    noise.set_batch(epoch=2, index=[13, 11])
    first, second = guide(x[[3, 1]]), guide(x[[3, 1]])
    assert torch.equal(first, z_pair) and not torch.allclose(first, second)


def test_example_noise_draws_what_rsample_draws():
    """The value is loc + scale * eps pushed through the flow: compare with the reference
    sample for the same eps, and with the density the guide's distribution gives it."""
    storn = _storn()
    x = torch.randn(3, 5, 3)
    noise = ExampleNoise("z", seed=1)
    noise.set_batch(0, [4, 5, 6])
    trace = pyro.poutine.trace(ProgramModule(storn, "guide", noise)).get_trace(x)
    z = trace.nodes["z"]["value"]
    noise.set_batch(0, [4, 5, 6])
    eps = noise.noise(torch.Size([3, 5, 2]), torch.float32, torch.device("cpu"))
    loc, scale, state = storn.encode(x)
    expected = storn.flow.condition(state)(loc + scale * eps)
    torch.testing.assert_close(z, expected)
    assert torch.isfinite(trace.nodes["z"]["fn"].log_prob(z)).all()
    z.sum().backward()  # reparameterised: gradients reach the encoder
    assert storn.encoder_rnn.weight_ih_l0.grad.abs().sum() > 0


def test_example_noise_errors():
    noise = ExampleNoise("z")
    with pytest.raises(RuntimeError, match="set_batch"):
        noise.noise(torch.Size([2, 3]), torch.float32, torch.device("cpu"))
    noise.set_batch(0, [1, 2])
    with pytest.raises(ValueError, match="example dim first, of size 2"):
        noise.noise(torch.Size([3, 3]), torch.float32, torch.device("cpu"))

    def guide():
        pyro.sample("z", dist.Gamma(torch.ones(2), 1.0))

    with pytest.raises(ValueError, match="got Gamma"), noise:
        guide()


def test_init_distributed_without_torchrun_is_world_size_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.owns_group, env.device) == (0, 1, False,
                                                                      torch.device("cpu"))
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        init_distributed("mps")


# ---- world size 1: the same path, resume ----------------------------------------------------


def _config(**kwargs) -> TrainConfig:
    values = dict(flow="planar", flow_length=2, hidden_dim=6, latent_dim=2, epochs=3,
                  batch_size=RANKS * PER_RANK_BATCH, seed=3)
    values.update(kwargs)
    return TrainConfig(**values)


def test_resumed_run_equals_uninterrupted_run(tmp_path, pendulum):
    data = load_sequences(pendulum)
    full = train(data, tmp_path / "full", _config(), progress=False, distributed=True)
    train(data, tmp_path / "part", _config(epochs=2), progress=False, distributed=True)
    resumed = train(data, tmp_path / "part", _config(), resume=True, progress=False,
                    distributed=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    drop = ("epoch_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in resumed.history]
            == [{k: v for k, v in r.items() if k not in drop} for r in full.history])
    for name, value in full.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]


def test_checkpoints_move_between_the_single_process_and_the_distributed_run(tmp_path, pendulum):
    """One loop: a run started in one process continues under --distributed and back, and with
    the per-example noise it is the run that never moved."""
    data = load_sequences(pendulum)
    straight = train(data, tmp_path / "straight", _config(), progress=False, example_noise=True)
    moved = tmp_path / "moved"
    train(data, moved, _config(epochs=1), progress=False, example_noise=True)
    train(data, moved, _config(epochs=2), resume=True, progress=False, distributed=True)
    back = train(data, moved, _config(epochs=3), resume=True, progress=False, example_noise=True)
    drop = ("epoch_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in back.history]
            == [{k: v for k, v in r.items() if k not in drop} for r in straight.history])
    common = ["--data", str(pendulum), *TINY]
    for first, then in ((["--distributed"], []), ([], ["--distributed"])):
        run = tmp_path / ("cli" + "".join(first))
        assert main(["train", "--out", str(run), "--epochs", "1", *first, *common]) == 0
        assert main(["train", "--out", str(run), "--epochs", "2", "--resume", *then,
                     *common]) == 0
        assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


# ---- two processes under torchrun ---------------------------------------------------------------

WORKER = """
import os, sys, torch, torch.distributed as dist
from pyro_storn.cli import main
from pyro_storn.data.sequences import load_sequences
from pyro_storn.runs import TrainConfig, train

data_path, run_dir, out_dir, single_dir = sys.argv[1:5]
dist.init_process_group("gloo")  # the library joins this group and leaves it alone
rank = dist.get_rank()
# Epoch 1 through the CLI, as a user runs it ...
code = main(["train", "--distributed", "--data", data_path, "--out", run_dir, "--epochs", "1",
             "--batch-size", "{batch}", "--seed", "3", *{flow}, *{tiny}])
assert code == 0, code
# ... then --resume on every rank through the library, to get each rank's module.
result = train(load_sequences(data_path), run_dir, TrainConfig(epochs=3), resume=True,
               progress=False, distributed=True)
torch.save(result.module.state_dict(), os.path.join(out_dir, f"rank{{rank}}.pt"))
# A run a single process started continues on both ranks.
train(load_sequences(data_path), single_dir, TrainConfig(epochs=2), resume=True, progress=False,
      distributed=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_stay_identical_and_match_one_process_on_the_union(tmp_path, pendulum):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER).format(batch=PER_RANK_BATCH, flow=FLOW, tiny=TINY))
    started_alone = tmp_path / "started_alone"
    train(load_sequences(pendulum), started_alone, _config(epochs=1), progress=False)
    done = _launch(script, pendulum, tmp_path / "ddp", tmp_path, started_alone, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained ") == 1  # rank 0 reports, rank 1 is silent

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # replicas bit-identical
    history = read_metrics(tmp_path / "ddp")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all(r["world_size"] == RANKS and r["replica_max_abs_diff"] == 0.0 for r in history)
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["distributed"]["effective_batch_size"] == RANKS * PER_RANK_BATCH
    assert config["distributed"]["backend"] == "gloo"

    resumed_alone = read_metrics(started_alone)
    assert [r.get("world_size", 1) for r in resumed_alone] == [1, RANKS]
    # One process, batches of RANKS * PER_RANK_BATCH: each of its batches is the union of the
    # two ranks' batches (the shard deals the same (seed, epoch) shuffle out in turn).
    single = train(load_sequences(pendulum), tmp_path / "single", _config(), progress=False,
                   distributed=True)
    for name, value in single.module.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    np.testing.assert_allclose([r["train_loss"] for r in history],
                               [r["train_loss"] for r in single.history], rtol=1e-5)
    checkpoint = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)["module"]
    assert all(torch.equal(checkpoint[k], v) for k, v in ranks[0].items())  # rank 0 wrote it
    # Training moved the parameters: the comparison is not between two initial states.
    pyro.set_rng_seed(3)
    initial = build_storn(config["data"]["input_dim"], _config()).state_dict()
    assert not torch.allclose(initial["posterior_head.weight"], ranks[0]["posterior_head.weight"],
                              atol=1e-4)


REFUSED_WORKER = """
import contextlib, io, json, os, sys, torch.distributed as dist
from pyro_storn.cli import main
from pyro_storn.data.sequences import load_sequences
from pyro_storn.runs import TrainConfig, train

data_path, run_dir, out_dir = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    train(load_sequences(data_path), run_dir, TrainConfig(epochs=1), progress=False,
          distributed=True)
    library = None
except Exception as error:
    library = [type(error).__name__, str(error)]
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    code = main(["train", "--distributed", "--data", data_path, "--out", run_dir, *{tiny}])
with open(os.path.join(out_dir, f"refused{{rank}}.json"), "w") as handle:
    json.dump({{"library": library, "cli": [code, stderr.getvalue()]}}, handle)
dist.destroy_process_group()
"""


def _launch(script: Path, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` on RANKS gloo ranks under torchrun (loopback, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(RANKS), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=env, cwd=cwd)


def test_a_lock_refused_to_rank_0_stops_every_rank_with_its_error(tmp_path, pendulum):
    """Rank 0 alone takes the run directory's lock; when another process holds it, every rank
    gets rank 0's refusal at once (before, the others waited for rank 0 in the next collective),
    through the library and through the CLI (exit 2, the same one line on every rank)."""
    script = tmp_path / "refused.py"
    script.write_text(textwrap.dedent(REFUSED_WORKER).format(tiny=TINY))
    run = tmp_path / "busy"
    with lock_run(run):  # another trainer holds it
        done = _launch(script, pendulum, run, tmp_path, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    results = [json.loads((tmp_path / f"refused{r}.json").read_text()) for r in range(RANKS)]
    kind, message = results[0]["library"]
    assert kind == "RunLockedError" and "is in use" in message
    assert all(r["library"] == [kind, message] for r in results)
    code, err = results[0]["cli"]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is in use" in lines[0], err
    assert all(r["cli"] == [code, err] for r in results)


# ---- host syncs per step (the GPU path, counted on CPU) -----------------------------------------

# Tensor methods that make the host wait for the device when the tensor lives on an accelerator.
SYNC_METHODS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy",
                "nonzero", "cpu", "__format__", "__repr__", "__str__"}


class _CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _count(run) -> Counter:
    with _CountSyncs() as counter:
        run()
    return counter.counts


def _marginal(run_steps) -> Counter:
    """Syncs of steps 3 and 4: a 4-step run minus a 2-step run."""
    counts = _count(lambda: run_steps(4))
    counts.subtract(_count(lambda: run_steps(2)))
    return +counts


def test_ddp_loop_adds_no_host_sync_per_step(tmp_path):
    def loop(steps: int) -> None:
        storn = _storn(flow="planar")
        noise = ExampleNoise("z")
        loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"),
                                       ProgramModule(storn, "guide", noise))
        fit(loss, storn, (torch.randn(2 * steps, 5, 3),), epochs=1, batch_size=2,
            run_dir=tmp_path / f"loop{steps}", env=DistributedEnv(),
            before_step=noise.set_batch, progress=False, log_every=100)

    def bare(steps: int) -> None:
        storn = _storn(flow="planar")
        noise = ExampleNoise("z")
        loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"),
                                       ProgramModule(storn, "guide", noise))
        optimizer = torch.optim.Adam(storn.parameters(), lr=1e-3, foreach=True)
        x = torch.randn(2 * steps, 5, 3)
        for step in range(steps):
            noise.set_batch(0, [2 * step, 2 * step + 1])
            (loss(x[2 * step : 2 * step + 2]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(list(storn.parameters()), 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # Whatever Pyro's ELBO and torch's Adam do per step (Pyro's NaN warning checks the loss),
    # the loop adds nothing: its own checks run every log_every steps and at the epoch's end.
    assert _marginal(loop) == _marginal(bare)


def test_cuda_default_turns_off_validation_and_its_syncs(tmp_path):
    """On CUDA the loop turns distribution validation off (each check waits for the device):
    exercised here on CPU with ``validate=False``, the loop's per-step syncs are then those of
    a bare step under ``pyro.validation_enabled(False)``, fewer than with validation."""

    def loop(steps: int, validate: bool) -> None:
        storn = _storn(flow="planar")
        loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"),
                                       ProgramModule(storn, "guide"))
        fit(loss, storn, (torch.randn(2 * steps, 5, 3),), epochs=1, batch_size=2,
            run_dir=tmp_path / f"v{validate}{steps}", progress=False, log_every=100,
            validate=validate)

    def bare(steps: int) -> None:
        storn = _storn(flow="planar")
        loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"),
                                       ProgramModule(storn, "guide"))
        x = torch.randn(2 * steps, 5, 3)
        with pyro.validation_enabled(False):
            for step in range(steps):
                (loss(x[2 * step : 2 * step + 2]) / 2).backward()

    quiet = _marginal(lambda steps: loop(steps, False))
    checked = _marginal(lambda steps: loop(steps, True))
    assert quiet["__bool__"] == _marginal(bare)["__bool__"] < checked["__bool__"]
    assert pyro.infer.util.is_validation_enabled()  # restored after the loop


class _Exploding(torch.nn.Module):
    """A one-weight regression whose likelihood scale underflows after ``good_steps`` guide
    calls: a valid distribution, an infinite loss."""

    def __init__(self, good_steps: int):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.good_steps, self.calls = good_steps, 0

    def model(self, x: torch.Tensor) -> None:
        scale = 1e-30 if self.calls > self.good_steps else 1.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(self.linear(x[:, None])[:, 0], scale), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.calls += 1


def test_non_finite_loss_stops_every_rank_and_keeps_the_good_checkpoint(tmp_path):
    module = _Exploding(good_steps=5)  # 4 steps per epoch: the loss explodes in epoch 2, step 2
    loss = pyro.infer.Trace_ELBO()(ProgramModule(module, "model"), ProgramModule(module, "guide"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 2;.*is kept") as error:
        fit(loss, module, (torch.randn(16),), epochs=3, batch_size=4, run_dir=tmp_path,
            optimizer=Optimizer(lr=0.1), progress=False, log_every=1)
    assert (error.value.epoch, error.value.batch) == (2, 2)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["module"].values())
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]
