"""Vocabulary policies, cross-architecture skip, key maps, filters, scale maps, LoRA, pickle,
hub ids, and the config/tokenizer/chat-template choices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import deltaport
from deltaport import testing as T
from deltaport.errors import CheckpointError, PlanError
from deltaport.numerics import round_to
from conftest import CUT_CHUNKS, assert_bit_equal, load_sd, tree_hash

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LORA_CHUNKS = [None, *CUT_CHUNKS]


def _hand(c, a, b, scale=1.0):
    return round_to(c.double() + (a.double() - b.double()) * scale, c.dtype)


# ---------------------------------------------------------------- vocabulary growth: pad
@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Source fine-tune with 8 added tokens (resized embeddings), target with the original vocab."""
    root = tmp_path_factory.mktemp("grown")
    base = T.make_model("llama", seed=0, dtype=torch.float32)
    ft = T.perturbed(base, seed=1, scale=1e-3)
    ft.resize_token_embeddings(72)
    with torch.no_grad():
        ft.model.embed_tokens.weight[64:] = torch.randn(8, 32)
        ft.lm_head.weight[64:] = torch.randn(8, 32)
    tgt = T.perturbed(base, seed=2, scale=5e-3)
    new_words = [f"new{i}" for i in range(8)]
    p = {"source_base": T.save(base, root / "sb"),
         "source_finetuned": T.save(ft, root / "sf", tokenizer=T.make_tokenizer(extra_words=new_words)),
         "target_base": T.save(tgt, root / "tb")}
    return p


def test_vocab_mismatch_default_error_names_shapes_and_policies(grown, tmp_path):
    with pytest.raises(PlanError) as ei:
        deltaport.transfer(grown["source_base"], grown["source_finetuned"], grown["target_base"], tmp_path / "o")
    msg = str(ei.value)
    assert "[64, 32]" in msg and "[72, 32]" in msg and "--vocab-policy pad" in msg and "--vocab-policy align" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("engine_chunk")
def test_vocab_pad_matches_official_behaviour(grown, tmp_path):
    from transformers import AutoModelForCausalLM

    deltaport.transfer(grown["source_base"], grown["source_finetuned"], grown["target_base"], tmp_path / "o",
                       vocab_policy="pad", tokenizer_from="source-finetuned")
    out = load_sd(tmp_path / "o")
    a, b, c = (load_sd(grown[k]) for k in ("source_finetuned", "source_base", "target_base"))
    for k in (EMB, HEAD):
        assert out[k].shape == (72, 32)
        assert torch.equal(out[k][:64], _hand(c[k], a[k][:64], b[k]))
        assert torch.equal(out[k][64:], a[k][64:])  # new tokens get the fine-tuned rows
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 72
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert m.get_input_embeddings().weight.shape[0] == 72


# ---------------------------------------------------------------- vocabulary: align by token string
@pytest.mark.usefixtures("engine_chunk")
def test_vocab_align_maps_rows_by_token_string(tmp_path):
    src_words = [f"w{i}" for i in range(10)]
    tgt_words = ["z0", "z1"] + [f"w{i}" for i in range(9, 4, -1)]  # w9..w5 at new ids, z* target-only
    src_tok, tgt_tok = T.make_tokenizer(extra_words=src_words), T.make_tokenizer(extra_words=tgt_words)
    base = T.make_model("llama", seed=0, dtype=torch.float32)
    ft = T.perturbed(base, seed=1, scale=1e-2)
    tgt = T.make_model("llama", seed=3, dtype=torch.float32, vocab_size=80)
    p = {"sb": T.save(base, tmp_path / "sb", tokenizer=src_tok), "sf": T.save(ft, tmp_path / "sf", tokenizer=src_tok),
         "tb": T.save(tgt, tmp_path / "tb", tokenizer=tgt_tok)}
    r = deltaport.transfer(p["sb"], p["sf"], p["tb"], tmp_path / "o", vocab_policy="align")
    out, a, b, c = (load_sd(x) for x in (tmp_path / "o", p["sf"], p["sb"], p["tb"]))
    sv, tv = src_tok.get_vocab(), tgt_tok.get_vocab()
    for k in (EMB, HEAD):
        assert out[k].shape == c[k].shape == (80, 32)
        for j in range(80):
            tokstr = next((s for s, i in tv.items() if i == j), None)
            if tokstr is not None and tokstr in sv:
                i = sv[tokstr]
                assert torch.equal(out[k][j], _hand(c[k][j], a[k][i], b[k][i])), (k, tokstr)
            else:  # target-only token or padding row: no Δ
                assert torch.equal(out[k][j], c[k][j]), (k, j)
    assert any("vocab align" in n for op in r.plan.ops for n in op.notes)


