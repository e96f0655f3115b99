"""The real-model tier: SmolLM2-135M-Instruct (real names, rows of 576 and 1536 that cut the engine's
chunks, tied embeddings, a real tokenizer and chat template), built from nothing by tests/smollm2.py.

Every output is checked bit for bit against the tests' own float64 reference (tests/reference.py),
or for LoRA against PEFT's merge done in float64 and rounded once. Runs in the default
``python -m pytest -q``; ``-m "not realmodel"`` leaves it out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import deltaport
import reference as R

pytestmark = pytest.mark.realmodel

EMB = "model.embed_tokens.weight"
ROW_ALIGNED = 4608 * 64  # a multiple of both row lengths (576, 1536): no chunk ends mid-row
CUT = 65537  # prime: ends chunks mid-row in every matrix (4099 cuts too, but its 33k chunks cost ~6 s a run)
TEXTS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    """The tier's outputs (~3 GB): removed when the module is done, so kept test dirs stay small."""
    root = tmp_path_factory.mktemp("realmodel-out")
    yield root
    _DONE.clear()
    shutil.rmtree(root, ignore_errors=True)


POLICIES = dict(scale=0.7, scale_map={r"mlp\.(up|gate)_proj": 0.5, r"layers\.29\.": 0.0}, exclude=[r"self_attn\.v_proj"])
#: every transfer the tier runs: key -> (source fine-tune, target, keyword arguments)
RUNS = {
    "t1": ("finetuned", "release", {}),
    "t07": ("finetuned", "release", dict(chunk_elems=CUT, **POLICIES)),
    "t0": ("finetuned", "release", dict(scale=0.0, chat_template_from="target")),
    "self": ("finetuned", "base", dict(chunk_elems=CUT)),
    "align": ("finetuned_added", "release_added", dict(vocab_policy="align", chunk_elems=CUT)),
    "added-ft-tok": ("finetuned_added", "release", dict(vocab_policy="align", tokenizer_from="source-finetuned",
                                                        chunk_elems=CUT)),
    "added-tgt-tok": ("finetuned_added", "release", dict(vocab_policy="align")),
    "lora-aligned": ("adapter", "release", dict(chunk_elems=ROW_ALIGNED)),
    "lora-default": ("adapter", "release", {}),
    "lora-cut": ("adapter", "release", dict(chunk_elems=CUT)),
}
_DONE: dict = {}


def _transfer(m, out_root, key: str) -> Path:
    """deltaport.transfer(base, ...) for RUNS[key], once (several tests read the same output)."""
    if key not in _DONE:
        sf, tb, kw = RUNS[key]
        out = out_root / key
        shutil.rmtree(out, ignore_errors=True)  # a run that failed half-way in an earlier test
        deltaport.transfer(m["base"], m[sf], m[tb], out, **kw)
        _DONE[key] = out
    return _DONE[key]


def _differences(name: str, got: np.ndarray, want: np.ndarray, *, f64: np.ndarray | None = None, limit: int = 10) -> list[str]:
    g, w = got.reshape(-1), np.asarray(want).reshape(-1).astype(got.dtype)
    bad = np.flatnonzero(g != w)
    out = []
    for i in bad[:limit]:
        gv, wv = float(R.decode(g[i:i + 1], "BF16")[0]), float(R.decode(w[i:i + 1], "BF16")[0])
        where = ", ".join(str(int(k)) for k in np.unravel_index(i, got.shape))
        exact = f" (float64 value {float(f64.reshape(-1)[i])!r})" if f64 is not None else ""
        out.append(f"{name}[{where}]: got {gv!r}, reference {wv!r}{exact}")
    if bad.size > limit:
        out.append(f"{name}: ... {bad.size - limit} more")
    return out


def _assert_matches(out: Path, want_fn, names=None) -> None:
    got = R.Ckpt(out)
    names = names or got.names()
    assert set(names) <= set(got.names())
    problems = []
    for n in sorted(names, key=lambda n: n != EMB):  # the embedding first: vocabulary problems show early
        problems += _differences(n, got.bits(n), want_fn(n))
        assert not problems, "output differs from the float64 reference:\n" + "\n".join(problems)


