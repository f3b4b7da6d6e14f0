"""A generic SVI fit loop: any Pyro model and guide over a data set of tensors.

:func:`fit` runs shuffled minibatches for a number of epochs, shows a tqdm bar with the running
loss, appends one JSON line per epoch to ``metrics.jsonl`` (the train loss plus whatever the
``epoch_metrics`` callback returns), and writes checkpoints (module, Pyro optimiser state, epoch,
position in the epoch, RNG states) atomically every ``checkpoint_every`` epochs and on Ctrl-C.
With ``keep_best=KEY`` the module's state at the epoch with the lowest ``KEY`` in its metrics
(e.g. a validation -ELBO) is also kept, in ``best.pt``. ``resume=True`` continues from the
checkpoint so that an interrupted and resumed run gives the same losses as an uninterrupted one:
the epoch's shuffle is a function of ``(seed, epoch)`` only, and the RNG states are restored.

A non-finite loss stops the run with :class:`NonFiniteLossError` naming the epoch and batch; the
last good checkpoint stays (a checkpoint is only written when every loss so far and every
parameter is finite). Losses stay on the device between progress-bar updates, so the loop syncs
with an accelerator only every ``log_every`` batches.

Nothing here knows what model it trains.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled, zero_grads
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, previous_path, rng_state, save_checkpoint, set_rng_state

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "FitResult",
    "NonFiniteLossError",
    "fit",
    "epoch_permutation",
    "read_metrics",
    "svi_step",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"
# Distinct epochs get unrelated shuffles: the generator seed is seed * _EPOCH_STRIDE + epoch.
_EPOCH_STRIDE = 1_000_003


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
    """What :func:`fit` did: epochs completed in all, whether Ctrl-C stopped it, the metrics,
    and with ``keep_best`` the epoch (1-based) whose state ``best.pt`` holds."""

    epochs_completed: int
    interrupted: bool
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` examples in ``epoch`` (0-based), a function of seed and epoch."""
    generator = torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)
    return torch.randperm(n, generator=generator)


