"""Our flows inside Pyro's AutoNormalizingFlow, on two posteriors that defeat mean field.

Targets (both normalised, both sampled exactly, so log Z = 0 and the true draws are at hand):

- Neal's funnel in ``--funnel-dim`` dims: y ~ N(0, 3), x_i | y ~ N(0, exp(y / 2)).
- A Rosenbrock-shaped banana: log p(x1, x2) = -[(1 - x1)^2 + 2 (x2 - x1^2)^2] / 2 + const,
  i.e. x1 ~ N(1, 1), x2 | x1 ~ N(x1^2, 1/2).

Guides: AutoNormal, AutoMultivariateNormal, and
``AutoNormalizingFlow(model, transforms.factory(name, length))`` for each flow in ``--flows``
(skipped with a warning if not registered). Each is fitted by SVI (Trace_ELBO, Adam;
``pyro_storn.autoguide_study.fit_and_judge``), then judged by its final ELBO (mean of the last 10%
of steps), the PSIS k-hat of ``--draws`` importance draws (``pyro_storn.diagnostics``; it equals
``pyro.infer.importance.psis_diagnostic`` on the same draws), the IWAE bound (log Z = 0 is the
truth), ESS, and an ``az.plot_pair`` of its draws over the exact ones. Writes ``docs/autoguide_flows.md`` and figures in ``docs/autoguide_flows/``.

    python examples/autoguide_flows.py            # full run, a few minutes on one core
    python examples/autoguide_flows.py --quick --out /tmp/af --doc /tmp/af.md   # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import arviz  # noqa: F401  (imported up front so that its import time is in no guide's timing)
import torch

from pyro_storn.autoguide_study import (GuideResult, SVISettings, fit_and_judge, guide_builders,
                                        verdict, write_page)
from pyro_storn.cli import OneLineParser
from pyro_storn.rundir import check_output_dir, check_output_file
from pyro_storn.tables import Stopwatch, command_line
from pyro_storn.target_figures import plot_guide_draws
from pyro_storn.targets import banana_target, funnel_target
from pyro_storn.validation import check_non_negative_int, check_positive_int

ROOT = Path(__file__).resolve().parents[1]
# The last one shows what an affine layer in front does for a bounded-perturbation flow.
DEFAULT_FLOWS = ("planar", "radial", "sylvester", "iaf", "realnvp", "actnorm+planar")
# Layers per flow in the full run: the cheap rank-one flows get more layers for similar cost.
DEFAULT_LENGTHS = {"planar": 8, "radial": 8, "sylvester": 4, "iaf": 4, "realnvp": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps, draws, flows of length 2): seconds")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps per guide (default 2000; quick: 30)")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per step (default 8)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--draws", type=int, default=None, help="importance draws for k-hat (default 4000; quick: 200)")
    parser.add_argument(
        "--flows", default=",".join(DEFAULT_FLOWS),
        help=f"comma-separated flow names; 'a+b' puts one layer of a before b's layers "
        f"(default {','.join(DEFAULT_FLOWS)})",
    )
    parser.add_argument("--length", type=int, default=None, help="layers for every flow (default: per flow, planar/radial 8, others 4; quick: 2)")
    parser.add_argument("--funnel-dim", type=int, default=3, help="funnel dimension, >= 2 (default 3)")
    parser.add_argument("--targets", default="funnel,banana", help="comma-separated: funnel, banana")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "autoguide_flows", help="figure folder")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "autoguide_flows.md", help="Markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        for option in ("steps", "particles", "draws", "length", "funnel_dim"):
            if getattr(args, option) is not None:
                check_positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
        check_non_negative_int("--seed", args.seed)
        # before any guide is fitted: the figure folder and the page
        check_output_dir(args.out, "--out")
        check_output_file(args.doc, "--doc", force=True)
    except ValueError as error:
        parser.error(str(error))
    if args.funnel_dim < 2:
        parser.error(f"--funnel-dim must be >= 2, got {args.funnel_dim}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be positive, got {args.lr}")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(args.targets) - {"funnel", "banana"})
    if unknown or not args.targets:
        parser.error(f"unknown --targets {', '.join(unknown) or '(none)'}; valid: funnel, banana")
    args.flows = [f.strip() for f in args.flows.split(",") if f.strip()]
    args.steps = args.steps or (30 if args.quick else 2000)
    args.draws = args.draws or (200 if args.quick else 4000)
    return args


def main(argv: list[str] | None = None) -> list[GuideResult]:
    args = parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the timings in the docs are for one core
    lengths = {
        name: args.length or (2 if args.quick else DEFAULT_LENGTHS.get(name, 4))
        for spec in args.flows
        for name in spec.split("+")
    }
    builders = guide_builders(args.flows, lengths)
    settings = SVISettings(args.steps, args.particles, args.lr, args.draws, args.seed)
    targets = {"funnel": funnel_target(args.funnel_dim), "banana": banana_target()}
    args.out.mkdir(parents=True, exist_ok=True)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    results: list[GuideResult] = []
    figures: list[Path] = []
    clock = Stopwatch()
    for target_name in args.targets:
        target = targets[target_name]
        idatas, khats = {}, {}
        for guide_name, make_guide in builders.items():
            result, idatas[guide_name] = fit_and_judge(target, guide_name, make_guide, settings,
                                                       progress=not args.quiet)
            results.append(result)
            khats[guide_name] = result.khat
            if not args.quiet:
                print(f"{target.name:7s} {guide_name:24s} ELBO {result.final_elbo:8.3f}  k-hat {result.khat:5.2f}  "
                      f"IWAE {result.iwae:7.3f}  ESS {result.ess:6.0f}  {result.seconds:5.1f} s  "
                      f"(CPU {result.cpu_seconds:5.1f} s)  {result.status}", flush=True)
        figures.append(plot_guide_draws(target, idatas, khats, args.out, args.seed))
    total, total_cpu = clock.wall_s, clock.cpu_s
    command = command_line(os.path.relpath(__file__, ROOT), sys.argv[1:] if argv is None else argv)
    write_page(args.doc, results, figures, settings, command, total, total_cpu)
    if not args.quiet:
        print("\n".join(verdict(results)))
        print(f"wrote {args.doc} and {len(figures)} figures in {args.out} ({total:.0f} s)")
    return results


if __name__ == "__main__":
    main()
