"""Pyro's Deep Markov Model example, ported to be timed beside STORN on JSB Chorales.

Source: pyro-ppl/pyro, ``examples/dmm/dmm.py`` (Pyro 1.9) and the mini-batch helpers of
``pyro/contrib/examples/polyphonic_data_loader.py``; Copyright (c) 2017-2019 Uber Technologies,
Inc., Pyro's authors; Apache License 2.0 (SPDX-License-Identifier: Apache-2.0).

Kept as the example has them: ``Emitter``, ``GatedTransition``, ``Combiner`` and ``DMM`` (the
model, and the guide with its RNN over the reversed sequences and optional IAF layers from
``affine_autoregressive``); ``reverse_sequences``, ``pad_and_reverse``, ``get_mini_batch_mask``
and ``get_mini_batch`` (sorting by length, reversal, ``pack_padded_sequence``); and the training
part of ``main``: ``ClippedAdam`` with the argparse defaults (below), ``SVI`` with
``Trace_ELBO``, ``process_minibatch``'s KL annealing by ``poutine.scale`` and the shuffled epoch
over mini-batches of 20 (:class:`DMMTrainer`).

Changed, only to run without downloads: the training sequences come from our safe reader
(:func:`training_tensors` of :func:`pyro_storn.data.polyphonic.load_polyphonic`'s train split:
the same 0/1 rolls, column ``note - 21``, padded to the longest sequence, that ``poly.load_data``
builds from the same pickle) instead of ``poly.load_data``'s download. Left out: logging,
validation/test evaluation, checkpoints, the argparse front end and the JIT/TMC options (all off
by default).

References:
[1] Rahul G. Krishnan, Uri Shalit, David Sontag. Structured Inference Networks for Nonlinear
    State Space Models. AAAI 2017. arXiv:1609.09869
"""

# Written out by hand: the example is not in the pyro package, and its data loader (which is)
# imports torchvision and makes a data directory when imported.

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.distributions import TransformedDistribution
from pyro.distributions.transforms import affine_autoregressive
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from pyro_storn.data.polyphonic import PolyphonicSplit

__all__ = [
    "Emitter", "GatedTransition", "Combiner", "DMM", "DMMTrainer", "reverse_sequences",
    "pad_and_reverse", "get_mini_batch_mask", "get_mini_batch", "training_tensors",
]

# The example's argparse defaults (python dmm.py with no flags).
NUM_EPOCHS = 5000
LEARNING_RATE = 3e-4
BETA1, BETA2 = 0.96, 0.999
CLIP_NORM = 10.0
LR_DECAY = 0.99996
WEIGHT_DECAY = 2.0
MINI_BATCH_SIZE = 20
ANNEALING_EPOCHS = 1000
MINIMUM_ANNEALING_FACTOR = 0.2
RNN_DROPOUT_RATE = 0.1
IAF_DIM = 100


class Emitter(nn.Module):
    """Parameterizes the bernoulli observation likelihood ``p(x_t | z_t)``."""

    def __init__(self, input_dim, z_dim, emission_dim):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, input_dim)
        self.relu = nn.ReLU()

    def forward(self, z_t):
        h1 = self.relu(self.lin_z_to_hidden(z_t))
        h2 = self.relu(self.lin_hidden_to_hidden(h1))
        ps = torch.sigmoid(self.lin_hidden_to_input(h2))
        return ps


class GatedTransition(nn.Module):
    """Parameterizes the gaussian latent transition probability ``p(z_t | z_{t-1})`` (section 5
    of [1])."""

    def __init__(self, z_dim, transition_dim):
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_sig = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        # the linear part of the mean starts out as the identity function
        self.lin_z_to_loc.weight.data = torch.eye(z_dim)
        self.lin_z_to_loc.bias.data = torch.zeros(z_dim)
        self.relu = nn.ReLU()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1):
        _gate = self.relu(self.lin_gate_z_to_hidden(z_t_1))
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(_gate))
        _proposed_mean = self.relu(self.lin_proposed_mean_z_to_hidden(z_t_1))
        proposed_mean = self.lin_proposed_mean_hidden_to_z(_proposed_mean)
        # the mean mixes a linear map of z_{t-1} with the proposed mean, by the gate
        loc = (1 - gate) * self.lin_z_to_loc(z_t_1) + gate * proposed_mean
        scale = self.softplus(self.lin_sig(self.relu(proposed_mean)))
        return loc, scale


class Combiner(nn.Module):
    """Parameterizes ``q(z_t | z_{t-1}, x_{t:T})``; ``x_{t:T}`` enters through the hidden state
    of the guide's RNN."""

    def __init__(self, z_dim, rnn_dim):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh = nn.Tanh()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1, h_rnn):
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_t_1)) + h_rnn)
        loc = self.lin_hidden_to_loc(h_combined)
        scale = self.softplus(self.lin_hidden_to_scale(h_combined))
        return loc, scale


