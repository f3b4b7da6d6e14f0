"""The neural spline flows and the matrix exponential: what the registry's contract tests do not
cover (the spline's knots, slopes and tails, inverses at knots and bounds in float32, the
conditional spline coupling, the matrix exponential's norm bound and its agreement with Pyro's
where Pyro's series is accurate)."""

from __future__ import annotations

import math

import pyro.distributions.transforms as pyro_transforms
import pytest
import torch

import transforms
from transforms.matrix_exponential import NORM_BOUND, MatrixExponential, bound_norm, expm_apply, series_terms
from transforms.spline import IDENTITY_DERIVATIVE, MIN_DERIVATIVE, _knots, rational_quadratic_spline

BOUND = 3.0
BINS = 5


def _params(dim: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(dim, BINS, generator=generator, dtype=dtype),
        torch.randn(dim, BINS, generator=generator, dtype=dtype),
        torch.randn(dim, BINS - 1, generator=generator, dtype=dtype),
    )


def test_spline_passes_through_its_knots_with_their_slopes_and_meets_its_tails_with_slope_1():
    widths, heights, derivatives = _params(2)
    _, x_knots = _knots(widths, BOUND, 1e-3)
    _, y_knots = _knots(heights, BOUND, 1e-3)
    # just above each knot but the last, and just below the last: inside the bin that starts there
    x = torch.cat([x_knots[:, :-1] + 1e-12, x_knots[:, -1:] - 1e-12], dim=-1).T  # (K + 1, 2)
    y, log_slope = rational_quadratic_spline(x, widths, heights, derivatives, bound=BOUND)
    torch.testing.assert_close(y, y_knots.T, atol=1e-10, rtol=0)
    inner = MIN_DERIVATIVE + torch.nn.functional.softplus(derivatives)
    expected = torch.cat([torch.ones(2, 1, dtype=torch.float64), inner, torch.ones(2, 1, dtype=torch.float64)], -1)
    torch.testing.assert_close(log_slope.exp(), expected.T, atol=1e-9, rtol=0)


def test_outside_the_box_the_spline_is_the_identity():
    params = _params(2)
    x = torch.tensor([[-3.5, 7.0], [BOUND + 1e-9, -1e4]], dtype=torch.float64)
    for inverse in (False, True):
        y, log_slope = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
        torch.testing.assert_close(y, x, atol=0, rtol=0)
        assert (log_slope == 0).all()


def test_float32_inverse_is_finite_at_knots_and_bounds():
    widths, heights, derivatives = _params(3, dtype=torch.float32, seed=1)
    _, y_knots = _knots(heights, BOUND, 1e-3)
    y = torch.cat([y_knots.T, torch.rand(200, 3) * 2 * BOUND - BOUND])  # knots, bounds and between
    x, log_slope = rational_quadratic_spline(y, widths, heights, derivatives, bound=BOUND, inverse=True)
    assert torch.isfinite(x).all() and torch.isfinite(log_slope).all()
    y_back, _ = rational_quadratic_spline(x, widths, heights, derivatives, bound=BOUND)
    torch.testing.assert_close(y_back, y, atol=1e-4, rtol=1e-4)


def test_elementwise_spline_starts_around_the_identity():
    torch.manual_seed(0)
    layer = transforms.build("spline", 3).double()
    spread = 1 / layer.count_bins**0.5
    assert (layer.unnormalised_derivatives - IDENTITY_DERIVATIVE).abs().max() <= spread
    assert layer.unnormalised_widths.abs().max() <= spread
    with torch.no_grad():  # the centre of the initialisation is the identity itself
        layer.unnormalised_widths.zero_()
        layer.unnormalised_heights.zero_()
        layer.unnormalised_derivatives.fill_(IDENTITY_DERIVATIVE)
    x = 2.0 * torch.randn(100, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x, atol=1e-12, rtol=0)


def test_conditional_spline_coupling_keeps_the_first_half_and_reads_the_context():
    torch.manual_seed(2)
    layer = transforms.build("spline_coupling", 4, context_dim=3)
    x = torch.randn(6, 4)
    a, b = layer.condition(torch.randn(3))(x.clone()), layer.condition(torch.randn(3))(x.clone())
    torch.testing.assert_close(a[:, :2], x[:, :2], atol=0, rtol=0)
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_spline_options_are_checked():
    with pytest.raises(ValueError, match="count_bins"):
        transforms.build("spline", 2, count_bins=1)
    with pytest.raises(ValueError, match="bound"):
        transforms.build("spline_coupling", 2, bound=-1.0)


