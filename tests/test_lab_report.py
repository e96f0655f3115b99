"""The lab report reads right: every sentence that states a number says what the results say.

Each test renders report.md / summary.md from a results dict (the committed ``docs/results/quick/results.json``
and ``docs/results/full/summary.json``, or an edited copy of them: all-zero rows, ties, one-value ranges, M0
pairs) and checks the sentence against numbers the test reads from the dict itself. Nothing reruns the lab;
every test takes well under a second, except the bootstrap of the synthetic seeds (about a second).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from deltaport.lab import report as R

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "docs/results/quick"
FULL = ROOT / "docs/results/v2-full/summary.json"  # v2: three seeds, (d2), (e), (f) undecided


#: the design-v2 quick run's results.json (as committed before the v3 rerun): a fixed fixture whose numbers the
#: sentence tests were written against (zeros in M1's row, barriers within and across the run)
V2_QUICK = Path(__file__).resolve().parent / "data" / "lab_v2_quick_results.json"


@pytest.fixture()
def quick() -> dict:
    return json.loads(V2_QUICK.read_text())


def _reading(report: str, heading: str) -> str:
    """The **Reading.** paragraph of the section whose heading contains ``heading``."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith("**Reading.**"))


def _repeated_ends(text: str) -> list[str]:
    """Ranges printed with the same value at both ends (``2 %–2 %``, ``0.000–0.000``)."""
    return [m.group(0) for m in re.finditer(r"(?<![\w.+-])([+-]?\d+(?:\.\d+)?(?: %)?)–\1(?![\d.])", text)]


# ------------------------------------------------------------------ re-rendering a committed run
def test_committed_report_renders_from_results_json_alone():
    report = R.rerender(QUICK)
    assert report == R.report_md(json.loads((QUICK / "results.json").read_text()))
    assert report.startswith("# deltaport lab report: `quick`")
    assert _repeated_ends(report) == []


def test_barrier_sentence_groups_pairs_as_the_table_does(quick):
    """§5 once said 'within one run at most 0.34 nats; to Mx at least 0.26': 0.34 was M1-M0, 0.26 Mx-M0."""
    V = set(quick["config"]["versions"])
    curves = quick["connectivity"]["curves"]
    within = [v["barrier"] for k, v in curves.items() if set(k.split("-")) <= V]
    to_mx = [v["barrier"] for k, v in curves.items() if "Mx" in k and "M0" not in k]
    to_m0 = [v["barrier"] for k, v in curves.items() if "M0" in k]
    assert len(within) == 6 and len(to_mx) == 4 and len(to_m0) == 5  # 4 versions, Mx, M0: 15 pairs

    def shown(xs):
        lo, hi = f"{min(xs):.3f}", f"{max(xs):.3f}"
        return lo if lo == hi else f"{lo}–{hi}"

    text = _reading(R.report_md(quick), "Connectivity")
    assert f"between two versions of one run the loss barrier is {shown(within)} nats;" in text.lower()
    assert f"between a version and Mx (same data, other initialisation) {shown(to_mx)};" in text
    assert f"between M0 (random initialisation) and any other base {shown(to_m0)}." in text
    assert shown(within) == "0.000"  # every within-run pair of the committed run is 0.000 in the table
    assert "0.34" not in text and "0.26" not in text


def test_barrier_sentence_when_a_within_run_pair_is_higher_than_a_pair_with_mx(quick):
    r = copy.deepcopy(quick)
    curves = r["connectivity"]["curves"]
    curves["M1-M3"]["barrier"], curves["M4-M5"]["barrier"] = 0.25, 0.0125
    curves["M1-M0"]["barrier"] = 2.5  # an M0 pair must not enter either group
    curves["M5-Mx"]["barrier"] = 0.2
    text = _reading(R.report_md(r), "Connectivity")
    assert "loss barrier is 0.000–0.250 nats" in text
    assert "and Mx (same data, other initialisation) 0.200–1.462" in text
    assert "and any other base 0.152–2.500" in text
    assert "does not separate Mx from the family: a pair within the run reaches 0.250 nats, a pair with Mx is " \
           "as low as 0.200" in text
    assert "flat" not in text


