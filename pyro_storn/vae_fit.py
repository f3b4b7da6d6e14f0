r"""Training and evaluating the flow VAE (:class:`pyro_storn.vae.VAE`) on MNIST images.

:func:`fit_vae` trains through the one loop :func:`pyro_storn.training.fit` (SVI with
:class:`~pyro.infer.Trace_ELBO`, Adam, one global-norm clip), with the images of
:mod:`pyro_storn.data.mnist` as they come (dynamic or static binarisation), a learning-rate
schedule that is a function of the step, KL warm-up, the flow's terms per epoch and, when the
data have a validation split, the best checkpoint by validation -ELBO. :func:`evaluate_bounds`
gives -ELBO and the importance-weighted -IWAE per image (:mod:`pyro_storn.bounds`);
:func:`flow_metrics` the terms :math:`\log q_0`, :math:`\log q_K`, :math:`\sum\log|\det J|` and
:math:`\log p(z_K)` of :func:`pyro_storn.flow_terms.flow_terms`.

>>> vae = VAE(flow="planar", flow_length=10)
>>> data = load_binarized_mnist_npz("binarized_mnist.npz")                 # doctest: +SKIP
>>> fit_vae(vae, data, epochs=10, run_dir="runs/vae")                      # doctest: +SKIP
>>> load_best(vae, "runs/vae")                                             # doctest: +SKIP
>>> evaluate_bounds(vae, data.test_tensor(), num_samples=5000)             # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import torch

from . import bounds
from .checkpoint import load_checkpoint, previous_path
from .flow_terms import flow_terms
from .validation import check_non_negative_int, check_positive_int
from .vae import VAE, eval_mode

if TYPE_CHECKING:
    from .data.mnist import MNISTData
    from .training import FitResult

__all__ = [
    "FLOW_METRIC_NAMES",
    "VALID_METRIC",
    "flow_metrics",
    "evaluate_bounds",
    "kl_warmup_weight",
    "learning_rate_factor",
    "fit_vae",
    "load_best",
]

# Rows (images x samples) per forward pass of the IWAE estimate: ~30 MB of logits in float32,
# so S = 5000 samples of a large test set fit on any device.
_ROWS_PER_CHUNK = 10_000

FLOW_METRIC_NAMES = ("neg_elbo", "recon_nll", "kl", "log_q0", "log_qK", "sum_log_det", "log_prior")

# The epoch record that selects the best checkpoint when the data have a validation split.
VALID_METRIC = "valid_neg_elbo"


def _image_batches(x: torch.Tensor, size: int, device: torch.device):
    for start in range(0, x.shape[0], size):
        yield x[start : start + size].to(device)


def _device_of(vae: VAE) -> torch.device:
    return vae.posterior_head.weight.device


@torch.no_grad()
def flow_metrics(vae: VAE, x: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Single-sample estimates averaged over the images ``x`` ``(N, D)``: -ELBO, reconstruction
    NLL, KL, and the flow's terms ``E[log q0(z0)]``, ``E[log qK(zK)]``, ``E[Σ log|det J|]``,
    ``E[log p(zK)]`` (Figs. 3-4 of the study). The KL is never annealed here; ``vae`` is in
    ``eval()`` mode while they are computed."""
    with eval_mode(vae):
        return _flow_metrics(vae, x, batch_size)


def _flow_metrics(vae: VAE, x: torch.Tensor, batch_size: int) -> dict[str, float]:
    sums = {name: 0.0 for name in FLOW_METRIC_NAMES}
    for xb in _image_batches(x, batch_size, _device_of(vae)):
        terms = flow_terms(vae.posterior(xb), vae.prior(xb.shape[:-1]))
        log_lik = vae.likelihood(terms.zK).log_prob(xb)
        values = {
            "neg_elbo": terms.kl - log_lik, "recon_nll": -log_lik, "kl": terms.kl,
            "log_q0": terms.log_q0, "log_qK": terms.log_qK, "sum_log_det": terms.sum_log_det,
            "log_prior": terms.log_prior,
        }
        for name, value in values.items():
            sums[name] += float(value.double().sum())
    return {name: total / x.shape[0] for name, total in sums.items()}


