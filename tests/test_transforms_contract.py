"""Contract tests generated from the registry: every registered flow, plain and conditional, at
input dims 1, 2 and 5, is checked for

(a) log|det J| against ``slogdet`` of the autograd Jacobian (float64, 1e-6), at initialisation
    and after every parameter moved by N(0, 0.5) noise;
(b) exact round trips where the registry claims an exact inverse;
(c) ``TransformedDistribution.log_prob`` at fresh points equals the change-of-variables value;
(d) in 2-D, the density with moved parameters integrates to 1 on a grid (over a box that holds
    all samples; where they spread too wide, to the share of samples in a box of their quantiles);
(e) one instance shared by every step of a ``pyro.markov`` loop trains under five ELBOs;
(f) finite values and gradients for large |z|, in float32 and float64;
(g) a conditioned transform ``t = layer.condition(context)`` is a function of the current
    parameters: several forward/backward passes through one ``t`` work, and after an optimiser
    step (or any change of the parameters) ``t`` gives the new values.

A flow registered later is covered the moment it is registered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import ConditionalTransformedDistribution, TransformedDistribution
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.optim import Adam

import transforms
from flow_helpers import move_parameters as _move_parameters

CONTEXT_DIM = 3
SEQ_LEN = 25  # T of an event-dim-2 flow's (T, Z) event in the Jacobian checks (T = 25, as in docs/conv_planar's Jacobian figure)
DIMS = (1, 2, 5)
LOGDET_TOL = 1e-6
ROUNDTRIP_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
LARGE = 1e3  # scale of "large |z|" inputs for the edge checks


@dataclass(frozen=True)
class Case:
    name: str
    dim: int
    conditional: bool

    @property
    def entry(self) -> transforms.FlowInfo:
        return transforms.info(self.name)

    def __str__(self) -> str:
        return f"{self.name}-d{self.dim}-{'cond' if self.conditional else 'plain'}"

    def event_shape(self, seq_len: int = SEQ_LEN) -> tuple[int, ...]:
        return (self.dim,) if self.entry.event_dim == 1 else (seq_len, self.dim)

    def build(self, dtype: torch.dtype = torch.float64):
        context_dim = CONTEXT_DIM if self.conditional else None
        layer = transforms.build(self.name, self.dim, context_dim=context_dim, **self.entry.test_kwargs)
        return layer.to(dtype)

    def context(self, batch_shape: tuple[int, ...], dtype: torch.dtype, seq_len: int = SEQ_LEN):
        if not self.conditional:
            return None
        step = () if self.entry.event_dim == 1 else (seq_len,)
        return torch.randn(*batch_shape, *step, CONTEXT_DIM, dtype=dtype)

    def transform(self, layer, context):
        """The plain transform, or the conditional one conditioned on ``context``."""
        return layer.condition(context) if self.conditional else layer


def _cases(dims=DIMS) -> list[Case]:
    cases = []
    for name in transforms.available():
        entry = transforms.info(name)
        for dim in dims:
            if dim < entry.min_input_dim:
                continue
            cases.append(Case(name, dim, False))
            if entry.conditional:
                cases.append(Case(name, dim, True))
    return cases


ALL = _cases()
EXACT = [c for c in ALL if c.entry.exact_inverse]
TWO_D = [c for c in _cases(dims=(2,))]


def _ids(cases):
    return [str(c) for c in cases]


def _warm_up(case: Case, layer, dtype=torch.float64) -> None:
    """One forward pass on a batch, so data-dependent initialisation (actnorm) happens before
    parameters are moved or checked."""
    x = torch.randn(64, *case.event_shape(), dtype=dtype)
    case.transform(layer, case.context((64,), dtype))(x)


def _autograd_logdet(transform, x_event: torch.Tensor) -> torch.Tensor:
    shape = x_event.shape

    def flat_map(v: torch.Tensor) -> torch.Tensor:
        return transform(v.reshape(shape)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(flat_map, x_event.reshape(-1))
    return torch.linalg.slogdet(jacobian).logabsdet


def _check_logdet(case: Case, layer, seed: int) -> None:
    torch.manual_seed(seed)
    batch = 3
    x = 1.5 * torch.randn(batch, *case.event_shape(), dtype=torch.float64)
    context = case.context((batch,), torch.float64)
    transform = case.transform(layer, context)
    ours = transform.log_abs_det_jacobian(x, transform(x))
    assert ours.shape == (batch,), f"{case}: log-det shape {tuple(ours.shape)}"
    for i in range(batch):
        per_sample = case.transform(layer, None if context is None else context[i])
        expected = _autograd_logdet(per_sample, x[i])
        assert torch.isfinite(expected), f"{case}: autograd Jacobian is singular at sample {i}"
        assert ours[i].item() == pytest.approx(expected.item(), abs=LOGDET_TOL, rel=LOGDET_TOL), (
            f"{case}: log|det J| {ours[i].item():.12g} vs autograd {expected.item():.12g}"
        )


@pytest.mark.parametrize("name", transforms.available())
def test_registry_info_is_complete(name):
    entry = transforms.info(name)
    assert entry.event_dim in (1, 2)
    assert isinstance(entry.exact_inverse, bool)
    assert entry.inverse, f"{name} does not say how its inverse is computed"
    assert entry.description, f"{name} has no description"
    layer = transforms.build(name, max(entry.min_input_dim, 2))
    assert layer.bijective
    assert (layer.__doc__ or type(layer).__doc__), f"{name}: the transform has no docstring"


@pytest.mark.parametrize("name", transforms.available())
def test_refusals_name_the_valid_choices(name):
    entry = transforms.info(name)
    for bad_dim in (0, -1, 2.5):
        with pytest.raises(ValueError, match="input_dim"):
            transforms.build(name, bad_dim)
    if entry.min_input_dim > 1:
        with pytest.raises(ValueError, match="input_dim"):
            transforms.build(name, entry.min_input_dim - 1)
    if not entry.conditional:
        with pytest.raises(ValueError, match="conditional flows"):
            transforms.build(name, max(2, entry.min_input_dim), context_dim=CONTEXT_DIM)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="valid choices") as err:
        transforms.build("no-such-flow", 2)
    for name in transforms.available():
        assert name in str(err.value)


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_a_logdet_matches_autograd_at_init(case):
    torch.manual_seed(1)
    layer = case.build()
    _warm_up(case, layer)
    _check_logdet(case, layer, seed=2)


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_a_logdet_matches_autograd_after_moving_parameters(case):
    torch.manual_seed(3)
    layer = case.build()
    _warm_up(case, layer)
    _move_parameters(layer, seed=4)
    _check_logdet(case, layer, seed=5)


def _conditioning(case: Case, layer, context, x: torch.Tensor) -> tuple[float, float]:
    """The largest ||J|| and ||J^-1|| (spectral norms, float64 autograd) over the samples ``x``:
    how much a rounding of x or y grows through the forward map and through the inverse."""
    layer64 = case.build(torch.float64)
    layer64.load_state_dict(layer.state_dict())  # copy_ casts to float64
    x64 = x.detach().double()
    forward_norm, inverse_norm = 1.0, 1.0
    for i in range(x.shape[0]):
        transform = case.transform(layer64, None if context is None else context[i].double())
        flat = lambda v: transform(v.reshape(x64[i].shape)).reshape(-1)  # noqa: E731
        singular = torch.linalg.svdvals(torch.autograd.functional.jacobian(flat, x64[i].reshape(-1)))
        forward_norm = max(forward_norm, singular.max().item())
        inverse_norm = max(inverse_norm, 1.0 / singular.min().item())
    return forward_norm, inverse_norm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", EXACT, ids=_ids(EXACT))
def test_b_round_trips(case, dtype):
    torch.manual_seed(6)
    layer = case.build(dtype)
    _warm_up(case, layer, dtype)
    _move_parameters(layer, seed=7)
    batch = 16
    context = case.context((batch,), dtype)
    transform = case.transform(layer, context)
    x = 1.5 * torch.randn(batch, *case.event_shape(), dtype=dtype)
    y_fresh = 1.5 * torch.randn(batch, *case.event_shape(), dtype=dtype)
    # Rounding y to the dtype alone moves the exact inverse by up to ||J^-1|| ulps: after moving
    # the parameters far, a map may be that ill-conditioned (a moved 5-D spline autoregressive
    # layer reaches ||J^-1|| ~ 1e12), and the tolerance scales with it, in either dtype. The
    # growth is only computed (autograd Jacobians) where the plain tolerance is not met.
    tol = ROUNDTRIP_TOL[dtype]

    y = transform(x)
    # .clone(): a fresh tensor, so the one-entry cache cannot answer for the inverse
    x_back = transform.inv(y.clone())
    x_fresh = transform.inv(y_fresh)
    _assert_close_scaled(x_back, x, tol, lambda: _conditioning(case, layer, context, x)[1])
    _assert_close_scaled(
        transform(x_fresh.clone()), y_fresh, tol, lambda: _conditioning(case, layer, context, x_fresh)[0]
    )


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, growth) -> None:
    """``actual`` within ``tol`` of ``expected`` (absolute and relative), the absolute part
    scaled by ``growth()`` (a norm >= 1 of the map that amplified rounding) when the plain
    tolerance is missed."""
    if torch.allclose(actual, expected, atol=tol, rtol=tol):
        return
    torch.testing.assert_close(actual, expected, atol=tol * growth(), rtol=tol)


@pytest.mark.parametrize("case", EXACT, ids=_ids(EXACT))
def test_c_log_prob_at_fresh_points_is_change_of_variables(case):
    torch.manual_seed(8)
    layer = case.build()
    _warm_up(case, layer)
    _move_parameters(layer, seed=9)
    batch = 3
    shape = case.event_shape()
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(len(shape))
    context = case.context((batch,), torch.float64)
    if case.conditional:
        flow_dist = ConditionalTransformedDistribution(base, [layer]).condition(context)
    else:
        flow_dist = TransformedDistribution(base, [layer])

    y = 2.0 * torch.randn(batch, *shape, dtype=torch.float64)  # never produced by the flow
    log_prob = flow_dist.log_prob(y)
    assert log_prob.shape == (batch,)
    assert torch.isfinite(log_prob).all(), f"{case}: log_prob {log_prob}"
    for i in range(batch):
        transform = case.transform(layer, None if context is None else context[i])
        x = transform.inv(y[i].clone())
        expected = base.log_prob(x) - _autograd_logdet(transform, x)
        assert log_prob[i].item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)


AXIS_GAP = 1e-12  # the quadrants' grids stop this close to the axes
GRID_POINTS = 200  # points per axis of each quadrant's grid
# A density whose peaks the grid does not resolve (a spline's bins 0.02 wide after moving its
# parameters: density 17 there) is integrated again on grids twice as fine, up to this many
# points per axis; a density whose mass is not 1 converges to its own mass and still fails.
MAX_GRID_POINTS = 800
GRID_CHUNK = 250_000  # grid points per log_prob call (bounds the memory of fine grids)
# A box wider than this along an axis (a moved degree-9 polynomial flow's samples spread over
# ~350; at Pyro's length scale L = 1 over 1e5) is cut to the samples' TAIL and 1 - TAIL quantiles
# there, and the density must then integrate to the share of samples inside the box
# (Monte-Carlo error ~5e-4 with 20000 samples).
MAX_BOX_WIDTH = 40.0
TAIL = 1e-3


def _box(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lo, hi, mass)``: a box that holds all the samples plus a margin of 1, each axis wider
    than :data:`MAX_BOX_WIDTH` cut to its sample quantiles, and the share of samples in it."""
    lo = samples.min(0).values - 1.0
    hi = samples.max(0).values + 1.0
    wide = hi - lo > MAX_BOX_WIDTH
    quantiles = torch.quantile(samples, torch.tensor([TAIL, 1.0 - TAIL], dtype=samples.dtype), dim=0)
    lo, hi = torch.where(wide, quantiles[0], lo), torch.where(wide, quantiles[1], hi)
    inside = ((samples >= lo) & (samples <= hi)).all(-1)
    return lo, hi, inside.double().mean().item()


