"""JSB Chorales, seconds per training epoch: STORN as ``examples/jsb_chorales.sh`` configures it
against Pyro's Deep Markov Model example (:mod:`benchmarks.pyro_dmm`), epochs interleaved in one
run, on the same 229 training sequences.

An epoch is one shuffled pass over the training sequences in mini-batches of 20 (12 steps),
gradient steps only: no evaluation, no checkpoint. Ours is one epoch of the library's loop
(:func:`pyro_storn.training.fit`, nothing written) on the objective and optimiser the CLI builds;
the DMM's is the example's ``process_minibatch`` loop (``get_mini_batch``, ``SVI.step`` with
``Trace_ELBO`` and ``ClippedAdam``). Pairings: the plain guide against the DMM without IAF, IAF
x2 against the DMM with 2 IAF layers.

    python -m benchmarks --suite jsb
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from pyro_storn.data.polyphonic import N_NOTES, PolyphonicSplit, load_polyphonic
from pyro_storn.runs import TrainConfig, build_storn
# the CLI's own loss and optimiser for a config, so that ours is what jsb_chorales.sh trains
from pyro_storn.runs import _make_loss, _optimizer
from pyro_storn.training import elbo_module, fit

from . import pyro_dmm
from .harness import Timing, paired_interval, paired_ratio, time_interleaved

__all__ = ["run", "JSB"]

# ../shared/data beside the checkout, or where PYRO_STORN_JSB says (as tests/test_polyphonic.py).
JSB = Path(os.environ.get(
    "PYRO_STORN_JSB",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "jsb_chorales" / "jsb_chorales.pickle",
))
DMM_SOURCE = "pyro-ppl/pyro `examples/dmm/dmm.py` (Pyro 1.9)"
# examples/jsb_chorales.sh's flags (hidden 128 GRU is the default rnn); (flow, length, DMM IAFs)
STORN_SETTINGS = dict(emission="bernoulli", encoder="backward", emission_hidden=256,
                      latent_dim=32, hidden_dim=128, batch_size=20, lr=1e-3, lr_decay=0.999,
                      weight_decay=0.01,
                      kl_anneal_epochs=100, clip_norm=10.0)
PAIRINGS = (("none", 0, 0), ("iaf", 2, 2))
REPEATS, WARMUP = 5, 1
# The smoke run: two mini-batches of sequences cut to this many frames, once each.
SMOKE_MINI_BATCHES, SMOKE_FRAMES = 2, 4
# The issue's figure for the example's epoch on a 2-core machine, quoted beside ours.
ISSUE_DMM_SECONDS_PER_EPOCH = 8.0


def _smoke_split(split: PolyphonicSplit) -> PolyphonicSplit:
    n = SMOKE_MINI_BATCHES * pyro_dmm.MINI_BATCH_SIZE
    return PolyphonicSplit(split.name, split.x[:n, :SMOKE_FRAMES], split.mask[:n, :SMOKE_FRAMES])


def _storn_epochs(split: PolyphonicSplit, flow: str, length: int, device: torch.device,
                  max_steps: int | None) -> Callable[[Any], None]:
    """A call per epoch of STORN's training through the library's loop, epoch by epoch (each
    call a fresh Adam: its moments start at zero, which costs a step no more than later ones)."""
    config = TrainConfig(flow=flow, flow_length=length, device=str(device),
                         **STORN_SETTINGS).validate()
    x, mask = torch.from_numpy(split.x), torch.from_numpy(split.mask)
    pyro.set_rng_seed(0)
    storn = build_storn(N_NOTES, config)
    storn.set_data_statistics(x, mask)
    objective = elbo_module(_make_loss(config), storn)
    optimizer = _optimizer(config, math.ceil(len(x) / config.batch_size))
    epoch = 0

    def one_epoch(_: Any) -> None:
        nonlocal epoch
        storn.kl_weight = min(1.0, (epoch + 1) / config.kl_anneal_epochs)
        fit(objective, storn, (x, mask), epochs=1, batch_size=config.batch_size, run_dir=None,
            optimizer=optimizer, seed=epoch, device=device, progress=False, max_steps=max_steps)
        epoch += 1

    return one_epoch


class _OwnRandomStream:
    """Runs calls on a torch random stream of their own (CPU, and the device's on CUDA), seeded
    once and continued from call to call, whatever is drawn between the calls."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(seed)
            self._states = self._get()

    def _get(self) -> list[torch.Tensor]:
        return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in self._devices]

    def __call__(self, function: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self._states[0])
            for device, state in zip(self._devices, self._states[1:]):
                torch.cuda.set_rng_state(state, device)
            result = function()
            self._states = self._get()
        return result