def test_matrix_exponential_is_exp_of_the_bounded_matrix():
    torch.manual_seed(3)
    layer = MatrixExponential(4).double()
    with torch.no_grad():
        layer.weights.mul_(20.0)  # ||M_raw||_F ~ 25: the bound binds
    matrix = layer.matrix()
    assert torch.linalg.matrix_norm(matrix).item() < 3.0
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ torch.linalg.matrix_exp(matrix).mT)
    torch.testing.assert_close(layer.log_abs_det_jacobian(x, None), matrix.trace().expand(5))


def test_matrix_exponential_unbounded_agrees_with_pyros_where_its_series_converges():
    torch.manual_seed(4)
    ours = MatrixExponential(3, norm_bound=None).double()
    pyros = pyro_transforms.MatrixExponential(3, iterations=20).double()
    with torch.no_grad():
        pyros.weights.copy_(0.3 * ours.weights)
        ours.weights.copy_(pyros.weights)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), pyros(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_series_is_the_matrix_exponential_to_rounding(dtype):
    torch.manual_seed(5)
    # Frobenius norms from near 0 to just under the bound, where the series is longest
    raw = torch.randn(64, 6, 6, dtype=torch.float64) * torch.logspace(-3, 2, 64, dtype=torch.float64)[:, None, None]
    matrix = bound_norm(raw, NORM_BOUND)
    assert torch.linalg.matrix_norm(matrix).max().item() > 0.99 * NORM_BOUND
    v = torch.randn(64, 6, dtype=torch.float64)
    exact = (torch.linalg.matrix_exp(matrix) @ v.unsqueeze(-1)).squeeze(-1)
    series = expm_apply(matrix.to(dtype), v.to(dtype), NORM_BOUND).double()
    relative = torch.linalg.vector_norm(series - exact, dim=-1) / torch.linalg.vector_norm(exact, dim=-1)
    assert relative.max().item() < 16 * torch.finfo(dtype).eps


def test_the_traced_series_takes_the_a_priori_terms_and_agrees():
    torch.manual_seed(6)
    matrix = bound_norm(torch.randn(8, 4, 4, dtype=torch.float64) * 5.0, NORM_BOUND)
    v = torch.randn(8, 4, dtype=torch.float64)
    traced = torch.jit.trace(lambda m, x: expm_apply(m, x, NORM_BOUND), (matrix, v), check_trace=False)
    exact = (torch.linalg.matrix_exp(matrix) @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(traced(matrix, v), exact, atol=1e-13, rtol=1e-13)
    assert (series_terms(3.0, torch.float32), series_terms(3.0, torch.float64)) == (19, 29)
    # the a-priori remainder bound at b = 3 (float64) holds for the worst norm
    k = series_terms(3.0, torch.float64)
    assert 2 * 3.0 ** (k + 1) / math.factorial(k + 1) <= 0.5 * torch.finfo(torch.float64).eps * math.exp(-3.0)


def test_the_conditional_layer_round_trips_and_its_log_det_is_autograds_after_moving():
    torch.manual_seed(7)
    layer = transforms.build("matrix_exponential", 3, context_dim=4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))  # far from initialisation: the bound binds for most contexts
    context = torch.randn(10, 4, dtype=torch.float64)
    t = layer.condition(context)
    assert (torch.linalg.matrix_norm(t.matrix()) > 2.0).any()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = t(x)
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-12, rtol=1e-12)
    # the Jacobian of the batched series map itself: its diagonal blocks, one per sample
    jac = torch.autograd.functional.jacobian(lambda v: layer.condition(context)(v), x)
    blocks = torch.stack([jac[i, :, i, :] for i in range(10)])
    torch.testing.assert_close(torch.linalg.slogdet(blocks)[1], t.log_abs_det_jacobian(x, y))
    torch.testing.assert_close(blocks, torch.linalg.matrix_exp(t.matrix()))
