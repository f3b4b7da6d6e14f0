"""pyro_storn.pendulum_grid on a tiny grid: it trains, evaluates, writes its section of a page
with its figures (the rest of the page untouched), and reuses finished runs."""

from __future__ import annotations

import json

import pytest

from pyro_storn.latent_use import LATENT_IN_USE_KL
from pyro_storn.pendulum_grid import PAGE_TITLE, Grid, page_section, run_grid, write_page
from pyro_storn.runs import TrainConfig

TINY = {"n_sequences": 20, "n_steps": 8, "iwae_samples": 3}


def _grid(flows, seeds, epochs=1, hidden_dim=8, **options) -> Grid:
    fraction = options.pop("validation_fraction", 0.0)
    base = TrainConfig(hidden_dim=hidden_dim, epochs=epochs, validation_fraction=fraction)
    return Grid(flows, [2], seeds, base, **{**TINY, **options})


def _page(grid: Grid, runs, out) -> str:
    write_page(grid, run_grid(grid, runs, progress=False), runs, out, "python run.py")
    return out.read_text()


def test_tiny_grid_writes_the_tables_and_reuses_runs(tmp_path):
    grid, runs, out = _grid(["none", "radial"], [0, 1]), tmp_path / "runs", tmp_path / "docs" / "pendulum.md"
    text = _page(grid, runs, out)
    summary, per_run = text.split("## Every run")
    rows = [line for line in summary.splitlines() if line.startswith("| STORN")]
    assert [row.split(" | ")[:3] for row in rows] == [["| STORN", "0", "2"], ["| STORN + radial", "2", "2"]]
    assert "(2/2 better)" in rows[1] or "(1/2 better)" in rows[1] or "(0/2 better)" in rows[1]
    assert "1-minute load average at the runs' ends was" in text
    header = next(line for line in text.splitlines() if line.startswith("| guide"))
    columns = header.split(" | ")
    khat_share = [float(row.split(" | ")[columns.index("share k̂ > 0.7")].split(" ")[0]) for row in rows]
    assert all(0.0 <= share <= 1.0 for share in khat_share)
    # the per-run table: one row per (guide, K, seed), the KL threshold epoch from the metrics
    run_rows = [line for line in per_run.splitlines() if line.startswith("| STORN")]
    assert [row.split(" | ")[2] for row in run_rows] == ["0", "1", "0", "1"]
    history = [json.loads(line) for line in
               (runs / "radial_K2_seed1" / "metrics.jsonl").read_text().splitlines()]
    expected = "never" if history[-1]["test/kl"] < LATENT_IN_USE_KL else "1"
    assert run_rows[3].rstrip(" |").split(" | ")[-1] == expected
    for figure in ("runs_losses.png", "runs_flow_terms.png", "runs_kl_every_seed.png",
                   "runs_neg_elbo_every_seed.png"):  # named after the section, the runs folder
        assert (out.parent / "figures" / figure).stat().st_size > 0
        assert f"](figures/{figure})" in text
    timing = json.loads((runs / "radial_K2_seed1" / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0 and timing["load_average"] >= 0
    # a second grid over the same runs reuses them: same tables, nothing retrained
    before = (runs / "radial_K2_seed1" / "timing.json").stat().st_mtime_ns
    text = _page(grid, runs, out)
    assert (runs / "radial_K2_seed1" / "timing.json").stat().st_mtime_ns == before
    assert [line for line in text.splitlines() if line.startswith("| STORN")] == rows + run_rows


HAND_WRITTEN_HEAD = "# A page\n\nWritten by hand: the at-a-glance table.\n\n## Current protocol\n"
HAND_WRITTEN_TAIL = ("\n## Earlier protocols\n\n<!-- pendulum_grid:older begin -->\nan older "
                     "grid's table\n<!-- pendulum_grid:older end -->\n\nA last hand-written line")


def test_the_grid_writes_only_its_own_section_of_the_page(tmp_path):
    grid, runs = _grid(["none"], [0], n_sequences=16, n_steps=6, iwae_samples=2), tmp_path / "runs"
    results = run_grid(grid, runs, progress=False)
    fresh = write_page(grid, results, runs, tmp_path / "new.md", "python run.py")
    assert fresh.read_text().startswith(f"{PAGE_TITLE}\n\n<!-- pendulum_grid:runs begin -->\n")
    out = tmp_path / "page.md"
    out.write_text(HAND_WRITTEN_HEAD + HAND_WRITTEN_TAIL)
    write_page(grid, results, runs, out, "python first.py")  # appended: no section 'runs' yet
    text = out.read_text()
    assert text.startswith(HAND_WRITTEN_HEAD + HAND_WRITTEN_TAIL + "\n\n<!-- pendulum_grid:runs begin")
    assert text.endswith("<!-- pendulum_grid:runs end -->\n") and "python first.py" in text
    # moved by hand into the current protocol, then rewritten: only the section changes
    begin, end = text.index("<!-- pendulum_grid:runs begin"), text.index("<!-- pendulum_grid:runs end")
    section = text[begin:end] + "<!-- pendulum_grid:runs end -->\n"
    out.write_text(HAND_WRITTEN_HEAD + section + HAND_WRITTEN_TAIL)
    write_page(grid, results, runs, out, "python second.py", notes="A note.")
    rewritten = out.read_text()
    assert rewritten.startswith(HAND_WRITTEN_HEAD + "<!-- pendulum_grid:runs begin -->\n### Grid `runs`")
    assert rewritten.endswith("A note.\n\n<!-- pendulum_grid:runs end -->\n" + HAND_WRITTEN_TAIL)
    assert "python second.py" in rewritten and "python first.py" not in rewritten
    assert rewritten.count("pendulum_grid:runs begin") == 1
    # another name is another section; an unclosed section or a bad name is refused untouched
    write_page(grid, results, runs, out, "python third.py", section="third")
    assert out.read_text().startswith(rewritten) and "figures/third_losses.png" in out.read_text()
    out.write_text(HAND_WRITTEN_HEAD + "<!-- pendulum_grid:runs begin -->\nhalf a section\n")
    with pytest.raises(ValueError, match="section 'runs' must be one .* found 1 and 0"):
        write_page(grid, results, runs, out, "python x.py")
    assert out.read_text() == HAND_WRITTEN_HEAD + "<!-- pendulum_grid:runs begin -->\nhalf a section\n"
    with pytest.raises(ValueError, match="section name"):
        page_section(out, runs, "a--b")


def test_unregistered_flows_are_skipped_with_a_warning():
    with pytest.warns(UserWarning, match="'no_such_flow' is not registered"):
        cells = _grid(["none", "no_such_flow", "radial"], [0]).cells()
    assert cells == [("none", 0), ("radial", 2)]


def test_validation_fraction_evaluates_the_best_epoch(tmp_path):
    grid = _grid(["none"], [0], epochs=3, n_sequences=25, validation_fraction=0.25)
    text = _page(grid, tmp_path / "runs", tmp_path / "pendulum.md")
    run = tmp_path / "runs" / "none_K0_seed0"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda record: record["validation/neg_elbo"])["epoch"]
    assert json.loads((run / "evaluation.json").read_text())["checkpoint"] == \
        {"which": "best", "epoch": best}
    assert "5 of the training sequences (0.25) are held out for validation" in text
    header = next(line for line in text.splitlines() if line.startswith("| guide")).split(" | ")
    row = next(line for line in text.splitlines() if line.startswith("| STORN")).split(" | ")
    assert float(row[header.index("evaluated epoch")]) == best


def test_a_validation_fraction_that_holds_out_nothing_fails_before_training(tmp_path):
    grid = _grid(["none"], [0], n_sequences=25, validation_fraction=0.01)
    with pytest.raises(ValueError, match="validation_fraction 0.01 of 20 training sequences"):
        run_grid(grid, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "none_K0_seed0").exists()


def test_init_from_runs_warm_starts_each_seed_from_plain_storn(tmp_path):
    small = {"n_sequences": 16, "n_steps": 6, "iwae_samples": 2, "hidden_dim": 6}
    first = tmp_path / "first"
    _page(_grid(["none"], [0], **small), first, tmp_path / "first.md")
    second = tmp_path / "second"
    second.mkdir()
    (second / "pendulum.npz").write_bytes((first / "pendulum.npz").read_bytes())
    text = _page(_grid(["none", "radial"], [0], init_from_runs=str(first), **small), second,
                 tmp_path / "second.md")
    record = json.loads((second / "radial_K2_seed0" / "config.json").read_text())
    assert record["init_from"]["run"] == str((first / "none_K0_seed0").resolve())
    assert record["init_from"]["parameters"] and not any(
        name.startswith("flow") for name in record["init_from"]["parameters"])
    assert f"starts from the plain STORN run `{first}/none_K0_seedS`" in text
