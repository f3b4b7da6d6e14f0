"""Library fits that go on to evaluate (the VAE, flow densities, guides of a target) re-raise the
Ctrl-C or SIGTERM that stopped the loop, after its checkpoint: a stopped run is never evaluated
as a finished one."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from pyro_storn.interrupts import Terminated
from pyro_storn.training import FitResult, fit, reraise_interrupt


class _SignalAtStep(torch.nn.Module):
    def __init__(self, signum, at=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.signum, self.at, self.calls = signum, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return ((x - self.w) ** 2).sum()


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt),
                                           (signal.SIGTERM, Terminated)])
def test_a_stopped_fit_raises_the_signal_it_stopped_for(tmp_path, signum, raised):
    module = _SignalAtStep(signum)
    result = fit(module, module, (torch.randn(16),), epochs=5, batch_size=4, run_dir=tmp_path,
                 progress=False)
    assert result.interrupted and result.stop_signal == signum
    assert (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(raised) as caught:
        reraise_interrupt(result)
    assert type(caught.value) is raised


def test_a_finished_fit_passes_through():
    result = FitResult(epochs_completed=2, interrupted=False, checkpoint=None)
    assert reraise_interrupt(result) is result


def test_fit_density_raises_instead_of_evaluating_a_stopped_run(monkeypatch):
    from pyro_storn.density import fit as density_fit
    from pyro_storn.density import fit_density, make_density

    stopped = FitResult(epochs_completed=1, interrupted=True, checkpoint=None,
                        stop_signal=signal.SIGTERM)
    monkeypatch.setattr(density_fit, "fit", lambda *args, **kwargs: stopped)
    data = torch.randn(64, 2)
    density = make_density("planar", data, 2)
    with pytest.raises(Terminated):
        fit_density(density, data, data, max_steps=2, batch_size=32)
