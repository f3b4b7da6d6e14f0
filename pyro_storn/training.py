"""The one training loop: minibatch gradient descent on any objective module, single process or
data-parallel.

Every model here is trained by :func:`fit`: STORN (:mod:`pyro_storn.runs`), the VAE
(:mod:`pyro_storn.vae_fit`), flow densities (:mod:`pyro_storn.density.fit`), and the same STORN
run under ``torchrun`` (DDP is an option of this loop, not a second loop). The objective is an
``nn.Module`` whose ``forward(*batch)`` is the loss **summed** over the batch's examples; for SVI
that is Pyro's ELBO as a module, ``Trace_ELBO()(model, guide)`` (:func:`elbo_module`). Each step
minimises the loss **per example** (the sum divided by the batch size), with
``torch.optim.Adam(foreach=True)`` and one clipping rule, :func:`torch.nn.utils.clip_grad_norm_`
over all parameters together. DDP averages gradients over ranks, so ``W`` ranks with ``B``
examples each take exactly the step one process takes with ``W * B`` examples. A model without
data (an energy, a target density) passes ``data=None``: each step is ``objective()``, whose value
is already the loss (e.g. an ELBO over draws of the guide), and an epoch is that one step.

The loop shows a tqdm bar with the running loss, appends one JSON line per epoch to
``metrics.jsonl`` (the train loss, the learning rate, and whatever ``epoch_metrics`` returns), and
writes checkpoints (:mod:`pyro_storn.checkpoint`: module, optimiser, epoch, position in the epoch,
RNG states) atomically every ``checkpoint_every`` epochs and on Ctrl-C. With ``keep_best=KEY`` the
module's state at the epoch with the lowest ``KEY`` (e.g. a validation -ELBO) is kept in
``best.pt``. ``resume=True`` continues from the checkpoint so that an interrupted and resumed run
gives the same losses as an uninterrupted one: an epoch's order is a function of ``(seed, epoch)``
only and the RNG states are restored. A checkpoint resumes at any world size at an epoch boundary:
a single-process run continues under ``torchrun`` and the reverse.

A non-finite loss stops the run with :class:`NonFiniteLossError` naming the epoch and batch; the
last good checkpoint stays. Losses stay on the device between progress-bar updates, so the loop
waits for an accelerator only every ``log_every`` batches.

Nothing here knows what model it trains.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, previous_path, rng_state
from .checkpoint import save_checkpoint, set_rng_state
from .distributed import DistributedEnv, ProgramModule, all_reduce_sum, replica_divergence
from .interrupts import InterruptFlag, Terminated
from .rundir import load_module_state
from .validation import check_positive_int

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "OPTIMIZER_NAME",
    "FitResult",
    "NonFiniteLossError",
    "Optimizer",
    "elbo_module",
    "epoch_permutation",
    "fit",
    "read_metrics",
    "reraise_interrupt",
    "shard",
    "train_step",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"
# Recorded in checkpoints, so that a checkpoint written with another optimiser is refused by name.
OPTIMIZER_NAME = "torch.optim.Adam"
# Distinct epochs get unrelated shuffles: the generator seed is seed * _EPOCH_STRIDE + epoch.
_EPOCH_STRIDE = 1_000_003
# The separator Pyro's param store puts between a module's name and its parameter's name.
_PYRO_MODULE_SEPARATOR = "$$$"
# Optimiser states of the loops this one replaced (resumable after a conversion by name).
_PYRO_STATE_FORMAT = "pyro_storn.MultiTensorAdam/1"
# torch >= 2.13 names the flag ``forward_sync_buffers`` and deprecates ``broadcast_buffers``.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in DistributedDataParallel.__init__.__code__.co_varnames
    else {"broadcast_buffers": False}
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``epoch`` and ``batch`` are 1-based."""

    def __init__(self, epoch: int, batch: int, value: float, checkpoint: Path | None):
        self.epoch, self.batch, self.value, self.checkpoint = epoch, batch, value, checkpoint
        kept = (f"the last good checkpoint {checkpoint} is kept" if checkpoint
                else "no checkpoint was written")
        super().__init__(
            f"non-finite loss ({value}) at epoch {epoch}, batch {batch}; training stopped, {kept}"
        )