def test_strongest_predictor_is_the_largest_absolute_rho(quick):
    rho = {k: v for k, v in quick["connectivity"]["spearman"].items() if v is not None}
    name, value = max(rho.items(), key=lambda kv: abs(kv[1]))
    text = _reading(R.report_md(quick), "Connectivity")
    assert f"The strongest predictor of the gain here is {name.replace('_vs_gain', '')} (ρ = {value:+.2f})" in text


# ------------------------------------------------------------------ the grid: best sources, ties, all zeros
def test_grid_names_no_best_among_equal_cells_and_every_best_in_a_tie(quick):
    r = copy.deepcopy(quick)
    g = r["grid"]
    assert set(g["cells"]["M1"].values()) == {0.0}  # the committed run: M1 + any Δ scores 0.0
    g["cells"]["M3"]["M5"] = g["cells"]["M3"]["M4"]  # a tie for M3's best
    text = _reading(R.report_md(r), "Transfer grid")
    assert f"M1 scores 0.0 with every Δ, none is best (FT {100 * g['ft']['M1']:.1f})" in text
    assert "M1 is best" not in text
    assert f"M3 is best with Δ4 and Δ5 ({100 * g['cells']['M3']['M4']:.1f} vs FT {100 * g['ft']['M3']:.1f})" in text
    for t in ("M4", "M5"):  # a single best: the argmax of the row, read here from the results
        s, v = max(g["cells"][t].items(), key=lambda kv: kv[1])
        assert f"{t} is best with Δ{s[1:]} ({100 * v:.1f} vs FT {100 * g['ft'][t]:.1f})" in text


def test_grid_states_the_gain_of_mx_and_m0_not_their_score(quick):
    r = copy.deepcopy(quick)
    g = r["grid"]
    g["base"]["Mx"] = 0.02
    g["cells"]["Mx"] = {s: 0.02 for s in g["cells"]["Mx"]} | {"M4": 0.035}
    text = _reading(R.report_md(r), "Transfer grid")
    assert "A Δ moves Mx (same data, other initialisation) by +0.0–+1.5 points over its base (2.0)." in text
    assert "A Δ moves M0 (random) by +0.0 points over its base (0.0)." in text  # all zero: one value
    bases = [g["base"][t] for t in r["config"]["versions"]]
    assert f"The bases score {100 * min(bases):.1f}–{100 * max(bases):.1f} % zero-shot" in text


# ------------------------------------------------------------------ recovery: one-value ranges
def test_recovery_range_of_one_value_prints_one_value(quick):
    r = copy.deepcopy(quick)
    frac = r["recovery"]["fraction"]
    for t in ("M3", "M4", "M5"):
        frac[t]["M1"] = 0.02
    report = R.report_md(r)
    text = _reading(report, "Fraction of the fine-tuning gain")
    assert "Δ1 2 %;" in text and "2 %–2 %" not in text
    lo, hi = min(frac[t]["M3"] for t in ("M4", "M5")), max(frac[t]["M3"] for t in ("M4", "M5"))
    assert f"Δ3 {100 * lo:.0f} %–{100 * hi:.0f} %" in text
    ft1 = r["scores"]["FT(M1)"]["heldout"]
    assert f"on that base (FT(M1) {100 * ft1:.1f} %)" in text  # the only fine-tune near chance, named with its score
    assert _repeated_ends(report) == []


