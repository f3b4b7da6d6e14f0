"""The benchmark suite runs end to end on tiny sizes and writes its JSON and markdown (what CI
checks of it: no timing is ever asserted)."""

import json

import pytest

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
    assert results["suites"]["transforms"]["results"]["families"]
    assert "### The spline, matrix exponential, NAF, BNAF and polynomial families against Pyro's layers" in markdown
    # the JSB rows (none when the data file is missing: the section says it skipped)
    jsb = results["suites"]["jsb"]["results"]
    assert ("skipped" in jsb) != bool(jsb.get("rows"))
    # and its paired ratio's bootstrap interval, which the verdict line under the table reads
    for row in transforms_rows + results["suites"]["storn"]["results"]["step"] + jsb.get("rows", []):
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
    from benchmarks.bench_transforms import THROUGHPUT_TARGET, _default_interval, _verdict

    def row(flow, low, high, repeats=21):
        return {"flow": flow, "dim": 16, "mode": "forward+logdet", "ours": {"repeats": repeats},
                "paired_interval": (low, high)}

    rows = [row("slow", THROUGHPUT_TARGET + 0.01, 1.2), row("unsure", 1.0, THROUGHPUT_TARGET + 0.01),
            row("fast", 0.8, THROUGHPUT_TARGET)]
    verdict = _verdict(rows, _default_interval, "Defaults")
    assert verdict.startswith("Defaults: ")
    above, rest = verdict.split("Interval straddling it:")
    straddling, meeting = rest.split("Meeting it")
    assert "slow D = 16" in above and "unsure" not in above and "fast" not in above
    assert "unsure D = 16" in straddling and "slow" not in straddling and "fast" not in straddling
    assert "fast D = 16" in meeting and "slow" not in meeting and "unsure" not in meeting
    assert "none" in _verdict([row("fast", 0.8, 0.9)], _default_interval, "Defaults")
    assert "Too few repeats" in _verdict([row("slow", 2.0, 2.0, repeats=1)], _default_interval, "Defaults")


def test_the_same_math_verdict_reads_the_same_math_interval_and_skips_rows_that_overflow():
    from benchmarks.bench_transforms import THROUGHPUT_TARGET, _same_math_verdict

    def row(flow, default, same, finite):
        return {"flow": flow, "dim": 16, "mode": "forward+backward", "ours": {"repeats": 21},
                "paired_interval": default,
                "same_math": {"paired_interval": same, "unbounded_finite": finite}}

    slow, fast = (THROUGHPUT_TARGET + 0.02, 1.2), (0.9, 1.0)
    verdict = _same_math_verdict([row("bounded", slow, fast, True), row("plain", fast, fast, None),
                                  row("overflowing", fast, slow, False)])
    judged, not_judged = verdict.split("Not judged")
    missing, meeting = judged.split("Meeting it")
    # the default's interval is not what this line reads, and a row whose unbounded stack
    # overflowed is named as not judged instead of counted
    assert "bounded" not in missing and "plain" not in missing and "overflowing" not in judged
    assert "bounded D = 16" in meeting and "plain D = 16" in meeting
    assert "overflowing D = 16" in not_judged
    assert "Not judged" not in _same_math_verdict([row("bounded", fast, slow, True)])
    assert "bounded D = 16" in _same_math_verdict([row("bounded", fast, slow, True)]).split("Meeting it")[0]


