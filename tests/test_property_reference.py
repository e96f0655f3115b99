"""Property tests: random shapes × chunk sizes × policies, checked bit for bit against the tests' own
float64 reference (tests/reference.py), which shares no code with the engine.

Each example builds three (or, for LoRA, two plus an adapter) tiny checkpoints, runs the public API
with a drawn ``chunk_elems`` (1 element up to more than any tensor), and compares every output tensor
with the reference. Values are drawn in the normal range of every output dtype (bf16/fp16 subnormal
results are issue 10 defect 9's subject, tested elsewhere), and a share of them sit just off a 16-bit
rounding midpoint, where a second rounding would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import deltaport
from deltaport.errors import PlanError
import reference as R

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DOWN, Q, NORM = "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
CHUNKS = st.sampled_from([1, 3, 7, 64, 4099, 1 << 19])
SCALES = st.sampled_from([1.0, 0.0, 0.7, -0.5, 2.0])
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])



# ------------------------------------------------------------------------------------------ values
def _values(rng: np.random.Generator, shape, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, finetuned, target) float64 arrays, already representable in ``fmt``.

    Most elements: B ~ N(0, 0.05), F = B + N(0, 1e-3) (some exactly B), T = B + N(0, 5e-3). About a
    tenth: T = ±2^e, F = half of T's ulp, B = −(a tiny bit): T + (F − B) lies just above a midpoint
    (one rounding goes up; rounding through float32 first would land on the midpoint and go down).
    A few targets are ±0 with F = B, so the sign of zero is exercised too."""
    n = int(np.prod(shape)) if shape else 1
    dt = DTYPES[fmt]
    q = lambda x: torch.tensor(x, dtype=torch.float64).to(dt).double().numpy()  # noqa: E731 - fixtures only
    b = q(rng.normal(0, 0.05, n))
    f = q(b + rng.normal(0, 1e-3, n) * (rng.random(n) < 0.9))
    t = q(b + rng.normal(0, 5e-3, n))
    p = {"BF16": 8, "F16": 11, "F32": 24}[fmt]
    mid = rng.random(n) < 0.1
    e = rng.integers(-3, 4, n).astype(np.float64)
    sgn = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    t = np.where(mid, sgn * 2.0 ** e, t)
    f = np.where(mid, sgn * 2.0 ** (e - p), f)
    b = np.where(mid, -sgn * 2.0 ** (e - p - 13), b)
    zero = (rng.random(n) < 0.03) & ~mid
    t = np.where(zero, np.where(rng.random(n) < 0.5, -0.0, 0.0), t)
    f = np.where(zero, b, f)
    return tuple(x.reshape(shape) for x in (b, f, t))


def _t(x: np.ndarray, fmt: str) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).to(DTYPES[fmt])  # exact: x is representable


def _save(d: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer=None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def _compare(out: Path, want: dict[str, np.ndarray], *, zero_sign_free: set[str] = frozenset()) -> None:
    got = R.Ckpt(out)
    assert sorted(got.names()) == sorted(want)
    for name, w in want.items():
        g = got.bits(name)
        assert g.shape == w.shape, name
        w = np.asarray(w).astype(g.dtype)
        if name in zero_sign_free:  # only where the rule leaves the sign of a zero open (see callers)
            sign = np.uint64(1) << np.uint64(8 * g.dtype.itemsize - 1)
            mask = (~sign).astype(g.dtype)
            zero_g, zero_w = (g & mask) == 0, (w & mask) == 0
            g, w = np.where(zero_g, 0, g), np.where(zero_w, 0, w)
        bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))
        assert bad.size == 0, f"{name}: {bad.size} of {g.size} elements differ from the reference, first at {bad[:5]}"


# ------------------------------------------------------------------------------------------ cases
@st.composite
def model_case(draw, policy: str):
    fmt = draw(st.sampled_from(sorted(DTYPES)))
    h = draw(st.integers(1, 9))
    m = draw(st.integers(1, 13))
    vb = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rows = {"b": vb, "f": vb, "t": vb}
    if policy == "pad":
        rows["f"] = vb + draw(st.integers(1, 4))
        rows["t"] = max(1, vb + draw(st.integers(-2, 4)))
    return dict(policy=policy, fmt=fmt, h=h, m=m, rows=rows, seed=seed, chunk=draw(CHUNKS), scale=draw(SCALES),
                scale_map=draw(st.sampled_from([None, {"mlp": 0.3}, {"q_proj": -1.5, "norm": 0.0}])),
                include=draw(st.sampled_from([[], [r"mlp|norm"], [r"embed|lm_head|q_proj"]])),
                exclude=draw(st.sampled_from([[], [r"q_proj"], [r"embed_tokens"]])))


