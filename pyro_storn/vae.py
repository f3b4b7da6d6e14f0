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
batch 100, Adam, batch normalisation). The activation is an option (``"relu"`` by default), and
so are the study's batch normalisation after every hidden linear layer (``batch_norm=True``;
statistics of the minibatch in ``train()`` mode, the running ones in ``eval()`` mode) and the
gated layers of Tomczak & Welling's code, :math:`h = (W x + b) \odot \sigma(V x + c)` in place
of ``activation(W x + b)`` (``gated=True``) [2, 4].

:mod:`pyro_storn.vae_fit` trains it (through the one loop :func:`pyro_storn.training.fit`) and
evaluates its bounds; this module is the model only.

>>> vae = VAE(flow="planar", flow_length=10)
>>> objective = pyro_storn.training.elbo_module(pyro.infer.Trace_ELBO(), vae)  # doctest: +SKIP

References:
[1] Danilo J. Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    arXiv:1505.05770
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using Householder Flow.
    arXiv:1611.09630
[3] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling.
    Improving Variational Inference with Inverse Autoregressive Flow. arXiv:1606.04934
[4] Jakub M. Tomczak, Max Welling. VAE with a VampPrior. arXiv:1705.07120 (its GatedDense).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

import transforms

from .flow_terms import flow_terms

__all__ = [
    "VAE", "ACTIVATIONS", "MIN_POSTERIOR_SCALE", "BatchNorm", "GatedLinear", "eval_mode",
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


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in ``eval()`` mode inside the block, its former mode after: a bound of one
    image must not depend on the others in its batch (batch normalisation's running
    statistics), and sampling must not move those statistics."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class BatchNorm(nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` over the last dim of inputs of any batch shape: the decoder
    sees ``(samples, images, Z)`` latents, which ``BatchNorm1d`` would read as channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class GatedLinear(nn.Module):
    """:math:`h = (W x + b) \odot \sigma(V x + c)`, Tomczak & Welling's ``GatedDense``."""

    def __init__(self, size_in: int, size_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size_in, size_out)
        self.gate = nn.Linear(size_in, size_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(x))


def _mlp(sizes: Sequence[int], activation: type[nn.Module], *, batch_norm: bool = False,
         gated: bool = False) -> nn.Sequential:
    """Hidden layers between consecutive ``sizes``: ``Linear`` then ``activation``, or a
    :class:`GatedLinear`; with ``batch_norm``, a :class:`BatchNorm` after each linear map (before
    the activation, as Ioffe & Szegedy place it; after the gate of a gated layer)."""
    layers: list[nn.Module] = []
    for size_in, size_out in zip(sizes[:-1], sizes[1:]):
        layers.append(GatedLinear(size_in, size_out) if gated else nn.Linear(size_in, size_out))
        if batch_norm:
            layers.append(BatchNorm(size_out))
        if not gated:
            layers.append(activation())
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
    :param activation: a key of :data:`ACTIVATIONS` (unused by gated layers).
    :param batch_norm: batch normalisation after every hidden linear map, encoder and decoder.
    :param gated: gated hidden layers (:class:`GatedLinear`) in place of linear + activation.
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
        batch_norm: bool = False,
        gated: bool = False,
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
        self.batch_norm, self.gated = bool(batch_norm), bool(gated)
        self.kl_weight = float(kl_weight)
        self._condition_flow, self._flow_kwargs = condition_flow, dict(flow_kwargs or {})

        act = ACTIVATIONS[activation]
        context_dim = hidden_dims[-1]
        layer = {"batch_norm": self.batch_norm, "gated": self.gated}
        self.encoder = _mlp((input_dim,) + hidden_dims, act, **layer)
        self.posterior_head = nn.Linear(context_dim, 2 * latent_dim)
        self.decoder = nn.Sequential(
            _mlp((latent_dim,) + hidden_dims[::-1], act, **layer),
            nn.Linear(hidden_dims[0], input_dim),
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
            f"hidden_dims={self.hidden_dims}, activation={self.activation}, "
            f"batch_norm={self.batch_norm}, gated={self.gated}, flow={flow}, "
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
        or binary draws; in ``eval()`` mode (batch normalisation's running statistics)."""
        z = self.prior((num_samples,)).sample()
        with eval_mode(self):
            probs = torch.sigmoid(self.decode(z))
        return probs if mean else torch.bernoulli(probs)

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (for checkpoints)."""
        return {
            "input_dim": self.input_dim, "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims), "flow": self.flow_name,
            "flow_length": self.flow_length, "condition_flow": self._condition_flow,
            "activation": self.activation, "batch_norm": self.batch_norm, "gated": self.gated,
            "kl_weight": self.kl_weight,
            "flow_kwargs": self._flow_kwargs,
        }
