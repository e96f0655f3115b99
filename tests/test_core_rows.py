"""Rows at real scale: vocabulary ``align`` with real tokenizers that added tokens, and LoRA adapters
whose rows do not fit the chunk. Every result is compared with a reference written here, row by row
or in float64, sharing no code with the engine."""

from __future__ import annotations

import json

import pytest
import torch

import deltaport
from deltaport import testing as T
from deltaport.engine import DEFAULT_CHUNK_ELEMS
from conftest import assert_bit_equal, bits, exact_transfer, load_sd

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHUNKS = [7, 4099, DEFAULT_CHUNK_ELEMS]


# ---------------------------------------------------------------- vocab align with added tokens
def _tok(extra_words=(), added=()):
    tok = T.make_tokenizer(extra_words=list(extra_words))
    if added:
        tok.add_tokens(list(added))
    return tok


def _resized(model, rows: int, seed: int):
    old = model.get_input_embeddings().weight.shape[0]
    if rows != old:
        model.resize_token_embeddings(rows)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight):
            if rows > old:
                w[old:] = (torch.randn(rows - old, w.shape[1], generator=g)).to(w.dtype)
    return model


@pytest.fixture(scope="module", params=[(31, 36), (48, 36), (40, 40)],
                ids=["base-rows-below-added-ids", "base-rows-above-added-ids", "equal-rows-different-vocabularies"])
def added(request, tmp_path_factory):
    """Base: the tiny vocabulary (31 tokens) with 31 rows, or padded to 48 or 40 rows (added ids land
    inside). Fine-tune: adds <think>, <tool>, <fin> (in that order). Target (a new release): its own extra
    word, then adds <tool>, <tgt>, <think> (a different order; two shared with the fine-tune). In the last
    case all three have 40 rows: equal shapes, different vocabularies."""
    base_rows, tgt_rows = request.param
    root = tmp_path_factory.mktemp(f"added{base_rows}")
    base_tok = _tok()
    ft_tok = _tok(added=["<think>", "<tool>", "<fin>"])
    tgt_tok = _tok(extra_words=["newword"], added=["<tool>", "<tgt>", "<think>"])
    assert len(base_tok) == 31 and len(ft_tok) == 34 and len(tgt_tok) == 35
    base = T.make_model("llama", seed=0, dtype=torch.float32, vocab_size=base_rows)
    ft = _resized(T.perturbed(base, seed=1, scale=1e-2), max(base_rows, 34), seed=11).to(torch.bfloat16)
    tgt = _resized(T.perturbed(base, seed=2, scale=5e-2), tgt_rows, seed=12).to(torch.bfloat16)
    base = base.to(torch.bfloat16)
    with torch.no_grad():  # -0.0 in rows that have no Δ: kept as they are, sign included
        tgt.model.embed_tokens.weight[31, :3] = -0.0  # "newword"
        tgt.lm_head.weight[33, :3] = -0.0  # "<tgt>"
        ft.model.embed_tokens.weight[31, :2] = -0.0  # "<think>" in the fine-tune
        ft.lm_head.weight[31, :2] = -0.0
    return {"sb": T.save(base, root / "sb", tokenizer=base_tok), "sf": T.save(ft, root / "sf", tokenizer=ft_tok),
            "tb": T.save(tgt, root / "tb", tokenizer=tgt_tok),
            "vocab": {k: t.get_vocab() for k, t in (("sb", base_tok), ("sf", ft_tok), ("tb", tgt_tok))}}


