"""IAF, MAF (on MADE), RealNVP and NICE couplings: what the generated contract tests cannot know.

Log-dets against the autograd Jacobian for every option (gated, unbounded) and on (S, B, T, D)
batches with (B, T, C) contexts; exact inverses at fresh points; the number of network calls of
each direction (MAF's density is one call, IAF's inverse D calls); the gated update against its
formula and both updates against Pyro's AffineAutoregressive / AffineCoupling; the MADE's identity
order and the registry's reversals making a stack dense; jit tracing; large inputs.
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import ConditionalTransformedDistribution, TransformedDistribution
from pyro.distributions.transforms import AffineAutoregressive as PyroAffineAutoregressive
from pyro.distributions.transforms import AffineCoupling as PyroAffineCoupling

import transforms
from flow_helpers import move_parameters as _move, conditioned as _transform
from transforms.autoregressive import SIGMOID_BIAS, soft_bound
from transforms.coupling import AdditiveCoupling, AffineCoupling

CONTEXT_DIM = 3
LOGDET_TOL = 1e-9  # float64, a handful of operations: far tighter than the contract's 1e-6
ROUNDTRIP_TOL = 1e-10

# (name, build kwargs, smallest input dim)
VARIANTS = [
    ("iaf", {}, 1),
    ("iaf", {"gated": True}, 1),
    ("iaf", {"log_scale_bound": None}, 1),
    ("maf", {}, 1),
    ("maf", {"gated": True}, 1),
    ("maf", {"hidden_dims": [12, 12]}, 1),
    ("realnvp", {}, 2),
    ("realnvp", {"log_scale_bound": None}, 2),
    ("realnvp", {"split_dim": 1}, 2),
    ("nice", {}, 2),
]
CASES = [
    (name, kwargs, dim, conditional)
    for (name, kwargs, min_dim), dim, conditional in itertools.product(VARIANTS, (1, 2, 5), (False, True))
    if dim >= min_dim
]


def _id(case) -> str:
    name, kwargs, dim, conditional = case
    options = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}[{options}]-d{dim}-{'cond' if conditional else 'plain'}"


def _build(name, kwargs, dim, conditional):
    layer = transforms.build(name, dim, context_dim=CONTEXT_DIM if conditional else None, **kwargs)
    return layer.double()


def _autograd_logdet(transform, x_vector: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(transform, x_vector)
    return torch.linalg.slogdet(jacobian).logabsdet


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_logdet_matches_autograd_on_a_four_dim_batch(case, moved):
    name, kwargs, dim, conditional = case
    torch.manual_seed(0)
    layer = _build(*case)
    if moved:
        _move(layer, seed=1)
    x = 1.5 * torch.randn(2, 3, 4, dim, dtype=torch.float64)  # (S, B, T, D)
    context = torch.randn(3, 4, CONTEXT_DIM, dtype=torch.float64) if conditional else None  # (B, T, C)
    transform = _transform(layer, context)
    y = transform(x)
    assert y.shape == x.shape
    log_det = transform.log_abs_det_jacobian(x, y)
    assert log_det.shape == x.shape[:-1]
    # the log-det must not lean on the cache: a fresh copy of x gives the same value
    torch.testing.assert_close(transform.log_abs_det_jacobian(x.clone(), y.clone()), log_det)
    for s, b, t in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        vector_map = _transform(layer, None if context is None else context[b, t])
        expected = _autograd_logdet(vector_map, x[s, b, t])
        assert torch.isfinite(expected)
        assert log_det[s, b, t].item() == pytest.approx(expected.item(), abs=LOGDET_TOL, rel=LOGDET_TOL)
        # the batched map is the per-vector map, vector by vector
        torch.testing.assert_close(y[s, b, t], vector_map(x[s, b, t].clone()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_exact_inverse_at_fresh_points(case):
    name, kwargs, dim, conditional = case
    torch.manual_seed(2)
    layer = _build(*case)
    if kwargs.get("log_scale_bound", 0.0) is not None:
        # unbounded log-scales at moved parameters overflow exp() along the sequential pass:
        # the reason for the default bound
        _move(layer, seed=3)
    context = torch.randn(3, 4, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    transform = _transform(layer, context)
    y_fresh = 2.0 * torch.randn(2, 3, 4, dim, dtype=torch.float64)
    x = transform.inv(y_fresh)
    torch.testing.assert_close(transform(x.clone()), y_fresh, atol=ROUNDTRIP_TOL, rtol=ROUNDTRIP_TOL)
    x_fresh = 2.0 * torch.randn(2, 3, 4, dim, dtype=torch.float64)
    y = transform(x_fresh)
    torch.testing.assert_close(transform.inv(y.clone()), x_fresh, atol=ROUNDTRIP_TOL, rtol=ROUNDTRIP_TOL)
    # log-det from the inverse's side agrees with the forward's
    torch.testing.assert_close(
        transform.log_abs_det_jacobian(x, y_fresh),
        transform.log_abs_det_jacobian(x.clone(), transform(x.clone())),
    )


def test_context_with_more_batch_dims_than_the_input_broadcasts():
    torch.manual_seed(4)
    for name in ("iaf", "maf", "realnvp", "nice"):
        layer = transforms.build(name, 3, context_dim=CONTEXT_DIM).double()
        contexts = torch.randn(5, CONTEXT_DIM, dtype=torch.float64)
        x = torch.randn(3, dtype=torch.float64)  # one point scored under five contexts
        transform = layer.condition(contexts)
        y = transform(x)
        assert y.shape == (5, 3)
        assert transform.log_abs_det_jacobian(x, y).shape == (5,)
        for i in range(5):
            torch.testing.assert_close(y[i], layer.condition(contexts[i])(x.clone()))
        torch.testing.assert_close(transform.inv(y.clone()), x.expand(5, 3))


class _CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


@pytest.mark.parametrize("dim", [1, 4])
def test_network_calls_per_direction(dim):
    torch.manual_seed(5)
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    fresh = torch.randn(16, dim, dtype=torch.float64)

    maf = transforms.build("maf", dim).double()
    counter = _CallCounter(maf.arn)
    TransformedDistribution(base, [maf]).log_prob(fresh)
    assert counter.calls == 1, "MAF's density at a fresh point is one network call"
    counter.calls = 0
    TransformedDistribution(base, [maf]).sample((16,))
    assert counter.calls == dim, "MAF samples by a sequential pass of D calls"

    iaf = transforms.build("iaf", dim).double()
    counter = _CallCounter(iaf.arn)
    flow_dist = TransformedDistribution(base, [iaf])
    sample = flow_dist.rsample((16,))
    flow_dist.log_prob(sample)
    assert counter.calls == 1, "IAF samples and scores its own sample with one call"
    counter.calls = 0
    flow_dist.log_prob(fresh)
    assert counter.calls == dim, "IAF's density at a fresh point is a sequential pass of D calls"


@pytest.mark.parametrize("name", ["iaf", "maf"])
def test_gated_update_is_kingma_eq_14(name):
    torch.manual_seed(6)
    layer = transforms.build(name, 4, gated=True).double()
    _move(layer, seed=7)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = layer(x)
    # the network reads the input (IAF) or the output (MAF)
    mean, raw = layer.arn(x if name == "iaf" else y)
    gate = torch.sigmoid(soft_bound(raw + SIGMOID_BIAS, layer.gate_logit_bound))
    torch.testing.assert_close(y, gate * x + (1 - gate) * mean)
    torch.testing.assert_close(layer.log_abs_det_jacobian(x.clone(), y.clone()), gate.log().sum(-1))


@pytest.mark.parametrize("stable", [False, True], ids=["affine", "gated"])
def test_iaf_is_pyros_affine_autoregressive_without_the_bounds(stable):
    torch.manual_seed(8)
    ours = transforms.build("iaf", 5, gated=stable, log_scale_bound=None, gate_logit_bound=None)
    pyros = PyroAffineAutoregressive(ours.arn, stable=stable)
    x = torch.randn(64, 5)
    _, raw = ours.arn(x)
    # Pyro clamps the log-scale to [-5, 3]; compare where its clamp is inactive
    assert raw.min() > -5 and raw.max() < 3
    y = pyros(x)
    torch.testing.assert_close(ours(x), y)
    torch.testing.assert_close(ours.log_abs_det_jacobian(x, ours(x)), pyros.log_abs_det_jacobian(x, y))


def test_realnvp_is_pyros_affine_coupling_without_the_bound():
    torch.manual_seed(9)
    ours = transforms.build("realnvp", 5, log_scale_bound=None)
    assert isinstance(ours, AffineCoupling)
    pyros = PyroAffineCoupling(ours.split_dim, ours.nn)
    x = torch.randn(64, 5)
    _, raw = ours.nn(x[:, : ours.split_dim])
    assert raw.min() > -5 and raw.max() < 3  # Pyro's clamp inactive
    y = pyros(x)
    torch.testing.assert_close(ours(x), y)
    torch.testing.assert_close(ours.log_abs_det_jacobian(x, ours(x)), pyros.log_abs_det_jacobian(x, y))


def test_soft_bound_keeps_values_and_slope_near_zero_and_saturates():
    v = torch.linspace(-0.1, 0.1, 11, dtype=torch.float64)
    torch.testing.assert_close(soft_bound(v, 3.0), v, atol=1e-4, rtol=0)
    assert soft_bound(torch.tensor(1e6), 3.0).item() == pytest.approx(3.0)
    assert soft_bound(torch.tensor(-1e6), 3.0).item() == pytest.approx(-3.0)
    assert soft_bound(v, None) is v


@pytest.mark.parametrize("bound", [3.0, None])
def test_soft_bound_of_a_network_slice_is_contiguous_with_its_gradient(bound):
    # the log-scale is a column slice of the network's output (MADE's (..., 2, D) view): the
    # result is a contiguous copy (exp runs slower on the strided view), the same values, and the
    # gradient reaches only the sliced half of the output
    output = torch.randn(7, 2, 5, dtype=torch.float64, requires_grad=True)
    raw = output[:, 1, :]
    assert not raw.is_contiguous()
    bounded = soft_bound(raw, bound)
    assert bounded.is_contiguous()
    expected = raw if bound is None else bound * torch.tanh(raw / bound)
    torch.testing.assert_close(bounded, expected, atol=1e-14, rtol=0)
    (gradient,) = torch.autograd.grad(bounded.exp().sum(), output)
    (expected_gradient,) = torch.autograd.grad(expected.exp().sum(), output)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-13, rtol=0)
    assert torch.equal(gradient[:, 0, :], torch.zeros(7, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_soft_bound_is_b_tanh_v_over_b_to_rounding(dtype, tol):
    # computed through a sigmoid (cheaper on CPU): the function and its slope are tanh's
    v = torch.cat([torch.linspace(-40.0, 40.0, 2001), torch.logspace(-30, 1, 50)]).to(dtype)
    v.requires_grad_(True)
    bound = 3.0
    ours = soft_bound(v, bound)
    reference = bound * torch.tanh(v / bound)
    torch.testing.assert_close(ours, reference, atol=tol * bound, rtol=0)
    (slope,) = torch.autograd.grad(ours.sum(), v)
    (reference_slope,) = torch.autograd.grad(reference.sum(), v)
    torch.testing.assert_close(slope, reference_slope, atol=4 * tol, rtol=0)


def test_soft_bound_without_autograd_is_the_same_values_and_leaves_its_input():
    # without a graph the whole chain runs in place on one temporary: same values, bit for bit,
    # and the (network's) input untouched
    output = torch.randn(6, 2, 4)
    raw = output[:, 1, :]
    before = output.clone()
    with torch.no_grad():
        no_graph = soft_bound(raw, 3.0)
    assert torch.equal(output, before) and no_graph.is_contiguous()
    assert torch.equal(no_graph, soft_bound(raw.clone().requires_grad_(), 3.0).detach())


@pytest.mark.parametrize("name", ["iaf", "maf"])
def test_made_has_the_identity_order_and_a_seed_fixes_the_layer(name):
    torch.manual_seed(10)
    layer = transforms.build(name, 5)
    assert torch.equal(layer.arn.permutation, torch.arange(5))
    # identity order: output i depends on inputs <= i only (lower triangular Jacobian)
    jacobian = torch.autograd.functional.jacobian(layer, torch.randn(5, dtype=torch.float32))
    assert torch.equal(jacobian.triu(1), torch.zeros_like(jacobian))
    assert (jacobian.tril(-1).abs() > 0).any()
    torch.manual_seed(11)
    first = transforms.build(name, 5).state_dict()
    torch.manual_seed(11)
    second = transforms.build(name, 5).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "name, dim",
    [
        ("iaf", 5),
        ("maf", 5),
        ("iaf", 4),
        ("realnvp", 4),
        ("nice", 4),
        ("realnvp", 5),
        ("nice", 5),
    ],
)
def test_flow_alternates_with_permutations_and_the_stack_is_dense(name, dim):
    torch.manual_seed(12)
    # A coupling split 2 | 3 cannot be dense in 3 layers (after two, at most one coordinate
    # depends on all five, and the third layer conditions on two): odd sizes get a fourth. With a
    # reversal between layers instead of the roll, no number of layers would do.
    length = 4 if (name in ("realnvp", "nice") and dim % 2) else 3
    stack = transforms.flow(name, dim, length).double()
    kinds = [type(part) for part in stack.parts]
    # autoregressive layers alternate with reversals, couplings with a roll by their split
    permutation = transforms.Roll if name in ("realnvp", "nice") else transforms.Reverse
    assert kinds.count(permutation) == length - 1
    assert all(kind is permutation for kind in kinds[1::2])
    x = torch.randn(dim, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(stack, x)
    assert (jacobian.abs() > 1e-10).all(), f"{name}: some coordinate misses another\n{jacobian}"
    # a single layer is not dense, so the density comes from the alternation
    single = torch.autograd.functional.jacobian(stack.parts[0], x)
    assert (single.abs() <= 1e-10).any()
    # and the stack's log-det is the sum of its layers'
    y = stack(x)
    assert stack.log_abs_det_jacobian(x, y).item() == pytest.approx(
        torch.linalg.slogdet(jacobian).logabsdet.item(), abs=1e-9
    )


def test_couplings_keep_the_first_part_and_nice_preserves_volume():
    torch.manual_seed(13)
    x = torch.randn(7, 5, dtype=torch.float64)
    for name in ("realnvp", "nice"):
        layer = transforms.build(name, 5).double()
        _move(layer, seed=14)
        y = layer(x)
        assert torch.equal(y[:, :2], x[:, :2])
        assert (y[:, 2:] != x[:, 2:]).all()
    nice = transforms.build("nice", 5).double()
    assert isinstance(nice, AdditiveCoupling) and nice.volume_preserving
    _move(nice, seed=15)
    assert torch.equal(nice.log_abs_det_jacobian(x, nice(x)), torch.zeros(7, dtype=torch.float64))
    jacobian = torch.autograd.functional.jacobian(nice, x[0])
    assert torch.linalg.det(jacobian).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["realnvp", "nice"])
def test_couplings_refuse_one_dimension(name):
    assert transforms.info(name).min_input_dim == 2
    assert transforms.info(name).permute_between
    with pytest.raises(ValueError, match="input_dim"):
        transforms.build(name, 1)
    with pytest.raises(ValueError, match="input_dim"):
        transforms.build(name, 1, context_dim=CONTEXT_DIM)
    with pytest.raises(ValueError, match="split_dim"):
        transforms.build(name, 4, split_dim=4)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="gated"):
        transforms.build("iaf", 3, gated="yes")
    with pytest.raises(ValueError, match="log_scale_bound"):
        transforms.build("maf", 3, log_scale_bound=-1.0)


def test_registry_entries():
    for name in ("iaf", "maf", "realnvp", "nice"):
        entry = transforms.info(name)
        assert entry.exact_inverse and entry.conditional and entry.permute_between
        assert entry.event_dim == 1
    assert transforms.info("iaf").min_input_dim == 1 and transforms.info("maf").min_input_dim == 1


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp", "nice"])
def test_jit_trace_matches_eager_in_both_directions(name, conditional):
    torch.manual_seed(16)
    layer = transforms.build(name, 4, context_dim=CONTEXT_DIM if conditional else None)
    # parameters enter a plain trace as constants, which must not require grad (JitTrace_ELBO
    # passes them as inputs instead; the contract tests cover that)
    layer.requires_grad_(False)
    context = torch.randn(6, CONTEXT_DIM) if conditional else None

    def forward_and_back(x, y):
        transform = _transform(layer, context)
        forward = transform(x)
        return forward, transform.log_abs_det_jacobian(x, forward), transform.inv(y)

    example = (torch.randn(6, 4), torch.randn(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no value-dependent branching
        traced = torch.jit.trace(forward_and_back, example, check_trace=False)
    fresh = (torch.randn(6, 4), torch.randn(6, 4))
    for got, expected in zip(traced(*fresh), forward_and_back(*fresh)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [{}, {"gated": True}], ids=["affine", "gated"])
@pytest.mark.parametrize("name", ["iaf", "maf"])
def test_large_inputs_stay_finite(name, kwargs, dtype):
    torch.manual_seed(17)
    layer = transforms.build(name, 5, **kwargs).to(dtype)
    _move(layer, seed=18)
    x = (1e4 * torch.randn(4, 3, 5, dtype=dtype)).requires_grad_()
    y = layer(x)
    log_det = layer.log_abs_det_jacobian(x, y)
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert torch.isfinite(layer.inv(1e4 * torch.randn(4, 3, 5, dtype=dtype))).all()


def test_conditional_iaf_density_in_a_guide_shape():
    """(B, T, Z) latents with (B, T, C) contexts, as the STORN guide uses them."""
    torch.manual_seed(19)
    stack = transforms.flow("iaf", 2, 3, context_dim=CONTEXT_DIM).double()
    base = dist.Normal(torch.zeros(4, 6, 2, dtype=torch.float64), 1.0).to_event(1)
    context = torch.randn(4, 6, CONTEXT_DIM, dtype=torch.float64)
    flow_dist = ConditionalTransformedDistribution(base, [stack]).condition(context)
    z = flow_dist.rsample()
    assert z.shape == (4, 6, 2)
    log_prob = flow_dist.log_prob(z)
    fresh = flow_dist.log_prob(z.clone())  # no cache: the sequential inverse
    torch.testing.assert_close(log_prob, fresh)
    assert log_prob.shape == (4, 6)


def test_deepcopy_and_save_after_use():
    torch.manual_seed(20)
    layer = transforms.build("maf", 3)
    layer(torch.randn(5, 3, requires_grad=True))  # caches hold tensors of an autograd graph
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = transforms.build("maf", 3)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(5, 3)
    torch.testing.assert_close(clone(x), layer(x.clone()))
    torch.testing.assert_close(fresh(x), layer(x.clone()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maf", "iaf", "realnvp"])
def test_fits_a_banana_density(name):
    """Maximum likelihood on x1 = x0^2 / 2 + 0.3 e: entropy log(2 pi e) + log(0.3) = 1.634 nats;
    the best Gaussian has NLL 2.6. Five layers must get within 0.1 nat of the entropy."""
    torch.manual_seed(21)
    n = 4000
    x0 = torch.randn(n)
    data = torch.stack([x0, 0.5 * x0**2 + 0.3 * torch.randn(n) - 0.5], dim=-1)
    entropy = 1.0 + torch.log(torch.tensor(2 * torch.pi)).item() + torch.log(torch.tensor(0.3)).item()
    stack = transforms.flow(name, 2, 5, hidden_dims=[32, 32])
    density = TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [stack])
    optimizer = torch.optim.Adam(stack.parameters(), lr=3e-3)
    for _ in range(600):
        batch = data[torch.randint(0, n, (256,))]
        loss = -density.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nll = -density.log_prob(data).mean().item()
    assert nll < entropy + 0.1, f"{name}: NLL {nll:.3f} vs entropy {entropy:.3f}"