# ---------------------------------------------------------------- cross-architecture: skip
@pytest.mark.usefixtures("engine_chunk")
def test_shape_policy_skip_transfers_only_matching_tensors(family, tmp_path):
    p = family("llama", torch.float32)
    wide = T.make_model("llama", seed=5, dtype=torch.float32, intermediate_size=64)
    tb = T.save(wide, tmp_path / "wide")
    with pytest.raises(PlanError) as ei:
        deltaport.transfer(p["source_base"], p["source_finetuned"], tb, tmp_path / "o")
    assert "mlp.gate_proj.weight" in str(ei.value) and "--shape-policy skip" in str(ei.value)
    r = deltaport.transfer(p["source_base"], p["source_finetuned"], tb, tmp_path / "o", shape_policy="skip")
    out, a, b, c = (load_sd(x) for x in (tmp_path / "o", p["source_finetuned"], p["source_base"], tb))
    skipped = {s["name"] for s in r.plan.skipped}
    assert skipped == {k for k in c if "mlp" in k}
    for k in c:
        want = c[k] if k in skipped else _hand(c[k], a[k], b[k])
        assert torch.equal(out[k], want), k
    prov = json.loads((tmp_path / "o" / "deltaport.json").read_text())
    assert {s["name"] for s in prov["skipped"]} == skipped
    n, m = len(c) - len(skipped), len(c)
    assert 0 < n < m
    assert r.plan.summary()["coverage"] == prov["summary"]["coverage"] == f"{n} of {m} tensors received Δ"
    assert prov["summary"]["received_delta"] == n and prov["summary"]["tensors"] == m


def test_shape_policy_skip_cli_summary_states_coverage_in_words(family, tmp_path):
    from hostile_cases import in_process_runner

    p = family("llama", torch.float32)
    tb = T.save(T.make_model("llama", seed=5, dtype=torch.float32, intermediate_size=64), tmp_path / "wide")
    rc, _, err = in_process_runner(["transfer", "--source-base", str(p["source_base"]), "--source-finetuned",
                                    str(p["source_finetuned"]), "--target-base", str(tb), "-o", str(tmp_path / "o"),
                                    "--shape-policy", "skip", "-q"])
    assert rc == 0, err
    first = err.splitlines()[0]
    n_mlp = sum("mlp" in k for k in load_sd(tb))
    m = len(load_sd(tb))
    assert f"{m - n_mlp} of {m} tensors received Δ, {n_mlp} copied unchanged," in first, first
    assert not any(ch in first for ch in "{}[]'"), first  # words and numbers, not Python reprs


