r"""Sylvester normalizing flows (van den Berg et al. 2018), in the paper's three variants, with
an exact inverse.

Written by hand rather than reused from Pyro: ``pyro.distributions.transforms.Sylvester``
(pyro-ppl 1.9.2) computes :math:`\sum_i \log|1 + h'(a_i)\, r_{ii} \tilde r_{ii}|` for a map whose
Jacobian is :math:`I + R^T Q^T \mathrm{diag}(h') Q \tilde R^T` (its row-vector code transposes
the paper's equation), so its log-det is right only while :math:`Q` is a permutation (Pyro's own
test looks only at initialisation, where :math:`R, \tilde R \approx 0`); it has no inverse either
(``KeyError`` at any point it did not produce). ``tests/test_sylvester_householder.py`` shows both.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
from pyro.distributions import ConditionalTransformModule, TransformModule
from torch.distributions import Transform, constraints

from .hypernet import context_hypernet
from .registry import check_positive_int, register

__all__ = [
    "VARIANTS",
    "SylvesterParams",
    "ConditionedSylvester",
    "Sylvester",
    "ConditionalSylvester",
    "sylvester",
    "conditional_sylvester",
    "orthogonal_columns",
    "householder_product",
]

VARIANTS = ("orthogonal", "householder", "triangular")

# The paper's invertibility condition is r_ii r~_ii > -1 = -1/sup|tanh'|, met by r_ii = tanh(raw)
# and r~_ii = tanh(raw~). But then a layer's Jacobian factor 1 + tanh'(a_i) r_ii r~_ii goes to 0
# as tanh saturates (|raw| > 5 is routine for a hypernetwork's outputs, and tanh rounds to +-1 for
# |raw| > 9 in float32: a singular map). We scale both tanh's by BOUND = sqrt(1 - MIN_FACTOR), so
# every factor is >= MIN_FACTOR: one layer's diagonal shrinks a direction by at most 20x (it can
# stretch one by at most 2x in the paper already), and amplifies rounding in its inverse at most
# 20x; a flow that needs more contraction stacks layers (or learns its base scale).
_MIN_FACTOR = 0.05
_DIAGONAL_BOUND = math.sqrt(1.0 - _MIN_FACTOR)

# The inverse's scalar equations are solved to a residual of this many ulps of their terms:
# near rounding level, where another Newton step cannot improve the root.
_RESIDUAL_ULPS = 16.0
# Safeguarded Newton from a fixed-point start meets that residual in at most 5 (float32) / 7
# (float64) steps over 4 million draws per dtype of (r, r~, s, d), saturated and adversarial ones
# included (root where tanh' peaks and r r~ is most negative); bisection alone would resolve the
# initial bracket (width <= 2) to float64 precision in 53 halvings, hence the cap. Under
# torch.jit tracing a data-dependent stop cannot be recorded, so over twice the worst count seen
# runs unconditionally.
_MAX_ITERATIONS = 64
_TRACED_ITERATIONS = {torch.float16: 12, torch.bfloat16: 12, torch.float32: 12, torch.float64: 16}


class SylvesterParams(NamedTuple):
    r"""Parameters of one Sylvester layer; leading dims (from a context) broadcast over the input.

    :param q: ``(..., D, M)`` matrix with orthonormal columns, or ``None`` for :math:`Q = I`.
    :param r_diag: ``(..., M)`` unconstrained; :math:`r_{ii}` is a bounded tanh of it.
    :param r_upper: ``(..., M(M-1)/2)`` strictly upper entries of :math:`R`, row by row.
    :param r_tilde_diag: ``(..., M)`` unconstrained; :math:`\tilde r_{ii}` likewise.
    :param r_tilde_upper: ``(..., M(M-1)/2)`` strictly upper entries of :math:`\tilde R`.
    :param b: ``(..., M)`` bias.
    """

    q: torch.Tensor | None
    r_diag: torch.Tensor
    r_upper: torch.Tensor
    r_tilde_diag: torch.Tensor
    r_tilde_upper: torch.Tensor
    b: torch.Tensor


def _strict_upper(
    entries: torch.Tensor, size: int, diagonal: torch.Tensor | None = None
) -> torch.Tensor:
    """``(..., size(size-1)/2)`` entries, row by row, into a ``(..., size, size)`` strictly upper
    triangular matrix, with ``diagonal`` ``(..., size)`` on its diagonal when given. An
    ``index_copy`` into the flattened matrix: its backward is a gather, where indexing the entries
    would scatter-add (1.7x slower forward+backward at N = 2000, M = 32)."""
    index = torch.triu_indices(size, size, offset=1, device=entries.device)
    rows, cols = index[0], index[1]  # indexed, not unpacked: unpacking iterates, which tracing warns of
    shape = entries.shape[:-1] if diagonal is None else torch.broadcast_shapes(
        entries.shape[:-1], diagonal.shape[:-1]
    )
    flat = entries.new_zeros(shape + (size * size,))
    flat = flat.index_copy(-1, rows * size + cols, entries.expand(shape + entries.shape[-1:]))
    if diagonal is not None:
        positions = torch.arange(size, device=entries.device) * (size + 1)
        flat = flat.index_copy(-1, positions, diagonal.expand(shape + (size,)))
    return flat.view(shape + (size, size))


def _upper_triangular(diag_raw: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """R with r_ii = BOUND tanh(diag_raw): the reparameterisation that makes r_ii r~_ii > -1."""
    return _strict_upper(upper, diag_raw.size(-1), _DIAGONAL_BOUND * torch.tanh(diag_raw))


def orthogonal_columns(
    skew_entries: torch.Tensor, input_dim: int, num_columns: int
) -> torch.Tensor:
    r"""The first ``num_columns`` columns of :math:`\exp(A)`, :math:`A = U - U^T` skew-symmetric
    from the ``(..., D(D-1)/2)`` strictly upper entries of :math:`U`.

    Why the matrix exponential: it is orthogonal to rounding (unlike the paper's iterative
    orthogonalisation, which stops at a tolerance and so biases a log-det that assumes
    :math:`Q^TQ = I`), smooth everywhere (unlike QR, whose Householder sign choice jumps), and
    onto :math:`SO(D)` (unlike the Cayley map, which misses rotations with eigenvalue -1): every
    orthonormal frame of ``num_columns < D`` columns is reached, and for ``num_columns = D`` the
    missing reflections are absorbed by the signs of :math:`r_{ii}, \tilde r_{ii}`.
    """
    upper = _strict_upper(skew_entries, input_dim)
    return torch.linalg.matrix_exp(upper - upper.mT)[..., :num_columns]


def householder_product(vectors: torch.Tensor) -> torch.Tensor:
    r""":math:`Q = H_1 \cdots H_K`, :math:`H_k = I - 2 u_k u_k^T / \|u_k\|^2`, from ``(..., K, D)``
    vectors: orthogonal by construction, as in the Householder Sylvester flow."""
    units = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    dim = vectors.size(-1)
    q = torch.eye(dim, dtype=vectors.dtype, device=vectors.device).expand(
        vectors.shape[:-2] + (dim, dim)
    )
    for k in range(vectors.size(-2)):
        unit = units[..., k, :]
        q = q - 2.0 * (q @ unit.unsqueeze(-1)) * unit.unsqueeze(-2)
    return q


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``matrix @ vector`` over broadcast leading dims (one GEMM when the matrix is shared)."""
    if matrix.dim() == 2:
        return vector @ matrix.mT
    if vector.dim() > matrix.dim() - 1:
        # Draws over leading sample dims of one context: einsum keeps the matrices unexpanded,
        # where matmul would copy them once per draw (30x faster at S = 100, B x T = 2000).
        return torch.einsum("...ij,...j->...i", matrix, vector)
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _rmatvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``matrix^T @ vector`` over broadcast leading dims."""
    if matrix.dim() == 2:
        return vector @ matrix
    if vector.dim() > matrix.dim() - 1:  # as in _matvec
        return torch.einsum("...ij,...i->...j", matrix, vector)
    return (vector.unsqueeze(-2) @ matrix).squeeze(-2)


def _residual(
    v: torch.Tensor, r: torch.Tensor, r_tilde: torch.Tensor, s: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """g(v) = v + r tanh(r~ v + s) - d and its derivative g'(v) = 1 + r r~ tanh'(.) > 0."""
    act = torch.tanh(r_tilde * v + s)
    return v + r * act - d, 1.0 + r * r_tilde * (1.0 - act * act)


def _solve_scalar(
    r: torch.Tensor, r_tilde: torch.Tensor, s: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """The root of v + r tanh(r~ v + s) = d, elementwise, by Newton's method kept inside a
    bracket (bisection when a step leaves it). g is increasing (g' >= MIN_FACTOR) and
    |g(v) - v + d| <= |r|, so the root lies in [d - |r|, d + |r|]."""
    lower, upper = d - r.abs(), d + r.abs()
    v = d - r * torch.tanh(r_tilde * d + s)  # one fixed-point step: inside the bracket
    eps = torch.finfo(v.dtype).eps
    tracing = torch.jit.is_tracing()
    iterations = _TRACED_ITERATIONS.get(v.dtype, _MAX_ITERATIONS) if tracing else _MAX_ITERATIONS
    for _ in range(iterations):
        g, slope = _residual(v, r, r_tilde, s, d)
        lower = torch.where(g < 0, v, lower)
        upper = torch.where(g > 0, v, upper)
        newton = v - g / slope
        inside = (newton >= lower) & (newton <= upper)
        v = torch.where(inside, newton, 0.5 * (lower + upper))
        if not tracing:
            scale = 1.0 + v.abs() + d.abs()
            if bool((g.abs() <= _RESIDUAL_ULPS * eps * scale).all()):
                break
    return v


ScalarSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _back_substitute(
    c: torch.Tensor, r: torch.Tensor, r_tilde: torch.Tensor, b: torch.Tensor, solve: ScalarSolver
) -> torch.Tensor:
    r"""Solve :math:`v + R\,h(\tilde R v + b) = c` for upper triangular :math:`R, \tilde R`,
    from the last coordinate up: coordinate i involves only :math:`v_i, \dots, v_M`, so with
    :math:`s_i = \sum_{k>i} \tilde r_{ik} v_k + b_i` and
    :math:`d_i = c_i - \sum_{j>i} r_{ij} h(a_j)` it is the scalar equation
    :math:`v_i + r_{ii} h(\tilde r_{ii} v_i + s_i) = d_i`, handed to
    ``solve(i, r_ii, r~_ii, s_i, d_i)``."""
    size = c.size(-1)
    v_tail = c[..., :0]
    act_tail = c[..., :0]
    for i in reversed(range(size)):
        s = b[..., i] + (r_tilde[..., i, i + 1 :] * v_tail).sum(-1)
        d = c[..., i] - (r[..., i, i + 1 :] * act_tail).sum(-1)
        r_ii, r_tilde_ii = r[..., i, i], r_tilde[..., i, i]
        v_i = solve(i, r_ii, r_tilde_ii, s, d)
        act_i = torch.tanh(r_tilde_ii * v_i + s)
        shape = torch.broadcast_shapes(v_i.shape, v_tail.shape[:-1])
        v_tail = torch.cat(
            [v_i.expand(shape).unsqueeze(-1), v_tail.expand(shape + (size - 1 - i,))], -1
        )
        act_tail = torch.cat(
            [act_i.expand(shape).unsqueeze(-1), act_tail.expand(shape + (size - 1 - i,))], -1
        )
    return v_tail


class ConditionedSylvester(Transform):
    r"""The Sylvester map from given parameters (a :class:`SylvesterParams` or a callable that
    returns one); see :class:`Sylvester` for the equations."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(self, params: SylvesterParams | Callable[[], SylvesterParams]):
        super().__init__(cache_size=1)
        self._param_source = params
        # (x, (q, r, r~, b), tanh activation or None) of the last forward / inverse call: the
        # log-det of the same point reuses them (one context-network evaluation per
        # sample-and-score, as conv_planar and Pyro's affine autoregressive transform do).
        self._cached_call: tuple[torch.Tensor, tuple, torch.Tensor | None] | None = None

    def _matrices(
        self,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        params = self._param_source() if callable(self._param_source) else self._param_source
        r = _upper_triangular(params.r_diag, params.r_upper)
        r_tilde = _upper_triangular(params.r_tilde_diag, params.r_tilde_upper)
        return params.q, r, r_tilde, params.b

    @staticmethod
    def _preactivation(
        z: torch.Tensor, q: torch.Tensor | None, r_tilde: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        return _matvec(r_tilde, z if q is None else _rmatvec(q, z)) + b

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        matrices = self._matrices()
        q, r, r_tilde, b = matrices
        act = torch.tanh(self._preactivation(z, q, r_tilde, b))
        self._cached_call = (z, matrices, act)
        shift = _matvec(r, act)
        return z + (shift if q is None else _matvec(q, shift))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        matrices = self._matrices()
        q, r, r_tilde, b = matrices
        c = y if q is None else _rmatvec(q, y)
        # Solve without a graph, then one Newton step per coordinate with the graph: the value is
        # the root (polished), its derivative the implicit-function one, -(dg/dtheta) / g'(v).
        with torch.no_grad():
            root = _back_substitute(c, r, r_tilde, b, lambda i, *coeffs: _solve_scalar(*coeffs))
        root = root.detach()

        def newton_step(i: int, r_ii, r_tilde_ii, s, d) -> torch.Tensor:
            g, slope = _residual(root[..., i], r_ii, r_tilde_ii, s, d)
            return root[..., i] - g / slope

        v = _back_substitute(c, r, r_tilde, b, newton_step)
        if q is None:
            x = v
        else:  # Q^T z = v and the part of z orthogonal to Q's columns is that of y.
            x = y - _matvec(q, _matvec(r, torch.tanh(_matvec(r_tilde, v) + b)))
        self._cached_call = (x, matrices, None)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""From x alone: :math:`\sum_i \log(1 + h'(a_i) r_{ii} \tilde r_{ii})`, every term > 0.
        The matrices (and activation) of the last forward or inverse call are reused only when
        ``x`` is that call's point."""
        cached = self._cached_call
        if cached is not None and cached[0] is x:
            _, (q, r, r_tilde, b), act = cached
        else:
            (q, r, r_tilde, b), act = self._matrices(), None
        if act is None:
            act = torch.tanh(self._preactivation(x, q, r_tilde, b))
        diagonal = r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1)
        return torch.log1p((1.0 - act * act) * diagonal).sum(-1)


def _check_variant(
    input_dim: int,
    variant: str,
    num_columns: int | None,
    num_householder: int | None,
    reverse: bool,
) -> tuple[int, int]:
    """(M, H) for a variant, or ValueError naming the bad value."""
    check_positive_int("input_dim", input_dim)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if num_columns is not None and variant != "orthogonal":
        raise ValueError(
            f"num_columns applies to variant='orthogonal' only, got variant={variant!r}"
        )
    if num_householder is not None and variant != "householder":
        raise ValueError(
            f"num_householder applies to variant='householder' only, got variant={variant!r}"
        )
    if reverse and variant != "triangular":
        raise ValueError(f"reverse applies to variant='triangular' only, got variant={variant!r}")
    columns = input_dim if num_columns is None else num_columns
    if isinstance(columns, bool) or not isinstance(columns, int) or not 1 <= columns <= input_dim:
        raise ValueError(
            f"num_columns must be an int in [1, input_dim={input_dim}], got {columns!r}"
        )
    reflections = input_dim if num_householder is None else num_householder
    check_positive_int("num_householder", reflections)
    return (columns if variant == "orthogonal" else input_dim), reflections


class _QSource(nn.Module):
    """Q of a variant from its own parameters, or from given ones (an amortised Q)."""

    def __init__(
        self, input_dim: int, variant: str, num_columns: int, num_householder: int, reverse: bool
    ):
        super().__init__()
        self.input_dim, self.variant, self.num_columns = input_dim, variant, num_columns
        self.num_householder, self.reverse = num_householder, reverse
        if reverse:
            self.register_buffer("reversal", torch.eye(input_dim).flip(-1))

    @property
    def num_params(self) -> int:
        if self.variant == "orthogonal":
            return self.input_dim * (self.input_dim - 1) // 2
        if self.variant == "householder":
            return self.num_householder * self.input_dim
        return 0

    def forward(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        if self.variant == "orthogonal":
            # D = 1 has no skew parameter: exp(0) = I
            if flat is None:
                return None
            return orthogonal_columns(flat, self.input_dim, self.num_columns)
        if self.variant == "householder":
            return householder_product(flat.unflatten(-1, (self.num_householder, self.input_dim)))
        return self.reversal if self.reverse else None


class Sylvester(ConditionedSylvester, TransformModule):
    r"""A Sylvester flow layer [1],

        :math:`\mathbf{y} = \mathbf{z} + Q R\, h(\tilde R Q^T \mathbf{z} + \mathbf{b})`,
        :math:`h = \tanh`,

    with :math:`Q \in \mathbb{R}^{D \times M}` of orthonormal columns, :math:`R, \tilde R`
    upper triangular :math:`M \times M` and :math:`\mathbf{b} \in \mathbb{R}^M`. By Sylvester's
    determinant identity and :math:`Q^TQ = I`,

        :math:`\log|\det J| = \log\det(I_M + \mathrm{diag}(h'(\mathbf{a})) \tilde R R)
        = \sum_i \log(1 + h'(a_i)\, r_{ii} \tilde r_{ii})`,
        :math:`\mathbf{a} = \tilde R Q^T \mathbf{z} + \mathbf{b}`.

    It is invertible when :math:`r_{ii} \tilde r_{ii} > -1 / \|h'\|_\infty = -1`; the diagonals
    are :math:`0.975 \tanh` of free parameters (the paper's tanh, bounded so that one layer's
    :math:`1 + h' r_{ii} \tilde r_{ii} \geq 0.05`), so the condition holds at every parameter value.

    Variants: ``"orthogonal"`` (O-SNF, ``num_columns`` = M <= D columns of
    :func:`orthogonal_columns`, exact), ``"householder"`` (H-SNF, Q a product of
    ``num_householder`` reflections), ``"triangular"`` (T-SNF, Q = I, or the reversal
    permutation with ``reverse=True``; ``transforms.flow`` puts reversals between layers, which
    is the paper's alternation).

    Exact inverse: the part of :math:`\mathbf{z}` orthogonal to Q's columns passes unchanged
    and :math:`\mathbf{v} = Q^T \mathbf{z}` solves
    :math:`\mathbf{v} + R\,h(\tilde R \mathbf{v} + \mathbf{b}) = Q^T \mathbf{y}`, a triangular
    system of increasing scalar equations solved from the last coordinate up by safeguarded
    Newton iterations to rounding level; gradients by the implicit-function theorem.

    >>> import torch, pyro.distributions as dist
    >>> layer = Sylvester(4, variant="householder", num_householder=2)
    >>> base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    >>> flow_dist = dist.TransformedDistribution(base, [layer])
    >>> flow_dist.log_prob(torch.randn(10, 4)).shape      # any point, not only samples
    torch.Size([10])

    :param input_dim: D.
    :param variant: ``"orthogonal"`` (default), ``"householder"`` or ``"triangular"``.
    :param num_columns: M for ``"orthogonal"`` (default D).
    :param num_householder: reflections for ``"householder"`` (default D).
    :param reverse: ``"triangular"`` with Q the reversal permutation.

    References:

    [1] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling. Sylvester
    Normalizing Flows for Variational Inference. UAI 2018. [arXiv:1803.05649]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        input_dim: int,
        variant: str = "orthogonal",
        num_columns: int | None = None,
        num_householder: int | None = None,
        reverse: bool = False,
    ):
        super().__init__(self._module_params)
        size, reflections = _check_variant(
            input_dim, variant, num_columns, num_householder, reverse
        )
        self.input_dim, self.variant = input_dim, variant
        self.q_source = _QSource(input_dim, variant, size, reflections, reverse)
        upper = size * (size - 1) // 2
        self.r_diag = nn.Parameter(torch.empty(size))
        self.r_upper = nn.Parameter(torch.empty(upper))
        self.r_tilde_diag = nn.Parameter(torch.empty(size))
        self.r_tilde_upper = nn.Parameter(torch.empty(upper))
        self.b = nn.Parameter(torch.empty(size))
        self.q_params = None  # D = 1 orthogonal and triangular Q have no parameter
        if self.q_source.num_params:
            self.q_params = nn.Parameter(torch.empty(self.q_source.num_params))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(M), 1/sqrt(M)) like ``nn.Linear``: a random rotation and a non-trivial
        map at initialisation."""
        bound = 1.0 / math.sqrt(self.r_diag.numel())
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    __repr__ = nn.Module.__repr__  # Transform.__repr__ comes first in the MRO and shows no state

    def _module_params(self) -> SylvesterParams:
        return SylvesterParams(
            self.q_source(self.q_params),
            self.r_diag,
            self.r_upper,
            self.r_tilde_diag,
            self.r_tilde_upper,
            self.b,
        )

    def extra_repr(self) -> str:
        text = f"input_dim={self.input_dim}, variant={self.variant!r}"
        if self.variant == "orthogonal":
            text += f", num_columns={self.q_source.num_columns}"
        if self.variant == "householder":
            text += f", num_householder={self.q_source.num_householder}"
        if self.q_source.reverse:
            text += ", reverse=True"
        return text


class ConditionalSylvester(ConditionalTransformModule):
    r"""A Sylvester layer whose :math:`R, \tilde R, \mathbf{b}` (and, with ``condition_q=True``,
    Q's parameters) are the outputs of ``nn(context)``, amortised as in [1]; the map, log-det and
    inverse are those of :class:`Sylvester`.

    ``nn`` returns a tuple of tensors of sizes :meth:`param_dims` (a :class:`pyro.nn.DenseNN`
    built by :func:`conditional_sylvester`).

    References:

    [1] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling. Sylvester
    Normalizing Flows for Variational Inference. UAI 2018. [arXiv:1803.05649]
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    volume_preserving = False

    def __init__(
        self,
        input_dim: int,
        nn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        variant: str = "orthogonal",
        num_columns: int | None = None,
        num_householder: int | None = None,
        reverse: bool = False,
        condition_q: bool = False,
    ):
        super().__init__()
        size, reflections = _check_variant(
            input_dim, variant, num_columns, num_householder, reverse
        )
        self.input_dim, self.variant, self.condition_q = input_dim, variant, bool(condition_q)
        self.nn = nn
        self.q_source = _QSource(input_dim, variant, size, reflections, reverse)
        self.q_params = None
        if self.q_source.num_params and not self.condition_q:
            self.q_params = torch.nn.Parameter(torch.empty(self.q_source.num_params))
            bound = 1.0 / math.sqrt(size)
            torch.nn.init.uniform_(self.q_params, -bound, bound)

    @staticmethod
    def param_dims(
        input_dim: int,
        variant: str = "orthogonal",
        num_columns: int | None = None,
        num_householder: int | None = None,
        condition_q: bool = False,
    ) -> list[int]:
        """Sizes of the tensors ``nn(context)`` returns: r_diag, r_upper, r~_diag, r~_upper, b
        and, with ``condition_q``, Q's parameters."""
        size, reflections = _check_variant(input_dim, variant, num_columns, num_householder, False)
        dims = [size, size * (size - 1) // 2, size, size * (size - 1) // 2, size]
        if condition_q:
            dims.append(_QSource(input_dim, variant, size, reflections, False).num_params)
        return dims

    def _params(self, context: torch.Tensor) -> SylvesterParams:
        outputs = self.nn(context)
        flat_q = outputs[5] if self.condition_q else self.q_params
        return SylvesterParams(self.q_source(flat_q), *outputs[:5])

    def condition(self, context: torch.Tensor) -> ConditionedSylvester:
        return ConditionedSylvester(partial(self._params, context))

    def extra_repr(self) -> str:
        text = f"input_dim={self.input_dim}, variant={self.variant!r}"
        if self.variant == "orthogonal":
            text += f", num_columns={self.q_source.num_columns}"
        if self.variant == "householder":
            text += f", num_householder={self.q_source.num_householder}"
        if self.q_source.reverse:
            text += ", reverse=True"
        return text + f", condition_q={self.condition_q}"


def conditional_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    variant: str = "orthogonal",
    num_columns: int | None = None,
    num_householder: int | None = None,
    reverse: bool = False,
    condition_q: bool = False,
) -> ConditionalSylvester:
    """A :class:`ConditionalSylvester` whose parameters come from a
    :class:`pyro.nn.DenseNN` of the context (hidden dims default to ``[10 D, 10 D]``)."""
    dims = ConditionalSylvester.param_dims(
        input_dim, variant, num_columns, num_householder, condition_q
    )
    hypernet = context_hypernet(input_dim, context_dim, dims, hidden_dims)
    return ConditionalSylvester(
        input_dim, hypernet, variant, num_columns, num_householder, reverse, condition_q
    )


@register(
    "sylvester",
    exact_inverse=True,
    inverse="numerical: back substitution of monotone scalars (Newton), to machine precision",
    conditional=conditional_sylvester,
    permute_between=True,
    description="Sylvester flow (van den Berg et al. 2018): orthogonal / Householder / "
    "triangular Q, exact inverse",
)
def sylvester(
    input_dim: int,
    variant: str = "orthogonal",
    num_columns: int | None = None,
    num_householder: int | None = None,
    reverse: bool = False,
) -> Sylvester:
    """A :class:`Sylvester` layer. ``transforms.flow`` puts a reversal between layers: for the
    triangular variant that is the paper's alternation of Q = I and the reversal; for the others
    it is absorbed in Q (a permutation is orthogonal)."""
    return Sylvester(input_dim, variant, num_columns, num_householder, reverse)
