"""STORN: stochastic recurrent networks (Bayer & Osendorfer 2014) with flow posteriors.

Generative model ("STORN with input"): a latent :math:`z_t \\sim \\mathcal N(0, I)` per step and a
recurrent decoder fed the previous observation,

.. math::

    h^g_t = \\mathrm{RNN}_g(h^g_{t-1}, [x_{t-1}, z_t]),\\qquad
    x_t \\sim \\mathcal N(\\mu_x(h^g_t), \\sigma_x(h^g_t)^2),\\qquad x_0 := 0.

Guide: a recognition RNN over :math:`x_{1:t}` gives :math:`(\\mu_t, \\sigma_t, h_t)`;
:math:`q_0(z_t) = \\mathcal N(\\mu_t, \\sigma_t^2)`, then ``flow_length`` layers of any flow of the
:mod:`transforms` registry, whose parameters are a function of :math:`h_t` when the flow can be
conditioned (as in the thesis) and shared across steps otherwise. Flows over a whole ``(T, Z)``
sequence (event dim 2) plug in the same way.

Both programs are vectorised over time: one site ``"z"`` with event shape ``(T, Z)`` and one
observed site ``"x"`` with event shape ``(T, D)`` inside the plate ``"sequences"``, each RNN called
once on the whole sequence, so an SVI step costs what the networks cost in plain PyTorch.

Features are standardised inside the networks with statistics of the training data
(:meth:`STORN.set_data_statistics`); the emission is in the data's own units, so likelihoods and
bounds are those of the data as given.

>>> storn = STORN(input_dim=4, latent_dim=2, hidden_dim=32, flow="radial", flow_length=4)
>>> svi = pyro.infer.SVI(storn.model, storn.guide, pyro.optim.Adam({"lr": 1e-3}),
...                      pyro.infer.Trace_ELBO())                        # doctest: +SKIP

References:
[1] Justin Bayer, Christian Osendorfer. Learning Stochastic Recurrent Networks. arXiv:1411.7610
[2] Danilo J. Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    arXiv:1505.05770
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

import transforms

__all__ = ["STORN", "RNN_TYPES"]

RNN_TYPES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}

# Scales are softplus(raw) + floor. The pendulum's cos/sin features are exact functions of the
# state, so without a floor the emission scale (and the likelihood) could diverge; 1e-3 of a
# feature's standard deviation is far below any noise the data has.
MIN_EMISSION_SCALE = 1e-3
# Keeps log q0 finite if the encoder becomes very sure; well below any useful posterior width.
MIN_POSTERIOR_SCALE = 1e-4
# Constant-valued features (std 0) are standardised by 1 instead of 0.
MIN_DATA_SCALE = 1e-6


def _flatten_leading(tensor: torch.Tensor, event_dims: int) -> tuple[torch.Tensor, torch.Size]:
    leading = tensor.shape[: tensor.dim() - event_dims]
    return tensor.reshape((-1,) + tensor.shape[tensor.dim() - event_dims :]), leading


class STORN(nn.Module):
    """STORN with an optional flow posterior; see the module docstring.

    :param input_dim: features per step ``D``.
    :param latent_dim: latent dims per step ``Z``.
    :param hidden_dim: state size of both RNNs (and the flow's context size).
    :param flow: a name from :func:`transforms.available`, or ``None`` / ``"none"``.
    :param flow_length: layers of that flow (``K``); 0 means no flow.
    :param condition_flow: condition the flow on the encoder state when it supports it.
    :param rnn: ``"gru"``, ``"lstm"`` or ``"rnn"``.
    :param kl_weight: factor on the latent site's log-densities (KL annealing sets it per epoch).
    :param flow_kwargs: passed on to the flow's builder.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 2,
        hidden_dim: int = 128,
        flow: str | None = None,
        flow_length: int = 0,
        *,
        condition_flow: bool = True,
        rnn: str = "gru",
        kl_weight: float = 1.0,
        flow_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("latent_dim", latent_dim),
                            ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(flow_length, bool) or not isinstance(flow_length, int) or flow_length < 0:
            raise ValueError(f"flow_length must be a non-negative int, got {flow_length!r}")
        if rnn not in RNN_TYPES:
            raise ValueError(f"unknown rnn {rnn!r}; valid choices: {', '.join(RNN_TYPES)}")
        flow = None if flow in (None, "none") else flow
        if flow is not None and flow_length == 0:
            raise ValueError(f"flow {flow!r} needs flow_length >= 1")
        self.input_dim, self.latent_dim, self.hidden_dim = input_dim, latent_dim, hidden_dim
        self.flow_name, self.flow_length = flow, flow_length if flow is not None else 0
        self.kl_weight = float(kl_weight)
        self._condition_flow, self._flow_kwargs = condition_flow, dict(flow_kwargs or {})

        rnn_type = RNN_TYPES[rnn]
        self.encoder_rnn = rnn_type(input_dim, hidden_dim, batch_first=True)
        self.posterior_head = nn.Linear(hidden_dim, 2 * latent_dim)
        self.decoder_rnn = rnn_type(input_dim + latent_dim, hidden_dim, batch_first=True)
        self.emission_head = nn.Linear(hidden_dim, 2 * input_dim)
        self.register_buffer("data_loc", torch.zeros(input_dim))
        self.register_buffer("data_scale", torch.ones(input_dim))

        self.flow_conditional = False
        self.flow: nn.Module | None = None
        if flow is not None:
            entry = transforms.info(flow)
            self.flow_conditional = bool(condition_flow and entry.conditional)
            self.flow = transforms.flow(
                flow, latent_dim, flow_length,
                context_dim=hidden_dim if self.flow_conditional else None,
                **(flow_kwargs or {}),
            )

    def extra_repr(self) -> str:
        flow = f"{self.flow_name} x{self.flow_length}" if self.flow_name else "none"
        return (f"input_dim={self.input_dim}, latent_dim={self.latent_dim}, "
                f"hidden_dim={self.hidden_dim}, flow={flow}, conditional={self.flow_conditional}")

    # ---- data handling -------------------------------------------------------------------------

    @torch.no_grad()
    def set_data_statistics(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Standardise features by the mean and std of the observed steps of ``x`` (N, T, D)."""
        x, mask = x.to(self.data_loc), self._mask(x, mask)
        observed = x[mask.to(x.device)]
        self.data_loc.copy_(observed.mean(0))
        self.data_scale.copy_(observed.std(0).clamp_min(MIN_DATA_SCALE)
                              if observed.shape[0] > 1 else torch.ones_like(self.data_loc))

    @staticmethod
    def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return mask.to(device=x.device, dtype=torch.bool)

    def _standardize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Unobserved steps (padding) are set to 0 so that their values, NaN included, reach
        # neither network nor gradient.
        return torch.where(mask[..., None], (x - self.data_loc) / self.data_scale, 0.0)

    def clean(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with unobserved steps replaced by the data mean (a finite observation value)."""
        return torch.where(self._mask(x, mask)[..., None], x, self.data_loc)

    # ---- networks ------------------------------------------------------------------------------

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step ``(μ_t, σ_t, h_t)`` of the recognition RNN for ``x`` (..., T, D)."""
        x_std = self._standardize(x, self._mask(x, mask))
        flat, leading = _flatten_leading(x_std, 2)
        state, _ = self.encoder_rnn(flat)
        loc, raw_scale = self.posterior_head(state).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + MIN_POSTERIOR_SCALE
        loc, scale, state = (t.reshape(leading + t.shape[1:]) for t in (loc, scale, state))
        return loc, scale, state

    def decode(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Emission ``(loc, scale)`` in data units for every step, teacher-forced on ``x``;
        ``z`` (..., T, Z) may carry more leading dims than ``x`` (samples, particles)."""
        x_std = self._standardize(x, self._mask(x, mask))
        x_prev = F.pad(x_std[..., :-1, :], (0, 0, 1, 0))
        leading = torch.broadcast_shapes(x_prev.shape[:-2], z.shape[:-2])
        x_prev = x_prev.expand(leading + x_prev.shape[-2:])
        z = z.expand(leading + z.shape[-2:])
        flat, _ = _flatten_leading(torch.cat([x_prev, z], dim=-1), 2)
        state, _ = self.decoder_rnn(flat)
        loc, scale = self._emission_params(state)
        return loc.reshape(leading + loc.shape[1:]), scale.reshape(leading + scale.shape[1:])

    def _emission_params(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc_std, raw_scale = self.emission_head(state).chunk(2, dim=-1)
        scale_std = F.softplus(raw_scale) + MIN_EMISSION_SCALE
        return self.data_loc + self.data_scale * loc_std, self.data_scale * scale_std

    # ---- distributions -------------------------------------------------------------------------

    def prior(self, batch_shape: torch.Size | tuple[int, ...], n_steps: int) -> dist.Distribution:
        """:math:`\\mathcal N(0, I)` over ``z`` with event shape ``(T, Z)``."""
        zeros = self.data_loc.new_zeros(tuple(batch_shape) + (n_steps, self.latent_dim))
        return dist.Normal(zeros, 1.0).to_event(2)

    def posterior(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dist.Distribution:
        """:math:`q(z \\mid x)` with event shape ``(T, Z)``: ``q0`` pushed through the flow."""
        loc, scale, state = self.encode(x, mask)
        base = dist.Normal(loc, scale).to_event(2)
        if self.flow is None:
            return base
        flow = self.flow.condition(state) if self.flow_conditional else self.flow
        return dist.TransformedDistribution(base, [flow])

    def emission(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dist.Distribution:
        """:math:`p(x \\mid z)` with event shape ``(T, D)``, unobserved steps masked out."""
        loc, scale = self.decode(x, z, mask)
        step_mask = self._mask(x, mask)[..., None]
        return dist.Normal(loc, scale).mask(step_mask).to_event(2)

    # ---- Pyro programs -------------------------------------------------------------------------

    def _latent_scale(self):
        return poutine.scale(scale=self.kl_weight)

    def model(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prior on ``"z"``, emission on observed ``"x"`` (event shapes (T, Z) and (T, D))."""
        pyro.module("storn", self)
        n_sequences, n_steps = x.shape[-3], x.shape[-2]
        with pyro.plate("sequences", n_sequences, dim=-1):
            with self._latent_scale():
                z = pyro.sample("z", self.prior((n_sequences,), n_steps))
            return pyro.sample("x", self.emission(x, z, mask), obs=self.clean(x, mask))

    def guide(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Recognition RNN, ``q0`` and the flow on ``"z"`` (event shape (T, Z))."""
        pyro.module("storn", self)
        with pyro.plate("sequences", x.shape[-3], dim=-1):
            with self._latent_scale():
                return pyro.sample("z", self.posterior(x, mask))

    # ---- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        x_prefix: torch.Tensor,
        n_steps: int,
        num_samples: int = 1,
        sample_observations: bool = True,
    ) -> torch.Tensor:
        """The "generating mode": observe ``x_prefix`` (B, k, D) (or (k, D)), then roll the
        decoder forward with ``z_t`` from the prior and ``x_t`` sampled (or its mean when
        ``sample_observations=False``) up to ``n_steps`` in all.

        Returns ``(num_samples, B, n_steps, D)`` (no B for a 2-D prefix) whose first ``k`` steps
        are the prefix itself. The prefix's latents are drawn from the prior too: they only set
        the decoder state that the first generated step starts from.
        """
        squeeze = x_prefix.dim() == 2
        if squeeze:
            x_prefix = x_prefix[None]
        if x_prefix.dim() != 3 or x_prefix.shape[-1] != self.input_dim:
            raise ValueError(
                f"x_prefix must be (B, k, {self.input_dim}) or (k, {self.input_dim}), "
                f"got shape {tuple(x_prefix.shape)}"
            )
        n_prefix = x_prefix.shape[1]
        if not 1 <= n_prefix <= n_steps:
            raise ValueError(f"need 1 <= prefix length ({n_prefix}) <= n_steps ({n_steps})")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x_prefix = x_prefix.to(self.data_loc)
        batch = num_samples * x_prefix.shape[0]
        prefix = x_prefix.repeat(num_samples, 1, 1)
        prefix_std = (prefix - self.data_loc) / self.data_scale
        x_prev = F.pad(prefix_std, (0, 0, 1, 0))
        z = torch.randn(batch, n_steps, self.latent_dim, device=prefix.device, dtype=prefix.dtype)
        _, hidden = self.decoder_rnn(torch.cat([x_prev[:, :n_prefix], z[:, :n_prefix]], dim=-1))
        steps = [prefix]
        x_last = prefix_std[:, -1]
        for t in range(n_prefix, n_steps):
            state, hidden = self.decoder_rnn(torch.cat([x_last, z[:, t]], dim=-1)[:, None], hidden)
            loc, scale = self._emission_params(state[:, 0])
            x_t = loc + scale * torch.randn_like(loc) if sample_observations else loc
            steps.append(x_t[:, None])
            x_last = (x_t - self.data_loc) / self.data_scale
        out = torch.cat(steps, dim=1).reshape(num_samples, -1, n_steps, self.input_dim)
        return out[:, 0] if squeeze else out

    def reconstruct(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, num_samples: int = 10
    ) -> torch.Tensor:
        """Posterior-predictive reconstructions ``(num_samples, N, T, D)``: ``z ~ q(z | x)`` and
        ``x ~ p(x | z)`` (teacher-forced), through :class:`pyro.infer.Predictive`."""
        predictive = pyro.infer.Predictive(
            poutine.uncondition(self.model), guide=self.guide, num_samples=num_samples,
            return_sites=("x",),
        )
        with torch.no_grad():
            return predictive(x, mask)["x"]

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (for checkpoints)."""
        return {
            "input_dim": self.input_dim, "latent_dim": self.latent_dim,
            "hidden_dim": self.hidden_dim, "flow": self.flow_name, "flow_length": self.flow_length,
            "condition_flow": self._condition_flow,
            "rnn": type(self.encoder_rnn).__name__.lower(), "kl_weight": self.kl_weight,
            "flow_kwargs": self._flow_kwargs,
        }
