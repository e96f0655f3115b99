"""The fused kernel (``deltaport.kernel.fused_into``) and the torch fallback (``torch_into``) give the same
bytes, and both are the value nearest the exact result (``tests/reference.py`` and exact rationals), on
chunks built to break them: bf16 midpoints, near-cancellation, subnormals, ±0, inf/NaN, every dtype,
mixed dtypes, λ = 1, 0.5, 0.7, 1.3, composed sums; then end to end, kernel vs ``DELTAPORT_KERNEL=torch``.

numba compiles one specialisation per combination of array dtypes (seconds each, cached on disk with
``cache=True``), so the combinations here are the ones the engine uses."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import deltaport
from deltaport import kernel as K
from deltaport import testing as T
from deltaport.numerics import round_fraction
from conftest import load_sd

import reference as R

pytestmark = pytest.mark.skipif(K.numba is None, reason="numba not installed")

_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
_REF = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _view(x: torch.Tensor) -> np.ndarray:
    """A tensor as the kernel reads it (bf16 → uint16 bits, fp16 → int16 bits)."""
    name = str(x.dtype).replace("torch.", "")
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.view(torch.int16).numpy().view(K.in_view(name))
    return x.numpy()


def _adversarial(dtype: torch.dtype, lam: float, n: int = 6000, seed: int = 0):
    """(t, f, b) in ``dtype``: ordinary weights, then rows built to sit on or next to rounding boundaries."""
    g = torch.Generator().manual_seed(seed)
    t, f, b = ((torch.randn(n, generator=g, dtype=torch.float64) * 0.02).to(dtype) for _ in range(3))
    j = 0

    def put(tv, fv, bv):
        nonlocal j
        t[j], f[j], b[j] = tv, fv, bv
        j += 1

    fin = torch.finfo(dtype)
    eps, tiny = fin.eps, fin.tiny
    for k in range(200):  # t + λ·(f − b) exactly on (or next to) a midpoint of dtype around 1
        put(1.0, (k % 7) * eps, -(0.5 + k % 3) * eps)
        put(-1.0 + (k % 5) * eps, 0.5 * eps * (k % 4), 0.0)
    for k in range(100):  # near-cancellation: f ≈ b, t ≈ −λ·(f − b)
        v = float(torch.tensor(0.01 + k * 1e-4).to(dtype))
        put(-v * lam, v, 0.0)
        put(v, v, float(torch.tensor(v * (1 + eps)).to(dtype)))
        put(0.0, v, v)
    for k in range(60):  # subnormals and the smallest normals
        s = tiny * 2.0 ** -(k % 8)
        put(s * (k % 3), s * (k % 5), -s * (k % 2))
        put(tiny, -tiny * 0.5, s)
    for tv, fv, bv in ((0.0, 0.0, 0.0), (-0.0, 0.0, 0.0), (0.0, -0.0, 0.0), (-0.0, -0.0, 0.0), (-0.0, 0.0, -0.0),
                       (float("inf"), 1.0, 0.0), (1.0, float("-inf"), 0.0), (float("nan"), 1.0, 0.0),
                       (1.0, 0.5, float("nan")), (fin.max, fin.max, 0.0), (-fin.max, -fin.max * 0.25, fin.max * 0.25)):
        put(tv, fv, bv)
    return t, f, b


def _bits(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(K.out_view(dtype))


def _same(a: np.ndarray, b: np.ndarray, dtype: str) -> None:
    """Byte equality, NaN payloads aside (torch's own NaN bits depend on its CPU code path)."""
    fa = torch.from_numpy(a.copy()).view(_TORCH[dtype])
    fb = torch.from_numpy(b.copy()).view(_TORCH[dtype])
    nan = fa.isnan()
    assert torch.equal(nan, fb.isnan())
    bad = np.nonzero((a != b) & ~nan.numpy())[0]
    assert not len(bad), f"{len(bad)} element(s) differ, first at {bad[:5].tolist()}: {a[bad[:5]]} vs {b[bad[:5]]}"


def test_every_16_bit_pattern_widens_exactly():
    """The kernel's loads: every bf16 and fp16 bit pattern (normals, subnormals, ±0, ±Inf, NaNs) enters as
    its float64 value (a float64 output is the plain float64 result: here the input itself)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for name, view in (("bfloat16", np.uint16), ("float16", np.int16)):
        out = np.empty(1 << 16, np.uint64)
        K.fused_into(out, "float64", None, [(bits.view(view), None)], [1.0])
        ref = torch.from_numpy(bits.view(np.int16).copy()).view(_TORCH[name]).double().numpy()
        nan = np.isnan(ref)
        assert np.array_equal(np.isnan(out.view(np.float64)), nan), name
        assert np.array_equal(out[~nan], ref.view(np.uint64)[~nan]), name


@pytest.mark.parametrize("lam", [0.7, 1.3])
def test_uncertain_elements_in_the_last_partial_word(lam):
    """The second pass visits flagged elements by 8-byte words of flags: in chunks whose length is not a
    multiple of 8 and that end with elements needing an exact decision (the last, partial word), every such
    element is visited (the kernel's count equals the sum of one-element calls) and the bytes equal the
    fallback's, for a transfer and a composed apply."""
    t, f, b = (_view(x) for x in _adversarial(torch.bfloat16, lam))

    def one(i, composed):
        o = np.empty(1, np.uint16)
        terms = [(f[i:i + 1], None), (b[i:i + 1], None)] if composed else [(f[i:i + 1], b[i:i + 1])]
        return K.fused_into(o, "bfloat16", t[i:i + 1], terms, [lam, 1 - lam] if composed else [lam])

    for composed in (False, True):
        hard = [i for i in range(1000) if one(i, composed) > 0][:40]
        easy = [i for i in range(len(t)) if one(i, composed) == 0][:1300]
        assert len(hard) >= 10
        for n_easy, n_hard in ((0, 1), (6, 1), (8, 1), (1229, 9), (1300, 23)):
            idx = np.array(easy[:n_easy] + hard[:n_hard])
            ts, fs, bs = t[idx], f[idx], b[idx]
            terms = [(fs, None), (bs, None)] if composed else [(fs, bs)]
            lams = [lam, 1 - lam] if composed else [lam]
            got, fb = np.empty(len(idx), np.uint16), np.empty(len(idx), np.uint16)
            assert K.fused_into(got, "bfloat16", ts, terms, lams) == n_hard, (composed, n_easy, n_hard)
            K.torch_into(fb, "bfloat16", ts, terms, lams)
            _same(got, fb, "bfloat16")


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.7, 1.3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_transfer_kernel_equals_fallback_and_exact_reference(dtype, lam):
    t, f, b = _adversarial(_TORCH[dtype], lam)
    n = t.numel()
    got, fb = np.empty(n, K.out_view(dtype)), np.empty(n, K.out_view(dtype))
    assert K.fused_into(got, dtype, _view(t), [(_view(f), _view(b))], [lam]) >= 0
    K.torch_into(fb, dtype, _view(t), [(_view(f), _view(b))], [lam])
    _same(got, fb, dtype)
    ref = R.round_transfer(t.double().numpy(), f.double().numpy(), b.double().numpy(), lam, _REF[dtype])
    finite = np.isfinite(t.double().numpy() + f.double().numpy() - b.double().numpy())
    assert np.array_equal(got[finite], ref.view(got.dtype)[finite])


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_mixed_dtypes_and_missing_target_or_base(lam):
    """A bf16 target with float32 f and b, a float64 f (a LoRA or compressed Δ) without b, and no target
    (a Δ written as it is): each byte-equal to the fallback and nearest the exact value."""
    t, f, b = _adversarial(torch.bfloat16, lam, seed=1)
    f32, b32 = (f.float() + torch.randn(f.shape, generator=torch.Generator().manual_seed(2)) * 1e-6), b.float()
    n = t.numel()
    for target, terms in ((t, [(f32, b32)]), (t, [(f.double() - b.double(), None)]), (None, [(f32, b32)])):
        args = (None if target is None else _view(target), [(_view(p), None if m is None else _view(m)) for p, m in terms])
        got, fb = np.empty(n, np.uint16), np.empty(n, np.uint16)
        K.fused_into(got, "bfloat16", *args, [lam])
        K.torch_into(fb, "bfloat16", *args, [lam])
        _same(got, fb, "bfloat16")
        tt = np.zeros(n) if target is None else target.double().numpy()
        p, m = terms[0]
        ref = R.round_transfer(tt, p.double().numpy(), np.zeros(n) if m is None else m.double().numpy(), lam, "BF16")
        fin = np.isfinite(tt + p.double().numpy() + (0 if m is None else m.double().numpy()))
        assert np.array_equal(got[fin], ref[fin])


def test_ties_a_float64_pipeline_breaks_are_decided_for_the_float64_lambda():
    """The issue's example: at λ = 0.7 the value for 7/10 lies on a bf16 midpoint, float64(0.7)'s value just
    below it; float64 arithmetic lands on the midpoint. Both paths give float64(0.7)'s nearest value."""
    g = torch.Generator().manual_seed(3)
    t, f, b = ((torch.randn(1 << 16, generator=g) * 0.02).to(torch.bfloat16) for _ in range(3))
    lam = 0.7
    got, fb = np.empty(t.numel(), np.uint16), np.empty(t.numel(), np.uint16)
    unsure = K.fused_into(got, "bfloat16", _view(t), [(_view(f), _view(b))], [lam])
    K.torch_into(fb, "bfloat16", _view(t), [(_view(f), _view(b))], [lam])
    assert np.array_equal(got, fb)
    s64 = (t.double() + lam * (f.double() - b.double())).numpy()
    on_mid = np.nonzero(R.round_bits(s64, "BF16") != got)[0]  # where the float64 pipeline is one step off
    assert unsure > len(on_mid) > 0
    for j in on_mid[:20].tolist():
        x = Fraction(float(t[j])) + Fraction(lam) * (Fraction(float(f[j])) - Fraction(float(b[j])))
        assert R.nearest_bits(x, "BF16") == int(got[j])


def _compose_exact(t, ds, lams, dtype):
    out = []
    for j in range(t.numel()):
        if not math.isfinite(float(t[j])) or not all(math.isfinite(float(d[j])) for d in ds):
            out.append(None)
            continue
        x = Fraction(float(t[j]))
        for lam, d in zip(lams, ds):
            x += Fraction(lam) * Fraction(float(d[j]))
        out.append(round_fraction(x, _TORCH[dtype]))
    return out


@pytest.mark.parametrize("lams", [(0.7, 0.3), (1.0, -0.45), (0.5, 1.3)])
def test_compose_kernel_equals_fallback_and_exact_rationals(lams):
    t, f, b = _adversarial(torch.bfloat16, lams[0], n=3000, seed=4)
    g = torch.Generator().manual_seed(5)
    ds = [(f.double() - b.double()).float()] + [(torch.randn(t.numel(), generator=g) * 1e-3).float()
                                                for _ in lams[1:]]
    ds[1][:400] = -ds[0][:400] * (lams[0] / lams[1])  # near-cancelling deltas
    n = t.numel()
    got, fb = np.empty(n, np.uint16), np.empty(n, np.uint16)
    args = (_view(t), [(_view(d), None) for d in ds], list(lams))
    assert K.fused_into(got, "bfloat16", *args) >= 0
    K.torch_into(fb, "bfloat16", *args)
    _same(got, fb, "bfloat16")
    want = _compose_exact(t, ds, lams, "bfloat16")
    vals = torch.from_numpy(got.copy()).view(torch.bfloat16).double().tolist()
    bad = [j for j, w in enumerate(want) if w is not None and vals[j] != w]  # (an exact zero's sign: the paths')
    assert not bad, bad[:5]


@pytest.mark.parametrize("lams", [(0.7,), (0.7, 0.3), (0.3, -1.1, 0.45)])
def test_compose_near_midpoints_of_diff_like_deltas(lams):
    """A composed apply of diffs of bf16 weights (float32 Δs holding bf16 differences) at λ not a power of two:
    ~3 % of elements lie near a bf16 midpoint (the second pass's short decision, the midpoint cut from the
    float64 result's bits, and :func:`_decide` where that cannot tell); kernel == fallback, and every such
    element equals the exact rational's rounding."""
    g = torch.Generator().manual_seed(8)
    n = 1 << 15
    t, b = ((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16) for _ in range(2))
    ds = [((b.double() + torch.randn(n, generator=g, dtype=torch.float64) * 5e-4).to(torch.bfloat16).double()
           - b.double()).float() for _ in lams]
    ds[-1][:64] = 0.0  # zero terms beside near-midpoint ones
    args = (_view(t), [(d.numpy(), None) for d in ds], list(lams))
    got, fb = np.empty(n, np.uint16), np.empty(n, np.uint16)
    unsure = K.fused_into(got, "bfloat16", *args, compose=True)
    assert unsure > n // 100
    K.torch_into(fb, "bfloat16", *args, compose=True)
    _same(got, fb, "bfloat16")
    s64 = t.double().numpy() + sum(lam * d.double().numpy() for lam, d in zip(lams, ds))
    near = np.nonzero(R.round_bits(s64, "BF16") != got)[0]  # where float64 alone would be one step off
    idx = np.concatenate([near, np.arange(200)])
    want = _compose_exact(t[idx], [d[idx] for d in ds], lams, "bfloat16")
    vals = torch.from_numpy(got[idx].copy()).view(torch.bfloat16).double().tolist()
    assert len(near) > 0 and [v for v, w in zip(vals, want)] == want


def test_float64_output_is_the_plain_float64_result():
    t, f, b = (x.double() for x in _adversarial(torch.float32, 0.7, n=2000, seed=6))
    got, fb = np.empty(t.numel(), np.uint64), np.empty(t.numel(), np.uint64)
    K.fused_into(got, "float64", _view(t), [(_view(f), _view(b))], [0.7])
    K.torch_into(fb, "float64", _view(t), [(_view(f), _view(b))], [0.7])
    _same(got, fb, "float64")


def _shards(path):
    return {k: v for k, v in load_sd(path).items()}


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_end_to_end_kernel_and_fallback_write_the_same_shards(family, tmp_path, monkeypatch, scale):
    p = family("llama", torch.bfloat16)
    args = (p["source_base"], p["source_finetuned"], p["target_base"])
    deltaport.transfer(*args, tmp_path / "k", scale=scale, threads=2, chunk_elems=4096)
    monkeypatch.setenv(K.ENV_SWITCH, "torch")
    deltaport.transfer(*args, tmp_path / "t", scale=scale)
    a, b = _shards(tmp_path / "k"), _shards(tmp_path / "t")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    rec_k = json.loads((tmp_path / "k" / "deltaport.json").read_text())["arithmetic"]
    rec_t = json.loads((tmp_path / "t" / "deltaport.json").read_text())["arithmetic"]
    assert rec_k["numba_kernel"] > 0 and rec_k["torch_fallback"] == 0
    assert rec_t == {"numba_kernel": 0, "torch_fallback": rec_k["numba_kernel"]}


def test_composed_apply_and_ties_same_bytes_both_paths(family, tmp_path, monkeypatch):
    p = family("llama", torch.bfloat16)
    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    T.save(T.perturbed(base, seed=7, scale=2e-3), tmp_path / "ft2")
    deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "d1")
    deltaport.diff(p["source_base"], tmp_path / "ft2", tmp_path / "d2")
    ds = [tmp_path / "d1", tmp_path / "d2"]
    deltaport.apply(ds, p["target_base"], tmp_path / "k", scale=[0.7, 0.3])
    deltaport.apply(ds, p["target_base"], tmp_path / "kt", scale=[0.7, 0.3], ties=0.2)
    monkeypatch.setenv(K.ENV_SWITCH, "torch")
    deltaport.apply(ds, p["target_base"], tmp_path / "t", scale=[0.7, 0.3])
    deltaport.apply(ds, p["target_base"], tmp_path / "tt", scale=[0.7, 0.3], ties=0.2)
    for x, y in (("k", "t"), ("kt", "tt")):
        a, b = _shards(tmp_path / x), _shards(tmp_path / y)
        for k in a:
            assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), (x, k)
    ran = json.loads((tmp_path / "kt" / "deltaport.json").read_text())["arithmetic"]
    assert ran["torch_fallback"] == 0 and ran["numba_kernel"] > 0, ran  # TIES through kernel_ties
    assert json.loads((tmp_path / "tt" / "deltaport.json").read_text())["arithmetic"]["numba_kernel"] == 0


