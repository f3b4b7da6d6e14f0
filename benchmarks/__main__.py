"""``python -m benchmarks``: run the benchmark suites and write JSON plus ``docs/benchmarks.md``.

Every suite is a module with ``run(*, smoke, device) -> (results, markdown)``. ``--smoke`` runs each
once on tiny sizes (what CI does: it checks that the suite runs and writes its JSON, never a time).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pyro_storn.cli import OneLineParser
from pyro_storn.rundir import check_device, check_output_dir

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
    parser = OneLineParser(
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
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections of suites not run now from the existing benchmarks.md/.json "
                        "in --out (each says when it ran), replacing only the suites run")
    return parser


def _sections(markdown: str) -> dict[str, str]:
    """The ``## name`` sections of a benchmarks page, by name (the header before them left out)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines).rstrip() + "\n" for name, lines in sections.items()}


def _kept_suites(out: Path, stem: str, running: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """The suites of the page already in ``out`` that this run leaves alone: JSON entries and
    their markdown sections, each stamped with the run it came from."""
    json_path, markdown_path = out / f"{stem}.json", out / f"{stem}.md"
    if not json_path.exists() or not markdown_path.exists():
        return {}, {}
    try:
        old = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--merge: {json_path} is not valid JSON ({error}); rerun without --merge") from None
    if not isinstance(old, dict) or not isinstance(old.get("suites", {}), dict):
        raise ValueError(f"--merge: {json_path} is not a benchmarks JSON (no suites object); rerun "
                         "without --merge")
    sections = _sections(markdown_path.read_text())
    kept_results, kept_sections = {}, {}
    for name, entry in old.get("suites", {}).items():
        if name in running or name not in SUITES or name not in sections:
            continue
        entry = dict(entry)
        entry.setdefault("started", old.get("started"))
        entry.setdefault("machine", old.get("machine"))
        kept_results[name] = entry
        text = sections[name]
        stamp = f"Kept from the run of {entry['started']}."
        kept_sections[name] = text if stamp in text else text.rstrip() + f"\n\n{stamp}\n"
    return kept_results, kept_sections


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = args.suite or list(SUITES)
    stem = "benchmarks_smoke" if args.smoke else ("benchmarks" if args.device == "cpu" else f"benchmarks_{args.device}")
    try:  # before any suite runs
        check_device(args.device, "--device")
        check_output_dir(args.out, "--out", (f"{stem}.json", f"{stem}.md"), force=True)
        kept_results, kept_sections = _kept_suites(args.out, stem, names) if args.merge else ({}, {})
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    machine = machine_info(args.device)
    results = {"machine": machine, "smoke": args.smoke, "started": datetime.now(timezone.utc).isoformat(), "suites": {}}
    new_sections = {}
    for name in names:
        module_name, _ = SUITES[name]
        module = importlib.import_module(module_name)
        start = time.perf_counter()
        suite_results, markdown = module.run(smoke=args.smoke, device=args.device)
        wall = time.perf_counter() - start
        results["suites"][name] = {"results": suite_results, "wall_s": wall, "started": results["started"],
                                   "machine": machine}
        new_sections[name] = f"## {name}\n\n{markdown}\nSuite wall time: {wall:.1f} s.\n"
        print(f"[benchmarks] {name}: {wall:.1f} s", flush=True)
    header = [
        "# Benchmarks",
        "",
        f"Command: `python -m benchmarks{' --smoke' if args.smoke else ''} --device {args.device}"
        f"{''.join(f' --suite {name}' for name in args.suite or [])}{' --merge' if args.merge else ''}` "
        f"(or `make bench`). Run {results['started']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        "Contenders are interleaved (A B, B A, ...), warmed up, and each repetition gets a fresh input "
        "tensor (Pyro transforms cache the last pair by identity). Medians with min-max; this machine "
        "is shared and noisy, so compare ratios within one run.",
        "",
    ]
    results["suites"].update(kept_results)
    results["suites"] = {name: results["suites"][name] for name in SUITES if name in results["suites"]}
    sections = [new_sections.get(name) or kept_sections[name] for name in results["suites"]]
    if kept_sections:
        header.append(f"This run: {', '.join(names)}; the other sections were kept (`--merge`) and say when they ran.\n")
    figures = draw_figures(results, args.out, stem)
    if figures:
        sections.append("## Figures\n\n" + "\n\n".join(f"![{path.stem}]({path.name})" for path in figures) + "\n")
    write_results(results, args.out / f"{stem}.json", args.out / f"{stem}.md", "\n".join(header + sections))
    print(f"[benchmarks] wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