def _align_reference(added, scale: float, unmatched: str) -> dict[str, torch.Tensor]:
    """Row by row: a target token present in both source models gets its own Δ; any other row keeps the
    target's row, or (``finetuned``) takes the fine-tune's row when the fine-tune has the token."""
    a, b, c = (load_sd(added[k]) for k in ("sf", "sb", "tb"))
    va, vb, vc = (added["vocab"][k] for k in ("sf", "sb", "tb"))
    by_id = {i: s for s, i in vc.items()}
    want = {}
    for k in (EMB, HEAD):
        rows = []
        for j in range(c[k].shape[0]):
            s = by_id.get(j)
            ia = va.get(s) if s is not None and va.get(s, 1 << 30) < a[k].shape[0] else None
            ib = vb.get(s) if s is not None and vb.get(s, 1 << 30) < b[k].shape[0] else None
            if ia is not None and ib is not None:
                rows.append(exact_transfer(c[k][j], a[k][ia], b[k][ib], scale))
            elif unmatched == "finetuned" and ia is not None:
                rows.append(a[k][ia].clone())
            else:
                rows.append(c[k][j].clone())
        want[k] = torch.stack(rows)
    return want


def _save_adapter(base, out, *, r: int, alpha: int, modules: list[str]) -> None:
    """A PEFT LoRA adapter of ``base`` with non-zero A and B (bf16-representable values), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn_like(p) * 0.05).to(torch.bfloat16).float())
    pm.save_pretrained(out)


@pytest.mark.parametrize("chunk,scale", [(c, s) for c in CHUNKS for s in (1.0, 0.7)] + [(4099, -0.5)])
def test_align_uses_each_models_own_tokenizer(added, tmp_path, chunk, scale):
    r = deltaport.transfer(added["sb"], added["sf"], added["tb"], tmp_path / "o", vocab_policy="align", scale=scale,
                           chunk_elems=chunk)
    out, c = load_sd(tmp_path / "o"), load_sd(added["tb"])
    want = _align_reference(added, scale, "target")
    for k in (EMB, HEAD):
        assert out[k].shape == c[k].shape
        diff = (bits(out[k]) != bits(want[k])).any(dim=1).nonzero().flatten().tolist()
        assert diff == [], f"{k}: rows {diff} differ from the row-by-row reference"
    # the rest of the model is a plain transfer
    a, b = load_sd(added["sf"]), load_sd(added["sb"])
    for k in c:
        if k not in (EMB, HEAD):
            assert torch.equal(bits(out[k]), bits(exact_transfer(c[k], a[k], b[k], scale))), k
    # provenance names the target tokens that have no base row (no Δ is defined for them)
    prov = json.loads((tmp_path / "o" / "deltaport.json").read_text())
    rec = prov["vocab_align"]
    assert rec["unmatched_rows"] == "target"
    nb = rec["tokens_without_base_row"]
    assert nb["count"] == 4
    assert [t["token"] for t in nb["first"]] == ["newword", "<tool>", "<tgt>", "<think>"]
    assert [t["target_id"] for t in nb["first"]] == [31, 32, 33, 34]
    assert prov["policies"]["unmatched_rows"] == "target"
    assert r.provenance["vocab_align"] == rec


@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_align_unmatched_rows_finetuned_copies_the_finetuned_row(added, tmp_path, scale):
    deltaport.transfer(added["sb"], added["sf"], added["tb"], tmp_path / "o", vocab_policy="align",
                       unmatched_rows="finetuned", chunk_elems=7, scale=scale)
    out = load_sd(tmp_path / "o")
    want = _align_reference(added, scale, "finetuned")
    for k in (EMB, HEAD):
        assert torch.equal(bits(out[k]), bits(want[k])), k
    a, vc, va = load_sd(added["sf"]), added["vocab"]["tb"], added["vocab"]["sf"]
    for s in ("<think>", "<tool>"):  # shared added tokens: the fine-tune's trained rows, as they are
        assert torch.equal(bits(out[EMB][vc[s]]), bits(a[EMB][va[s]]))
    c = load_sd(added["tb"])
    for s in ("newword", "<tgt>"):  # the fine-tune does not have these: the target's rows
        assert torch.equal(bits(out[EMB][vc[s]]), bits(c[EMB][vc[s]]))
    prov = json.loads((tmp_path / "o" / "deltaport.json").read_text())
    assert prov["vocab_align"]["unmatched_rows"] == "finetuned"
    # the model card's command reproduces the output: it names every option that shaped it
    assert "--vocab-policy align --unmatched-rows finetuned" in (tmp_path / "o" / "README.md").read_text()


def _align_by_finetuned_tokenizer(added, scale: float) -> dict[str, torch.Tensor]:
    """Row j is the fine-tune's token j: found in the target by its string (k), it gets T[k] + λ·(F − B)
    when the base has it too, else keeps T[k]; a token the target lacks gets λ·F (target and base rows
    read as zeros, as under pad). Rows no token of the fine-tune maps to keep T[j], or are zeros past the
    target's rows. Rows: the target's, or the fine-tune's ids + 1 when more."""
    a, b, c = (load_sd(added[k]) for k in ("sf", "sb", "tb"))
    va, vb, vc = (added["vocab"][k] for k in ("sf", "sb", "tb"))
    by_id = {i: s for s, i in va.items()}
    want = {}
    for k in (EMB, HEAD):
        zero = torch.zeros_like(c[k][0])
        rows = []
        for j in range(max(c[k].shape[0], max(va.values()) + 1)):
            s = by_id.get(j)
            if s is None:
                rows.append(c[k][j].clone() if j < c[k].shape[0] else zero)
            elif vc.get(s, 1 << 30) >= c[k].shape[0]:
                rows.append(exact_transfer(zero, a[k][j], zero, scale))
            elif vb.get(s, 1 << 30) < b[k].shape[0]:
                rows.append(exact_transfer(c[k][vc[s]], a[k][j], b[k][vb[s]], scale))
            else:
                rows.append(c[k][vc[s]].clone())
        want[k] = torch.stack(rows)
    return want


