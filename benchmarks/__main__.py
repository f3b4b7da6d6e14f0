"""``python -m benchmarks``: run the benchmark suites and write JSON plus ``docs/benchmarks.md``.

Every suite is a module with ``run(*, smoke, device) -> (results, markdown)``. ``--smoke`` runs each
once on tiny sizes (what CI does: it checks that the suite runs and writes its JSON, never a time).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .figures import draw_figures
from .harness import machine_info, write_results

SUITES = {
    "transforms": ("benchmarks.bench_transforms", "transform throughput against Pyro, inverse cost"),
    "storn": ("benchmarks.bench_storn", "STORN SVI step against plain PyTorch; scaling in T and batch"),
    "conv_planar": ("benchmarks.bench_conv_planar", "conv_planar cost against T (100, 1000, 10000)"),
    "density": ("benchmarks.bench_density", "CNF against RealNVP on two moons: time to a test NLL"),
    "jsb": ("benchmarks.bench_jsb", "JSB Chorales seconds per epoch: STORN against Pyro's DMM example"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Interleaved, warmed-up timings of pyro-storn, written as JSON and a markdown "
        "table with machine info. Ratios taken in one run are what to quote; absolute times drift.",
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITES),
        help="suite to run (repeatable; default: all). "
        + "; ".join(f"{name}: {text}" for name, (_, text) in SUITES.items()),
    )
    parser.add_argument("--smoke", action="store_true", help="each benchmark once on tiny sizes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for benchmarks.md/.json (default docs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.suite or list(SUITES)
    stem = "benchmarks_smoke" if args.smoke else ("benchmarks" if args.device == "cpu" else f"benchmarks_{args.device}")
    machine = machine_info(args.device)
    results = {"machine": machine, "smoke": args.smoke, "started": datetime.now(timezone.utc).isoformat(), "suites": {}}
    sections = []
    for name in names:
        module_name, _ = SUITES[name]
        module = importlib.import_module(module_name)
        start = time.perf_counter()
        suite_results, markdown = module.run(smoke=args.smoke, device=args.device)
        wall = time.perf_counter() - start
        results["suites"][name] = {"results": suite_results, "wall_s": wall}
        sections.append(f"## {name}\n\n{markdown}\nSuite wall time: {wall:.1f} s.\n")
        print(f"[benchmarks] {name}: {wall:.1f} s", flush=True)
    header = [
        "# Benchmarks",
        "",
        f"Command: `python -m benchmarks{' --smoke' if args.smoke else ''} --device {args.device}` "
        f"(or `make bench`). Run {results['started']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        "Contenders are interleaved (A B, B A, ...), warmed up, and each repetition gets a fresh input "
        "tensor (Pyro transforms cache the last pair by identity). Medians with min-max; this machine "
        "is shared and noisy, so compare ratios within one run.",
        "",
    ]
    figures = draw_figures(results, args.out, stem)
    if figures:
        sections.append("## Figures\n\n" + "\n\n".join(f"![{path.stem}]({path.name})" for path in figures) + "\n")
    write_results(results, args.out / f"{stem}.json", args.out / f"{stem}.md", "\n".join(header + sections))
    print(f"[benchmarks] wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
