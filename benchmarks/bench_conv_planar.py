"""Timing of one convolution planar layer (``conv_planar``, causal, k = 3) against sequence
length: forward + log-det, and the exact inverse, for T = 100, 1000, 10000.

Medians over interleaved repetitions (every T in turn, then again), each with a fresh input
tensor: Pyro transforms cache the last (x, y) pair by identity, so reusing a tensor would time a
cache hit. The minimum is reported beside the median: on a shared machine a call that is
descheduled mid-way inflates the median of the longer (inverse) call most. Parameters are moved by N(0, 0.5) noise off their initialisation. Runs without
autograd. Writes ``bench_conv_planar.json`` and ``bench_conv_planar.md`` into ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/bench_conv_planar.py --out docs/conv_planar
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import transforms

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10000],
                        help="sequence lengths T")
    parser.add_argument("--batch", type=int, default=16, help="sequences per call")
    parser.add_argument("--latent-dim", type=int, default=2, help="Z")
    parser.add_argument("--kernel-size", type=int, default=3, help="k")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/conv_planar"))
    args = parser.parse_args(argv)
    for name in ("batch", "latent_dim", "kernel_size", "reps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(t <= 0 for t in args.steps):
        parser.error(f"--steps must be positive, got {args.steps}")

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    layer = transforms.build("conv_planar", args.latent_dim, kernel_size=args.kernel_size).to(dtype)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))

    times = {t: {"forward_logdet": [], "inverse": []} for t in args.steps}
    worst_round_trip = {t: 0.0 for t in args.steps}
    with torch.no_grad():
        for t in args.steps:  # warm-up: first calls allocate
            x = torch.randn(args.batch, t, args.latent_dim, dtype=dtype)
            layer.log_abs_det_jacobian(x, layer(x))
            layer.inv(torch.randn_like(x))
        for _ in tqdm(range(args.reps), desc="interleaved repetitions"):
            for t in args.steps:
                x = torch.randn(args.batch, t, args.latent_dim, dtype=dtype)
                elapsed, _ = _timed(lambda: layer.log_abs_det_jacobian(x, layer(x)))
                times[t]["forward_logdet"].append(elapsed)
                y = 1.5 * torch.randn(args.batch, t, args.latent_dim, dtype=dtype)
                elapsed, x_back = _timed(lambda: layer.inv(y))
                times[t]["inverse"].append(elapsed)
                error = ((layer(x_back.clone()) - y).abs().max() / y.abs().max()).item()
                worst_round_trip[t] = max(worst_round_trip[t], error)

    rows = []
    for t in args.steps:
        forward = statistics.median(times[t]["forward_logdet"])
        inverse = statistics.median(times[t]["inverse"])
        rows.append({
            "T": t,
            "forward_logdet_ms": 1e3 * forward,
            "inverse_ms": 1e3 * inverse,
            "inverse_over_forward": inverse / forward,
            "forward_us_per_step": 1e6 * forward / t,
            "inverse_us_per_step": 1e6 * inverse / t,
            "forward_logdet_min_ms": 1e3 * min(times[t]["forward_logdet"]),
            "inverse_min_ms": 1e3 * min(times[t]["inverse"]),
            "worst_round_trip_rel_error": worst_round_trip[t],
        })
    result = {
        "layer": repr(layer),
        "batch": args.batch, "latent_dim": args.latent_dim, "kernel_size": args.kernel_size,
        "dtype": args.dtype, "reps": args.reps, "autograd": False,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.processor()
        or platform.machine(), "rows": rows,
    }
    lines = [
        f"# conv_planar: one layer vs sequence length ({args.dtype}, batch {args.batch}, "
        f"Z={args.latent_dim}, k={args.kernel_size}, {torch.get_num_threads()} thread(s), "
        f"median of {args.reps} interleaved repetitions, no autograd)",
        "",
        "| T | forward + log-det (ms) | inverse (ms) | inverse / forward | forward µs/step | "
        "inverse µs/step | min forward / inverse (ms) | worst round trip (rel) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['T']} | {row['forward_logdet_ms']:.3f} | {row['inverse_ms']:.3f} | "
            f"{row['inverse_over_forward']:.1f} | {row['forward_us_per_step']:.2f} | "
            f"{row['inverse_us_per_step']:.2f} | {row['forward_logdet_min_ms']:.3f} / "
            f"{row['inverse_min_ms']:.3f} | {row['worst_round_trip_rel_error']:.1e} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_conv_planar.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_conv_planar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
