"""The continuous normalizing flow: what the generated contract tests do not cover (the hypernetwork
and softplus dynamics, Hutchinson's estimator, analytic solutions, regularisers, NFE, tracing,
the adjoint, conditioning, the solver settings)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import transforms
from transforms.cnf import (
    CNF,
    ConditionalCNF,
    ConditionedCNF,
    regulariser,
    solver_options,
    total_nfe,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
LOGDET_TOL = 1e-6


def autograd_logdet(transform, x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(transform, row)).logabsdet for row in x]
    )


def moved(layer, scale: float = 0.5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


VARIANTS = [
    {"dynamics": "mlp", "activation": "tanh"},
    {"dynamics": "mlp", "activation": "softplus"},
    {"dynamics": "hyper", "hyper_width": 8},
]


# ELU is only once differentiable at 0, which makes tight adaptive solves slow: one dimension.
CASES = [(v, d) for v in VARIANTS for d in (1, 2, 3)] + [
    pytest.param({"dynamics": "mlp", "activation": "elu"}, 2, marks=pytest.mark.slow)
]


@pytest.mark.parametrize("variant, dim", CASES, ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else str(v))
def test_logdet_and_inverse_of_every_dynamics(variant, dim):
    torch.manual_seed(0)
    layer = moved(CNF(dim, hidden_dims=(8, 8), **variant, **TIGHT).double())
    x = 1.5 * torch.randn(3, dim, dtype=torch.float64)
    y = layer(x)
    expected = autograd_logdet(layer, x)
    torch.testing.assert_close(layer.log_abs_det_jacobian(x, y), expected, atol=LOGDET_TOL, rtol=0)
    torch.testing.assert_close(layer.inv(y.clone()), x, atol=1e-8, rtol=0)


@pytest.mark.parametrize("dynamics", ["mlp", "hyper"])
def test_conditional_logdet_inverse_and_context(dynamics):
    torch.manual_seed(1)
    layer = moved(ConditionalCNF(2, 3, hidden_dims=(8, 8), dynamics=dynamics, **TIGHT).double())
    context = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    transform = layer.condition(context)
    y = transform(x)
    for i in range(4):
        per_sample = layer.condition(context[i])
        expected = autograd_logdet(per_sample, x[i : i + 1])[0]
        assert transform.log_abs_det_jacobian(x, y)[i].item() == pytest.approx(expected.item(), abs=LOGDET_TOL)
    torch.testing.assert_close(transform.inv(y.clone()), x, atol=1e-8, rtol=0)
    # The context matters, and broadcasts over extra leading dims of the input.
    assert not torch.allclose(layer.condition(context + 1.0)(x), y)
    stacked = torch.randn(5, 4, 2, dtype=torch.float64)
    assert layer.condition(context)(stacked).shape == (5, 4, 2)
    # Gradients reach the context (an amortised guide's encoder trains through it).
    context.requires_grad_(True)
    layer.condition(context)(x).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_logdet_is_recomputed_for_a_point_that_is_not_the_last():
    torch.manual_seed(2)
    layer = moved(CNF(2, hidden_dims=(8, 8), **TIGHT).double())
    first, second = torch.randn(2, 3, 2, dtype=torch.float64)
    y_first = layer(first)
    expected_first = layer.log_abs_det_jacobian(first, y_first)
    layer(second)  # the most recent solve is now from another point
    torch.testing.assert_close(layer.log_abs_det_jacobian(first, y_first), expected_first)
    torch.testing.assert_close(
        layer.log_abs_det_jacobian(first.clone(), y_first), autograd_logdet(layer, first), atol=LOGDET_TOL, rtol=0
    )


def constant_velocity(layer: CNF, velocity: torch.Tensor, acceleration: torch.Tensor) -> CNF:
    """Zero the output layer's weights: f(z, t) = b + t a, whose flow is known in closed form."""
    output = layer.dynamics.layers[-1]
    with torch.no_grad():
        output.weight.zero_()
        output.bias.copy_(velocity)
        layer.dynamics.time_weights[-1].copy_(acceleration)
    return layer


