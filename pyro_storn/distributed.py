"""Data-parallel SVI on ``torch.distributed``: the ELBO as a module, wrapped in DDP, launched by
``torchrun``.

Pyro's :class:`~pyro.infer.elbo.ELBOModule` (``Trace_ELBO()(model, guide)``) turns a model and a
guide that are ``nn.Module``\\ s into one ``nn.Module`` whose ``forward(*batch)`` is the
differentiable loss. :class:`ProgramModule` makes ``storn.model`` and ``storn.guide`` such
modules, so the STORN parameters are the loss module's own parameters (not only entries of Pyro's
param store) and :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces their gradients.
The rest is the standard PyTorch recipe: a :class:`~torch.utils.data.DistributedSampler` with
``set_epoch`` shards each epoch's shuffle (a function of ``(seed, epoch)``), ``torch.optim.Adam``
with ``clip_grad_norm_`` steps, gloo on CPU and nccl on CUDA, the loss all-reduced once per
epoch for logging, and only rank 0 writes ``metrics.jsonl``, checkpoints and reports. Every rank
loads the checkpoint on resume.

The objective per step is the loss **per sequence** (the batch's negative ELBO divided by the
batch size). DDP averages gradients over ranks, so ``W`` ranks with ``B`` sequences each take
exactly the step one process takes with ``W * B`` sequences.

With ``example_noise=True`` (the default) the guide's reparameterisation noise for sequence ``i``
in epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)`` (:class:`ExampleNoise`), so a
run's numbers do not depend on the number of ranks nor on how batches are split, and a resumed
run needs no per-rank RNG state. The same loop runs single-process when no process group exists
(world size 1), which is how the tests compare a 2-rank run with one process on the union of
the two ranks' batches.

Launch (see ``docs/distributed.md``)::

    torchrun --nproc_per_node 4 -m pyro_storn.cli train --distributed --data d.npz --out run

Ctrl-C or a killed rank stops all ranks (torchrun tears the group down); ``--resume`` continues
from the last epoch checkpoint (this path writes checkpoints at epoch ends only).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.distributions import Independent, Normal, TransformedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .training import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    FitResult,
    NonFiniteLossError,
    _finite_module,
    _truncate_metrics,
    read_metrics,
)

__all__ = [
    "OPTIMIZER_NAME",
    "DistributedEnv",
    "DistributedFitResult",
    "ExampleNoise",
    "ProgramModule",
    "fit_elbo_module",
    "init_distributed",
    "process_rank",
    "train_distributed",
]

# Written into checkpoints of this path; the single-process fit (Pyro optimiser state) refuses
# them and this path refuses the others, instead of loading an optimiser state of the wrong kind.
OPTIMIZER_NAME = "torch.optim.Adam"
# Process-group timeout: rank 0 computes the epoch metrics on the full data while the other
# ranks wait in the next all-reduce, which may take minutes on a large data set.
_GROUP_TIMEOUT = timedelta(minutes=30)
# Mixing constants of the per-example seed: within one run seed, distinct (epoch, example, draw)
# get distinct generator seeds for epochs < 1_000_003, examples < 1_000_000_007 and draws
# (particles) < 8_191 per step (their span, ~8e18, stays below the 2**63 modulus).
_SEED_PRIMES = (1_000_003, 1_000_000_007, 8_191)
_SEED_MODULUS = 2**63
# torch >= 2.13 names the flag ``forward_sync_buffers`` and deprecates ``broadcast_buffers``.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def process_rank() -> int:
    """This process's global rank under ``torchrun`` (``RANK``), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class DistributedEnv:
    """Where this process sits: its rank, the world size, its device, and whether
    :func:`init_distributed` created the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str | torch.device = "cpu") -> DistributedEnv:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): gloo for ``cpu``, nccl for ``cuda`` with one GPU per
    process (``cuda:LOCAL_RANK``). Without those variables, or with a world size of 1, there is
    no group: world size 1 on ``device``. An existing group is used as it is."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        owns = False
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = process_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        owns = world_size > 1
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        if device.index is not None:
            torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=_GROUP_TIMEOUT, **kwargs)
    return DistributedEnv(rank, world_size, local_rank, device, owns)


def _example_seed(seed: int, epoch: int, index: int, draw: int) -> int:
    a, b, c = _SEED_PRIMES
    return (((seed * a + epoch) * b + index) * c + draw) % _SEED_MODULUS


class ExampleNoise(Messenger):
    """Draws the reparameterisation noise of the guide's ``site`` per example: the standard
    normal noise of example ``i`` in epoch ``e``, ``k``-th draw of the step (particles), comes
    from a generator seeded by ``(seed, e, i, k)``. Then the value is exactly what the
    distribution's ``rsample`` computes (``loc + scale * eps``, pushed through any transforms),
    but it does not depend on which rank, batch or batch position the example landed in.

    :meth:`set_batch` before each step tells it the epoch and the batch's example indices; the
    site's first batch dim must be the example dim. Supported: ``Normal`` bases under
    ``Independent`` and ``TransformedDistribution`` (every STORN guide).
    """

    def __init__(self, site: str = "z", seed: int = 0):
        super().__init__()
        self.site, self.seed = site, int(seed)
        self.epoch = 0
        self.index: list[int] | None = None
        self._draws = 0
        self._generator = torch.Generator()

    def set_batch(self, epoch: int, index: Sequence[int]) -> None:
        self.epoch, self.index, self._draws = int(epoch), [int(i) for i in index], 0

    def noise(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Standard normal noise of ``shape`` = (examples, ...), one generator per example."""
        if self.index is None:
            raise RuntimeError("ExampleNoise.set_batch(epoch, index) must be called first")
        if len(shape) == 0 or shape[0] != len(self.index):
            raise ValueError(f"site {self.site!r}: expected the example dim first, of size "
                             f"{len(self.index)}, got batch shape {tuple(shape)}")
        draw, self._draws = self._draws, self._draws + 1
        rows = []
        for i in self.index:
            self._generator.manual_seed(_example_seed(self.seed, self.epoch, i, draw))
            rows.append(torch.randn(shape[1:], generator=self._generator, dtype=dtype))
        # Drawn on the host, moved once per batch like the data.
        return torch.stack(rows).to(device, non_blocking=True)

    def _sample(self, fn: Any) -> torch.Tensor:
        if isinstance(fn, TransformedDistribution):
            value = self._sample(fn.base_dist)
            for transform in fn.transforms:
                value = transform(value)  # fills each transform's cache, as rsample does
            return value
        if isinstance(fn, Independent):
            return self._sample(fn.base_dist)
        if isinstance(fn, Normal):
            eps = self.noise(fn.batch_shape, fn.loc.dtype, fn.loc.device)
            return fn.loc + fn.scale * eps
        raise ValueError(f"ExampleNoise supports Normal, Independent and TransformedDistribution "
                         f"at site {self.site!r}, got {type(fn).__name__}")

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] != self.site or msg["is_observed"] or msg["value"] is not None:
            return
        msg["value"] = self._sample(msg["fn"])  # a set value makes Pyro skip its own draw


