"""The lab (`deltaport lab run`, `deltaport demo`): structure and invariants, never research outcomes.

The ``ci`` preset runs the whole pipeline (family, grid, recovery, transfer-then-finetune,
Algorithm 1, backporting, second language, connectivity + check, report) in about a minute.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from dataclasses import replace as dataclasses_replace  # noqa: E402

from deltaport.errors import InputError  # noqa: E402
from deltaport.lab.config import LabConfig, ModelConfig, PretrainConfig, WorldConfig, load_config  # noqa: E402
from deltaport.lab.world import (FLAG_TEMPLATES, Mix, make_tokenizer, make_world, sample_block,  # noqa: E402
                                 sft_records)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    from deltaport.lab.run import run_lab

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("lab") / "run"
    results = run_lab(load_config("ci"), run_dir)
    return run_dir, results


# ------------------------------------------------------------------ the world (fast)
def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = make_world(64, 12, seed=3), make_world(64, 12, seed=3)
    assert a.entities == b.entities and a.flag == b.flag
    assert make_world(64, 12, seed=4).entities != a.entities
    assert not set(a.sft) & set(a.known) and not set(a.sft) & set(a.new) and not set(a.known) & set(a.new)
    assert set(a.sft) | set(a.known) == set(a.f1) and set(a.new) == set(a.f2)


def test_stage1_text_never_states_an_f2_flag_nor_the_question():
    w = make_world(64, 12, seed=0)
    rng = random.Random(0)
    f2 = set(w.f2)
    colors_b = {"a": set(w.flag.values())}
    blocks = [sample_block(w, Mix(f1=0.3, f2=0.0, filler=0.7, lang_b=0.2), rng, 48) for _ in range(300)]
    words = [x for b in blocks for x in b]
    assert "what" not in words and "?" not in words  # the QA format is never pretrained
    flag_words = {"flag", "galfu"}  # language a and b
    for block in blocks:
        sentence: list[str] = []
        for x in block[1:] + ["."]:
            if x == ".":
                if flag_words & set(sentence) and f2 & set(sentence):
                    pytest.fail(f"stage-1 text states an F2 flag fact: {' '.join(sentence)!r}")
                sentence = []
            else:
                sentence.append(x)
    assert colors_b["a"]  # sanity: flags exist
    assert len(FLAG_TEMPLATES) == 5


def test_tokenizer_round_trips_and_chat_template_marks_generation():
    w = make_world(64, 12, seed=0)
    tok = make_tokenizer(w)
    rec = sft_records(w)[0]
    ids = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    mask = ids["assistant_masks"]
    answer_ids = [i for i, m in zip(ids["input_ids"], mask) if m]
    assert tok.decode(answer_ids).split()[0] == rec["messages"][1]["content"]
    assert tok.unk_token_id not in ids["input_ids"]
    assert tok.eos_token and tok.pad_token


def test_bad_config_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("versions: [M1, M9]\nexperiments: [grid, nonsense]\nworld: {n_entities: 10, colour: 3}\n")
    with pytest.raises(InputError) as ei:
        load_config(bad)
    msg = str(ei.value)
    assert "M9" in msg and "nonsense" in msg and "colour" in msg
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_preset_name_wins_over_a_same_named_run_directory(tmp_path, monkeypatch):
    # `lab run full -o full` leaves a directory called "full"; the next `lab run full` from there
    # crashed with IsADirectoryError before: the preset must win, any other directory is refused clearly
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "runs").mkdir()
    assert load_config("full") == load_config(Path(__file__).parents[1] / "src/deltaport/lab/presets/full.yaml")
    with pytest.raises(InputError, match="is a directory"):
        load_config("runs")


def test_family_resume_after_kill_is_bit_identical(tmp_path):
    from deltaport.lab.family import build_family

    cfg = LabConfig(world=WorldConfig(n_entities=24, n_sft=4),
                    model=ModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, seq_len=24),
                    pretrain=PretrainConfig(batch_size=4, warmup=2, stage1_steps=[4, 8, 12], stage2_steps=[4, 8],
                                            mx_like="M1"))
    ref = build_family(cfg, tmp_path / "ref")

    def killer(label, done, total):
        if label.endswith("seed 0") and done == 14:  # between M4's predecessor M3 (12) and M4 (16)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_family(cfg, tmp_path / "resumed", progress=killer)
    root = next((tmp_path / "resumed").iterdir())
    assert (root / "M3" / "config.json").exists() and not (root / "M4").exists()
    resumed = build_family(cfg, tmp_path / "resumed")
    for name in ("M0", "M1", "M2", "M3", "M4", "M5", "Mx"):
        a, b = _tensors(ref[name]), _tensors(resumed[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert json.loads((resumed[name] / "lab_provenance.json").read_text())["config"] == cfg.family_key()


def test_unseen_rows_are_exactly_the_tokens_pretraining_never_reads():
    """unseen_in_pretraining (design v4) against a reference: the words of 3000 sampled blocks of both mixes."""
    import random

    from deltaport.lab.world import Mix, make_world, sample_block, unseen_in_pretraining

    w = make_world(24, 4, seed=3)
    seen: set[str] = set()
    rng = random.Random(0)
    for mix in (Mix(0.3, 0.0, 0.7, 0.2), Mix(0.3, 0.4, 0.3, 0.2)):
        for _ in range(1500):
            seen.update(sample_block(w, mix, rng, 48))
    assert set(unseen_in_pretraining(w)) == set(w.vocabulary()) - seen
    assert {"<|user|>", "<|assistant|>", "what", "color", "?"} <= set(unseen_in_pretraining(w))


def test_zero_unseen_rows_change_only_those_rows_of_every_model(tmp_path):
    """v4's family equals v3's bit for bit but for the input rows of the tokens pretraining never reads: those
    rows get no gradient (identical in M1..M5 of v3) and are 0 in every v4 model, M0 and Mx included; a v3
    config keeps its family hash."""
    import dataclasses

    from deltaport.lab.family import build_family, family_root, world_of
    from deltaport.lab.world import make_tokenizer, unseen_in_pretraining

    cfg = LabConfig(world=WorldConfig(n_entities=24, n_sft=4),
                    model=ModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, seq_len=24),
                    pretrain=PretrainConfig(batch_size=4, warmup=2, stage1_steps=[4, 8, 12], stage2_steps=[4, 8],
                                            mx_like="M1"))
    v4 = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, unseen_rows="zero"))
    assert "unseen_rows" not in cfg.family_key()["pretrain"] and v4.family_key()["pretrain"]["unseen_rows"] == "zero"
    assert family_root(cfg, tmp_path) != family_root(v4, tmp_path)
    old, new = build_family(cfg, tmp_path / "v3"), build_family(v4, tmp_path / "v4")
    vocab = make_tokenizer(world_of(cfg)).get_vocab()
    rows = sorted(vocab[t] for t in unseen_in_pretraining(world_of(cfg)))
    emb = "model.embed_tokens.weight"
    for name in ("M0", "M1", "M2", "M3", "M4", "M5", "Mx"):
        a, b = _tensors(old[name]), _tensors(new[name])
        assert a.keys() == b.keys()
        for k in a:
            if k != emb:
                assert torch.equal(a[k], b[k]), (name, k)
        assert torch.count_nonzero(b[emb][rows]) == 0 and torch.count_nonzero(a[emb][rows]) > 0, name
        keep = [i for i in range(a[emb].shape[0]) if i not in rows]
        assert torch.equal(a[emb][keep], b[emb][keep]), name
    m1, m5 = _tensors(old["M1"])[emb], _tensors(old["M5"])[emb]
    assert torch.equal(m1[rows], m5[rows])  # never trained: why their random draw was the seed's lottery


# ------------------------------------------------------------------ the whole pipeline (ci preset)
@pytest.mark.slow
def test_ci_identity_Mi_plus_Di_equals_FT_exactly(ci_run):
    run_dir, results = ci_run
    for v in results["config"]["versions"]:
        merged = _tensors(run_dir / "models" / f"{v}+D{v[1:]}")
        ft = _tensors(run_dir / "models" / f"FT-{v}")
        assert merged.keys() == ft.keys()
        for k in ft:
            assert torch.equal(merged[k], ft[k]), f"{v}: {k} differs"
        assert results["invariants"]["identity_Mi_plus_Di_equals_FT"][v] is True


@pytest.mark.slow
def test_ci_random_init_plus_delta_stays_at_chance(ci_run):
    _, results = ci_run
    assert set(results["grid"]["cells"]["M0"]) == set(results["config"]["versions"])
    for s, v in results["grid"]["cells"]["M0"].items():
        assert v <= results["chance"], f"M0 + Δ{s[1:]} scored {v}"


@pytest.mark.slow
def test_ci_outputs_exist_parse_and_follow_the_schema(ci_run):
    import matplotlib.image as mpimg

    run_dir, results = ci_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    for key in ("schema", "config", "seeds", "scores", "grid", "recovery", "transfer_then_finetune", "iterative",
                "backport", "language", "connectivity", "claims", "timings_s", "figures"):
        assert key in on_disk, key
    # schema 2: no "backends" record - every step runs through the library, there is nothing else to name
    assert on_disk["schema"] == 2 and "backends" not in on_disk and "backend" not in on_disk["iterative"]
    V = on_disk["config"]["versions"]
    assert set(on_disk["grid"]["cells"]) == set(V) | {"Mx", "M0"}
    for t, row in on_disk["grid"]["cells"].items():
        assert t not in row and all(0.0 <= x <= 1.0 for x in row.values())
    for name in ("grid", "convergence", "connectivity"):
        img = mpimg.imread(run_dir / on_disk["figures"][name])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    report = (run_dir / "report.md").read_text()
    from deltaport.lab.report import rerender

    assert rerender(run_dir) == report  # the report is a function of results.json alone
    assert "Nothing was reused from an earlier run." in report
    for heading in ("## What reproduced", "## 1. Transfer grid", "## 2. Fraction", "## 3. Transfer-then-finetune",
                    "## 4. Iterative", "## 5. Backporting", "## 6. Second-language", "## 7. Connectivity", "Seeds:"):
        assert heading in report, heading
    curve = on_disk["curves"]["FT(M5+Δ3)"]
    steps = [s for s, _ in curve]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == on_disk["config"]["finetune"]["steps"]
    # provenance next to every artifact
    for name, path in on_disk["family"].items():
        assert (Path(path) / "lab_provenance.json").exists(), name
    for d in (p for p in (run_dir / "deltas").iterdir() if p.is_dir()):
        assert (d / "deltaport.json").exists() and (d / "lab_key.json").exists()


@pytest.mark.slow
def test_ci_rerun_reuses_every_artifact(ci_run):
    from deltaport.lab.run import run_lab
    from deltaport.lab.store import wall_seconds

    run_dir, results = ci_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/*/*.safetensors")}
    stamps.update({p: p.stat().st_mtime_ns for p in run_dir.glob("family/*/*/*.safetensors")})
    # a fresh directory: hits on the cache are repeats of this run's own results, never reuse
    fresh = results["cache"]
    assert fresh["family"] == 0 and fresh["evals"] == fresh["finetunes"] == 0 and fresh["computed_evals"] > 0
    again = run_lab(load_config("ci"), run_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["grid"]["cells"] == results["grid"]["cells"]
    rerun = again["cache"]
    assert rerun["family"] == 1 and rerun["computed_evals"] == rerun["computed_finetunes"] == 0
    assert rerun["evals"] >= fresh["computed_evals"] and rerun["finetunes"] == fresh["computed_finetunes"]
    assert "Reused from an earlier run in this directory: " in (run_dir / "report.md").read_text()
    assert again["timings_s"].get("steps.finetune", 0) == 0
    # the rerun's own total is seconds; the run's cost is every pass summed (the first one kept)
    first = results["timings_s"]["passes"]
    assert len(first) == 1 and first[0] == results["timings_s"]["total"]
    assert again["timings_s"]["passes"][:1] == first and len(again["timings_s"]["passes"]) >= 2
    assert again["timings_s"]["passes"][-1] == again["timings_s"]["total"]
    assert wall_seconds(again) == round(sum(again["timings_s"]["passes"]), 1) > results["timings_s"]["total"]


def test_size_presets_differ_only_in_the_model_and_span_100x():
    """size-s/m/l: one family per size from one preset each; only `model:` (and the name) differs from size-m."""
    from transformers import LlamaConfig

    from deltaport.lab.family import _model_config

    sizes = {n: load_config(n) for n in ("size-s", "size-m", "size-l")}
    ref = sizes["size-m"].to_dict()
    for name, cfg in sizes.items():
        d = cfg.to_dict()
        assert {k for k in d if d[k] != ref[k]} <= {"name", "model"}, name
    tok = make_tokenizer(make_world(**{k: v for k, v in {"n_entities": 240, "n_sft": 40, "seed": 0}.items()}))
    n = {}
    for name, cfg in sizes.items():
        c = _model_config(cfg, tok)
        assert isinstance(c, LlamaConfig)
        h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        n[name] = 2 * V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h  # embeddings + lm_head, layers, final norm
    assert n["size-s"] < n["size-m"] < n["size-l"] and n["size-l"] >= 100 * n["size-s"], n
    assert n == {"size-s": 48544, "size-m": 940160, "size-l": 5545280}  # the counts the presets' comments state


# ------------------------------------------------------------------ the noise twin (docs/lab.md, "Noise twin")
def test_noise_twin_changes_only_floating_point_noise():
    from deltaport.lab.noise import twin_config

    cfg = load_config("ci")
    twin = twin_config(cfg)
    assert (twin.threads, twin.init_ulp, twin.noise_twin) == (2, 1, False)
    assert twin_config(dataclasses_replace(cfg, threads=2)).threads == 1
    assert "compression" not in twin.experiments and set(twin.experiments) == set(cfg.experiments) - {"compression"}
    same = ("seed", "world", "model", "pretrain", "finetune", "versions", "curve_pairs", "eval_limit")
    assert all(getattr(twin, k) == getattr(cfg, k) for k in same)
    assert twin.family_key() != cfg.family_key() and cfg.family_key() == {
        k: cfg.to_dict()[k] for k in ("seed", "world", "model", "pretrain")}  # init_ulp 0: old family hashes kept


def test_noise_attach_flags_a_verdict_that_differs():
    from deltaport.lab.noise import attach, differing_verdicts

    claims = [{"id": "a", "mean": 0.9, "verdict": "yes"}, {"id": "c", "mean": 0.01, "verdict": "yes"},
              {"id": "f", "mean": -0.6, "verdict": "yes"}]
    record = {"claims": {"a": {"mean": 0.8, "verdict": "yes"}, "c": {"mean": -0.03, "verdict": "inconclusive"}}}
    attach(claims, record)
    assert [c["noise_spread"] for c in claims] == [pytest.approx(0.1), pytest.approx(0.04), None]
    assert [c["same_verdict"] for c in claims] == [True, False, None]
    assert differing_verdicts(claims) == ["c"]
    assert attach([{"id": "a", "mean": 1.0, "verdict": "no"}], None)[0]["twin_verdict"] is None


def test_agreement_applies_the_acceptance_tolerances():
    from deltaport.lab.noise import agreement

    def run(c, f, e="yes"):
        return {"claims": [{"id": "c", "unit": "points", "mean": c, "verdict": "yes"},
                           {"id": "f", "unit": "rho", "mean": f, "verdict": e}],
                "scores": {"FT(M5)": {"heldout": c}}}

    assert agreement(run(0.0, -0.80), run(0.029, -0.71))["agree"]  # 0.03 for points, 0.10 otherwise
    assert not agreement(run(0.0, -0.80), run(0.031, -0.80))["agree"]
    assert not agreement(run(0.0, -0.80), run(0.0, -0.69))["agree"]
    diff = agreement(run(0.0, -0.8), run(0.0, -0.8, e="inconclusive"))
    assert not diff["agree"] and diff["claims"]["f"]["verdicts"] == ["yes", "inconclusive"]
    assert not agreement(run(0.0, -0.8), {**run(0.0, -0.8), "claims": run(0.0, -0.8)["claims"][:1]})["same_ids"]
    assert agreement(run(0.0, -0.8), run(0.02, -0.8))["max_score_gap"] == pytest.approx(0.02)


def _fake_seed(seed: int, mx_gain: str, twin_dir: Path | None = None) -> dict:
    """A results dict with just what the b1/b2 findings and the summary read (versions M3, M5; 4 items)."""
    zero = "0000"
    items = {"Mx": zero, "M0": zero, "Mx+Δ3": mx_gain, "Mx+Δ5": zero, "M0+Δ3": zero, "M0+Δ5": zero}
    r = {"name": "fake", "config": {"versions": ["M3", "M5"], "seed": seed}, "items": {"heldout": items},
         "scores": {"FT(M5)": {"heldout": 0.5 + 0.01 * seed}}}
    if twin_dir is not None:
        r["noise_twin"] = {"what": "twin", "run_dir": str(twin_dir), "scores": {"FT(M5)": 0.5}}
    return r


def test_summary_puts_noise_spread_beside_seed_spread(tmp_path):
    from deltaport.lab.multiseed import summarize, summary_md

    runs = []
    for seed, (gain, twin_gain) in enumerate([("1000", "1100"), ("1100", "1100")]):
        d = tmp_path / f"twin-{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_fake_seed(seed, twin_gain)))
        runs.append(_fake_seed(seed, gain, d))
    sm = summarize(runs)
    b1 = next(f for f in sm["findings"] if f["id"] == "b1")
    # θ = mean over s of EM(Mx+Δs) − EM(Mx): seed 0 0.125, seed 1 0.25; the twins 0.25, 0.25
    assert b1["per_seed"] == pytest.approx([0.125, 0.25]) and b1["twin_per_seed"] == pytest.approx([0.25, 0.25])
    assert b1["noise_per_seed"] == pytest.approx([0.125, 0.0]) and b1["noise_spread"] == pytest.approx(0.125)
    assert b1["seed_spread"] == pytest.approx(0.125) and b1["twin_verdict"] in ("yes", "no", "inconclusive")
    assert sm["heldout_noise_per_seed"]["FT(M5)"] == pytest.approx([0.0, 0.01])
    assert sm["noise_twin"]["verdicts_identical"] == all(f["same_verdict"] for f in sm["findings"])
    md = summary_md(sm)
    assert "noise spread" in md and "seed spread" in md
    assert "noise_twin" not in summarize([_fake_seed(0, "1000"), _fake_seed(1, "1100")])


def test_summary_with_twins_on_some_seeds_only_and_from_finished_seed_dirs(tmp_path):
    # the full run may twin some seeds only (a twin costs a second run); the summary can also be written later
    # from seed dirs that separate processes filled (summarize_dir rereads results.json, reruns nothing)
    from deltaport.errors import InputError
    from deltaport.lab.multiseed import summarize, summarize_dir, summary_md

    out = tmp_path / "full"
    gains = {0: ("1000", "1100"), 1: ("1100", None), 2: ("0000", "1000")}
    runs = []
    for seed, (gain, twin_gain) in gains.items():
        d = out / f"seed-{seed}"
        d.mkdir(parents=True)
        tw = None
        if twin_gain is not None:
            tw = d / "twin"
            tw.mkdir()
            (tw / "results.json").write_text(json.dumps(_fake_seed(seed, twin_gain)))
        runs.append(_fake_seed(seed, gain, tw))
        (d / "results.json").write_text(json.dumps(runs[-1]))
    sm = summarize(runs)
    b1 = next(f for f in sm["findings"] if f["id"] == "b1")
    # θ per seed 0.125 / 0.25 / 0; the twins of seeds 0 and 2: 0.25, 0.125; seed 1 enters the twin decision as itself
    assert b1["per_seed"] == pytest.approx([0.125, 0.25, 0.0])
    assert b1["twin_per_seed"] == pytest.approx([0.25, 0.25, 0.125])
    assert b1["noise_per_seed"][1] is None and b1["noise_per_seed"][0] == pytest.approx(0.125)
    assert b1["noise_spread"] == pytest.approx(0.125)
    assert sm["noise_twin"]["seeds"] == [0, 2] and sm["noise_twin"]["twin_timings_s"][1] is None
    assert sm["heldout_noise_per_seed"]["FT(M5)"][1] is None
    assert sm["heldout_noise_per_seed"]["FT(M5)"][2] == pytest.approx(0.02)
    assert "Seeds 0, 2 of 3 also ran their twin" in summary_md(sm)
    again = summarize_dir(out)
    assert [f["per_seed"] for f in again["findings"]] == [f["per_seed"] for f in sm["findings"]]
    assert json.loads((out / "summary.json").read_text())["noise_twin"]["seeds"] == [0, 2]
    assert "Seeds 0, 2 of 3" in (out / "summary.md").read_text()
    with pytest.raises(InputError, match="seed-7"):
        summarize_dir(out, [0, 7])
    from deltaport.cli.main import main

    (out / "summary.json").unlink()
    assert main(["lab", "summarize", str(out)]) == 0 and (out / "summary.json").is_file()
    assert main(["lab", "summarize", str(tmp_path / "nothing-here")]) == 2
    (out / "seed-1" / "results.json").write_text("{not json")
    assert main(["lab", "summarize", str(out)]) == 2


@pytest.mark.slow
def test_ci_noise_twin_reaches_every_verdict_of_its_seed(ci_run):
    """The twin (threads 1 -> 2, every initial weight one ULP up) of the ci run: its family really differs (M0
    is exactly the main M0 one ULP up), the main run is reused from the cache, and no verdict differs."""
    from deltaport.lab.noise import differing_verdicts
    from deltaport.lab.run import run_lab

    run_dir, results = ci_run
    again = run_lab(load_config("ci"), run_dir, noise_twin=True)
    assert again["timings_s"].get("steps.finetune", 0) == 0  # the main run: every step reused
    torch.set_num_threads(1)
    twin = json.loads((run_dir / "twin" / "results.json").read_text())
    assert twin["config"]["threads"] == 2 and twin["config"]["init_ulp"] == 1
    m0, m0_twin = _tensors(results["family"]["M0"]), _tensors(twin["family"]["M0"])
    for k, w in m0.items():
        assert torch.equal(m0_twin[k], torch.nextafter(w, torch.full_like(w, float("inf")))), k
    m5, m5_twin = _tensors(results["family"]["M5"]), _tensors(twin["family"]["M5"])
    assert any(not torch.equal(m5[k], m5_twin[k]) for k in m5)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert {c["id"] for c in on_disk["claims"]} == set(on_disk["noise_twin"]["claims"])
    for c in on_disk["claims"]:
        if c["noise_spread"] is not None:
            assert c["noise_spread"] == pytest.approx(abs(c["mean"] - c["twin_mean"]))
    assert differing_verdicts(on_disk["claims"]) == [], [(c["id"], c["verdict"], c["twin_verdict"])
                                                          for c in on_disk["claims"]]
    assert "noise twin" in (run_dir / "report.md").read_text()


def test_preset_costs_have_one_source_the_demo_help(capsys, monkeypatch):
    """`demo --help` states each preset's measured cost from PRESET_COST; the presets' comments point there
    instead of carrying their own (once they said ~45 min for a run that took a fraction of it)."""
    import re

    from deltaport.cli.main import main
    from deltaport.lab.config import PRESETS_DIR, PRESET_COST

    monkeypatch.setenv("COLUMNS", "400")
    assert main(["demo", "--help"]) == 0
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    assert set(PRESET_COST) == {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    for name, cost in PRESET_COST.items():
        assert f"{name}: {cost}" in shown, name
    for preset in PRESETS_DIR.glob("*.yaml"):
        comments = " ".join(line for line in preset.read_text().splitlines() if line.startswith("#"))
        assert not re.search(r"\d\s*(min|s)\b", comments), f"{preset.name} states its own cost: {comments}"
        assert "deltaport demo --help" in comments, preset.name


def test_cli_lab_run_rejects_a_bad_config(tmp_path):
    from deltaport.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("versions: [M7]\n")
    assert main(["lab", "run", str(bad), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_demo_ci_preset_writes_the_report(tmp_path):
    from deltaport.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--preset", "ci", "-o", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["name"] == "ci" and (out / "report.md").read_text().startswith("# deltaport lab report: `ci`")


# ------------------------------------------------------------------ intervals (fast)
def _seed(**vectors):
    import numpy as np

    v = {k: np.array([float(c) for c in s]) for k, s in vectors.items()}
    return {"v": v, "n_items": len(next(iter(v.values())))}


def _diff(d, idx):
    return float(d["v"]["A"][idx].mean() - d["v"]["B"][idx].mean())


def test_bootstrap_is_deterministic_given_its_seed():
    from deltaport.lab.stats import hierarchical_bootstrap

    seeds = [_seed(A="1101101011", B="0100100110"), _seed(A="1111011010", B="0110100100"),
             _seed(A="1011100111", B="1100101000")]
    a = hierarchical_bootstrap(_diff, seeds, n_boot=300, seed=7)
    b = hierarchical_bootstrap(_diff, seeds, n_boot=300, seed=7)
    c = hierarchical_bootstrap(_diff, seeds, n_boot=300, seed=8)
    assert a == b
    assert (a["lo"], a["hi"]) != (c["lo"], c["hi"])
    assert a["per_seed"] == pytest.approx([0.3, 0.3, 0.3]) and a["mean"] == pytest.approx(0.3)


def test_bootstrap_zero_variance_gives_a_point_interval():
    from deltaport.lab.stats import hierarchical_bootstrap

    seeds = [_seed(A="1111", B="0000")] * 3
    ci = hierarchical_bootstrap(_diff, seeds, n_boot=200, seed=0)
    assert ci["mean"] == ci["lo"] == ci["hi"] == 1.0
    assert ci["seed_sd"] == 0.0 and ci["seed_range"] == [1.0, 1.0]


def test_bootstrap_resamples_seeds_then_items():
    from deltaport.lab.stats import hierarchical_bootstrap

    # items carry no variance inside a seed; only the seed draw moves the mean: {1, 0.5, 0} reachable
    seeds = [_seed(A="11", B="00"), _seed(A="00", B="00")]
    ci = hierarchical_bootstrap(_diff, seeds, n_boot=2000, seed=0)
    assert (ci["lo"], ci["mean"], ci["hi"]) == (0.0, 0.5, 1.0)
    # one seed: only items are resampled
    one = hierarchical_bootstrap(_diff, [_seed(A="1100", B="0000")], n_boot=2000, seed=0)
    assert one["seed_sd"] is None and 0.0 <= one["lo"] < 0.5 < one["hi"] <= 1.0


def test_bootstrap_interval_contains_the_mean():
    from deltaport.lab.stats import hierarchical_bootstrap

    rng = random.Random(3)
    seeds = [_seed(A="".join(rng.choice("01") for _ in range(40)), B="".join(rng.choice("001") for _ in range(40)))
             for _ in range(3)]
    ci = hierarchical_bootstrap(_diff, seeds, n_boot=500, seed=1)
    assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["lo"] < ci["hi"]


def test_verdict_is_decided_on_the_interval():
    from deltaport.lab.stats import verdict

    assert verdict({"lo": 0.8, "hi": 0.9}, 0.75, ">=") == "yes"
    assert verdict({"lo": 0.5, "hi": 0.9}, 0.75, ">=") == "inconclusive"  # the mean may be above: not enough
    assert verdict({"lo": 0.5, "hi": 0.7}, 0.75, ">=") == "no"
    assert verdict({"lo": 0.0, "hi": 0.0}, 0.0, ">") == "no"  # an exact tie is not "more"
    assert verdict({"lo": -0.9, "hi": -0.6}, -0.5, "<=") == "yes"
    assert verdict({"lo": None, "hi": None}, 0.0, ">=") == "inconclusive"
    with pytest.raises(ValueError):
        verdict({"lo": 0, "hi": 1}, 0, "==")


def test_cli_rejects_bad_seed_options(tmp_path):
    from deltaport.cli.main import main

    out = tmp_path / "out"
    assert main(["lab", "run", "ci", "-o", str(out), "--seed", "1", "--seeds", "0,1", "--no-progress"]) == 2
    assert main(["lab", "run", "ci", "-o", str(out), "--seeds", "0,0", "--no-progress"]) == 2
    assert main(["lab", "run", "ci", "-o", str(out), "--seeds", "0,x", "--no-progress"]) == 2
    assert not out.exists()


def test_cache_key_covers_library_versions(monkeypatch):
    from deltaport.lab import env
    from deltaport.lab.store import step_key

    a = step_key("eval", model="h", task="t")
    monkeypatch.setattr(env, "cache_salt", lambda: {**env.versions(), "torch": "0.0.0-other"})
    assert step_key("eval", model="h", task="t") != a


def test_environment_records_cpu_and_every_version():
    from deltaport.lab.env import PACKAGES, environment

    e = environment()
    assert set(PACKAGES) <= set(e["versions"]) and e["versions"]["torch"] == torch.__version__.split("+")[0] or \
        e["versions"]["torch"] == torch.__version__
    assert e["cpu"]["model"] and isinstance(e["cpu"]["kernel_flags"], list)
    import deltaport

    assert e["versions"]["deltaport"] == deltaport.__version__


# ------------------------------------------------------------------ README tables come from committed files
def test_readme_lab_tables_match_the_committed_result_files():
    from deltaport.lab.readme import render, replace_blocks

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert replace_blocks(readme, render(root)) == readme, (
        "README's lab tables disagree with docs/results/: run `python benchmarks/readme_tables.py`")


def test_fewshot_prompts_show_only_finetuning_facts(tmp_path):
    from deltaport.lab.world import N_SHOTS, write_eval_tasks

    w = make_world(64, 12, seed=0)
    tasks = write_eval_tasks(w, make_tokenizer(w), tmp_path)
    rows = [json.loads(x) for x in Path(str(tasks["lab_heldout_fs"]).replace(".yaml", ".jsonl")).read_text().splitlines()]
    plain = [json.loads(x) for x in Path(str(tasks["lab_heldout"]).replace(".yaml", ".jsonl")).read_text().splitlines()]
    assert [r["entity"] for r in rows] == [r["entity"] for r in plain]  # same items, same order (paired)
    held_out = set(w.known) | set(w.new)
    for r in rows:
        assert r["prompt"].count("<|assistant|>") == N_SHOTS + 1 and r["prompt"].endswith(plain[0]["prompt"][-13:])
        shown = {e for e in w.entities if f" {e} " in r["prompt"]} - {r["entity"]}
        assert shown and shown <= set(w.sft) and not shown & held_out


def test_check_scope_says_which_family_the_thresholds_saw():
    import dataclasses

    from deltaport.lab.experiments import check_calibration_scope

    quick = load_config("quick")
    assert quick.seed != 0 and check_calibration_scope(quick)["in_sample"] is False  # the demo: out of sample
    # design v4 zeroes the rows pretraining never trains; the calibration families kept v3's random rows
    assert quick.pretrain.unseen_rows == "zero"
    assert check_calibration_scope(dataclasses.replace(quick, seed=0))["in_sample"] is False
    v3 = dataclasses.replace(quick, seed=0, pretrain=dataclasses.replace(quick.pretrain, unseen_rows="random"))
    assert check_calibration_scope(v3)["in_sample"] is True
    assert check_calibration_scope(load_config("full"))["in_sample"] is False



def test_check_scope_of_a_calibration_over_several_sizes(monkeypatch):
    """A calibration that records its families (benchmarks/calibrate_check.py --sizes ...): every size is in
    sample at its seed, and the report's sentence names each size and the held-out families."""
    import dataclasses

    import deltaport.check
    from deltaport.lab.config import ModelConfig
    from deltaport.lab.experiments import check_calibration_scope

    quick = load_config("quick")
    small = dict(quick.to_dict()["model"], hidden_size=16, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    families = [{"family": "lab small 0", "num_parameters": 14_256, "seed": 0, "model": small},
                {"family": "lab medium 0", "num_parameters": 150_336, "seed": 0, "model": quick.to_dict()["model"]}]
    monkeypatch.setattr(deltaport.check, "load_calibration",
                        lambda: {"families": families, "held_out": ["lab medium 1", "tiny 1"]})
    quick = dataclasses.replace(quick, pretrain=dataclasses.replace(quick.pretrain, unseen_rows="random"))
    for fam in families:
        cfg = dataclasses.replace(quick, seed=0, model=ModelConfig(**fam["model"]))
        scope = check_calibration_scope(cfg)
        assert scope["in_sample"] is True, fam
        assert check_calibration_scope(dataclasses.replace(cfg, seed=1))["in_sample"] is False
    assert scope["fitted_on"] == ("lab families of the quick preset's world and schedule (design v3's random rows "
                                  "for the tokens pretraining never sees) with 2 model size(s) (14,256, "
                                  "150,336 parameters), seed 0 (docs/check-calibration.md); scored there on lab "
                                  "medium 1, tiny 1")
    big = dict(small, hidden_size=160)
    assert check_calibration_scope(dataclasses.replace(quick, seed=0, model=ModelConfig(**big)))["in_sample"] is False


def test_readme_blocks_must_exist():
    from deltaport.lab.readme import replace_blocks

    with pytest.raises(ValueError, match="lab:quick"):
        replace_blocks("no markers here", {"quick": "x"})
    text = "a\n<!-- lab:quick:begin -->\nold\n<!-- lab:quick:end -->\nb"
    assert replace_blocks(text, {"quick": "new"}) == "a\n<!-- lab:quick:begin -->\nnew\n<!-- lab:quick:end -->\nb"


@pytest.mark.slow
def test_cli_multi_seed_run_writes_a_summary_with_intervals(tmp_path):
    from deltaport.cli.main import main

    out = tmp_path / "ms"
    assert main(["lab", "run", "ci", "--seeds", "0,1", "-o", str(out), "--no-progress"]) == 0
    sm = json.loads((out / "summary.json").read_text())
    assert sm["seeds"] == [0, 1] and (out / "seed-0" / "report.md").exists() and (out / "seed-1" / "report.md").exists()
    per_run = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert per_run[0]["config"]["seed"] == 0 and per_run[1]["config"]["seed"] == 1
    assert per_run[0]["family_provenance"]["M1"]["seed"] == 0 and per_run[1]["family_provenance"]["M1"]["seed"] == 1
    assert {f["id"] for f in sm["findings"]} >= {"b1", "b2", "c", "f"}
    for f in sm["findings"]:
        assert len(f["per_seed"]) == 2 and f["verdict"] in ("yes", "no", "inconclusive")
        if f["lo"] is not None:
            assert f["lo"] <= f["mean"] <= f["hi"]
    assert "| (b2)" in (out / "summary.md").read_text()
    assert per_run[0]["environment"]["versions"]["torch"] and per_run[0]["environment"]["cpu"]["model"]


def test_redirected_lab_prints_status_lines_not_bars(monkeypatch, capsys):
    """A lab run whose stderr is not a terminal says what it is doing in plain lines (a stage's start, its
    end, about every 30 s between), nothing with --quiet or --no-progress, and bars on a terminal."""
    from deltaport.cli import flags
    from deltaport.cli.lab import _lab_progress
    from deltaport.lab import run as R

    monkeypatch.setattr(flags, "_isatty", lambda: False)
    assert _lab_progress(quiet=False, progress=None) == "lines"
    assert _lab_progress(quiet=True, progress=None) is False
    assert _lab_progress(quiet=False, progress=False) is False
    monkeypatch.setattr(flags, "_isatty", lambda: True)
    assert _lab_progress(quiet=False, progress=None) is True

    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0, 43.0])
    monkeypatch.setattr(R.time, "monotonic", lambda: next(clock))
    with R.Progress("lines") as p:  # t0 = 0
        p.bar("pretrain", 0, 10)  # 1 s: first call, said
        p.bar("pretrain", 3, 10)  # 2 s: within 30 s of the last line, quiet
        p.bar("pretrain", 5, 10)  # 40 s: said
        p.note("transfer grid")  # 41 s
        p.bar("pretrain", 10, 10)  # 42 s: finished, said once
        p.bar("pretrain", 10, 10)  # never again
    err = capsys.readouterr().err
    assert err.splitlines() == ["[    1 s] pretrain: 0/10", "[   40 s] pretrain: 5/10", "[   41 s] transfer grid",
                                "[   42 s] pretrain: 10/10"]
    assert "\r" not in err
