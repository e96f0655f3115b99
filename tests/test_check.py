"""deltaport.check: signal identities, the verdict rule, the shipped calibration, scale limits, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from deltaport import testing as T
from deltaport.check import SIGNALS, check, classify, load_calibration

from conftest import tree_hash

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of is what color flag red green blue yellow white black Q A : ? . , hello world".split()

CAL = {
    "signals": {
        "relative_barrier": {"likely_max": 0.05, "unlikely_min": 0.1},
        "rel_distance": {"likely_max": 0.4, "unlikely_min": 0.5},
        "excess_loss_rel": {"likely_max": 0.2, "unlikely_min": None},
    },
    "scale": {"num_parameters": [1000, 100_000], "rel_distance_max": 3.0},
}


def sig(b=0.0, d=0.1, e=0.0):
    return {"relative_barrier": b, "rel_distance": d, "excess_loss_rel": e}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("check")
    base = T.make_model("llama", seed=0)
    paths = {
        "sb": T.save(base, root / "sb"),
        "sf": T.save(T.perturbed(base, seed=1, scale=0.01), root / "sf"),
        "tb": T.save(T.perturbed(base, seed=2, scale=0.03), root / "tb"),
    }
    rng = random.Random(0)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n"
                            for _ in range(60)))
    paths["data"] = data
    return paths


def test_classify_rule():
    assert classify(sig(), 5000, CAL)[0] == "likely"
    assert classify(sig(b=0.07), 5000, CAL)[0] == "uncertain"
    v, reason, grades = classify(sig(b=0.2), 5000, CAL)
    assert v == "unlikely" and grades["relative_barrier"] == "bad" and "barrier" in reason
    assert classify(sig(d=0.6), 5000, CAL)[0] == "unlikely"
    assert classify(sig(e=0.3), 5000, CAL)[0] == "uncertain"  # no unlikely threshold: never "bad" alone
    assert classify(sig(e=float("nan")), 5000, CAL)[0] == "uncertain"
    v, reason, _ = classify(sig(), 5_000_000, CAL)
    assert v == "uncalibrated" and "5,000,000" in reason
    assert classify(sig(d=4.0), 5000, CAL)[0] == "uncalibrated"
    assert classify(sig(), 5000, None)[0] == "uncalibrated"


def test_outside_the_calibrated_scale_the_signals_still_get_plain_words():
    """No verdict, but where the model sits relative to the calibration families and how each signal reads
    against their thresholds (the grades of a calibrated model with the same signals)."""
    v, reason, grades = classify(sig(b=0.2, d=0.45), 5_000_000, CAL)
    assert v == "uncalibrated"
    assert "calibrated for models of 1,000–100,000 parameters" in reason
    assert "5,000,000 parameters, 50× the top of that span" in reason
    assert "for comparison only" in reason
    assert "barrier between the two bases is 20.0% of their mean loss" in reason and "where failing pairs sat" in reason
    assert "between working and failing pairs" in reason  # rel_distance 0.45: between 0.4 and 0.5
    assert grades == classify(sig(b=0.2, d=0.45), 5000, CAL)[2] == {
        "relative_barrier": "bad", "rel_distance": "grey", "excess_loss_rel": "ok"}
    v, reason, _ = classify(sig(), 100, CAL)
    assert v == "uncalibrated" and "100 parameters, 10× below the bottom of that span" in reason
    assert reason.count("where working pairs sat") == 3
    several = dict(CAL, families=[{"family": "lab small 0", "num_parameters": 1000}, {"family": "lab large 0",
                                                                                      "num_parameters": 100_000}])
    assert "the thresholds were fitted on lab families of 1,000–100,000 parameters" in classify(sig(), 100, several)[1]


def test_target_equal_to_source_base_gives_exact_zero_signals(fam):
    r = check(fam["sb"], fam["sf"], fam["sb"], fam["data"], max_tokens=512)
    s = r["signals"]
    assert s["rel_distance"] == 0.0 and s["barrier"] == 0.0
    assert s["loss_target_base"] == s["loss_source_base"]
    assert s["loss_transfer"] == s["loss_source_finetuned"]  # m_s + (m'_s − m_s) == m'_s exactly
    assert s["excess_loss"] == 0.0
    assert r["verdict"] == classify(s, r["num_parameters"], load_calibration())[0]
    assert check(fam["sb"], fam["sf"], fam["sb"], fam["data"], max_tokens=512, calibration=CAL)["verdict"] == "likely"
    assert r["curve"]["losses"][0] == s["loss_source_base"]


def test_signals_are_consistent_and_inputs_untouched(fam):
    before = {k: tree_hash(fam[k]) for k in ("sb", "sf", "tb")}
    r = check(fam["sb"], fam["sf"], fam["tb"], fam["data"], max_tokens=512, seed=3)
    s = r["signals"]
    assert s["excess_loss"] == pytest.approx((s["loss_transfer"] - s["loss_target_base"])
                                             - (s["loss_source_finetuned"] - s["loss_source_base"]), abs=1e-12)
    assert s["relative_barrier"] == pytest.approx(s["barrier"] / ((s["loss_source_base"] + s["loss_target_base"]) / 2))
    from conftest import load_sd

    sb, tb = load_sd(fam["sb"]), load_sd(fam["tb"])
    num = sum(float((tb[k].double() - sb[k].double()).pow(2).sum()) for k in sb) ** 0.5
    den = sum(float(sb[k].double().pow(2).sum()) for k in sb) ** 0.5
    assert s["rel_distance"] == pytest.approx(num / den, rel=1e-9)
    assert r["verdict"] == classify(s, r["num_parameters"], load_calibration())[0]
    assert r["verdict"] in ("likely", "uncertain", "unlikely", "uncalibrated") and r["reason"]
    assert {k: tree_hash(fam[k]) for k in ("sb", "sf", "tb")} == before
    r2 = check(fam["sb"], fam["sf"], fam["tb"], fam["data"], max_tokens=512, seed=3)
    assert r2["signals"] == r["signals"]  # deterministic


def test_in_memory_source_finetune_is_not_modified():
    base = T.make_model("llama", seed=0)
    ft = T.perturbed(base, seed=1, scale=0.01)
    tgt = T.perturbed(base, seed=2, scale=0.01)
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    ids = [[(i * 5 + j) % 60 + 3 for j in range(16)] for i in range(20)]
    r = check(base, ft, tgt, ids, max_tokens=256)
    assert r["signals"]["loss_transfer"] != r["signals"]["loss_source_finetuned"]
    assert all(torch.equal(before[k], v) for k, v in ft.state_dict().items())


def test_models_outside_the_calibrated_scale_get_no_verdict(tmp_path):
    kw = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    base = T.make_model("llama", seed=0, **kw)
    ids = [[(i * 5 + j) % 60 + 3 for j in range(16)] for i in range(8)]
    r = check(base, T.perturbed(base, 1, 0.01), T.perturbed(base, 2, 0.01), ids, max_tokens=128, calibration=CAL)
    assert r["num_parameters"] > CAL["scale"]["num_parameters"][1]
    assert r["verdict"] == "uncalibrated" and f"{r['num_parameters']:,}" in r["reason"]
    assert set(SIGNALS) <= set(r["signals"])  # the numbers are still reported
    assert r["thresholds"]["scale"] == CAL["scale"]


def test_shipped_calibration_is_well_formed_and_matches_the_doc():
    cal = load_calibration()
    assert cal is not None and set(cal["signals"]) == set(SIGNALS)
    used = [th for th in cal["signals"].values() if th["likely_max"] is not None]
    assert used, "at least one signal must decide the verdict"
    for th in cal["signals"].values():
        if th["unlikely_min"] is not None:
            assert th["likely_max"] < th["unlikely_min"]
    doc = (ROOT / "docs" / "check-calibration.md").read_text()
    assert "GENERATED by `benchmarks/calibrate_check.py`" in doc
    for name, th in cal["signals"].items():  # the doc shows the thresholds the package ships
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
        assert cells[3:5] == [fmt(th["likely_max"]), fmt(th["unlikely_min"])]
    assert re.search(r"Calibrated scale: [\d,]+–[\d,]+ parameters", doc)
    lo, hi = cal["scale"]["num_parameters"]
    assert f"Calibrated scale: {lo:,}–{hi:,} parameters" in doc
    if "families" in cal:  # a calibration of several sizes: its span is theirs, no wider, and its rows are committed
        sizes = [f["num_parameters"] for f in cal["families"]]
        assert [lo, hi] == [min(sizes), max(sizes)]
        results = json.loads((ROOT / "docs" / "results" / "check-calibration.json").read_text())
        assert results["calibration"]["signals"] == cal["signals"]
        assert sorted({r["family"] for r in results["rows"]["calibration"]}) == sorted(f["family"] for f in cal["families"])


def _calibration_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_check", ROOT / "benchmarks" / "calibrate_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(size: str, n: int, source: str, target: str, kind: str, b: float, d: float, label: str) -> dict:
    return {"family": f"lab {size} 0", "size": size, "seed": 0, "model": {"hidden_size": n}, "source": source,
            "target": target, "kind": kind, "relative_barrier": b, "rel_distance": d, "excess_loss_rel": -0.1,
            "label": label, "num_parameters": n, "recovery": 1.0 if label == "works" else 0.0}


def test_calibration_over_sizes_states_their_span_and_scores_each_size_with_the_others():
    """benchmarks/calibrate_check.py's fit and scale tables on hand-made rows of two sizes: the span is
    exactly the two sizes; a size scored with the other size's thresholds is graded on them alone."""
    cc = _calibration_script()
    rows = [_row("small", 1_000, "M1", "M2", "within lineage", 0.0, 0.30, "works"),
            _row("small", 1_000, "M1", "Mx", "independent seed", 0.40, 1.20, "fails"),
            _row("small", 1_000, "M2", "M1", "within lineage (backport)", 0.0, 0.50, "works"),
            _row("medium", 100_000, "M1", "M2", "within lineage", 0.0, 0.60, "works"),
            _row("medium", 100_000, "M1", "M0", "random init", 0.02, 0.90, "fails")]
    cal = cc.fit(rows)
    assert cal["scale"]["num_parameters"] == [1_000, 100_000]
    assert [f["family"] for f in cal["families"]] == ["lab small 0", "lab medium 0"]
    th = cal["signals"]["rel_distance"]  # working up to 0.60, failing from 0.90 (pooled)
    assert (th["max_working"], th["min_failing_above"]) == (0.60, 0.90)
    assert th["likely_max"] == pytest.approx(0.70) and th["unlikely_min"] == pytest.approx(0.80)
    lines, record = cc.scale_tables(rows)
    assert record["small"]["signals"]["rel_distance"]["by_kind"]["within lineage"] == [0.30, 0.50]
    assert record["small"]["signals"]["rel_distance"]["own_thresholds"]["min_failing_above"] == 1.20
    # medium scored with small's thresholds alone (working ≤ 0.5, failing ≥ 1.2): 0.60 is "uncertain",
    # the random-init target is caught by the barrier (0.02 ≥ 2/3 of the way to 0.40)
    assert record["medium"]["left_out"] == {"fitted_on": ["small"], "right": 1, "wrong": 0, "hedged": 1, "of": 2}
    assert any(line.startswith("| medium | 100,000 | small | 1 | 0 | 1 | 2 |") for line in lines)


def test_cli_check(fam, tmp_path):
    from deltaport.cli.main import main

    out = tmp_path / "c.json"
    rc = main(["check", "--source-base", str(fam["sb"]), "--source-finetuned", str(fam["sf"]),
               "--target-base", str(fam["tb"]), "--data", str(fam["data"]), "-o", str(out), "--max-tokens", "256",
               "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["verdict"] in ("likely", "uncertain", "unlikely", "uncalibrated")
    assert set(SIGNALS) <= set(rep["signals"]) and rep["thresholds"]["signals"]
    out2 = tmp_path / "c2.json"  # a fresh path: the exit code is the missing data's, not the existing report's
    rc = main(["check", "--source-base", str(fam["sb"]), "--source-finetuned", str(fam["sf"]),
               "--target-base", str(fam["tb"]), "--data", str(tmp_path / "none.jsonl"), "-o", str(out2)])
    assert rc == 2 and not out2.exists()