def _same_tensors(a: Path, b: Path) -> None:
    ca, cb = R.Ckpt(a), R.Ckpt(b)
    assert sorted(ca.names()) == sorted(cb.names())
    for n in ca.names():
        assert ca.fmt(n) == cb.fmt(n) and np.array_equal(ca.bits(n), cb.bits(n)), n


# ---------------------------------------------------------------------------------- plain transfer
def test_built_checkpoints_are_real_shapes(smollm2):
    base = R.Ckpt(smollm2["base"])
    assert len(base.names()) == 272 and "lm_head.weight" not in base.names() and base.tied
    assert base.shape(EMB) == (49152, 576) and base.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert len(list(smollm2["base"].glob("*.safetensors"))) == 3
    assert {base.fmt(n) for n in base.names()} == {"BF16"}
    ft = R.Ckpt(smollm2["finetuned"])
    assert not np.array_equal(ft.bits(EMB), base.bits(EMB))


def test_transfer_matches_reference(smollm2, out_root):
    """λ = 1 onto the new release, default chunks: every tensor equals the reference (the tests below
    run the other operations with chunks that end mid-row)."""
    m = smollm2
    out = _transfer(m, out_root, "t1")
    sb, sf, tb = (R.Ckpt(m[k]) for k in ("base", "finetuned", "release"))
    _assert_matches(out, lambda n: R.transfer_tensor(n, sb, sf, tb))


def test_transfer_with_policies_matches_reference(smollm2, out_root):
    """λ = 0.7, a scale map and an exclude, on real names; chunks that end mid-row."""
    m = smollm2
    out = _transfer(m, out_root, "t07")
    sb, sf, tb = (R.Ckpt(m[k]) for k in ("base", "finetuned", "release"))
    _assert_matches(out, lambda n: R.transfer_tensor(n, sb, sf, tb, **POLICIES))


def test_transfer_onto_source_base_reproduces_finetuned(smollm2, out_root):
    out = _transfer(smollm2, out_root, "self")
    _same_tensors(out, smollm2["finetuned"])


# ---------------------------------------------------------------------------------- diff / apply
def test_diff_apply_matches_transfer_and_reference(smollm2, out_root):
    m = smollm2
    r = deltaport.diff(m["base"], m["finetuned"], out_root / "delta")
    assert r.provenance["inexact_delta_elements"] == {}
    sb, sf, delta = R.Ckpt(m["base"]), R.Ckpt(m["finetuned"]), R.Ckpt(out_root / "delta")
    for n in (EMB, "model.layers.0.mlp.down_proj.weight", "model.layers.17.self_attn.k_proj.weight", "model.norm.weight"):
        assert np.array_equal(delta.bits(n), R.diff_tensor(n, sb, sf)), n
    deltaport.apply(out_root / "delta", m["release"], out_root / "applied", **POLICIES)  # default chunks
    _same_tensors(out_root / "applied", _transfer(m, out_root, "t07"))


PLANTED = (EMB, "model.layers.0.mlp.down_proj.weight")


def _planted_copy(src: Path, dst: Path, edit) -> Path:
    """``src`` with the shards holding PLANTED rewritten by ``edit(name, tensor)`` (in place); every other
    file hard-linked (or copied)."""
    import os

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
            continue
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            if any(n in tensors for n in PLANTED):
                for n in PLANTED:
                    if n in tensors:
                        edit(n, tensors[n])
                save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
                continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    return dst


