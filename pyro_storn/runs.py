"""A STORN run directory: train, reload, evaluate and generate, the functions behind the CLI,
the demo and the examples.

A run directory holds ``config.json`` (the :class:`TrainConfig`, the model's constructor
arguments and which data file, with its sha256), ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` (and ``checkpoint.pt.prev``), ``best.pt`` when part of the training sequences
is held out for validation (the state at the epoch of lowest validation -ELBO), then
``evaluation.json`` and ``generated.npz`` once evaluated and generated, and ``diagnostics/``
(ArviZ InferenceData and figures) once diagnosed.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

import transforms

from .data.polyphonic import load_polyphonic
from .data.sequences import SequenceData, load_sequences
from .rundir import CONFIG_NAME, arrays_sha256, atomic_write, check_device, check_output_dir
from .rundir import check_same_data
from .rundir import check_writable_dir, file_sha256, load_best_or_last, load_module_state
from .rundir import lock_run, read_run_record, write_text_atomic
from .diagnostics import ImportanceDraws, draw_importance_samples, summarize_importance
from .diagnostics import write_diagnostics
from .evaluation import bounds_summary, evaluate_bounds, sequence_metrics
from .distributed import DistributedEnv, ExampleNoise, init_distributed, primary_failure_stops_all
from .storn import ENCODERS, EMISSIONS, PRIORS, RNN_TYPES, STORN
from .iwae_objective import OBJECTIVES, IWAEObjective
from .training import BEST_NAME, CHECKPOINT_NAME, FitResult, Optimizer, elbo_module, fit
from .validation import check_probability

__all__ = [
    "TrainConfig",
    "CONFIG_NAME",
    "EVALUATION_NAME",
    "GENERATED_NAME",
    "build_storn",
    "validation_split",
    "train",
    "warm_start",
    "load_run",
    "load_run_data",
    "load_training_data",
    "evaluate_run",
    "diagnose_run",
    "default_particle_batch_size",
    "generate_run",
    "STORN_DIMS",
]

# The first byte of a pickle of protocol 2 and later: how a polyphonic pickle is told from an npz.
PICKLE_PROTOCOL_OPCODE = b"\x80"
EVALUATION_NAME = "evaluation.json"
GENERATED_NAME = "generated.npz"
DIAGNOSTICS_DIR = "diagnostics"

# Names of the dims of STORN's sites (after ArviZ's chain and draw) in the InferenceData.
STORN_DIMS = {"z": ["sequence", "time", "latent"], "x": ["sequence", "time", "feature"]}
# Rows (draws x test sequences) per vectorised pass of the importance draws when no particle
# batch size is given: the bound evaluation.evaluate_bounds keeps, so S = 100 fits on any device.
ROWS_PER_PASS = 4096
# The generalized Pareto fit behind k-hat needs at least two draws.
MIN_PSIS_SAMPLES = 2
# The shuffle that picks the validation sequences: fixed, so every run on one data file (any
# guide, any training seed) holds out the same sequences and paired comparisons stay paired.
VALIDATION_SPLIT_SEED = 0
# What best.pt selects on: the validation split's single-sample -ELBO per sequence.
VALIDATION_METRIC = "validation/neg_elbo"
CHECKPOINT_CHOICES = ("best", "last")
# How a run's flow layers start: their families' random initialisation, or the identity map
# (iaf, maf, realnvp, nice only; transforms.start_at_identity).
FLOW_STARTS = ("random", "identity")


@dataclass
class TrainConfig:
    """Everything that defines a STORN training run (the CLI's ``train`` flags)."""

    flow: str = "none"
    flow_length: int = 0
    latent_dim: int = 2
    hidden_dim: int = 128
    epochs: int = 10
    batch_size: int = 20
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    num_particles: int = 1
    clip_norm: float = 10.0
    kl_anneal_epochs: int = 0
    checkpoint_every: int = 1
    rnn: str = "gru"
    condition_flow: bool = True
    validation_fraction: float = 0.0
    init_from: str | None = None
    flow_start: str = "random"
    emission: str = "normal"
    encoder: str = "forward"
    emission_hidden: int = 0
    prior: str = "standard"
    dropout: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    adam_beta1: float = 0.9
    metrics_every: int = 1
    objective: str = "elbo"

    def validate(self) -> "TrainConfig":
        """``ValueError`` naming the first bad value; the config itself otherwise."""
        positive = ("latent_dim", "hidden_dim", "epochs", "batch_size", "num_particles",
                    "checkpoint_every", "metrics_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("flow_length", "kl_anneal_epochs", "seed", "emission_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.validation_fraction, bool) or not isinstance(
                self.validation_fraction, (int, float)) or not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be a number in [0, 1), got "
                             f"{self.validation_fraction!r}")
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise ValueError(f"init_from must be a run directory (a path), got {self.init_from!r}")
        if self.flow_start not in FLOW_STARTS:
            raise ValueError(f"flow_start must be one of {', '.join(FLOW_STARTS)}, got "
                             f"{self.flow_start!r}")
        if self.flow_start == "identity" and self.flow not in transforms.STARTS_AT_IDENTITY:
            raise ValueError(f"flow_start 'identity' needs a flow that can start at the identity "
                             f"({', '.join(transforms.STARTS_AT_IDENTITY)}), got flow {self.flow!r}")
        if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm!r}")
        if self.emission not in EMISSIONS:
            raise ValueError(f"unknown emission {self.emission!r}; valid choices: "
                             f"{', '.join(EMISSIONS)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; valid choices: "
                             f"{', '.join(ENCODERS)}")
        if self.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.prior!r}; valid choices: {', '.join(PRIORS)}")
        check_probability("dropout", self.dropout)
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a non-negative number, got "
                             f"{self.weight_decay!r}")
        if not (isinstance(self.lr_decay, (int, float)) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must lie in (0, 1], got {self.lr_decay!r}")
        if not (isinstance(self.adam_beta1, (int, float)) and 0 <= self.adam_beta1 < 1):
            raise ValueError(f"adam_beta1 must lie in [0, 1), got {self.adam_beta1!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid choices: "
                             f"{', '.join(OBJECTIVES)}")
        if self.rnn not in RNN_TYPES:
            raise ValueError(f"unknown rnn {self.rnn!r}; valid choices: {', '.join(RNN_TYPES)}")
        if self.flow != "none":
            transforms.info(self.flow)  # ValueError naming the valid choices
            if self.flow_length < 1:
                raise ValueError(f"flow {self.flow!r} needs flow_length >= 1, got "
                                 f"{self.flow_length}")
        elif self.flow_length != 0:
            raise ValueError(f"flow_length {self.flow_length} given without a flow (--flow)")
        check_device(str(self.device))  # e.g. cpu:foo, or CUDA absent: named here, not by torch
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def build_storn(input_dim: int, config: TrainConfig) -> STORN:
    """The STORN a config describes, at its initialisation (the flow at the identity with
    ``flow_start="identity"``, see :func:`transforms.start_at_identity`)."""
    storn = STORN(
        input_dim, config.latent_dim, config.hidden_dim,
        flow=None if config.flow == "none" else config.flow, flow_length=config.flow_length,
        condition_flow=config.condition_flow, rnn=config.rnn, emission=config.emission,
        encoder=config.encoder, emission_hidden=config.emission_hidden, prior=config.prior,
        dropout=config.dropout,
    )
    if config.flow_start == "identity":
        transforms.start_at_identity(storn.flow)
    return storn


def _optimizer(config: TrainConfig, steps_per_epoch: int) -> Optimizer:
    """Adam with the config's rate, decay per epoch (spread over its steps), beta1, weight
    decay and clip norm."""
    decay, per_epoch = config.lr_decay, steps_per_epoch
    return Optimizer(lr=config.lr, betas=(config.adam_beta1, 0.999),
                     weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                     lr_factor=None if decay == 1 else lambda step, _: decay ** (step / per_epoch))


def _objective(config: TrainConfig, storn: STORN, noise: Any) -> torch.nn.Module:
    """What :func:`fit` minimises: Pyro's ELBO as a module, or the per-sequence IWAE bound with
    ``num_particles`` draws."""
    if config.objective == "iwae":
        return IWAEObjective(storn, config.num_particles)
    return elbo_module(_make_loss(config), storn, noise=noise)


def _make_loss(config: TrainConfig) -> pyro.infer.ELBO:
    # Without a flow the KL of two Gaussians is exact: the lower-variance mean-field ELBO.
    elbo = pyro.infer.TraceMeanField_ELBO if config.flow == "none" else pyro.infer.Trace_ELBO
    return elbo(num_particles=config.num_particles, max_plate_nesting=1)


_sha256 = file_sha256


def _tensors(data: SequenceData) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(data.x), torch.from_numpy(data.mask),
            torch.from_numpy(data.x_test), torch.from_numpy(data.mask_test))


