"""The port of Pyro's DMM example that the JSB benchmark times: its ELBO and optimiser step work
on a mini-batch, and its mini-batches hold each sequence reversed within its length."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from torch.nn.utils.rnn import pad_packed_sequence

from benchmarks.pyro_dmm import DMMTrainer, get_mini_batch, pad_and_reverse, training_tensors
from pyro_storn.data.polyphonic import piano_roll

LENGTHS = (3, 5, 2)


def _sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Three padded sequences whose frames are all different, so a wrong order shows."""
    x = torch.arange(len(LENGTHS) * max(LENGTHS) * 88, dtype=torch.float32)
    x = x.reshape(len(LENGTHS), max(LENGTHS), 88)
    lengths = torch.tensor(LENGTHS)
    x[torch.arange(max(LENGTHS))[None, :] >= lengths[:, None]] = 0.0
    return x, lengths


@pytest.mark.parametrize("num_iafs", [0, 2])
def test_one_step_has_a_finite_elbo_and_clipped_adam_moves_the_parameters(num_iafs):
    pyro.clear_param_store()
    torch.manual_seed(0)
    rolls = piano_roll([[(60 + t % 5, 64) for t in range(n)] for n in (6, 3, 5, 2)])
    trainer = DMMTrainer(*training_tensors(rolls), num_iafs=num_iafs, mini_batch_size=4)
    before = {name: p.detach().clone() for name, p in trainer.dmm.named_parameters()}
    loss = trainer.process_minibatch(0, 0, torch.arange(4))
    assert math.isfinite(loss) and loss > 0
    changed = [name for name, p in trainer.dmm.named_parameters() if not torch.equal(p, before[name])]
    assert sorted(changed) == sorted(before)  # every parameter, the IAFs' included
    assert any(name.startswith("iafs_modules") for name in changed) == (num_iafs > 0)


def test_mini_batches_are_sorted_by_length_and_reversed_within_each_length():
    sequences, lengths = _sequences()
    mini_batch, reversed_packed, mask, sorted_lengths = get_mini_batch(
        torch.arange(len(LENGTHS)), sequences, lengths)
    order = [1, 0, 2]  # by decreasing length, as packing needs
    assert sorted_lengths.tolist() == [LENGTHS[i] for i in order]
    assert torch.equal(mini_batch, sequences[order])
    assert mask.tolist() == [[1.0] * n + [0.0] * (max(LENGTHS) - n) for n in sorted_lengths.tolist()]
    unpacked, unpacked_lengths = pad_packed_sequence(reversed_packed, batch_first=True)
    assert unpacked_lengths.tolist() == sorted_lengths.tolist()
    for row, index in enumerate(order):
        n = LENGTHS[index]
        by_hand = torch.zeros_like(sequences[index])
        by_hand[:n] = torch.stack([sequences[index, t] for t in reversed(range(n))])
        assert torch.equal(unpacked[row], by_hand)
    # the guide's pad_and_reverse puts the RNN's reversed-time output back in time order
    assert torch.equal(pad_and_reverse(reversed_packed, sorted_lengths), mini_batch)


def test_training_tensors_are_the_rolls_and_their_lengths():
    rolls = piano_roll([[(21,), (108, 60)], [(43,)]])
    sequences, lengths = training_tensors(rolls)
    assert sequences.dtype == torch.float32 and lengths.dtype == torch.int64
    assert lengths.tolist() == [2, 1]
    assert np.array_equal(sequences.numpy(), rolls.x)