def test_default_delta_is_lossless_with_planted_near_cancellations(smollm2, out_root):
    """Values a float32 Δ cannot hold, planted in the real checkpoints (the mergekit comparison's pair
    B = −0.0024871826171875, F = 1.8975697457790375e-08; fine-tuned values 2⁻²⁰..2⁻⁶⁰ of their base;
    subnormals; ±0) in the embedding and one matrix: apply(diff(F, B), to=B) == F bit for bit, zeros
    of either sign aside (docs/FORMAT.md). Only the two planted tensors are diffed (the tier's full
    diff/apply is checked above), which keeps this to seconds."""
    g = torch.Generator().manual_seed(7)
    spots = {n: torch.randperm(int(np.prod(R.Ckpt(smollm2["base"]).shape(n))), generator=g)[:4000] for n in PLANTED}

    def edit_base(name, t):
        t.view(-1)[spots[name][0]] = -0.0024871826171875

    def edit_finetuned(name, t):
        flat, idx = t.view(-1), spots[name]
        base = R.Ckpt(smollm2["base"]).f64(name).reshape(-1)[idx.numpy()]
        base[0] = -0.0024871826171875
        k = torch.randint(20, 61, (len(idx),), generator=g).double()
        flat[idx] = (torch.from_numpy(base) * 2.0 ** -k).to(torch.bfloat16)  # nearly cancels its base
        flat[idx[0]] = 1.8975697457790375e-08
        flat[idx[1:4]] = torch.tensor([2.0 ** -133, -(2.0 ** -130), -0.0], dtype=torch.bfloat16)

    pb = _planted_copy(smollm2["base"], out_root / "planted-base", edit_base)
    pf = _planted_copy(smollm2["finetuned"], out_root / "planted-ft", edit_finetuned)
    include = [rf"^{n.replace('.', chr(92) + '.')}$" for n in PLANTED]
    r = deltaport.diff(pb, pf, out_root / "planted-delta", include=include)
    assert r.provenance["inexact_delta_elements"] == {}
    assert sum(r.provenance["exact_residual"]["tensors"].values()) >= 2 * 3000  # most planted values need one
    out = deltaport.apply(out_root / "planted-delta", pb, out_root / "planted-back").output
    got, want = R.Ckpt(out), R.Ckpt(pf)
    for n in PLANTED:
        a, b = got.bits(n).reshape(-1), want.bits(n).reshape(-1)
        zero = (b & 0x7FFF) == 0
        assert np.array_equal(a[~zero], b[~zero]), _differences(n, got.bits(n), want.bits(n))
        assert ((a[zero] & 0x7FFF) == 0).all()
    assert float(R.decode(got.bits(EMB).reshape(-1)[int(spots[EMB][0]):][:1], "BF16")[0]) == 1.8975697457790375e-08


# ---------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def peft_merged(smollm2):
    """PEFT's own merge of the adapter into the new release, in float64, rounded once to bf16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2["release"], dtype=torch.float64)
    pm = PeftModel.from_pretrained(model, smollm2["adapter"]).double()  # the adapter's fp32 A, B: exact in float64
    assert {p.dtype for p in pm.parameters()} == {torch.float64}
    sd = pm.merge_and_unload().state_dict()
    rel = R.Ckpt(smollm2["release"])
    # PEFT leaves modules it does not adapt alone (bf16 -> float64 -> bf16 is exact): their bytes are the release's
    return {n: R.round_bits(t.numpy(), "BF16").reshape(t.shape) if _adapted(n) else rel.bits(n)
            for n, t in sd.items() if n != "lm_head.weight"}


def _adapted(name: str) -> bool:
    return any(f".{mod}." in name for mod in ("q_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("run", ["lora-aligned", "lora-default",
                                 "lora-cut"])
def test_lora_transfer_matches_peft_merge(smollm2, out_root, peft_merged, run):
    """The adapter's B is non-zero; every output tensor equals PEFT's float64 merge rounded once."""
    out = _transfer(smollm2, out_root, run)
    ck = R.Ckpt(out)
    assert sorted(ck.names()) == sorted(peft_merged)
    adapted = [n for n in ck.names() if _adapted(n)]
    assert len(adapted) == 90
    rel = R.Ckpt(smollm2["release"])
    assert all(not np.array_equal(peft_merged[n], rel.bits(n)) for n in adapted)  # B != 0: Δ is there
    _assert_matches(out, lambda n: peft_merged[n])


def test_lora_diff_is_exact_or_says_it_is_not(smollm2, out_root):
    """A Δ stored from an adapter and applied gives the direct LoRA transfer's bytes, unless the diff
    itself reports the elements it cannot store exactly (the issue allows either fix). Row-aligned
    chunks, so that defect 2 does not mask this one."""
    m = smollm2
    r = deltaport.diff(m["base"], m["adapter"], out_root / "lora-delta", chunk_elems=ROW_ALIGNED)
    deltaport.apply(out_root / "lora-delta", m["release"], out_root / "lora-applied", chunk_elems=ROW_ALIGNED)
    direct = _transfer(m, out_root, "lora-aligned")
    a, d = R.Ckpt(out_root / "lora-applied"), R.Ckpt(direct)
    problems = []
    for n in d.names():
        problems += _differences(n, a.bits(n), d.bits(n), limit=2)
    claims_exact = not r.provenance.get("inexact_delta_elements")
    assert not (problems and claims_exact), (
        f"the LoRA delta claims to be exact ({r.provenance['delta_dtype']}, no inexact elements reported), but "
        "apply(diff(adapter)) differs from the direct LoRA transfer:\n" + "\n".join(problems[:40]))


# ---------------------------------------------------------------------------------- vocabulary align
def test_align_with_tokens_added_by_the_real_tokenizer(smollm2, out_root):
    """Fine-tune and new release each added tokens with the real tokenizer (two shared, in another
    order): rows match by token string; a token without a base row keeps the release's row."""
    from transformers import AutoTokenizer

    m = smollm2
    vocabs = tuple(dict(AutoTokenizer.from_pretrained(m[k]).get_vocab()) for k in ("base", "finetuned_added", "release_added"))
    assert len(vocabs[1]) == len(vocabs[2]) == 49155 and vocabs[1]["<think>"] != vocabs[2]["<think>"]
    out = _transfer(m, out_root, "align")
    sb, sf, tb = R.Ckpt(m["base"]), R.Ckpt(m["finetuned_added"]), R.Ckpt(m["release_added"])
    assert R.Ckpt(out).shape(EMB) == (49155, 576)
    _assert_matches(out, lambda n: R.transfer_tensor(n, sb, sf, tb, vocab="align", vocabs=vocabs))