def test_streamed_ties_threshold_is_kthvalue_of_the_whole_tensor(family, tmp_path, monkeypatch):
    """The radix select gives torch.kthvalue's value, with several 16-bit levels and the final gather; so does
    the numba path's sampled one-pass selection where its bracket holds the rank (and where it does not, the
    radix select after it), and a tensor gathered whole."""
    from deltaport import engine as E
    from deltaport.numerics import ties_threshold

    p = family("llama", torch.bfloat16)
    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    T.save(T.perturbed(base, seed=9, scale=2e-3), tmp_path / "ft2")
    deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "d1")
    deltaport.diff(p["source_base"], tmp_path / "ft2", tmp_path / "d2")
    ds = [load_sd(tmp_path / "d1"), load_sd(tmp_path / "d2")]
    import deltaport.engine.compose as compose_mod

    real, real_sampled = E.Engine._streamed_threshold, E.Engine._sampled_threshold
    sampled = []
    monkeypatch.setattr(E.Engine, "_sampled_threshold",
                        lambda self, *a: sampled.append(real_sampled(self, *a)) or sampled[-1])
    # several 16-bit levels, then the gather (the default: test_compose's TIES test); numba's and torch's passes;
    # numba: a gather buffer of 3 (every sampled bracket overflows: the radix select), of 700 (sampled brackets
    # of 8 windows of 16 elements, most of which hold the rank), of 1 << 20 (every tensor gathered whole)
    for gather, path in ((3, "numba"), (3, "torch"), (700, "numba"), (1 << 20, "numba")):
        monkeypatch.setattr(compose_mod, "TIES_GATHER", gather)
        monkeypatch.setattr(compose_mod, "SAMPLE_WINDOWS", 8)
        monkeypatch.setattr(compose_mod, "SAMPLE_WINDOW", 16)
        monkeypatch.setenv(K.ENV_SWITCH, path)
        sampled.clear()
        seen = {}

        def spy(self, op, i, part):
            v = real(self, op, i, part)
            seen[(op.name, i)] = v
            return v

        monkeypatch.setattr(E.Engine, "_streamed_threshold", spy)
        deltaport.apply([tmp_path / "d1", tmp_path / "d2"], p["target_base"], tmp_path / f"o{gather}{path}",
                        scale=[0.5, 0.5], ties=0.3, chunk_elems=1 << 14)
        assert seen
        for (name, i), v in seen.items():
            assert v == ties_threshold(ds[i][name].double().abs().reshape(-1), 0.3), (name, i)
        found = sum(s is not None for s in sampled)
        if path == "torch" or gather == 3:
            assert found == 0, sampled  # (torch: no sampled try; numba with 3: every bracket overflows)
        else:
            assert found == len(seen) if gather > 700 else len(seen) // 2 < found < len(seen), (found, len(seen))


