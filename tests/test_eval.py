"""deltaport.evaluate (deltaport.evaluation): lm-eval on tiny in-memory and on-disk models over local task YAML files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deltaport.errors import InputError
from deltaport.evaluation import comparison_table, evaluate, resolve_tasks
from deltaport.testing import make_model, make_tokenizer, perturbed, save

DATA = Path(__file__).parent / "data" / "tiny_qa"
QA = str(DATA / "tiny_qa.yaml")
GEN = str(DATA / "tiny_gen.yaml")
FACTS = json.loads((DATA / "facts.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(extra_words=list(FACTS))


@pytest.fixture(scope="module")
def rand_model():
    return make_model("llama", seed=0)


@pytest.fixture(scope="module")
def trained_model(tok):
    """The random model trained (plain AdamW, full-text loss) on the task's facts: it must score higher."""
    torch.manual_seed(0)
    m = make_model("llama", seed=0).train()
    texts = [f"Q : what color is the flag of {c} ? A : {a}" for c, a in FACTS.items()]
    enc = tok(texts, return_tensors="pt", add_special_tokens=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(120):
        loss = m(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


def test_schema_and_determinism(rand_model, tok):
    r1 = evaluate({"rand": (rand_model, tok)}, [QA, GEN], device="cpu")
    r2 = evaluate({"rand": (rand_model, tok)}, [QA, GEN], device="cpu")
    assert r1["results"] == r2["results"]
    res = r1["results"]["rand"]
    assert set(res) == {"tiny_qa", "tiny_gen"}
    assert set(res["tiny_qa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(res["tiny_gen"]) == {"exact_match,first_word", "exact_match,first_word_stderr"}
    for v in res["tiny_qa"].values():
        assert 0.0 <= v <= 1.0
    d = r1["details"]["rand"]["tiny_qa"]
    assert d["n_samples"]["tiny_qa"]["effective"] == len(FACTS) and d["protocol"] == "base"
    assert d["cached"] is False and d["apply_chat_template"] is False
    assert r1["settings"]["device"] == "cpu" and r1["columns"]["tiny_qa"]["source"] == str(DATA / "tiny_qa.yaml")
    import lm_eval.evaluator
    from lm_eval.loggers.utils import add_env_info

    assert lm_eval.evaluator.add_env_info is add_env_info  # the cheap stand-in is scoped to our calls


def test_trained_model_scores_higher(rand_model, trained_model, tok):
    r = evaluate({"rand": (rand_model, tok), "trained": (trained_model, tok)}, [QA, GEN])
    rand, trained = r["results"]["rand"], r["results"]["trained"]
    assert trained["tiny_qa"]["acc"] >= rand["tiny_qa"]["acc"] + 0.3
    assert trained["tiny_gen"]["exact_match,first_word"] >= rand["tiny_gen"]["exact_match,first_word"] + 0.3


def test_progress_draws_lm_eval_bars_only_when_asked(rand_model, tok, capsys):
    """progress=False (the library's default): lm-eval draws no tqdm bar; progress=True: it does (what
    `deltaport eval` asks for on a terminal)."""
    import tqdm

    real_init = tqdm.tqdm.__init__
    capsys.readouterr()
    quiet = evaluate({"m": (rand_model, tok)}, [QA], limit=2)
    assert "%|" not in capsys.readouterr().err
    shown = evaluate({"m": (rand_model, tok)}, [QA], limit=2, progress=True)
    assert "%|" in capsys.readouterr().err
    assert quiet["results"] == shown["results"] and tqdm.tqdm.__init__ is real_init  # bars off only during the call


def test_disk_model_equals_in_memory_and_limit(rand_model, tok, tmp_path):
    d = save(rand_model, tmp_path / "m", tokenizer=tok)
    r = evaluate({"mem": (rand_model, tok), "disk": str(d)}, [QA], limit=5)
    assert r["results"]["mem"] == r["results"]["disk"]
    assert r["details"]["disk"]["tiny_qa"]["n_samples"]["tiny_qa"]["effective"] == 5


def test_local_task_works_from_any_cwd_and_reports_missing_data(rand_model, tok, tmp_path, monkeypatch):
    task_dir = tmp_path / "tasks"
    shutil.copytree(DATA, task_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = evaluate({"m": (rand_model, tok)}, [str(task_dir / "tiny_qa.yaml")])
    assert r["results"]["m"]["tiny_qa"] == evaluate({"m": (rand_model, tok)}, [QA])["results"]["m"]["tiny_qa"]
    (task_dir / "tiny_qa.jsonl").unlink()
    with pytest.raises(InputError, match=r"tiny_qa\.jsonl.*not found.*relative to the YAML"):
        evaluate({"m": (rand_model, tok)}, [str(task_dir / "tiny_qa.yaml")])


def test_cache_reuses_only_unchanged(rand_model, tok, tmp_path, monkeypatch):
    import lm_eval

    calls = []
    real = lm_eval.simple_evaluate

    def counting(*a, **k):
        calls.append(k["tasks"])
        return real(*a, **k)


    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    d = save(rand_model, tmp_path / "m", tokenizer=tok)
    cache = tmp_path / "cache"
    r1 = evaluate([str(d)], [QA], cache_dir=cache)
    assert len(calls) == 1
    r2 = evaluate([str(d)], [QA], cache_dir=cache)
    assert len(calls) == 1 and r2["details"][str(d)]["tiny_qa"]["cached"] is True
    assert r2["results"] == r1["results"]
    evaluate([str(d)], [QA], cache_dir=cache, limit=4)  # a setting changed -> evaluated again
    assert len(calls) == 2
    d2 = save(perturbed(rand_model, seed=5), tmp_path / "m2", tokenizer=tok)
    evaluate({"m2": str(d2), "m": str(d)}, [QA], cache_dir=cache)  # only the new weights run
    assert len(calls) == 3
    mem = evaluate({"x": (rand_model, tok)}, [QA], cache_dir=cache)  # same content in memory
    assert len(calls) == 4 and mem["results"]["x"] == r1["results"][str(d)]
    evaluate({"y": (rand_model, tok)}, [QA], cache_dir=cache)
    assert len(calls) == 4


def test_fingerprint_covers_every_tokenizer_file(rand_model, tok, tmp_path):
    """A BPE tokenizer's vocab.json / merges.txt (no tokenizer.json needed) are part of a directory's
    identity: changing them must not hit a result cached for the old tokenizer."""
    from deltaport.assets import CHAT_FILES, TOKENIZER_FILES
    from deltaport.evaluation.cache import dir_fingerprint

    d = save(rand_model, tmp_path / "m", tokenizer=tok)
    seen = {dir_fingerprint(d, None)}
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES, *CHAT_FILES):
        p = d / name
        p.write_bytes((p.read_bytes() if p.is_file() else b"") + b"\n")
        fp = dir_fingerprint(d, None)
        assert fp not in seen, name
        seen.add(fp)


def test_protocols(rand_model, tok):
    r = evaluate({"m": (rand_model, tok)}, [QA], protocol="both")
    assert set(r["results"]) == {"m [base]", "m [chat]"}
    assert r["details"]["m [chat]"]["tiny_qa"]["apply_chat_template"] is True
    assert evaluate({"m": (rand_model, tok)}, [QA], protocol="auto")["details"]["m"]["tiny_qa"]["protocol"] == "chat"
    plain = make_tokenizer(extra_words=list(FACTS), chat_template=None)
    with pytest.raises(InputError, match="no chat template"):
        evaluate({"m": (rand_model, plain)}, [QA], protocol="chat")
    r = evaluate({"m": (rand_model, plain)}, [QA], protocol="both")
    assert r["results"]["m [base]"] and r["results"]["m [chat]"] == {}


def test_bad_inputs(rand_model, tok):
    with pytest.raises(InputError, match="unknown protocol"):
        evaluate({"m": (rand_model, tok)}, [QA], protocol="instruct")
    with pytest.raises(InputError, match="task file .*nope.yaml not found"):
        evaluate({"m": (rand_model, tok)}, ["nope.yaml"])
    with pytest.raises(InputError, match="no local directory"):
        evaluate(["/no/such/model"], [QA])
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            evaluate({"m": (rand_model, tok)}, [QA], device="cuda")
    with pytest.raises(InputError, match="vllm"):
        evaluate({"m": (rand_model, tok)}, [QA], backend="vllm", device="cpu")


def test_delta_dir_and_missing_config_are_refused_with_a_hint(rand_model, tok, tmp_path):
    import deltaport

    a = save(rand_model, tmp_path / "a", tokenizer=tok)
    b = save(perturbed(rand_model, seed=3), tmp_path / "b", tokenizer=tok)
    deltaport.diff(a, b, tmp_path / "delta")
    with pytest.raises(InputError, match="is a delta directory .*deltaport apply"):
        evaluate([str(tmp_path / "delta")], [QA])
    (b / "config.json").unlink()  # the same checks as finetune's (io.model_check.check_model_dir)
    with pytest.raises(InputError, match=r"no config\.json in .*model directory or hub id"):
        evaluate([str(b)], [QA])


def test_vllm_backend_arguments(tmp_path, rand_model, tok, monkeypatch):
    """vLLM cannot run here: check what deltaport hands to lm-eval's VLLM model (untested on a GPU)."""
    import importlib.util
    import sys
    import types

    from deltaport.evaluation.harness import build_lm
    from deltaport.evaluation.models import EvalModel, normalise_models, prepare_model

    got = {}
    fake = types.ModuleType("lm_eval.models.vllm_causallms")
    fake.VLLM = lambda **k: got.update(k) or "vllm-lm"
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real_find(n, *a))
    d = save(rand_model, tmp_path / "m", tokenizer=tok)
    m = normalise_models([str(d)])[0]
    prepare_model(m, None, need_fp=False)
    lm = build_lm(m, backend="vllm", device="cuda", batch_size="auto", seed=42,
                      model_args={"tensor_parallel_size": 2, "max_model_len": 8192})
    assert lm == "vllm-lm"
    assert got == {"pretrained": str(d), "dtype": "auto", "seed": 42, "gpu_memory_utilization": 0.9,
                   "batch_size": "auto", "tensor_parallel_size": 2, "max_model_len": 8192}
    with pytest.raises(InputError, match="loads models from disk"):
        build_lm(EvalModel("x", (rand_model, tok)), backend="vllm", device="cuda", batch_size=8, seed=0,
                 model_args={})


class _FakeTM:
    def __init__(self, names):
        self.all_tasks = list(names)


def test_unknown_task_name_suggests():
    from deltaport.evaluation.tasks import check_known_tasks

    specs = resolve_tasks(["gsm8k_cot_lama"])
    with pytest.raises(InputError, match="did you mean gsm8k_cot_llama"):
        check_known_tasks(specs, _FakeTM(["gsm8k_cot_llama", "arc_easy"]))


@pytest.mark.parametrize("preset,expected", [
    ("llama3-instruct", [("gsm8k_cot_llama", 8), ("minerva_math", 4), ("arc_challenge_llama", 0),
                         ("gpqa_main_cot_zeroshot", 0), ("mmlu_cot_llama", 0), ("ifeval", 0)]),
    ("olmo2-tulu3", [("gsm8k_cot", 8), ("minerva_math", 4), ("arc_challenge", 5), ("gpqa_main_cot_zeroshot", 0),
                     ("mmlu_cot_llama", 0), ("ifeval", 0), ("minerva_math500", 0), ("gpqa_diamond_cot_zeroshot", 0)]),
    ("global-mmlu", [("global_mmlu_full_mg", 0), ("global_mmlu_full_si", 0), ("global_mmlu_full_tr", 0),
                     ("global_mmlu_full_en", 0)]),
])
def test_presets_resolve_to_simple_evaluate_arguments(preset, expected, rand_model, tok, monkeypatch):
    """Presets cannot run offline; check the exact arguments each task reaches simple_evaluate with."""
    import lm_eval

    import deltaport.evaluation.run as ev

    seen = []

    def fake(**k):
        seen.append(k)
        return {"results": {t: {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1} for t in k["tasks"]},
                "n-samples": {}, "n-shot": {}, "versions": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    monkeypatch.setattr(ev, "task_manager_for", lambda specs: _FakeTM([s.spec for s in specs]))
    r = evaluate({"m": (rand_model, tok)}, None, preset=preset, protocol="both", seed=7)
    got = [(t, k["num_fewshot"]) for k in seen if not k["apply_chat_template"] for t in k["tasks"]]
    assert sorted(got) == sorted(expected)
    assert len([k for k in seen if not k["apply_chat_template"]]) == len({n for _, n in expected})  # 1 call per shots
    chat = [k for k in seen if k["apply_chat_template"]]
    assert all(k["fewshot_as_multiturn"] for k in chat) and len(chat) == len({n for _, n in expected})
    assert not any(k["fewshot_as_multiturn"] for k in seen if not k["apply_chat_template"])
    # per-item records are always asked for: the cache keeps them and the comparisons pair them
    assert all(k["device"] == "cpu" and k["fewshot_random_seed"] == 7 and k["log_samples"] is True for k in seen)
    assert list(r["results"]["m [chat]"]) == [t for t, _ in expected]
    if preset == "llama3-instruct":
        assert r["columns"]["ifeval"] == {"metric": "strict_loose_avg", "label": "IFEval", "source": None}
    with pytest.raises(InputError, match="unknown eval preset"):
        resolve_tasks(None, preset="llama4")


def test_global_mmlu_languages_and_ifeval_average():
    specs = resolve_tasks(None, preset="global-mmlu", languages=["de", "sw"])
    assert [s.spec for s in specs] == ["global_mmlu_full_de", "global_mmlu_full_sw"]
    with pytest.raises(InputError, match="no language"):
        resolve_tasks(None, preset="global-mmlu", languages=["xx"])
    from deltaport.evaluation.results import add_derived_metrics

    m = {"prompt_level_strict_acc": 0.5, "prompt_level_loose_acc": 0.6, "inst_level_strict_acc": 0.7,
         "inst_level_loose_acc": 0.8}
    add_derived_metrics(m, resolve_tasks(None, preset="llama3-instruct")[-1].derived)
    assert m["strict_loose_avg"] == pytest.approx(0.65)


def test_comparison_table_exact():
    res = {
        "results": {
            "base": {"a": {"acc": 0.25, "acc_stderr": 0.1}, "b": {"exact_match,flex": 0.5}},
            "base+Δ": {"a": {"acc": 0.5, "acc_stderr": 0.1}, "b": {"exact_match,flex": 0.75}},
            "half": {"a": {"acc": 0.5}},
        },
        "columns": {"a": {"metric": "acc", "label": "A"}, "b": {"metric": None, "label": "B"}},
        "details": {"base": {"a": {"n_samples": {"a": {"original": 40, "effective": 8}}}},
                    "base+Δ": {"a": {"n_samples": {"a": {"original": 40, "effective": 8}}}}},
    }
    assert comparison_table(res, baseline="base") == (
        "| Model | A | B | Avg |\n"
        "|---|---|---|---|\n"
        "| **base** (baseline) | 25.0 ± 10.0 (n=8) | 50.0 | 37.5 |\n"
        "| base+Δ | 50.0 ± 10.0 (n=8) [+25.0] | 75.0 [+25.0] | 62.5 [+25.0] |\n"
        "| half | 50.0 [+25.0] | – | – |\n"
        "\n"
        "Metrics — A: acc ×100, B: exact_match,flex ×100. Each score ± its standard error (lm-eval's), "
        "n = documents scored; [differences] are to base.\n"
    )
    with pytest.raises(InputError, match="baseline 'nope'"):
        comparison_table(res, baseline="nope")


def test_cli_eval(rand_model, tok, tmp_path, capsys):
    from deltaport.cli.main import main

    d = save(rand_model, tmp_path / "m", tokenizer=tok)
    capsys.readouterr()
    out, table = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["eval", str(d), "--tasks", f"{QA},{GEN}", "--limit", "4", "--device", "cpu", "-o", str(out),
               "--table", str(table), "--no-cache", "--baseline", str(d)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["results"][str(d)]) == {"tiny_qa", "tiny_gen"}
    assert table.read_text() == res["table"] and "(baseline)" in res["table"]
    assert "(n=4)" in res["table"]  # n beside each score
    err = capsys.readouterr().err
    # progress while it works, as status lines (stderr is not a terminal here: no tqdm bars)
    assert f"eval: {d} (base protocol): running tiny_qa, tiny_gen" in err and "done in" in err
    assert "it/s]" not in err and "%|" not in err
    assert main(["eval", str(d), "--tasks", str(tmp_path / "no_such_task.yaml"), "-o", str(tmp_path / "x.json"),
                 "--no-cache"]) == 2
    before = out.read_text()
    argv = ["eval", str(d), "--tasks", QA, "--limit", "2", "--device", "cpu", "-o", str(out), "--no-cache"]
    assert main(argv) == 2 and out.read_text() == before  # exists: refused before evaluating
    assert main([*argv, "--overwrite"]) == 0 and out.read_text() != before
    assert not (tmp_path / "x.json").exists()


def test_checkpoint_missing_a_parameter_is_refused_before_loading(tmp_path):
    """transformers would fill a missing parameter at random (and only warn); eval/finetune/evolve refuse."""
    from safetensors.torch import load_file, save_file

    from deltaport.errors import CheckpointError
    from deltaport.io.model_check import check_weights

    m = make_model("llama", seed=0)
    m.save_pretrained(tmp_path / "m")
    check_weights(tmp_path / "m")  # complete: fine
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*at random"):
        check_weights(tmp_path / "m")
    with pytest.raises(CheckpointError, match="missing"):
        evaluate([str(tmp_path / "m")], [QA], device="cpu", limit=2)