# ------------------------------------------------------------------ the cache sentence
@pytest.mark.parametrize("cache, said, not_said", [
    ({"family": 0, "computed_evals": 114, "evals": 0, "repeated_evals": 52, "computed_finetunes": 8, "finetunes": 0,
      "repeated_finetunes": 0}, ["the family was pretrained in this run", "Computed in this run: 114 evaluations and 8 "
                                 "fine-tunes.", "Nothing was reused from an earlier run.",
                                 "Asked for again within this run and answered from its own cache: 52 evaluations."],
     ["Reused from"]),
    ({"family": 1, "computed_evals": 0, "evals": 166, "repeated_evals": 0, "computed_finetunes": 0, "finetunes": 1},
     ["reused from an earlier run in this directory.", "Nothing was computed in this run.",
      "Reused from an earlier run in this directory: 166 evaluations and 1 fine-tune"], ["Asked for again"]),
    ({"family": 0, "computed_evals": 114, "evals": 52}, ["this results.json does not tell them apart): 52 evaluations"],
     ["Reused from", "Nothing was reused"]),
])
def test_cache_sentence_says_what_the_run_did(cache, said, not_said):
    text = R.cache_text(cache)
    for s in said:
        assert s in text, (s, text)
    for s in not_said:
        assert s not in text, (s, text)


def test_cache_counts_tell_reuse_from_an_earlier_run_from_a_repeat(tmp_path, monkeypatch):
    """A fresh run's repeated requests are repeats, not reuse; a second run in the same directory reuses."""
    import torch
    from safetensors.torch import save_file

    import deltaport.evaluation
    from deltaport.lab.steps import CachedLibrary

    model = tmp_path / "m"
    model.mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(model / "model.safetensors"))
    task = tmp_path / "t.yaml"
    task.write_text("task: t\n")
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    calls = []

    def fake_evaluate(models, tasks, **kw):
        calls.append(sorted(models))
        return {"results": {name: {"t": {"exact_match,none": 0.5}} for name in models}}

    monkeypatch.setattr(deltaport.evaluation, "evaluate", fake_evaluate)
    run_dir = tmp_path / "run"
    first = CachedLibrary(run_dir, None, {"t": task})
    monkeypatch.setattr(first, "load", lambda path: None)
    for _ in range(3):
        assert first.exact_match({"A": model}, ["t"], with_items=False) == {"A": {"t": 0.5}}
    assert calls == [["A"]]
    assert (first.reused["computed_evals"], first.reused["evals"], first.reused["repeated_evals"]) == (1, 0, 2)
    second = CachedLibrary(run_dir, None, {"t": task})  # a rerun into the same directory
    assert second.exact_match({"A": model}, ["t"], with_items=False) == {"A": {"t": 0.5}}
    assert calls == [["A"]]
    assert (second.reused["computed_evals"], second.reused["evals"], second.reused["repeated_evals"]) == (0, 1, 0)


def test_a_rerun_reports_the_scorer_mismatch_of_the_evals_it_reads_from_the_cache(tmp_path, monkeypatch):
    """item_scorer_max_mismatch (per-item scorer vs lm-eval) is the gap of every eval a run uses: a resumed
    run that reads its evals from the cache reports the same gap as the run that computed them (it said 0)."""
    import torch
    from safetensors.torch import save_file

    import deltaport.evaluation
    import deltaport.lab.steps as steps

    model = tmp_path / "m"
    model.mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(model / "model.safetensors"))
    task = tmp_path / "t.yaml"
    task.write_text("task: t\n")
    (tmp_path / "t.jsonl").write_text("".join(f'{{"prompt": "q{i}", "answer": "a"}}\n' for i in range(4)))
    monkeypatch.setattr(deltaport.evaluation, "evaluate",
                        lambda models, tasks, **kw: {"results": {n: {"t": {"exact_match,none": 0.75}} for n in models}})
    monkeypatch.setattr(steps, "item_correct", lambda model, tok, items: "0100")  # 0.25: one scorer disagrees
    first = steps.CachedLibrary(tmp_path / "run", None, {"t": task})
    monkeypatch.setattr(first, "load", lambda path: None)
    assert first.exact_match({"A": model}, ["t"]) == {"A": {"t": 0.75}}
    assert first.item_mismatch == pytest.approx(0.5)
    second = steps.CachedLibrary(tmp_path / "run", None, {"t": task})
    assert second.exact_match({"A": model}, ["t"]) == {"A": {"t": 0.75}} and second.reused["evals"] == 1
    assert second.item_mismatch == first.item_mismatch


