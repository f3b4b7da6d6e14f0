"""One convolution planar layer (``conv_planar``, causal, k = 3) against sequence length:
forward + log-det, and the exact inverse, for T = 100, 1000, 10000 (no autograd).

The cost of a layer should grow linearly in T; the table gives microseconds per step beside the
totals. Parameters are moved by N(0, 0.5) noise off their initialisation, and every repetition
gets a fresh input (Pyro transforms cache the last pair by identity). The round-trip error of each
inverse is checked alongside, so a fast wrong inverse would show.

    python -m benchmarks --suite conv_planar
"""

from __future__ import annotations

from typing import Any

import torch

import transforms

from .harness import time_interleaved

__all__ = ["run"]

STEPS = (100, 1000, 10000)
BATCH, LATENT_DIM, KERNEL_SIZE = 16, 2, 3
PARAM_NOISE = 0.5


def _layer(device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    layer = transforms.build("conv_planar", LATENT_DIM, kernel_size=KERNEL_SIZE).to(device)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(PARAM_NOISE * torch.randn_like(parameter))
    return layer


def run(*, smoke: bool = False, device: torch.device | str = "cpu") -> tuple[dict[str, Any], str]:
    device = torch.device(device)
    steps = (10, 100) if smoke else STEPS
    repeats, warmup = (1, 0) if smoke else (11, 2)
    layer = _layer(device)

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            layer.log_abs_det_jacobian(x, layer(x))

    def inverse(y: torch.Tensor) -> None:
        with torch.no_grad():
            layer.inv(y)

    def round_trip_error(n_steps: int) -> float:
        """Relative error of forward(inverse(y)) on fresh draws, checked outside the timing."""
        worst = 0.0
        with torch.no_grad():
            for _ in range(3):
                y = 1.5 * torch.randn(BATCH, n_steps, LATENT_DIM, device=device)
                x = layer.inv(y)
                worst = max(worst, ((layer(x.clone()) - y).abs().max() / y.abs().max()).item())
        return worst

    rows = []
    for n_steps in steps:
        timings = time_interleaved(
            {"forward+logdet": forward, "inverse": inverse},
            lambda: 1.5 * torch.randn(BATCH, n_steps, LATENT_DIM, device=device),
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
        rows.append(
            {
                "T": n_steps,
                "forward": timings["forward+logdet"].summary(),
                "inverse": timings["inverse"].summary(),
                "ratio": timings["inverse"].median / timings["forward+logdet"].median,
                "forward_us_per_step": 1e6 * timings["forward+logdet"].median / n_steps,
                "inverse_us_per_step": 1e6 * timings["inverse"].median / n_steps,
                "worst_round_trip_rel_error": round_trip_error(n_steps),
            }
        )
    lines = [
        f"### conv_planar, one causal layer against T (batch {BATCH}, Z = {LATENT_DIM}, k = {KERNEL_SIZE}, "
        f"{repeats} interleaved repeats, no autograd)",
        "",
        "Target: inverse <= 5x forward. The round-trip error is checked on fresh draws outside the timing.",
        "",
        "| T | forward+logdet median ms (min-max) | inverse median ms (min-max) | inverse / forward | "
        "forward µs/step | inverse µs/step | worst round trip (rel) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['T']} | {_ms(row['forward'])} | {_ms(row['inverse'])} | "
            f"{row['ratio']:.1f} | {row['forward_us_per_step']:.2f} | "
            f"{row['inverse_us_per_step']:.2f} | {row['worst_round_trip_rel_error']:.1e} |"
        )
    return {"rows": rows}, "\n".join(lines) + "\n"


def _ms(summary: dict[str, Any]) -> str:
    return f"{1e3 * summary['median_s']:.2f} ({1e3 * summary['min_s']:.2f}-{1e3 * summary['max_s']:.2f})"
