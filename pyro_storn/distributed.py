"""The process group and the per-example noise that make :func:`pyro_storn.training.fit` a
data-parallel loop under ``torchrun``.

:func:`init_distributed` joins the group ``torchrun`` describes (gloo on CPU, nccl on CUDA) and
returns a :class:`DistributedEnv`; :func:`pyro_storn.training.fit` given that env wraps the
objective in :class:`~torch.nn.parallel.DistributedDataParallel`, shards each epoch's order, and
lets only rank 0 write. :class:`ProgramModule` makes ``storn.model`` and ``storn.guide``
``nn.Module``\\ s, so that Pyro's :class:`~pyro.infer.elbo.ELBOModule` owns the STORN's
parameters and DDP all-reduces their gradients.

With :class:`ExampleNoise` the guide's reparameterisation noise for example ``i`` in epoch ``e``
comes from a generator seeded by ``(seed, e, i)``, so a run's numbers depend neither on the
number of ranks nor on how batches are split, and a resumed run needs no per-rank RNG state.

Launch (see ``docs/distributed.md``)::

    torchrun --nproc_per_node 4 -m pyro_storn.cli train --distributed --data d.npz --out run

Ctrl-C, SIGTERM or a killed rank stops all ranks (torchrun tears the group down); ``--resume``
continues from the last epoch checkpoint. What only rank 0 does before training (checking and
locking the run directory) runs under :func:`primary_failure_stops_all`, so that its refusal stops
every rank at once.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pyro.distributions import Independent, Normal, TransformedDistribution
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn

__all__ = [
    "DistributedEnv",
    "ExampleNoise",
    "ProgramModule",
    "all_reduce_sum",
    "init_distributed",
    "primary_failure_stops_all",
    "process_rank",
    "replica_divergence",
]

# Process-group timeout: rank 0 computes the epoch metrics on the full data while the other
# ranks wait in the next all-reduce, which may take minutes on a large data set.
_GROUP_TIMEOUT = timedelta(minutes=30)
# Mixing constants of the per-example seed: within one run seed, distinct (epoch, example, draw)
# get distinct generator seeds for epochs < 1_000_003, examples < 1_000_000_007 and draws
# (particles) < 8_191 per step (their span, ~8e18, stays below the 2**63 modulus).
_SEED_PRIMES = (1_000_003, 1_000_000_007, 8_191)
_SEED_MODULUS = 2**63


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
        if isinstance(fn, (Independent, MaskedDistribution)):  # a mask changes no draw
            return self._sample(fn.base_dist)
        if isinstance(fn, Normal):
            eps = self.noise(fn.batch_shape, fn.loc.dtype, fn.loc.device)
            return fn.loc + fn.scale * eps
        raise ValueError(f"ExampleNoise supports Normal, Independent, masked and transformed ones "
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


def _portable(error: BaseException) -> BaseException:
    """``error`` when it survives pickling (the broadcast's wire format), else a
    ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _broadcast_failure(env: DistributedEnv, error: BaseException | None) -> BaseException | None:
    sent = [_portable(error) if env.is_primary and error is not None else None]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


@contextlib.contextmanager
def primary_failure_stops_all(env: DistributedEnv) -> Iterator[None]:
    """Every rank enters the ``with`` block and waits at its end for rank 0, which tells them
    whether its block raised: then every rank raises rank 0's error, so that no rank waits for a
    rank 0 that gave up (e.g. refused the run directory's lock). For rank-0-only work, such as
    taking the lock and checking what a run directory holds."""
    if env.world_size == 1:
        yield
        return
    try:
        yield
    except BaseException as error:
        _broadcast_failure(env, error)
        raise
    failure = _broadcast_failure(env, None)
    if failure is not None:
        raise failure


def all_reduce_sum(tensor: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    """``tensor`` summed over the ranks (itself with one rank)."""
    if env.world_size > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def replica_divergence(module: nn.Module, env: DistributedEnv) -> float:
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
