r"""A variational autoencoder for binary images whose posterior is a normalizing flow.

Generative model: :math:`z \sim \mathcal N(0, I_Z)`, :math:`x \sim \mathrm{Bernoulli}(
\sigma(\mathrm{MLP}_\theta(z)))` pixel by pixel. Guide: an MLP encoder of :math:`x` gives
:math:`(\mu, \sigma, h)` (``h`` its last hidden layer); :math:`z_0 \sim q_0 = \mathcal N(\mu,
\mathrm{diag}\,\sigma^2)` is pushed through ``flow_length`` layers of any flow of the
:mod:`transforms` registry, :math:`z_K = f_K \circ \dots \circ f_1(z_0)`, whose parameters are
functions of ``h`` when the flow can be conditioned (amortised, as in [1, 2, 3]) and free
parameters shared by all images otherwise. The bound it is trained on,

.. math::

    \mathcal L(x) = \mathbb E_{q_0}\Big[\log p(x \mid z_K) + \log p(z_K) - \log q_0(z_0)
    + \sum_{k=1}^K \log\Big|\det \frac{\partial f_k}{\partial z_{k-1}}\Big|\Big],

is what Pyro's :class:`~pyro.infer.Trace_ELBO` computes from :meth:`VAE.model` and
:meth:`VAE.guide` (latent site ``"z"``, event dim 1; observed site ``"x"``, event dim 1).

Defaults follow the study this reproduces (two hidden layers of 300 units, 40 latent dims;
batch 100, Adam). The activation is an option (``"relu"`` by default).

:func:`fit_vae` trains a VAE on :mod:`pyro_storn.data.mnist` images through the generic loop
:func:`pyro_storn.training.fit` (dynamic binarisation, learning-rate decay, KL warm-up, the
flow's terms per epoch); :func:`evaluate_bounds` gives -ELBO and the importance-weighted
-IWAE per image; :func:`flow_metrics` the terms :math:`\log q_0`, :math:`\log q_K`,
:math:`\sum\log|\det J|` and :math:`\log p(z_K)` of :func:`pyro_storn.flow_terms.flow_terms`.

>>> vae = VAE(flow="planar", flow_length=10)
>>> svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
...                      pyro.infer.Trace_ELBO())                        # doctest: +SKIP
>>> fit_vae(vae, load_mnist_5k(), epochs=10, run_dir="runs/vae")       # doctest: +SKIP
>>> evaluate_bounds(vae, load_mnist_5k().test_tensor(), num_samples=1000)  # doctest: +SKIP

References:
[1] Danilo J. Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    arXiv:1505.05770
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using Householder Flow.
    arXiv:1611.09630
[3] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling.
    Improving Variational Inference with Inverse Autoregressive Flow. arXiv:1606.04934
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

import transforms

from .flow_terms import flow_terms

if TYPE_CHECKING:
    from .data.mnist import MNISTData
    from .training import FitResult

__all__ = [
    "VAE",
    "ACTIVATIONS",
    "FLOW_METRIC_NAMES",
    "flow_metrics",
    "evaluate_bounds",
    "kl_warmup_weight",
    "fit_vae",
]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}

# q0's scales are softplus(raw) + floor: keeps log q0 finite when the encoder grows very sure
# of a dimension; far below the posterior widths of a binary-MNIST VAE (~1e-2 and up).
MIN_POSTERIOR_SCALE = 1e-4


def _mlp(sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, each followed by ``activation``."""
    layers: list[nn.Module] = []
    for size_in, size_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(size_in, size_out), activation()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A Bernoulli VAE with a flow posterior; see the module docstring.

    :param input_dim: pixels per image ``D`` (784 for MNIST).
    :param latent_dim: latent dims ``Z``.
    :param hidden_dims: widths of the encoder's hidden layers; the decoder mirrors them.
    :param flow: a name from :func:`transforms.available` (event dim 1), or ``None`` / ``"none"``.
    :param flow_length: layers of that flow (``K``); 0 means no flow.
    :param condition_flow: amortise the flow (condition it on the encoder's last hidden layer)
        when the flow supports it; otherwise its parameters are shared by all images.
    :param activation: a key of :data:`ACTIVATIONS`.
    :param kl_weight: factor on the latent site's log-densities (KL warm-up sets it per epoch).
    :param flow_kwargs: passed on to the flow's builder.
    """

    def __init__(
        self,
        input_dim: int = 784,
        latent_dim: int = 40,
        hidden_dims: Sequence[int] = (300, 300),
        flow: str | None = None,
        flow_length: int = 0,
        *,
        condition_flow: bool = True,
        activation: str = "relu",
        kl_weight: float = 1.0,
        flow_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims or any(
            isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden_dims
        ):
            raise ValueError(f"hidden_dims must be one or more positive ints, got {hidden_dims!r}")
        if isinstance(flow_length, bool) or not isinstance(flow_length, int) or flow_length < 0:
            raise ValueError(f"flow_length must be a non-negative int, got {flow_length!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
            )
        flow = None if flow in (None, "none") else flow
        if flow is not None and flow_length == 0:
            raise ValueError(f"flow {flow!r} needs flow_length >= 1")
        if flow is None and flow_length > 0:
            raise ValueError(f"flow_length={flow_length} needs a flow name")
        if flow is not None and transforms.info(flow).event_dim != 1:
            raise ValueError(
                f"flow {flow!r} acts on whole sequences; the VAE's latent is one vector: "
                f"{', '.join(transforms.available(event_dim=1))}"
            )
        self.input_dim, self.latent_dim, self.hidden_dims = input_dim, latent_dim, hidden_dims
        self.flow_name, self.flow_length = flow, flow_length
        self.activation = activation
        self.kl_weight = float(kl_weight)
        self._condition_flow, self._flow_kwargs = condition_flow, dict(flow_kwargs or {})

        act = ACTIVATIONS[activation]
        context_dim = hidden_dims[-1]
        self.encoder = _mlp((input_dim,) + hidden_dims, act)
        self.posterior_head = nn.Linear(context_dim, 2 * latent_dim)
        self.decoder = nn.Sequential(
            _mlp((latent_dim,) + hidden_dims[::-1], act), nn.Linear(hidden_dims[0], input_dim)
        )

        self.flow_conditional = False
        self.flow: nn.Module | None = None
        if flow is not None:
            self.flow_conditional = bool(condition_flow and transforms.info(flow).conditional)
            self.flow = transforms.flow(
                flow, latent_dim, flow_length,
                context_dim=context_dim if self.flow_conditional else None,
                **self._flow_kwargs,
            )

    def extra_repr(self) -> str:
        flow = f"{self.flow_name} x{self.flow_length}" if self.flow_name else "none"
        return (
            f"input_dim={self.input_dim}, latent_dim={self.latent_dim}, "
            f"hidden_dims={self.hidden_dims}, activation={self.activation}, flow={flow}, "
            f"conditional={self.flow_conditional}"
        )

    # ---- networks ------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(μ, σ, h)`` for images ``x`` (..., D): q0's parameters and the encoder's last
        hidden layer (the flow's context)."""
        hidden = self.encoder(x)
        loc, raw_scale = self.posterior_head(hidden).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + MIN_POSTERIOR_SCALE, hidden

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (..., D) of the pixels given ``z`` (..., Z)."""
        return self.decoder(z)

    # ---- distributions -------------------------------------------------------------------------

    def prior(self, batch_shape: torch.Size | tuple[int, ...]) -> dist.Distribution:
        """:math:`\\mathcal N(0, I_Z)`, event dim 1."""
        reference = self.posterior_head.weight
        zeros = reference.new_zeros(tuple(batch_shape) + (self.latent_dim,))
        return dist.Normal(zeros, 1.0).to_event(1)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """:math:`q(z_K \\mid x)`: ``q0`` pushed through the flow (event dim 1). Its
        ``base_dist`` and ``transforms`` are what :func:`pyro_storn.flow_terms.flow_terms`
        reads."""
        loc, scale, hidden = self.encode(x)
        base = dist.Normal(loc, scale).to_event(1)
        if self.flow is None:
            return base
        flow = self.flow.condition(hidden) if self.flow_conditional else self.flow
        return dist.TransformedDistribution(base, [flow])

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """:math:`p(x \\mid z)`, independent Bernoulli pixels (event dim 1)."""
        return dist.Bernoulli(logits=self.decode(z)).to_event(1)

    # ---- Pyro programs -------------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"x must be a batch of images (B, {self.input_dim}), got shape {tuple(x.shape)}"
            )

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """Prior on ``"z"``, Bernoulli pixels on the observed ``"x"`` ``(B, D)``."""
        self._check_images(x)
        pyro.module("vae", self)
        with pyro.plate("images", x.shape[-2], dim=-1):
            with poutine.scale(scale=self.kl_weight):
                z = pyro.sample("z", self.prior(x.shape[-2:-1]))
            return pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder, ``q0`` and the flow on ``"z"``."""
        self._check_images(x)
        pyro.module("vae", self)
        with pyro.plate("images", x.shape[-2], dim=-1):
            with poutine.scale(scale=self.kl_weight):
                return pyro.sample("z", self.posterior(x))

    # ---- direct estimates ----------------------------------------------------------------------

    def log_weights(
        self, x: torch.Tensor, num_samples: int = 1, posterior: dist.Distribution | None = None
    ) -> torch.Tensor:
        """``(num_samples, B)`` importance log-weights :math:`\\log p(x, z_s) - \\log q(z_s \\mid
        x)` with :math:`z_s \\sim q(\\cdot \\mid x)`, computed in one pass through the flow (the
        log-dets of the forward pass, no inverse); ``kl_weight`` is not applied. Their mean is an
        ELBO estimate, their log-mean-exp an IWAE estimate.

        :param posterior: ``self.posterior(x)`` when already computed (more samples for the same
            images without running the encoder again).
        """
        if posterior is None:
            posterior = self.posterior(x)
        terms = flow_terms(posterior, self.prior(x.shape[:-1]), (num_samples,))
        return self.likelihood(terms.zK).log_prob(x) + terms.log_prior - terms.log_qK

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Images from the model, ``(num_samples, D)``: pixel probabilities (``mean=True``)
        or binary draws."""
        z = self.prior((num_samples,)).sample()
        probs = torch.sigmoid(self.decode(z))
        return probs if mean else torch.bernoulli(probs)

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (for checkpoints)."""
        return {
            "input_dim": self.input_dim, "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims), "flow": self.flow_name,
            "flow_length": self.flow_length, "condition_flow": self._condition_flow,
            "activation": self.activation, "kl_weight": self.kl_weight,
            "flow_kwargs": self._flow_kwargs,
        }


# ---- training and evaluation -------------------------------------------------------------------

# Rows (images x samples) per forward pass of the IWAE estimate: ~30 MB of logits in float32,
# so S = 1000 samples of a large test set fit on any device.
_ROWS_PER_CHUNK = 10_000

FLOW_METRIC_NAMES = ("neg_elbo", "recon_nll", "kl", "log_q0", "log_qK", "sum_log_det", "log_prior")


def _image_batches(x: torch.Tensor, size: int, device: torch.device):
    for start in range(0, x.shape[0], size):
        yield x[start : start + size].to(device)


def _device_of(vae: VAE) -> torch.device:
    return vae.posterior_head.weight.device


@torch.no_grad()
def flow_metrics(vae: VAE, x: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Single-sample estimates averaged over the images ``x`` ``(N, D)``: -ELBO, reconstruction
    NLL, KL, and the flow's terms ``E[log q0(z0)]``, ``E[log qK(zK)]``, ``E[Σ log|det J|]``,
    ``E[log p(zK)]`` (Figs. 3-4 of the study). The KL is never annealed here."""
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
    """-ELBO and -IWAE per image from the same ``num_samples`` posterior samples of each image:

    .. math::

        -\\mathrm{ELBO} = -\\frac1S\\sum_s \\log w_s,\\qquad
        -\\mathrm{IWAE}_S = -\\log\\frac1S\\sum_s w_s \\;\\ge\\; -\\log p(x),

    with :math:`\\log w_s` from :meth:`VAE.log_weights`; by Jensen's inequality -IWAE <= -ELBO
    for every image. Samples are drawn in chunks of at most ``max_rows`` image-samples, the
    log-sum-exp accumulated across chunks.

    Returns per-image arrays ``neg_elbo``, ``neg_iwae`` and ``log_weight_var`` (the sample
    variance of the log-weights, for Monte Carlo errors), their means and spreads over images
    (``*_mean``, ``*_sd``, as :func:`pyro_storn.evaluation.evaluate_bounds` gives for STORN), and
    the standard errors of the means (``*_se``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    device = _device_of(vae)
    images_per_pass = max(1, min(x.shape[0], max_rows))
    neg_elbo, neg_iwae, log_weight_var = [], [], []
    for xb in _image_batches(x, images_per_pass, device):
        chunk = max(1, max_rows // xb.shape[0])
        log_sum_exp = xb.new_full(xb.shape[:1], -float("inf"), dtype=torch.float64)
        total = torch.zeros_like(log_sum_exp)
        total_sq = torch.zeros_like(log_sum_exp)
        posterior = vae.posterior(xb)
        for start in range(0, num_samples, chunk):
            log_w = vae.log_weights(xb, min(chunk, num_samples - start), posterior).double()
            log_sum_exp = torch.logaddexp(log_sum_exp, torch.logsumexp(log_w, 0))
            total += log_w.sum(0)
            total_sq += log_w.square().sum(0)
        mean = total / num_samples
        neg_elbo.append(-mean)
        neg_iwae.append(math.log(num_samples) - log_sum_exp)
        variance = (total_sq / num_samples - mean.square()).clamp_min(0.0)
        log_weight_var.append(variance * num_samples / max(num_samples - 1, 1))
    out: dict[str, Any] = {"num_samples": num_samples, "n_images": int(x.shape[0])}
    for name, parts in (("neg_elbo", neg_elbo), ("neg_iwae", neg_iwae),
                        ("log_weight_var", log_weight_var)):
        out[name] = torch.cat(parts).cpu().numpy()
    for name in ("neg_elbo", "neg_iwae"):
        values = out[name]
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_sd"] = float(values.std())
        out[f"{name}_se"] = (
            float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        )
    return out


def kl_warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """KL weight of 0-based ``epoch`` under a linear warm-up over ``warmup_epochs`` epochs
    (1/W, 2/W, ..., 1, 1, ...; 1 throughout when ``warmup_epochs`` is 0)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def fit_vae(
    vae: VAE,
    data: "MNISTData",
    *,
    epochs: int,
    run_dir: str | os.PathLike,
    batch_size: int = 100,
    lr: float = 1e-3,
    lr_decay: float = 1.0,
    clip_norm: float = 10.0,
    warmup_epochs: int = 0,
    metric_images: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> "FitResult":
    """Train ``vae`` on ``data`` with SVI and :class:`~pyro.infer.Trace_ELBO` through the
    generic loop :func:`pyro_storn.training.fit` (minibatches, ``metrics.jsonl``, checkpoints,
    resume, non-finite-loss stop).

    Training images are binarised afresh for every batch. Adam with the loop's one clipping rule
    (the gradient's global norm at most ``clip_norm``), the learning rate multiplied by
    ``lr_decay`` per epoch (spread evenly over its steps: a function of the step count, which
    the checkpoint keeps). KL warm-up: the latent site's weight is :func:`kl_warmup_weight` of
    the epoch.

    Each epoch's line of ``metrics.jsonl`` holds :func:`flow_metrics` on the first
    ``metric_images`` training images (binarised once) as ``train_*`` and on as many test images
    as ``test_*``, the KL weight and the learning rate.
    """
    from .training import Optimizer, elbo_module, fit

    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("metric_images", metric_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a non-negative int, got {warmup_epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    if data.train.shape[1] != vae.input_dim:
        raise ValueError(
            f"images have {data.train.shape[1]} pixels, the VAE expects {vae.input_dim}"
        )
    device = torch.device(device)
    batches_per_epoch = math.ceil(data.train.shape[0] / batch_size)
    optimizer = Optimizer(lr=lr, clip_norm=clip_norm,
                          lr_factor=lambda step, _: lr_decay ** (step / batches_per_epoch))
    train_probe = data.fixed_train()[:metric_images]
    test_probe = data.test_tensor()[:metric_images]

    def before_epoch(epoch: int) -> None:
        vae.kl_weight = kl_warmup_weight(epoch, warmup_epochs)

    def epoch_metrics(epoch: int) -> dict[str, Any]:
        record: dict[str, Any] = {"kl_weight": vae.kl_weight}
        for prefix, images in (("train", train_probe), ("test", test_probe)):
            for name, value in flow_metrics(vae, images).items():
                record[f"{prefix}_{name}"] = value
        return record

    try:
        return fit(
            elbo_module(pyro.infer.Trace_ELBO(), vae), vae, (data.train_dataset(),),
            epochs=epochs, batch_size=batch_size, run_dir=run_dir, optimizer=optimizer,
            seed=seed, device=device,
            epoch_metrics=epoch_metrics, before_epoch=before_epoch, resume=resume,
            extra_state={"vae": vae.config(), "data": data.source}, progress=progress,
        )
    finally:
        vae.kl_weight = 1.0
