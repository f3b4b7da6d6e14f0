"""Glow's actnorm and LU linear map, and the PReLU bijector: their formulas, log-dets against the
autograd Jacobian on (S, B, T, D) batches, exact inverses, actnorm's once-only data-dependent
initialisation across save/load, and jit tracing."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch

import transforms
from flow_helpers import move_parameters as _move, conditioned as _transform
from transforms.glow import ACTNORM_EPS, ActNorm, LULinear
from transforms.prelu import LOG_SLOPE_BOUND, PReLU

CONTEXT_DIM = 3
LOGDET_TOL = 1e-9

CASES = [("actnorm", False), ("lu_linear", False), ("prelu", False), ("prelu", True)]
GRID = [(name, dim, conditional) for (name, conditional), dim in itertools.product(CASES, (1, 2, 5))]


def _id(case) -> str:
    name, dim, conditional = case
    return f"{name}-d{dim}-{'cond' if conditional else 'plain'}"


def _build(name, dim, conditional):
    return transforms.build(name, dim, context_dim=CONTEXT_DIM if conditional else None).double()


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_logdet_matches_autograd_and_inverse_is_exact(case, moved):
    name, dim, conditional = case
    torch.manual_seed(0)
    layer = _build(*case)
    if not conditional:
        layer(3.0 + 2.0 * torch.randn(64, dim, dtype=torch.float64))  # actnorm initialises here
    if moved:
        _move(layer, seed=1)
    x = 1.5 * torch.randn(2, 3, 4, dim, dtype=torch.float64)  # (S, B, T, D)
    context = torch.randn(3, 4, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    transform = _transform(layer, context)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert y.shape == x.shape and log_det.shape == x.shape[:-1]
    for s, b, t in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        vector_map = _transform(layer, None if context is None else context[b, t])
        jacobian = torch.autograd.functional.jacobian(vector_map, x[s, b, t])
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert log_det[s, b, t].item() == pytest.approx(expected.item(), abs=LOGDET_TOL, rel=LOGDET_TOL)
    torch.testing.assert_close(transform.inv(y.clone()), x, atol=1e-10, rtol=1e-10)
    y_fresh = 2.0 * torch.randn(2, 3, 4, dim, dtype=torch.float64)
    torch.testing.assert_close(transform(transform.inv(y_fresh).clone()), y_fresh, atol=1e-10, rtol=1e-10)


def test_actnorm_initialises_on_the_first_batch_to_zero_mean_unit_variance():
    torch.manual_seed(2)
    layer = transforms.build("actnorm", 4).double()
    assert isinstance(layer, ActNorm) and not layer.initialized
    data = torch.tensor([3.0, -1.0, 0.0, 10.0], dtype=torch.float64) + torch.tensor(
        [0.5, 2.0, 7.0, 0.1], dtype=torch.float64
    ) * torch.randn(8, 16, 4, dtype=torch.float64)
    out = layer(data).reshape(-1, 4)
    spread = data.reshape(-1, 4).std(0, correction=0)
    torch.testing.assert_close(out.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    # unit variance up to Glow's epsilon added to the spread
    torch.testing.assert_close(out.std(0, correction=0), spread / (spread + ACTNORM_EPS))
    assert (out.std(0, correction=0) - 1).abs().max() < 1e-4
    assert layer.initialized
    # a second batch does not initialise again
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(100.0 + torch.randn(32, 4, dtype=torch.float64))
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    # the log-det is the log of the scale that standardised the data
    expected = -(spread + ACTNORM_EPS).log().sum()
    log_det = layer.log_abs_det_jacobian(data[0, 0], out[0])
    assert log_det.item() == pytest.approx(expected.item(), rel=1e-12)


def test_actnorm_initialised_through_the_inverse_standardises_the_base_side():
    torch.manual_seed(3)
    layer = transforms.build("actnorm", 3).double()
    data = 5.0 + 3.0 * torch.randn(500, 3, dtype=torch.float64)
    latent = layer.inv(data)  # density estimation: data enter on the y side
    spread = data.std(0, correction=0)
    torch.testing.assert_close(latent.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(latent.std(0, correction=0), spread / (spread + ACTNORM_EPS))
    torch.testing.assert_close(layer(latent.clone()), data)


def test_actnorm_state_survives_save_and_load_without_reinitialising():
    torch.manual_seed(4)
    layer = transforms.build("actnorm", 3)
    layer(2.0 + 4.0 * torch.randn(128, 3))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = transforms.build("actnorm", 3)
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.initialized
    other_batch = -7.0 + 0.1 * torch.randn(64, 3)
    torch.testing.assert_close(loaded(other_batch), layer(other_batch.clone()))
    torch.testing.assert_close(loaded.loc, layer.loc)
    torch.testing.assert_close(loaded.log_scale, layer.log_scale)
    # reset_parameters forgets the initialisation
    loaded.reset_parameters()
    assert not loaded.initialized


def test_actnorm_first_batch_of_one_vector_keeps_the_identity():
    layer = transforms.build("actnorm", 2).double()
    x = torch.tensor([3.0, -4.0], dtype=torch.float64)
    torch.testing.assert_close(layer(x), x)
    assert layer.initialized
    layer(torch.randn(16, 2, dtype=torch.float64) * 9.0)  # a later batch does not re-initialise
    torch.testing.assert_close(layer.log_scale.detach(), torch.zeros(2, dtype=torch.float64))


def test_actnorm_under_jit_trace_is_not_reinitialised():
    torch.manual_seed(5)
    layer = transforms.build("actnorm", 3)
    layer(torch.randn(64, 3) * 3.0)
    layer.requires_grad_(False)
    before = layer.loc.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda x: layer(x), (torch.randn(5, 3),), check_trace=False)
    fresh = 50.0 + torch.randn(5, 3)
    torch.testing.assert_close(traced(fresh), layer(fresh.clone()))
    assert torch.equal(layer.loc, before)


def test_lu_linear_is_p_l_u_and_starts_as_a_rotation():
    torch.manual_seed(6)
    layer = transforms.build("lu_linear", 5).double()
    assert isinstance(layer, LULinear)
    weight = layer.weight()
    # (the parameters were born in float32)
    torch.testing.assert_close(weight @ weight.T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert layer.log_abs_diag.sum().abs().item() < 1e-6  # volume preserving at initialisation
    permutation = layer.permutation
    assert torch.equal(permutation.sum(0), torch.ones(5, dtype=torch.float64))
    assert torch.equal(permutation.sum(1), torch.ones(5, dtype=torch.float64))
    assert set(layer.diag_sign.tolist()) <= {-1.0, 1.0}
    _move(layer, seed=7)
    eye = torch.eye(5, dtype=torch.float64)
    lower = torch.tril(layer.lower, -1) + eye
    upper = torch.triu(layer.upper, 1) + torch.diag(layer.diag_sign * layer.log_abs_diag.exp())
    torch.testing.assert_close(layer.weight(), permutation @ lower @ upper)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.weight().T + layer.bias)
    torch.testing.assert_close(
        layer.inv(y.clone()),
        torch.linalg.solve(layer.weight(), (y - layer.bias).unsqueeze(-1)).squeeze(-1),
    )
    expected = torch.linalg.slogdet(layer.weight()).logabsdet.expand(3, 7)
    torch.testing.assert_close(layer.log_abs_det_jacobian(x, y), expected)


def test_lu_linear_state_dict_carries_the_fixed_permutation_and_signs():
    torch.manual_seed(8)
    layer = transforms.build("lu_linear", 4)
    torch.manual_seed(9)
    other = transforms.build("lu_linear", 4)
    assert not torch.equal(layer.weight(), other.weight())
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.weight(), layer.weight())


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_prelu_is_identity_on_the_positive_side_and_alpha_x_on_the_negative(conditional):
    torch.manual_seed(10)
    layer = _build("prelu", 3, conditional)
    _move(layer, seed=11)
    context = torch.randn(6, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    transform = _transform(layer, context)
    x = torch.randn(6, 3, dtype=torch.float64)
    free = layer.nn(context) if conditional else layer.free_log_slope
    alpha = torch.exp(LOG_SLOPE_BOUND * torch.tanh(free / LOG_SLOPE_BOUND))
    assert (alpha > 0).all()
    expected = torch.where(x >= 0, x, alpha * x)
    torch.testing.assert_close(transform(x), expected)
    log_det = (torch.log(alpha) * (x < 0)).sum(-1)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, expected), log_det)


def test_prelu_slope_stays_positive_and_inverse_finite_for_any_parameter():
    layer = transforms.build("prelu", 2).double()
    assert isinstance(layer, PReLU)
    with torch.no_grad():
        layer.free_log_slope.copy_(torch.tensor([-1e3, 1e3], dtype=torch.float64))
    y = torch.tensor([[-1e3, -1e3], [5.0, -5.0]], dtype=torch.float64)
    x = layer.inv(y)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(layer(x.clone()), y)
    assert torch.isfinite(layer.log_abs_det_jacobian(x, y)).all()


@pytest.mark.parametrize("name", ["actnorm", "lu_linear"])
def test_glow_pieces_cannot_be_conditioned(name):
    entry = transforms.info(name)
    assert entry.exact_inverse and not entry.conditional and entry.min_input_dim == 1
    assert not entry.permute_between
    with pytest.raises(ValueError, match="conditional flows"):
        transforms.build(name, 3, context_dim=CONTEXT_DIM)


def test_prelu_registry_entry():
    entry = transforms.info("prelu")
    assert entry.exact_inverse and entry.conditional and entry.min_input_dim == 1


@pytest.mark.parametrize("case", [("lu_linear", False), ("prelu", False), ("prelu", True)], ids=str)
def test_jit_trace_matches_eager(case):
    name, conditional = case
    torch.manual_seed(12)
    layer = transforms.build(name, 4, context_dim=CONTEXT_DIM if conditional else None)
    layer.requires_grad_(False)
    context = torch.randn(6, CONTEXT_DIM) if conditional else None

    def forward_and_back(x, y):
        transform = _transform(layer, context)
        forward = transform(x)
        return forward, transform.log_abs_det_jacobian(x, forward), transform.inv(y)

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        example = (torch.randn(6, 4), torch.randn(6, 4))
        traced = torch.jit.trace(forward_and_back, example, check_trace=False)
    fresh = (torch.randn(6, 4), torch.randn(6, 4))
    for got, expected in zip(traced(*fresh), forward_and_back(*fresh)):
        torch.testing.assert_close(got, expected)