def _grid_integral(
    log_density, lo: torch.Tensor, hi: torch.Tensor, points_per_axis: int = GRID_POINTS
) -> float:
    """Trapezoid integral of exp(log_density) over the box ``[lo, hi]``.

    The box is cut along the axes and each piece integrated on its own grid: a piecewise-smooth
    density (prelu's jumps by its slope across each axis) then has no cell that straddles a jump,
    and a smooth one loses nothing.
    """
    pieces = []
    for i in range(2):
        a, b = lo[i].item(), hi[i].item()
        pieces.append([(a, -AXIS_GAP), (AXIS_GAP, b)] if a < 0 < b else [(a, b)])
    total = 0.0
    for x_lo, x_hi in pieces[0]:
        for y_lo, y_hi in pieces[1]:
            axes = [
                torch.linspace(x_lo, x_hi, points_per_axis, dtype=torch.float64),
                torch.linspace(y_lo, y_hi, points_per_axis, dtype=torch.float64),
            ]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
            with torch.no_grad():
                log_values = [log_density(chunk) for chunk in grid.split(GRID_CHUNK)]
            density = torch.cat(log_values).reshape(points_per_axis, points_per_axis).exp()
            total += torch.trapezoid(torch.trapezoid(density, axes[1], dim=1), axes[0]).item()
    return total


