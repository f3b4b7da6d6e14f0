"""The benchmark suite runs end to end on tiny sizes and writes its JSON and markdown (what CI
checks of it: no timing is ever asserted)."""

import json

from benchmarks.__main__ import SUITES, main
from benchmarks.external_twins import available_libraries


def test_every_suite_runs_once_and_writes_json(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    assert set(results["suites"]) == set(SUITES)
    assert results["machine"]["torch"]
    markdown = (tmp_path / "benchmarks_smoke.md").read_text()
    for name in SUITES:
        assert f"## {name}" in markdown
    transforms_rows = results["suites"]["transforms"]["results"]["throughput"]
    assert transforms_rows and all(row["ratio"] > 0 for row in transforms_rows)
    # every row carries its A/A control: Pyro's stack against a second copy of it
    assert all(row["control_ratio"] > 0 for row in transforms_rows)
    # and its paired ratio's bootstrap interval, which the verdict line under the table reads
    for row in transforms_rows + results["suites"]["storn"]["results"]["step"]:
        low, high = row["paired_interval"]
        assert low <= row["paired_ratio"] <= high
    # one repetition per row: too few for an interval to judge a target by, and it says so
    assert "Too few repeats here for an interval" in markdown
    assert results["suites"]["storn"]["results"]["step"][0]["plain"]["median_s"] > 0
    # normflows / zuko rows exactly when one of them is installed (the optional `bench` extra)
    external = results["suites"]["transforms"]["results"]["external"]
    assert {row["library"] for row in external} == set(available_libraries())
    # a figure per suite that has a curve to draw (the smoke skips STORN's scaling runs), linked
    figures = sorted(path.name for path in tmp_path.glob("benchmarks_smoke_*.png"))
    expected = {"transform_ratios", "conv_planar_scaling", "density_race"}
    if results["suites"]["storn"]["results"].get("scaling_T"):
        expected.add("storn_scaling")
    assert figures == sorted(f"benchmarks_smoke_{name}.png" for name in expected)
    for name in figures:
        assert f"]({name})" in markdown


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert main(["--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_throughput_verdict_judges_each_row_by_its_interval():
    from benchmarks.bench_transforms import THROUGHPUT_TARGET, _verdict

    def row(flow, low, high, repeats=21):
        return {"flow": flow, "dim": 16, "mode": "forward+logdet", "ours": {"repeats": repeats},
                "paired_interval": (low, high)}

    rows = [row("slow", THROUGHPUT_TARGET + 0.01, 1.2), row("unsure", 1.0, THROUGHPUT_TARGET + 0.01),
            row("fast", 0.8, THROUGHPUT_TARGET)]
    verdict = _verdict(rows)
    above, straddling = verdict.split("Interval straddling it:")
    assert "slow D = 16" in above and "unsure" not in above and "fast" not in verdict
    assert "unsure D = 16" in straddling and "slow" not in straddling
    assert "none" in _verdict([row("fast", 0.8, 0.9)])
    assert "Too few repeats" in _verdict([row("slow", 2.0, 2.0, repeats=1)])
