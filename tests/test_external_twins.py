"""The normflows / zuko twins of benchmarks/external_twins.py are the maps they claim to be.

Each twin's log-det is checked against the autograd Jacobian of its own map (float64, at
initialisation and after N(0, 0.5) parameter noise), and where the parameterisation lets us copy
our parameters into it, it must give our stack's output and log-det: planar and radial
(normflows), realnvp and nice (both libraries), iaf and maf (zuko). normflows' autoregressive
layer has another scale function (sigmoid(a + 2) + 1e-3) and its own MADE degrees, so only its
own Jacobian is checked. Tests of a library skip when it is not installed.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transforms
from benchmarks import external_twins
from benchmarks.external_twins import TWIN_NOTES, available_libraries, twin_builders
from flow_helpers import move_parameters
from transforms.autoregressive import LOG_SCALE_BOUND, soft_bound

PAIRS = [(flow, library) for flow, builders in external_twins._ALL_TWINS.items() for library in builders]
LENGTH = 3
TOL = 1e-9


def _library(name: str):
    return pytest.importorskip(name)


def _twin(flow: str, library: str, dim: int, length: int = LENGTH):
    _library(library)
    return external_twins._ALL_TWINS[flow][library](dim, length).double()


def _ours(flow: str, dim: int, length: int = LENGTH, **kwargs):
    return transforms.flow(flow, dim, length, **kwargs).double()


def _ours_forward(stack, x):
    y = stack(x)
    return y, stack.log_abs_det_jacobian(x, y)


def _jacobian_log_det(twin, x):
    def one(v):
        return twin.forward_and_logdet(v[None])[0][0]

    return torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(one, v))[1] for v in x])


def test_every_twin_has_a_note_and_the_table_lists_only_installed_libraries():
    assert set(TWIN_NOTES) == set(PAIRS)
    for flow, builders in external_twins.EXTERNAL_TWINS.items():
        assert flow in transforms.available()
        assert builders and set(builders) <= set(available_libraries())
    assert twin_builders([]) == {}
    with pytest.raises(ValueError, match="unknown libraries"):
        twin_builders(["nflows"])


def test_module_imports_and_lists_nothing_without_either_library():
    code = (
        "import sys; sys.modules['normflows'] = None; sys.modules['zuko'] = None\n"
        "from benchmarks.external_twins import EXTERNAL_TWINS, available_libraries\n"
        "assert EXTERNAL_TWINS == {} and available_libraries() == [], (EXTERNAL_TWINS, available_libraries())\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("flow,library", PAIRS)
def test_shapes_and_log_det_against_autograd_jacobian(flow, library):
    dim = 4
    twin = _twin(flow, library, dim)
    torch.manual_seed(0)
    x = torch.randn(7, dim, dtype=torch.float64)
    y, log_det = twin.forward_and_logdet(x)
    assert y.shape == (7, dim) and log_det.shape == (7,)
    expected_parts = 2 * LENGTH - 1 if transforms.info(flow).permute_between else LENGTH
    assert len(twin.parts) == expected_parts
    for moved in (False, True):
        if moved:
            move_parameters(twin, seed=1)
        with torch.no_grad():
            y, log_det = twin.forward_and_logdet(x[:3])
        assert torch.isfinite(y).all()
        torch.testing.assert_close(log_det, _jacobian_log_det(twin, x[:3]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("library", ["normflows"])
@pytest.mark.parametrize("flow", ["realnvp", "nice"])
def test_normflows_couplings_refuse_an_odd_dim(flow, library):
    _library(library)
    with pytest.raises(ValueError, match="even dim"):
        external_twins._ALL_TWINS[flow][library](5, 2)


def _layers(stack):
    """Our stack's flow layers, permutations left out."""
    return [p for p in stack.parts if not isinstance(p, (transforms.Reverse, transforms.Roll))]


def _twin_layers(twin):
    return [p for p in twin.parts if not isinstance(p, (transforms.Reverse, transforms.Roll))]


def _assert_same_map(ours, twin, dim):
    torch.manual_seed(2)
    x = torch.randn(11, dim, dtype=torch.float64)
    with torch.no_grad():
        y_ours, log_det_ours = _ours_forward(ours, x)
        y_twin, log_det_twin = twin.forward_and_logdet(x)
    torch.testing.assert_close(y_twin, y_ours, rtol=0, atol=TOL)
    torch.testing.assert_close(log_det_twin, log_det_ours, rtol=0, atol=TOL)


def test_normflows_planar_with_our_parameters_is_our_planar():
    dim = 3
    ours, twin = _ours("planar", dim), _twin("planar", "normflows", dim)
    move_parameters(ours, seed=3)
    with torch.no_grad():
        for mine, theirs in zip(_layers(ours), _twin_layers(twin), strict=True):
            theirs.u.copy_(mine.u[None])
            theirs.w.copy_(mine.w[None])
            theirs.b.copy_(mine.bias)
    _assert_same_map(ours, twin, dim)