@pytest.mark.parametrize("case", [c for c in TWO_D if c.entry.exact_inverse], ids=_ids([c for c in TWO_D if c.entry.exact_inverse]))
def test_d_density_integrates_to_one(case):
    torch.manual_seed(10)
    layer = case.build()
    _warm_up(case, layer)
    _move_parameters(layer, seed=11)
    # An event-dim-2 flow acts on a (T, Z) sequence: T = 1, Z = 2 is a 2-D density.
    shape = case.event_shape(seq_len=1)
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(len(shape))
    context = case.context((), torch.float64, seq_len=1)
    if case.conditional:
        flow_dist = ConditionalTransformedDistribution(base, [layer]).condition(context)
    else:
        flow_dist = TransformedDistribution(base, [layer])
    with torch.no_grad():
        samples = flow_dist.sample((20000,)).reshape(-1, 2)
    lo, hi, expected = _box(samples)

    def mass_on_grid(points: int) -> float:
        return _grid_integral(lambda pts: flow_dist.log_prob(pts.reshape(-1, *shape)), lo, hi, points)

    points = GRID_POINTS
    mass = mass_on_grid(points)
    while abs(mass - expected) > 1e-2 and points < MAX_GRID_POINTS:
        points *= 2
        mass = mass_on_grid(points)
    assert mass == pytest.approx(expected, abs=1e-2), (
        f"{case}: density integrates to {mass} over [{lo.tolist()}, {hi.tolist()}], which holds "
        f"{expected} of the samples ({points} points per axis)"
    )


