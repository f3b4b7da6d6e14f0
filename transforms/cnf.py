r"""Continuous normalizing flows: a neural ODE with its log-determinant integrated alongside.

The map :math:`\mathbf{y} = \mathbf{z}(T)` from :math:`\mathbf{x} = \mathbf{z}(0)` solves

    :math:`\frac{d\mathbf{z}}{dt} = f(\mathbf{z}(t), t; \theta)`,

and the instantaneous change of variables [1] gives

    :math:`\log\left|\det \frac{\partial \mathbf{y}}{\partial \mathbf{x}}\right|
    = \int_0^T \operatorname{tr}\left(\frac{\partial f}{\partial \mathbf{z}(t)}\right) dt,`

integrated in the same ODE solve as :math:`\mathbf{z}`. The trace is exact here for small
dimensions (the Jacobian of the MLP is propagated forward analytically, ``D`` tangent columns,
no autograd), and Hutchinson's stochastic estimate
:math:`\mathbb{E}_\epsilon[\epsilon^T \frac{\partial f}{\partial \mathbf{z}} \epsilon]` [2] for
large ones; with the estimate the log-determinant is unbiased but random, so it is a training
device, not an evaluation. The flow of a Lipschitz ODE is a diffeomorphism (Picard-Lindelöf),
so the map is invertible whatever :math:`\theta`: the inverse integrates from :math:`T` back to
:math:`0`. Both directions are numerical solves (torchdiffeq, ``dopri5`` by default): "exact"
means to the solver's tolerance, which the caller sets (``rtol``, ``atol``), not to float
precision. The default, rtol = atol = :data:`DEFAULT_TOLERANCE` = 1e-6, round-trips float32
inputs of unit scale to about 3e-5 at initialisation (1e-5 reached only 2e-4..2.5e-3, 15 times
its tolerance), at the same cost there (20 function evaluations per solve, measured on 8 layers
of D = 2 and 5); after parameters move far from initialisation the float32 solve's own rounding,
not the tolerance, bounds the round trip, and ``.double()`` or a looser tolerance for training
(:func:`solver_options`) are the options. The determinant is always positive (a flow map
preserves orientation).

Optional regularisers keep the dynamics straight and cheap to solve [3]: the kinetic energy
:math:`\int_0^T \|f\|^2 dt` and the Jacobian Frobenius norm
:math:`\int_0^T \|\partial f / \partial \mathbf{z}\|_F^2 dt`, integrated alongside as well.
:func:`regulariser` collects them from every layer of a module after a solve; the caller adds
them to its loss. Each layer counts its function evaluations (``nfe``).

Under ``torch.jit.trace`` (e.g. ``JitTrace_ELBO``) an adaptive solver's accept/reject decisions
would be baked into the trace, so a traced solve uses a fixed number of classical Runge-Kutta
steps instead (``trace_steps``): the trace is the same computation for every input.

Example::

    >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    >>> flow = cnf(2, hidden_dims=(64, 64))
    >>> density = dist.TransformedDistribution(base, [flow])
    >>> density.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])

References:

[1] Ricky T. Q. Chen, Yulia Rubanova, Jesse Bettencourt, David Duvenaud. Neural Ordinary
Differential Equations. NeurIPS 2018. [arXiv:1806.07366]

[2] Will Grathwohl, Ricky T. Q. Chen, Jesse Bettencourt, Ilya Sutskever, David Duvenaud.
FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models. ICLR 2019.
[arXiv:1810.01367]

[3] Chris Finlay, Jörn-Henrik Jacobsen, Levon Nurbekyan, Adam M. Oberman. How to Train Your
Neural ODE: the World of Jacobian and Kinetic Regularization. ICML 2020. [arXiv:2002.02798]
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchdiffeq
from pyro.distributions import ConditionalTransformModule, TransformModule
from torch.distributions import Transform, constraints

from .registry import register

__all__ = [
    "TimeMLP",
    "HyperDynamics",
    "ConditionedCNF",
    "CNF",
    "ConditionalCNF",
    "cnf",
    "conditional_cnf",
    "regulariser",
    "total_nfe",
    "solver_options",
    "DEFAULT_TOLERANCE",
]

# Above this many dimensions the exact trace (one tangent column per dimension) costs more than
# it is worth, and "auto" switches to Hutchinson's one-probe estimate, as FFJORD does.
EXACT_TRACE_MAX_DIM = 16

# Number of RK4 steps over [0, T] when the solve is being jit-traced: an adaptive solver's step
# count depends on the data and cannot be frozen into a trace. Four steps keep a smooth flow's
# error well under the Monte-Carlo noise of an ELBO estimate; the trace's size (and the JIT's
# compile time, which grows faster than linearly) grows with it.
DEFAULT_TRACE_STEPS = 4

# An adaptive solver cannot meet a tolerance finer than the dtype resolves: it would shrink its
# steps until dt underflows. Tolerances are raised to this many machine epsilons of the state's
# dtype (1.2e-6 in float32; 2.2e-15, i.e. no change in practice, in float64).
TOLERANCE_FLOOR_EPS = 10

# Default rtol = atol of an adaptive solve: float32 round trips then reach ~3e-5 at
# initialisation, about the 1e-4 a float32 flow is checked to (1e-5 gave 2e-4..2.5e-3).
DEFAULT_TOLERANCE = 1e-6

SOLVER_SETTINGS = ("method", "rtol", "atol", "step_size", "adjoint", "time_length")


def _tanh_derivative(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return 1.0 - post.square()


def _softplus_derivative(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(pre)


def _elu_derivative(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    # ELU'(a) = 1 for a > 0 and exp(a) = ELU(a) + 1 otherwise.
    return torch.where(pre > 0, torch.ones_like(pre), post + 1.0)


# Smooth activations only: the trace's gradient needs the activation's second derivative.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable]] = {
    "tanh": (torch.tanh, _tanh_derivative),
    "softplus": (F.softplus, _softplus_derivative),
    "elu": (F.elu, _elu_derivative),
}


class TimeMLP(nn.Module):
    r"""The dynamics :math:`f(\mathbf{z}, t, \mathbf{c})`: an MLP whose every layer sees the time
    (and the context, when there is one) as an extra input,
    :math:`\mathbf{h}_{l} = \sigma(W_l \mathbf{h}_{l-1} + \mathbf{b}_l + t\,\mathbf{a}_l
    + V_l \mathbf{c})` (FFJORD's ``concat`` layers).

    :meth:`forward` returns :math:`f` and the Jacobian applied to tangent directions,
    propagated layer by layer in closed form (forward-mode, no autograd inside the ODE
    function): all ``D`` unit directions by default (the full Jacobian, about ``D`` extra
    matrix products per layer, cheap for small ``D``), or given probes for Hutchinson's
    estimate. Tangents are laid out direction-first, ``(k, N, width)``, so each layer's product
    is one plain matrix multiply.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str = "tanh",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
            )
        hidden_dims = tuple(int(h) for h in hidden_dims)
        if not hidden_dims or any(h <= 0 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive ints, got {hidden_dims!r}")
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.hidden_dims = hidden_dims
        self.activation = activation
        self._act, self._act_derivative = ACTIVATIONS[activation]
        dims = (input_dim, *hidden_dims, input_dim)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.time_weights = nn.ParameterList(nn.Parameter(torch.empty(b)) for b in dims[1:])
        self.context_layers = nn.ModuleList(
            nn.Linear(context_dim, b, bias=False) for b in dims[1:]
        ) if context_dim else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer, time_weight in zip(self.layers, self.time_weights):
            layer.reset_parameters()
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(time_weight, -bound, bound)
        if self.context_layers is not None:
            for layer in self.context_layers:
                layer.reset_parameters()

    def forward(
        self,
        t: torch.Tensor,
        z: torch.Tensor,
        context: torch.Tensor | None = None,
        probe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, tangent = z, probe
        last = len(self.layers) - 1
        for index, (layer, time_weight) in enumerate(zip(self.layers, self.time_weights)):
            pre = F.linear(hidden, layer.weight, layer.bias) + t * time_weight
            if self.context_layers is not None:
                pre = pre + self.context_layers[index](context)
            if tangent is None:
                # W e_d is column d of W: the identity's image without a product.
                tangent = layer.weight.t().unsqueeze(1)
            else:
                tangent = F.linear(tangent, layer.weight)
            if index == last:
                return pre, tangent.expand(tangent.shape[0], *pre.shape)
            hidden = self._act(pre)
            tangent = self._act_derivative(pre, hidden) * tangent
        raise AssertionError("unreachable: the MLP has an output layer")

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, hidden_dims={self.hidden_dims}, "
            f"context_dim={self.context_dim}, activation={self.activation!r}"
        )


class HyperDynamics(nn.Module):
    r"""The dynamics of the original CNF [1]: a hypernetwork of the time (and the context) gives
    the weights of a one-hidden-layer map,
    :math:`f(\mathbf{z}, t) = \frac{1}{M} \sum_{m=1}^M \mathbf{u}_m(t)\,
    \tanh(\mathbf{w}_m(t)^T \mathbf{z} + b_m(t))`, with
    :math:`\mathbf{u}_m = \tilde{\mathbf{u}}_m \odot \operatorname{sigmoid}(\mathbf{g}_m)`, and
    :math:`\frac{\partial f}{\partial \mathbf{z}} = \frac{1}{M} \sum_m \mathbf{u}_m
    \tanh'(\cdot)\,\mathbf{w}_m^T` in closed form.
    """

    def __init__(
        self,
        input_dim: int,
        width: int = 64,
        hidden_dim: int = 32,
        context_dim: int = 0,
    ):
        super().__init__()
        if width <= 0 or hidden_dim <= 0:
            raise ValueError(f"width and hidden_dim must be positive, got {width}, {hidden_dim}")
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.width = width
        self.hidden_dim = hidden_dim
        self._block = width * input_dim
        self.hypernet = nn.Sequential(
            nn.Linear(1 + context_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, 3 * self._block + width),
        )

    def reset_parameters(self) -> None:
        for module in self.hypernet:
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def _weights(
        self, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if context is None:
            hyper_input = t.reshape(1).to(z)
        else:
            hyper_input = torch.cat([t.expand(*context.shape[:-1], 1), context], dim=-1)
        params = self.hypernet(hyper_input)
        lead = params.shape[:-1] if context is not None else ()
        block = self._block
        w = params[..., :block].reshape(*lead, self.width, self.input_dim)
        u = params[..., block : 2 * block].reshape(*lead, self.width, self.input_dim)
        gate = params[..., 2 * block : 3 * block].reshape(*lead, self.width, self.input_dim)
        b = params[..., 3 * block :]
        if context is None:
            b = b.reshape(self.width)
        return w, u * torch.sigmoid(gate), b

    def forward(
        self,
        t: torch.Tensor,
        z: torch.Tensor,
        context: torch.Tensor | None = None,
        probe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, u, b = self._weights(t, z, context)
        shared = w.dim() == 2  # one set of weights for all samples (no context)
        if shared:
            hidden = torch.tanh(F.linear(z, w, b))
            f = torch.matmul(hidden, u) / self.width
        else:
            hidden = torch.tanh(torch.einsum("nmd,nd->nm", w, z) + b)
            f = torch.einsum("nm,nmd->nd", hidden, u) / self.width
        # d hidden / dz = tanh' * w, so J = u^T diag(tanh') w / M, applied to each direction.
        if probe is None:
            w_tangent = w.t().unsqueeze(1) if shared else w.permute(2, 0, 1)
        else:
            w_tangent = F.linear(probe, w) if shared else torch.einsum("knd,nmd->knm", probe, w)
        scaled = (1.0 - hidden.square()) * w_tangent
        if shared:
            jacobian_tangent = torch.matmul(scaled, u) / self.width
        else:
            jacobian_tangent = torch.einsum("knm,nmd->knd", scaled, u) / self.width
        return f, jacobian_tangent

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, width={self.width}, hidden_dim={self.hidden_dim}, "
            f"context_dim={self.context_dim}"
        )


class _AugmentedDynamics(nn.Module):
    """The right-hand side torchdiffeq integrates, one flat state ``[z, ∫tr, (∫|f|², ∫|J|²_F)]``
    per sample (a tuple state would be concatenated and split by torchdiffeq at every
    evaluation). A module so that the adjoint method finds the dynamics' parameters."""

    def __init__(
        self,
        dynamics: nn.Module,
        context: torch.Tensor | None,
        probe: torch.Tensor | None,
        regularise: bool,
    ):
        super().__init__()
        self.dynamics = dynamics
        self.context = context
        self.probe = probe
        self.regularise = regularise
        self.nfe = 0

    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        dim = self.dynamics.input_dim
        f, jacobian_tangent = self.dynamics(t, state[:, :dim], self.context, self.probe)
        if self.probe is None:
            # Direction d's image is column d of the Jacobian: the trace is its d-th entry.
            divergence = jacobian_tangent.diagonal(dim1=0, dim2=2).sum(-1)
        else:
            divergence = (self.probe * jacobian_tangent).sum((0, 2))
        parts = [f, divergence.unsqueeze(-1)]
        if self.regularise:
            parts.append(f.square().sum(-1, keepdim=True))
            parts.append(jacobian_tangent.square().sum((0, 2)).unsqueeze(-1))
        return torch.cat(parts, dim=-1)


def _rk4(func: Callable, state: torch.Tensor, t0: float, t1: float, steps: int) -> torch.Tensor:
    """Classical Runge-Kutta with a fixed step count: the same operations for every input, so
    it can be jit-traced (torchdiffeq's fixed-grid loop branches on tensor values)."""
    dt = (t1 - t0) / steps
    for step in range(steps):
        t = state.new_tensor(t0 + step * dt)
        k1 = func(t, state)
        k2 = func(t + dt / 2, state + dt / 2 * k1)
        k3 = func(t + dt / 2, state + dt / 2 * k2)
        k4 = func(t + dt, state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


class ConditionedCNF(Transform):
    r"""The continuous flow :math:`\mathbf{y} = \mathbf{x} + \int_0^T f(\mathbf{z}(t), t,
    \mathbf{c})\,dt` for given dynamics (and an optional context :math:`\mathbf{c}` with the same
    leading dims as the input); see the module docstring for the equations and references.

    :param dynamics: a module ``(t, z, context, probe) -> (f, J_f applied to the probes)``
        (:class:`TimeMLP` or :class:`HyperDynamics`).
    :param context: the context the dynamics see, or ``None``.
    :param time_length: the integration time :math:`T`.
    :param method: a torchdiffeq method (``dopri5``, ``bosh3``, ``rk4``, ``midpoint``, ...).
    :param rtol: relative tolerance of an adaptive method (default :data:`DEFAULT_TOLERANCE`,
        raised to ``TOLERANCE_FLOOR_EPS`` machine epsilons of the dtype).
    :param atol: absolute tolerance of an adaptive method (the same default).
    :param step_size: step size of a fixed-grid method (``rk4``, ``midpoint``, ``euler``).
    :param adjoint: backpropagate by the adjoint ODE (memory O(1) in the steps) instead of
        through the solver's operations.
    :param trace_estimator: ``"exact"``, ``"hutchinson"`` (stochastic, unbiased), or ``"auto"``
        (exact up to ``EXACT_TRACE_MAX_DIM`` dimensions).
    :param trace_steps: RK4 steps used when the solve is being jit-traced.
    :param kinetic_weight: weight of the kinetic-energy regulariser (0 = off).
    :param jacobian_weight: weight of the Jacobian-Frobenius regulariser (0 = off).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1
    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        dynamics: nn.Module,
        context: torch.Tensor | None = None,
        *,
        time_length: float = 1.0,
        method: str = "dopri5",
        rtol: float = DEFAULT_TOLERANCE,
        atol: float = DEFAULT_TOLERANCE,
        step_size: float | None = None,
        adjoint: bool = False,
        trace_estimator: str = "auto",
        trace_steps: int = DEFAULT_TRACE_STEPS,
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
    ):
        super().__init__(cache_size=1)
        if trace_estimator not in ("auto", "exact", "hutchinson"):
            raise ValueError(
                f"trace_estimator must be 'auto', 'exact' or 'hutchinson', got {trace_estimator!r}"
            )
        if not time_length > 0:
            raise ValueError(f"time_length must be positive, got {time_length!r}")
        if kinetic_weight < 0 or jacobian_weight < 0:
            raise ValueError(
                f"regulariser weights must be >= 0, got {kinetic_weight!r}, {jacobian_weight!r}"
            )
        if int(trace_steps) <= 0:
            raise ValueError(f"trace_steps must be a positive int, got {trace_steps!r}")
        self.dynamics = dynamics
        self.context = context
        self.time_length = float(time_length)
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.step_size = step_size
        self.adjoint = adjoint
        self.trace_estimator = trace_estimator
        self.trace_steps = int(trace_steps)
        self.kinetic_weight = float(kinetic_weight)
        self.jacobian_weight = float(jacobian_weight)
        self.nfe = 0
        self.total_nfe = 0
        self.regularisation: torch.Tensor | None = None
        self._cached_x_logdet: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def _exact_trace(self) -> bool:
        if self.trace_estimator == "auto":
            return self.dynamics.input_dim <= EXACT_TRACE_MAX_DIM
        return self.trace_estimator == "exact"

    def _solve(self, start: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrates from ``start`` over [0, T] (or [T, 0]); returns the end point and
        ``∫ tr(∂f/∂z) dt`` along the way (negative of the log-det when ``reverse``)."""
        batch_shape = start.shape[:-1]
        dim = start.shape[-1]
        context = self.context
        if context is not None:
            # Input and context broadcast against each other (one context per sample, or one
            # point pushed under many contexts).
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
            start = start.expand(*batch_shape, dim)
            context = context.expand(*batch_shape, context.shape[-1]).reshape(-1, context.shape[-1])
        z = start.reshape(-1, dim)
        probe = None
        if not self._exact_trace:
            # One Rademacher probe per sample, fixed for the whole solve [2].
            probe = torch.randint_like(z, 2).mul_(2).sub_(1).unsqueeze(0)
        regularise = torch.is_grad_enabled() and (self.kinetic_weight > 0 or self.jacobian_weight > 0)
        func = _AugmentedDynamics(self.dynamics, context, probe, regularise)
        state = torch.cat([z, z.new_zeros(z.shape[0], 3 if regularise else 1)], dim=-1)
        t0, t1 = (self.time_length, 0.0) if reverse else (0.0, self.time_length)
        if torch.jit.is_tracing():
            final = _rk4(func, state, t0, t1, self.trace_steps)
        else:
            times = z.new_tensor([t0, t1])
            options = {"step_size": self.step_size} if self.step_size is not None else None
            floor = TOLERANCE_FLOOR_EPS * torch.finfo(z.dtype).eps
            solve_kwargs: dict[str, Any] = dict(
                rtol=max(self.rtol, floor),
                atol=max(self.atol, floor),
                method=self.method,
                options=options,
            )
            if self.adjoint:
                adjoint_params = tuple(self.dynamics.parameters())
                if context is not None and context.requires_grad:
                    adjoint_params = adjoint_params + (context,)
                solution = torchdiffeq.odeint_adjoint(
                    func, state, times, adjoint_params=adjoint_params, **solve_kwargs
                )
            else:
                solution = torchdiffeq.odeint(func, state, times, **solve_kwargs)
            final = solution[-1]
        self.nfe = func.nfe
        self.total_nfe += func.nfe
        if regularise:
            # Integrals over [T, 0] come out negated; the penalties are of the path, unsigned.
            direction = -1.0 if reverse else 1.0
            kinetic, frobenius = direction * final[:, dim + 1], direction * final[:, dim + 2]
            self.regularisation = (
                self.kinetic_weight * kinetic + self.jacobian_weight * frobenius
            ).reshape(batch_shape)
        else:
            self.regularisation = None
        return final[:, :dim].reshape(start.shape), final[:, dim].reshape(batch_shape)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, integral = self._solve(x, reverse=False)
        self._cached_x_logdet = (x, integral)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x, integral = self._solve(y, reverse=True)
        self._cached_x_logdet = (x, -integral)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reuses the value of the solve that produced (or started from) this very ``x``;
        integrates afresh from ``x`` for any other point."""
        if self._cached_x_logdet is not None and self._cached_x_logdet[0] is x:
            return self._cached_x_logdet[1]
        _, integral = self._solve(x, reverse=False)
        return integral

    def solver_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SOLVER_SETTINGS}

    def extra_repr(self) -> str:
        step = f", step_size={self.step_size}" if self.step_size is not None else ""
        return (
            f"T={self.time_length}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}"
            f"{step}, adjoint={self.adjoint}, trace_estimator={self.trace_estimator!r}"
        )


def _make_dynamics(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int],
    activation: str,
    dynamics: str,
    hyper_width: int,
) -> nn.Module:
    if dynamics == "mlp":
        return TimeMLP(input_dim, hidden_dims, context_dim=context_dim, activation=activation)
    if dynamics == "hyper":
        return HyperDynamics(
            input_dim, width=hyper_width, hidden_dim=hidden_dims[0], context_dim=context_dim
        )
    raise ValueError(f"unknown dynamics {dynamics!r}; valid choices: mlp, hyper")


class CNF(ConditionedCNF, TransformModule):
    r"""A continuous normalizing flow owning its dynamics,
    :math:`\frac{d\mathbf{z}}{dt} = f(\mathbf{z}, t; \theta)`, :math:`\mathbf{y} = \mathbf{z}(T)`,
    :math:`\log|\det J| = \int_0^T \operatorname{tr}(\partial f / \partial \mathbf{z})\,dt`.
    Invertible for any parameters (the flow of a Lipschitz ODE); the inverse is the solve from
    :math:`T` back to :math:`0`, exact to the solver tolerance.

    >>> flow = CNF(2, hidden_dims=(64, 64))              # rtol = atol = 1e-6
    >>> x = torch.randn(3, 2)
    >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-4)
    True

    :param input_dim: the dimension of the vectors it maps.
    :param hidden_dims: hidden widths of the time-conditioned MLP (the first is the hypernet's
        width for ``dynamics="hyper"``).
    :param activation: ``"tanh"``, ``"softplus"`` or ``"elu"``.
    :param dynamics: ``"mlp"`` (:class:`TimeMLP`, FFJORD) or ``"hyper"`` (:class:`HyperDynamics`,
        the original CNF's hypernetwork).
    :param hyper_width: the number of units :math:`M` of the hypernetwork's map.
    :param solver_kwargs: see :class:`ConditionedCNF`.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "tanh",
        dynamics: str = "mlp",
        hyper_width: int = 64,
        **solver_kwargs: Any,
    ):
        super().__init__(
            _make_dynamics(input_dim, 0, hidden_dims, activation, dynamics, hyper_width),
            **solver_kwargs,
        )
        self.input_dim = input_dim

    def reset_parameters(self) -> None:
        self.dynamics.reset_parameters()

    # torch's Transform.__repr__ would hide the dynamics; print the module tree instead.
    __repr__ = nn.Module.__repr__


class ConditionalCNF(ConditionalTransformModule):
    r"""A continuous flow whose dynamics also see a context,
    :math:`\frac{d\mathbf{z}}{dt} = f(\mathbf{z}, t, \mathbf{c}; \theta)`; ``condition(c)``
    gives the :class:`ConditionedCNF` for that context (same leading dims as the input, or
    broadcastable to them). Same parameters as :class:`CNF` plus ``context_dim``.
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "tanh",
        dynamics: str = "mlp",
        hyper_width: int = 64,
        **solver_kwargs: Any,
    ):
        super().__init__()
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.dynamics = _make_dynamics(
            input_dim, context_dim, hidden_dims, activation, dynamics, hyper_width
        )
        # Validate the solver settings now rather than at the first condition().
        ConditionedCNF(self.dynamics, **solver_kwargs)
        self.solver_kwargs = dict(solver_kwargs)
        self.nfe = 0

    def condition(self, context: torch.Tensor) -> ConditionedCNF:
        return ConditionedCNF(self.dynamics, context, **self.solver_kwargs)

    def reset_parameters(self) -> None:
        self.dynamics.reset_parameters()

    def extra_repr(self) -> str:
        return f"context_dim={self.context_dim}, solver={self.solver_kwargs}"


def _cnf_layers(module: Any) -> Iterator[ConditionedCNF]:
    if isinstance(module, ConditionedCNF):
        yield module
    if isinstance(module, nn.Module):
        for child in module.modules():
            if child is not module and isinstance(child, ConditionedCNF):
                yield child


def regulariser(module: Any) -> torch.Tensor | float:
    """The weighted kinetic + Jacobian-Frobenius penalty of the last solves of every CNF layer
    in ``module``, averaged over the batch (0 when none was integrated)."""
    total: torch.Tensor | float = 0.0
    for layer in _cnf_layers(module):
        if layer.regularisation is not None:
            total = total + layer.regularisation.mean()
    return total


def total_nfe(module: Any) -> int:
    """Function evaluations of the last forward/inverse solve, summed over the CNF layers."""
    return sum(layer.nfe for layer in _cnf_layers(module))


@contextlib.contextmanager
def solver_options(module: Any, **settings: Any) -> Iterator[None]:
    """Temporarily changes the solver settings (``method``, ``rtol``, ``atol``, ``step_size``,
    ``adjoint``) of every CNF layer in ``module``, e.g. a cheap fixed-step solver in training
    and tight tolerances for evaluation::

        with solver_options(flow, method="rk4", step_size=0.25):
            loss = -density.log_prob(batch).mean()
    """
    unknown = set(settings) - set(SOLVER_SETTINGS)
    if unknown:
        raise ValueError(
            f"unknown solver settings {sorted(unknown)}; valid: {', '.join(SOLVER_SETTINGS)}"
        )
    layers = list(_cnf_layers(module))
    saved = [layer.solver_settings() for layer in layers]
    try:
        for layer in layers:
            for name, value in settings.items():
                setattr(layer, name, value)
            layer._cached_x_logdet = None
        yield
    finally:
        for layer, old in zip(layers, saved):
            for name, value in old.items():
                setattr(layer, name, value)
            layer._cached_x_logdet = None


def conditional_cnf(input_dim: int, context_dim: int, **kwargs: Any) -> ConditionalCNF:
    """A conditional continuous normalizing flow; keyword arguments as :class:`CNF`."""
    return ConditionalCNF(input_dim, context_dim, **kwargs)


@register(
    "cnf",
    exact_inverse=True,
    inverse="numerical: ODE solve from T back to 0, to the solver tolerance",
    conditional=conditional_cnf,
    # Tight tolerances so that the solved map's autograd Jacobian matches the integrated trace
    # to the contract's 1e-6; the tests' traced guides use the fixed RK4 steps regardless.
    test_kwargs={"rtol": 1e-10, "atol": 1e-10, "hidden_dims": (8,), "trace_steps": 2},
    description="Continuous normalizing flow (FFJORD, neural ODE) with exact trace",
)
def cnf(input_dim: int, **kwargs: Any) -> CNF:
    """A continuous normalizing flow (FFJORD); keyword arguments as :class:`CNF`."""
    return CNF(input_dim, **kwargs)