def validation_split(n_train: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit_index, validation_index)``: ``round(fraction * n_train)`` of the training sequences
    held out, chosen by a fixed shuffle (:data:`VALIDATION_SPLIT_SEED`), both sorted. ``ValueError``
    when a non-zero fraction would hold out none, or all but none."""
    n_validation = round(fraction * n_train)
    if fraction > 0 and not 1 <= n_validation < n_train:
        raise ValueError(f"validation_fraction {fraction} of {n_train} training sequences holds out "
                         f"{n_validation}; it must leave at least one for validation and one for "
                         "training")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    return order[n_validation:].sort().values, order[:n_validation].sort().values


def run_record(
    config: TrainConfig, storn: STORN, data: SequenceData, data_path: str | os.PathLike | None
) -> dict[str, Any]:
    """What ``config.json`` holds: the config, the model's constructor arguments, and which data
    (path, sha256, sizes; ``n_train`` counts the validation sequences too)."""
    n_validation = (len(data.x_valid) if data.x_valid is not None else
                    len(validation_split(int(data.x.shape[0]), config.validation_fraction)[1]))
    return {
        "config": asdict(config),
        "model": storn.config(),
        "data": {
            "path": None if data_path is None else str(Path(data_path).resolve()),
            "sha256": None if data_path is None else _sha256(Path(data_path)),
            "arrays_sha256": arrays_sha256(data),  # the identity a resume checks
            "n_train": int(data.x.shape[0]), "n_validation": n_validation,
            "n_test": int(data.x_test.shape[0]),
            "n_steps": int(data.x.shape[1]), "input_dim": data.input_dim,
        },
    }


def warm_start(storn: STORN, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy into ``storn`` every parameter it shares by name with the trained run in ``run_dir``
    (its best state, else its last); the others, e.g. the layers of a flow that run has not,
    keep their own initialisation. Buffers, the data statistics among them, are not copied.

    This is how a flow guide joins a STORN that already uses its latent (plain STORN on the
    pendulum leaves its posterior collapse after 50-90 epochs; flow guides trained from scratch
    did not within 100). Returns ``{"run", "checkpoint", "parameters"}``: the source, its state
    (``{"which", "epoch"}``) and the names copied. ``ValueError`` names a shared parameter whose
    shape differs, or says that nothing is shared."""
    source, record = load_run(run_dir, device="cpu")
    source_parameters = dict(source.named_parameters())
    shared = {}
    for name, parameter in storn.named_parameters():
        if name not in source_parameters:
            continue
        if source_parameters[name].shape != parameter.shape:
            raise ValueError(
                f"cannot warm-start from {str(run_dir)!r}: its {name} has shape "
                f"{tuple(source_parameters[name].shape)}, this model's {tuple(parameter.shape)} "
                "(latent, hidden and input sizes and the RNN type must match)")
        shared[name] = parameter
    if not shared:
        raise ValueError(f"cannot warm-start from {str(run_dir)!r}: it shares no parameter with "
                         "this model")
    with torch.no_grad():
        for name, parameter in shared.items():
            parameter.copy_(source_parameters[name])
    return {"run": str(Path(run_dir).resolve()), "checkpoint": record["checkpoint"],
            "parameters": sorted(shared)}