@pytest.mark.parametrize("tokenizer", ["source-finetuned", "target"])
def test_tokens_the_finetune_added_run_in_the_output(smollm2, out_root, tokenizer):
    """The held-out trial's case: the fine-tune added three tokens (ids 49152-49154), the new release did
    not. With the fine-tune's tokenizer, align gives the added ids rows (λ = 1: the fine-tune's own rows)
    and a forward pass runs over every one; with the target's, the output is the plain transfer and
    deltaport.json names the three tokens it drops. The rest is the plain transfer ("t1"), bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import smollm2 as S

    m = smollm2
    out = _transfer(m, out_root, "added-ft-tok" if tokenizer == "source-finetuned" else "added-tgt-tok")
    got, plain = R.Ckpt(out), R.Ckpt(_transfer(m, out_root, "t1"))
    rows = 49155 if tokenizer == "source-finetuned" else 49152
    assert got.shape(EMB) == (rows, 576) and sorted(got.names()) == sorted(plain.names())
    for n in plain.names():
        if n != EMB:
            assert np.array_equal(got.bits(n), plain.bits(n)), n
    assert np.array_equal(got.bits(EMB)[:49152], plain.bits(EMB))
    prov = json.loads((out / "deltaport.json").read_text())
    dropped = prov["output_tokenizer"].get("finetuned_tokens_dropped")
    tok = AutoTokenizer.from_pretrained(out)
    if tokenizer == "source-finetuned":
        assert np.array_equal(got.bits(EMB)[49152:], R.Ckpt(m["finetuned_added"]).bits(EMB)[49152:])
        ids = tok.convert_tokens_to_ids(S.FT_ADDED)
        assert ids == [49152, 49153, 49154] and dropped is None
    else:
        assert dropped == {"count": 3, "first": [{"token": t, "finetuned_id": 49152 + i} for i, t in enumerate(S.FT_ADDED)]}
        ids = tok("".join(S.FT_ADDED)).input_ids  # the target's tokenizer spells them with its own pieces
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert model.config.vocab_size == rows == max(tok.get_vocab().values()) + 1
    with torch.no_grad():
        logits = model(torch.tensor([ids + [rows - 1]])).logits
    assert logits.shape == (1, len(ids) + 1, rows) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------- invariants
def test_outputs_load_without_missing_or_unexpected_keys(smollm2, out_root):
    from transformers import AutoModelForCausalLM

    for key in ("t1", "t07"):
        _, info = AutoModelForCausalLM.from_pretrained(_transfer(smollm2, out_root, key), dtype=torch.bfloat16,
                                                       output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (key, info)


def test_scale_zero_generates_what_the_target_generates(smollm2, out_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _transfer(smollm2, out_root, "t0")
    _same_tensors(out, smollm2["release"])
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gens = []
    for d in (out, smollm2["release"]):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            gens.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                       min_new_tokens=6, pad_token_id=0).tolist())
    assert gens[0] == gens[1] and len(gens[0][0]) == ids.shape[1] + 6


def test_eos_pad_and_generation_config_follow_the_chat_template_source(smollm2, out_root):
    """The fine-tune is the Instruct model (eos/pad <|im_end|> = 2, a chat template); the release
    looks like a base model (eos 0, no pad, no template)."""
    m = smollm2
    ft_gen = (m["finetuned"] / "generation_config.json").read_text()
    rel_gen = (m["release"] / "generation_config.json").read_text()
    assert ft_gen != rel_gen
    out = _transfer(m, out_root, "t1")  # chat template from the source fine-tune (default)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2)
    assert (out / "generation_config.json").read_text() == ft_gen
    assert (out / "chat_template.jinja").read_text() == (m["finetuned"] / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    out0 = _transfer(m, out_root, "t0")
    cfg0 = json.loads((out0 / "config.json").read_text())
    assert cfg0["eos_token_id"] == 0 and cfg0.get("pad_token_id") is None
    assert (out0 / "generation_config.json").read_text() == rel_gen
    assert not (out0 / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------- diagnostics
_SUMS: dict = {}


def _sums(m) -> dict[str, float]:
    """Σ b², Σ (f − b)², Σ (t − b)² over all tensors, in float64 from the reference's reader."""
    if not _SUMS:
        sb, sf, tb = (R.Ckpt(m[k]) for k in ("base", "finetuned", "release"))
        acc = dict(ss=0.0, dd=0.0, dist=0.0)
        for n in sb.names():
            bb, fb, tbits = (ck.bits(n).reshape(-1) for ck in (sb, sf, tb))
            for i in range(0, bb.size, 1 << 18):
                b = R.decode(np.asarray(bb[i:i + (1 << 18)]), "BF16")
                d1 = R.decode(np.asarray(fb[i:i + (1 << 18)]), "BF16") - b
                d2 = R.decode(np.asarray(tbits[i:i + (1 << 18)]), "BF16") - b
                acc["ss"] += float(b @ b)
                acc["dd"] += float(d1 @ d1)
                acc["dist"] += float(d2 @ d2)
        _SUMS.update(acc)
    return _SUMS


