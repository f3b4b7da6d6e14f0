"""``python -m pyro_storn.demo`` (what ``make demo`` runs): the pendulum end to end.

Simulates the random-torque pendulum (cached in the output directory), trains plain STORN and
STORN with a flow guide (radial, K = 4, conditioned on the encoder state) on a budget of minutes on
a CPU, evaluates both (test -ELBO, IWAE and the guide's PSIS k̂ per test sequence, from one set of
importance draws), generates from step 0 and writes ``runs/demo/report.md``. The settings are
smaller than the reference experiment's (hidden 64, batch 25, 20 epochs);
``examples/storn_pendulum.py`` runs the full experiment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import transforms

from .cli import OneLineParser
from .data.pendulum import PendulumParams, load_or_simulate
from .data.sequences import load_sequences
from .report import write_report
from .rundir import check_device, check_output_dir
from .runs import TrainConfig, evaluate_run, generate_run, train
from .validation import check_positive_int

__all__ = ["run_demo", "main"]

# Flows tried in this order for the flow run: the first one registered is used.
PREFERRED_FLOWS = ("radial", "planar", "sylvester", "iaf")


def pick_flow(preferred: str | None = None) -> str:
    names = transforms.available(event_dim=1)
    if preferred is not None:
        transforms.info(preferred)
        return preferred
    for name in PREFERRED_FLOWS:
        if name in names:
            return name
    raise ValueError(f"none of the demo's flows {PREFERRED_FLOWS} is registered; "
                     f"available: {', '.join(transforms.available())}")


def run_demo(
    out_dir: str | Path = "runs/demo",
    epochs: int = 20,
    hidden_dim: int = 64,
    batch_size: int = 25,
    flow: str | None = None,
    flow_length: int = 4,
    n_sequences: int = 1000,
    n_steps: int = 100,
    iwae_samples: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run the demo into ``out_dir``; returns the report's path. Bad settings are a
    ``ValueError`` before anything is simulated or trained."""
    out_dir = Path(out_dir)
    flow = pick_flow(flow)
    runs = {"storn": TrainConfig(), f"storn_{flow}{flow_length}":
            TrainConfig(flow=flow, flow_length=flow_length)}
    for config in runs.values():
        config.hidden_dim, config.epochs, config.batch_size = hidden_dim, epochs, batch_size
        config.seed, config.device = seed, device
        config.validate()
    for name, value in (("n_sequences", n_sequences), ("n_steps", n_steps),
                        ("iwae_samples", iwae_samples)):
        check_positive_int(name, value)
    check_output_dir(out_dir, "out_dir")
    data_path = out_dir / "pendulum.npz"
    load_or_simulate(data_path, PendulumParams(n_sequences, n_steps, seed))
    data = load_sequences(data_path)
    started = time.perf_counter()
    for name, config in runs.items():
        print(f"[demo] training {name} ({config.flow}, K={config.flow_length}) "
              f"for {epochs} epochs", file=sys.stderr)
        train(data, out_dir / name, config, data_path=data_path, progress=progress)
        # psis_samples = num_samples: the PSIS diagnostics reuse the IWAE's draws
        evaluate_run(out_dir / name, num_samples=iwae_samples, seed=seed,
                     psis_samples=iwae_samples if iwae_samples >= 2 else None)
        generate_run(out_dir / name, n_prefix=1, n_sequences=1, num_samples=5, seed=seed)
    elapsed = time.perf_counter() - started
    notes = (f"`python -m pyro_storn.demo`: {n_sequences} pendulum sequences x {n_steps} steps "
             f"(80/20 split), hidden {hidden_dim}, latent 2, batch {batch_size}, Adam 1e-3, "
             f"{epochs} epochs, seed {seed}, IWAE and PSIS k̂ with S = {iwae_samples}; "
             f"{elapsed:.0f} s in all on this machine.")
    return write_report({name: out_dir / name for name in runs}, out_dir / "report.md",
                        title="pyro-storn demo: STORN on the inverted pendulum", notes=notes)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pyro_storn.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--flow", default=None, help="default: radial (or the first registered "
                        f"of {', '.join(PREFERRED_FLOWS)})")
    parser.add_argument("--flow-length", type=int, default=4)
    parser.add_argument("--iwae-samples", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:  # the flags by name, before run_demo checks its settings
        for flag in ("epochs", "hidden_dim", "batch_size", "flow_length", "iwae_samples"):
            check_positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
        check_device(args.device, "--device")
        check_output_dir(args.out, "--out")
        if args.flow is not None and args.flow not in transforms.available():
            raise ValueError(f"--flow {args.flow!r} is not registered; available: "
                             f"{', '.join(transforms.available())}")
    except ValueError as error:
        parser.error(str(error))
    try:
        report = run_demo(args.out, args.epochs, args.hidden_dim, args.batch_size, args.flow,
                          args.flow_length, iwae_samples=args.iwae_samples, device=args.device,
                          progress=not args.quiet)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
