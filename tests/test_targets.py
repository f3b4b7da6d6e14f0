"""pyro_storn.targets and its figures: the 2-D energies of Rezende & Mohamed (2015), log Z by
quadrature, the KL of a flow guide, the exact samplers of the funnel and the banana; and
their fit through the one loop (pyro_storn.target_fit); examples/energy_2d.py, the script over
them."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from example_scripts import load_example

import transforms
from pyro_storn.target_figures import plot_energy_fits
from pyro_storn.target_fit import INITIAL_INVERSE_TEMPERATURE, annealed_inverse_temperature, fit_energy
from pyro_storn.targets import (
    BOX,
    ENERGIES,
    banana_target,
    energy_grid,
    energy_kl,
    funnel_target,
    log_normaliser,
)


def _standard_normal_energy(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z.square().sum(-1)


def test_energies_are_finite_and_their_walls_start_outside_the_box():
    _, grid = energy_grid(41, BOX)
    far = torch.tensor([[BOX + 1.0, 0.0]])
    for name, energy in ENERGIES.items():
        assert energy(grid).shape == (41, 41) and torch.isfinite(energy(grid)).all(), name
        if name != "U1":  # U1 is proper without a wall
            moved = energy(far) - energy(torch.tensor([[BOX, 0.0]]))
            assert moved.item() > 10.0, name
    # inside the box U2 is the paper's: 0 on the sine wave
    assert ENERGIES["U2"](torch.tensor([[1.0, math.sin(math.pi / 2)]])).item() == pytest.approx(0.0)


def test_log_normaliser_of_a_gaussian_and_the_kl_of_the_identity_flow():
    assert log_normaliser(_standard_normal_energy) == pytest.approx(math.log(2 * math.pi), abs=1e-4)
    identity = transforms.flow("planar", 2, 1, init_scale=0.0)
    torch.manual_seed(0)
    neg_elbo, log_z, kl = energy_kl(identity, _standard_normal_energy, samples=256)
    assert log_z == pytest.approx(math.log(2 * math.pi), abs=1e-4)
    assert kl == pytest.approx(0.0, abs=1e-5) and neg_elbo == pytest.approx(-log_z, abs=1e-5)


def test_exact_samplers_match_target_densities():
    """The exact samplers draw from the models' densities (so the grey reference points in the
    figures are the truth): over exact draws, E[-log p] is the analytic entropy."""
    generator = torch.Generator().manual_seed(0)
    for target in (funnel_target(3), banana_target()):
        draws = target.sample(2000, generator)
        conditioned = pyro.poutine.condition(target.model, data={k: v for k, v in draws.items()})
        with pyro.plate("draws", 2000, dim=-1):
            trace = pyro.poutine.trace(conditioned).get_trace()
        log_p = trace.log_prob_sum() / 2000
        if target.name == "banana":
            expected = -(0.5 * math.log(2 * math.pi * math.e) + 0.5 * math.log(2 * math.pi * math.e * 0.5))
        else:
            # h(y) + E[h(x | y)] = h(N(0, 3)) + 2 (0.5 log(2 pi e) + E[y] / 2), with E[y] = 0.
            expected = -(0.5 * math.log(2 * math.pi * math.e * 9.0) + 2 * 0.5 * math.log(2 * math.pi * math.e))
        assert float(log_p) == pytest.approx(expected, abs=0.15)
    with pytest.raises(ValueError, match="dim >= 2, got 1"):
        funnel_target(1)


def test_fit_energy_anneals_and_lowers_the_kl():
    assert [annealed_inverse_temperature(step, 10) for step in (0, 5, 10, 11)] == \
        pytest.approx([INITIAL_INVERSE_TEMPERATURE, 0.505, 1.0, 1.0])
    assert annealed_inverse_temperature(0, 0) == 1.0  # no annealing
    pyro.set_rng_seed(0)
    flow = transforms.flow("planar", 2, 2)
    torch.manual_seed(1)
    before = energy_kl(flow, ENERGIES["U1"], samples=1024)[2]
    losses = fit_energy(flow, ENERGIES["U1"], steps=40, particles=16, lr=5e-2, anneal_fraction=0.5)
    torch.manual_seed(1)
    assert len(losses) == 40 and all(math.isfinite(loss) for loss in losses)
    assert energy_kl(flow, ENERGIES["U1"], samples=1024)[2] < before
    with pytest.raises(ValueError, match="anneal_fraction"):
        fit_energy(flow, ENERGIES["U1"], steps=2, particles=2, lr=1e-2, anneal_fraction=1.0)


def test_the_energy_figure_has_a_panel_per_fit(tmp_path):
    fits = {(family, 2): (transforms.flow(family, 2, 2), 0.5) for family in ("planar", "radial")}
    path = plot_energy_fits("U1", ENERGIES["U1"], fits, tmp_path, grid_points=20)
    assert path == tmp_path / "u1.png" and path.stat().st_size > 0


def test_the_energy_example_fits_and_draws(tmp_path, capsys):
    example = load_example("energy_2d.py")
    assert example.main(["--steps", "3", "--flow-length", "2", "--particles", "4", "--energies",
                         "u2", "--flows", "planar", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "U2  planar K=2   -ELBO" in out and (tmp_path / "u2.png").stat().st_size > 0
    for argv in (["--steps", "0"], ["--flow-length", "2,0"], ["--flow-length", ","],
                 ["--energies", "U5"], ["--flows", "conv_planar"]):
        with pytest.raises(SystemExit) as stop:
            example.parse_args(argv)
        assert stop.value.code == 2