def test_shape_policy_skip_that_matches_nothing_is_an_input_error(family, tmp_path):
    """Following the shape error's advice on unrelated models used to write a plain copy of the target
    and exit 0."""
    from hostile_cases import in_process_runner

    p = family("llama", torch.float32)
    other = T.make_model("llama", seed=5, dtype=torch.float32, hidden_size=48, intermediate_size=64)
    tb = T.save(other, tmp_path / "other")
    n = len(load_sd(tb))
    with pytest.raises(PlanError) as ei:
        deltaport.transfer(p["source_base"], p["source_finetuned"], tb, tmp_path / "o", shape_policy="skip")
    assert f"no tensor would receive Δ: 0 of {n} target tensors matched" in str(ei.value)
    assert "--shape-policy skip left out every tensor" in str(ei.value)
    rc, _, err = in_process_runner(["transfer", "--source-base", str(p["source_base"]), "--source-finetuned",
                                    str(p["source_finetuned"]), "--target-base", str(tb), "-o", str(tmp_path / "o"),
                                    "--shape-policy", "skip", "-q"])
    assert rc == 2 and f"0 of {n} target tensors matched" in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.*"))
    # --include that selects nothing, and apply --shape-policy skip onto an unrelated model, likewise
    with pytest.raises(PlanError, match="check --include/--exclude"):
        deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "o", include=["nomatch"])
    deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "delta")
    with pytest.raises(PlanError, match=f"0 of {n} target tensors matched the delta"):
        deltaport.apply(tmp_path / "delta", tb, tmp_path / "o", shape_policy="skip", force=True)


@pytest.mark.usefixtures("engine_chunk")
def test_key_map_for_renamed_modules(family, tmp_path):
    from safetensors.torch import save_file

    p = family("llama", torch.float32)
    tgt = load_sd(p["target_base"])
    renamed = {k.replace(".self_attn.", ".attention."): v for k, v in tgt.items()}
    d = tmp_path / "renamed"
    d.mkdir()
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(p["target_base"] / "config.json", d / "config.json")
    with pytest.raises(PlanError):
        deltaport.transfer(p["source_base"], p["source_finetuned"], d, tmp_path / "o")
    km = tmp_path / "map.yaml"
    km.write_text('"\\\\.attention\\\\.": ".self_attn."\n')
    deltaport.transfer(p["source_base"], p["source_finetuned"], d, tmp_path / "o", key_map=km)
    out, a, b = load_sd(tmp_path / "o"), load_sd(p["source_finetuned"]), load_sd(p["source_base"])
    for k, v in renamed.items():
        src = k.replace(".attention.", ".self_attn.")
        assert torch.equal(out[k], _hand(v, a[src], b[src])), k


@pytest.mark.usefixtures("engine_chunk")
def test_include_exclude_and_scale_map(family, tmp_path):
    p = family("qwen2", torch.bfloat16)
    sm = tmp_path / "scales.yaml"
    sm.write_text("mlp: 0.5\nself_attn\\.q_proj: 2.0\n")
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "o",
                       exclude=[r"embed_tokens|lm_head"], scale_map=sm)
    out, a, b, c = (load_sd(x) for x in (tmp_path / "o", p["source_finetuned"], p["source_base"], p["target_base"]))
    for k in c:
        if "embed_tokens" in k or "lm_head" in k:
            want = c[k]
        elif "mlp" in k:
            want = _hand(c[k], a[k], b[k], 0.5)
        elif "q_proj" in k:
            want = _hand(c[k], a[k], b[k], 2.0)
        else:
            want = _hand(c[k], a[k], b[k])
        assert torch.equal(out[k], want), k
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "inc", include=[r"norm"])
    out = load_sd(tmp_path / "inc")
    for k in c:
        assert torch.equal(out[k], _hand(c[k], a[k], b[k]) if "norm" in k else c[k]), k


