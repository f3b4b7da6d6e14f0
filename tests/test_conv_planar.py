"""Family tests of the convolution planar flow over time (``conv_planar``, ``conv_planar_centered``):
exact log-determinants against the dense autograd Jacobian of the flattened (T, Z) event, the
Jacobian's sparsity, exact inverses (parallel and sequential solvers), gradients through the
inverse, batch shapes, jit tracing and the registry's claims."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import transforms
from flow_helpers import move_parameters as _move, conditioned as _transform
import transforms.conv_planar_solvers as cp
from transforms.conv_planar import ConditionedConvPlanar, ConvPlanar

SEQ_LEN, LATENT, KERNEL, CONTEXT = 25, 2, 3, 4
LOGDET_TOL = 1e-6
ROUNDTRIP_RTOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def _layer(causal: bool, conditional: bool, kernel_size: int = KERNEL, dtype=torch.float64):
    name = "conv_planar" if causal else "conv_planar_centered"
    context_dim = CONTEXT if conditional else None
    return transforms.build(name, LATENT, context_dim=context_dim, kernel_size=kernel_size).to(dtype)


def _jacobian(transform, x_event: torch.Tensor) -> torch.Tensor:
    shape = x_event.shape
    return torch.autograd.functional.jacobian(
        lambda v: transform(v.reshape(shape)).reshape(-1), x_event.reshape(-1)
    )


def _context(conditional: bool, *batch: int, steps: int = SEQ_LEN, dtype=torch.float64):
    return torch.randn(*batch, steps, CONTEXT, dtype=dtype) if conditional else None


CASES = [(causal, conditional) for causal in (True, False) for conditional in (False, True)]
CASE_IDS = [f"{'causal' if c else 'centred'}-{'cond' if k else 'plain'}" for c, k in CASES]


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("causal,conditional", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("steps,kernel_size", [(SEQ_LEN, KERNEL), (1, KERNEL), (2, KERNEL), (3, 5)])
def test_logdet_matches_dense_autograd_jacobian(causal, conditional, moved, steps, kernel_size):
    torch.manual_seed(0)
    layer = _layer(causal, conditional, kernel_size)
    if moved:
        _move(layer, seed=1)
    batch = 3
    x = 1.5 * torch.randn(batch, steps, LATENT, dtype=torch.float64)
    context = _context(conditional, batch, steps=steps)
    transform = _transform(layer, context)
    ours = transform.log_abs_det_jacobian(x, transform(x))
    fresh = transform.log_abs_det_jacobian(x.clone(), None)  # not from the forward's cache
    assert ours.shape == (batch,)
    torch.testing.assert_close(fresh, ours, rtol=0, atol=0)
    for i in range(batch):
        per_sample = _transform(layer, None if context is None else context[i])
        expected = torch.linalg.slogdet(_jacobian(per_sample, x[i])).logabsdet
        assert ours[i].item() == pytest.approx(expected.item(), abs=LOGDET_TOL, rel=LOGDET_TOL)


@pytest.mark.parametrize("causal,conditional", CASES, ids=CASE_IDS)
def test_jacobian_sparsity_is_the_filters_band(causal, conditional):
    """Causal: lower block-triangular with k - 1 sub-diagonal blocks; centred: p blocks either
    side. Everything outside the band is exactly zero, and the band is really used."""
    torch.manual_seed(2)
    layer = _layer(causal, conditional)
    _move(layer, seed=3)
    x = torch.randn(SEQ_LEN, LATENT, dtype=torch.float64)
    jacobian = _jacobian(_transform(layer, _context(conditional)), x)
    blocks = jacobian.reshape(SEQ_LEN, LATENT, SEQ_LEN, LATENT).abs().amax((1, 3))  # (t, s)
    lag = torch.arange(SEQ_LEN)[:, None] - torch.arange(SEQ_LEN)[None, :]  # t - s
    half = (KERNEL - 1) // 2
    band = (lag >= 0) & (lag < KERNEL) if causal else lag.abs() <= half
    assert (blocks[~band] == 0).all()
    assert (blocks[band] > 0).all()
    if causal:
        assert torch.equal(blocks, blocks.tril())


@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
@pytest.mark.parametrize("steps,kernel_size", [(SEQ_LEN, KERNEL), (1, KERNEL), (2, KERNEL), (40, 4)])
def test_round_trips_at_fresh_points(conditional, dtype, steps, kernel_size, moved):
    torch.manual_seed(4)
    layer = _layer(True, conditional, kernel_size, dtype)
    if moved:
        _move(layer, seed=5)
    batch = 16
    transform = _transform(layer, _context(conditional, batch, steps=steps, dtype=dtype))
    rtol = ROUNDTRIP_RTOL[dtype]
    with torch.no_grad():
        x = 1.5 * torch.randn(batch, steps, LATENT, dtype=dtype)
        x_back = transform.inv(transform(x).clone())
        _assert_round_trip(x_back, x, rtol)
        y = 1.5 * torch.randn(batch, steps, LATENT, dtype=dtype)
        _assert_round_trip(transform(transform.inv(y).clone()), y, rtol)


def _assert_round_trip(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """float64: elementwise, rtol = atol = 1e-10. float32: 1e-6 of the largest magnitude of the
    sequence batch (normwise), since the float32 forward map itself, evaluated at the exact
    (float64) inverse, misses y by ~3e-7 of that scale: elementwise 1e-6 near zero entries
    would test rounding, not the inverse."""
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol)
        return
    error = (actual - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"round trip error {error:.3g}"


def test_long_sequences_invert_through_the_blocked_solve():
    """T = 3000 is past the dense-solve size: Newton steps go through the blocked recurrence."""
    torch.manual_seed(6)
    layer = _layer(True, True)
    _move(layer, seed=7)
    steps, batch = 3000, 4
    assert batch * steps * steps > cp._DENSE_SOLVE_MAX_ENTRIES
    transform = layer.condition(_context(True, batch, steps=steps))
    with torch.no_grad():
        x = 1.5 * torch.randn(batch, steps, LATENT, dtype=torch.float64)
        torch.testing.assert_close(transform.inv(transform(x).clone()), x, rtol=1e-10, atol=1e-10)


def test_parallel_newton_scan_and_sequential_solvers_agree(monkeypatch):
    torch.manual_seed(8)
    layer = _layer(True, True)
    _move(layer, seed=9)
    transform = layer.condition(_context(True, 5, steps=60))
    y = 2.0 * torch.randn(5, 60, LATENT, dtype=torch.float64)
    with torch.no_grad():
        dense = transform.inv(y.clone())
        monkeypatch.setattr(cp, "_DENSE_SOLVE_MAX_ENTRIES", 0)  # by blocks, block by block
        scanned = transform.inv(y.clone())
        monkeypatch.setattr(cp, "_MAX_PARALLEL_NEWTON", 0)  # everything to the sequential solver
        sequential = transform.inv(y.clone())
    torch.testing.assert_close(scanned, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sequential, dense, rtol=1e-12, atol=1e-12)


# _DENSE_SOLVE_MAX_ENTRIES for the gradcheck below (2 sequences, T = 7, blocks of 2 steps, 3
# lag values carried between 4 blocks): one dense solve; blocks carried by one dense
# block-bidiagonal solve (2 * 6^2 <= 80 < 2 * 7^2); blocks carried one by one.
SOLVERS = {"dense-solve": 1 << 21, "blocks-dense-carry": 80, "blocks-stepwise-carry": 0}


def _sequential_recurrence(forcing, feedback):
    """x_t = f_t + sum_j phi_j[t] x_{t-j}, one step at a time: the reference."""
    states = []
    for t in range(forcing.size(-1)):
        state = forcing[:, t].clone()
        for j, phi in enumerate(feedback, 1):
            if t >= j:
                state = state + phi[:, t] * states[t - j]
        states.append(state)
    return torch.stack(states, dim=-1)


@pytest.mark.parametrize("carry", ["dense-carry", "stepwise-carry"])
@pytest.mark.parametrize(
    "count,steps,order", [(3, 7, 2), (2, 101, 1), (2, 257, 2), (1, 1000, 4), (4, 1, 2), (4, 2, 3)]
)
def test_blocked_banded_solve_matches_the_sequential_recurrence(count, steps, order, carry, monkeypatch):
    """The blocked solve (blocks of ~sqrt(T/m) steps, T not a multiple of the block size, lag
    values carried between blocks by one triangular solve or block by block) and the dense one
    agree with forward substitution to rounding level."""
    torch.manual_seed(30)
    layout = cp._Blocks(count, steps, order)
    diag = 1.0 + torch.rand(count, steps, dtype=torch.float64)
    sub = [0.4 * torch.randn(count, steps, dtype=torch.float64) for _ in range(order)]
    for j, s in enumerate(sub, 1):
        s[:, :j] = 0.0
    rhs = torch.randn(count, steps, dtype=torch.float64)
    expected = _sequential_recurrence(rhs / diag, [-s / diag for s in sub])
    dense = cp._solve_lower_banded(diag, sub, rhs)
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-12)
    # block size and count as the layout picks them for a long sequence, at any size
    block = max(order, math.ceil(math.sqrt(steps / order)))
    carried = (-(-steps // block) - 1) * order
    threshold = count * carried**2 if carry == "dense-carry" else 0
    if count * steps * steps <= threshold:
        pytest.skip("too short to be cut into blocks")
    monkeypatch.setattr(cp, "_DENSE_SOLVE_MAX_ENTRIES", threshold)
    blocked_layout = cp._Blocks(count, steps, order)
    assert blocked_layout.blocks > 1 or steps <= order
    assert layout.blocks == 1
    blocked = cp._solve_lower_banded(diag, sub, rhs)
    torch.testing.assert_close(blocked, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("moved", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_round_trips_of_long_sequences_with_sample_and_batch_dims(conditional, moved, dtype):
    """T = 10000 (blocked solve, T not a multiple of the block) and T = 997 for inputs (S, B, T,
    Z) whose parameters come per sequence (B, T, .) or shared: both directions round trip."""
    torch.manual_seed(31)
    layer = _layer(True, conditional, dtype=dtype)
    if moved:
        _move(layer, seed=32)
    rtol = ROUNDTRIP_RTOL[dtype]
    for samples, batch, steps in ((1, 2, 10000), (2, 3, 997)):
        transform = _transform(layer, _context(conditional, batch, steps=steps, dtype=dtype))
        with torch.no_grad():
            x = 1.5 * torch.randn(samples, batch, steps, LATENT, dtype=dtype)
            _assert_round_trip(transform.inv(transform(x).clone()), x, rtol)
            y = 1.5 * torch.randn(samples, batch, steps, LATENT, dtype=dtype)
            _assert_round_trip(transform(transform.inv(y).clone()), y, rtol)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("conditional", [False, True], ids=["shared-u", "per-step-u"])
def test_log_prob_gradients_through_the_inverse(conditional, solver, monkeypatch):
    """gradcheck of log_prob(y) at points the flow never produced, w.r.t. y and every parameter:
    the implicit-function step gives the exact derivative of the inverse, whichever solver
    (the blocked one runs out of place under autograd)."""
    monkeypatch.setattr(cp, "_DENSE_SOLVE_MAX_ENTRIES", SOLVERS[solver])
    torch.manual_seed(10)
    steps = 7
    w = (0.6 * torch.randn(KERNEL, LATENT, dtype=torch.float64)).requires_grad_()
    u_shape = (steps, LATENT) if conditional else (LATENT,)
    b_shape = (steps,) if conditional else (1,)
    u = torch.randn(u_shape, dtype=torch.float64).requires_grad_()
    b = (0.3 * torch.randn(b_shape, dtype=torch.float64)).requires_grad_()
    y = (1.5 * torch.randn(2, steps, LATENT, dtype=torch.float64)).requires_grad_()
    base = dist.Normal(torch.zeros(steps, LATENT, dtype=torch.float64), 1.0).to_event(2)

    def log_prob(y, w, u, b):
        flow = ConditionedConvPlanar((w, u, b), causal=True)
        return dist.TransformedDistribution(base, [flow]).log_prob(y)

    assert torch.autograd.gradcheck(log_prob, (y, w, u, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_batch_shapes_sample_by_sequence(causal):
    torch.manual_seed(11)
    layer = _layer(causal, True)
    samples, batch, steps = 3, 4, 9
    context = _context(True, batch, steps=steps)  # per sequence, shared by the samples
    transform = layer.condition(context)
    x = torch.randn(samples, batch, steps, LATENT, dtype=torch.float64)
    y = transform(x)
    assert y.shape == x.shape
    log_det = transform.log_abs_det_jacobian(x, y)
    assert log_det.shape == (samples, batch)
    for s in range(samples):
        torch.testing.assert_close(log_det[s], transform.log_abs_det_jacobian(x[s], None))
    if causal:
        with torch.no_grad():
            torch.testing.assert_close(transform.inv(y.clone()), x, rtol=1e-10, atol=1e-10)
    plain = _layer(causal, False)
    assert plain.log_abs_det_jacobian(x, plain(x)).shape == (samples, batch)


def test_inverse_is_jit_traceable_and_matches_eager():
    torch.manual_seed(12)
    module = _layer(True, False)
    _move(module, seed=13)
    # parameters as plain tensors: a traced function may not capture tensors that require grad
    layer = ConditionedConvPlanar(tuple(p.detach() for p in (module.w, module.u, module.bias)))
    # short: the trace unrolls the sequential solver (fixed iteration counts) over every step
    y = 1.5 * torch.randn(2, 4, LATENT, dtype=torch.float64)
    with torch.no_grad():
        eager = layer.inv(y.clone())
        traced = torch.jit.trace(lambda v: layer.inv(v), (y.clone(),), check_trace=False)
        torch.testing.assert_close(traced(y.clone()), eager, rtol=1e-12, atol=1e-12)
        other = 1.5 * torch.randn(2, 4, LATENT, dtype=torch.float64)  # the trace is not the cache
        torch.testing.assert_close(traced(other), layer.inv(other.clone()), rtol=1e-12, atol=1e-12)


def test_centred_constraint_makes_every_sylvester_matrix_column_dominant():
    """The centred map is a bijection because I + D W U_hat is strictly column diagonally
    dominant with a positive diagonal for every diagonal D in [0, 1]."""
    torch.manual_seed(14)
    for seed in range(5):
        layer = _layer(False, True)
        _move(layer, seed=seed)
        transform = layer.condition(_context(True))
        w, u_hat, _, one_plus_c = transform._constrained_params()
        taps = u_hat @ w.T  # (T, k)
        center = (KERNEL - 1) // 2
        off_center = taps.abs().sum(-1) - taps[:, center].abs()
        # column s of I + d_s (W U_hat)[:, s]: 1 + d_s c_s > d_s sum_j |w_j . u_hat_s|, d_s <= 1
        assert (one_plus_c - off_center > 0).all()
        assert (1.0 - off_center + taps[:, center] > 0).all()


def test_causal_constraint_keeps_each_step_invertible_at_any_parameters():
    torch.manual_seed(15)
    layer = _layer(True, True)
    for seed in range(5):
        _move(layer, seed=seed)
        _, _, _, one_plus_c = layer.condition(_context(True))._constrained_params()
        assert (one_plus_c > 0).all()


def test_registry_claims_are_true():
    causal, centred = transforms.info("conv_planar"), transforms.info("conv_planar_centered")
    assert causal.event_dim == centred.event_dim == 2
    assert causal.exact_inverse and not centred.exact_inverse
    assert causal.conditional and centred.conditional
    assert not causal.permute_between  # see ConvPlanar's docstring: context alignment
    with pytest.raises(ValueError, match="conv_planar_centered"):
        transforms.build("conv_planar", 2, causal=False)
    with pytest.raises(ValueError, match="conv_planar_centered"):
        transforms.build("conv_planar", 2, context_dim=3, causal=False)
    with pytest.raises(ValueError, match="odd kernel_size"):
        transforms.build("conv_planar_centered", 2, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        transforms.build("conv_planar", 2, kernel_size=0)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 2\)"):
        transforms.build("conv_planar", 2)(torch.randn(5, 3))
    assert "kernel_size=3" in repr(transforms.build("conv_planar", 2))


def test_flow_stacks_layers_and_trains_a_sequence_density():
    """Four composed layers fit a sequence density by maximum likelihood (log_prob at data
    points, i.e. through the exact inverse): the loss falls and stays finite."""
    torch.manual_seed(16)
    steps = 12
    noise = torch.randn(128, steps, 1, dtype=torch.float64)
    data = torch.cumsum(noise, dim=1) / steps**0.5  # a random walk: strong dependence in time
    stack = transforms.flow("conv_planar", 1, 4).to(torch.float64)
    base = dist.Normal(torch.zeros(steps, 1, dtype=torch.float64), 1.0).to_event(2)
    density = dist.TransformedDistribution(base, [stack])
    optimiser = torch.optim.Adam(stack.parameters(), lr=5e-2)
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        # a fresh tensor each step: Pyro's one-entry caches would hand back last step's inverse
        loss = -density.log_prob(data.clone()).mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0


def test_plain_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="input_dim"):
        ConvPlanar(0)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvPlanar(2, kernel_size=2.5)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_centred_newton_inverse_round_trips_and_differentiates(conditional):
    """The centred inverse (Newton, dense solves; no convergence proof, so exact_inverse=False)
    still reaches machine precision at fresh points, and log_prob there has correct gradients."""
    torch.manual_seed(17)
    layer = _layer(False, conditional)
    _move(layer, seed=18)
    transform = _transform(layer, _context(conditional, 8))
    with torch.no_grad():
        y = 1.5 * torch.randn(8, SEQ_LEN, LATENT, dtype=torch.float64)
        torch.testing.assert_close(transform(transform.inv(y).clone()), y, rtol=1e-10, atol=1e-10)
    steps = 6
    w = (0.6 * torch.randn(KERNEL, LATENT, dtype=torch.float64)).requires_grad_()
    u = torch.randn(steps, LATENT, dtype=torch.float64).requires_grad_()
    b = (0.3 * torch.randn(steps, dtype=torch.float64)).requires_grad_()
    y = (1.5 * torch.randn(2, steps, LATENT, dtype=torch.float64)).requires_grad_()
    base = dist.Normal(torch.zeros(steps, LATENT, dtype=torch.float64), 1.0).to_event(2)

    def log_prob(y, w, u, b):
        flow = ConditionedConvPlanar((w, u, b), causal=False)
        return dist.TransformedDistribution(base, [flow]).log_prob(y)

    assert torch.autograd.gradcheck(log_prob, (y, w, u, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def _masked(layer, context, mask):
    return layer.with_mask(mask) if context is None else layer.condition(context, mask=mask)


@pytest.mark.parametrize("causal,conditional", CASES, ids=CASE_IDS)
def test_a_masked_layer_acts_on_each_sequence_as_on_the_sequence_alone(causal, conditional):
    """Steps past each sequence's length (mask False) are left unchanged and add nothing; the
    observed steps' values, log-det, inverse and gradients are those of the sequence alone."""
    torch.manual_seed(40)
    layer = _layer(causal, conditional)
    _move(layer, seed=41)
    lengths = (SEQ_LEN, 9, 1)
    mask = torch.arange(SEQ_LEN) < torch.tensor(lengths)[:, None]
    context = _context(conditional, len(lengths))
    x = torch.randn(len(lengths), SEQ_LEN, LATENT, dtype=torch.float64, requires_grad=True)
    transform = _masked(layer, context, mask)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert torch.equal(y[~mask], x[~mask])
    with torch.no_grad():
        torch.testing.assert_close(transform.inv(y.clone()), x, rtol=1e-10, atol=1e-10)
    for i, steps in enumerate(lengths):
        alone_context = None if context is None else context[i : i + 1, :steps]
        alone = _transform(layer, alone_context)
        x_alone = x[i : i + 1, :steps]
        y_alone = alone(x_alone)
        torch.testing.assert_close(y[i : i + 1, :steps], y_alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_det[i : i + 1], alone.log_abs_det_jacobian(x_alone, y_alone),
                                   rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad((y.square().sum(-1) * mask).sum() - log_det.sum(), x)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@pytest.mark.parametrize("causal,conditional", CASES, ids=CASE_IDS)
def test_masked_logdet_matches_autograd_for_any_mask(causal, conditional):
    """With gaps anywhere in the mask, the log-det is still the map's: slogdet of the autograd
    Jacobian of the whole (T, Z) event."""
    torch.manual_seed(42)
    layer = _layer(causal, conditional)
    _move(layer, seed=43)
    mask = torch.rand(SEQ_LEN, generator=torch.Generator().manual_seed(44)) < 0.6
    context = _context(conditional)
    transform = _masked(layer, context, mask)
    x = 1.5 * torch.randn(SEQ_LEN, LATENT, dtype=torch.float64)
    expected = torch.linalg.slogdet(_jacobian(transform, x)).logabsdet
    ours = transform.log_abs_det_jacobian(x, transform(x))
    assert ours.item() == pytest.approx(expected.item(), abs=LOGDET_TOL, rel=LOGDET_TOL)


def test_mask_must_be_bool():
    layer = _layer(True, False)
    with pytest.raises(ValueError, match="bool"):
        layer.with_mask(torch.ones(SEQ_LEN))


def test_conditioned_layer_runs_its_network_at_call_time_once_per_sample_and_score():
    torch.manual_seed(45)
    layer = _layer(True, True)
    calls = []
    layer.nn.register_forward_hook(lambda *_: calls.append(1))
    context = _context(True, 4)
    base = dist.Normal(torch.zeros(SEQ_LEN, LATENT, dtype=torch.float64), 1.0).to_event(2)
    transform = layer.condition(context)
    assert not calls  # nothing evaluated at condition time
    density = dist.TransformedDistribution(base, [transform])
    z = density.rsample()
    density.log_prob(z)
    assert len(calls) == 1  # forward and its log-det share one evaluation
    density.log_prob(torch.randn(4, SEQ_LEN, LATENT, dtype=torch.float64))
    assert len(calls) == 2  # an inverse and its log-det share one too