class DMM(nn.Module):
    """The model and the guide (the variational distribution) of the Deep Markov Model."""

    def __init__(self, input_dim=88, z_dim=100, emission_dim=100, transition_dim=200,
                 rnn_dim=600, num_layers=1, rnn_dropout_rate=0.0, num_iafs=0, iaf_dim=50,
                 use_cuda=False):
        super().__init__()
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        # dropout only acts between stacked layers
        rnn_dropout_rate = 0.0 if num_layers == 1 else rnn_dropout_rate
        self.rnn = nn.RNN(input_size=input_dim, hidden_size=rnn_dim, nonlinearity="relu",
                          batch_first=True, bidirectional=False, num_layers=num_layers,
                          dropout=rnn_dropout_rate)
        self.iafs = [affine_autoregressive(z_dim, hidden_dims=[iaf_dim]) for _ in range(num_iafs)]
        self.iafs_modules = nn.ModuleList(self.iafs)
        # z_0 and z_q_0 stand in for z_{t-1} at t = 1 in p(z_1) and q(z_1)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))
        self.use_cuda = use_cuda
        if use_cuda:
            self.cuda()

    # the model p(x_{1:T} | z_{1:T}) p(z_{1:T})
    def model(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                # poutine.scale does the KL annealing; mask() the raggedness of the sequences
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample("z_%d" % t, dist.Normal(z_loc, z_scale)
                                      .mask(mini_batch_mask[:, t - 1:t]).to_event(1))
                emission_probs_t = self.emitter(z_t)
                pyro.sample("obs_x_%d" % t, dist.Bernoulli(emission_probs_t)
                            .mask(mini_batch_mask[:, t - 1:t]).to_event(1),
                            obs=mini_batch[:, t - 1, :])
                z_prev = z_t

    # the guide q(z_{1:T} | x_{1:T})
    def guide(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        # the RNN reads each sequence backwards; its states are put back in time order
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        rnn_output = pad_and_reverse(rnn_output, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                if len(self.iafs) > 0:
                    z_dist = TransformedDistribution(dist.Normal(z_loc, z_scale), self.iafs)
                    assert z_dist.event_shape == (self.z_q_0.size(0),)
                    assert z_dist.batch_shape[-1:] == (len(mini_batch),)
                else:
                    z_dist = dist.Normal(z_loc, z_scale)
                    assert z_dist.event_shape == ()
                    assert z_dist.batch_shape[-2:] == (len(mini_batch), self.z_q_0.size(0))
                with pyro.poutine.scale(scale=annealing_factor):
                    if len(self.iafs) > 0:
                        # the flow's output dimensions are correlated: its event shape is (z_dim,)
                        z_t = pyro.sample("z_%d" % t, z_dist.mask(mini_batch_mask[:, t - 1]))
                    else:
                        z_t = pyro.sample("z_%d" % t, z_dist.mask(mini_batch_mask[:, t - 1:t])
                                          .to_event(1))
                z_prev = z_t


# ---- polyphonic_data_loader's mini-batch helpers ----------------------------------------------

def reverse_sequences(mini_batch, seq_lengths):
    """Each sequence of ``mini_batch`` (B, T, D) reversed in time within its length."""
    reversed_mini_batch = torch.zeros_like(mini_batch)
    for b in range(mini_batch.size(0)):
        T = seq_lengths[b]
        time_slice = torch.arange(T - 1, -1, -1, device=mini_batch.device)
        reversed_sequence = torch.index_select(mini_batch[b, :, :], 0, time_slice)
        reversed_mini_batch[b, 0:T, :] = reversed_sequence
    return reversed_mini_batch


def pad_and_reverse(rnn_output, seq_lengths):
    """The RNN's packed output unpacked and reversed in time within each length."""
    rnn_output, _ = nn.utils.rnn.pad_packed_sequence(rnn_output, batch_first=True)
    reversed_output = reverse_sequences(rnn_output, seq_lengths)
    return reversed_output


def get_mini_batch_mask(mini_batch, seq_lengths):
    """A 0/1 mask (B, T) of the steps within each sequence's length."""
    mask = torch.zeros(mini_batch.shape[0:2])
    for b in range(mini_batch.shape[0]):
        mask[b, 0:seq_lengths[b]] = torch.ones(seq_lengths[b])
    return mask


def get_mini_batch(mini_batch_indices, sequences, seq_lengths, cuda=False):
    """The mini-batch in time order, reversed and packed for the RNN (packing needs the
    sequences sorted by decreasing length), its mask and its sorted lengths."""
    seq_lengths = seq_lengths[mini_batch_indices]
    _, sorted_seq_length_indices = torch.sort(seq_lengths)
    sorted_seq_length_indices = sorted_seq_length_indices.flip(0)
    sorted_seq_lengths = seq_lengths[sorted_seq_length_indices]
    sorted_mini_batch_indices = mini_batch_indices[sorted_seq_length_indices]

    T_max = torch.max(seq_lengths)
    mini_batch = sequences[sorted_mini_batch_indices, 0:T_max, :]
    mini_batch_reversed = reverse_sequences(mini_batch, sorted_seq_lengths)
    mini_batch_mask = get_mini_batch_mask(mini_batch, sorted_seq_lengths)

    if cuda:  # before packing
        mini_batch = mini_batch.cuda()
        mini_batch_mask = mini_batch_mask.cuda()
        mini_batch_reversed = mini_batch_reversed.cuda()

    mini_batch_reversed = nn.utils.rnn.pack_padded_sequence(
        mini_batch_reversed, sorted_seq_lengths, batch_first=True)
    return mini_batch, mini_batch_reversed, mini_batch_mask, sorted_seq_lengths


def training_tensors(split: PolyphonicSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences, sequence_lengths)`` as ``poly.load_data`` gives them for a split: float
    (N, T_max, 88) rolls zero-padded to the longest sequence, and int64 lengths."""
    return torch.from_numpy(split.x).float(), torch.from_numpy(split.lengths).long()


# ---- main()'s training ------------------------------------------------------------------------

class DMMTrainer:
    """The training part of the example's ``main``: the DMM, ``ClippedAdam`` with its defaults,
    ``SVI`` with ``Trace_ELBO``, and ``process_minibatch`` over each epoch's shuffled order."""

    def __init__(self, training_data_sequences, training_seq_lengths, num_iafs=0,
                 mini_batch_size=MINI_BATCH_SIZE, cuda=False):
        self.training_data_sequences = training_data_sequences
        self.training_seq_lengths = training_seq_lengths
        self.mini_batch_size = mini_batch_size
        self.cuda = cuda
        self.N_train_data = len(training_seq_lengths)
        self.N_mini_batches = int(self.N_train_data / mini_batch_size
                                  + int(self.N_train_data % mini_batch_size > 0))
        self.dmm = DMM(rnn_dropout_rate=RNN_DROPOUT_RATE, num_iafs=num_iafs, iaf_dim=IAF_DIM,
                       use_cuda=cuda)
        adam_params = {"lr": LEARNING_RATE, "betas": (BETA1, BETA2), "clip_norm": CLIP_NORM,
                       "lrd": LR_DECAY, "weight_decay": WEIGHT_DECAY}
        self.adam = ClippedAdam(adam_params)
        self.svi = SVI(self.dmm.model, self.dmm.guide, self.adam, loss=Trace_ELBO())

    def annealing_factor(self, epoch, which_mini_batch):
        """The KL annealing factor of a mini-batch: linear from the minimum to 1 over the
        annealing epochs."""
        if ANNEALING_EPOCHS > 0 and epoch < ANNEALING_EPOCHS:
            min_af = MINIMUM_ANNEALING_FACTOR
            return min_af + (1.0 - min_af) * (
                float(which_mini_batch + epoch * self.N_mini_batches + 1)
                / float(ANNEALING_EPOCHS * self.N_mini_batches))
        return 1.0

    def process_minibatch(self, epoch, which_mini_batch, shuffled_indices):
        """One gradient step on one mini-batch; returns its loss (the negative ELBO)."""
        annealing_factor = self.annealing_factor(epoch, which_mini_batch)
        mini_batch_start = which_mini_batch * self.mini_batch_size
        mini_batch_end = np.min([(which_mini_batch + 1) * self.mini_batch_size, self.N_train_data])
        mini_batch_indices = shuffled_indices[mini_batch_start:mini_batch_end]
        mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths = get_mini_batch(
            mini_batch_indices, self.training_data_sequences, self.training_seq_lengths,
            cuda=self.cuda)
        return self.svi.step(mini_batch, mini_batch_reversed, mini_batch_mask,
                             mini_batch_seq_lengths, annealing_factor)

    def train_epoch(self, epoch, n_mini_batches=None):
        """One epoch (its first ``n_mini_batches`` mini-batches if given); returns the summed
        loss, which the example divides by the number of training frames."""
        shuffled_indices = torch.randperm(self.N_train_data)
        epoch_nll = 0.0
        for which_mini_batch in range(n_mini_batches or self.N_mini_batches):
            epoch_nll += self.process_minibatch(epoch, which_mini_batch, shuffled_indices)
        return epoch_nll
