"""NAF, BNAF and the sum-of-squares polynomial flow: what the registry's contract tests do not
cover. Their numerical inverses carry the implicit-function gradients (against the inverse of the
forward Jacobian, and against finite differences in a parameter), the traced solver agrees with
the eager one, and a density fitted by ``log_prob`` at data points improves on fresh points,
where Pyro's layers of the same names cannot score a data point at all."""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import pyro.distributions.transforms as pyro_transforms
import pytest
import torch
from pyro.nn import AutoRegressiveNN

import transforms
from flow_helpers import move_parameters
from transforms.block_autoregressive import BlockAutoregressive

NUMERICAL = ["naf", "bnaf", "polynomial"]
DIM = 3


def _moved(name: str, seed: int = 0):
    torch.manual_seed(seed)
    layer = transforms.build(name, DIM).double()
    move_parameters(layer, seed=seed + 1)
    return layer


@pytest.mark.parametrize("name", NUMERICAL + ["spline_autoregressive"])
def test_inverse_jacobian_is_the_inverse_of_the_forward_jacobian(name):
    layer = _moved(name)
    y = torch.randn(DIM, dtype=torch.float64)
    inverse_jacobian = torch.autograd.functional.jacobian(lambda v: layer.inv(v.clone()), y)
    x = layer.inv(y.clone()).detach()
    forward_jacobian = torch.autograd.functional.jacobian(lambda v: layer(v.clone()), x)
    torch.testing.assert_close(inverse_jacobian @ forward_jacobian, torch.eye(DIM, dtype=torch.float64))