def train(
    data: SequenceData,
    run_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    data_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    distributed: bool = False,
    example_noise: bool | None = None,
    log_every: int = 10,
) -> FitResult:
    """Train STORN on ``data`` into ``run_dir`` through :func:`pyro_storn.training.fit`; on
    ``resume`` the stored config is used, with ``config.epochs`` as the new total. With
    ``config.validation_fraction > 0`` that share of the training sequences
    (:func:`validation_split`) is held out: not trained on, scored every epoch (``validation/*``
    in ``metrics.jsonl``), and the state of the epoch with the lowest validation -ELBO is kept in
    ``best.pt``, which :func:`load_run` then prefers.

    :param distributed: join the ``torchrun`` process group (world size 1 without one);
        ``config.batch_size`` is then per rank. A checkpoint of either kind resumes in the other.
    :param example_noise: draw the guide's noise per example (:class:`ExampleNoise`), so that the
        numbers do not depend on the world size; default: on when ``distributed``.
    """
    run_dir = Path(run_dir)
    if resume:
        stored = read_run_config(run_dir)
        check_same_data(stored["data"], data, data_path, run_dir)  # before anything is rewritten
        config = TrainConfig.from_dict({**stored["config"], "epochs": config.epochs})
    config.validate()
    example_noise = distributed if example_noise is None else example_noise
    if example_noise and config.objective == "iwae":
        raise ValueError("objective 'iwae' draws its own samples per sequence and takes no "
                         "per-example noise (--distributed): train it in one process")
    env = init_distributed(config.device) if distributed else DistributedEnv(
        device=torch.device(config.device))
    held = ExitStack()  # the run directory's lock, rank 0's while it trains
    try:
        x, mask, x_test, mask_test = _tensors(data)
        if data.x_valid is not None and config.validation_fraction:
            raise ValueError(f"validation_fraction={config.validation_fraction}: the data have "
                             "a validation split of their own; use it (validation_fraction 0)")
        fit_index, validation_index = validation_split(x.shape[0], config.validation_fraction)
        x_validation, mask_validation = x[validation_index], mask[validation_index]
        x, mask = x[fit_index], mask[fit_index]
        if data.x_valid is not None:
            x_validation = torch.from_numpy(data.x_valid)
            mask_validation = torch.from_numpy(data.mask_valid)
        pyro.set_rng_seed(config.seed)  # the same initial parameters on every rank
        storn = build_storn(data.input_dim, config)
        storn.set_data_statistics(x, mask)
        # before anything is written: a bad source fails the run with nothing on disk (on resume
        # the checkpoint holds every parameter)
        init = warm_start(storn, config.init_from) if config.init_from and not resume else None
        storn.to(env.device)
        env.barrier()  # every rank has read the run directory before rank 0 writes to it
        # A refusal on rank 0 (the lock, an unwritable config.json) stops every rank at once.
        with primary_failure_stops_all(env):
            if env.is_primary:
                held.enter_context(lock_run(run_dir))  # creates run_dir; refuses a second trainer
                record = run_record(config, storn, data, data_path)
                if init is not None:
                    record["init_from"] = init
                elif resume and "init_from" in stored:
                    record["init_from"] = stored["init_from"]
                if distributed:
                    backend = torch.distributed.get_backend() if env.world_size > 1 else None
                    record["distributed"] = {
                        "world_size": env.world_size, "batch_size_per_rank": config.batch_size,
                        "effective_batch_size": config.batch_size * env.world_size,
                        "example_noise": example_noise, "backend": backend,
                    }
                write_text_atomic(run_dir / CONFIG_NAME, json.dumps(record, indent=2) + "\n")

        def before_epoch(epoch: int) -> None:
            if config.kl_anneal_epochs:
                storn.kl_weight = min(1.0, (epoch + 1) / config.kl_anneal_epochs)

        def epoch_metrics(epoch: int) -> dict[str, Any]:  # rank 0 only
            storn.eval()  # no dropout in the bounds
            try:
                return _split_metrics()
            finally:
                storn.train()

        def _split_metrics() -> dict[str, Any]:
            metrics: dict[str, Any] = {"kl_weight": storn.kl_weight}
            splits = {"train": (x, mask), "validation": (x_validation, mask_validation),
                      "test": (x_test, mask_test)}
            for split, (xs, ms) in splits.items():
                if xs.shape[0] == 0:
                    continue
                values = sequence_metrics(storn, xs, ms)
                metrics.update({f"{split}/{name}": value for name, value in values.items()})
            return metrics

        noise = ExampleNoise("z", seed=config.seed) if example_noise else None
        return fit(
            _objective(config, storn, noise), storn, (x, mask),
            epochs=config.epochs, batch_size=config.batch_size, run_dir=run_dir,
            optimizer=_optimizer(config, math.ceil(len(x) / config.batch_size)),
            seed=config.seed,
            env=env, epoch_metrics=epoch_metrics, before_epoch=before_epoch,
            before_step=None if noise is None else noise.set_batch,
            checkpoint_every=config.checkpoint_every, metrics_every=config.metrics_every,
            resume=resume, progress=progress,
            log_every=log_every, extra_state={"model": storn.config()},
            keep_best=VALIDATION_METRIC if len(x_validation) else None,
        )
    finally:
        held.close()
        env.close()


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` (:func:`~pyro_storn.rundir.read_run_record`: the file named on errors)."""
    return read_run_record(run_dir)


def _stored(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".prev").exists()


def load_run(
    run_dir: str | os.PathLike, device: str | None = None, checkpoint: str = "best"
) -> tuple[STORN, dict]:
    """The trained STORN of ``run_dir`` and the run's config record, with
    ``record["checkpoint"] = {"which": "best" | "last", "epoch": E}`` saying which state it is.

    :param checkpoint: ``"best"``: the state of the lowest validation -ELBO (``best.pt``) when the
        run held out validation sequences, else the last one; ``"last"``: the last epoch's."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, got "
                         f"{checkpoint!r}")
    record = read_run_config(run_dir)
    last, best = Path(run_dir) / CHECKPOINT_NAME, Path(run_dir) / BEST_NAME
    if not _stored(last):
        raise ValueError(f"{str(run_dir)!r} has no checkpoint yet (train it first)")
    # an unreadable best.pt falls back to checkpoint.pt, with a warning
    state, which = load_best_or_last(best, last, checkpoint == "best" and _stored(best))
    device = device or record["config"]["device"]
    model_args = dict(record["model"])
    try:
        storn = STORN(**model_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{Path(run_dir) / CONFIG_NAME}: its model does not describe a STORN "
                         f"({str(error).splitlines()[0]})") from None
    load_module_state(storn, state["module"], best if which == "best" else last)
    record["checkpoint"] = {"which": which, "epoch": int(state["epoch"])}
    return storn.to(device).eval(), record


def load_run_data(record: dict[str, Any]) -> SequenceData:
    """The data a run was trained on, checked against the sha256 recorded at training time."""
    path = record["data"]["path"]
    if path is None or not Path(path).is_file():
        raise ValueError(f"the run's data file {path!r} is gone; cannot evaluate")
    if _sha256(Path(path)) != record["data"]["sha256"]:
        raise ValueError(f"the run's data file {path!r} changed since training (sha256 differs)")
    return load_training_data(path)


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(1)


def load_training_data(path: str | os.PathLike) -> SequenceData:
    """A user's data file: a polyphonic pickle (Pyro's JSB Chorales format, read safely, with its
    train / valid / test splits) or an ``.npz`` of sequences
    (:func:`~pyro_storn.data.sequences.load_sequences`)."""
    path = Path(path)
    if path.is_file() and _first_byte(path) == PICKLE_PROTOCOL_OPCODE:
        return load_polyphonic(path).sequence_data()
    return load_sequences(path)


def default_particle_batch_size(num_samples: int, n_items: int, rows: int = ROWS_PER_PASS) -> int:
    """The largest divisor ``B`` of ``num_samples`` with ``B * n_items <= rows`` (at least 1):
    draws per vectorised pass that keep memory bounded whatever ``num_samples``."""
    cap = max(1, rows // max(1, n_items))
    return max(d for d in range(1, min(num_samples, cap) + 1) if num_samples % d == 0)


def _check_draw_sizes(num_samples: Any, particle_batch_size: Any, name: str) -> None:
    """``ValueError`` naming the value, before anything is loaded or written."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
            or num_samples < MIN_PSIS_SAMPLES:
        raise ValueError(f"{name} must be an int >= {MIN_PSIS_SAMPLES} (PSIS k-hat needs at "
                         f"least two draws), got {num_samples!r}")
    if particle_batch_size is None:
        return
    if isinstance(particle_batch_size, bool) or not isinstance(particle_batch_size, int) \
            or particle_batch_size < 1 or num_samples % particle_batch_size:
        raise ValueError(f"particle batch size must be a positive int dividing {name}="
                         f"{num_samples}, got {particle_batch_size!r}")


def _test_split(storn: STORN, data: SequenceData) -> tuple[torch.Tensor, torch.Tensor]:
    device = storn.data_loc.device
    return (torch.from_numpy(data.x_test).to(device),
            torch.from_numpy(data.mask_test).to(device))


def _importance_draws(
    storn: STORN, x: torch.Tensor, mask: torch.Tensor, num_samples: int,
    particle_batch_size: int | None,
) -> ImportanceDraws:
    batch = particle_batch_size or default_particle_batch_size(num_samples, x.shape[0])
    return draw_importance_samples(storn.model, storn.guide, x, mask, num_samples=num_samples,
                                   particle_batch_size=batch, max_plate_nesting=1)


def _bounds_from_draws(draws: ImportanceDraws, iwae_per_sequence: np.ndarray,
                       mask: torch.Tensor) -> dict[str, Any]:
    """:func:`~pyro_storn.evaluation.evaluate_bounds`'s numbers from importance draws already
    taken: the per-sequence log-weights are the same ``log p(x|z) + log p(z) - log q(z|x)``."""
    neg_elbo = -draws.log_weights_per_item.double().mean(0).numpy()
    neg_iwae = -np.asarray(iwae_per_sequence, dtype=float)
    n_steps = mask.sum(-1).cpu().numpy().astype(np.int64)
    return bounds_summary(neg_elbo, neg_iwae, n_steps, draws.num_samples)


def evaluate_run(
    run_dir: str | os.PathLike,
    num_samples: int = 100,
    seed: int = 0,
    device: str | None = None,
    psis_samples: int | None = 100,
    particle_batch_size: int | None = None,
    checkpoint: str = "best",
) -> dict[str, Any]:
    r"""Test -ELBO and -IWAE (``num_samples``) per sequence and per step, and the PSIS
    diagnostics of the guide on the test split, written to ``evaluation.json``.

    :param psis_samples: draws per test sequence for Pareto :math:`\hat k` (per sequence and
        joint), the IWAE bound and the importance ESS, stored as
        :meth:`ImportanceSummary.to_dict` under ``"psis"``. When it equals ``num_samples`` the
        bounds are computed from the same draws (one pass, not two). ``None``: no PSIS.
    :param particle_batch_size: draws per vectorised pass of the PSIS draws (must divide
        ``psis_samples``); default: as many as keep draws x sequences within
        :data:`ROWS_PER_PASS`.
    :param checkpoint: which state, as in :func:`load_run`; the result's ``"checkpoint"`` says
        which was used and its epoch.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if psis_samples is not None:
        _check_draw_sizes(psis_samples, particle_batch_size, "psis_samples")
    check_writable_dir(run_dir, "run directory")  # evaluation.json goes there: fail before work
    storn, record = load_run(run_dir, device, checkpoint)
    # A checkpoint taken during KL annealing may carry kl_weight < 1, which would scale log q
    # and log p(z) inside the importance weights: evaluate the model itself.
    storn.kl_weight = 1.0
    data = load_run_data(record)
    x_test, mask_test = _test_split(storn, data)
    pyro.set_rng_seed(seed)
    if psis_samples == num_samples:  # one set of draws serves the bounds and the diagnostics
        draws = _importance_draws(storn, x_test, mask_test, psis_samples, particle_batch_size)
        importance = summarize_importance(draws)
        result = _bounds_from_draws(draws, importance.iwae_per_item, mask_test)
    else:
        result = evaluate_bounds(storn, x_test, mask_test, num_samples=num_samples)
        importance = None
        if psis_samples is not None:
            importance = summarize_importance(
                _importance_draws(storn, x_test, mask_test, psis_samples, particle_batch_size))
    summary = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    if importance is not None:
        summary["psis"] = importance.to_dict()
    summary["checkpoint"] = record["checkpoint"]
    write_text_atomic(Path(run_dir) / EVALUATION_NAME, json.dumps(summary) + "\n")
    return summary


def diagnose_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    num_samples: int = 100,
    particle_batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    checkpoint: str = "best",
) -> dict[str, Path]:
    """ArviZ InferenceData and diagnostic figures of a trained run's guide on the test split,
    by :func:`~pyro_storn.diagnostics.write_diagnostics`, into ``out_dir`` (default
    ``RUN_DIR/diagnostics``): ``inference_data.nc`` (posterior ``z`` with dims (chain, draw,
    sequence, time, latent), posterior predictive and pointwise log-likelihood of ``x``, the
    data, log-weights), ``importance.json``, ``khat.png``, ``log_weights.png``, ``pair.png``.
    Returns ``{kind: path}``. Everything is checked before ``out_dir`` is created.
    ``checkpoint``: which state, as in :func:`load_run`."""
    _check_draw_sizes(num_samples, particle_batch_size, "num_samples")
    out_dir = Path(run_dir) / DIAGNOSTICS_DIR if out_dir is None else Path(out_dir)
    check_output_dir(out_dir, "output", force=True)  # a file, or not writable: before any work
    storn, record = load_run(run_dir, device, checkpoint)
    storn.kl_weight = 1.0  # as in evaluate_run: the model's own weights, not annealed ones
    data = load_run_data(record)
    x_test, mask_test = _test_split(storn, data)
    batch = particle_batch_size or default_particle_batch_size(num_samples, x_test.shape[0])
    pyro.set_rng_seed(seed)
    return write_diagnostics(
        out_dir, storn.model, storn.guide, x_test, mask_test, num_samples=num_samples,
        particle_batch_size=batch, item_name="sequence", dims=STORN_DIMS,
    )


def generate_run(
    run_dir: str | os.PathLike,
    n_prefix: int = 1,
    n_sequences: int = 4,
    num_samples: int = 5,
    seed: int = 0,
    device: str | None = None,
    checkpoint: str = "best",
) -> dict[str, np.ndarray]:
    """Observe the first ``n_prefix`` steps of the first ``n_sequences`` test sequences and
    generate the rest ``num_samples`` times; writes ``generated.npz`` (``actual`` (B, T, D),
    ``generated`` (S, B, T, D), ``mask``, ``n_prefix``; for a Bernoulli emission also
    ``probabilities`` (B, T, D), :meth:`STORN.step_probabilities` on the real sequences).
    ``checkpoint`` as in :func:`load_run`."""
    check_writable_dir(run_dir, "run directory")  # generated.npz goes there
    storn, record = load_run(run_dir, device, checkpoint)
    data = load_run_data(record)
    n_steps = data.x_test.shape[1]
    if not 1 <= n_prefix < n_steps:
        raise ValueError(f"prefix length must be in [1, {n_steps - 1}], got {n_prefix}")
    unobserved = ~data.mask_test[:n_sequences, :n_prefix]
    if unobserved.any():  # the decoder would start from values the data do not have
        sequence, step = (int(i) for i in np.argwhere(unobserved)[0])
        advice = f"use a prefix of at most {step} step(s)" if step else "it has no observed start"
        raise ValueError(f"prefix of {n_prefix} step(s): test sequence {sequence} is not "
                         f"observed at step {step} (mask 0); {advice}")
    actual = torch.from_numpy(data.x_test[:n_sequences])
    pyro.set_rng_seed(seed)
    generated = storn.generate(actual[:, :n_prefix].to(storn.data_loc.device), n_steps,
                               num_samples=num_samples)
    finite = torch.isfinite(generated)
    if not bool(finite.all()):
        index = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"the generated sequences hold a non-finite value "
                         f"({float(generated[index])} at (sample, sequence, step, feature) "
                         f"{index}); nothing written")
    out = {"actual": actual.numpy(), "generated": generated.cpu().numpy(),
           "mask": data.mask_test[:n_sequences], "n_prefix": np.array(n_prefix)}
    if storn.emission_type == "bernoulli":  # for the piano roll: the model's notes on the real ones
        mask = torch.from_numpy(data.mask_test[:n_sequences]).to(storn.data_loc.device)
        out["probabilities"] = storn.step_probabilities(
            actual.to(storn.data_loc.device), mask, num_samples=num_samples).cpu().numpy()
    atomic_write(Path(run_dir) / GENERATED_NAME, lambda handle: np.savez(handle, **out))
    return out
