"""Pyro 1.9's own layer of the spline, matrix exponential, NAF, BNAF and polynomial families,
built on one of our layers' parameters, for the throughput rows of :mod:`benchmarks.bench_transforms`.

Each twin is Pyro's class with the same sizes, on our layer's parameters (copied, or its very
network), so that where the math is the same the two stacks compute the same map and the ratio
measures the implementations. Where our parameterisation differs by a fixed reparameterisation
(the splines' logit scale, the polynomial's length scale, the matrix exponential's norm bound),
the twin's copy absorbs it into its last layer's weights, at no cost to Pyro's side. Where it
cannot (NAF's slope bound, the conditional matrix exponential's per-context norm bound), the
entry says so, and a variant of ours that computes Pyro's map is timed when one exists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import pyro.distributions.transforms as pyro_transforms
import torch

from transforms.block_autoregressive import BlockAutoregressive
from transforms.matrix_exponential import ConditionalMatrixExponential, MatrixExponential, bound_norm
from transforms.neural_autoregressive import ConditionalNeuralAutoregressive, NeuralAutoregressive
from transforms.polynomial import LENGTH_SCALE, Polynomial
from transforms.spline import ConditionalSpline, Spline, logit_scale_of
from transforms.spline_autoregressive import ConditionalSplineAutoregressive, SplineAutoregressive
from transforms.spline_coupling import SplineCoupling

__all__ = ["FamilyTwin", "FAMILY_TWINS", "pyro_twin", "same_math_variant"]


@dataclass(frozen=True)
class FamilyTwin:
    """How Pyro's layer of a family is built on ours, and whether the two compute one map.

    ``pyro``: our layer -> Pyro's on its parameters. ``same_math``: True where ``pyro``'s map is
    our default's (to the stated rounding), so the 1.05x target applies to it; False where it is
    not. ``variant``: our layer -> ours set to compute Pyro's map, where the default does not
    and such a setting exists (timed beside the default). ``note``: what differs."""

    pyro: Callable[[Any], Any]
    same_math: bool
    note: str
    variant: Callable[[Any], Any] | None = None


def _output_scaled_copy(net: torch.nn.Module, scale: torch.Tensor) -> torch.nn.Module:
    """A copy of ``net`` (a Pyro DenseNN or MADE) whose outputs are ``scale * net(x)``, one factor
    per output unit, folded into its last layer's weights and bias (no extra operation)."""
    twin = copy.deepcopy(net)
    last = twin.layers[-1]
    with torch.no_grad():
        last.weight.mul_(scale.to(last.weight).unsqueeze(-1))
        last.bias.mul_(scale.to(last.bias))
    return twin


def _spline_logit_scale(net: torch.nn.Module, logit_scale: float, bins: int, moved: int, made: bool) -> torch.nn.Module:
    """``net``'s copy with the widths' and heights' logits multiplied by ``logit_scale``, as our
    spline layers do after the network (Pyro's use the network's outputs as they are). A MADE's
    outputs are laid out parameter-major (unit ``p D + d``), a DenseNN's by its output slices:
    the widths and heights come first in both, ``2 K`` per coordinate."""
    total = net.layers[-1].out_features
    scale = torch.ones(total)
    scale[: 2 * bins * (net.input_dim if made else moved)] = logit_scale
    return _output_scaled_copy(net, scale)


def _spline(layer: Spline) -> Any:
    twin = pyro_transforms.Spline(layer.input_dim, layer.count_bins, layer.bound, order="quadratic")
    with torch.no_grad():
        twin.unnormalized_widths.copy_(layer.unnormalised_widths)
        twin.unnormalized_heights.copy_(layer.unnormalised_heights)
        twin.unnormalized_derivatives.copy_(layer.unnormalised_derivatives)
    return twin


def _conditional_spline(layer: ConditionalSpline) -> Any:
    net = _spline_logit_scale(layer.nn, layer.logit_scale, layer.count_bins, layer.input_dim, made=False)
    return pyro_transforms.ConditionalSpline(net, layer.input_dim, layer.count_bins, layer.bound, order="quadratic")