def test_normflows_radial_with_our_parameters_is_our_radial():
    dim = 3
    ours, twin = _ours("radial", dim), _twin("radial", "normflows", dim)
    move_parameters(ours, seed=4)
    with torch.no_grad():
        for mine, theirs in zip(_layers(ours), _twin_layers(twin), strict=True):
            theirs.z_0.copy_(mine.x0[None])
            theirs.alpha.copy_(F.softplus(mine.alpha_prime))  # |alpha| = our softplus(alpha')
            theirs.beta.copy_(mine.beta_prime)
    _assert_same_map(ours, twin, dim)


def _interleave_rows(weight: torch.Tensor, params: int) -> torch.Tensor:
    """Pyro's nets put parameter p of unit i at row p * n + i; normflows and zuko at i * params + p."""
    n = weight.shape[0] // params
    return weight.reshape(params, n, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def _copy_dense(pyro_net, linears, params: int) -> None:
    """Copy a pyro.nn.DenseNN into a list of torch-like linear layers (same sizes)."""
    pyro_linears = list(pyro_net.layers)
    assert len(pyro_linears) == len(linears)
    with torch.no_grad():
        for k, (source, target) in enumerate(zip(pyro_linears, linears)):
            last = k == len(linears) - 1
            target.weight.copy_(_interleave_rows(source.weight, params) if last else source.weight)
            target.bias.copy_(_interleave_rows(source.bias, params) if last else source.bias)


@pytest.mark.parametrize("flow", ["realnvp", "nice"])
def test_normflows_coupling_with_our_weights_is_our_coupling(flow):
    dim = 4
    # normflows exponentiates the raw log-scale: ours without its smooth bound is that map
    kwargs = {"log_scale_bound": None} if flow == "realnvp" else {}
    ours, twin = _ours(flow, dim, **kwargs), _twin(flow, "normflows", dim)
    move_parameters(ours, seed=5)
    for mine, theirs in zip(_layers(ours), _twin_layers(twin), strict=True):
        net = theirs.flows[1].param_map.net
        _copy_dense(mine.nn, [m for m in net if isinstance(m, torch.nn.Linear)], 2 if flow == "realnvp" else 1)
    _assert_same_map(ours, twin, dim)


def _bound_matched_affine(shift, raw):
    """zuko's MonotonicAffineTransform bounds the log-scale as a / (1 + |a| / ln 1000) (its
    default slope 1e-3); feeding it g^-1 of our 3 tanh(raw / 3) makes its log-scale ours, so a
    comparison isolates everything else (network, order, split, direction, permutations)."""
    from zuko.transforms import MonotonicAffineTransform

    bound = -math.log(1e-3)
    ours = soft_bound(raw, LOG_SCALE_BOUND)
    return MonotonicAffineTransform(shift, ours / (1 - ours.abs() / bound))


def _bound_matched_inverted_affine(shift, raw):
    """The zuko MAF twin inverts the layer: y -> x = (y - t) exp(-s) read from the output. Our
    MAF's y = exp(s) x + mu is that map with s -> -s and t = -mu exp(-s) (the MAF docstring's
    "inverse of an IAF whose network outputs (-mu e^-s, -s)"), so these make the two equal."""
    log_scale = soft_bound(raw, LOG_SCALE_BOUND)
    return _bound_matched_affine(-shift * torch.exp(-log_scale), -raw)


@pytest.mark.parametrize("flow", ["realnvp", "nice"])
def test_zuko_coupling_with_our_weights_is_our_coupling(flow):
    dim = 5  # odd: zuko's mask keeps the first D // 2 coordinates, as ours
    ours, twin = _ours(flow, dim), _twin(flow, "zuko", dim)
    move_parameters(ours, seed=6)
    for mine, theirs in zip(_layers(ours), _twin_layers(twin), strict=True):
        if flow == "realnvp":
            theirs.univariate = _bound_matched_affine
        _copy_dense(mine.nn, [m for m in theirs.hyper if hasattr(m, "weight")], 2 if flow == "realnvp" else 1)
    _assert_same_map(ours, twin, dim)


@pytest.mark.parametrize("flow", ["iaf", "maf"])
def test_zuko_autoregressive_with_our_made_is_our_flow(flow):
    dim = 4
    ours, twin = _ours(flow, dim), _twin(flow, "zuko", dim)
    move_parameters(ours, seed=7)
    for mine, theirs in zip(_layers(ours), _twin_layers(twin), strict=True):
        theirs.univariate = _bound_matched_affine if flow == "iaf" else _bound_matched_inverted_affine
        source = list(mine.arn.layers)
        target = [m for m in theirs.hyper if hasattr(m, "weight")]
        assert mine.arn.skip_layer is None and len(source) == len(target) == 2
        with torch.no_grad():
            for k, (a, b) in enumerate(zip(source, target)):
                last = k == len(source) - 1
                b.weight.copy_(_interleave_rows(a.weight, 2) if last else a.weight)
                b.bias.copy_(_interleave_rows(a.bias, 2) if last else a.bias)
                # Pyro's evenly spaced hidden degrees instead of zuko's cyclic ones
                b.mask = (_interleave_rows(a.mask, 2) if last else a.mask).bool()
    _assert_same_map(ours, twin, dim)