def test_forward_integrates_zero_to_t_and_inverse_back():
    time_length = 1.7
    velocity = torch.tensor([0.3, -1.2], dtype=torch.float64)
    acceleration = torch.tensor([2.0, 0.5], dtype=torch.float64)
    layer = constant_velocity(
        CNF(2, hidden_dims=(8,), time_length=time_length, kinetic_weight=1.0, **TIGHT).double(),
        velocity,
        acceleration,
    )
    x = torch.randn(5, 2, dtype=torch.float64)
    shift = time_length * velocity + time_length**2 / 2 * acceleration
    y = layer(x)
    torch.testing.assert_close(y, x + shift)
    torch.testing.assert_close(layer.log_abs_det_jacobian(x, y), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(layer.inv(y.clone() + 1.0), x + 1.0)
    # Kinetic energy ∫|b + t a|² dt over [0, T], the same for the path run backwards.
    kinetic = (
        time_length * velocity.square().sum()
        + time_length**2 * (velocity * acceleration).sum()
        + time_length**3 / 3 * acceleration.square().sum()
    )
    with torch.enable_grad():
        layer(x.clone())
        torch.testing.assert_close(layer.regularisation, kinetic.expand(5))
        layer.inv(y.clone())
        torch.testing.assert_close(layer.regularisation, kinetic.expand(5))


def test_jacobian_regulariser_matches_autograd_over_a_short_time():
    """Over a short time the state barely moves: ∫|∂f/∂z|²_F dt ≈ T |∂f/∂z(x, 0)|²_F."""
    torch.manual_seed(3)
    time_length = 1e-4
    layer = moved(CNF(2, hidden_dims=(8, 8), time_length=time_length, jacobian_weight=1.0, **TIGHT).double())
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.enable_grad():
        layer(x)
    zero = torch.zeros((), dtype=torch.float64)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda z: layer.dynamics(zero, z[None])[0][0], x[i])
        expected = time_length * jacobian.square().sum()
        assert layer.regularisation[i].item() == pytest.approx(expected.item(), rel=1e-2)
    # Not integrated (and not reported) when no gradient is being taken.
    with torch.no_grad():
        layer(x.clone())
    assert layer.regularisation is None and regulariser(layer) == 0.0


def test_hutchinson_is_unbiased_and_stochastic():
    torch.manual_seed(4)
    accurate = {"rtol": 1e-8, "atol": 1e-8}
    exact = moved(CNF(3, hidden_dims=(8, 8), trace_estimator="exact", **accurate).double(), scale=0.3)
    stochastic = CNF(3, hidden_dims=(8, 8), trace_estimator="hutchinson", **accurate).double()
    stochastic.load_state_dict(exact.state_dict())
    x = torch.randn(1, 3, dtype=torch.float64)
    expected = exact.log_abs_det_jacobian(x, exact(x))
    # 400 copies of the point in one solve: each row draws its own probe.
    draws = stochastic.log_abs_det_jacobian(x.expand(400, 3).clone(), None)
    assert draws.std() > 1e-3  # a stochastic estimate, not the exact trace
    standard_error = draws.std() / math.sqrt(draws.numel())
    assert (draws.mean() - expected).abs().item() < 4 * standard_error.item()
    # The map itself is the same ODE solution whichever estimator is used.
    torch.testing.assert_close(stochastic(x.clone()), exact(x.clone()), atol=1e-7, rtol=0)


def test_auto_trace_estimator_switches_with_dimension():
    assert CNF(4)._exact_trace
    assert not CNF(40, hidden_dims=(8,))._exact_trace


def test_nfe_is_counted_and_fixed_steps_cost_what_they_should():
    torch.manual_seed(5)
    layer = CNF(2, hidden_dims=(8, 8))
    x = torch.randn(16, 2)
    with solver_options(layer, method="rk4", step_size=0.25):
        layer(x)
        # torchdiffeq's rk4 makes 4 evaluations per step; 4 steps over [0, 1].
        assert layer.nfe == 16 and total_nfe(layer) == 16
    with solver_options(layer, rtol=1e-3, atol=1e-3):
        layer(x.clone())
        loose = layer.nfe
    with solver_options(layer, rtol=1e-8, atol=1e-8):
        layer(x.clone())
        tight = layer.nfe
    assert 0 < loose < tight
    assert layer.method == "dopri5" and layer.step_size is None  # restored
    with pytest.raises(ValueError, match="colour"):
        with solver_options(layer, colour="red"):
            pass


