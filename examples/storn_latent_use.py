"""Does a trained STORN use its latent? A table per run: per feature, the data's sd, the emission
scale, and how far the emission mean moves when the sampled latent is replaced by 0; and the base
posterior's scale (1 is the prior's).

    python examples/storn_latent_use.py runs/storn_pendulum_long/none_K0_seed0 \\
        runs/storn_pendulum_long/planar_K8_seed0 --features "cos θ,sin θ,θ̇,reward"

A collapsed run has an emission scale near the spread its latent could have explained, a decoder
change near 0 and a posterior scale near 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch

from pyro_storn.cli import OneLineParser
from pyro_storn.latent_use import latent_use, latent_use_table
from pyro_storn.runs import CHECKPOINT_CHOICES, load_run, load_run_data
from pyro_storn.storn import STORN
from pyro_storn.validation import check_positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by train")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help="which state: the best validation epoch's or the last (default: best)")
    parser.add_argument("--n-sequences", type=int, default=100,
                        help="test sequences measured, the first ones of the test split "
                             "(default: 100)")
    parser.add_argument("--features", default=None,
                        help="comma-separated feature names (default: x0, x1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior draws (default: 0)")
    args = parser.parse_args(argv)
    try:
        check_positive_int("--n-sequences", args.n_sequences)
    except ValueError as error:
        parser.error(str(error))
    return args


@dataclass
class MeasuredRun:
    """What one table is made of: the trained model, its record, the first test sequences and
    the feature names."""

    run_dir: str
    storn: STORN
    record: dict[str, Any]
    x: torch.Tensor
    mask: torch.Tensor
    names: list[str]


def load_measured(run_dir: str, args: argparse.Namespace) -> MeasuredRun:
    """``ValueError`` naming the run when it cannot be measured: not a trained run, its data gone,
    not a Normal emission, or ``--features`` of another length."""
    storn, record = load_run(run_dir, checkpoint=args.checkpoint)
    if storn.emission_type != "normal":  # the table compares the data's sd with the emission's
        raise ValueError(f"{run_dir}: emission {storn.emission_type!r} has no scale to compare; "
                         "the table needs a run with the normal emission")
    try:
        data = load_run_data(record)
    except ValueError as error:
        raise ValueError(f"{run_dir}: {error}") from None
    names = (args.features.split(",") if args.features
             else [f"x{i}" for i in range(storn.input_dim)])
    if len(names) != storn.input_dim:
        raise ValueError(f"--features names {len(names)} features, the run {run_dir} has "
                         f"{storn.input_dim}")
    return MeasuredRun(run_dir, storn, record, torch.as_tensor(data.x_test[: args.n_sequences]),
                       torch.as_tensor(data.mask_test[: args.n_sequences]), names)


def run_table(run: MeasuredRun, seed: int) -> str:
    torch.manual_seed(seed)
    use = latent_use(run.storn, run.x, run.mask)
    which = run.record["checkpoint"]
    return "\n".join([f"### {run.run_dir} ({which['which']} state, epoch {which['epoch']})", "",
                      f"Base posterior scale, median: {use['q0_scale']:.3f} (the prior's: 1).", "",
                      latent_use_table(use, run.names)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # every run, before any is measured
        runs = [load_measured(run_dir, args) for run_dir in args.runs]
    except ValueError as error:
        print(f"storn_latent_use.py: error: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(run_table(run, args.seed) for run in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