@pytest.mark.parametrize("scale", [0.7, -0.5])
def test_align_with_the_finetunes_tokenizer_indexes_rows_by_its_ids(added, tmp_path, scale):
    """--tokenizer-from source-finetuned: the output's rows are the fine-tune's token ids (its tokenizer is
    the output's), each matched to the target by token string; every id has a row and runs."""
    from transformers import AutoModelForCausalLM

    r = deltaport.transfer(added["sb"], added["sf"], added["tb"], tmp_path / "o", vocab_policy="align", scale=scale,
                           tokenizer_from="source-finetuned", chunk_elems=4099)
    out, want = load_sd(tmp_path / "o"), _align_by_finetuned_tokenizer(added, scale)
    for k in (EMB, HEAD):
        diff = (bits(out[k]) != bits(want[k])).any(dim=1).nonzero().flatten().tolist()
        assert out[k].shape == want[k].shape and diff == [], f"{k}: rows {diff} differ from the row-by-row reference"
    rec = r.provenance["vocab_align"]
    assert rec["output_tokenizer"] == "source-finetuned"
    assert [t["token"] for t in rec["tokens_new_to_target"]["first"]] == ["<fin>"]  # <think>, <tool>: the target has them
    assert [t["token"] for t in rec["target_tokens_dropped"]["first"]] == ["newword", "<tgt>"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.vocab_size == out[EMB].shape[0]
    with torch.no_grad():
        model(torch.tensor([sorted(added["vocab"]["sf"].values())]))


def test_align_with_one_vocabulary_is_a_plain_transfer(family, tmp_path):
    """Same tokenizer, same row counts: align changes nothing (padding rows included)."""
    p = family("llama", torch.bfloat16)
    r = deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "a", vocab_policy="align")
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "plain")
    assert_bit_equal(load_sd(tmp_path / "a"), load_sd(tmp_path / "plain"))
    assert "vocab_align" not in r.provenance and r.plan.warnings == []


