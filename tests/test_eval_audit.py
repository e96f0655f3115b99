"""deltaport eval as an lm-eval user audits it: the same scores as the lm_eval CLI, per-item records
(--log-samples), lm-eval's own files, paired comparisons between models, and lm-eval's flags."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaport.errors import InputError
from deltaport.evaluation import compare, evaluate
from deltaport.testing import make_model, make_tokenizer, perturbed, save

DATA = Path(__file__).parent / "data" / "tiny_qa"
QA, GEN = str(DATA / "tiny_qa.yaml"), str(DATA / "tiny_gen.yaml")
FACTS = json.loads((DATA / "facts.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(extra_words=list(FACTS))


@pytest.fixture(scope="module")
def models(tok):
    """Two tiny models that differ enough to flip items: a random one and a strongly perturbed copy."""
    m = make_model("llama", seed=0)
    return {"a": (m, tok), "b": (perturbed(m, seed=3, scale=0.5), tok)}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-models")
    return {k: str(save(m, root / k, tokenizer=t)) for k, (m, t) in models.items()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.mark.slow
def test_scores_equal_the_lm_eval_cli(saved, tmp_path):
    """Same model, tasks, limit, batch size and seed: every metric and standard error equal, item by
    item the same log-likelihoods, responses and per-item metrics, and lm-eval's make_table reads our
    results file into the table its own file gives."""
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames, make_table

    from deltaport.cli.main import main
    from deltaport.evaluation.results import parse_metrics

    tasks = tmp_path / "tasks"  # the lm_eval CLI reads data paths relative to its working directory
    shutil.copytree(DATA, tasks)
    theirs = tmp_path / "lm_eval_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={saved['a']}",
           "--tasks", "tiny_qa.yaml,tiny_gen.yaml", "--limit", "8", "--batch_size", "4", "--seed", "0",
           "--device", "cpu", "--output_path", str(theirs), "--log_samples"]
    r = subprocess.run(cmd, cwd=tasks, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "r.json"
    assert main(["eval", saved["a"], "--tasks", f"{QA},{GEN}", "--limit", "8", "--batch-size", "4", "--seed", "0",
                 "--device", "cpu", "-o", str(out), "--no-cache", "--log-samples", "-q"]) == 0
    ours = json.loads(out.read_text())
    their_files = [str(p) for p in theirs.rglob("*.json*")]
    their_res = json.loads(Path(get_latest_filename(get_results_filenames(their_files))).read_text())
    for task in ("tiny_qa", "tiny_gen"):
        assert ours["results"][saved["a"]][task] == parse_metrics(their_res["results"][task])
    # lm-eval's tooling finds and reads the files written beside -o
    our_files = [str(p) for p in Path(ours["files"]["lm_eval"]).rglob("*.json*")]
    our_res = json.loads(Path(get_latest_filename(get_results_filenames(our_files))).read_text())
    assert make_table(our_res) == make_table(their_res)
    for task in ("tiny_qa", "tiny_gen"):
        mine = [f for f in get_sample_results_filenames(our_files) if f"samples_{task}_" in f]
        theirs_s = [f for f in get_sample_results_filenames(their_files) if f"samples_{task}_" in f]
        a, b = _lines(Path(mine[0])), {s["doc_id"]: s for s in _lines(Path(theirs_s[0]))}
        assert [x["doc_id"] for x in a] == list(range(8)) and sorted(b) == list(range(8))
        for rec in a:
            s = b[rec["doc_id"]]
            assert rec["prompt_hash"] == s["prompt_hash"] and str(rec["target"]) == s["target"]  # lm-eval writes str
            if task == "tiny_qa":
                # lm-eval's samples file writes each (log-likelihood, is-greedy) pair as strings
                assert [repr(v) for v in rec["loglikelihoods"]] == [x[0] for x in s["filtered_resps"]]
                assert rec["metrics"] == {"acc": s["acc"], "acc_norm": s["acc_norm"]}
            else:
                assert rec["response"] == s["resps"][0][0] and rec["extracted"] == {"first_word": s["filtered_resps"][0]}
                assert rec["metrics"] == {"exact_match,first_word": s["exact_match"]}


def test_log_samples_records_are_cached_and_hash_prompts_on_request(saved, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models import huggingface

    from deltaport.cli.main import main

    cache = tmp_path / "cache"
    argv = ["eval", saved["a"], saved["b"], "--tasks", f"{QA},{GEN}", "--limit", "6", "--device", "cpu",
            "--cache-dir", str(cache), "-q"]
    assert main([*argv, "-o", str(tmp_path / "plain.json")]) == 0  # no samples asked: still cached
    assert not list((tmp_path / "plain.lm_eval").rglob("samples_*"))
    assert len(list((tmp_path / "plain.lm_eval").rglob("results_*.json"))) == 2

    def refuse(*a, **k):
        raise AssertionError("a cached rerun loaded a model or ran lm-eval")

    monkeypatch.setattr(lm_eval, "simple_evaluate", refuse)
    monkeypatch.setattr(huggingface.HFLM, "__init__", refuse)
    assert main([*argv, "--log-samples", "-o", str(tmp_path / "s.json")]) == 0
    assert main([*argv, "--log-samples", "--no-prompts", "-o", str(tmp_path / "h.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert all(d["cached"] for row in res["details"].values() for d in row.values())
    assert "items" not in res and "samples" not in res  # the JSON keeps its shape; records are in their files
    for model in saved.values():
        folder = tmp_path / "s.lm_eval" / model.replace("/", "__")
        hashed = tmp_path / "h.lm_eval" / model.replace("/", "__")
        for task, n_metrics in (("tiny_qa", 2), ("tiny_gen", 1)):
            recs = _lines(_only(folder, f"samples_{task}_*.jsonl"))
            assert [r["doc_id"] for r in recs] == list(range(6))  # one line per item, no header
            assert all(len(r["metrics"]) == n_metrics and r["target"] is not None for r in recs)
            score = res["results"][model][task]["acc" if task == "tiny_qa" else "exact_match,first_word"]
            key = "acc" if task == "tiny_qa" else "exact_match,first_word"
            assert sum(r["metrics"][key] for r in recs) / 6 == pytest.approx(score, abs=1e-12)
            if task == "tiny_qa":
                assert all(len(r["loglikelihoods"]) == len(r["choices"]) == 6 for r in recs)
            else:
                assert all(isinstance(r["response"], str) for r in recs)
            for r, h in zip(recs, _lines(_only(hashed, f"samples_{task}_*.jsonl"))):
                assert "prompt" not in h and "choices" not in h
                assert h["prompt_hash"] == r["prompt_hash"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
                assert h == {k: v for k, v in r.items() if k not in ("prompt", "choices")}


def test_comparison_pairs_items_and_lists_flips(models, tmp_path):
    res = evaluate(models, [QA, GEN], limit=16, device="cpu", log_samples=True)
    comps = compare(res, list_items=True)
    assert {(c["task"], c["metric"]) for c in comps} == {("tiny_qa", "acc"), ("tiny_qa", "acc_norm"),
                                                         ("tiny_gen", "exact_match,first_word")}
    for c in comps:
        assert c["model"] == "b" and c["reference"] == "a" and c["n_items"] == 16
        ra, rb = (res["results"][m][c["task"]][c["metric"]] for m in ("a", "b"))
        assert (c["reference_score"], c["score"]) == pytest.approx((ra, rb), abs=1e-12)
        assert c["difference"] == pytest.approx(rb - ra, abs=1e-12)
        assert c["ci_low"] <= c["difference"] <= c["ci_high"]
        va = {r["doc_id"]: r["metrics"][c["metric"]] for r in res["samples"]["a"][c["task"]]}
        vb = {r["doc_id"]: r["metrics"][c["metric"]] for r in res["samples"]["b"][c["task"]]}
        down = [f"{c['task']}/{i}" for i in va if va[i] == 1 and vb[i] == 0]
        up = [f"{c['task']}/{i}" for i in va if va[i] == 0 and vb[i] == 1]
        assert (c["right_to_wrong_items"], c["wrong_to_right_items"]) == (down, up)
        assert (c["right_to_wrong"], c["wrong_to_right"]) == (len(down), len(up))
    acc = next(c for c in comps if c["metric"] == "acc")
    assert acc["right_to_wrong"] + acc["wrong_to_right"] > 0  # the perturbation flips items
    other = compare(res, baseline="b")
    assert all(c["reference"] == "b" and c["model"] == "a" for c in other)
    assert [c["difference"] for c in other] == pytest.approx([-c["difference"] for c in comps], abs=1e-12)
    assert "right_to_wrong_items" not in other[0]
    with pytest.raises(InputError, match="baseline 'z' is not one of the evaluated models"):
        compare(res, baseline="z")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=1, max_size=40),
       st.integers(0, 2**31 - 1))
def test_interval_always_contains_the_difference(pairs, seed):
    from deltaport.stats import paired_bootstrap

    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ci = paired_bootstrap(a, b, n_boot=200, seed=seed)
    assert ci["lo"] <= ci["difference"] <= ci["hi"]
    assert ci["difference"] == pytest.approx(float(np.mean(b) - np.mean(a)), abs=1e-12)
    assert -1.0 <= ci["lo"] and ci["hi"] <= 1.0 and ci["n_items"] == len(pairs)


def test_cli_comparison_table_json_and_plot(saved, tmp_path, capsys):
    from deltaport.cli.main import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    capsys.readouterr()
    assert main(["eval", saved["a"], saved["b"], "--tasks", QA, "--limit", "12", "--device", "cpu", "--no-cache",
                 "--baseline", saved["b"], "-o", str(out), "--plot", str(png), "-q"]) == 0
    res = json.loads(out.read_text())
    comps = res["comparisons"]
    assert [(c["task"], c["metric"], c["model"], c["reference"]) for c in comps] == [
        ("tiny_qa", "acc", saved["a"], saved["b"]), ("tiny_qa", "acc_norm", saved["a"], saved["b"])]
    assert {"task", "metric", "model", "reference", "difference", "ci_low", "ci_high", "n_items"} <= set(comps[0])
    assert "right_to_wrong_items" not in comps[0]  # listed only with --log-samples
    printed = capsys.readouterr().out
    c = comps[0]
    assert (f"| tiny_qa | acc | {saved['a']} | {c['score'] * 100:.1f} | {c['reference_score'] * 100:.1f} | "
            f"{c['difference'] * 100:+.1f} [{c['ci_low'] * 100:+.1f}, {c['ci_high'] * 100:+.1f}] | 12 |") in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    h, w = imread(str(png)).shape[:2]
    assert w > 600 and h > 200


def test_lm_eval_flags_reach_lm_eval(models, tmp_path):
    """--gen-kwargs and --system-instruction change what lm-eval generates and prompts (and the cache
    key); --include-path names a folder's tasks, run like the YAML path; fewshot_as_multiturn follows
    lm-eval's rule."""
    one = {"a": models["a"]}
    cache = tmp_path / "cache"
    plain = evaluate(one, [GEN], limit=4, log_samples=True, cache_dir=cache)
    short = evaluate(one, [GEN], limit=4, log_samples=True, cache_dir=cache, gen_kwargs="max_gen_toks=1")
    assert short["details"]["a"]["tiny_gen"]["cached"] is False
    for p, s in zip(plain["samples"]["a"]["tiny_gen"], short["samples"]["a"]["tiny_gen"]):
        assert len(s["response"].split()) <= 1 and p["response"].startswith(s["response"])
    assert any(len(p["response"].split()) > 1 for p in plain["samples"]["a"]["tiny_gen"])
    told = evaluate(one, [GEN], limit=2, log_samples=True, system_instruction="Answer with one colour.")
    assert all(r["prompt"].startswith("Answer with one colour.") for r in told["samples"]["a"]["tiny_gen"])
    by_name = evaluate(one, ["tiny_qa"], include_path=str(DATA), limit=4)
    assert by_name["results"]["a"] == evaluate(one, [QA], limit=4)["results"]["a"]
    chat = evaluate(one, [QA], limit=2, protocol="chat", num_fewshot=1, log_samples=True)
    single = evaluate(one, [QA], limit=2, protocol="chat", num_fewshot=1, log_samples=True, fewshot_as_multiturn=False)
    p_multi, p_single = chat["samples"]["a"]["tiny_qa"][0]["prompt"], single["samples"]["a"]["tiny_qa"][0]["prompt"]
    assert p_multi.count("<|user|>") == 2 and p_single.count("<|user|>") == 1


