"""The sparsity of a convolution planar layer's Jacobian (the thesis's Fig. 6.7), for the causal
and the centred filter: T = 25 steps, Z = 2 latent dims, k = 3, parameters moved off their
initialisation so every band entry is non-zero. The Jacobian is the dense autograd Jacobian of
the flattened (T, Z) event; the figure shows which entries are non-zero, and the log-det of each
layer next to slogdet of that Jacobian.

    python examples/conv_planar_jacobian.py --out docs/conv_planar
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import transforms  # noqa: E402
from pyro_storn.cli import OneLineParser  # noqa: E402
from pyro_storn.rundir import check_output_dir, write_text_atomic  # noqa: E402

OUTPUTS = ("conv_planar_jacobian.png", "conv_planar_jacobian.json")


def dense_jacobian(layer, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.reshape(shape)).reshape(-1), x.reshape(-1)
    )


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/conv_planar"),
                        help="folder for conv_planar_jacobian.png / .json")
    parser.add_argument("--steps", type=int, default=25, help="sequence length T")
    parser.add_argument("--latent-dim", type=int, default=2, help="latent dims per step Z")
    parser.add_argument("--kernel-size", type=int, default=3, help="filter width k (odd)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "latent_dim", "kernel_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd (the centred filter), got {args.kernel_size}")
    try:  # before any figure is drawn
        check_output_dir(args.out, "--out", OUTPUTS, force=True)
    except ValueError as error:
        parser.error(str(error))

    torch.manual_seed(args.seed)
    x = torch.randn(args.steps, args.latent_dim, dtype=torch.float64)
    panels, summary = [], {}
    for name, title in (("conv_planar", "causal filter"), ("conv_planar_centered", "centred filter")):
        layer = transforms.build(name, args.latent_dim, kernel_size=args.kernel_size).double()
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
        jacobian = dense_jacobian(layer, x)
        ours = layer.log_abs_det_jacobian(x, layer(x)).item()
        autograd = torch.linalg.slogdet(jacobian).logabsdet.item()
        nonzero = jacobian.abs() > 0
        panels.append((title, nonzero))
        summary[name] = {
            "log_abs_det_closed_form": ours,
            "log_abs_det_autograd_slogdet": autograd,
            "abs_difference": abs(ours - autograd),
            "nonzero_entries": int(nonzero.sum()),
            "entries": nonzero.numel(),
        }

    size = args.steps * args.latent_dim
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, (title, nonzero) in zip(axes, panels):
        ax.imshow(nonzero.numpy(), cmap="Greys", interpolation="nearest")
        ticks = range(0, size, args.latent_dim * 5)
        ax.set_xticks(list(ticks), [str(t // args.latent_dim) for t in ticks])
        ax.set_yticks(list(ticks), [str(t // args.latent_dim) for t in ticks])
        ax.set_xlabel("input step s")
        ax.set_ylabel("output step t")
        ax.set_title(f"{title}: {int(nonzero.sum())} of {nonzero.numel()} non-zero")
    fig.suptitle(f"Jacobian of one convolution planar layer, T={args.steps}, Z={args.latent_dim}, "
                 f"k={args.kernel_size}")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    figure, table = (args.out / name for name in OUTPUTS)
    fig.savefig(figure, dpi=120)
    write_text_atomic(table, json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