def _spline_coupling(layer: SplineCoupling) -> Any:
    moved = layer.nn.param_dims[0] // layer.count_bins
    net = _spline_logit_scale(layer.nn, layer.logit_scale, layer.count_bins, moved, made=False)
    # identity=True: the kept half passes unchanged, as in ours (Pyro's default splines it too)
    return pyro_transforms.SplineCoupling(
        layer.split_dim + moved, layer.split_dim, net, layer.count_bins, layer.bound, order="quadratic", identity=True
    )


def _spline_autoregressive(layer: SplineAutoregressive) -> Any:
    net = _spline_logit_scale(layer.arn, layer.logit_scale, layer.count_bins, layer.arn.input_dim, made=True)
    return pyro_transforms.SplineAutoregressive(
        layer.arn.input_dim, net, count_bins=layer.count_bins, bound=layer.bound, order="quadratic"
    )


def _conditional_spline_autoregressive(layer: ConditionalSplineAutoregressive) -> Any:
    net = _spline_logit_scale(layer.nn, logit_scale_of(layer.nn), layer.count_bins, layer.nn.input_dim, made=True)
    return pyro_transforms.ConditionalSplineAutoregressive(
        layer.nn.input_dim, net, count_bins=layer.count_bins, bound=layer.bound, order="quadratic"
    )


def _matrix_exponential(layer: MatrixExponential) -> Any:
    twin = pyro_transforms.MatrixExponential(layer.input_dim)
    with torch.no_grad():  # our M is the norm-bounded image of our weights: give Pyro that M
        twin.weights.copy_(bound_norm(layer.weights, layer.norm_bound))
    return twin


def _conditional_matrix_exponential(layer: ConditionalMatrixExponential) -> Any:
    return pyro_transforms.ConditionalMatrixExponential(layer.input_dim, layer.nn)


def _naf(layer: NeuralAutoregressive) -> Any:
    return pyro_transforms.NeuralAutoregressive(layer.arn, hidden_units=layer.arn.param_dims[0])


def _conditional_naf(layer: ConditionalNeuralAutoregressive) -> Any:
    return pyro_transforms.ConditionalNeuralAutoregressive(layer.nn, hidden_units=layer.nn.param_dims[0])


def _bnaf(layer: BlockAutoregressive) -> Any:
    twin = pyro_transforms.BlockAutoregressive(
        layer.input_dim, hidden_factors=list(layer.hidden_factors), activation="tanh", residual=layer.residual
    )
    with torch.no_grad():
        for ours, theirs in zip(layer.layers, twin.layers):
            theirs._weight.copy_(ours.weight)
            theirs._diag_weight.copy_(ours.log_scale)
            theirs.bias.copy_(ours.bias)
        if layer.gate is not None:
            twin.gate.copy_(layer.gate)
    return twin