def test_bad_input_is_refused_before_a_model_is_loaded(saved, tmp_path, monkeypatch, capsys):
    from lm_eval.models import huggingface

    from deltaport.cli.main import main

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(huggingface.HFLM, "__init__", refuse)
    base = ["eval", saved["a"], "--device", "cpu", "--no-cache", "-o", str(tmp_path / "r.json")]
    cases = [
        (["--tasks", "tiny_qa", "--include-path", str(tmp_path / "nope")], "include path .*nope not found"),
        (["--tasks", QA, "--gen-kwargs", "temperature"], r"--gen-kwargs 'temperature' is malformed.*k=v pairs"),
        (["--tasks", QA, "--gen-kwargs", "{temperature: 0}"], r"malformed.*JSON"),
        (["--tasks", QA, "--fewshot-as-multiturn"], "needs the chat protocol"),
        (["--tasks", QA, "--no-prompts"], "with log_samples"),
        (["--tasks", "tiny_qa", "--include-path", str(DATA / "tiny_qa.yaml")], "is a file, not a folder"),
        (["--tasks", "tiny_qq", "--include-path", str(DATA)], r"unknown lm-eval task 'tiny_qq'"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err
        import re

        assert re.search(message, " ".join(err.split())), (extra, err)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.lm_eval").exists()
    with pytest.raises(InputError, match="max_gen_toks=64"):
        evaluate([saved["a"]], [GEN], gen_kwargs="=3")


def test_different_tokenizers_on_generation_tasks_warn(models, caplog):
    m = models["a"][0]
    other_tok = make_tokenizer(extra_words=list(reversed(list(FACTS))))  # same words, other ids
    pair = {"a": models["a"], "c": (m, other_tok)}
    with caplog.at_level("WARNING", logger="deltaport.evaluation.run"):
        res = evaluate(pair, [QA, GEN], limit=2)
    assert len(res["warnings"]) == 1 and "tiny_gen is a generation task" in res["warnings"][0]
    assert res["warnings"][0] in caplog.text
    assert evaluate(pair, [QA], limit=2)["warnings"] == []
    assert evaluate({"a": models["a"], "b": models["b"]}, [GEN], limit=2)["warnings"] == []


def test_docs_comparison_comes_from_the_committed_result_file():
    """docs/eval.md's comparison block is what benchmarks/eval_comparison.py renders from
    docs/results/eval/comparison.json, whose intervals contain their differences."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("eval_comparison", root / "benchmarks" / "eval_comparison.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from deltaport.lab.readme import replace_blocks

    doc = (root / "docs" / "eval.md").read_text()
    assert replace_blocks(doc, {"eval-comparison": mod.render_block()}) == doc, (
        "docs/eval.md's comparison disagrees with docs/results/eval/comparison.json: run "
        "`python benchmarks/eval_comparison.py render`")
    res = json.loads((root / "docs" / "results" / "eval" / "comparison.json").read_text())
    assert res["comparisons"] and all(c["ci_low"] <= c["difference"] <= c["ci_high"] for c in res["comparisons"])
    assert (root / "docs" / "results" / "eval" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