@torch.no_grad()
def evaluate_bounds(
    vae: VAE, x: torch.Tensor, num_samples: int = 1000, max_rows: int = _ROWS_PER_CHUNK
) -> dict[str, Any]:
    """-ELBO and -IWAE per image from the same ``num_samples`` posterior samples of each image
    (:func:`pyro_storn.bounds.log_weight_bounds` on :meth:`VAE.log_weights`), so -IWAE <= -ELBO
    for every image. Samples are drawn in chunks of at most ``max_rows`` image-samples, the
    encoder run once per pass of images.

    Returns per-image arrays ``neg_elbo``, ``neg_iwae`` and ``log_weight_var`` (the sample
    variance of the log-weights, for Monte Carlo errors), their means and spreads over images
    (``*_mean``, ``*_sd``, as :func:`pyro_storn.evaluation.evaluate_bounds` gives for STORN), and
    the standard errors of the means (``*_se``), in nats per image. ``vae`` is in ``eval()``
    mode while they are computed.
    """
    with eval_mode(vae):
        return _evaluate_bounds(vae, x, num_samples, max_rows)


def _evaluate_bounds(vae: VAE, x: torch.Tensor, num_samples: int, max_rows: int
                     ) -> dict[str, Any]:
    check_positive_int("num_samples", num_samples)
    device = _device_of(vae)
    images_per_pass = max(1, min(x.shape[0], max_rows))
    parts: dict[str, list[torch.Tensor]] = {"neg_elbo": [], "neg_iwae": [], "log_weight_var": []}
    for xb in _image_batches(x, images_per_pass, device):
        posterior = vae.posterior(xb)
        per_image = bounds.log_weight_bounds(
            lambda count: vae.log_weights(xb, count, posterior), num_samples,
            bounds.samples_per_chunk(xb.shape[0], num_samples, max_rows))
        for name, values in per_image.items():
            parts[name].append(values.cpu())
    values = {name: torch.cat(chunks).numpy() for name, chunks in parts.items()}
    out = bounds.summarize(values["neg_elbo"], values["neg_iwae"], num_samples,
                           count_name="n_images")
    out["log_weight_var"] = values["log_weight_var"]
    return out