# ---------------------------------------------------------------- LoRA adapter as the finetuned side
@pytest.mark.parametrize("engine_chunk", LORA_CHUNKS, indirect=True, ids=lambda c: "chunk-default" if c is None else f"chunk-{c}")
def test_lora_adapter_delta_is_scaled_BA(family, tmp_path, engine_chunk):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = family("llama", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(p["source_base"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    deltaport.transfer(p["source_base"], tmp_path / "adapter", p["target_base"], tmp_path / "o")
    out, c = load_sd(tmp_path / "o"), load_sd(p["target_base"])
    ad = load_sd(tmp_path / "adapter")
    for k in c:
        if "q_proj" in k or "v_proj" in k:
            mod = "base_model.model." + k[: -len(".weight")]
            A, B = ad[mod + ".lora_A.weight"].double(), ad[mod + ".lora_B.weight"].double()
            assert torch.equal(out[k], (c[k].double() + 2.0 * (B @ A)).float()), k
        else:
            assert torch.equal(out[k], c[k]), k
    # onto its own base it equals peft's merge (peft merges in float32: close, not bitwise)
    deltaport.transfer(p["source_base"], tmp_path / "adapter", p["source_base"], tmp_path / "self")
    merged = pm.merge_and_unload().state_dict()
    got = load_sd(tmp_path / "self")
    for k in got:
        torch.testing.assert_close(got[k], merged[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- pickle and mixed layouts
def _as_pickle(src, dst, *, keep_safetensors=False):
    shutil.copytree(src, dst)
    sd = load_sd(src)
    torch.save(sd, dst / "pytorch_model.bin")
    if not keep_safetensors:
        for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
            f.unlink()


def test_pickle_refused_unless_allowed(family, tmp_path):
    p = family("llama", torch.bfloat16)
    _as_pickle(p["source_finetuned"], tmp_path / "ftbin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        deltaport.transfer(p["source_base"], tmp_path / "ftbin", p["target_base"], tmp_path / "o")
    deltaport.transfer(p["source_base"], tmp_path / "ftbin", p["target_base"], tmp_path / "o", allow_pickle=True)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "ref")
    assert_bit_equal(load_sd(tmp_path / "o"), load_sd(tmp_path / "ref"))


def test_dir_with_bin_and_safetensors_uses_safetensors(family, tmp_path):
    p = family("llama", torch.bfloat16)
    _as_pickle(p["source_finetuned"], tmp_path / "both", keep_safetensors=True)
    bogus = {k: torch.zeros_like(v) for k, v in load_sd(p["source_finetuned"]).items()}
    torch.save(bogus, tmp_path / "both" / "pytorch_model.bin")  # would give a different result if used
    deltaport.transfer(p["source_base"], tmp_path / "both", p["source_base"], tmp_path / "o")
    assert_bit_equal(load_sd(tmp_path / "o"), load_sd(p["source_finetuned"]))


# ---------------------------------------------------------------- hub ids from the local cache
def test_hub_id_resolves_from_offline_cache(family, tmp_path):
    p = family("llama", torch.bfloat16)
    cache = tmp_path / "hub"
    rev = "a" * 40
    for name, role in (("tiny-base", "source_base"), ("tiny-ft", "source_finetuned")):
        repo = cache / f"models--org--{name}"
        shutil.copytree(p[role], repo / "snapshots" / rev)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "deltaport.cli.main", "transfer", "--source-base", "org/tiny-base",
                        "--source-finetuned", "org/tiny-ft", "--target-base", str(p["source_base"]), "-o", str(out), "-q"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_bit_equal(load_sd(out), load_sd(p["source_finetuned"]))
    prov = json.loads((out / "deltaport.json").read_text())
    assert prov["inputs"]["source_base"]["source"] == "org/tiny-base"
    assert prov["inputs"]["source_base"]["revision"] == rev
    r = subprocess.run([sys.executable, "-m", "deltaport.cli.main", "inspect", "org/not-cached"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr


# ---------------------------------------------------------------- config / tokenizer / chat template
def test_config_tokenizer_and_chat_template_sources(tmp_path):
    from transformers import AutoTokenizer

    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    ft = T.perturbed(base, seed=1, scale=1e-3)
    tgt = T.perturbed(base, seed=2, scale=1e-3)
    tgt.config.rope_theta = 500000.0
    tgt.config.max_position_embeddings = 256
    ft.config.eos_token_id = 6  # <|end|>: the instruct model stops at end of turn
    ft.generation_config.eos_token_id = 6
    sb = T.save(base, tmp_path / "sb", tokenizer=T.make_tokenizer(chat_template=None))
    sf = T.save(ft, tmp_path / "sf")
    tb = T.save(tgt, tmp_path / "tb", tokenizer=T.make_tokenizer(chat_template=None))
    before = tree_hash(tb)
    deltaport.transfer(sb, sf, tb, tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    assert rope == 500000.0 and cfg["max_position_embeddings"] == 256  # target's architecture settings
    assert cfg["eos_token_id"] == 6  # follows the chat template's source
    assert json.loads((tmp_path / "o" / "generation_config.json").read_text())["eos_token_id"] == 6
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok.chat_template == T.CHAT_TEMPLATE
    deltaport.transfer(sb, sf, tb, tmp_path / "o2", config_from="source-finetuned", chat_template_from="target")
    cfg2 = json.loads((tmp_path / "o2" / "config.json").read_text())
    rope2 = cfg2.get("rope_theta") or (cfg2.get("rope_parameters") or {}).get("rope_theta")
    assert rope2 != 500000.0 and cfg2["max_position_embeddings"] == 128
    assert AutoTokenizer.from_pretrained(tmp_path / "o2").chat_template is None
    assert tree_hash(tb) == before
    check1 = json.loads((tmp_path / "o" / "deltaport.json").read_text())["files"]["config_check"]
    check2 = json.loads((tmp_path / "o2" / "deltaport.json").read_text())["files"]["config_check"]
    assert check1["checked"] is False and "target" in check1["reason"]  # the target's own config and shapes
    assert check2["checked"] is True and check2["warnings"] == []


def test_config_that_does_not_fit_the_tensors_is_refused(family, tmp_path):
    """A config.json whose shapes disagree with the output tensors is caught before publishing."""
    p = family("llama")
    sf = tmp_path / "sf"
    shutil.copytree(p["source_finetuned"], sf)
    cfg = json.loads((sf / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (sf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError) as ei:
        deltaport.transfer(p["source_base"], sf, p["target_base"], tmp_path / "o", config_from="source-finetuned")
    assert "does not fit the output tensors" in str(ei.value) and "mlp" in str(ei.value)
    assert "--config-from target" in str(ei.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.*"))


def test_dry_run_reads_headers_only_and_writes_nothing(family, tmp_path, monkeypatch):
    from deltaport.io import reader

    p = family("llama", torch.bfloat16)

    def boom(*a, **k):
        raise AssertionError("tensor bytes read during a dry run")

    monkeypatch.setattr(reader, "pread_into", boom)
    r = deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "o", dry_run=True)
    assert r.output is None and not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
    assert "delta" in r.plan.describe()


@pytest.mark.parametrize("engine_chunk", LORA_CHUNKS, indirect=True, ids=lambda c: "chunk-default" if c is None else f"chunk-{c}")
def test_lora_adapter_names_its_own_base(family, tmp_path, engine_chunk):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = family("llama", torch.float32)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(p["source_base"]),
                        LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(p["source_base"])
    deltaport.transfer(None, tmp_path / "adapter", p["target_base"], tmp_path / "a")
    deltaport.transfer(p["source_base"], tmp_path / "adapter", p["target_base"], tmp_path / "b")
    assert tree_hash(tmp_path / "a") != {} and load_sd(tmp_path / "a").keys() == load_sd(tmp_path / "b").keys()
    assert_bit_equal(load_sd(tmp_path / "a"), load_sd(tmp_path / "b"))
    with pytest.raises(deltaport.InputError, match="--source-base is required"):
        deltaport.transfer(None, p["source_finetuned"], p["target_base"], tmp_path / "c")


def test_target_whose_config_contradicts_its_vocabulary_is_refused(family, tmp_path):
    """The config check is skipped when it would compare the target with itself, but not when the
    target's own config.json disagrees with its embedding rows."""
    p = family("llama")
    tb = tmp_path / "tb"
    shutil.copytree(p["target_base"], tb)
    cfg = json.loads((tb / "config.json").read_text())
    cfg["vocab_size"] += 5
    (tb / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="does not fit the output tensors"):
        deltaport.transfer(p["source_base"], p["source_finetuned"], tb, tmp_path / "o")
    assert not (tmp_path / "o").exists()