@pytest.mark.parametrize("name", NUMERICAL)
def test_inverse_gradient_in_a_parameter_matches_finite_differences(name):
    layer = _moved(name, seed=3)
    y = torch.randn(4, DIM, dtype=torch.float64)
    parameter = next(p for p in layer.parameters() if p.dim() >= 1 and p.numel() > 1)
    direction = torch.randn_like(parameter)

    def inverse_sum() -> torch.Tensor:
        return layer.inv(y.clone()).sum()

    (gradient,) = torch.autograd.grad(inverse_sum(), parameter)
    step = 1e-6
    with torch.no_grad():
        parameter.add_(step * direction)
        plus = inverse_sum()
        parameter.sub_(2 * step * direction)
        minus = inverse_sum()
        parameter.add_(step * direction)
    finite_difference = (plus - minus) / (2 * step)
    assert (gradient * direction).sum().item() == pytest.approx(finite_difference.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", NUMERICAL)
def test_traced_inverse_agrees_with_the_eager_one(name):
    layer = transforms.build(name, 2).requires_grad_(False)  # traced as constants
    y = torch.randn(5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes and Python values
        traced = torch.jit.trace(lambda v: layer.inv(v.clone()), (y,), check_trace=False)
    fresh = 2.0 * torch.randn(5, 2)
    torch.testing.assert_close(traced(fresh), layer.inv(fresh.clone()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NUMERICAL)
def test_traced_log_prob_has_the_eager_gradients(name):
    """torch.jit.trace records no grad mode: a traced solve must not be differentiated (it gave
    NaN gradients for the polynomial flow and wrong ones for BNAF before the solvers read
    detached parameters)."""
    torch.manual_seed(5)
    layer = transforms.build(name, 2)
    parameters = list(layer.parameters())
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def log_prob(y: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return dist.TransformedDistribution(base, [layer]).log_prob(y.clone()).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(log_prob, (torch.randn(5, 2), *parameters), check_trace=False)
    fresh = torch.randn(5, 2)
    traced_gradients = torch.autograd.grad(traced(fresh, *parameters), parameters)
    eager_gradients = torch.autograd.grad(log_prob(fresh), parameters)
    for traced_gradient, eager_gradient in zip(traced_gradients, eager_gradients):
        torch.testing.assert_close(traced_gradient, eager_gradient, atol=1e-5, rtol=1e-4)


def _banana(count: int, generator: torch.Generator) -> torch.Tensor:
    """A curved 2-D density: x1 ~ N(0, 1), x2 | x1 ~ N(x1^2 / 2, 0.5^2)."""
    first = torch.randn(count, generator=generator)
    second = 0.5 * first.square() + 0.5 * torch.randn(count, generator=generator)
    return torch.stack([first, second], dim=-1)


FIT_STEPS = 25


@pytest.mark.parametrize("name", NUMERICAL)
def test_fitting_a_density_by_log_prob_lowers_the_nll_of_fresh_points(name):
    generator = torch.Generator().manual_seed(0)
    train, fresh = _banana(256, generator), _banana(256, generator)
    torch.manual_seed(1)
    stack = transforms.flow(name, 2, 2)
    density = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [stack])
    optimiser = torch.optim.Adam(stack.parameters(), lr=1e-2)
    with torch.no_grad():
        before = -density.log_prob(fresh).mean().item()
    for _ in range(FIT_STEPS):
        optimiser.zero_grad()
        # data points, each a fresh inverse (a clone: Pyro's cache would hand back the last
        # step's inverse of the very same tensor, with its freed graph)
        loss = -density.log_prob(train.clone()).mean()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = -density.log_prob(fresh).mean().item()
    assert after < before - 0.05, f"{name}: fresh NLL {before:.3f} -> {after:.3f}"


def _pyro_layers():
    arn = AutoRegressiveNN(2, [8], param_dims=[16] * 3)
    polynomial_arn = AutoRegressiveNN(2, [8], param_dims=[(4 + 1) * 3])
    return {
        "naf": (pyro_transforms.NeuralAutoregressive(arn, hidden_units=16), NotImplementedError),
        "bnaf": (pyro_transforms.BlockAutoregressive(2), KeyError),
        "polynomial": (
            pyro_transforms.Polynomial(polynomial_arn, input_dim=2, count_degree=4, count_sum=3),
            KeyError,
        ),
    }


@pytest.mark.parametrize("name", NUMERICAL)
def test_pyros_layer_cannot_score_a_data_point_ours_can(name):
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    data = torch.randn(4, 2)
    pyro_layer, error = _pyro_layers()[name]
    with pytest.raises(error):
        dist.TransformedDistribution(base, [pyro_layer]).log_prob(data)
    ours = dist.TransformedDistribution(base, [transforms.build(name, 2)]).log_prob(data)
    assert torch.isfinite(ours).all()


def test_bnaf_refuses_a_residual_that_leaves_the_map_bounded():
    with pytest.raises(ValueError, match="bounded box"):
        BlockAutoregressive(2, residual=None)
    with pytest.raises(ValueError, match="hidden_factors"):
        transforms.build("bnaf", 2, hidden_factors=(8, 0))


def test_registry_describes_the_numerical_inverses():
    for name in NUMERICAL:
        entry = transforms.info(name)
        assert entry.exact_inverse and entry.inverse.startswith("numerical")
        assert "ulps" in entry.inverse


@pytest.mark.parametrize("residual", ["gated", "normal"])
def test_bnaf_solver_steps_match_the_whole_network(residual):
    # the inverse's per-coordinate solver reuses the known coordinates' hidden units; its value
    # and slope must be the full map's y_i and dy_i/dx_i at the same point
    torch.manual_seed(0)
    layer = BlockAutoregressive(4, hidden_factors=(3, 5), residual=residual).double()
    move_parameters(layer, seed=2)
    x = torch.randn(6, 4, dtype=torch.float64)
    weights = layer._weights()
    y, log_slope = layer._map(x, weights)
    for index in range(4):
        value, slope = layer._block_solver(x[..., :index], index, weights)(x[..., index])
        torch.testing.assert_close(value, y[..., index], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(slope.log(), log_slope[..., index], rtol=1e-12, atol=1e-12)
        # and it broadcasts over a leading dim of t, as the traced schedule evaluates it
        many = torch.stack([x[..., index], x[..., index] + 0.5])
        stacked = layer._block_solver(x[..., :index], index, weights)(many)[0]
        assert stacked.shape == (2, 6)
        torch.testing.assert_close(stacked[0], y[..., index], rtol=1e-12, atol=1e-12)