# ------------------------------------------------------------------ figures
def _captured_figure(monkeypatch):
    import deltaport.figures

    got = {}

    def keep(fig, path, **kw):
        got["fig"] = fig
        return Path(path)

    monkeypatch.setattr(deltaport.figures, "save_figure", keep)
    return got


def test_grid_colour_bar_is_labelled(quick, tmp_path, monkeypatch):
    got = _captured_figure(monkeypatch)
    r = {k: v for k, v in quick.items() if k not in ("curves", "connectivity", "compression")}
    assert set(R.figures(r, tmp_path / "figures")) == {"grid"}
    main, bar = got["fig"].axes
    assert bar.get_ylabel() == "held-out exact match (%), scale 0–100"
    assert bar.get_ylim() == (0.0, 100.0)


def test_compression_figure_y_axis_starts_at_zero(quick, tmp_path, monkeypatch):
    from deltaport.lab.compression import figure

    got = _captured_figure(monkeypatch)
    table = quick["compression"]
    figure(table, tmp_path / "c.png", title="t")
    (ax,) = got["fig"].axes
    lo, hi = ax.get_ylim()
    top = max(100 * row["mean"] for row in table["rows"])
    assert lo == 0.0 and hi == pytest.approx(1.2 * top)
    # the committed run's 0.1-point effect (14.8 vs 14.7) is under 1 % of the axis, not most of it
    exact, _, compressed = table["rows"]
    assert 100 * abs(exact["mean"] - compressed["mean"]) / (hi - lo) < 0.01
    assert "from 0" in ax.get_ylabel()


# ------------------------------------------------------------------ seeds_needed
def test_seeds_needed_formula():
    from deltaport.lab.stats import seeds_needed, z_of

    z = z_of(0.95)
    assert z == pytest.approx(1.959963984540054)
    assert seeds_needed(0.01, 0.02, 0.0, 3) == math.ceil((z * 2) ** 2) == 16  # (3.92)² = 15.37
    assert seeds_needed(-0.6, 0.16, -0.5, 3) == math.ceil((z * 0.16 / 0.1) ** 2) == 10  # 9.83
    assert seeds_needed(0.01, 0.01, 0.0, 5) == 6  # the formula says 4 (3.84); 5 ran undecided: at least 6
    assert seeds_needed(0.01, 0.02, 0.0, 3, level=0.5) == math.ceil((0.6744897501960817 * 2) ** 2) + 2  # 1.82 -> 4
    assert seeds_needed(0.0, 0.02, 0.0, 3) is None  # on the threshold: no count moves the interval off it
    assert seeds_needed(0.01, 0.0, 0.0, 3) is None  # seeds agree: item noise, not seeds
    assert seeds_needed(0.01, None, 0.0, 1) is None


def _synthetic_run(seed: int, hits: tuple[int, int], n: int = 20) -> dict:
    """A results dict with just what finding (b1) reads: Mx scores 0 on ``n`` items, Mx + Δ1 / Mx + Δ2 get
    ``hits`` items right, so θ(b1) = mean(hits) / n exactly."""
    items = {"Mx": "0" * n, "Mx+Δ1": "1" * hits[0] + "0" * (n - hits[0]),
             "Mx+Δ2": "1" * hits[1] + "0" * (n - hits[1])}
    return {"name": "synthetic", "config": {"versions": ["M1", "M2"], "seed": seed}, "items": {"heldout": items}}