def _build(root: Path, case: dict, *, tied: dict[str, bool], tokenizers: dict | None = None) -> dict[str, Path]:
    """Checkpoints sb, sf, tb with the case's shapes; ``tied[role]`` drops lm_head from that role."""
    rng = np.random.default_rng(case["seed"])
    fmt, h, m, rows = case["fmt"], case["h"], case["m"], case["rows"]
    vmax = max(rows.values())
    shapes = {EMB: (vmax, h), HEAD: (vmax, h), DOWN: (h, m), Q: (h, h), NORM: (h,)}
    vals = {n: _values(rng, s, fmt) for n, s in shapes.items()}
    dirs = {}
    for i, role in enumerate("bft"):
        key = {"b": "sb", "f": "sf", "t": "tb"}[role]
        tensors = {}
        for n, v in vals.items():
            if n == HEAD and tied[key]:
                continue
            x = v[i][: rows[role]] if n in (EMB, HEAD) else v[i]
            tensors[n] = _t(x, fmt)
        tok = (tokenizers or {}).get(key)
        dirs[key] = _save(root / key, tensors, {"tie_word_embeddings": tied[key]}, tok)
    return dirs


def _kw(case: dict) -> dict:
    return dict(scale=case["scale"], scale_map=case["scale_map"], include=case["include"], exclude=case["exclude"])


def _run_transfer(root: Path, case: dict, dirs: dict, **extra) -> Path:
    out = root / "out"
    deltaport.transfer(dirs["sb"], dirs["sf"], dirs["tb"], out, chunk_elems=case["chunk"], **_kw(case), **extra)
    return out


def _ref(dirs: dict, case: dict, **extra) -> dict[str, np.ndarray]:
    sb, sf, tb = (R.Ckpt(dirs[k]) for k in ("sb", "sf", "tb"))
    return R.transfer(sb, sf, tb, **_kw(case), **extra)


# ------------------------------------------------------------------------------------------ tests
@settings(max_examples=40, **SETTINGS)
@given(case=st.sampled_from(["plain", "pad", "tied", "tied_src"]).flatmap(model_case))
def test_transfer_matches_reference(tmp_path_factory, case):
    """Plain, vocabulary pad, tied (all three) and tied sources onto an untied target."""
    root = tmp_path_factory.mktemp("prop")
    pol = case["policy"]
    tied = {"sb": pol in ("tied", "tied_src"), "sf": pol in ("tied", "tied_src"), "tb": pol == "tied"}
    dirs = _build(root, case, tied=tied)
    vocab = "pad" if pol == "pad" else "error"
    out = _run_transfer(root, case, dirs, vocab_policy=vocab)
    _compare(out, _ref(dirs, case, vocab="pad" if pol == "pad" else None))