@dataclass
class FitResult:
    """What :func:`fit` did: epochs completed in all, whether Ctrl-C or SIGTERM (``interrupted``,
    the signal in ``stop_signal``) or ``after_step`` (``stopped``) stopped it, the metrics, with
    ``keep_best`` the epoch (1-based) whose state ``best.pt`` holds, the optimiser steps taken and
    the seconds spent in them (callbacks not counted)."""

    epochs_completed: int
    interrupted: bool
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    steps: int = 0
    train_seconds: float = 0.0
    world_size: int = 1
    stopped: bool = False
    module: nn.Module | None = None
    stop_signal: int | None = None


@dataclass(frozen=True)
class Optimizer:
    """Adam and the clipping rule, the same for every model.

    :param lr: the base learning rate.
    :param betas, weight_decay: those of :class:`torch.optim.Adam` (L2 added to the gradient, as
        Pyro's ``ClippedAdam`` and Pyro's DMM example use it).
    :param clip_norm: the gradient of all parameters together is rescaled to at most this
        Euclidean norm (``None``: no clipping).
    :param lr_factor: ``(step, train_seconds) -> factor``, the learning rate of the next step
        being ``lr * factor`` (``None``: constant); a function of the step count (0-based, kept
        in the checkpoint) and the training seconds so far, so a resumed run follows it exactly.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    clip_norm: float | None = 10.0
    lr_factor: Callable[[int, float], float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float))
                                             and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.clip_norm is not None and not (isinstance(self.clip_norm, (int, float))
                                               and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {self.clip_norm!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got "
                             f"{self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def rate(self, step: int, seconds: float) -> float:
        return self.lr * (1.0 if self.lr_factor is None else float(self.lr_factor(step, seconds)))

    def build(self, parameters: list[nn.Parameter]) -> torch.optim.Adam:
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas,
                                weight_decay=self.weight_decay, foreach=True)


def elbo_module(elbo: pyro.infer.ELBO, owner: nn.Module, model: str = "model",
                guide: str = "guide", noise: Any = None) -> nn.Module:
    """``elbo`` bound to ``owner.model`` and ``owner.guide`` as one ``nn.Module`` whose
    ``forward(*batch)`` is the negative ELBO of the batch (Pyro's
    :class:`~pyro.infer.elbo.ELBOModule`), the objective :func:`fit` takes for SVI.

    >>> objective = elbo_module(pyro.infer.Trace_ELBO(), storn)       # doctest: +SKIP
    """
    return elbo(ProgramModule(owner, model), ProgramModule(owner, guide, noise))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` examples in ``epoch`` (0-based), a function of seed and epoch."""
    generator = torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)
    return torch.randperm(n, generator=generator)


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``order``: every ``world_size``-th example, the order padded by its
    own head so that every rank takes the same number of steps (as ``DistributedSampler``)."""
    if world_size == 1:
        return order
    total = math.ceil(len(order) / world_size) * world_size
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[rank::world_size]


def reraise_interrupt(result: FitResult) -> FitResult:
    """``result``, or the ``KeyboardInterrupt`` (:class:`~pyro_storn.interrupts.Terminated` for
    SIGTERM) that stopped it: for callers that evaluate what :func:`fit` trained, since a run
    that Ctrl-C stopped (its checkpoint written) is not a finished one."""
    if result.interrupted:
        raise Terminated() if result.stop_signal == signal.SIGTERM else KeyboardInterrupt()
    return result


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in ``run_dir`` (empty when there is none). A torn last
    line, left by a kill during an append, is skipped; a bad line elsewhere is an error."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
    return records


def _truncate_metrics(run_dir: Path, epochs_completed: int) -> None:
    """Drop records of epochs after the checkpoint (they will be run again)."""
    kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= epochs_completed]
    path = run_dir / METRICS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def finite_module(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _optimizer_state(state: dict[str, Any], module: nn.Module,
                     optimizer: torch.optim.Adam) -> dict[str, Any]:
    """The torch Adam state of a checkpoint, converted by parameter name from the Pyro-optimiser
    states that the replaced loops wrote."""
    if state.get("optimizer") == OPTIMIZER_NAME:
        return state["optim"]
    saved = state.get("optim")
    if not isinstance(saved, dict):
        raise ValueError(f"the checkpoint holds no optimiser state this loop can resume "
                         f"(optimizer {state.get('optimizer')!r})")
    if saved.get("format") == _PYRO_STATE_FORMAT:
        per_name = saved["state"]
    else:  # pyro.optim.PyroOptim: {param name: that parameter's torch optimiser state_dict}
        per_name = {name: s["state"].get(0, {}) for name, s in saved.items()
                    if isinstance(s, dict) and "state" in s}
    index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    converted = {}
    for name, adam_state in per_name.items():
        local = name.split(_PYRO_MODULE_SEPARATOR, 1)[-1]
        if local not in index:
            raise ValueError(f"the checkpoint's optimiser state names a parameter {name!r} the "
                             "model does not have")
        converted[index[local]] = {k: v.clone() if torch.is_tensor(v) else torch.tensor(float(v))
                                   for k, v in adam_state.items()}
    result = optimizer.state_dict()
    result["state"] = converted
    return result


def train_step(objective: nn.Module, batch: Sequence[torch.Tensor], adam: torch.optim.Optimizer,
               parameters: list[nn.Parameter], clip_norm: float | None) -> torch.Tensor:
    """One step of :func:`fit`: the batch's loss per example (an empty batch: the objective's
    value), its gradient, the global-norm clip and the optimiser step; returns the loss (a
    detached device tensor, no host sync)."""
    loss = objective(*batch)
    if batch:
        loss = loss / len(batch[0])
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    adam.step()
    adam.zero_grad(set_to_none=True)
    return loss.detach()


def fit(
    objective: nn.Module,
    module: nn.Module,
    data: Sequence[Any] | None,
    *,
    epochs: int | None,
    batch_size: int | None = None,
    run_dir: str | os.PathLike | None,
    optimizer: Optimizer | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    env: DistributedEnv | None = None,
    epoch_metrics: Callable[[int], dict[str, Any]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    before_step: Callable[[int, list[int]], None] | None = None,
    after_step: Callable[[int, float, torch.Tensor], bool] | None = None,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    drop_last: bool = False,
    checkpoint_every: int = 1,
    metrics_every: int = 1,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
    flush_denormal: bool = True,
    log_every: int = 10,
    keep_best: str | None = None,
    validate: bool | None = None,
) -> FitResult:
    """Minimise ``objective`` (a module whose ``forward(*batch)`` is the loss summed over the
    batch; see the module docstring) over minibatches of ``data``, updating ``module``'s
    parameters, which must be the objective's.

    :param module: what is optimised and checkpointed (e.g. the STORN).
    :param data: tensors (or datasets indexable by a tensor of indices) of one length; each batch
        is moved to the device once and passed as ``objective(*batch)``. ``None``: a model
        without data; each epoch is one step, ``objective()``, whose value is the loss.
    :param batch_size: examples per step; required with ``data``, refused without.
    :param epochs: the total number of epochs (a resumed run continues up to it); ``None`` runs
        until ``max_steps``, ``max_seconds`` or ``after_step`` stops it.
    :param run_dir: where ``metrics.jsonl`` and checkpoints go; ``None`` writes nothing (and
        cannot resume).
    :param optimizer: :class:`Optimizer` (Adam at 1e-3, global clip norm 10 by default).
    :param env: the process group (:func:`pyro_storn.distributed.init_distributed`); every rank
        holds all of ``data`` and takes its :func:`shard` of each epoch's order; only rank 0
        writes. ``None``: one process on ``device``.
    :param epoch_metrics: called after every ``metrics_every``-th epoch and the last, with its
        1-based number (rank 0 only); its dict is added to that epoch's line of
        ``metrics.jsonl``, and ``keep_best`` reads those lines only.
    :param before_epoch: called with the 0-based epoch before it starts (e.g. KL annealing).
    :param before_step: called with the 0-based epoch and the batch's example indices before each
        step (e.g. :meth:`pyro_storn.distributed.ExampleNoise.set_batch`).
    :param after_step: called with the number of steps taken, the training seconds so far and the
        step's loss per example (a device tensor); returning ``True`` stops the run. Its own time
        is not counted as training time.
    :param max_steps, max_seconds: stop after that many steps or training seconds.
    :param drop_last: skip each epoch's last batch when it is smaller than ``batch_size``.
    :param extra_state: stored in the checkpoint as ``"extra"`` (e.g. how to rebuild the model).
    :param resume: continue from ``run_dir/checkpoint.pt``; ``ValueError`` if there is none.
    :param keep_best: a key of the epoch records to minimise: after each epoch whose value is
        finite and lower than every earlier one, the module's state is written to
        ``run_dir/best.pt`` with the epoch and the value. A key the records lack is a
        ``ValueError`` after the first epoch, naming the keys there are.
    :param validate: Pyro's and torch's distribution-argument validation while training; each
        check waits for the device, so ``None`` keeps the caller's setting on the CPU and turns
        it off on CUDA, where NaN parameters then show up as a non-finite loss.
    :param flush_denormal: on the CPU, ``torch.set_flush_denormal(True)`` for the process (torch
        keeps it per process, not per call). Weight decay drives the weights that get no data
        gradient (the notes a training set never plays, MADE's masked entries) into subnormal
        floats, on which x86 arithmetic is several times slower: a JSB Chorales step of STORN
        with IAF x2 took 1.05 s instead of 0.23 s after 320 epochs. Values below 1.2e-38 become
        0.
    :returns: :class:`FitResult`; on Ctrl-C or SIGTERM a checkpoint is written and ``interrupted``
        is set.
    :raises NonFiniteLossError: when the loss becomes NaN or infinite.
    """
    if epochs is not None:
        check_positive_int("epochs", epochs)
    if data is None:
        if batch_size is not None:
            raise ValueError(f"data=None steps on the objective alone and takes no batch_size, "
                             f"got {batch_size!r}")
        batch_size = 1  # one step an epoch, over no examples
    elif batch_size is None:
        raise ValueError("batch_size is required with data")
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("metrics_every", metrics_every), ("log_every", log_every)):
        check_positive_int(name, value)
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if epochs is None and max_steps is None and max_seconds is None and after_step is None:
        raise ValueError("epochs=None needs max_steps, max_seconds or after_step to stop the run")
    if data is not None and not data:
        raise ValueError("data must hold at least one tensor (None for a model without data)")
    n = 1 if data is None else len(data[0])
    if data is not None and (n == 0 or any(len(t) != n for t in data)):
        raise ValueError(f"data tensors must share a non-zero first dim, got "
                         f"{[len(t) for t in data]}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs a run_dir")
    optimizer = optimizer or Optimizer()
    if env is None:
        env = DistributedEnv(device=torch.device(device or "cpu"))
    elif device is not None and torch.device(device) != env.device:
        raise ValueError(f"device {str(device)!r} differs from the process group's {env.device}")
    device = env.device
    if flush_denormal and device.type == "cpu":
        torch.set_flush_denormal(True)
    run_dir = None if run_dir is None else Path(run_dir)
    checkpoint_path = None if run_dir is None else run_dir / CHECKPOINT_NAME
    writes = run_dir is not None and env.is_primary

    module.to(device)
    objective.to(device)
    parameters = [p for p in module.parameters() if p.requires_grad]
    owned = {id(p) for p in objective.parameters()}
    missing = [name for name, p in module.named_parameters() if p.requires_grad
               and id(p) not in owned]
    if missing and owned:  # an objective of plain Pyro functions owns none: nothing to check
        raise ValueError(f"the objective does not use the module's parameters {missing[:3]}")
    adam = optimizer.build(parameters)

    start_epoch, start_batch, step, train_seconds, resumed_losses = 0, 0, 0, 0.0, None
    if resume:
        if not checkpoint_path.exists() and not previous_path(checkpoint_path).exists():
            raise ValueError(f"no checkpoint in {str(run_dir)!r} to resume from")
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state["batch"] and state.get("world_size", 1) != env.world_size:
            raise ValueError(
                f"{checkpoint_path} was written mid-epoch by {state.get('world_size', 1)} "
                f"process(es); it resumes only with that many, this run has {env.world_size}")
        load_module_state(module, state["module"], checkpoint_path)  # another size: one line
        adam.load_state_dict(_optimizer_state(state, module, adam))
        start_epoch, start_batch = state["epoch"], state["batch"]
        step, train_seconds = state.get("step", 0), state.get("train_seconds", 0.0)
        resumed_losses = state["epoch_losses"]
        set_rng_state(state["rng"])
        if env.rank > 0:  # each rank its own stream of draws (ExampleNoise needs none)
            pyro.set_rng_seed(seed + env.rank + env.world_size * start_epoch)
        if writes:
            _truncate_metrics(run_dir, start_epoch)
    else:
        pyro.set_rng_seed(seed + env.rank)
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / METRICS_NAME).write_text("")
    step_objective: nn.Module = objective
    if env.world_size > 1:
        # Buffers (data statistics) are set identically on every rank; no broadcast per forward.
        step_objective = DistributedDataParallel(objective, **_NO_FORWARD_BUFFER_SYNC)

    n_local = len(shard(torch.arange(n), env.rank, env.world_size))
    n_batches = n_local // batch_size if drop_last else math.ceil(n_local / batch_size)
    if n_batches == 0:
        raise ValueError(f"drop_last with batch_size {batch_size} leaves no batch of the "
                         f"{n_local} examples per process")
    # examples per batch, for the epoch's mean loss per example
    sizes = torch.tensor([min(batch_size, n_local - b * batch_size) for b in range(n_batches)],
                         dtype=torch.float32, device=device)
    last_good: Path | None = checkpoint_path if resume else None
    best_path = None if run_dir is None else run_dir / BEST_NAME
    best_epoch, best_value = None, math.inf
    if keep_best is not None and resume and best_path.exists():
        # epochs after the checkpoint run again identically, so the stored best stands
        try:
            best = load_checkpoint(best_path, map_location="cpu")
            best_epoch, best_value = best["epoch"], best["value"]
        except CheckpointError as error:  # the run goes on; only the earlier best is lost
            warnings.warn(f"{error}; {BEST_NAME} will hold the best state from epoch "
                          f"{start_epoch + 1} on", stacklevel=2)
    elif writes and not resume:
        for stale in (best_path, previous_path(best_path)):  # another run's best, not this one's
            stale.unlink(missing_ok=True)

    def keep_if_best(record: dict[str, Any]) -> None:
        nonlocal best_epoch, best_value
        if keep_best not in record:
            raise ValueError(f"keep_best={keep_best!r} is not in the epoch metrics; they have "
                             f"{', '.join(sorted(record))}")
        value = float(record[keep_best])
        if math.isfinite(value) and value < best_value and finite_module(module):
            if writes:
                save_checkpoint(best_path, {"module": module.state_dict(), "epoch": record["epoch"],
                                            "metric": keep_best, "value": value,
                                            "extra": extra_state or {}})
            best_epoch, best_value = record["epoch"], value

    def save(epoch: int, batch: int, epoch_losses: torch.Tensor | None) -> None:
        nonlocal last_good
        if checkpoint_path is None or not finite_module(module):
            return  # never replace a good checkpoint with a broken one
        if writes:
            save_checkpoint(checkpoint_path, {
                "module": module.state_dict(), "optim": adam.state_dict(),
                "optimizer": OPTIMIZER_NAME, "epoch": epoch, "batch": batch,
                "epoch_losses": epoch_losses, "step": step, "train_seconds": train_seconds,
                "seed": seed, "rng": rng_state(), "world_size": env.world_size,
                "extra": extra_state or {},
            })
        last_good = checkpoint_path

    def check(losses: torch.Tensor, epoch: int, first: int, done: int) -> None:
        # Every rank takes the same decision, or the others would wait in the next all-reduce.
        finite = torch.isfinite(losses[first:done])
        if int(all_reduce_sum((~finite).sum(), env)):
            local_bad = (~finite).nonzero()
            bad = first + (int(local_bad[0]) if local_bad.numel() else done - first - 1)
            raise NonFiniteLossError(epoch + 1, bad + 1, float(losses[bad]), last_good)

    def out_of_budget() -> bool:
        return ((max_steps is not None and step >= max_steps)
                or (max_seconds is not None and train_seconds >= max_seconds))

    total = None if epochs is None else max((epochs - start_epoch) * n_batches - start_batch, 0)
    bar = tqdm(total=total, disable=not (progress and env.is_primary), unit="batch",
               dynamic_ncols=True)
    interrupted = stopped = False
    completed = start_epoch
    validation = (device.type != "cuda" and pyro.infer.util.is_validation_enabled()
                  if validate is None else validate)
    epoch = start_epoch
    with InterruptFlag() as interrupt, pyro.validation_enabled(validation):
        while (epochs is None or epoch < epochs) and not (stopped or out_of_budget()):
            if before_epoch is not None:
                before_epoch(epoch)
            order = shard(epoch_permutation(n, seed, epoch), env.rank, env.world_size)
            # host-side indices for before_step, converted once per epoch, not once per step
            order_list = order.tolist() if before_step is not None else []
            losses = torch.full((n_batches,), float("nan"), device=device)
            first = start_batch if epoch == start_epoch else 0
            if first > 0 and resumed_losses is not None:
                losses[:first] = resumed_losses[:first].to(device)
            bar.set_description(f"{'epoch' if data is not None else 'step'} {epoch + 1}"
                                + ("" if epochs is None else f"/{epochs}"))
            started = time.perf_counter()
            done = first
            for b in range(first, n_batches):
                index = order[b * batch_size : (b + 1) * batch_size]
                batch = () if data is None else tuple(t[index].to(device, non_blocking=True)
                                                      for t in data)
                if before_step is not None:
                    before_step(epoch, order_list[b * batch_size : (b + 1) * batch_size])
                for group in adam.param_groups:
                    group["lr"] = optimizer.rate(step, train_seconds)
                step_started = time.perf_counter()
                try:
                    losses[b] = train_step(step_objective, batch, adam, parameters,
                                           optimizer.clip_norm)
                except ValueError as error:
                    # NaN parameters surface as distribution-argument errors one step later.
                    if finite_module(module):
                        raise
                    check(losses, epoch, first, b)
                    raise NonFiniteLossError(epoch + 1, b + 1, float("nan"), last_good) from error
                step += 1
                train_seconds += time.perf_counter() - step_started
                done = b + 1
                if done % log_every == 0 or done == n_batches or interrupt.raised:
                    check(losses, epoch, first, done)
                    recent = losses[max(first, done - log_every):done]
                    if progress and env.is_primary:
                        bar.set_postfix(loss=f"{float(recent.mean()):.4g}/example")
                bar.update(1)
                if after_step is not None and after_step(step, train_seconds, losses[b]):
                    stopped = True
                if out_of_budget():
                    stopped = True
                if (interrupt.raised or stopped) and done < n_batches:
                    break
            if done < n_batches:  # Ctrl-C or a budget stopped the epoch part-way
                check(losses, epoch, first, done)
                if interrupt.raised and env.world_size == 1:
                    save(epoch, done, losses.cpu())
                interrupted = interrupt.raised
                break
            seen = torch.stack([(losses * sizes).sum(), sizes.sum()])
            totals = all_reduce_sum(seen, env)
            due = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or interrupt.raised
            divergence = replica_divergence(module, env) if due and env.world_size > 1 else None
            if env.is_primary:
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "train_loss": float(totals[0] / totals[1]),
                    "lr": optimizer.rate(step, train_seconds),  # of the next step
                    "epoch_seconds": time.perf_counter() - started,
                }
                if env.world_size > 1:
                    record["world_size"] = env.world_size
                if divergence is not None:
                    record["replica_max_abs_diff"] = divergence
                scored = (epoch + 1) % metrics_every == 0 or epoch + 1 == epochs
                if epoch_metrics is not None and scored:
                    record.update(epoch_metrics(epoch + 1))
                if writes:
                    with open(run_dir / METRICS_NAME, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                if keep_best is not None and scored:
                    keep_if_best(record)
            completed = epoch + 1
            if due or stopped or out_of_budget():
                save(epoch + 1, 0, None)
            if interrupt.raised:
                interrupted = epochs is None or epoch + 1 < epochs
                break
            epoch += 1
    bar.close()
    env.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    history = read_metrics(run_dir) if writes else []
    return FitResult(epochs_completed=completed, interrupted=interrupted, checkpoint=last_good,
                     history=history, best_epoch=best_epoch, steps=step,
                     train_seconds=train_seconds, world_size=env.world_size, stopped=stopped,
                     module=module, stop_signal=interrupt.signum if interrupted else None)