def _dmm_epochs(split: PolyphonicSplit, num_iafs: int, device: torch.device,
                n_mini_batches: int | None) -> Callable[[Any], None]:
    """A call per epoch of the DMM example's training. Its draws come from a stream of its own:
    the example's first epochs can diverge to NaN on some streams, so whether a run does must
    not hang on how many draws ours took between its epochs (fit reseeds ours every epoch)."""
    sequences, lengths = pyro_dmm.training_tensors(split)
    stream = _OwnRandomStream(0, device)
    trainer = stream(lambda: pyro_dmm.DMMTrainer(sequences, lengths, num_iafs=num_iafs,
                                                 cuda=device.type == "cuda"))
    epoch = 0

    def one_epoch(_: Any) -> None:
        nonlocal epoch
        try:
            stream(lambda: trainer.train_epoch(epoch, n_mini_batches))
        except ValueError as error:  # NaN parameters fail Pyro's argument checks a step later
            raise RuntimeError(f"Pyro's DMM example ({num_iafs} IAF) diverged in epoch "
                               f"{epoch + 1}; the example's own loop stops there too") from error
        epoch += 1

    return one_epoch


def _pairing(split: PolyphonicSplit, flow: str, length: int, num_iafs: int, device: torch.device,
             smoke: bool) -> dict[str, Any]:
    pyro.clear_param_store()  # both sides register their modules by name in the param store
    contenders = {
        "ours": _storn_epochs(split, flow, length, device, SMOKE_MINI_BATCHES if smoke else None),
        "dmm": _dmm_epochs(split, num_iafs, device, SMOKE_MINI_BATCHES if smoke else None),
    }
    repeats, warmup = (1, 0) if smoke else (REPEATS, WARMUP)
    timings: dict[str, Timing] = time_interleaved(contenders, lambda: None, repeats=repeats,
                                                  warmup=warmup, device=device)
    ours, dmm = timings["ours"], timings["dmm"]
    return {
        "ours": {"flow": f"{flow} x{length}" if length else flow, **ours.summary(),
                 "seconds": ours.seconds},
        "dmm": {"num_iafs": num_iafs, **dmm.summary(), "seconds": dmm.seconds},
        "ratio": dmm.median / ours.median,
        "paired_ratio": paired_ratio(dmm, ours),
        "paired_interval": paired_interval(dmm, ours),
        "dmm_default_epochs_s": dmm.median * pyro_dmm.NUM_EPOCHS,
    }


def run(*, smoke: bool = False, device: torch.device | str = "cpu") -> tuple[dict[str, Any], str]:
    device = torch.device(device)
    if not JSB.is_file():
        return ({"skipped": f"no data file at {JSB}"},
                f"Skipped: JSB Chorales not found at `{JSB}` (set PYRO_STORN_JSB).\n")
    train = load_polyphonic(JSB).train
    if smoke:
        train = _smoke_split(train)
    rows = [_pairing(train, flow, length, iafs, device, smoke) for flow, length, iafs in PAIRINGS]
    results = {"data": str(JSB), "sequences": len(train), "frames": train.n_frames,
               "torch_threads": torch.get_num_threads(), "rows": rows}
    return results, _markdown(results, smoke)


def _seconds(summary: dict[str, Any]) -> str:
    return f"{summary['median_s']:.2f} ({summary['min_s']:.2f}-{summary['max_s']:.2f})"


