"""STORN's SVI step against plain PyTorch, its scaling in T and batch size, and time per epoch.

The limit for our Pyro model/guide is the same networks and the same single-sample ELBO
estimator written in plain PyTorch (:func:`plain_step`): encode, reparameterised q0 sample, the
flow with its log-det, decode, one backward, clipped Adam. Target: Pyro step / plain step <= 1.10.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch

from pyro_storn.storn import STORN
from pyro_storn.training import svi_step

from .harness import time_interleaved

__all__ = ["run", "plain_step"]

INPUT_DIM, LATENT_DIM, HIDDEN_DIM = 4, 2, 128
CLIP_NORM = 10.0
LR = 1e-3
CONFIGS = (("none", 0), ("radial", 4))


def plain_step(storn: STORN, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One step of the single-sample ELBO of ``storn`` in plain PyTorch (no Pyro)."""
    loc, scale, state = storn.encode(x)
    z = loc + scale * torch.randn_like(loc)
    log_q = dist.Normal(loc, scale).log_prob(z).sum((-2, -1))
    if storn.flow is not None:
        flow = storn.flow.condition(state) if storn.flow_conditional else storn.flow
        for part in flow.parts:
            z_next = part(z)
            log_det = part.log_abs_det_jacobian(z, z_next)
            log_q = log_q - (log_det.sum(-1) if log_det.dim() == log_q.dim() + 1 else log_det)
            z = z_next
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum((-2, -1))
    emission_loc, emission_scale = storn.decode(x, z)
    log_lik = dist.Normal(emission_loc, emission_scale).log_prob(x).sum((-2, -1))
    loss = -(log_lik + log_prior - log_q).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(storn.parameters(), CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _contenders(flow: str, length: int, device: torch.device) -> dict[str, Callable[[torch.Tensor], Any]]:
    flow_name = None if flow == "none" else flow
    pyro.clear_param_store()
    torch.manual_seed(0)
    ours = STORN(INPUT_DIM, LATENT_DIM, HIDDEN_DIM, flow=flow_name, flow_length=length).to(device)
    torch.manual_seed(0)
    twin = STORN(INPUT_DIM, LATENT_DIM, HIDDEN_DIM, flow=flow_name, flow_length=length).to(device)
    optim = pyro.optim.Adam({"lr": LR}, {"clip_norm": CLIP_NORM})
    elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)
    optimizer = torch.optim.Adam(twin.parameters(), lr=LR)
    return {
        "pyro": lambda x: svi_step(ours.model, ours.guide, optim, elbo, x),
        "plain": lambda x: plain_step(twin, optimizer, x),
    }


def _step_ratio(what: str, flow: str, length: int, batch: int, n_steps: int, repeats: int, warmup: int, device):
    timings = time_interleaved(
        _contenders(flow, length, device),
        lambda: torch.randn(batch, n_steps, INPUT_DIM, device=device),
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    return {
        "what": what,
        "flow": f"{flow} x{length}" if length else flow,
        "batch": batch,
        "T": n_steps,
        "pyro": timings["pyro"].summary(),
        "plain": timings["plain"].summary(),
        "ratio": timings["pyro"].median / timings["plain"].median,
    }


def _epoch_time(device: torch.device, smoke: bool) -> dict[str, Any]:
    """The thesis setting (1000 x 100 pendulum, 80/20 split, batch 20, radial K = 4): wall time
    per epoch through the library's `train`, and the test -ELBO per step it reaches."""
    import tempfile

    import numpy as np

    from pyro_storn.data.pendulum import simulate, split_train_test
    from pyro_storn.data.sequences import SequenceData
    from pyro_storn.runs import TrainConfig, train

    n_sequences, n_steps, epochs = (20, 10, 1) if smoke else (1000, 100, 3)
    x = simulate(n_sequences=n_sequences, n_steps=n_steps, seed=0)
    x_train, x_test = split_train_test(x)
    data = SequenceData(x_train, np.ones(x_train.shape[:2], bool), x_test, np.ones(x_test.shape[:2], bool))
    config = TrainConfig(flow="radial", flow_length=4, epochs=epochs, batch_size=20, seed=0, device=str(device))
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = train(data, run_dir, config, progress=False)
        wall = time.perf_counter() - start
    last = result.history[-1] if result.history else {}
    return {
        "setting": f"pendulum {n_sequences}x{n_steps}, radial x4, batch 20, {epochs} epochs",
        "seconds_per_epoch": wall / epochs,
        "test_neg_elbo_per_step": last.get("test/neg_elbo_per_step"),
    }


def run(*, smoke: bool = False, device: torch.device | str = "cpu") -> tuple[dict[str, Any], str]:
    device = torch.device(device)
    repeats, warmup = (1, 0) if smoke else (21, 3)
    base = [_step_ratio("thesis setting", flow, k, 20 if not smoke else 4, 100 if not smoke else 10, repeats, warmup, device)
            for flow, k in CONFIGS]
    scaling_t = [] if smoke else [_step_ratio("scaling in T", "radial", 4, 20, t, max(repeats // 2, 5), 2, device) for t in (100, 1000)]
    scaling_b = [] if smoke else [_step_ratio("scaling in batch", "radial", 4, b, 100, max(repeats // 2, 5), 2, device) for b in (20, 200, 2000)]
    epoch = _epoch_time(device, smoke)
    lines = [
        "### STORN SVI step: Pyro model/guide + Trace_ELBO against the same networks in plain PyTorch",
        "",
        f"Input dim {INPUT_DIM}, latent {LATENT_DIM}, hidden {HIDDEN_DIM} (GRU), clipped Adam; target ratio <= 1.10.",
        "",
        "| measurement | flow | batch | T | Pyro median ms (min-max) | plain median ms (min-max) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in base + scaling_t + scaling_b:
        lines.append(
            f"| {row['what']} | {row['flow']} | {row['batch']} | {row['T']} | {_ms(row['pyro'])} | {_ms(row['plain'])} | {row['ratio']:.2f} |"
        )
    lines += [
        "",
        f"### End to end: {epoch['setting']}",
        "",
        f"{epoch['seconds_per_epoch']:.2f} s per epoch (train + per-epoch train/test metrics); "
        f"test -ELBO per step after the last epoch: {epoch['test_neg_elbo_per_step']}.",
    ]
    results = {"step": base, "scaling_T": scaling_t, "scaling_batch": scaling_b, "epoch": epoch}
    return results, "\n".join(lines) + "\n"


def _ms(summary: dict[str, Any]) -> str:
    return f"{1e3 * summary['median_s']:.2f} ({1e3 * summary['min_s']:.2f}-{1e3 * summary['max_s']:.2f})"
