"""The loop flushes subnormal floats on the CPU (weight decay drives unused weights there, where
x86 arithmetic is several times slower), unless asked not to."""

from __future__ import annotations

import torch

from pyro_storn.training import fit

SUBNORMAL = 1e-40  # below float32's smallest normal, 1.18e-38


class _Square(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return ((x - self.w) ** 2).sum()


def _survives() -> bool:
    return bool(torch.tensor(SUBNORMAL) * torch.tensor(1.0) != 0)


def test_fit_flushes_subnormals_unless_told_not_to():
    data = (torch.randn(8),)
    try:
        torch.set_flush_denormal(False)
        assert _survives()
        module = _Square()
        fit(module, module, data, epochs=1, batch_size=4, progress=False, run_dir=None,
            flush_denormal=False)
        assert _survives()
        fit(module, module, data, epochs=1, batch_size=4, progress=False, run_dir=None)
        assert not _survives()
    finally:
        torch.set_flush_denormal(False)