def _markdown(results: dict[str, Any], smoke: bool) -> str:
    rows = results["rows"]
    repeats = rows[0]["ours"]["repeats"]
    what = (f"{SMOKE_MINI_BATCHES} mini-batches of sequences cut to {SMOKE_FRAMES} frames (smoke)"
            if smoke else f"one epoch, the {results['sequences']} training sequences "
            f"({results['frames']} frames) shuffled, in mini-batches of 20 (12 gradient steps)")
    lines = [
        "### JSB Chorales, seconds per training epoch: STORN against Pyro's DMM example",
        "",
        f"Timed: {what}, gradient steps only (no evaluation, no checkpoint), "
        f"{results['torch_threads']} torch thread(s). "
        f"Epochs interleaved (ours, DMM, DMM, ours, ...), {WARMUP if not smoke else 0} warm-up "
        f"epoch each, then {repeats} timed; median (min-max) seconds. Data: the train split of "
        f"`{Path(results['data']).name}` read by `pyro_storn.data.polyphonic.load_polyphonic`, "
        "the same 0/1 rolls for both; each side trains from seed 0 on a random stream of its own.",
        "",
        "Ours: STORN as `examples/jsb_chorales.sh` configures it (Bernoulli emission, backward "
        "GRU encoder, MLP emission (two ReLU layers of 256) of [h_t, z_t], latent 32, hidden 128, "
        "lr 1e-3 decaying 0.999 per epoch, weight decay 0.01, "
        "global clip 10, KL annealing over 100 epochs), one epoch of `pyro_storn.training.fit` on "
        "the CLI's objective: TraceMeanField_ELBO for the plain guide (analytic Gaussian KL), "
        "Trace_ELBO with IAF x2. Its mini-batches keep the padding to the split's longest "
        "sequence (129 frames), and its latent is one sample site over all frames, networks "
        "run over whole sequences at once.",
        "",
        f"DMM: {DMM_SOURCE} and the mini-batch helpers of "
        "`pyro/contrib/examples/polyphonic_data_loader.py`, ported in `benchmarks/pyro_dmm.py` "
        "(Apache-2.0, Pyro's authors; only the data loading changed) with the example's defaults: "
        "z 100, emission 100, transition 200, ReLU RNN 600 over the reversed sequences, IAF "
        "hidden 100, `ClippedAdam` lr 3e-4, betas (0.96, 0.999), clip_norm 10, lrd 0.99996, "
        "weight_decay 2.0, `Trace_ELBO`, KL annealing by `poutine.scale` from 0.2 over 1000 "
        "epochs. Its mini-batches are cut to their longest sequence and it takes two sample "
        "sites per frame in a Python loop. With IAFs, each frame's log q runs the IAF's "
        "sequential inverse (100 network passes per layer): the layers are shared by all frames "
        "and their one-entry cache holds only the last (x, y) pair when the guide is scored.",
        "",
        "Ratio: DMM / ours, of the medians and paired (the median over rounds of the two epochs "
        "timed back to back, with its 95% bootstrap interval). The machine is shared: absolute "
        "seconds are inflated by other load, the interleaved ratio is what to quote. "
        f"DMM x {pyro_dmm.NUM_EPOCHS}: its median times the example's default "
        f"`--num-epochs {pyro_dmm.NUM_EPOCHS}` (an earlier measurement on a 2-core machine: about "
        f"{ISSUE_DMM_SECONDS_PER_EPOCH:.0f} s per epoch on 2 cores).",
        "",
        "| ours | s/epoch (min-max) | DMM | s/epoch (min-max) | DMM / ours | paired (95% interval) "
        f"| DMM x {pyro_dmm.NUM_EPOCHS} epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["paired_interval"]
        hours = row["dmm_default_epochs_s"] / 3600
        lines.append(
            f"| STORN {row['ours']['flow']} | {_seconds(row['ours'])} | DMM, {row['dmm']['num_iafs']} IAF "
            f"| {_seconds(row['dmm'])} | {row['ratio']:.1f} | {row['paired_ratio']:.1f} "
            f"({low:.1f}-{high:.1f}) | {hours:.1f} h |"
        )
    return "\n".join(lines) + "\n"