def test_tiny_tolerances_in_float32_do_not_stall():
    layer = moved(CNF(2, hidden_dims=(8, 8), **TIGHT))
    x = 10 * torch.randn(8, 2)
    torch.testing.assert_close(layer.inv(layer(x).clone()), x, atol=1e-4, rtol=1e-4)


def test_traced_solve_uses_fixed_steps_and_depends_on_the_input():
    torch.manual_seed(6)
    layer = CNF(2, hidden_dims=(8, 8), trace_steps=4).double()
    x = torch.randn(5, 2, dtype=torch.float64)

    def log_det(points):
        return layer.log_abs_det_jacobian(points, layer(points))

    layer.requires_grad_(False)  # parameters that require grad cannot be trace constants
    with torch.no_grad():
        traced = torch.jit.trace(log_det, (x,), check_trace=False)
        assert layer.nfe == 16  # 4 RK4 steps of 4 evaluations
        other = torch.randn(5, 2, dtype=torch.float64)
        with solver_options(layer, **TIGHT):
            accurate = log_det(other.clone())
        # RK4 with 4 steps is close to the accurate solve on a smooth flow, at a new input.
        torch.testing.assert_close(traced(other), accurate, atol=1e-4, rtol=0)
        assert not torch.allclose(traced(other), traced(x))


def test_adjoint_gradients_match_direct_backpropagation():
    torch.manual_seed(7)
    direct = moved(CNF(2, hidden_dims=(8, 8), **TIGHT).double(), scale=0.3)
    adjoint = CNF(2, hidden_dims=(8, 8), adjoint=True, **TIGHT).double()
    adjoint.load_state_dict(direct.state_dict())
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    y = torch.randn(6, 2, dtype=torch.float64)
    grads = []
    for layer in (direct, adjoint):
        loss = -dist.TransformedDistribution(base, [layer]).log_prob(y.clone()).sum()
        grads.append(torch.autograd.grad(loss, list(layer.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_dimensional_density_integrates_to_one():
    torch.manual_seed(8)
    layer = moved(transforms.build("cnf", 1, hidden_dims=(8, 8), rtol=1e-8, atol=1e-8).double())
    density = dist.TransformedDistribution(dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1), [layer])
    grid = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    with torch.no_grad():
        mass = torch.trapezoid(density.log_prob(grid[:, None]).exp(), grid)
    assert mass.item() == pytest.approx(1.0, abs=1e-3)


def test_registry_entry_and_flow_composition():
    entry = transforms.info("cnf")
    assert entry.exact_inverse and entry.conditional and entry.min_input_dim == 1
    stack = transforms.flow("cnf", 2, 2, hidden_dims=(8,))
    assert sum(isinstance(part, CNF) for part in stack) == 2
    conditional = transforms.flow("cnf", 2, 2, context_dim=3, hidden_dims=(8,))
    transform = conditional.condition(torch.randn(3))
    assert transform(torch.randn(4, 2)).shape == (4, 2)
    assert isinstance(ConditionalCNF(2, 3).condition(torch.randn(3)), ConditionedCNF)
    assert "TimeMLP" in repr(CNF(2)) and "dopri5" in repr(CNF(2))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"activation": "relu"}, "relu"),
        ({"dynamics": "resnet"}, "resnet"),
        ({"trace_estimator": "skilling"}, "skilling"),
        ({"time_length": -1.0}, "-1.0"),
        ({"kinetic_weight": -0.1}, "-0.1"),
        ({"hidden_dims": (0,)}, "(0,)"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(")", r"\)")):
        CNF(2, **kwargs)
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(")", r"\)")):
        ConditionalCNF(2, 3, **kwargs)


@pytest.mark.parametrize("dim", [2, 5])
def test_default_tolerance_round_trips_float32_to_1e_4(dim):
    """At 1e-5 (the earlier default) float32 round trips were off by 2e-4..2.5e-3."""
    torch.manual_seed(dim)
    layer = transforms.build("cnf", dim)
    assert layer.rtol == layer.atol == transforms.cnf.DEFAULT_TOLERANCE
    x = 1.5 * torch.randn(64, dim)
    with torch.no_grad():
        x_back = layer.inv(layer(x).clone())
    assert (x_back - x).abs().max().item() < 1e-4