def test_kept_entries_before_an_element_from_block_counts():
    """engine.fused._count_before (a sparse part's kept values before e0, for reads out of order such as a TIES
    cut-off's sample): per-block counts plus the rest equal a plain count, at block and byte edges."""
    from deltaport.engine import fused as F

    rng = np.random.default_rng(0)
    block = 8 * F._PREFIX_BYTES
    for n in (0, 1, 7, 8, 9, block - 1, block, block + 3, 3 * block + 11):
        m = rng.random(n) < 0.3
        bits, cache = np.packbits(m, bitorder="little"), {}
        for e0 in sorted({0, 1, n // 3, n // 2, max(n - 1, 0), n} | ({block, block + 1} if n > block else set())):
            assert F._count_before(bits, e0, cache) == int(m[:e0].sum()), (n, e0)


def _ties_exact(t, vs, lams, ths, dtype):
    """TIES at one element in exact rationals (the election on the exact total), rounded once; None if not finite."""
    if not all(math.isfinite(x) for x in [t] + vs):
        return None
    cs = [Fraction(lam) * Fraction(v) if abs(v) >= th else Fraction(0) for v, lam, th in zip(vs, lams, ths)]
    total = sum(cs, Fraction(0))
    agree = [c for c in cs if c != 0 and total != 0 and (c > 0) == (total > 0)]
    return round_fraction(Fraction(t) + sum(agree, Fraction(0)) / max(len(agree), 1), _TORCH[dtype])


@pytest.mark.parametrize("lams", [(1.0, 1.0), (0.7, 0.3), (1.0, -0.45, 0.3)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_ties_kernel_equals_fallback_and_exact_rationals(dtype, lams):
    """kernel_ties.ties_into against the torch path (torch_ties_into: compose_deltas, round_composed_exactly) on
    chunks built to break it: bf16 midpoints, near- and exact cancellation of the kept entries (the election
    within its rounding error of 0), entries at the cut-off, subnormals, ±0, inf/NaN; same bytes, and every
    finite element the rounding of the exact TIES merge."""
    from deltaport import kernel_ties as KT

    t, f, b = _adversarial(_TORCH[dtype] if dtype != "float64" else torch.float32, lams[0], n=3000, seed=11)
    t = t.to(_TORCH[dtype])
    g = torch.Generator().manual_seed(12)
    vs = [(f.double() - b.double())] + [torch.randn(t.numel(), generator=g, dtype=torch.float64) * 1e-3
                                        for _ in lams[1:]]
    vs[1][:300] = -vs[0][:300] * (lams[0] / lams[1])  # kept entries that cancel (exactly where representable)
    vs[1][300:400] = vs[0][300:400]
    vs[0][400:420] = 0.0
    vs[0][420:440] = -0.0
    ths = [float(np.nanquantile(np.abs(v.numpy()), 0.6)) for v in vs]
    vs[1][440:460] = ths[1]  # exactly at the cut-off: kept
    vs[1][460:480] = -math.nextafter(ths[1], 0.0)  # just below: trimmed
    vs[0][480] = float("inf")
    vs[1][481] = float("nan")
    n = t.numel()
    got, fb = np.empty(n, K.out_view(dtype)), np.empty(n, K.out_view(dtype))
    args = (_view(t), [v.numpy() for v in vs], list(lams), ths)
    hard = KT.ties_into(got, dtype, *args)
    assert hard > 0 or dtype == "float64"  # (the kept cancellations among them: decided exactly)
    assert KT.torch_ties_into(fb, dtype, *args) == hard
    _same(got, fb, dtype)
    if dtype == "float64":
        return
    vals = torch.from_numpy(got.copy()).view(_TORCH[dtype]).double().tolist()
    ts, cols = t.double().tolist(), [v.tolist() for v in vs]
    bad = []
    for j in range(n):
        want = _ties_exact(ts[j], [c[j] for c in cols], lams, ths, dtype)
        if want is not None and math.isfinite(vals[j]) and vals[j] != want:
            bad.append((j, vals[j], want))
    assert not bad, bad[:5]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_window_gather_counts_and_gathers_stored_views(dtype):
    """kernel_ties.window_gather on a chunk's stored view (blocks of 32, a ragged tail, ±0, a bracket holding
    a handful) against numpy on the float64 magnitudes: the counts and the gathered bits; a full buffer keeps
    what fit and still counts the rest."""
    from deltaport import kernel_ties as KT

    g = torch.Generator().manual_seed(7)
    v = (torch.randn(1000 * 32 + 13, generator=g) * 1e-3).to(getattr(torch, dtype))
    v[5], v[40] = 0.0, -0.0
    view = v.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else v.numpy()
    mags = np.abs(v.double().numpy()).view(np.int64)
    srt = np.sort(mags)
    for a, b in ((0, len(srt) - 1), (len(srt) * 4 // 5 - 20, len(srt) * 4 // 5 + 20), (3, 3)):
        lo, hi = int(srt[a]), int(srt[b])
        inside = np.sort(mags[(mags >= lo) & (mags <= hi)])
        for cap in (len(inside) + 3, max(1, len(inside) // 2)):
            out, counts = np.zeros(cap, np.int64), np.zeros(2, np.int64)
            j = KT.window_gather(view, lo, hi, out, 0, counts)
            assert (counts[0], counts[1]) == (int((mags < lo).sum()), len(inside))
            assert j == min(cap, len(inside))
            got = np.sort(out[:j])
            assert np.isin(got, inside).all() and (j < len(inside) or np.array_equal(got, inside))


def test_ties_kernel_refuses_what_it_cannot_decide():
    """A flagged element with a product below 2⁻⁹⁶⁰ (its FMA error could underflow): the chunk is refused
    (the engine then computes it on the torch path)."""
    from deltaport import kernel_ties as KT

    t = np.zeros(4, np.float32)
    vs = [np.array([1e-300, 1.0, 0, 0]), np.array([-1e-300, -1.0, 0, 0])]
    out = np.empty(4, np.uint32)
    assert KT.ties_into(out, "float32", t, vs, [0.7, 0.7], [0.0, 0.0]) == K.KERNEL_REFUSED
    assert KT.ties_into(out, "float32", t, [v[1:] for v in vs], [0.7, 0.7], [0.0, 0.0]) >= 0


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "float64"])
def test_all_finite_on_bits_agrees_with_torch(name):
    """K.all_finite (the engine's finiteness test where torch is not loaded) against torch.isfinite: finite
    extremes (largest finite, smallest subnormal, ±0) pass; one Inf, -Inf or NaN anywhere fails."""
    dt = getattr(torch, name)
    fi = torch.finfo(dt)
    base = torch.cat([torch.randn(997).to(dt), torch.tensor([fi.max, -fi.max, fi.smallest_normal / 2, 0.0, -0.0], dtype=dt)])
    assert bool(torch.isfinite(base).all()) and K.all_finite(base.view(torch.uint8).numpy(), name) is True
    for bad in (float("inf"), float("-inf"), float("nan")):
        for i in (0, 517, len(base) - 1):
            t = base.clone()
            t[i] = bad
            assert K.all_finite(t.view(torch.uint8).numpy(), name) is False, (bad, i)
    assert K.all_finite(base.view(torch.uint8).numpy(), "float8_e4m3fn") is None  # no bit view: the caller asks torch


@pytest.mark.parametrize("scale", [1.0, -1.0, 0.7])
def test_apply_of_a_diff_leaves_empty_residual_chunks_out_with_the_fallbacks_bytes(tmp_path, monkeypatch, scale):
    """An apply of a diff's Δ (stored float32 + exact residual in a few elements) composes, chunk by chunk, only
    the parts with a kept entry there: the kernel's bytes equal the fallback's (which sums every part), also
    for the zero signs a transfer's arithmetic would give otherwise (t = −0 and Δ = −0: t + (+0 + Δ) = +0, not
    −0) and for negative and inexact λ; the residual chunks themselves go through the widened sum."""
    from safetensors.torch import save_file

    from deltaport.io.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.mlp.w.weight" for i in range(3)]
    base = {n: (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16) for n in names}
    ft = {n: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(torch.bfloat16) for n, v in base.items()}
    tgt = {n: (v.float() + torch.randn(v.shape, generator=g) * 3e-3).to(torch.bfloat16) for n, v in base.items()}
    for n in names:  # zeros whose sign a transfer's and a composed sum's arithmetic decide differently
        for k in range(0, 4096, 97):
            base[n].view(-1)[k], ft[n].view(-1)[k], tgt[n].view(-1)[k] = 0.0, -0.0, -0.0
    for k in (1000, 3001):  # a float32 Δ cannot hold f − b here: the residual's elements, two chunks of 64
        base[names[1]].view(-1)[k], ft[names[1]].view(-1)[k] = -0.0024871826171875, 1.8975697457790375e-08
    for d, sd in (("b", base), ("f", ft), ("t", tgt)):
        (tmp_path / d).mkdir()
        save_file(sd, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    delta = deltaport.diff(tmp_path / "b", tmp_path / "f", tmp_path / "d").output
    assert [n for n in open_checkpoint(delta).tensors if "@residual" in n], "the planted elements need a residual"
    import deltaport.engine.fused as fused_mod

    found = []
    real = fused_mod.FusedMixin._sparse_values
    monkeypatch.setattr(fused_mod.FusedMixin, "_sparse_values",
                        lambda *a, **k: (lambda r: found.append(r is None) or r)(real(*a, **k)))
    deltaport.apply(delta, tmp_path / "t", tmp_path / "k", scale=scale, chunk_elems=64)
    assert found.count(True) == 62 and found.count(False) == 2, found  # left out where empty: 62 of 64 chunks
    monkeypatch.setenv(K.ENV_SWITCH, "torch")
    deltaport.apply(delta, tmp_path / "t", tmp_path / "fb", scale=scale, chunk_elems=64)
    a, b = _shards(tmp_path / "k"), _shards(tmp_path / "fb")
    for n in names:
        assert torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)), n
    # the planted zeros: t + (+0 + λ·Δ) = +0 where the tensor has a residual (a composed sum: names[1], also in
    # its chunks without a residual element); t + λ·Δ elsewhere (names[0]: −0 + λ·(−0), −0 unless λ < 0)
    composed, plain = (a[n].view(-1)[0:4096:97] for n in (names[1], names[0]))
    assert bool((composed == 0).all()) and not bool(torch.signbit(composed).any())
    assert bool((plain == 0).all()) and bool(torch.signbit(plain).all()) == (scale > 0)
    rec = json.loads((tmp_path / "k" / "deltaport.json").read_text())["arithmetic"]
    assert rec == {"numba_kernel": 3, "torch_fallback": 0}