def test_unmatched_rows_cli_flag_and_validation(added, tmp_path):
    from hostile_cases import in_process_runner

    argv = ["transfer", "--source-base", str(added["sb"]), "--source-finetuned", str(added["sf"]),
            "--target-base", str(added["tb"]), "--vocab-policy", "align", "-q"]
    rc, _, err = in_process_runner(argv + ["-o", str(tmp_path / "o"), "--unmatched-rows", "finetuned"])
    assert rc == 0, err
    assert "4 target token(s) have no row in the source base" in err
    deltaport.transfer(added["sb"], added["sf"], added["tb"], tmp_path / "lib", vocab_policy="align",
                       unmatched_rows="finetuned")
    assert_bit_equal(load_sd(tmp_path / "o"), load_sd(tmp_path / "lib"))
    rc, _, err = in_process_runner(argv + ["-o", str(tmp_path / "x"), "--unmatched-rows", "nope"])
    assert rc == 2 and "'--unmatched-rows': 'nope' is not one of 'target', 'finetuned'" in err, err
    with pytest.raises(deltaport.InputError, match="--unmatched-rows applies to --vocab-policy align"):
        deltaport.transfer(added["sb"], added["sf"], added["tb"], tmp_path / "y", vocab_policy="pad",
                           unmatched_rows="finetuned")


