r"""Glow's invertible pieces for vectors (Kingma & Dhariwal 2018): activation normalisation
(``actnorm``) and the LU-parametrised invertible linear map (``lu_linear``, Glow's invertible
1x1 convolution when the "channels" are the coordinates of a vector).

Neither can be conditioned (their parameters are plain vectors and matrices, not functions of a
context); both invert exactly in closed form.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .registry import register

__all__ = [
    "ConditionedActNorm",
    "ActNorm",
    "ConditionedLULinear",
    "LULinear",
    "actnorm",
    "lu_linear",
]

# Added to the batch standard deviation in the data-dependent initialisation, as in Glow's code:
# a coordinate that is constant over the first batch gets a large but finite scale.
ACTNORM_EPS = 1e-6


def _params_of(params: Any) -> Any:
    return params() if callable(params) else params


class ConditionedActNorm(Transform):
    r"""Activation normalisation, a per-dimension affine map

        :math:`\mathbf{y} = \mathbf{s}\odot(\mathbf{x} + \mathbf{b})`,
        :math:`\ \mathbf{s} = \exp(\boldsymbol{\ell})`,

    with :math:`\log|\det J| = \sum_i \ell_i = \sum_i\log s_i` and the exact inverse
    :math:`\mathbf{x} = \mathbf{y}\odot\mathbf{s}^{-1} - \mathbf{b}`. Invertible for every
    :math:`\boldsymbol{\ell}` (the scale is positive by construction).

    :param params: ``(loc, log_scale)``, :math:`(\mathbf{b}, \boldsymbol{\ell})`, or a callable
        returning them.

    References:

    [1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with Invertible 1x1
    Convolutions. NeurIPS 2018. [arXiv:1807.03039]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, params: Any):
        super().__init__(cache_size=1)
        self._params = params

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        loc, log_scale = _params_of(self._params)
        return torch.exp(log_scale) * (x + loc)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        loc, log_scale = _params_of(self._params)
        return y * torch.exp(-log_scale) - loc

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, log_scale = _params_of(self._params)
        batch_shape = torch.broadcast_shapes(x.shape[:-1], log_scale.shape[:-1])
        return log_scale.sum(-1).expand(batch_shape)