def test_similarity_matches_reference_sums(smollm2):
    from deltaport.similarity import similarity

    m = smollm2
    rep = similarity(m["base"], m["finetuned"], m["release"])
    s = _sums(m)
    tot = rep["total"]
    assert rep["num_parameters"] == 134515008
    assert tot["source_norm"] == pytest.approx(s["ss"] ** 0.5, rel=1e-10)
    assert tot["delta_norm"] == pytest.approx(s["dd"] ** 0.5, rel=1e-10)
    assert tot["distance"] == pytest.approx(s["dist"] ** 0.5, rel=1e-10)


def test_check_and_connectivity_agree_with_the_verified_transfer(smollm2, out_root):
    """check's in-memory transfer (bf16) is the reference-verified output: its loss equals the loss
    connectivity measures on the written model, on the same short text, to the last bit; the curve's
    endpoints are the endpoint models."""
    from deltaport.check import check
    from deltaport.connectivity import connectivity

    m = smollm2
    rep = check(m["base"], m["finetuned"], m["release"], TEXTS, dtype="bfloat16", points=2, max_tokens=48)
    out = _transfer(m, out_root, "t1")
    con = connectivity(out, m["release"], TEXTS, dtype="bfloat16", points=2, max_tokens=48)
    assert con["endpoints_exact"] and con["n_tokens"] == rep["n_tokens"] == 48
    sig = rep["signals"]
    assert sig["loss_transfer"] == con["loss_a"]
    assert sig["loss_target_base"] == con["loss_b"]
    assert np.isfinite(sig["loss_source_base"]) and sig["loss_source_base"] != sig["loss_transfer"]
    s = _sums(m)
    assert sig["rel_distance"] == pytest.approx((s["dist"] / s["ss"]) ** 0.5, rel=1e-10)
    assert sig["delta_rel"] == pytest.approx((s["dd"] / s["ss"]) ** 0.5, rel=1e-10)


