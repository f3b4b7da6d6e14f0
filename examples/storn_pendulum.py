"""Plain STORN against flow guides on the random-torque pendulum (Bayer & Osendorfer, 2014).

For every flow in ``--flows`` (``none`` = plain STORN), every length in ``--lengths`` and every seed
in ``--seeds``: train STORN (latent 2, hidden 128, batch 20, Adam 1e-3 by default), evaluate the
test -ELBO and the IWAE bound (S = 100), and write a table of mean ± sd over seeds, with wall
time, as the grid's section of the Markdown page ``--out`` (replacing the section of that name,
or appended; the rest of the page is kept). Unregistered flow names are skipped with a warning.

The full grid::

    python examples/storn_pendulum.py --flows none,planar,radial,conv_planar \\
        --lengths 2,4,8 --seeds 0,1,2 --epochs 100

Runs already finished with the same settings (their evaluation present) are reused, so the grid
can be stopped and restarted.

References:
[1] Justin Bayer, Christian Osendorfer. Learning Stochastic Recurrent Networks. arXiv:1411.7610
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pyro_storn.cli import OneLineParser
from pyro_storn.pendulum_grid import Grid, page_section, run_grid, run_name, write_page
from pyro_storn.rundir import check_device, check_output_dir, check_output_file, read_run_record
from pyro_storn.runs import FLOW_STARTS, TrainConfig
from pyro_storn.storn import ENCODERS
from pyro_storn.tables import command_line
from pyro_storn.validation import check_non_negative_int, check_positive_int, check_probability

POSITIVE_INTS = ("epochs", "n_sequences", "n_steps", "latent_dim", "hidden_dim", "batch_size",
                 "iwae_samples")


def _csv(text: str, kind=str) -> list:
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return _csv(text, int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", default="none,planar,radial", type=_csv,
                        help="comma-separated guides: 'none' (plain STORN) or registered flow "
                             "names (default: %(default)s)")
    parser.add_argument("--lengths", default="2,4,8", type=_ints,
                        help="flow lengths K, one run per flow and K (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", type=_ints,
                        help="training seeds, one run each; the data set is always seed 0 "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run (default: 100)")
    parser.add_argument("--n-sequences", type=int, default=1000,
                        help="pendulum sequences simulated, split 80/20 (default: 1000)")
    parser.add_argument("--n-steps", type=int, default=100,
                        help="time steps per sequence (default: 100)")
    parser.add_argument("--latent-dim", type=int, default=2, help="latent size Z (default: 2)")
    parser.add_argument("--hidden-dim", type=int, default=128,
                        help="GRU hidden size of the encoder and decoder (default: 128)")
    parser.add_argument("--batch-size", type=int, default=20, help="sequences per SVI step "
                                                                   "(default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate "
                                                               "(default: 0.001)")
    parser.add_argument("--encoder", choices=ENCODERS, default="forward",
                        help="the guide's RNN: 'forward' is STORN's q(z_t | x_{1:t}); 'backward' "
                        "(q(z_t | x_{t:T}), as in the DMM) and 'bidirectional' see the future "
                        "(default: forward)")
    parser.add_argument("--clip-norm", type=float, default=10.0,
                        help="the gradient of all parameters together is rescaled to at most this "
                        "norm (default: 10, as pyro-storn train)")
    parser.add_argument("--kl-anneal-epochs", type=int, default=0,
                        help="linear KL warm-up over this many epochs; 0: none (default: 0)")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="share of the training sequences held out for validation; each "
                             "run is then evaluated at its epoch of lowest validation -ELBO "
                             "instead of its last (default: 0, the last epoch)")
    parser.add_argument("--init-from-runs", default=None, metavar="DIR",
                        help="warm-start every run with seed S from DIR/none_K0_seedS, a plain "
                             "STORN run of an earlier grid on the same data and sizes (its best "
                             "state): a flow then joins a STORN that already uses its latent, and "
                             "plain STORN continues from it (default: none, a fresh start)")
    parser.add_argument("--flow-start", choices=FLOW_STARTS, default="random",
                        help="how the flow layers start: 'identity' makes each flow guide start "
                             "as exactly the plain guide it extends (iaf, maf, realnvp, nice "
                             "only; with --init-from-runs, exactly the source run's guide); "
                             "plain STORN runs are unaffected (default: random)")
    parser.add_argument("--iwae-samples", type=int, default=100,
                        help="importance samples S of the test IWAE bound (default: 100)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--runs", default="runs/storn_pendulum",
                        help="directory of the run directories and the simulated data; "
                             "finished runs with the same settings are reused "
                             "(default: %(default)s)")
    parser.add_argument("--out", default="docs/storn_pendulum.md",
                        help="Markdown page the grid's section is written into, between "
                             "'<!-- pendulum_grid:NAME begin -->' and '... end -->' lines "
                             "(that section is replaced, or appended; the rest of the page is "
                             "kept), its figures beside it in figures/NAME_losses.png etc. "
                             "(default: %(default)s)")
    parser.add_argument("--section", default=None, metavar="NAME",
                        help="the section's name (default: the --runs folder's name)")
    parser.add_argument("--notes-file", default=None,
                        help="Markdown appended to the results (discussion)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:  # before the grid runs for hours, not after
        _check_args(args)
        args.section = page_section(args.out, args.runs, args.section)
        build_grid(args).checked_cells()
    except ValueError as error:
        parser.error(str(error))
    return args


def _check_args(args: argparse.Namespace) -> None:
    """``ValueError`` naming the first bad flag; the notes file is read here, into
    ``args.notes``."""
    for name in POSITIVE_INTS:
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    for length in args.lengths:
        check_positive_int("--lengths", length)
    for seed in args.seeds:
        check_non_negative_int("--seeds", seed)
    check_non_negative_int("--kl-anneal-epochs", args.kl_anneal_epochs)
    for flag, value in (("--lr", args.lr), ("--clip-norm", args.clip_norm)):
        if not 0 < value < math.inf:
            raise ValueError(f"{flag} must be a positive number, got {value}")
    check_probability("--validation-fraction", args.validation_fraction)
    check_device(args.device, "--device")
    check_output_dir(args.runs, "--runs")
    check_output_file(args.out, "--out", force=True)
    check_output_dir(Path(args.out).parent / "figures", "--out: its figures folder")
    if args.init_from_runs is not None:
        for seed in args.seeds:
            try:
                read_run_record(Path(args.init_from_runs) / run_name("none", 0, seed))
            except ValueError as error:
                raise ValueError(f"--init-from-runs: {error}") from None
    args.notes = None
    if args.notes_file is not None:
        try:
            args.notes = Path(args.notes_file).read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ValueError(f"--notes-file {args.notes_file!r}: cannot read ({reason})") from None


def build_grid(args: argparse.Namespace) -> Grid:
    base = TrainConfig(latent_dim=args.latent_dim, hidden_dim=args.hidden_dim, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, device=args.device,
                       kl_anneal_epochs=args.kl_anneal_epochs, encoder=args.encoder,
                       clip_norm=args.clip_norm,
                       validation_fraction=args.validation_fraction)
    return Grid(args.flows, args.lengths, args.seeds, base, n_sequences=args.n_sequences,
                n_steps=args.n_steps, iwae_samples=args.iwae_samples,
                init_from_runs=args.init_from_runs, flow_start=args.flow_start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = build_grid(args)
    results = run_grid(grid, args.runs, progress=not args.quiet)
    command = command_line("examples/storn_pendulum.py", sys.argv[1:] if argv is None else argv)
    page = write_page(grid, results, args.runs, args.out, command, args.notes, args.section)
    print(f"wrote {page} (section {args.section!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