class ActNorm(ConditionedActNorm, TransformModule):
    __doc__ = ConditionedActNorm.__doc__ + r"""

    **Data-dependent initialisation.** The first batch that passes through the layer sets
    :math:`\mathbf{b}` and :math:`\mathbf{s}` so that what comes out of that pass has zero mean and
    unit variance per dimension (over all leading dims): through the forward map,
    :math:`\mathbf{b} = -\bar{\mathbf{x}}`, :math:`\mathbf{s} = 1/(\mathrm{sd}(\mathbf{x}) + \epsilon)`;
    through the inverse (density estimation, data entering on the ``y`` side),
    :math:`\mathbf{s} = \mathrm{sd}(\mathbf{y}) + \epsilon`, :math:`\mathbf{b} = \bar{\mathbf{y}}/\mathbf{s}`.
    It happens once: the buffer ``initialized`` records it, travels in ``state_dict``, and a
    loaded layer is not initialised again (the forward pass reads a plain Python mirror of the
    buffer, refreshed whenever a state dict is loaded, so it never syncs with the device). A first batch of a single vector carries no statistics
    (e.g. a guide that draws one sample at a time): the layer then stays the identity. Under
    ``torch.jit.trace`` no initialisation is recorded: run one batch
    before tracing (Pyro's ``JitTrace_ELBO`` runs the guide once untraced first).

    Example:

    >>> import torch, transforms
    >>> layer = transforms.build("actnorm", 3)
    >>> out = layer(2.0 + 5.0 * torch.randn(256, 3))       # initialised on this batch
    >>> bool((out.mean(0).abs() < 1e-5).all()), layer.initialized   # saved in state_dict
    (True, tensor(True))

    :param input_dim: the dimension :math:`D` of the vectors.
    """

    __repr__ = torch.nn.Module.__repr__

    initialized: torch.Tensor

    def __init__(self, input_dim: int):
        super().__init__(self._loc_and_log_scale)
        self.input_dim = input_dim
        self.loc = nn.Parameter(torch.empty(input_dim))
        self.log_scale = nn.Parameter(torch.empty(input_dim))
        self.register_buffer("initialized", torch.tensor(False))
        # Mirror of the buffer read by every forward: bool() of a CUDA tensor would wait for
        # the device on each call. Kept in step by reset_parameters, the initialisation and
        # _load_from_state_dict.
        self._initialized_flag = False
        self.reset_parameters()

    def _loc_and_log_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc, self.log_scale

    def reset_parameters(self) -> None:
        """The identity map, to be replaced by the data-dependent initialisation on the next batch."""
        with torch.no_grad():
            self.loc.zero_()
            self.log_scale.zero_()
            self.initialized.fill_(False)
        self._initialized_flag = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._initialized_flag = bool(self.initialized)  # one sync per load, not per forward

    def _initialize_once(self, batch: torch.Tensor, *, outputs_of_forward: bool) -> None:
        if torch.jit.is_tracing() or self._initialized_flag:
            return
        with torch.no_grad():
            flat = batch.detach().reshape(-1, batch.size(-1))
            if flat.size(0) > 1:
                mean = flat.mean(0)
                spread = flat.std(0, correction=0) + ACTNORM_EPS
                if outputs_of_forward:  # y = s (x + b) standardised
                    self.loc.copy_(-mean)
                    self.log_scale.copy_(-spread.log())
                else:  # x = y / s - b standardised
                    self.loc.copy_(mean / spread)
                    self.log_scale.copy_(spread.log())
            # else: one vector carries no statistics (e.g. a guide drawing one sample at a time);
            # the layer keeps the identity rather than shifting by a random draw
            self.initialized.fill_(True)
        self._initialized_flag = True

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        self._initialize_once(x, outputs_of_forward=True)
        return super()._call(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._initialize_once(y, outputs_of_forward=False)
        return super()._inverse(y)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, initialized={bool(self.initialized)}"


class ConditionedLULinear(Transform):
    r"""An invertible linear map in LU form, Glow's invertible 1x1 convolution for vectors:

        :math:`\mathbf{y} = W\mathbf{x} + \mathbf{b}`,
        :math:`\quad W = P\,L\,(U + \mathrm{diag}(\mathbf{s}))`,
        :math:`\quad\mathbf{s} = \mathrm{sign}\odot\exp(\boldsymbol{\ell})`,

    with :math:`P` a fixed permutation, :math:`L` unit lower triangular, :math:`U` strictly upper
    triangular and ``sign`` a fixed vector of :math:`\pm 1`. :math:`\log|\det J| =
    \log|\det W| = \sum_i \ell_i`, and :math:`W` is invertible for every parameter value
    (:math:`s_i \neq 0`). The inverse is exact, by two triangular solves:
    :math:`\mathbf{x} = (U + \mathrm{diag}\,\mathbf{s})^{-1} L^{-1} P^\top(\mathbf{y} - \mathbf{b})`.

    :param params: ``(permutation, lower, upper, log_abs_diag, sign, bias)`` or a callable
        returning them; ``permutation`` is the matrix :math:`P`; only the strictly lower
        (upper) triangle of ``lower`` (``upper``) is used.

    References:

    [1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with Invertible 1x1
    Convolutions. NeurIPS 2018. [arXiv:1807.03039]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, params: Any):
        super().__init__(cache_size=1)
        self._params = params

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, L, U + diag(s), log|s|, b)``."""
        permutation, lower, upper, log_abs_diag, sign, bias = _params_of(self._params)
        eye = torch.eye(lower.size(-1), dtype=lower.dtype, device=lower.device)
        unit_lower = torch.tril(lower, diagonal=-1) + eye
        diagonal = torch.diag_embed(sign * torch.exp(log_abs_diag))
        upper_with_diag = torch.triu(upper, diagonal=1) + diagonal
        return permutation, unit_lower, upper_with_diag, log_abs_diag, bias

    def weight(self) -> torch.Tensor:
        """The matrix :math:`W = P L (U + \\mathrm{diag}\\,\\mathbf{s})`."""
        permutation, unit_lower, upper_with_diag, _, _ = self._factors()
        return permutation @ unit_lower @ upper_with_diag

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        permutation, unit_lower, upper_with_diag, _, bias = self._factors()
        weight = permutation @ unit_lower @ upper_with_diag
        return x @ weight.mT + bias

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        permutation, unit_lower, upper_with_diag, _, bias = self._factors()
        # Row vectors r solve x^T W^T = r^T: W^T = (U + S)^T L^T P^T, so peel P, then L, then U + S.
        rows = (y - bias).reshape(-1, y.size(-1)) @ permutation
        rows = torch.linalg.solve_triangular(
            unit_lower.mT, rows, upper=True, left=False, unitriangular=True
        )
        rows = torch.linalg.solve_triangular(upper_with_diag.mT, rows, upper=False, left=False)
        return rows.reshape(torch.broadcast_shapes(y.shape, bias.shape))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, _, _, log_abs_diag, _ = self._factors()
        return log_abs_diag.sum(-1).expand(x.shape[:-1])


class LULinear(ConditionedLULinear, TransformModule):
    __doc__ = ConditionedLULinear.__doc__ + r"""

    Initialised as in Glow: :math:`W` a random rotation (QR of a Gaussian matrix), factorised
    :math:`W = P L U`, so the layer starts volume preserving (:math:`\sum_i\ell_i = 0`);
    :math:`P` and ``sign`` are fixed buffers (``permutation``, ``diag_sign``, saved in
    ``state_dict``), :math:`\mathbf{b} = 0`.

    Example:

    >>> import torch, transforms
    >>> layer = transforms.build("lu_linear", 4)
    >>> bool(torch.linalg.slogdet(layer.weight()).logabsdet.abs() < 1e-5)  # a rotation at init
    True

    :param input_dim: the dimension :math:`D` of the vectors.
    """

    __repr__ = torch.nn.Module.__repr__

    permutation: torch.Tensor
    diag_sign: torch.Tensor

    def __init__(self, input_dim: int):
        super().__init__(self._lu_params)
        self.input_dim = input_dim
        self.lower = nn.Parameter(torch.empty(input_dim, input_dim))
        self.upper = nn.Parameter(torch.empty(input_dim, input_dim))
        self.log_abs_diag = nn.Parameter(torch.empty(input_dim))
        self.bias = nn.Parameter(torch.empty(input_dim))
        self.register_buffer("permutation", torch.empty(input_dim, input_dim))
        self.register_buffer("diag_sign", torch.empty(input_dim))
        self.reset_parameters()

    def _lu_params(self) -> tuple[torch.Tensor, ...]:
        return self.permutation, self.lower, self.upper, self.log_abs_diag, self.diag_sign, self.bias

    def reset_parameters(self) -> None:
        """A random rotation in LU form, zero bias (Glow's initialisation)."""
        with torch.no_grad():
            gaussian = torch.randn(self.input_dim, self.input_dim, dtype=torch.float64)
            rotation, _ = torch.linalg.qr(gaussian)
            permutation, lower, upper = torch.linalg.lu(rotation)
            diagonal = torch.diagonal(upper)
            self.permutation.copy_(permutation)
            self.lower.copy_(torch.tril(lower, diagonal=-1))
            self.upper.copy_(torch.triu(upper, diagonal=1))
            self.log_abs_diag.copy_(diagonal.abs().log())
            self.diag_sign.copy_(diagonal.sign())
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


@register(
    "actnorm",
    exact_inverse=True,
    inverse="closed form",
    description="Glow's activation normalisation (Kingma & Dhariwal 2018), data-dependent init",
)
def actnorm(input_dim: int) -> ActNorm:
    """A per-dimension affine layer initialised from the first batch (zero mean, unit variance)."""
    return ActNorm(input_dim)


@register(
    "lu_linear",
    exact_inverse=True,
    inverse="closed form (triangular solves)",
    description="Glow's invertible linear map in LU form (1x1 convolution for vectors)",
)
def lu_linear(input_dim: int) -> LULinear:
    """An invertible linear map ``W x + b`` with ``W = P L (U + diag(s))`` (Glow)."""
    return LULinear(input_dim)