def test_eval_compares_base_and_a_transfer_item_by_item(smollm2, out_root, tmp_path):
    """deltaport eval on the real model (20 items): per-item records for both models, and a paired
    comparison whose difference is the score difference, inside its interval, with the flipped items
    those the records show."""
    from deltaport.cli.main import main

    out_model = _transfer(smollm2, out_root, "t1")
    base = str(smollm2["base"])
    task = str(Path(__file__).parent / "data" / "general_qa" / "general_qa.yaml")
    out = tmp_path / "r.json"
    assert main(["eval", base, str(out_model), "--tasks", task, "--limit", "20", "--device", "cpu", "--batch-size",
                 "8", "--no-cache", "--log-samples", "-o", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert res["results"][base]["general_qa"]["acc"] >= 0.4  # chance is 0.25 (SmolLM2-135M: 0.65 on these 20)
    recs = {}
    for row in (base, str(out_model)):
        (f,) = (Path(res["files"]["lm_eval"]) / row.replace("/", "__")).glob("samples_general_qa_*.jsonl")
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        assert [r["doc_id"] for r in lines] == list(range(20)) and all(len(r["loglikelihoods"]) == 4 for r in lines)
        recs[row] = {r["doc_id"]: r["metrics"] for r in lines}
    comps = {c["metric"]: c for c in res["comparisons"]}
    assert set(comps) == {"acc", "acc_norm"}
    for metric, c in comps.items():
        assert (c["model"], c["reference"], c["n_items"]) == (str(out_model), base, 20)
        a, b = res["results"][base]["general_qa"][metric], res["results"][str(out_model)]["general_qa"][metric]
        assert c["difference"] == pytest.approx(b - a, abs=1e-12)
        assert c["ci_low"] <= c["difference"] <= c["ci_high"]
        ra, rb = recs[base], recs[str(out_model)]
        assert c["right_to_wrong_items"] == [f"general_qa/{i}" for i in range(20) if ra[i][metric] > rb[i][metric]]
        assert c["wrong_to_right_items"] == [f"general_qa/{i}" for i in range(20) if ra[i][metric] < rb[i][metric]]


def test_layer_by_layer_diagnostics_equal_the_whole_model_path(smollm2):
    """connectivity and check read SmolLM2 layer by layer (tied embedding, 3 shards, bf16 on disk, float32
    compute): the same losses and signals as whole models loaded by transformers, on a short sample."""
    from deltaport.check import check
    from deltaport.connectivity import connectivity

    m = smollm2
    kw = dict(points=3, max_tokens=96)
    new = connectivity(m["base"], m["release"], TEXTS, **kw)
    old = connectivity(m["base"], m["release"], TEXTS, **kw, layerwise=False)
    assert new["streamed"] and not old["streamed"] and new["n_tokens"] == old["n_tokens"] == 65  # all of TEXTS
    assert new["losses"] == pytest.approx(old["losses"], rel=1e-5, abs=0)
    assert new["num_parameters"] == old["num_parameters"] == 134515008
    cn = check(m["base"], m["finetuned"], m["release"], TEXTS, max_tokens=96, calibration={})
    co = check(m["base"], m["finetuned"], m["release"], TEXTS, max_tokens=96, calibration={}, layerwise=False)
    assert cn["streamed"] and not co["streamed"]
    for k in ("loss_source_base", "loss_source_finetuned", "loss_target_base", "loss_transfer", "rel_distance",
              "delta_rel"):
        assert cn["signals"][k] == pytest.approx(co["signals"][k], rel=1e-5, abs=0), k
    assert cn["signals"]["loss_transfer"] != cn["signals"]["loss_target_base"]