def test_inconclusive_finding_carries_seeds_needed_from_its_per_seed_spread():
    from deltaport.lab.findings import decide

    (b1,) = decide([_synthetic_run(0, (1, 0)), _synthetic_run(1, (1, 1)), _synthetic_run(2, (2, 2))], n_boot=500)
    assert b1["id"] == "b1" and b1["threshold"] == 0.05 and b1["verdict"] == "inconclusive"
    assert b1["per_seed"] == pytest.approx([0.025, 0.05, 0.1])
    sd = statistics.stdev([0.025, 0.05, 0.1])  # 0.03819
    assert b1["seed_sd"] == pytest.approx(sd)
    expected = math.ceil((1.959963984540054 * sd / (0.175 / 3 - 0.05)) ** 2)  # (8.98)² = 80.7
    assert b1["seeds_needed"] == expected == 81
    (decided,) = decide([_synthetic_run(s, (0, 0)) for s in range(3)], n_boot=200)
    assert decided["verdict"] == "yes" and "seeds_needed" not in decided
    (one_seed,) = decide([_synthetic_run(0, (1, 1))], n_boot=200)
    assert one_seed["verdict"] == "inconclusive" and "seeds_needed" not in one_seed
    (on_threshold,) = decide([_synthetic_run(s, h) for s, h in enumerate([(0, 0), (1, 1), (4, 0)])], n_boot=500)
    assert on_threshold["mean"] == pytest.approx(0.05) and on_threshold["verdict"] == "inconclusive"
    assert "seeds_needed" not in on_threshold and on_threshold["seeds_needed_note"]


def test_summary_states_seeds_needed_for_every_undecided_finding():
    from deltaport.lab.multiseed import summary_md
    from deltaport.lab.readme import findings_block

    sm = json.loads(FULL.read_text())
    text, block = summary_md(sm), findings_block(sm)
    section = text.split("## Undecided findings: the seeds a decision would need", 1)[1].split("\n## ", 1)[0]
    said = {line[3:].split(")", 1)[0]: line for line in section.splitlines() if line.startswith("- (")}
    undecided = [f for f in sm["findings"] if f["verdict"] == "inconclusive"]
    assert undecided  # the committed 3-seed run leaves (d2), (e), (f) undecided
    assert set(said) == {f["id"] for f in undecided}
    counts = []
    for f in undecided:
        d = abs(f["mean"] - f["threshold"])
        n = max(f["n_seeds"] + 1, math.ceil((1.959963984540054 * f["seed_sd"] / d) ** 2))
        assert said[f["id"]].endswith(f"over {f['n_seeds']} seeds: about **{n}** seeds would decide it.")
        counts.append(f"({f['id']}) about {n}")
    readme_line = block.splitlines()[-1]
    assert readme_line.startswith("Seeds a decision would need, n = ⌈(z · sd / |mean − threshold|)²⌉ with the "
                                  "between-seed SD and z = 1.96 ")
    assert readme_line.endswith("summary.json): " + "; ".join(counts) + ".")
    assert "z = 1.96 for a 95 % interval" in section
    f_rho = next(f for f in undecided if f["id"] == "f")  # a rank correlation: shown to three decimals
    assert said["f"].startswith(f"- (f) θ = {f_rho['mean']:+.3f}, {abs(f_rho['mean'] - f_rho['threshold']):.3f} from "
                                f"the threshold {f_rho['threshold']:+.3f}, between-seed SD {f_rho['seed_sd']:.3f}")
    e = next(f for f in undecided if f["id"] == "e")  # points: two decimals
    assert said["e"].startswith(f"- (e) θ = {100 * e['mean']:+.2f}, {100 * abs(e['mean']):.2f} from the threshold "
                                f"+0.00, between-seed SD {100 * e['seed_sd']:.2f} over 3 seeds")
    e["mean"] = e["threshold"]  # a mean on the threshold: no number of seeds moves the interval off it
    line = next(x for x in summary_md(sm).splitlines() if x.startswith("- (e)"))
    assert line.endswith("seeds: no seed count follows from the spread: the mean is on the threshold, or the seeds "
                         "agree exactly.")
    assert "(e) no seed count follows from the spread" in findings_block(sm)
    e["mean"] = float("nan")  # θ undefined on a seed (a recovery with no fine-tuning gain)
    assert "- (e) θ is undefined on some seeds: no seed count follows." in summary_md(sm)
    for f in sm["findings"]:
        f["verdict"] = "yes"
    assert "## Undecided" not in summary_md(sm) and "Seeds a decision" not in findings_block(sm)
    assert _repeated_ends(text) == []