# ---------------------------------------------------------------- LoRA rows that do not fit a chunk
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """bf16 models with rows of 96 and 200 elements (tensors of 19200 elements: chunks of 7 and 4099 cut
    rows), and a PEFT adapter whose A/B values are bf16-representable, so scaling·B·A is exact in float64
    whatever the summation order (the reference below is then exact)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    dims = dict(hidden_size=96, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)
    base = T.make_model("llama", seed=0, dtype=torch.float32, **dims)
    tgt = T.perturbed(base, seed=2, scale=5e-3)
    _save_adapter(base, root / "adapter", r=4, alpha=6, modules=["q_proj", "down_proj", "up_proj"])
    # a second adapter with full float32 factors: scaling·B·A is then not exact in float32
    pm32 = get_peft_model(T.make_model("llama", seed=0, dtype=torch.float32, **dims),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "gate_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm32.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    pm32.save_pretrained(root / "adapter32")
    base_bf = T.make_model("llama", seed=0, dtype=torch.bfloat16, **dims)
    return {"sb": T.save(base_bf, root / "sb"), "tb": T.save(tgt.to(torch.bfloat16), root / "tb"),
            "adapter": root / "adapter", "adapter32": root / "adapter32"}


def _lora_reference(lora, target, scale: float) -> dict[str, torch.Tensor]:
    """PEFT semantics: W + λ·(lora_alpha / r)·B·A for adapted modules, W elsewhere; one rounding of the exact value."""
    cfg = json.loads((lora["adapter"] / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    ad, c = load_sd(lora["adapter"]), load_sd(target)
    want = {}
    for k, w in c.items():
        mod = "base_model.model." + k[: -len(".weight")]
        if mod + ".lora_A.weight" in ad:
            A, B = ad[mod + ".lora_A.weight"].double(), ad[mod + ".lora_B.weight"].double()
            d = (B @ A) * scaling  # exact: products of bf16 values summed over r = 4, times 1.5
            want[k] = exact_transfer(w, d, torch.zeros_like(d), scale)
        else:
            want[k] = w.clone()
    return want


@pytest.mark.parametrize("chunk", [7, 4099, 200 * 96 - 1, DEFAULT_CHUNK_ELEMS])
def test_lora_transfer_any_chunk_size_matches_float64_reference(lora, tmp_path, chunk):
    deltaport.transfer(lora["sb"], lora["adapter"], lora["tb"], tmp_path / "o", scale=0.7, chunk_elems=chunk)
    out, want = load_sd(tmp_path / "o"), _lora_reference(lora, lora["tb"], 0.7)
    adapted = [k for k in want if any(m in k for m in ("q_proj", "down_proj", "up_proj"))]
    assert len(adapted) == 6 and {load_sd(lora["tb"])[k].shape[1] for k in adapted} == {96, 200}
    assert_bit_equal(out, want)


def test_lora_chunks_keep_memory_bounded_by_chunk_or_row(lora, tmp_path):
    """Buffers never exceed max(chunk, one row) elements, even when a chunk is smaller than a row."""
    from deltaport.engine import Engine
    from deltaport.io.checkpoint import open_checkpoint
    from deltaport.io.writer import OutEntry, ShardedWriter
    from deltaport.plan import make_policies, plan_transfer

    sb, sf, tb = (open_checkpoint(lora[k]) for k in ("sb", "adapter", "tb"))
    plan = plan_transfer(sb, sf, tb, make_policies())
    for chunk in (7, 4099):
        out = tmp_path / f"o{chunk}"
        out.mkdir()
        w = ShardedWriter(out, [OutEntry(op.name, op.out_dtype, op.shape) for op in plan.ops], 1 << 30)
        eng = Engine(plan, chunk_elems=chunk, prefetch=False)
        eng.run(w)
        w.finalize()
        longest_row = max(op.shape[-1] for op in plan.ops)
        # (raw bytes, numpy uint8 since the kernel's path runs without torch, are the chunk times the itemsize)
        biggest = max(len(b) for b in eng.bufs._bufs.values() if str(b.dtype) not in ("torch.uint8", "uint8"))
        assert biggest <= max(chunk, longest_row), (chunk, biggest)


# ---------------------------------------------------------------- LoRA diff: exact, or checked
def test_lora_diff_then_apply_equals_direct_lora_transfer(lora, tmp_path):
    """The stored Δ of an adapter is exact (auto keeps the computed float64), so applying it equals the
    direct LoRA transfer byte for byte, onto the base and onto another target at another λ."""
    r = deltaport.diff(lora["sb"], lora["adapter32"], tmp_path / "delta")
    assert r.provenance["inexact_delta_elements"] == {}
    for target, scale in ((lora["sb"], 1.0), (lora["tb"], 0.7)):
        tag = f"{target.name}{scale}"
        deltaport.transfer(lora["sb"], lora["adapter32"], target, tmp_path / f"direct{tag}", scale=scale)
        deltaport.apply(tmp_path / "delta", target, tmp_path / f"applied{tag}", scale=scale)
        direct = load_sd(tmp_path / f"direct{tag}")
        assert_bit_equal(load_sd(tmp_path / f"applied{tag}"), direct)
        c = load_sd(target)
        assert sum(not torch.equal(direct[k], c[k]) for k in c) == 4  # k_proj, gate_proj of both layers


def test_lora_diff_in_a_narrower_dtype_counts_inexact_elements(lora, tmp_path):
    """A bf16 Δ of scaling·B·A cannot reproduce the merged model everywhere: diff checks and says so,
    and the count equals what an apply onto the base actually gets wrong."""
    r = deltaport.diff(lora["sb"], lora["adapter"], tmp_path / "delta", delta_dtype="bfloat16")
    deltaport.apply(tmp_path / "delta", lora["sb"], tmp_path / "applied")
    got, want = load_sd(tmp_path / "applied"), _lora_reference(lora, lora["sb"], 1.0)
    wrong = {k: int((bits(got[k]) != bits(want[k])).sum()) for k in want}
    wrong = {k: n for k, n in wrong.items() if n}
    assert wrong, "a bf16 Δ of a LoRA product should not be exact on this fixture"
    assert r.provenance["inexact_delta_elements"] == wrong
    prov = json.loads((tmp_path / "delta" / "deltaport.json").read_text())
    assert prov["inexact_delta_elements"] == wrong


def test_lora_fan_in_fan_out_conv1d_gets_the_transposed_product(tmp_path):
    """GPT-2 stores Conv1D weights as [in, out]; PEFT then merges (B·A)ᵀ. A square c_proj used to get B·A
    untransposed, silently."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    tgt = T.perturbed(base, seed=2, scale=5e-3)
    sb, tb = T.save(base, tmp_path / "sb"), T.save(tgt, tmp_path / "tb")
    pm = get_peft_model(GPT2LMHeadModel.from_pretrained(sb), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn_like(p) * 0.05).to(torch.bfloat16).float())
    pm.save_pretrained(tmp_path / "adapter")
    deltaport.transfer(sb, tmp_path / "adapter", tb, tmp_path / "o", chunk_elems=7)
    out, c, ad = load_sd(tmp_path / "o"), load_sd(tb), load_sd(tmp_path / "adapter")
    adapted = 0
    for k, w in c.items():
        mod = "base_model.model." + k[: -len(".weight")]
        if mod + ".lora_A.weight" in ad:
            A, B = ad[mod + ".lora_A.weight"].double(), ad[mod + ".lora_B.weight"].double()
            want = (w.double() + (B @ A).T * 2.0).float()
            adapted += 1
        else:
            want = w
        assert torch.equal(bits(out[k]), bits(want)), k
    assert adapted == 3 and c["transformer.h.0.attn.c_proj.weight"].shape == (32, 32)
    # PEFT's own merge agrees (it merges in float32: close, not bitwise)
    merged = pm.merge_and_unload().state_dict()
    self_out = tmp_path / "self"
    deltaport.transfer(sb, tmp_path / "adapter", sb, self_out)
    got = load_sd(self_out)
    for k in got:
        torch.testing.assert_close(got[k], merged[k], rtol=0, atol=1e-6)