@settings(max_examples=25, **SETTINGS)
@given(case=st.sampled_from(["plain", "pad", "tied"]).flatmap(model_case))
def test_diff_apply_matches_reference(tmp_path_factory, case):
    """diff stores round_to_float32(F − B) (float64 for float32 models) and apply adds λ·Δ: each
    checked against the reference; where Δ is exact, apply equals transfer."""
    root = tmp_path_factory.mktemp("prop")
    pol = case["policy"]
    tied = {k: pol == "tied" for k in ("sb", "sf", "tb")}
    case["rows"]["t"] = case["rows"]["b"]  # apply needs the structure the delta was made on
    dirs = _build(root, case, tied=tied)
    vocab = "pad" if pol == "pad" else "error"
    kw = {k: v for k, v in _kw(case).items() if k not in ("scale", "scale_map")}
    deltaport.diff(dirs["sb"], dirs["sf"], root / "delta", chunk_elems=case["chunk"], vocab_policy=vocab, **kw)
    sb, sf, tb = (R.Ckpt(dirs[k]) for k in ("sb", "sf", "tb"))
    dfmt = "F64" if case["fmt"] == "F32" else "F32"
    delta = R.Ckpt(root / "delta")
    want_delta = {}
    for n in sf.names():
        if not R._selected(n, case["include"], case["exclude"]):
            continue
        f, b = sf.f64(n), sb.f64(n)
        if f.shape != b.shape:  # pad: the shorter side's missing rows are zeros
            f, b = R._pad_rows(f, max(f.shape[0], b.shape[0])), R._pad_rows(b, max(f.shape[0], b.shape[0]))
        want_delta[n] = (f - b) if dfmt == "F64" else R.round_bits(f - b, "F32").reshape(f.shape)
    if dfmt == "F64":
        want_delta = {n: v.view(np.uint64) for n, v in want_delta.items()}
    _compare(root / "delta", want_delta)
    deltaport.apply(root / "delta", dirs["tb"], root / "out", chunk_elems=case["chunk"], scale=case["scale"],
                    scale_map=case["scale_map"], vocab_policy=vocab)
    want = {}
    for n in tb.names():
        if n not in delta:
            want[n] = tb.bits(n)
            continue
        t, d = tb.f64(n), delta.f64(n)
        lam = R._first_scale(n, case["scale"], case["scale_map"])
        if t.shape != d.shape:  # pad: the output has the larger row count, missing rows are zeros
            rows = max(t.shape[0], d.shape[0])
            if lam == 0.0:
                want[n] = R.pad_bits(tb.bits(n), rows)
                continue
            t, d = R._pad_rows(t, rows), R._pad_rows(d, rows)
        elif lam == 0.0:
            want[n] = tb.bits(n)
            continue
        want[n] = R.round_transfer(t, d, np.zeros_like(d), lam, case["fmt"]).reshape(t.shape)
    _compare(root / "out", want)


def _align_case(draw, *, finetune_adds: bool):
    case = draw(model_case("align"))
    src_extra = [f"x{i}" for i in range(draw(st.integers(0, 6)))]
    tgt_extra = draw(st.permutations([f"x{i}" for i in range(6)] + ["y0", "y1"]))[: draw(st.integers(1, 8))]
    added = draw(st.permutations(["n0", "n1", "n2"])) if finetune_adds else []
    if finetune_adds:  # the target also added some of the fine-tune's new tokens, in another order
        tgt_extra = list(tgt_extra) + draw(st.permutations(["n2", "n0", "y2"]))
    case.update(src_extra=src_extra, tgt_extra=list(tgt_extra), added=list(added),
                pads={k: draw(st.integers(0, 4)) for k in ("sb", "sf", "tb")})
    if finetune_adds:  # every example must reach the added tokens' rows with a non-zero Δ
        case.update(include=[], exclude=[], scale_map=None, scale=case["scale"] or 0.7)
    return case


def _run_align(tmp_path_factory, case):
    from deltaport import testing as T

    toks = {"sb": T.make_tokenizer(extra_words=case["src_extra"]),
            "sf": T.make_tokenizer(extra_words=case["src_extra"] + case["added"]),
            "tb": T.make_tokenizer(extra_words=case["tgt_extra"])}
    vocabs = {k: dict(t.get_vocab()) for k, t in toks.items()}
    case["rows"] = {r: len(vocabs[k]) + case["pads"][k] for r, k in (("b", "sb"), ("f", "sf"), ("t", "tb"))}
    root = tmp_path_factory.mktemp("prop")
    dirs = _build(root, case, tied={"sb": False, "sf": False, "tb": False}, tokenizers=toks)
    out = _run_transfer(root, case, dirs, vocab_policy="align")
    want = _ref(dirs, case, vocab="align", vocabs=(vocabs["sb"], vocabs["sf"], vocabs["tb"]))
    # a row without Δ keeps the target's value; whether the engine copies it or adds a zero Δ (which
    # turns −0.0 into +0.0) the issue leaves open, so the sign of zero is free in the two vocab tensors
    _compare(out, want, zero_sign_free={EMB, HEAD})


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_align_shared_vocabulary_matches_reference(tmp_path_factory, data):
    """align where fine-tune and base share a tokenizer and the target's differs (ids moved, tokens of
    its own, padding rows): rows are matched by token string."""
    _run_align(tmp_path_factory, _draw_align(data, False))


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_align_finetune_added_tokens_matches_reference(tmp_path_factory, data):
    """align where the fine-tune added tokens (some also added by the target, in another order) and
    the embeddings have padding rows on either side of the added ids: a token without a base row
    gets no Δ (the target's row)."""
    _run_align(tmp_path_factory, _draw_align(data, True))