ELBOS = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "RenyiELBO": lambda: RenyiELBO(alpha=0.5, num_particles=2),
    "JitTrace_ELBO": lambda: JitTrace_ELBO(ignore_jit_warnings=True),
}
SHARED_STEPS = 3  # sample sites in the markov loop that all use the same flow instance
SHARED_CASES = _cases(dims=(2,))


@pytest.mark.parametrize("elbo_name", list(ELBOS))
@pytest.mark.parametrize("case", SHARED_CASES, ids=_ids(SHARED_CASES))
def test_e_one_instance_shared_across_markov_steps_trains(case, elbo_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(12)
    layer = case.build(torch.float32)
    shape = case.event_shape(seq_len=4)
    data = torch.randn(SHARED_STEPS, *shape)
    contexts = case.context((SHARED_STEPS,), torch.float32, seq_len=4)

    def model(data):
        for t in pyro.markov(range(SHARED_STEPS)):
            z = pyro.sample(f"z_{t}", dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape)))
            pyro.sample(f"x_{t}", dist.Normal(z, 1.0).to_event(len(shape)), obs=data[t])

    def guide(data):
        flow = pyro.module("shared_flow", layer)
        for t in pyro.markov(range(SHARED_STEPS)):
            loc = pyro.param(f"loc_{t}", torch.zeros(shape))
            base = dist.Normal(loc, 1.0).to_event(len(shape))
            transform = case.transform(flow, None if contexts is None else contexts[t])
            pyro.sample(f"z_{t}", dist.TransformedDistribution(base, [transform]))

    svi = SVI(model, guide, Adam({"lr": 1e-2}), ELBOS[elbo_name]())
    losses = [svi.step(data) for _ in range(4)]
    assert all(math.isfinite(loss) for loss in losses), f"{case} {elbo_name}: losses {losses}"
    moved = pyro.param("loc_0").detach().abs().sum().item()
    assert moved > 0, f"{case} {elbo_name}: the guide did not train"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_f_large_inputs_give_finite_values_and_gradients(case, dtype):
    torch.manual_seed(13)
    layer = case.build(dtype)
    _warm_up(case, layer, dtype)
    batch = 8
    x = (LARGE * torch.randn(batch, *case.event_shape(seq_len=6), dtype=dtype)).requires_grad_()
    context = case.context((batch,), dtype, seq_len=6)
    transform = case.transform(layer, context)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all(), f"{case}: non-finite output"
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(x.grad).all(), f"{case}: non-finite input gradient"
    for name, parameter in layer.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"{case}: non-finite gradient of {name}"
    if case.entry.exact_inverse:
        y_fresh = LARGE * torch.randn(batch, *case.event_shape(seq_len=6), dtype=dtype)
        x_fresh = transform.inv(y_fresh)
        assert torch.isfinite(x_fresh).all(), f"{case}: non-finite inverse at large |y|"


