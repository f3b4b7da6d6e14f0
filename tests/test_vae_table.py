"""The flow-VAE results table: records, paired differences, validation curves, anchors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyro_storn import vae_table


def bounds_of(neg_elbo, neg_iwae, samples):
    neg_elbo, neg_iwae = np.asarray(neg_elbo, float), np.asarray(neg_iwae, float)
    return {"num_samples": samples, "n_images": len(neg_elbo), "neg_elbo": neg_elbo,
            "neg_iwae": neg_iwae, "neg_elbo_mean": float(neg_elbo.mean()),
            "neg_elbo_se": float(neg_elbo.std(ddof=1) / np.sqrt(len(neg_elbo))),
            "neg_iwae_mean": float(neg_iwae.mean()),
            "neg_iwae_se": float(neg_iwae.std(ddof=1) / np.sqrt(len(neg_iwae)))}


def result(flow, spec, k, shift, valid):
    base = np.array([90.0, 100.0, 110.0, 95.0])
    history = [{"epoch": e + 1, "valid_neg_elbo": v, **{key: 0.0 for key, _ in
                                                      vae_table.TERM_PANELS}}
               for e, v in enumerate(valid)]
    return {"flow": flow, "flow_spec": spec, "K": k, "train_seconds": 12.34,
            "eval_seconds": 5.0, "history": history, "best_epoch": int(np.argmin(valid)) + 1,
            "test": bounds_of(base + shift, base + shift - 1, 20),
            "iwae": bounds_of((base + shift)[:2], (base + shift - 3)[:2], 5000)}


def test_records_hold_the_page_fields_and_paired_differences():
    vae = result("none", "none", 0, 0.0, [120, 110, 105, 104])
    planar = result("planar", "planar", 10, -2.0, [118, 108, 109, 109])
    records = [vae_table.record(r, vae) for r in (vae, planar)]
    for rec in records:
        for key in ("model", "K", "test_neg_elbo", "test_neg_iwae", "iwae_samples", "epochs",
                    "train_seconds"):
            assert key in rec
    json.dumps(records)  # plain JSON
    assert records[0]["model"] == "VAE" and records[0]["iwae_samples"] == 5000
    assert records[0]["iwae_images"] == 2 and records[0]["elbo_images"] == 4
    assert records[1]["delta_neg_elbo_vs_vae"] == pytest.approx(-2.0)
    assert records[1]["delta_neg_iwae_vs_vae"] == pytest.approx(-2.0)
    assert "delta_neg_elbo_vs_vae" not in records[0]
    assert records[1]["published"][0]["value"] == 87.5


def test_validation_curve_says_where_it_stood():
    curve = vae_table.validation_curve([{"epoch": e + 1, "valid_neg_elbo": v}
                                        for e, v in enumerate([120, 110, 105, 104, 103.5])])
    assert curve["best_epoch"] == 5 and curve["last"] == 103.5
    assert curve["fall_over_tail"] == pytest.approx(110 - 103.5) and curve["tail"] == 3
    assert vae_table.validation_curve([{"epoch": 1}]) is None


def test_table_rows_anchors_targets_and_plan():
    vae = result("none", "none", 0, 0.0, [120, 110, 105, 104])
    planar = result("planar", "planar", 1, 3.0, [118, 108, 109, 109])
    failed = {"flow": "iaf", "flow_spec": "iaf", "K": 2, "failed": "non-finite loss",
              "train_seconds": 3.0}
    text = vae_table.write_table([vae, planar, failed], title="T", preamble=["Command: `x`"],
                                 skipped=["nope"], layers=[], figure_name="f.png",
                                 planned=["iaf K=10"], seed=0)
    assert text.startswith("# T\n\n- Command: `x`")
    assert "| VAE | 0 | 4 (4) | 104.00 (+16.00) |" in text
    assert "| planar | 1 | 4 (2) |" in text and "| iaf | 2 | failed: non-finite loss |" in text
    assert "Still to run (in this order): iaf K=10." in text
    assert "Not run (not registered in this install): nope." in text
    assert "VAE: Henrion & Welleck -ELBO 94.8; ours -ELBO 98.75 (short by 3.95)." in text
    assert "planar K=1: Henrion & Welleck -ELBO 96.6; ours -ELBO 101.75 (short by 5.15)." in text
    assert "planar K=10: Rezende & Mohamed 2015 -log p(x) <= 87.5; not run yet." in text
    assert "Targets: the best flow's test -ELBO ≤ 87.5 (ours: planar K=1, 101.75" in text
    # every source's protocol is stated once, even one whose rows were not run
    assert text.count("How those numbers were obtained:") == 1
    for source in ("Henrion & Welleck", "Tomczak & Welling 2016", "Rezende & Mohamed 2015"):
        assert f"\n- {source}: " in text.split("How those numbers were obtained:")[1]
    assert "numpy seed 777" in text and "one-sample -ELBO" in text
    assert "worse: planar K=1" in text and "Runs stopped by a non-finite loss: iaf K=2." in text


def test_flow_specs_parse():
    assert vae_table.parse_flow_spec("sylvester:variant=householder:num_householder=8") == (
        "sylvester", {"variant": "householder", "num_householder": 8})


def test_study_protocol_line():
    line = vae_table.study_protocol(12, 1e-3, 100)
    assert line == ("Against the study's protocol: follows the schedule lr / (1 + t / 100), t in "
                    "epochs; differs in 12 epochs (the study: 2000); base lr 0.001 (the study: "
                    "0.0002); no batch normalisation (the study: with).")
    assert "follows 2000 epochs (the study: 2000); the schedule" in vae_table.study_protocol(
        2000, 2e-4, 100)
    assert "the schedule constant (the study" in vae_table.study_protocol(10, 2e-4, None)
