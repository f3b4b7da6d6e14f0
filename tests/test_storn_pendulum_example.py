"""examples/storn_pendulum.py, the script over :mod:`pyro_storn.pendulum_grid`: its options and
one tiny run (the grid itself is tested in test_pendulum_grid.py)."""

from __future__ import annotations

import json

import pytest
from example_scripts import load_example as _load


def load_example():
    return _load("storn_pendulum.py")


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example().parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--flows", "--lengths", "--seeds", "--epochs", "--n-sequences", "--hidden-dim",
                   "--kl-anneal-epochs", "--encoder", "--clip-norm", "--iwae-samples", "--runs", "--out", "--section",
                   "--quiet"):
        assert option in text
    assert "plain STORN" in text and "finished runs with the same settings are reused" in text


def test_a_tiny_run_writes_the_page_with_its_command_and_notes(tmp_path, capsys):
    out, notes = tmp_path / "docs" / "pendulum.md", tmp_path / "notes.md"
    notes.write_text("## Discussion\n\nA note.")
    argv = ["--flows", "none", "--seeds", "0", "--epochs", "1", "--n-sequences", "16",
            "--n-steps", "6", "--hidden-dim", "6", "--batch-size", "4", "--iwae-samples", "2",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--notes-file", str(notes),
            "--quiet"]
    assert load_example().main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "    python examples/storn_pendulum.py --flows none --seeds 0" in text
    assert "(GRU), forward encoder, batch 4, Adam 0.001 (gradient norm clipped to 10), 1 epochs" in text
    assert [line.split(" | ")[:3] for line in text.splitlines() if line.startswith("| STORN")] == \
        [["| STORN", "0", "1"], ["| STORN", "0", "0"]]
    assert text.endswith("## Discussion\n\nA note.\n\n<!-- pendulum_grid:runs end -->\n")


def test_the_encoder_option_reaches_every_run_and_the_page(tmp_path):
    out, runs = tmp_path / "pendulum.md", tmp_path / "runs"
    argv = ["--flows", "none", "--seeds", "0", "--epochs", "1", "--n-sequences", "16",
            "--n-steps", "6", "--hidden-dim", "6", "--batch-size", "4", "--iwae-samples", "2",
            "--encoder", "bidirectional", "--runs", str(runs), "--out", str(out), "--quiet"]
    assert load_example().main(argv) == 0
    assert json.loads((runs / "none_K0_seed0" / "config.json").read_text())["config"]["encoder"] == \
        "bidirectional"
    assert "(GRU), bidirectional encoder, batch 4" in out.read_text()


def test_an_unknown_encoder_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit) as stop:
        load_example().parse_args(["--encoder", "sideways"])
    assert stop.value.code == 2 and "'sideways'" in capsys.readouterr().err


def test_a_page_with_a_broken_section_is_refused_before_the_grid_runs(tmp_path, capsys):
    out = tmp_path / "pendulum.md"
    out.write_text("<!-- pendulum_grid:grid begin -->\nno end line\n")
    with pytest.raises(SystemExit) as stop:
        load_example().parse_args(["--out", str(out), "--runs", str(tmp_path / "grid")])
    assert stop.value.code == 2 and "section 'grid' must be one" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()