@pytest.mark.parametrize("case", SHARED_CASES, ids=_ids(SHARED_CASES))
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(14)
    layer = case.build()
    _warm_up(case, layer)
    shape = case.event_shape(seq_len=5)
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(len(shape))
    context = case.context((32,), torch.float64, seq_len=5)
    if case.conditional:
        flow_dist = ConditionalTransformedDistribution(base, [layer]).condition(context)
    else:
        flow_dist = TransformedDistribution(base, [layer])
    sample = flow_dist.rsample((32,)) if not case.conditional else flow_dist.rsample()
    fresh = torch.randn(32, *shape, dtype=torch.float64)
    # the sample path reaches every parameter of the map; log_prob at fresh points reaches the log-det
    (sample.pow(2).sum() + flow_dist.log_prob(fresh).sum()).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (
            f"{case}: no gradient reaches {name}"
        )


@pytest.mark.parametrize("case", SHARED_CASES, ids=_ids(SHARED_CASES))
def test_state_dict_round_trip(case):
    torch.manual_seed(15)
    layer = case.build()
    _warm_up(case, layer)
    _move_parameters(layer, seed=16)
    torch.manual_seed(17)
    clone = case.build()
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, *case.event_shape(seq_len=5), dtype=torch.float64)
    context = case.context((4,), torch.float64, seq_len=5)
    torch.testing.assert_close(case.transform(clone, context)(x), case.transform(layer, context)(x))


def test_flow_composes_layers_and_factory_feeds_autonormalizingflow():
    pytest.importorskip("pyro.infer.autoguide")
    if not transforms.available(event_dim=1):
        pytest.skip("no per-vector flow registered yet")
    from pyro.infer.autoguide import AutoNormalizingFlow

    name = transforms.available(event_dim=1)[0]
    entry = transforms.info(name)
    dim = max(entry.min_input_dim, 3)
    stack = transforms.flow(name, dim, 3)
    layers = [p for p in stack.parts if not isinstance(p, transforms.Reverse)]
    assert len(layers) == 3
    with pytest.raises(ValueError, match="length"):
        transforms.flow(name, dim, 0)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoNormalizingFlow(model, transforms.factory(name, length=2))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step())


CONDITIONAL_CASES = [pytest.param(c, id=str(c)) for c in _cases(dims=(2,)) if c.conditional]
TRAIN_STEPS = 3  # Pyro's own test of conditional transforms takes three Adam steps


def _fresh(case: Case, batch: int, seed: int) -> torch.Tensor:
    """A new input tensor (never one a transform has cached) of ``batch`` events."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *case.event_shape(seq_len=5), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("case", CONDITIONAL_CASES)
def test_g_conditioned_transform_follows_the_parameters(case):
    torch.manual_seed(18)
    layer = case.build()
    _warm_up(case, layer)
    batch = 4
    context = case.context((batch,), torch.float64, seq_len=5)
    transform = layer.condition(context)
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for step in range(TRAIN_STEPS):  # each pass builds and frees its own graph
        x = _fresh(case, batch, seed=100 + step)
        y = transform(x)
        loss = y.square().sum() - transform.log_abs_det_jacobian(x, y).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    x = _fresh(case, batch, seed=200)
    with torch.no_grad():
        before = transform(x.clone())
        _move_parameters(layer, seed=19)
        after = transform(x.clone())
        fresh = layer.condition(context)
        expected = fresh(x.clone())
    assert not torch.allclose(before, after), f"{case}: the conditioned map ignored the new parameters"
    torch.testing.assert_close(after, expected, msg=lambda m: f"{case}: stale conditioned map\n{m}")
    x_new = x.clone()
    torch.testing.assert_close(
        transform.log_abs_det_jacobian(x_new, transform(x_new)),
        fresh.log_abs_det_jacobian(x, fresh(x)),
        msg=lambda m: f"{case}: stale conditioned log-det\n{m}",
    )
    if case.entry.exact_inverse:
        y_fresh = _fresh(case, batch, seed=201)
        torch.testing.assert_close(transform.inv(y_fresh.clone()), fresh.inv(y_fresh.clone()))