def svi_step(model: Callable, guide: Callable, optim: Any, loss: Any, *args: Any) -> torch.Tensor:
    """One SVI step like :meth:`pyro.infer.SVI.step`, but the loss stays a device tensor."""
    with poutine.trace(param_only=True) as param_capture:
        if hasattr(loss, "differentiable_loss"):
            value = loss.differentiable_loss(model, guide, *args)
            value.backward()
            value = value.detach()
        else:  # ELBOs without a differentiable loss (e.g. JitTrace_ELBO) return a float
            value = torch.as_tensor(loss.loss_and_grads(model, guide, *args))
    params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
    optim(params)
    zero_grads(params)
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in ``run_dir`` (empty when there is none)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(run_dir: Path, epochs_completed: int) -> None:
    """Drop records of epochs after the checkpoint (they will be run again)."""
    kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= epochs_completed]
    path = run_dir / METRICS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _finite_module(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class _InterruptFlag:
    """Turns Ctrl-C into a flag the loop reads between steps, so that no step is left half
    applied and the checkpoint is consistent."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def fit(
    model: Callable,
    guide: Callable,
    module: torch.nn.Module,
    optim: pyro.optim.PyroOptim,
    loss: Any,
    data: Sequence[torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    run_dir: str | os.PathLike,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epoch_metrics: Callable[[int], dict[str, Any]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
    keep_best: str | None = None,
) -> FitResult:
    """Train ``module`` (whose parameters ``model`` and ``guide`` register with
    :func:`pyro.module`) by SVI on minibatches of ``data``.

    :param data: tensors sharing their first dim (e.g. ``(x, mask)``); each batch is moved to
        ``device`` once and passed as ``model(*batch)``.
    :param epochs: the total number of epochs (a resumed run continues up to it).
    :param epoch_metrics: called after each epoch with its 1-based number; its dict is added to
        that epoch's line of ``metrics.jsonl``.
    :param before_epoch: called with the 0-based epoch before it starts (e.g. KL annealing).
    :param extra_state: stored in the checkpoint as ``"extra"`` (e.g. how to rebuild the model).
    :param resume: continue from ``run_dir/checkpoint.pt``; ``ValueError`` if there is none.
    :param keep_best: a key of the epoch records (from ``epoch_metrics``) to minimise: after each
        epoch whose value is finite and lower than every earlier one, the module's state is
        written to ``run_dir/best.pt`` with the epoch and the value. A key the records lack is a
        ``ValueError`` after the first epoch, naming the keys there are.
    :returns: :class:`FitResult`; on Ctrl-C a checkpoint is written and ``interrupted`` is set.
    :raises NonFiniteLossError: when the loss becomes NaN or infinite.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not data:
        raise ValueError("data must hold at least one tensor")
    n = data[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in data):
        raise ValueError(f"data tensors must share a non-zero first dim, got "
                         f"{[tuple(t.shape) for t in data]}")
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    device = torch.device(device)
    n_batches = math.ceil(n / batch_size)

    pyro.clear_param_store()
    start_epoch, start_batch, resumed_losses = 0, 0, None
    if resume:
        if not checkpoint_path.exists() and not (run_dir / (CHECKPOINT_NAME + ".prev")).exists():
            raise ValueError(f"no checkpoint in {str(run_dir)!r} to resume from")
        state = load_checkpoint(checkpoint_path, map_location=device)
        if "optimizer" in state:  # a torch optimiser's state (pyro_storn.distributed)
            raise ValueError(f"{checkpoint_path} was written by the distributed trainer; "
                             "resume it with --distributed")
        module.load_state_dict(state["module"])
        optim.set_state(state["optim"])
        start_epoch, start_batch = state["epoch"], state["batch"]
        resumed_losses = state["epoch_losses"]
        set_rng_state(state["rng"])
        _truncate_metrics(run_dir, start_epoch)
    else:
        pyro.set_rng_seed(seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_NAME).write_text("")
    module.to(device)

    last_good: Path | None = checkpoint_path if resume else None
    best_path = run_dir / BEST_NAME
    best_epoch, best_value = None, math.inf
    if keep_best is not None and resume and best_path.exists():
        # epochs after the checkpoint run again identically, so the stored best stands
        best = load_checkpoint(best_path, map_location="cpu")
        best_epoch, best_value = best["epoch"], best["value"]
    elif not resume:
        for stale in (best_path, previous_path(best_path)):  # another run's best, not this one's
            stale.unlink(missing_ok=True)

    def keep_if_best(record: dict[str, Any]) -> None:
        nonlocal best_epoch, best_value
        if keep_best not in record:
            raise ValueError(f"keep_best={keep_best!r} is not in the epoch metrics; they have "
                             f"{', '.join(sorted(record))}")
        value = float(record[keep_best])
        if math.isfinite(value) and value < best_value and _finite_module(module):
            save_checkpoint(best_path, {"module": module.state_dict(), "epoch": record["epoch"],
                                        "metric": keep_best, "value": value,
                                        "extra": extra_state or {}})
            best_epoch, best_value = record["epoch"], value

    def save(epoch: int, batch: int, epoch_losses: torch.Tensor | None) -> None:
        nonlocal last_good
        if not _finite_module(module):
            return  # never replace a good checkpoint with a broken one
        save_checkpoint(checkpoint_path, {
            "module": module.state_dict(), "optim": optim.get_state(), "epoch": epoch,
            "batch": batch, "epoch_losses": epoch_losses, "seed": seed, "rng": rng_state(),
            "extra": extra_state or {},
        })
        last_good = checkpoint_path

    def check(losses: torch.Tensor, epoch: int, first: int, done: int) -> None:
        finite = torch.isfinite(losses[first:done])
        if not bool(finite.all()):
            bad = first + int((~finite).nonzero()[0])
            raise NonFiniteLossError(epoch + 1, bad + 1, float(losses[bad]), last_good)

    total = (epochs - start_epoch) * n_batches - start_batch
    bar = tqdm(total=max(total, 0), disable=not progress, unit="batch", dynamic_ncols=True)
    interrupted = False
    completed = start_epoch
    # Distribution-argument validation costs ~16 host syncs per step on CUDA (as in
    # pyro_storn.distributed); on the CPU it stays as the caller has it. NaN parameters then
    # surface as a non-finite loss (check) rather than a validation error.
    validation = device.type != "cuda" and is_validation_enabled()
    with _InterruptFlag() as interrupt, pyro.validation_enabled(validation):
        for epoch in range(start_epoch, epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            order = epoch_permutation(n, seed, epoch)
            losses = torch.full((n_batches,), float("nan"), device=device)
            first = start_batch if epoch == start_epoch else 0
            if first > 0 and resumed_losses is not None:
                losses[:first] = resumed_losses[:first].to(device)
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            started = time.perf_counter()
            for b in range(first, n_batches):
                index = order[b * batch_size : (b + 1) * batch_size]
                batch = tuple(t[index].to(device, non_blocking=True) for t in data)
                try:
                    losses[b] = svi_step(model, guide, optim, loss, *batch)
                except ValueError as error:
                    # NaN parameters surface as distribution-argument errors one step later.
                    if _finite_module(module):
                        raise
                    check(losses, epoch, first, b)
                    raise NonFiniteLossError(epoch + 1, b + 1, float("nan"), last_good) from error
                done = b + 1
                if done % log_every == 0 or done == n_batches or interrupt.raised:
                    check(losses, epoch, first, done)
                    recent = losses[max(first, done - log_every):done]
                    bar.set_postfix(loss=f"{float(recent.mean()) / batch_size:.4g}/seq")
                bar.update(1)
                if interrupt.raised and done < n_batches:
                    save(epoch, done, losses.cpu())
                    interrupted = True
                    break
            if interrupted:
                break
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": float(losses.sum()) / n,
                "epoch_seconds": time.perf_counter() - started,
            }
            if epoch_metrics is not None:
                record.update(epoch_metrics(epoch + 1))
            with open(run_dir / METRICS_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if keep_best is not None:
                keep_if_best(record)
            completed = epoch + 1
            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or interrupt.raised:
                save(epoch + 1, 0, None)
            if interrupt.raised:
                interrupted = epoch + 1 < epochs
                break
    bar.close()
    return FitResult(epochs_completed=completed, interrupted=interrupted,
                     checkpoint=last_good, history=read_metrics(run_dir), best_epoch=best_epoch)
