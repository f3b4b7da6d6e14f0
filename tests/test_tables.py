"""pyro_storn.tables: the Markdown tables and the statistics over seeds of the results pages."""

from __future__ import annotations

import pytest

from pyro_storn.tables import MISSING, Stopwatch, command_line, markdown_table, mean_sd, paired_over_seeds


def test_markdown_table_rows_and_alignment():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == \
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |"
    assert markdown_table(["a", "b"], [], align="lr").splitlines()[1] == "|---|---:|"
    with pytest.raises(ValueError, match="align names 1 columns, the header 2"):
        markdown_table(["a", "b"], [], align="l")


def test_mean_sd_uses_the_sample_sd_and_skips_missing_values():
    assert mean_sd([1.0, None, 3.0]) == "2.00 ± 1.41"
    assert mean_sd([4.0, None]) == "4.00"
    assert mean_sd([None]) == MISSING and mean_sd([]) == MISSING


def test_paired_over_seeds_compares_each_seed_with_its_own_baseline():
    baseline = {seed: {"seed": seed, "loss": loss} for seed, loss in ((0, 10.0), (1, 20.0), (2, 30.0))}
    runs = [{"seed": 0, "loss": 9.0}, {"seed": 1, "loss": 17.0}, {"seed": 2, "loss": 31.0},
            {"seed": 3, "loss": 0.0}, {"seed": 0, "loss": None}]  # seed 3: no baseline
    assert paired_over_seeds(runs, baseline, "loss") == "-1.00 ± 2.00 (2/3 better)"
    # the baseline's own row compares with nothing
    assert paired_over_seeds(list(baseline.values()), baseline, "loss") == MISSING


def test_command_line_quotes_what_a_shell_would_split():
    assert command_line("examples/x.py", ["--flows", "none,planar", "--out", "a b.md"]) == \
        "python examples/x.py --flows none,planar --out 'a b.md'"


def test_stopwatch_counts_from_its_start():
    clock = Stopwatch()
    sum(range(10_000))
    assert clock.wall_s > 0 and clock.cpu_s >= 0
