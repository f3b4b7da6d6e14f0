"""Planar and radial flows: what the generated contract tests do not reach.

The exact inverses at points the flow never produced (Pyro's own raise KeyError there), their
accuracy in float32 / float64, their gradients (implicit for planar, closed form for radial)
against finite differences, the edges w = 0 and y = x0, any leading batch shape with a context,
large inputs, and a jit-traced inverse (fixed iteration count) at new points.

Accuracy is measured against the magnitude of the terms the map adds up (|x| + |y| + the size of
the shift it applies): that is the scale of float rounding in y = x + shift, so "relative" error
means error / that scale. Backward errors y -> x -> y are further divided by max(1, ||J||_2) and
forward errors x -> y -> x by max(1, ||J^-1||_2): the local conditioning no algorithm can beat.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions import ConditionalTransformedDistribution, TransformedDistribution
from pyro.distributions.transforms import Planar as PyroPlanar
from pyro.distributions.transforms import Radial as PyroRadial

import transforms
from flow_helpers import move_parameters as _move, conditioned as _transform
from transforms.planar import (
    ConditionalPlanar,
    ConditionedPlanar,
    Planar,
    conditional_planar,
    solve_planar_equation,
)
from transforms.radial import ConditionalRadial, ConditionedRadial, Radial, conditional_radial

CONTEXT_DIM = 3
# Inverse accuracy asked of planar and radial: float32 to 1e-6, float64 to 1e-10.
INVERSE_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
LOGDET_TOL = 1e-9  # float64 against autograd slogdet; the contract asks 1e-6

FAMILIES = ["planar", "radial"]


def _build(name: str, dim: int, conditional: bool, dtype: torch.dtype = torch.float64):
    layer = transforms.build(name, dim, context_dim=CONTEXT_DIM if conditional else None)
    return layer.to(dtype)


def _shift_size(transform) -> torch.Tensor:
    """|u_hat| for planar (the shift is u_hat tanh(.)), |x0| for radial (y - x0 is rescaled)."""
    if isinstance(transform, ConditionedPlanar):
        return transform._constrained_params()[1].detach().norm(dim=-1)
    return transform._constrained_params()[0].detach().norm(dim=-1)


def _per_point_jacobians(layer, context, x: torch.Tensor) -> torch.Tensor:
    jacobians = []
    for i in range(x.shape[0]):
        transform = _transform(layer, None if context is None else context[i])
        jacobians.append(torch.autograd.functional.jacobian(transform, x[i]))
    return torch.stack(jacobians)


CASES = [
    pytest.param(name, dim, conditional, id=f"{name}-d{dim}-{'cond' if conditional else 'plain'}")
    for name in FAMILIES
    for dim in (1, 2, 5)
    for conditional in (False, True)
]


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name, dim, conditional", CASES)
def test_inverse_is_accurate_far_from_the_last_forward_output(name, dim, conditional, dtype, moved):
    torch.manual_seed(0)
    layer64 = _build(name, dim, conditional)
    if moved:
        _move(layer64, seed=1)
    layer = copy.deepcopy(layer64).to(dtype)
    batch = 256
    context64 = torch.randn(batch, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    context = None if context64 is None else context64.to(dtype)
    transform = _transform(layer, context)
    tol = INVERSE_TOL[dtype]

    with torch.no_grad():
        # Fill the one-entry cache with an unrelated pair: it must not answer below.
        transform(torch.randn(batch, dim, dtype=dtype))
        # Backward error at fresh outputs: y -> x -> y.
        y = 3.0 * torch.randn(batch, dim, dtype=dtype)
        x = transform.inv(y)
        y_again = transform(x.clone())
        # Forward error at fresh inputs: x -> y -> x.
        x_true = 3.0 * torch.randn(batch, dim, dtype=dtype)
        y_true = transform(x_true)
        x_back = transform.inv(y_true.clone())
    assert torch.isfinite(x).all() and torch.isfinite(x_back).all()

    # Even the correctly rounded inverse moves y by up to ||J|| ulps, and the correctly rounded
    # y moves x by up to ||J^-1|| ulps: errors are measured in units of that conditioning.
    stretch = torch.linalg.matrix_norm(_per_point_jacobians(layer64, context64, x.double()), ord=2)
    scale = x.norm(dim=-1) + y.norm(dim=-1) + _shift_size(transform)
    backward_error = (y_again - y).norm(dim=-1).double() / (scale.double() * stretch.clamp(min=1))
    assert backward_error.max() <= tol, f"backward error / cond {backward_error.max():.3g}"

    jacobians = _per_point_jacobians(layer64, context64, x_true.double())
    squeeze = torch.linalg.matrix_norm(torch.linalg.inv(jacobians), ord=2)
    scale = x_true.norm(dim=-1) + y_true.norm(dim=-1) + _shift_size(transform)
    forward_error = (x_back - x_true).norm(dim=-1).double() / (scale.double() * squeeze.clamp(min=1))
    assert forward_error.max() <= tol, f"forward error / cond {forward_error.max():.3g}"


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
@pytest.mark.parametrize("name", FAMILIES)
def test_batch_and_context_shapes(name, conditional):
    torch.manual_seed(2)
    dim = 3
    layer = _build(name, dim, conditional)
    _move(layer, seed=3)
    samples, batch, steps = 2, 3, 4
    x = torch.randn(samples, batch, steps, dim, dtype=torch.float64)
    context = torch.randn(batch, steps, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    transform = _transform(layer, context)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert y.shape == x.shape
    assert log_det.shape == (samples, batch, steps)
    x_back = transform.inv(y.clone())
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    # Every (s, b, t) slice equals the map conditioned on its own context alone.
    for s, b, t in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        single = _transform(layer, None if context is None else context[b, t])
        torch.testing.assert_close(single(x[s, b, t]), y[s, b, t])
        torch.testing.assert_close(single.inv(y[s, b, t].clone()), x[s, b, t])
        torch.testing.assert_close(single.log_abs_det_jacobian(x[s, b, t], y[s, b, t]), log_det[s, b, t])
    # And a distribution over (B, T) with S samples scores fresh points with that shape.
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    if conditional:
        flow_dist = ConditionalTransformedDistribution(base, [layer]).condition(context)
    else:
        flow_dist = TransformedDistribution(base, [layer])
    assert flow_dist.log_prob(torch.randn(samples, batch, steps, dim, dtype=torch.float64)).shape == (
        samples,
        batch,
        steps,
    )


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("name, dim, conditional", CASES)
def test_log_det_matches_autograd_at_batched_and_extreme_points(name, dim, conditional, moved):
    torch.manual_seed(4)
    layer = _build(name, dim, conditional)
    if moved:
        _move(layer, seed=5)
    x = torch.cat(
        [
            2.0 * torch.randn(6, dim, dtype=torch.float64),
            1e4 * torch.randn(2, dim, dtype=torch.float64),
            1e-3 * torch.randn(2, dim, dtype=torch.float64),
        ]
    )
    context = torch.randn(x.shape[0], CONTEXT_DIM, dtype=torch.float64) if conditional else None
    transform = _transform(layer, context)
    if name == "radial" and not conditional:
        x[-1] = layer.x0.detach() + 1e-9  # next to the centre
    log_det = transform.log_abs_det_jacobian(x, transform(x))
    expected = torch.linalg.slogdet(_per_point_jacobians(layer, context, x)).logabsdet
    torch.testing.assert_close(log_det, expected, rtol=LOGDET_TOL, atol=LOGDET_TOL)


def test_planar_with_zero_w_is_an_exact_translation():
    torch.manual_seed(6)
    layer = Planar(3).double()
    with torch.no_grad():
        layer.w.zero_()
        layer.bias.fill_(0.7)
    x = torch.randn(10, 3, dtype=torch.float64)
    y = layer(x)
    tanh_bias = torch.tanh(torch.tensor(0.7, dtype=torch.float64))
    shift = layer.u.detach() * tanh_bias
    # bitwise the layer's one fused multiply-add x + u tanh(b): u_hat is exactly u
    torch.testing.assert_close(y, torch.addcmul(x, layer.u.detach(), tanh_bias), rtol=0, atol=0)
    torch.testing.assert_close(layer.inv(y.clone()), x, rtol=0, atol=1e-15)
    # log|det J| = 0, up to the rounding of log(tanh^2 b + sech^2 b).
    torch.testing.assert_close(
        layer.log_abs_det_jacobian(x, y), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-15
    )

    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    fresh = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    log_prob = TransformedDistribution(base, [layer]).log_prob(fresh)
    torch.testing.assert_close(log_prob, base.log_prob(fresh - shift))
    log_prob.sum().backward()
    for name, parameter in [("fresh", fresh), *layer.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_radial_at_its_centre(dtype):
    torch.manual_seed(7)
    layer = Radial(2).to(dtype)
    _move(layer, seed=8)
    centre = layer.x0.detach().clone()
    # y = x0 maps back to x0 exactly, and x0 is a fixed point.
    assert torch.equal(layer.inv(centre.clone()), centre)
    assert torch.equal(layer(centre.clone()), centre)
    # log|det J| at the centre is D log(1 + beta / alpha).
    alpha = F.softplus(layer.alpha_prime.detach())
    alpha_plus_beta = F.softplus(layer.beta_prime.detach())
    expected = 2 * torch.log(alpha_plus_beta / alpha)
    torch.testing.assert_close(layer.log_abs_det_jacobian(centre, centre), expected.squeeze(-1))
    # log_prob at the centre has finite gradients with respect to the point and every parameter.
    point = centre.clone().requires_grad_()
    base = dist.Normal(torch.zeros(2, dtype=dtype), 1.0).to_event(1)
    TransformedDistribution(base, [layer]).log_prob(point).backward()
    for name, tensor in [("point", point), *layer.named_parameters()]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_radial_inverse_across_radii(dtype):
    """Radii from 1e-8 to 1e4 cross both forms of the quadratic's root (B <= 0 and B > 0)."""
    torch.manual_seed(9)
    layer = Radial(4).to(dtype)
    _move(layer, seed=10)
    direction = F.normalize(torch.randn(200, 4, dtype=dtype), dim=-1)
    radii = torch.logspace(-8, 4, 200, dtype=dtype).unsqueeze(-1)
    y = layer.x0.detach() + radii * direction
    with torch.no_grad():
        x = layer.inv(y)
        scale = x.norm(dim=-1) + y.norm(dim=-1) + layer.x0.norm()
        error = (layer(x.clone()) - y).norm(dim=-1) / scale
    assert error.max() <= INVERSE_TOL[dtype]
    alpha_plus_beta = F.softplus(layer.beta_prime.detach())
    assert (radii < alpha_plus_beta).any() and (radii > alpha_plus_beta).any()