@pytest.mark.parametrize("name", ["iaf", "realnvp"])
def test_the_same_math_contenders_are_pyros_map_on_our_networks_until_its_clamp_binds(name):
    import pyro.distributions.transforms as pyro_transforms
    import torch

    import transforms
    from benchmarks.bench_transforms import (
        UNBOUNDED_VARIANT, _clamp_binding_share, _forward_logdet, _our_layer_on, _pyro_layer_on,
        _same_map_check,
    )

    torch.manual_seed(3)
    ours = list(transforms.flow(name, 4, 3).parts)
    pyros = [_pyro_layer_on(part) for part in ours]
    unbounded = [_our_layer_on(part, **UNBOUNDED_VARIANT[name]) for part in ours]
    pyro_layers = (pyro_transforms.AffineAutoregressive, pyro_transforms.AffineCoupling)
    assert sum(isinstance(part, pyro_layers) for part in pyros) == 3  # every layer, not the reversals
    x = 0.5 * torch.randn(32, 4)
    assert _same_map_check(pyros, unbounded, x) == {"pyro_clamp_binding_share": 0.0,
                                                     "unbounded_finite": True}
    results = []
    for parts in (pyros, unbounded):
        for parameter in ours[0].parameters():
            parameter.grad = None
        y, log_det = _forward_logdet(parts, x.clone())
        (y.sum() + log_det.sum()).backward()
        results.append((y, log_det, [p.grad.clone() for p in ours[0].parameters()]))
    (y_pyro, ld_pyro, grads_pyro), (y_ours, ld_ours, grads_ours) = results
    torch.testing.assert_close(y_ours, y_pyro)
    torch.testing.assert_close(ld_ours, ld_pyro)
    for ours_grad, pyro_grad in zip(grads_ours, grads_pyro):
        torch.testing.assert_close(ours_grad, pyro_grad)
    # push the first layer's log-scales far past Pyro's clip: the share is then counted
    network = ours[0].arn if name == "iaf" else ours[0].nn
    with torch.no_grad():
        last = [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.add_(10.0)
    assert _clamp_binding_share(pyros, x) > 0
    # and far enough past it, the unbounded stack overflows
    with torch.no_grad():
        last.bias.add_(1e3)
    assert _same_map_check(pyros, unbounded, x)["unbounded_finite"] is False


def test_the_family_rows_time_every_family_against_pyros_layer_computing_our_map():
    import torch

    from benchmarks.bench_transforms import _family_lines, _family_throughput
    from benchmarks.family_twins import FAMILY_TWINS

    torch.manual_seed(0)
    rows = _family_throughput(3, 16, 1, 0, 1, torch.device("cpu"))
    modes = ("forward+logdet", "forward+backward")
    assert {(row["family"], row["conditional"], row["mode"]) for row in rows} == {
        (name, conditional, mode) for name, conditional in FAMILY_TWINS for mode in modes
    }
    for row in rows:
        assert row["ratio"] > 0 and row["control_ratio"] > 0
        for comparison in (row, row["same_math"]):
            low, high = comparison["paired_interval"]
            assert low <= comparison["paired_ratio"] <= high
        agreement = row["agreement"]
        assert agreement["finite"]
        if row["same_math"]["judged"]:
            # the splines differ by Pyro's end-knot slopes (0.999 against 1), the rest by rounding
            tolerance = 1e-2 if row["family"].startswith("spline") else 1e-4
            assert agreement["max_abs_dy"] < tolerance and agreement["max_abs_dlogdet"] < tolerance
        else:
            # NAF's slope bound, and the conditional matrix exponential's norm bound and exact
            # series, have no setting that gives Pyro's map
            assert row["family"] == "naf" or (row["family"], row["conditional"]) == (
                "matrix_exponential", True)
    markdown = "\n".join(_family_lines(rows, 3, 16, 1))
    assert markdown.count("| forward+backward |") == len(FAMILY_TWINS)
    assert "Too few repeats here" in markdown


@pytest.mark.parametrize("name,conditional", [("spline", False), ("spline", True), ("spline_coupling", False),
                                              ("spline_autoregressive", False), ("spline_autoregressive", True)])
def test_pyros_spline_twin_is_our_map_away_from_the_end_bins(name, conditional):
    """Pyro's end knots have slope 0.999 where ours have 1: in the inner bins, where those slopes
    play no part, its twin on our parameters computes our map to rounding (logit scale included)."""
    import torch

    import transforms
    from benchmarks.family_twins import pyro_twin

    torch.manual_seed(1)
    layer = transforms.build(name, 4, context_dim=5 if conditional else None)
    twin = pyro_twin(layer, name, conditional)
    x = (0.3 * torch.randn(64, 4)).clamp(-1.0, 1.0)  # the end bins start beyond |x| = 2 at initialisation
    if conditional:
        context = torch.randn(64, 5)
        layer, twin = layer.condition(context), twin.condition(context)
    y, y_twin = layer(x), twin(x)
    torch.testing.assert_close(y_twin, y)
    log_det_twin = twin.log_abs_det_jacobian(x, y_twin)
    torch.testing.assert_close(log_det_twin.reshape(64, -1).sum(-1), layer.log_abs_det_jacobian(x, y))


def test_the_jsb_suite_skips_with_a_line_when_the_data_file_is_missing(tmp_path, monkeypatch):
    from benchmarks import bench_jsb

    monkeypatch.setattr(bench_jsb, "JSB", tmp_path / "missing.pickle")
    results, markdown = bench_jsb.run(smoke=True)
    assert "missing.pickle" in results["skipped"]
    assert markdown.startswith("Skipped: JSB Chorales not found")


def test_merge_keeps_the_sections_not_rerun(tmp_path):
    assert main(["--smoke", "--suite", "conv_planar", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    assert main(["--smoke", "--suite", "storn", "--out", str(tmp_path), "--merge"]) == 0
    merged = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    assert list(merged["suites"]) == ["storn", "conv_planar"]  # the suites' own order
    assert merged["suites"]["conv_planar"]["results"] == first["suites"]["conv_planar"]["results"]
    markdown = (tmp_path / "benchmarks_smoke.md").read_text()
    assert f"Kept from the run of {first['started']}." in markdown
    lines = markdown.splitlines()
    assert lines.count("## conv_planar") == 1 and lines.count("## storn") == 1
    assert "the other sections were kept" in markdown
    # without --merge the page is this run's alone
    assert main(["--smoke", "--suite", "storn", "--out", str(tmp_path)]) == 0
    assert "## conv_planar" not in (tmp_path / "benchmarks_smoke.md").read_text().splitlines()
