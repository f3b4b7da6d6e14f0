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

import torch

from pyro_storn.latent_use import latent_use, latent_use_table
from pyro_storn.runs import CHECKPOINT_CHOICES, load_run, load_run_data
from pyro_storn.validation import check_positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
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


def run_table(run_dir: str, args: argparse.Namespace) -> str:
    storn, record = load_run(run_dir, checkpoint=args.checkpoint)
    data = load_run_data(record)
    x = torch.as_tensor(data.x_test[: args.n_sequences])
    mask = torch.as_tensor(data.mask_test[: args.n_sequences])
    names = (args.features.split(",") if args.features
             else [f"x{i}" for i in range(storn.input_dim)])
    if len(names) != storn.input_dim:
        raise ValueError(f"--features names {len(names)} features, the run has {storn.input_dim}")
    torch.manual_seed(args.seed)
    use = latent_use(storn, x, mask)
    which = record["checkpoint"]
    return "\n".join([f"### {run_dir} ({which['which']} state, epoch {which['epoch']})", "",
                      f"Base posterior scale, median: {use['q0_scale']:.3f} (the prior's: 1).", "",
                      latent_use_table(use, names)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("\n\n".join(run_table(run_dir, args) for run_dir in args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