def _draw_align(data, finetune_adds: bool) -> dict:
    return data.draw(st.composite(lambda draw: _align_case(draw, finetune_adds=finetune_adds))())


# ------------------------------------------------------------------------------------------ LoRA
def _lora_case(draw, chunks):
    case = draw(model_case("plain"))
    case["chunk"] = draw(chunks)
    case["r"] = draw(st.sampled_from([1, 2, 4]))
    case["alpha"] = draw(st.sampled_from([case["r"], 2 * case["r"], 16]))
    case["modules"] = draw(st.sampled_from([["q_proj"], ["down_proj"], ["q_proj", "down_proj"]]))
    return case


def _run_lora(tmp_path_factory, case, *, min_cols: int = 1):
    """Adapter values are multiples of 2^-7 in [-1/8, 1/8] and scaling is a power of two, so B @ A is
    exact in float64 whatever the summation order: the reference cannot differ by a matmul's order."""
    root = tmp_path_factory.mktemp("prop")
    case["h"], case["m"] = max(case["h"], min_cols), max(case["m"], min_cols)
    dirs = _build(root, case, tied={"sb": False, "sf": False, "tb": False})
    rng = np.random.default_rng(case["seed"] + 1)
    shapes = {"q_proj": ("self_attn", (case["h"], case["h"])), "down_proj": ("mlp", (case["h"], case["m"]))}
    ad = {}
    for mod in case["modules"]:
        part, (rows, cols) = shapes[mod]
        pre = f"base_model.model.model.layers.0.{part}.{mod}"
        ad[pre + ".lora_A.weight"] = torch.tensor(rng.integers(-16, 17, (case["r"], cols)) / 128.0, dtype=torch.float32)
        ad[pre + ".lora_B.weight"] = torch.tensor(rng.integers(-16, 17, (rows, case["r"])) / 128.0, dtype=torch.float32)
    adir = root / "adapter"
    adir.mkdir()
    save_file(ad, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": case["r"], "lora_alpha": case["alpha"], "target_modules": case["modules"],
        "base_model_name_or_path": str(dirs["sb"]), "bias": "none", "use_rslora": False}))
    out = root / "out"
    adapted = [f"model.layers.0.{shapes[m][0]}.{m}.weight" for m in case["modules"]]
    if not any(R._selected(n, case["include"], case["exclude"]) for n in adapted):
        # nothing the adapter touches is selected: a transfer in which no tensor receives Δ is an input error
        with pytest.raises(PlanError, match="no tensor would receive Δ: 0 of"):
            deltaport.transfer(dirs["sb"], adir, dirs["tb"], out, chunk_elems=case["chunk"], **_kw(case))
        assert not out.exists()
        return
    deltaport.transfer(dirs["sb"], adir, dirs["tb"], out, chunk_elems=case["chunk"], **_kw(case))
    want = R.transfer(R.Ckpt(dirs["sb"]), R.Ckpt(adir, "adapter_model.safetensors"), R.Ckpt(dirs["tb"]), **_kw(case))
    # where the target and B·A are both zero, the sign of the zero depends on how B·A is summed (the engine
    # starts from the first product, a matmul from +0.0; PEFT leaves it to BLAS): the one tolerated difference
    _compare(out, want, zero_sign_free=set(adapted))


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_lora_whole_row_chunks_matches_reference(tmp_path_factory, data):
    """LoRA transfer where every chunk holds whole rows (chunk 1 with one-column rows, or larger than
    every tensor)."""
    case = data.draw(st.composite(lambda draw: _lora_case(draw, st.sampled_from([1 << 19, 4099])))())
    _run_lora(tmp_path_factory, case)


@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_lora_chunks_that_cut_rows_match_reference(tmp_path_factory, data):
    """LoRA transfer with chunks that end mid-row (odd chunk sizes, rows of an even number ≥ 2 of
    elements, tensors larger than a chunk)."""
    case = data.draw(st.composite(lambda draw: _lora_case(draw, st.sampled_from([3, 5, 7])))())
    case["h"] = max(8, case["h"] + case["h"] % 2)
    case["m"] = max(8, case["m"] + case["m"] % 2)
    case.update(include=[], exclude=[], scale_map=None, scale=case["scale"] or 0.7)  # every example adapts
    _run_lora(tmp_path_factory, case, min_cols=8)