def _polynomial(layer: Polynomial) -> Any:
    dim, degrees = layer.c.numel(), layer.count_degree + 1
    # ours reads a_r = b_r / L^r from the network's b (unit (k (R + 1) + r) D + d): fold L^-r in
    rows = torch.arange(layer.arn.layers[-1].out_features)
    scale = LENGTH_SCALE ** -((rows // dim) % degrees).to(torch.get_default_dtype())
    twin = pyro_transforms.Polynomial(_output_scaled_copy(layer.arn, scale), dim, layer.count_degree, layer.count_sum)
    with torch.no_grad():
        twin.c.copy_(layer.c)
    return twin


# Keyed by (registry name, conditional). Pyro 1.9 has no conditional spline coupling, BNAF or
# polynomial flow: those have plain rows only.
FAMILY_TWINS: dict[tuple[str, bool], FamilyTwin] = {
    ("spline", False): FamilyTwin(
        _spline, True,
        "Pyro's Spline(order='quadratic') on our parameters; its end knots have slope 0.999 where ours "
        "have 1, and its log-det is per coordinate (summed here)"),
    ("spline", True): FamilyTwin(
        _conditional_spline, True,
        "Pyro's ConditionalSpline(order='quadratic') on a copy of our context network, our 1/sqrt(H) "
        "logit scale folded into its last layer; end-knot slopes 0.999 against our 1"),
    ("spline_coupling", False): FamilyTwin(
        _spline_coupling, True,
        "Pyro's SplineCoupling(order='quadratic', identity=True) on a copy of our network, our 1/sqrt(H) "
        "logit scale folded into its last layer; end-knot slopes 0.999 against our 1"),
    ("spline_autoregressive", False): FamilyTwin(
        _spline_autoregressive, True,
        "Pyro's SplineAutoregressive(order='quadratic') on a copy of our MADE, our 1/sqrt(H) logit scale "
        "folded into its last layer; end-knot slopes 0.999 against our 1"),
    ("spline_autoregressive", True): FamilyTwin(
        _conditional_spline_autoregressive, True,
        "Pyro's ConditionalSplineAutoregressive(order='quadratic') on a copy of our conditional MADE, as "
        "the plain row"),
    ("matrix_exponential", False): FamilyTwin(
        _matrix_exponential, True,
        "Pyro's MatrixExponential given our norm-bounded M: the same map to its 8-term series' "
        "truncation; ours computes exp(M) once (matrix_exp) and one product, Pyro's 8 products with the batch"),
    ("matrix_exponential", True): FamilyTwin(
        _conditional_matrix_exponential, False,
        "Pyro's ConditionalMatrixExponential on our context network; ours bounds each context's M "
        "(bound_norm: ||M||_F < 3), Pyro's uses the raw output, and ours applies exp(M) to x by its "
        "power series until the remainder is provably below half an ulp (19 terms suffice for that "
        "bound in float32), Pyro's stops after 8 (inexact once ||M|| grows: see "
        "transforms/matrix_exponential.py): a different map, and no setting of ours computes Pyro's"),
    ("naf", False): FamilyTwin(
        _naf, False,
        "Pyro's NeuralAutoregressive on our MADE; ours bounds log a smoothly (5 tanh(./5)) and evaluates "
        "the DSF and its log-derivative in log space, finite for any |x| (two log-sigmoids and three "
        "log-sum-exps over the W units of every coordinate, and log softplus for log a), Pyro's through "
        "one sigmoid, a softmax-weighted sum, a logit and one log-sum-exp, with a + 1e-8: a different "
        "map and arithmetic, and no setting of ours computes Pyro's"),
    ("naf", True): FamilyTwin(
        _conditional_naf, False,
        "Pyro's ConditionalNeuralAutoregressive on our conditional MADE; as the plain row"),
    ("bnaf", False): FamilyTwin(
        _bnaf, True,
        "Pyro's BlockAutoregressive(residual='gated') on our weights; Pyro adds 1e-8 inside two logs "
        "and one division of its log-det and weight norm"),
    ("polynomial", False): FamilyTwin(
        _polynomial, True,
        "Pyro's Polynomial on a copy of our MADE, our degree-r scale L^-r (L = 3) folded into its last "
        "layer; Pyro adds 1e-8 inside its log-det's log"),
}


def pyro_twin(layer: Any, name: str, conditional: bool) -> Any:
    """Pyro's layer of family ``name`` on ``layer``'s parameters; a permutation (or any other
    part of the stack) is returned as it is."""
    twin = FAMILY_TWINS[name, conditional]
    return twin.pyro(layer) if _is_family_layer(layer, name, conditional) else layer


def same_math_variant(layer: Any, name: str, conditional: bool) -> Any:
    """Ours set to compute Pyro's map (the family's ``variant``), permutations as they are."""
    twin = FAMILY_TWINS[name, conditional]
    return twin.variant(layer) if _is_family_layer(layer, name, conditional) else layer


_LAYER_TYPES = {
    ("spline", False): Spline, ("spline", True): ConditionalSpline,
    ("spline_coupling", False): SplineCoupling,
    ("spline_autoregressive", False): SplineAutoregressive,
    ("spline_autoregressive", True): ConditionalSplineAutoregressive,
    ("matrix_exponential", False): MatrixExponential, ("matrix_exponential", True): ConditionalMatrixExponential,
    ("naf", False): NeuralAutoregressive, ("naf", True): ConditionalNeuralAutoregressive,
    ("bnaf", False): BlockAutoregressive,
    ("polynomial", False): Polynomial,
}


def _is_family_layer(layer: Any, name: str, conditional: bool) -> bool:
    return isinstance(layer, _LAYER_TYPES[name, conditional])