@pytest.mark.parametrize("name", FAMILIES)
def test_log_prob_gradient_through_the_inverse_matches_finite_differences(name):
    torch.manual_seed(11)
    dim = 3
    layer = _build(name, dim, conditional=False)
    _move(layer, seed=12)
    params = tuple(p.detach().clone().requires_grad_() for p in layer._module_params())
    conditioned = ConditionedPlanar if name == "planar" else ConditionedRadial
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    y = (2.0 * torch.randn(5, dim, dtype=torch.float64)).requires_grad_()

    def log_prob(y, *params):
        # A new transform per call: nothing cached from a previous evaluation.
        return TransformedDistribution(base, [conditioned(params)]).log_prob(y)

    assert torch.autograd.gradcheck(log_prob, (y, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_conditional_log_prob_gradient_matches_finite_differences(name):
    torch.manual_seed(13)
    dim = 2
    layer = _build(name, dim, conditional=True)
    _move(layer, seed=14)
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    y = (2.0 * torch.randn(4, dim, dtype=torch.float64)).requires_grad_()
    context = torch.randn(4, CONTEXT_DIM, dtype=torch.float64, requires_grad=True)

    def log_prob(y, context):
        return ConditionalTransformedDistribution(base, [layer]).condition(context).log_prob(y)

    assert torch.autograd.gradcheck(log_prob, (y, context), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_planar_inverse_gradient_near_the_invertibility_limit():
    """w.u_hat close to -1 (softplus(w.u) ~ 1e-3): a slow, flat root; the implicit gradient must
    still be right."""
    w = torch.tensor([0.8, -0.6], dtype=torch.float64)
    u = -8.6 * w  # w.u = -8.6, softplus ~ 1.8e-4
    bias = torch.tensor([0.1], dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64) * 0.5

    def inverse(y, bias, u, w):
        return ConditionedPlanar((bias, u, w)).inv(y)

    inputs = tuple(t.clone().requires_grad_() for t in (y, bias, u, w))
    assert torch.autograd.gradcheck(inverse, inputs, eps=1e-7, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pyro_class, ours", [(PyroPlanar, Planar), (PyroRadial, Radial)])
def test_pyros_own_flow_raises_key_error_where_ours_scores_the_point(pyro_class, ours):
    """pyro-ppl issue 2718: Pyro's Planar / Radial only 'invert' their last output."""
    torch.manual_seed(15)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    theirs = pyro_class(2)
    mine = ours(2)
    mine.load_state_dict(theirs.state_dict())  # same parameter names and meaning
    fresh = torch.randn(5, 2)
    sample = TransformedDistribution(base, [theirs]).sample((5,))
    TransformedDistribution(base, [theirs]).log_prob(sample)  # its own last output: fine
    with pytest.raises(KeyError):
        TransformedDistribution(base, [theirs]).log_prob(fresh)

    # Ours is the same map, and scores any point.
    x = torch.randn(5, 2)
    torch.testing.assert_close(mine(x), theirs(x))
    torch.testing.assert_close(mine.log_abs_det_jacobian(x, mine(x)), theirs.log_abs_det_jacobian(x, theirs(x)))
    log_prob = TransformedDistribution(base, [mine]).log_prob(fresh)
    x_fresh = mine.inv(fresh.clone())
    torch.testing.assert_close(theirs(x_fresh), fresh)
    torch.testing.assert_close(log_prob, base.log_prob(x_fresh) - mine.log_abs_det_jacobian(x_fresh, fresh))


@pytest.mark.parametrize("one_plus_c", [1e-12, 1e-6, 1e-2, 0.5, 1.0, 2.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_solver_residual_is_at_rounding_level(one_plus_c, dtype):
    torch.manual_seed(16)
    target = torch.cat(
        [5.0 * torch.randn(500, dtype=dtype), 1e-4 * torch.randn(50, dtype=dtype), torch.tensor([0.0, 1e4, -1e4], dtype=dtype)]
    )
    scale = torch.full_like(target, one_plus_c)
    root = solve_planar_equation(target, scale)
    c = one_plus_c - 1.0
    # The residual of the float64-evaluated equation at the returned root, against the rounding
    # scale of its terms |a| + |c tanh a| + |s|.
    root64, target64 = root.double(), target.double()
    residual = root64 + c * torch.tanh(root64) - target64
    terms = root64.abs() + abs(c) * torch.tanh(root64).abs() + target64.abs()
    assert (residual.abs() <= 8 * torch.finfo(dtype).eps * terms + torch.finfo(dtype).tiny).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_solver_takes_the_plain_newton_path_or_falls_back(dtype, monkeypatch):
    """Regular roots are solved by the plain Newton steps alone; nearly flat ones (1 + c -> 0)
    make them fail and the safeguarded loop run. Both cases are in the rounding-level test above;
    this checks that each path is really the one taken there."""
    import transforms.planar as planar_module

    calls = []
    plain = planar_module._plain_newton

    def recording(*args):
        root = plain(*args)
        calls.append(root is not None)
        return root

    monkeypatch.setattr(planar_module, "_plain_newton", recording)
    target = 5.0 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for one_plus_c, plain_suffices in ((0.5, True), (2.0, True), (1e3, True), (1e-12, False)):
        solve_planar_equation(target, torch.full_like(target, one_plus_c))
        assert calls[-1] is plain_suffices, one_plus_c


@pytest.mark.parametrize("name", FAMILIES)
def test_traced_inverse_is_exact_at_new_points(name):
    """Under torch.jit.trace the planar solver runs a fixed number of steps; the traced graph
    must invert points other than the ones it was traced at, also for a nearly singular map."""
    torch.manual_seed(17)
    layer = _build(name, 2, conditional=False)
    _move(layer, seed=18)
    params = [p.detach().clone() for p in layer._module_params()]
    conditioned = ConditionedPlanar if name == "planar" else ConditionedRadial
    if name == "planar":
        bias, u, w = params
        u.copy_(-12.0 * w / w.norm() ** 2)  # w.u = -12: 1 + w.u_hat = softplus(-12) ~ 6e-6

    def inverse(y, *params):
        return conditioned(tuple(params)).inv(y)

    traced = torch.jit.trace(inverse, (torch.randn(7, 2, dtype=torch.float64), *params))
    y = 3.0 * torch.randn(7, 2, dtype=torch.float64)
    x = traced(y, *params)
    torch.testing.assert_close(x, inverse(y, *params), rtol=1e-12, atol=1e-12)
    transform = conditioned(tuple(params))
    stretch = torch.linalg.matrix_norm(_per_point_jacobians(transform, None, x), ord=2)
    scale = x.norm(dim=-1) + y.norm(dim=-1) + _shift_size(transform)
    backward_error = (transform(x.clone()) - y).norm(dim=-1) / (scale * stretch.clamp(min=1))
    assert backward_error.max() <= INVERSE_TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", FAMILIES)
def test_large_inputs_float32_agrees_with_float64(name, dtype):
    torch.manual_seed(19)
    layer64 = _build(name, 3, conditional=False)
    _move(layer64, seed=20)
    layer = copy.deepcopy(layer64).to(dtype)
    x = (1e4 * torch.randn(16, 3, dtype=torch.float64)).to(dtype).requires_grad_()
    y = layer(x)
    log_det = layer.log_abs_det_jacobian(x, y)
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    expected = layer64.log_abs_det_jacobian(x.detach().double(), layer64(x.detach().double()))
    # The log-det tends to 0 as |x| grows; its absolute error stays at float rounding.
    torch.testing.assert_close(log_det.detach().double(), expected, rtol=0, atol=10 * torch.finfo(dtype).eps)
    with torch.no_grad():
        y_fresh = 1e4 * torch.randn(16, 3, dtype=dtype)
        x_fresh = layer.inv(y_fresh)
        error = (layer(x_fresh.clone()) - y_fresh).norm(dim=-1) / (y_fresh.norm(dim=-1) + x_fresh.norm(dim=-1))
    assert error.max() <= INVERSE_TOL[dtype]


@pytest.mark.parametrize("name", FAMILIES)
def test_composed_flow_scores_fresh_points(name):
    torch.manual_seed(21)
    stack = transforms.flow(name, 2, 8).double()
    _move(stack, seed=22)
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    y = 2.0 * torch.randn(6, 2, dtype=torch.float64)
    log_prob = TransformedDistribution(base, [stack]).log_prob(y)
    x = stack.inv(y.clone())
    torch.testing.assert_close(stack(x.clone()), y, rtol=1e-10, atol=1e-10)
    jacobians = torch.stack([torch.autograd.functional.jacobian(stack, point) for point in x])
    expected = base.log_prob(x) - torch.linalg.slogdet(jacobians).logabsdet
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


def test_invertibility_constraints_hold_for_any_parameters():
    torch.manual_seed(23)
    for _ in range(20):
        planar = Planar(4).double()
        radial = Radial(4).double()
        _move(planar, seed=int(torch.randint(1 << 30, ())), scale=5.0)
        _move(radial, seed=int(torch.randint(1 << 30, ())), scale=5.0)
        _, u_hat, w, one_plus_c = planar._constrained_params()
        assert (w * u_hat).sum() >= -1 - 1e-12
        torch.testing.assert_close((w * u_hat).sum(-1, keepdim=True), one_plus_c - 1)
        _, alpha, alpha_plus_beta = radial._constrained_params()
        assert alpha > 0 and alpha_plus_beta > 0


@pytest.mark.parametrize("layer", [Planar(3), Radial(3)], ids=["planar", "radial"])
def test_wrong_vector_size_is_a_value_error(layer):
    with pytest.raises(ValueError, match="size 3"):
        layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match="size 3"):
        layer.inv(torch.randn(4, 2))


@pytest.mark.parametrize("builder", [conditional_planar, conditional_radial])
def test_builders_refuse_bad_dims_and_make_the_right_types(builder):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError):
            builder(bad, 3)
        with pytest.raises(ValueError):
            builder(3, bad)
    layer = builder(3, 4, hidden_dims=[7])
    assert isinstance(layer, (ConditionalPlanar, ConditionalRadial))
    assert isinstance(layer.condition(torch.randn(4)), (ConditionedPlanar, ConditionedRadial))
    assert transforms.info("planar").exact_inverse and transforms.info("radial").exact_inverse
    assert transforms.info("planar").conditional and transforms.info("radial").conditional


def test_planar_log_det_keeps_float32_precision_where_tanh_saturates():
    """With a large 1 + w.u_hat the sech^2 term still matters where tanh has saturated; the
    log-det must not round it away (e.g. by forming 1 - tanh^2 in float32)."""
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    u = torch.tensor([1e4, 0.0], dtype=torch.float64)  # 1 + w.u_hat = softplus(1e4) = 1e4
    bias = torch.zeros(1, dtype=torch.float64)
    x = torch.stack([torch.linspace(-12.0, 12.0, 97, dtype=torch.float64), torch.zeros(97, dtype=torch.float64)], -1)
    expected = ConditionedPlanar((bias, u, w)).log_abs_det_jacobian(x, None)
    reference = torch.log1p((1e4 - 1.0) / torch.cosh(x[:, 0]) ** 2)
    torch.testing.assert_close(expected, reference, rtol=1e-12, atol=1e-15)
    ours = ConditionedPlanar((bias.float(), u.float(), w.float())).log_abs_det_jacobian(x.float(), None)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-7)