class ProgramModule(nn.Module):
    """A Pyro program bound to a module (``storn.model``, ``storn.guide``) as an ``nn.Module``,
    so that :class:`~pyro.infer.elbo.ELBOModule` registers that module's parameters.

    >>> loss = pyro.infer.Trace_ELBO()(ProgramModule(storn, "model"),
    ...                                ProgramModule(storn, "guide"))  # doctest: +SKIP
    >>> loss(x, mask).backward()                                       # doctest: +SKIP
    """

    def __init__(self, owner: nn.Module, program: str, noise: ExampleNoise | None = None):
        super().__init__()
        if not callable(getattr(owner, program, None)):
            raise ValueError(f"{type(owner).__name__} has no program {program!r}")
        self.owner, self.program, self.noise = owner, program, noise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        program = getattr(self.owner, self.program)
        if self.noise is None:
            return program(*args, **kwargs)
        with self.noise:
            return program(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"program={self.program!r}, example_noise={self.noise is not None}"


@dataclass
class DistributedFitResult(FitResult):
    """:class:`~pyro_storn.training.FitResult` plus the world size and the trained module."""

    world_size: int = 1
    module: nn.Module | None = None


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _replica_divergence(module: nn.Module, env: DistributedEnv) -> float:
    """The largest |difference| of any parameter between rank 0 and any other rank (0 when all
    replicas agree, as DDP promises); one broadcast of the parameters, at checkpoints only."""
    if env.world_size == 1:
        return 0.0
    largest = torch.zeros((), device=env.device)
    for param in module.parameters():
        reference = param.detach().clone()
        dist.broadcast(reference, src=0)
        largest = torch.maximum(largest, (param.detach() - reference).abs().max())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def fit_elbo_module(
    loss_module: nn.Module,
    module: nn.Module,
    data: Sequence[torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    run_dir: str | os.PathLike,
    env: DistributedEnv | None = None,
    seed: int = 0,
    lr: float = 1e-3,
    clip_norm: float = 10.0,
    epoch_metrics: Callable[[int], dict[str, Any]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    before_step: Callable[[int, list[int]], None] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
    validate: bool | None = None,
) -> DistributedFitResult:
    """Train the parameters of ``loss_module`` (e.g. an ``ELBOModule`` whose ``forward(*batch)``
    is the loss summed over the batch) with Adam on ``batch_size`` examples per rank, under DDP
    when ``env`` has more than one rank.

    :param module: the module whose ``state_dict`` is checkpointed (e.g. the STORN); its
        parameters must be those of ``loss_module``.
    :param data: tensors sharing their first dim; every rank holds all of them and takes its
        shard through a :class:`~torch.utils.data.DistributedSampler`; each batch is moved to
        ``env.device`` once.
    :param before_step: called with the 0-based epoch and the batch's example indices before
        each step (e.g. :meth:`ExampleNoise.set_batch`).
    :param clip_norm: ``clip_grad_norm_`` over all parameters together (global norm).
    :param validate: Pyro's and torch's argument validation of distributions during training;
        each check waits for the device, so the default (``None``) is on for CPU and off for
        CUDA, where NaN parameters then show up as a non-finite loss at the next check.
    The other arguments are those of :func:`pyro_storn.training.fit`.
    """
    _check_positive(epochs=epochs, batch_size=batch_size, checkpoint_every=checkpoint_every,
                    log_every=log_every)
    if not data:
        raise ValueError("data must hold at least one tensor")
    n = data[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in data):
        raise ValueError(f"data tensors must share a non-zero first dim, got "
                         f"{[tuple(t.shape) for t in data]}")
    env = env or DistributedEnv()
    device = env.device
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME

    pyro.clear_param_store()
    module.to(device)
    loss_module.to(device)
    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    start_epoch = 0
    if resume:
        if not checkpoint_path.exists() and not (run_dir / (CHECKPOINT_NAME + ".prev")).exists():
            raise ValueError(f"no checkpoint in {str(run_dir)!r} to resume from")
        state = load_checkpoint(checkpoint_path, map_location=device)  # on every rank
        if state.get("optimizer") != OPTIMIZER_NAME:
            raise ValueError(f"{checkpoint_path} was written by the single-process trainer; "
                             "resume it without --distributed")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optim"])
        start_epoch = state["epoch"]
        set_rng_state(state["rng"])
        if env.is_primary:
            _truncate_metrics(run_dir, start_epoch)
    else:
        # Without ExampleNoise each rank needs its own stream of guide draws.
        pyro.set_rng_seed(seed + env.rank)
        if env.is_primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / METRICS_NAME).write_text("")
    step_module: nn.Module = loss_module
    if env.world_size > 1:
        # Buffers (data statistics) are set identically on every rank and synced once at
        # construction; no broadcast in every forward.
        step_module = DistributedDataParallel(loss_module, **_NO_FORWARD_BUFFER_SYNC)
    sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    n_local = len(sampler)
    n_batches = math.ceil(n_local / batch_size)
    last_good: Path | None = checkpoint_path if resume else None

    def save(epoch: int) -> None:
        nonlocal last_good
        if not _finite_module(module):
            return  # never replace a good checkpoint with a broken one
        save_checkpoint(checkpoint_path, {
            "module": module.state_dict(), "optim": optimizer.state_dict(),
            "optimizer": OPTIMIZER_NAME, "epoch": epoch, "batch": 0, "epoch_losses": None,
            "seed": seed, "rng": rng_state(), "world_size": env.world_size,
            "extra": extra_state or {},
        })
        last_good = checkpoint_path

    def check(losses: torch.Tensor, epoch: int, done: int) -> None:
        # Every rank takes the same decision, or the others would wait forever in the next
        # all-reduce: the count of non-finite losses is summed over ranks.
        finite = torch.isfinite(losses[:done])
        bad = (~finite).sum()
        if env.world_size > 1:
            dist.all_reduce(bad)
        if int(bad):
            local_bad = (~finite).nonzero()
            where = int(local_bad[0]) if local_bad.numel() else done - 1
            raise NonFiniteLossError(epoch + 1, where + 1, float(losses[where]), last_good)

    bar = tqdm(total=(epochs - start_epoch) * n_batches, unit="batch", dynamic_ncols=True,
               disable=not (progress and env.is_primary))
    completed = start_epoch
    validation = device.type != "cuda" if validate is None else validate
    with pyro.validation_enabled(validation):
        for epoch in range(start_epoch, epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)
            losses = torch.full((n_batches,), float("nan"), device=device)
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            started = time.perf_counter()
            for b in range(n_batches):
                index = order[b * batch_size : (b + 1) * batch_size]
                index_tensor = torch.tensor(index)
                batch = tuple(t[index_tensor].to(device, non_blocking=True) for t in data)
                if before_step is not None:
                    before_step(epoch, index)
                try:
                    batch_loss = step_module(*batch)
                except ValueError as error:
                    # NaN parameters surface as distribution-argument errors; replicas are
                    # identical, so every rank sees them in the same step.
                    if _finite_module(module):
                        raise
                    raise NonFiniteLossError(epoch + 1, b + 1, float("nan"), last_good) from error
                # The mean over the batch: DDP's average over ranks is then the mean over the
                # union of the ranks' batches, the gradient one process would take.
                (batch_loss / len(index)).backward()
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[b] = batch_loss.detach()
                done = b + 1
                if done % log_every == 0 or done == n_batches:
                    check(losses, epoch, done)
                    recent = losses[max(0, done - log_every):done]
                    if env.is_primary and progress:
                        per_sequence = float(recent.mean()) / batch_size
                        bar.set_postfix(loss=f"{per_sequence:.4g}/seq (rank 0)")
                bar.update(1)
            # Logging only: the epoch's loss summed over ranks, divided by the examples seen
            # (a few of which are repeated when n is not a multiple of the world size).
            totals = torch.stack([losses.sum(), losses.new_tensor(float(n_local))])
            if env.world_size > 1:
                dist.all_reduce(totals)
            train_loss = float(totals[0] / totals[1])
            due = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
            divergence = _replica_divergence(module, env) if due else None
            if env.is_primary:
                record: dict[str, Any] = {
                    "epoch": epoch + 1, "train_loss": train_loss,
                    "epoch_seconds": time.perf_counter() - started, "world_size": env.world_size,
                }
                if divergence is not None:
                    record["replica_max_abs_diff"] = divergence
                if epoch_metrics is not None:
                    record.update(epoch_metrics(epoch + 1))
                with open(run_dir / METRICS_NAME, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if due:
                    save(epoch + 1)
            elif due:
                last_good = checkpoint_path
            completed = epoch + 1
    bar.close()
    env.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    return DistributedFitResult(
        epochs_completed=completed, interrupted=False, checkpoint=last_good,
        history=read_metrics(run_dir) if env.is_primary else [],
        world_size=env.world_size, module=module,
    )


def train_distributed(
    data: Any,
    run_dir: str | os.PathLike,
    config: Any,
    *,
    data_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    example_noise: bool = True,
    log_every: int = 10,
) -> DistributedFitResult:
    """:func:`pyro_storn.runs.train` on ``torch.distributed``: STORN on ``data``
    (:class:`~pyro_storn.data.sequences.SequenceData`) into ``run_dir`` with ``config``
    (:class:`~pyro_storn.runs.TrainConfig`, whose ``batch_size`` is per rank). Joins the
    ``torchrun`` process group (or runs with world size 1 without one), and leaves it at the end
    if it created it. On ``resume`` the stored config is used with ``config.epochs`` as the
    new total, as in the single-process path."""
    from .evaluation import sequence_metrics
    from .runs import CONFIG_NAME, TrainConfig, _make_loss, build_storn, run_record

    run_dir = Path(run_dir)
    if resume:
        stored = json.loads((run_dir / CONFIG_NAME).read_text())
        config = TrainConfig.from_dict({**stored["config"], "epochs": config.epochs})
    config.validate()
    if config.validation_fraction:
        raise ValueError(f"validation_fraction={config.validation_fraction}: holding out "
                         "validation sequences (best.pt) is not supported by the distributed "
                         "trainer; train without --distributed")
    if config.init_from:
        raise ValueError(f"init_from={config.init_from!r}: warm-starting is not supported by the "
                         "distributed trainer; train without --distributed")
    env = init_distributed(config.device)
    try:
        x, mask = torch.from_numpy(data.x), torch.from_numpy(data.mask)
        x_test, mask_test = torch.from_numpy(data.x_test), torch.from_numpy(data.mask_test)
        pyro.set_rng_seed(config.seed)  # the same initial parameters on every rank
        storn = build_storn(data.input_dim, config)
        storn.set_data_statistics(x, mask)
        storn.to(env.device)
        env.barrier()  # every rank has checked the run directory before rank 0 writes to it
        if env.is_primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {
                **run_record(config, storn, data, data_path),
                "distributed": {
                    "world_size": env.world_size, "batch_size_per_rank": config.batch_size,
                    "effective_batch_size": config.batch_size * env.world_size,
                    "backend": dist.get_backend() if env.world_size > 1 else None,
                    "optimizer": OPTIMIZER_NAME, "example_noise": example_noise,
                },
            }
            (run_dir / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")

        noise = ExampleNoise("z", seed=config.seed) if example_noise else None
        loss_module = _make_loss(config)(ProgramModule(storn, "model"),
                                         ProgramModule(storn, "guide", noise))

        def before_epoch(epoch: int) -> None:
            if config.kl_anneal_epochs:
                storn.kl_weight = min(1.0, (epoch + 1) / config.kl_anneal_epochs)

        def epoch_metrics(epoch: int) -> dict[str, Any]:  # rank 0 only
            metrics: dict[str, Any] = {"kl_weight": storn.kl_weight}
            for split, (xs, ms) in (("train", (x, mask)), ("test", (x_test, mask_test))):
                values = sequence_metrics(storn, xs, ms)
                metrics.update({f"{split}/{name}": value for name, value in values.items()})
            return metrics

        return fit_elbo_module(
            loss_module, storn, (x, mask), epochs=config.epochs, batch_size=config.batch_size,
            run_dir=run_dir, env=env, seed=config.seed, lr=config.lr, clip_norm=config.clip_norm,
            epoch_metrics=epoch_metrics, before_epoch=before_epoch,
            before_step=None if noise is None else noise.set_batch,
            checkpoint_every=config.checkpoint_every, resume=resume, extra_state={
                "model": storn.config()}, progress=progress, log_every=log_every,
        )
    finally:
        env.close()
