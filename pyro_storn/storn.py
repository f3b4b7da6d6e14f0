r"""STORN: stochastic recurrent networks (Bayer & Osendorfer 2014) with flow posteriors.

Generative model ("STORN with input"): a latent :math:`z_t \sim \mathcal N(0, I)` per step and a
recurrent decoder fed the previous observation,

.. math::

    h^g_t = \mathrm{RNN}_g(h^g_{t-1}, [x_{t-1}, z_t]),\qquad x_0 := 0,

    x_t \sim \mathcal N(\mu_x(h^g_t), \sigma_x(h^g_t)^2) \quad\text{(``emission="normal"``)},
    \qquad x_{t,d} \sim \mathrm{Bernoulli}(\sigma(\ell_d(h^g_t)))
    \quad\text{(``emission="bernoulli"``, piano rolls)}.

The emission parameters are a linear function of :math:`h^g_t` (STORN's), or with
``emission_hidden=H`` an MLP with two ReLU layers of width ``H`` of :math:`[h^g_t, z_t]`: the
latent then reaches the emission directly as well as through the decoder's state, as in the
VRNN's and SRNN's emissions [3, 6] (the MLP is the DMM's emitter [2]). ``dropout=p`` drops
the emission's inputs and hidden units while training (a regulariser; evaluation is in
``eval()`` mode, without it).

Prior: ``prior="standard"`` is STORN's :math:`z_t \sim \mathcal N(0, I)`. ``prior="learned"``
is the VRNN's [6], conditioned on the decoder state before the step,

.. math::

    p(z_t \mid x_{<t}, z_{<t}) = \mathcal N(\mu_p(h^g_{t-1}), \sigma_p(h^g_{t-1})^2),
    \qquad h^g_0 := 0,

with a linear head for :math:`(\mu_p, \log\text{-softplus } \sigma_p)` that starts at
:math:`\mathcal N(0, I)`: the latents then form a non-Gaussian process over time instead of
white noise. Its log-density runs the decoder once over the given :math:`z` (and the emission
reuses that pass); sampling it runs the decoder step by step (:class:`DecoderStatePrior`).

Guide: an encoder gives :math:`(\mu_t, \sigma_t, h_t)` per step, :math:`q_0(z_t) = \mathcal
N(\mu_t, \sigma_t^2)`, then ``flow_length`` layers of any flow of the :mod:`transforms` registry,
conditioned on :math:`h_t` when the flow can be (as in the thesis), shared across steps
otherwise; flows over a whole ``(T, Z)`` sequence (event dim 2) plug in the same way. The encoder
state :math:`h_t` summarises

- ``encoder="forward"``: :math:`x_{1:t}`, STORN's filtering posterior :math:`q(z_t \mid x_{1:t})`;
- ``encoder="backward"``: :math:`x_{t:T}`, a reversed RNN, :math:`q(z_t \mid x_{t:T})` as in the
  DMM's and SRNN's guides [2, 3]: :math:`z_t` shapes :math:`x_t` and, through the decoder's
  state, every later step, so the true posterior of :math:`z_t` depends on :math:`x_{t:T}`;
- ``encoder="bidirectional"``: both, :math:`h_t = [\overrightarrow{h}_t, \overleftarrow{h}_t]`,
  :math:`q(z_t \mid x_{1:T})`.

The backward RNN runs over each sequence reversed within its own length, so padding never
reaches a state that an observed step uses.

Exact padding: in a ragged batch (``mask`` (N, T), True on observed steps) a sequence's *length*
runs to its last observed step. Steps past it contribute exactly zero to every bound and every
gradient: the prior and ``q0`` are masked there, per-step flows' log-dets are masked there,
flows over time are restricted to the steps within the length (they see the sequence as if it
ended there), and the emission is masked on every unobserved step. The single latent site ``"z"``
keeps event shape ``(T, Z)``; its values past a length are drawn but count for nothing. (An
unobserved step *inside* a length is missing data, not padding: its latent still shapes the
observed steps after it and keeps its terms.)

Both programs are vectorised over time: one site ``"z"`` with event shape ``(T, Z)`` and one
observed site ``"x"`` with event shape ``(T, D)`` inside the plate ``"sequences"``, each RNN called
once on the whole sequence, so an SVI step costs what the networks cost in plain PyTorch.

Normal emission: features are standardised inside the networks with statistics of the training
data (:meth:`STORN.set_data_statistics`); the emission is in the data's own units, so likelihoods
and bounds are those of the data as given. Bernoulli emission: the networks read the 0/1 values
as they are (a note never played in training has standard deviation 0, and standardising by it
would blow a held-out 1 up), and the emission is on those values.

>>> storn = STORN(input_dim=4, latent_dim=2, hidden_dim=32, flow="radial", flow_length=4)
>>> svi = pyro.infer.SVI(storn.model, storn.guide, pyro.optim.Adam({"lr": 1e-3}),
...                      pyro.infer.Trace_ELBO())                        # doctest: +SKIP
>>> music = STORN(88, 32, 128, emission="bernoulli", encoder="backward")

References:
[1] Justin Bayer, Christian Osendorfer. Learning Stochastic Recurrent Networks. arXiv:1411.7610
[2] Rahul G. Krishnan, Uri Shalit, David Sontag. Structured Inference Networks for Nonlinear
    State Space Models. AAAI 2017. arXiv:1609.09869
[3] Marco Fraccaro, Søren Kaae Sønderby, Ulrich Paquet, Ole Winther. Sequential Neural Models
    with Stochastic Layers. NIPS 2016. arXiv:1605.07571
[4] Nicolas Boulanger-Lewandowski, Yoshua Bengio, Pascal Vincent. Modeling Temporal Dependencies
    in High-Dimensional Sequences: Application to Polyphonic Music Generation and Transcription.
    ICML 2012. arXiv:1206.6392
[5] Danilo J. Rezende, Shakir Mohamed. Variational Inference with Normalizing Flows.
    arXiv:1505.05770
[6] Junyoung Chung, Kyle Kastner, Laurent Dinh, Kratarth Goel, Aaron Courville, Yoshua Bengio.
    A Recurrent Latent Variable Model for Sequential Data. NIPS 2015. arXiv:1506.02216
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.conditional import ConditionalTransform, ConstantConditionalTransform
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch import nn
from torch.distributions import Transform

import transforms

from .validation import check_non_negative_int, check_positive_int, check_probability

__all__ = ["STORN", "DecoderStatePrior", "RNN_TYPES", "EMISSIONS", "ENCODERS", "PRIORS",
           "within_length", "reverse_within_length"]

RNN_TYPES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
EMISSIONS = ("normal", "bernoulli")
ENCODERS = ("forward", "backward", "bidirectional")
PRIORS = ("standard", "learned")

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


def within_length(mask: torch.Tensor) -> torch.Tensor:
    """The steps of each sequence up to its last observed one, for ``mask`` (..., T) bool:
    what is left is padding."""
    return mask.flip(-1).cumsum(-1).flip(-1) > 0


def reverse_within_length(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``values`` (B, T, F) with steps ``0 .. lengths[b] - 1`` of each sequence in reverse order
    and the padding after them left in place (an involution: applying it twice is the identity)."""
    steps = torch.arange(values.shape[1], device=values.device)
    lengths = lengths.to(values.device)[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return values.gather(1, index[..., None].expand_as(values))


class _StepMasked(Transform):
    """A per-step (event dim 1) flow layer acting on sequences (..., T, Z) whose log-det counts
    only the steps of ``mask`` (..., T): a padded step's term is exactly 0, its gradient too."""

    def __init__(self, layer: Transform, mask: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.layer, self.mask = layer, mask
        self.domain, self.codomain = layer.domain, layer.codomain
        self.bijective = layer.bijective

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer.inv(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.layer.log_abs_det_jacobian(x, y), 0.0)


def _takes_mask(method: Any) -> bool:
    try:
        return "mask" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class STORN(nn.Module):
    """STORN with an optional flow posterior; see the module docstring.

    :param input_dim: features per step ``D`` (88 for piano rolls).
    :param latent_dim: latent dims per step ``Z``.
    :param hidden_dim: state size of every RNN. The flow's context is the encoder state: of size
        ``hidden_dim``, or ``2 * hidden_dim`` for the bidirectional encoder.
    :param flow: a name from :func:`transforms.available`, or ``None`` / ``"none"``.
    :param flow_length: layers of that flow (``K``); 0 means no flow.
    :param emission: ``"normal"`` (real features) or ``"bernoulli"`` (0/1 features, a logits
        head; refuses other values).
    :param encoder: ``"forward"`` (STORN's), ``"backward"`` or ``"bidirectional"``.
    :param condition_flow: condition the flow on the encoder state when it supports it.
    :param emission_hidden: 0 for STORN's linear emission of the decoder state; ``H > 0`` for
        an MLP (two ReLU layers of width ``H``) of the decoder state and ``z_t``.
    :param prior: ``"standard"`` (STORN's N(0, I)) or ``"learned"`` (the VRNN's p(z_t | h_{t-1})).
    :param dropout: probability of dropping the emission's inputs and hidden units in training.
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
        emission: str = "normal",
        encoder: str = "forward",
        emission_hidden: int = 0,
        prior: str = "standard",
        dropout: float = 0.0,
        condition_flow: bool = True,
        rnn: str = "gru",
        kl_weight: float = 1.0,
        flow_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        input_dim = check_positive_int("input_dim", input_dim)
        latent_dim = check_positive_int("latent_dim", latent_dim)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        flow_length = check_non_negative_int("flow_length", flow_length)
        emission_hidden = check_non_negative_int("emission_hidden", emission_hidden)
        if rnn not in RNN_TYPES:
            raise ValueError(f"unknown rnn {rnn!r}; valid choices: {', '.join(RNN_TYPES)}")
        if emission not in EMISSIONS:
            raise ValueError(
                f"unknown emission {emission!r}; valid choices: {', '.join(EMISSIONS)}")
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; valid choices: {', '.join(ENCODERS)}")
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; valid choices: {', '.join(PRIORS)}")
        dropout = check_probability("dropout", dropout)
        flow = None if flow in (None, "none") else flow
        if flow is not None and flow_length == 0:
            raise ValueError(f"flow {flow!r} needs flow_length >= 1")
        self.input_dim, self.latent_dim, self.hidden_dim = input_dim, latent_dim, hidden_dim
        self.flow_name, self.flow_length = flow, flow_length if flow is not None else 0
        self.emission_type, self.encoder_type, self.rnn_type = emission, encoder, rnn
        self.emission_hidden = emission_hidden
        self.prior_type, self.dropout = prior, dropout
        self.kl_weight = float(kl_weight)
        self._condition_flow, self._flow_kwargs = condition_flow, dict(flow_kwargs or {})

        rnn_type = RNN_TYPES[rnn]
        # Forward encoder keeps its name from before the other encoders: checkpoints and warm
        # starts of forward runs read the same parameters.
        self.encoder_rnn = (rnn_type(input_dim, hidden_dim, batch_first=True)
                            if encoder in ("forward", "bidirectional") else None)
        self.encoder_rnn_backward = (rnn_type(input_dim, hidden_dim, batch_first=True)
                                     if encoder in ("backward", "bidirectional") else None)
        self.encoder_state_dim = hidden_dim * (2 if encoder == "bidirectional" else 1)
        self.posterior_head = nn.Linear(self.encoder_state_dim, 2 * latent_dim)
        self.decoder_rnn = rnn_type(input_dim + latent_dim, hidden_dim, batch_first=True)
        emission_params = 2 * input_dim if emission == "normal" else input_dim
        # Without dropout the heads keep their layout, so earlier checkpoints load.
        drop = [nn.Dropout(dropout)] if dropout else []
        if not emission_hidden:
            linear = nn.Linear(hidden_dim, emission_params)
            self.emission_head = nn.Sequential(*drop, linear) if drop else linear
        else:
            self.emission_head = nn.Sequential(
                *drop, nn.Linear(hidden_dim + latent_dim, emission_hidden), nn.ReLU(),
                *drop, nn.Linear(emission_hidden, emission_hidden), nn.ReLU(),
                *drop, nn.Linear(emission_hidden, emission_params))
        self.prior_head = None
        if prior == "learned":
            self.prior_head = nn.Linear(hidden_dim, 2 * latent_dim)
            with torch.no_grad():  # starts at N(0, I): STORN's prior
                self.prior_head.weight.zero_()
                self.prior_head.bias[:latent_dim].zero_()
                self.prior_head.bias[latent_dim:].fill_(math.log(math.expm1(1 - MIN_POSTERIOR_SCALE)))
        self.register_buffer("data_loc", torch.zeros(input_dim))
        self.register_buffer("data_scale", torch.ones(input_dim))

        self.flow_conditional = False
        self.flow_event_dim = 1
        self.flow: nn.Module | None = None
        if flow is not None:
            entry = transforms.info(flow)
            self.flow_conditional = bool(condition_flow and entry.conditional)
            self.flow_event_dim = entry.event_dim
            self.flow = transforms.flow(
                flow, latent_dim, flow_length,
                context_dim=self.encoder_state_dim if self.flow_conditional else None,
                **(flow_kwargs or {}),
            )

    def extra_repr(self) -> str:
        flow = f"{self.flow_name} x{self.flow_length}" if self.flow_name else "none"
        return (f"input_dim={self.input_dim}, latent_dim={self.latent_dim}, "
                f"hidden_dim={self.hidden_dim}, flow={flow}, conditional={self.flow_conditional}, "
                f"emission={self.emission_type}, encoder={self.encoder_type}"
                + (f", emission_hidden={self.emission_hidden}" if self.emission_hidden else "")
                + (f", prior={self.prior_type}" if self.prior_type != "standard" else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))

    # ---- data handling -------------------------------------------------------------------------

    @torch.no_grad()
    def set_data_statistics(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Normal emission: standardise features by the mean and std of the observed steps of
        ``x`` (N, T, D). Bernoulli: check that ``x`` is 0/1 and keep the identity."""
        x, mask = x.to(self.data_loc), self._mask(x, mask)
        if self.emission_type == "bernoulli":
            self._check_binary(x, mask)
            return
        observed = x[mask.to(x.device)]
        self.data_loc.copy_(observed.mean(0))
        self.data_scale.copy_(observed.std(0).clamp_min(MIN_DATA_SCALE)
                              if observed.shape[0] > 1 else torch.ones_like(self.data_loc))

    @staticmethod
    def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return mask.to(device=x.device, dtype=torch.bool)

    @staticmethod
    def _within(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Steps within each sequence's length, or None when nothing is padded by declaration."""
        return None if mask is None else within_length(mask.to(device=x.device, dtype=torch.bool))

    def _check_binary(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        bad = (x != 0) & (x != 1) & mask[..., None]
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"emission='bernoulli' models 0/1 data; x{list(index)} (sequence, step, feature) "
                f"= {float(x[index])!r} in an observed step, x of shape {tuple(x.shape)}"
            )

    def _standardize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Every network input passes here: the Bernoulli emission's data check sits here once.
        if self.emission_type == "bernoulli":
            self._check_binary(x, mask)
        # Unobserved steps (padding) are set to 0 so that their values, NaN included, reach
        # neither network nor gradient.
        return torch.where(mask[..., None], (x - self.data_loc) / self.data_scale, 0.0)

    def clean(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with unobserved steps replaced by the data mean (a finite observation value;
        0 for the Bernoulli emission)."""
        return torch.where(self._mask(x, mask)[..., None], x, self.data_loc)

    # ---- networks ------------------------------------------------------------------------------

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step ``(μ_t, σ_t, h_t)`` of the encoder for ``x`` (..., T, D); ``h_t`` has
        :attr:`encoder_state_dim` features. The backward RNN reads each sequence reversed
        within its length."""
        step_mask = self._mask(x, mask).expand(x.shape[:-1])
        x_std = self._standardize(x, step_mask)
        flat, leading = _flatten_leading(x_std, 2)
        states = []
        if self.encoder_rnn is not None:
            states.append(self.encoder_rnn(flat)[0])
        if self.encoder_rnn_backward is not None:
            lengths = within_length(step_mask).reshape(-1, x.shape[-2]).sum(-1)
            reversed_state, _ = self.encoder_rnn_backward(reverse_within_length(flat, lengths))
            states.append(reverse_within_length(reversed_state, lengths))
        state = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        loc, raw_scale = self.posterior_head(state).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + MIN_POSTERIOR_SCALE
        loc, scale, state = (t.reshape(leading + t.shape[1:]) for t in (loc, scale, state))
        return loc, scale, state

    def decoder_inputs(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's observation inputs: ``x_{t-1}`` standardised, ``x_0 = 0``."""
        x_std = self._standardize(x, self._mask(x, mask))
        return F.pad(x_std[..., :-1, :], (0, 0, 1, 0))

    def decoder_state(self, x_prev: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`h^g_t` for every step (..., T, H), from :meth:`decoder_inputs` ``x_prev`` and
        ``z`` (..., T, Z); the leading dims broadcast (``z`` may carry samples, particles)."""
        leading = torch.broadcast_shapes(x_prev.shape[:-2], z.shape[:-2])
        x_prev = x_prev.expand(leading + x_prev.shape[-2:])
        z = z.expand(leading + z.shape[-2:])
        flat, _ = _flatten_leading(torch.cat([x_prev, z], dim=-1), 2)
        state, _ = self.decoder_rnn(flat)
        return state.reshape(leading + state.shape[1:])

    def decode(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Emission parameters for every step, teacher-forced on ``x``: ``(loc, scale)`` in data
        units (normal) or ``(logits,)`` (Bernoulli). ``z`` (..., T, Z) may carry more leading
        dims than ``x`` (samples, particles); ``state``: its :meth:`decoder_state`, if known."""
        if state is None:
            state = self.decoder_state(self.decoder_inputs(x, mask), z)
        return self._emission_params(state, z.expand(state.shape[:-1] + z.shape[-1:]))

    def _emission_params(self, state: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = torch.cat([state, z], dim=-1) if self.emission_hidden else state
        if self.emission_type == "bernoulli":
            return (self.emission_head(features),)
        loc_std, raw_scale = self.emission_head(features).chunk(2, dim=-1)
        scale_std = F.softplus(raw_scale) + MIN_EMISSION_SCALE
        return self.data_loc + self.data_scale * loc_std, self.data_scale * scale_std

    def _emission_distribution(self, params: tuple[torch.Tensor, ...]) -> dist.Distribution:
        if self.emission_type == "bernoulli":
            return dist.Bernoulli(logits=params[0])
        return dist.Normal(*params)

    # ---- distributions -------------------------------------------------------------------------

    def prior(
        self,
        batch_shape: torch.Size | tuple[int, ...],
        n_steps: int,
        mask: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
    ) -> dist.Distribution:
        """The prior over ``z`` with event shape ``(T, Z)``: :math:`\\mathcal N(0, I)`, or with
        ``prior="learned"`` the :class:`DecoderStatePrior` of the sequences ``x`` (required
        then); with ``mask`` (batch, T), steps past each sequence's last observed step count
        for nothing."""
        if self.prior_type == "learned":
            if x is None:
                raise ValueError("prior='learned' is conditioned on the sequences: pass x")
            return DecoderStatePrior(self, self.decoder_inputs(x, mask), self._within(x, mask),
                                     torch.Size(batch_shape))
        zeros = self.data_loc.new_zeros(tuple(batch_shape) + (n_steps, self.latent_dim))
        prior = dist.Normal(zeros, 1.0)
        if mask is not None:
            prior = prior.mask(self._within(zeros, mask)[..., None])
        return prior.to_event(2)

    def posterior(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dist.Distribution:
        """:math:`q(z \\mid x)` with event shape ``(T, Z)``: ``q0`` pushed through the flow;
        with ``mask``, steps past each sequence's length count for nothing."""
        loc, scale, state = self.encode(x, mask)
        within = self._within(x, mask)
        base = dist.Normal(loc, scale)
        if within is not None:
            base = base.mask(within[..., None])
        base = base.to_event(2)
        if self.flow is None:
            return base
        return dist.TransformedDistribution(base, self._flow_layers(state, within))

    def _flow_layers(self, state: torch.Tensor, within: torch.Tensor | None) -> list[Transform]:
        """The flow's layers for encoder state ``state`` (..., T, C), each restricted to the
        steps ``within`` the sequences' lengths (None: all)."""
        parts = self.flow.transforms if self.flow_conditional else self.flow.parts
        layers = []
        for part in parts:
            if isinstance(part, ConstantConditionalTransform):
                part = part.transform
            conditional = isinstance(part, ConditionalTransform)
            if self.flow_event_dim == 2:
                layers.append(self._sequence_layer(part, state, within, conditional))
                continue
            layer = part.condition(state) if conditional else part
            layers.append(layer if within is None else _StepMasked(layer, within))
        return layers

    def _sequence_layer(
        self, part: Any, state: torch.Tensor, within: torch.Tensor | None, conditional: bool
    ) -> Transform:
        """A flow over time restricted to each sequence's length: it must take the step mask,
        or padded steps would reach observed ones through it."""
        if within is None:
            return part.condition(state) if conditional else part
        if conditional and _takes_mask(part.condition):
            return part.condition(state, mask=within)
        if not conditional and hasattr(part, "with_mask"):
            return part.with_mask(within)
        raise ValueError(
            f"flow layer {type(part).__name__} acts on whole sequences but takes no step mask "
            f"({'condition(context, mask=...)' if conditional else 'with_mask(mask)'}), so "
            "padding would reach observed steps; pass mask=None for unpadded sequences"
        )

    def emission(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
        prior: dist.Distribution | None = None,
    ) -> dist.Distribution:
        """:math:`p(x \\mid z)` with event shape ``(T, D)``, unobserved steps masked out; the
        Bernoulli emission refuses observed values other than 0 and 1. ``prior``: this
        ``x``'s :meth:`prior`, whose decoder pass over ``z`` a learned prior shares."""
        step_mask = self._mask(x, mask)
        state = prior.decoder_state(z) if isinstance(prior, DecoderStatePrior) else None
        params = self.decode(x, z, mask, state)
        return self._emission_distribution(params).mask(step_mask[..., None]).to_event(2)

    # ---- Pyro programs -------------------------------------------------------------------------

    def _latent_scale(self):
        return poutine.scale(scale=self.kl_weight)

    def model(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prior on ``"z"``, emission on observed ``"x"`` (event shapes (T, Z) and (T, D))."""
        pyro.module("storn", self)
        n_sequences, n_steps = x.shape[-3], x.shape[-2]
        with pyro.plate("sequences", n_sequences, dim=-1):
            prior = self.prior((n_sequences,), n_steps, mask, x)
            with self._latent_scale():
                z = pyro.sample("z", prior)
            return pyro.sample("x", self.emission(x, z, mask, prior), obs=self.clean(x, mask))

    def guide(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder, ``q0`` and the flow on ``"z"`` (event shape (T, Z))."""
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
        decoder forward with ``z_t`` from the prior and ``x_t`` sampled (or, with
        ``sample_observations=False``, its mean: the Normal's location, the Bernoulli's
        probabilities) up to ``n_steps`` in all. A Bernoulli STORN thus samples piano rolls.

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
        if self.emission_type == "bernoulli":
            self._check_binary(x_prefix, self._mask(x_prefix, None))
        batch = num_samples * x_prefix.shape[0]
        prefix = x_prefix.repeat(num_samples, 1, 1)
        prefix_std = (prefix - self.data_loc) / self.data_scale
        x_prev = F.pad(prefix_std, (0, 0, 1, 0))
        z = torch.randn(batch, n_steps, self.latent_dim, device=prefix.device, dtype=prefix.dtype)
        if self.prior_head is not None:  # the prefix's latents from the learned prior
            z[:, :n_prefix] = DecoderStatePrior(self, x_prev[:, :n_prefix], None,
                                                torch.Size((batch,))).sample()
        state, hidden = self.decoder_rnn(torch.cat([x_prev[:, :n_prefix], z[:, :n_prefix]], -1))
        state = state[:, -1:]
        steps = [prefix]
        x_last = prefix_std[:, -1]
        for t in range(n_prefix, n_steps):
            if self.prior_head is not None:
                z[:, t] = self._prior_draw(state[:, 0], z[:, t])
            state, hidden = self.decoder_rnn(torch.cat([x_last, z[:, t]], dim=-1)[:, None], hidden)
            x_t = self._draw(self._emission_params(state[:, 0], z[:, t]), sample_observations)
            steps.append(x_t[:, None])
            x_last = (x_t - self.data_loc) / self.data_scale
        out = torch.cat(steps, dim=1).reshape(num_samples, -1, n_steps, self.input_dim)
        return out[:, 0] if squeeze else out

    def prior_params(self, previous_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned prior's ``(loc, scale)`` of ``z_t`` from :math:`h^g_{t-1}` (..., H)."""
        loc, raw_scale = self.prior_head(previous_state).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + MIN_POSTERIOR_SCALE

    def _prior_draw(self, previous_state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        loc, scale = self.prior_params(previous_state)
        return loc + scale * noise

    def _draw(self, params: tuple[torch.Tensor, ...], sample: bool) -> torch.Tensor:
        if self.emission_type == "bernoulli":
            probs = torch.sigmoid(params[0])
            return torch.bernoulli(probs) if sample else probs
        loc, scale = params
        return loc + scale * torch.randn_like(loc) if sample else loc

    @torch.no_grad()
    def step_probabilities(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, num_samples: int = 1
    ) -> torch.Tensor:
        r"""The model's per-note probabilities on real sequences, :math:`p(x_{t,d} = 1 \mid
        x_{<t}, z_{\le t})` with :math:`z \sim q(z \mid x)`, averaged over ``num_samples``
        posterior draws: ``(N, T, D)``, 0 on unobserved steps. Bernoulli emission only."""
        if self.emission_type != "bernoulli":
            raise ValueError("step_probabilities needs emission='bernoulli'")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        z = self.posterior(x, mask).sample((num_samples,))
        (logits,) = self.decode(x, z, mask)
        probs = torch.sigmoid(logits).mean(0)
        return torch.where(self._mask(x, mask)[..., None], probs, 0.0)

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
            "emission": self.emission_type, "encoder": self.encoder_type,
            "emission_hidden": self.emission_hidden, "prior": self.prior_type,
            "dropout": self.dropout, "condition_flow": self._condition_flow, "rnn": self.rnn_type,
            "kl_weight": self.kl_weight, "flow_kwargs": self._flow_kwargs,
        }


class DecoderStatePrior(TorchDistribution):
    r"""The VRNN's prior over a STORN's latents [6]:
    :math:`p(z \mid x) = \prod_t \mathcal N(z_t; \mu_p(h^g_{t-1}), \sigma_p(h^g_{t-1})^2)`,
    :math:`h^g_t = \mathrm{RNN}_g(h^g_{t-1}, [x_{t-1}, z_t])`, event shape ``(T, Z)``.

    ``log_prob(z)`` runs the decoder once over ``z`` and keeps that pass for the emission
    (:meth:`decoder_state`; the last ``z`` only, held by identity); ``rsample`` runs it step by
    step. Steps outside ``within`` (N, T) count for nothing.

    :param storn: a STORN with ``prior="learned"``.
    :param x_prev: its :meth:`STORN.decoder_inputs` of the sequences (..., T, D).
    :param within: steps within each sequence's length, or None (all).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, storn: STORN, x_prev: torch.Tensor, within: torch.Tensor | None,
                 batch_shape: torch.Size) -> None:
        if storn.prior_head is None:
            raise ValueError("DecoderStatePrior needs a STORN with prior='learned'")
        self.storn, self.x_prev, self.within = storn, x_prev, within
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        event_shape = torch.Size((x_prev.shape[-2], storn.latent_dim))
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None) -> "DecoderStatePrior":
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:  # a plate's broadcast: keep the decoder pass held
            return self
        x_prev = self.x_prev.expand(batch_shape + self.x_prev.shape[-2:])
        within = None if self.within is None else self.within.expand(
            batch_shape + self.within.shape[-1:])
        return DecoderStatePrior(self.storn, x_prev, within, batch_shape)

    def decoder_state(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`h^g_t` for ``z`` (..., T, Z), computed once per ``z``."""
        if self._last is None or self._last[0] is not z:
            self._last = (z, self.storn.decoder_state(self.x_prev, z))
        return self._last[1]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        state = self.decoder_state(z)
        loc, scale = self.storn.prior_params(F.pad(state[..., :-1, :], (0, 0, 1, 0)))
        log_density = dist.Normal(loc, scale).log_prob(z)
        if self.within is not None:
            log_density = torch.where(self.within[..., None], log_density, 0.0)
        return log_density.sum((-2, -1))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        x_prev, _ = _flatten_leading(self.x_prev.expand(shape + self.x_prev.shape[-2:]), 2)
        n, n_steps = x_prev.shape[0], x_prev.shape[1]
        state = x_prev.new_zeros(n, 1, self.storn.hidden_dim)
        hidden, latents = None, []
        for t in range(n_steps):
            noise = torch.randn(n, self.storn.latent_dim, dtype=x_prev.dtype, device=x_prev.device)
            z_t = self.storn._prior_draw(state[:, 0], noise)
            state, hidden = self.storn.decoder_rnn(torch.cat([x_prev[:, t], z_t], -1)[:, None],
                                                   hidden)
            latents.append(z_t)
        return torch.stack(latents, dim=1).reshape(shape + self.event_shape)