def kl_warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """KL weight of 0-based ``epoch`` under a linear warm-up over ``warmup_epochs`` epochs
    (1/W, 2/W, ..., 1, 1, ...; 1 throughout when ``warmup_epochs`` is 0)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def learning_rate_factor(epoch: float, lr_decay: float = 1.0,
                         lr_decay_epochs: float | None = None) -> float:
    """The learning rate's factor after ``epoch`` (fractional) epochs: ``lr_decay ** epoch``
    times the inverse-time decay ``1 / (1 + epoch / lr_decay_epochs)`` (the study's
    lr / (1 + t / 100) has ``lr_decay_epochs = 100``; ``None``: no inverse-time decay)."""
    factor = lr_decay ** epoch
    if lr_decay_epochs is not None:
        factor /= 1.0 + epoch / lr_decay_epochs
    return factor


def fit_vae(
    vae: VAE,
    data: "MNISTData",
    *,
    epochs: int,
    run_dir: str | os.PathLike,
    batch_size: int = 100,
    lr: float = 1e-3,
    lr_decay: float = 1.0,
    lr_decay_epochs: float | None = None,
    clip_norm: float = 10.0,
    warmup_epochs: int = 0,
    metric_images: int = 1000,
    valid_images: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> "FitResult":
    """Train ``vae`` on ``data`` with SVI and :class:`~pyro.infer.Trace_ELBO` through the
    generic loop :func:`pyro_storn.training.fit` (minibatches, ``metrics.jsonl``, checkpoints,
    resume, non-finite-loss stop).

    Training images come from :meth:`MNISTData.train_dataset`: binarised afresh for every batch
    (grey levels), or the same binary images every epoch (the fixed binarization). Adam with the
    loop's one clipping rule (the gradient's global norm at most ``clip_norm``), the learning rate
    ``lr * learning_rate_factor(t)`` with ``t`` the epochs done so far, counted in steps (so the
    checkpoint keeps it). KL warm-up: the latent site's weight is :func:`kl_warmup_weight` of
    the epoch.

    Each epoch's line of ``metrics.jsonl`` holds :func:`flow_metrics` on the first
    ``metric_images`` training images (binarised once) as ``train_*`` and on as many test images
    as ``test_*``, the KL weight and the learning rate. When ``data.valid`` is set, also the
    single-sample -ELBO of the first ``valid_images`` validation images (all by default) as
    ``valid_neg_elbo``, and the state of the epoch with the lowest one is kept in ``best.pt``
    (:func:`load_best`).
    """
    from .training import Optimizer, elbo_module, fit, reraise_interrupt

    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("metric_images", metric_images)):
        check_positive_int(name, value)
    if valid_images is not None:
        check_positive_int("valid_images", valid_images)
    check_non_negative_int("warmup_epochs", warmup_epochs)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    if lr_decay_epochs is not None and not lr_decay_epochs > 0:
        raise ValueError(f"lr_decay_epochs must be positive or None, got {lr_decay_epochs!r}")
    if data.train.shape[1] != vae.input_dim:
        raise ValueError(
            f"images have {data.train.shape[1]} pixels, the VAE expects {vae.input_dim}"
        )
    device = torch.device(device)
    batches_per_epoch = math.ceil(data.train.shape[0] / batch_size)
    optimizer = Optimizer(lr=lr, clip_norm=clip_norm, lr_factor=lambda step, _: learning_rate_factor(
        step / batches_per_epoch, lr_decay, lr_decay_epochs))
    train_probe = data.fixed_train()[:metric_images]
    test_probe = data.test_tensor()[:metric_images]
    valid = data.valid_tensor()
    if valid is not None:
        valid = valid[:valid_images]

    def before_epoch(epoch: int) -> None:
        vae.kl_weight = kl_warmup_weight(epoch, warmup_epochs)

    def epoch_metrics(epoch: int) -> dict[str, Any]:
        record: dict[str, Any] = {"kl_weight": vae.kl_weight}
        for prefix, images in (("train", train_probe), ("test", test_probe)):
            for name, value in flow_metrics(vae, images).items():
                record[f"{prefix}_{name}"] = value
        if valid is not None:
            record[VALID_METRIC] = flow_metrics(vae, valid)["neg_elbo"]
        return record

    vae.train()  # batch statistics while it learns; the metrics switch to eval() themselves
    try:
        return reraise_interrupt(fit(
            elbo_module(pyro.infer.Trace_ELBO(), vae), vae, (data.train_dataset(),),
            epochs=epochs, batch_size=batch_size, run_dir=run_dir, optimizer=optimizer,
            seed=seed, device=device,
            epoch_metrics=epoch_metrics, before_epoch=before_epoch, resume=resume,
            extra_state={"vae": vae.config(), "data": data.source}, progress=progress,
            keep_best=VALID_METRIC if valid is not None else None,
        ))
    finally:
        vae.kl_weight = 1.0


def load_best(vae: VAE, run_dir: str | os.PathLike) -> int | None:
    """Load the state ``fit_vae`` kept in ``run_dir/best.pt`` (lowest validation -ELBO) into
    ``vae`` and return its epoch (1-based); ``None``, leaving ``vae`` as it is, when the run kept
    none (no validation split)."""
    from .training import BEST_NAME

    path = Path(run_dir) / BEST_NAME
    if not path.exists() and not previous_path(path).exists():
        return None
    state = load_checkpoint(path, map_location=_device_of(vae))
    vae.load_state_dict(state["module"])
    return int(state["epoch"])