def test_pad_and_tied_outputs_do_not_depend_on_the_chunk_size(added, family, tmp_path):
    """Chunks that cut rows (7, 4099) give the bytes of the default chunk: vocab pad, and a tied model."""
    cases = {"pad": (added["sb"], added["sf"], added["tb"], {"vocab_policy": "pad", "scale": 0.7})}
    g = family("gemma", torch.bfloat16)
    cases["tied"] = (g["source_base"], g["source_finetuned"], g["target_base"], {"scale": 0.7})
    for tag, (sb, sf, tb, kw) in cases.items():
        outs = []
        for chunk in CHUNKS:
            deltaport.transfer(sb, sf, tb, tmp_path / f"{tag}{chunk}", chunk_elems=chunk, **kw)
            outs.append(load_sd(tmp_path / f"{tag}{chunk}"))
        assert_bit_equal(outs[0], outs[2])
        assert_bit_equal(outs[1], outs[2])


def test_lora_on_smollm2_shapes_with_the_default_chunk(tmp_path):
    """SmolLM2-135M's shapes (hidden 576, MLP 1536): down_proj's rows of 1536 elements cut the default
    512K-element chunk (this crashed with "shape '[341, 1536]' is invalid for input of size 524288")."""
    dims = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64)
    base = T.make_model("llama", seed=0, dtype=torch.float32, **dims)
    tgt = T.perturbed(base, seed=2, scale=5e-3).to(torch.bfloat16)
    _save_adapter(base, tmp_path / "adapter", r=8, alpha=16, modules=["down_proj", "gate_proj", "v_proj"])
    paths = {"sb": T.save(T.make_model("llama", seed=0, dtype=torch.bfloat16, **dims), tmp_path / "sb", max_shard_size="5MB"),
             "tb": T.save(tgt, tmp_path / "tb", max_shard_size="5MB"), "adapter": tmp_path / "adapter"}
    assert load_sd(paths["tb"])["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    deltaport.transfer(paths["sb"], paths["adapter"], paths["tb"], tmp_path / "o", scale=0.7)
    assert_bit_equal(load_sd(tmp_path / "o"), _lora_reference(paths, paths["tb"], 0.7))