def test_every_committed_report_and_summary_rerenders():
    from deltaport.lab.readme import rerender_reports

    out = rerender_reports(ROOT)
    results = sorted(p for p in ROOT.glob("docs/results/**/results.json") if "claims" in json.loads(p.read_text()))
    assert results and {p.parent / "report.md" for p in results} <= set(out)
    assert ROOT / "docs/results/full/summary.md" in out
    assert out[QUICK / "report.md"] == R.rerender(QUICK)
    for path, text in out.items():
        if path.suffix == ".json":  # the claims decided again by today's rules: the committed file must agree
            assert path.read_text() == text, f"{path}: run python benchmarks/readme_tables.py reports"
            continue
        assert text.startswith("# deltaport lab"), path
        assert _repeated_ends(text) == [], path


# ------------------------------------------------------------------ one-seed verdicts and the noise margin
@pytest.mark.parametrize("unit,thr,direction,lo,hi,item,one_seed", [
    ("points", -0.02, ">=", -0.035, 0.0, "inconclusive", "inconclusive"),
    ("points", -0.02, ">=", -0.005, 0.01, "yes", "inconclusive"),  # clears −2 by 1.5 points only: within 3
    ("points", -0.02, ">=", 0.015, 0.04, "yes", "yes"),
    ("points", 0.0, ">", -0.03, 0.0, "no", "inconclusive"),
    ("points", 0.0, ">", -0.20, -0.031, "no", "no"),
    ("fraction", 0.75, ">=", 0.965, 1.0, "yes", "yes"),
    ("fraction", 0.75, ">=", 0.80, 0.95, "yes", "inconclusive"),
    ("rho", -0.5, "<=", -0.85, -0.84, "yes", "yes"),
    ("rho", -0.5, "<=", -0.62, -0.55, "yes", "inconclusive"),
    ("points", 0.05, "<=", 0.0, 0.0, "yes", "yes"),
])
def test_one_seed_verdict_widens_the_item_interval_by_the_noise_margin(unit, thr, direction, lo, hi, item, one_seed):
    from deltaport.lab.findings import one_seed_verdict
    from deltaport.stats import verdict

    f = {"unit": unit, "threshold": thr, "direction": direction, "lo": lo, "hi": hi}
    assert verdict(f, thr, direction) == item
    assert one_seed_verdict(f) == one_seed


def test_noise_margin_only_turns_a_decided_verdict_inconclusive():
    import random

    from deltaport.lab.findings import NOISE_MARGIN, one_seed_verdict
    from deltaport.stats import verdict

    rng = random.Random(0)
    for _ in range(2000):
        unit = rng.choice(list(NOISE_MARGIN))
        lo = rng.uniform(-1, 1)
        f = {"unit": unit, "threshold": rng.uniform(-1, 1), "direction": rng.choice([">=", ">", "<="]),
             "lo": lo, "hi": lo + rng.uniform(0, 0.3)}
        v = one_seed_verdict(f)
        assert v == "inconclusive" or v == verdict(f, f["threshold"], f["direction"])


def test_claims_record_the_item_verdict_and_the_report_names_what_the_margin_held_back(quick):
    cl = R.claims(quick)
    assert cl and all({"item_verdict", "noise_margin", "verdict"} <= set(c) for c in cl)
    r = {**quick, "claims": cl, "noise_twin": None}
    text = R.report_md(r)
    assert "widened on both sides by the design's noise bound (3.0 points for a difference of scores" in text
    held = [c for c in cl if c["item_verdict"] != "inconclusive" and c["verdict"] == "inconclusive"]
    for c in held:
        assert f"({c['id']})" in text.split("That margin alone leaves", 1)[1].split(".", 1)[0]
