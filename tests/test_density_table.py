"""pyro_storn.density_table: the page of flow densities on 2-D data, from fit results; and
examples/density_2d.py, the script that fits them."""

from __future__ import annotations

import pytest
from example_scripts import load_example

from pyro_storn.density import FitResult, HistoryPoint
from pyro_storn.density_table import Protocol, SideBySide, results_table, write_page

CONFIGS = {"realnvp": {"length": 8, "flow": {"hidden_dims": (32, 32)}, "fit": {"lr": 1e-3}},
           "cnf": {"length": 1, "flow": {}, "fit": {"lr": 5e-3}}}


def _result(nlls, validation=None, selected=-1) -> FitResult:
    history = [HistoryPoint(wall_time=float(i + 1), step=10 * (i + 1), test_nll=nll, train_loss=0.0,
                            validation_nll=None if validation is None else validation[i])
               for i, nll in enumerate(nlls)]
    return FitResult(history=history, steps=10 * len(nlls), wall_time=float(len(nlls)),
                     selected=selected)


def test_the_table_reports_the_chosen_evaluation_beside_the_last():
    rows = [("two_moons", "realnvp", _result([2.0, 1.5, 1.7], [2.1, 1.4, 1.6], selected=1)),
            ("two_moons", "maf", None)]
    lines = results_table(rows, CONFIGS).splitlines()
    assert lines[2] == ("| two_moons | realnvp | 8 | lr 0.001, hidden (32, 32) | 1.500 | 1.400 | 20 | "
                        "1.700 | 3.0 | 30 |")
    assert lines[3] == "| two_moons | maf | - | - | not registered | - | - | - | - | - |"


def test_the_page_says_when_the_cnf_came_within_the_gap(tmp_path):
    side = SideBySide(points=400, seconds=3.0, lr=5e-3,
                      results={"realnvp": _result([1.2, 1.0, 1.1]), "cnf": _result([1.5, 1.14, 1.04])})
    protocol = Protocol(seed=0, seconds=1.0, cnf_seconds=2.0, validation_fraction=0.2, clip_norm=10.0,
                        quick=True)
    rows = [("two_moons", "cnf", _result([1.3], [1.2], selected=0))]
    text = write_page(tmp_path / "density_2d.md", rows, CONFIGS, protocol, side, "python d.py", 90.0).read_text()
    assert "python d.py` (smoke run: budgets too short to mean anything)" in text
    assert "in 1.5 minutes of wall time" in text and "gradients clipped to norm 10" in text
    assert "| cnf | 2.0 | 20 | 1.140 | - |" in text
    # RealNVP's final 1.100: reached at 2 s; its best 1.000: reached at 3 s
    assert "The CNF first came within 0.05 nats of it after 2.0 s of training." in text
    assert "the stricter reference, the CNF came within 0.05 nats after 3.0 s." in text
    no_side = write_page(tmp_path / "b.md", rows, CONFIGS, protocol, None, "python d.py", 1.0).read_text()
    assert "side by side" not in no_side and no_side.endswith("are noise.\n")


def test_the_density_example_writes_its_page(tmp_path, capsys):
    example = load_example("density_2d.py")
    assert example.main(["--datasets", "two_blobs", "--flows", "planar", "--seconds", "0.5",
                         "--compare-seconds", "0", "--no-figures", "--out", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'density_2d.md'}" in capsys.readouterr().out
    text = (tmp_path / "density_2d.md").read_text()
    assert "python examples/density_2d.py --datasets two_blobs" in text and "| two_blobs | planar | 16 |" in text
    for argv in (["--datasets", "spiral"], ["--flows", "glow"], ["--seconds", "0"],
                 ["--compare-points", "0"]):
        with pytest.raises(SystemExit) as stop:
            example.parse_args(argv)
        assert stop.value.code == 2
