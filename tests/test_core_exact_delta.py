"""``diff``'s default Δ encoding is lossless: planted values that a float32 (or, for float32 models, a
float64) Δ cannot hold (a fine-tuned value that nearly cancels its base, subnormals, ±0, the largest
values) come back bit for bit from ``apply(diff(F, B), to=B)``, and ``apply`` to another target, at
λ = 1 and 0.7, several deltas composed, and TIES use the exact Δ, checked against exact rationals
(tests/reference.py). The one tolerated difference is the documented sign of zero: a −0.0 of F
comes back as +0.0 (IEEE: B + (−B) is +0.0), and in a tensor that has a residual (summed like a
composed apply) a zero result may come out as −0.0 (the composed sum rounds s − E, below zero, when
the sum is exactly zero; ``apply D1 D2`` does the same)."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltaport
import reference as R

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16}
DTYPES = {"bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16"), "fp32": (torch.float32, "F32")}
REPRO = (-0.0024871826171875, 1.8975697457790375e-08)  # (B, F) in bf16 from SmolLM2: float32 Δ 0.00248720170930028
N = 3000
CHUNK = 777  # chunks end inside the planted runs


def _planted(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B, F) as float64 values of ``kind``: the planted cases first, then random near-cancellations
    (F = B·2^-k·u and B = F·2^-k·u for k up to past the format's precision) and random pairs."""
    dt, _ = DTYPES[kind]
    info = torch.finfo(dt)
    tiny = float(info.smallest_normal) * float(info.eps)  # the smallest subnormal
    big = float(info.max)
    pairs = [REPRO, (0.01, tiny), (1.0, -tiny), (1.0, 3 * tiny), (tiny * 4, tiny), (tiny, 0.5), (-0.75, tiny * 5),
             (float(info.smallest_normal), -tiny), (0.5, -0.0), (-0.0, 0.0), (0.0, -0.0), (-0.0, -0.0), (-0.0, tiny),
             (1.0, 0.0), (big, 1.0), (-big, 2.0 ** -10), (1.0, 1.0 + float(info.eps)), (3.0, -3.0), (2.0 ** -10, 1.0)]
    g = np.random.default_rng(seed)
    emax = int(np.log2(big)) - 2
    top = {"bf16": 60, "fp16": 30, "fp32": 60}[kind]
    rest = N - len(pairs)
    b = g.standard_normal(rest) * 2.0 ** g.integers(-20, 4, rest)
    k = g.integers(0, top, rest)
    f = b * 2.0 ** -k * g.standard_normal(rest)
    swap = g.random(rest) < 0.3  # B the small one
    b[swap], f[swap] = f[swap] * 2.0 ** -k[swap], b[swap]
    near = g.random(rest) < 0.2  # F a few steps from B
    f[near] = b[near] * (1 + g.integers(-4, 5, near.sum()) * float(info.eps))
    b = np.concatenate([[p[0] for p in pairs], np.clip(b, -2.0 ** emax, 2.0 ** emax)])
    f = np.concatenate([[p[1] for p in pairs], np.clip(f, -2.0 ** emax, 2.0 ** emax)])
    bt, ft = torch.from_numpy(b).to(dt), torch.from_numpy(f).to(dt)  # representable values (rounded once or twice)
    return bt.double().numpy(), ft.double().numpy()


def _save(d: Path, tensors: dict[str, np.ndarray], dt: torch.dtype) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.from_numpy(v).to(dt) for n, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def _bits(d: Path, name: str) -> np.ndarray:
    t = load_file(str(d / "model.safetensors"))[name]
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().astype(np.int64)


def _expected(t: np.ndarray, terms: list[tuple[float, np.ndarray, np.ndarray]], fmt: str) -> np.ndarray:
    """Bits of the ``fmt`` values nearest the exact t + Σ λ·(f − b), element by element (exact rationals)."""
    out = []
    for j in range(len(t)):
        x = Fraction(float(t[j])) + sum((Fraction(lam) * (Fraction(float(f[j])) - Fraction(float(b[j])))
                                         for lam, f, b in terms), Fraction(0))
        out.append(R.nearest_bits(x, fmt))
    width = 16 if fmt in ("BF16", "F16") else 32
    return np.array(out, dtype=np.int64) - ((np.array(out, dtype=np.int64) >> (width - 1)) << width)  # signed


@pytest.fixture(scope="module", params=sorted(DTYPES))
def planted(request, tmp_path_factory):
    """Per dtype: base, two fine-tunes and another target (as dirs and values), and the default diffs."""
    kind = request.param
    dt, fmt = DTYPES[kind]
    root = tmp_path_factory.mktemp(f"exact-{kind}")
    b, f = _planted(kind, 0)
    _, f2 = _planted(kind, 1)
    t = torch.from_numpy(np.random.default_rng(2).standard_normal(N) * 0.01).to(dt).double().numpy()
    t[:len(t) // 10] = b[:len(t) // 10]  # some target values equal the base's (near-cancellations again)
    m = {"b": _save(root / "b", {"w": b}, dt), "f": _save(root / "f", {"w": f}, dt), "f2": _save(root / "f2", {"w": f2}, dt),
         "t": _save(root / "t", {"w": t}, dt)}
    r1 = deltaport.diff(m["b"], m["f"], root / "d1", chunk_elems=CHUNK, threads=2)
    r2 = deltaport.diff(m["b"], m["f2"], root / "d2", chunk_elems=CHUNK)
    return {"kind": kind, "fmt": fmt, "dt": dt, "root": root, "m": m, "b": b, "f": f, "f2": f2, "t": t, "r1": r1, "r2": r2}


def test_default_delta_round_trips_bit_for_bit(planted):
    p = planted
    r1 = p["r1"]
    assert r1.provenance["inexact_delta_elements"] == {}
    res = r1.provenance["exact_residual"]
    assert res["file"] == "delta-residual.safetensors" and res["tensors"]["w"] >= 5, res  # the planted cases at least
    assert (r1.output / "model.safetensors.index.json").exists()
    out = deltaport.apply(r1.output, p["m"]["b"], p["root"] / "back").output
    got, want = _bits(out, "w"), _bits(p["m"]["f"], "w")
    zero = p["f"] == 0
    assert np.array_equal(got[~zero], want[~zero])
    assert _is_zero(got[zero], p["fmt"]).all() and zero.sum() >= 4  # the sign of zero: see the module's text
    # the old encoding alone was not enough here: the float32/float64 Δ without its residual misses F
    stored = load_file(str(r1.output / "model.safetensors"))["w"].double().numpy()
    assert (stored + p["b"] != p["f"]).sum() >= 3


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_apply_to_another_target_uses_the_exact_delta(planted, lam):
    p = planted
    out = deltaport.apply(p["r1"].output, p["m"]["t"], p["root"] / f"t-{lam}", scale=lam, chunk_elems=CHUNK).output
    want = _expected(p["t"], [(lam, p["f"], p["b"])], p["fmt"])
    exact = np.array([float(Fraction(float(t)) + Fraction(lam) * (Fraction(float(f)) - Fraction(float(b))))
                      for t, f, b in zip(p["t"], p["f"], p["b"])])
    _check(_bits(out, "w"), want, exact, p["fmt"], f"apply λ={lam}")


def test_the_residual_is_read_in_one_pass_and_the_kernel_agrees_with_the_fallback(planted, monkeypatch):
    # found by benchmarks/transfer_bench.py: a Δ with a residual went through the kernel's mixed-dtype path, which
    # asked for the residual's chunk twice; the second request recounted the kept entries from element 0, so
    # an apply cost O(chunks²) (50 s for a 0.77 GB model against 3 s for a transfer)
    # (the kernel's path reads the residual with numpy since 2026-12-06, engine.fused._sparse_values, the
    # fallback with torch, engine.reads._packed: both are watched)
    import deltaport.engine.fused as fused_mod
    import deltaport.engine.reads as reads_mod

    p = planted
    unpacked, recounts = [], []
    real, real_np = reads_mod.unpack_bits, fused_mod._mask_bits
    monkeypatch.setattr(reads_mod, "unpack_bits", lambda bits, start, n: unpacked.append(n) or real(bits, start, n))
    monkeypatch.setattr(fused_mod, "_mask_bits", lambda bits, e0, n: unpacked.append(n) or real_np(bits, e0, n))
    monkeypatch.setattr(fused_mod, "_count_before", lambda bits, e0, cache: recounts.append(e0))
    fast = deltaport.apply(p["r1"].output, p["m"]["t"], p["root"] / "one-pass", scale=0.7, chunk_elems=CHUNK).output
    assert 0 < sum(unpacked) <= 2 * N and not recounts, unpacked  # each chunk's mask once, never a prefix recount
    unpacked.clear()
    monkeypatch.setenv("DELTAPORT_KERNEL", "torch")
    slow = deltaport.apply(p["r1"].output, p["m"]["t"], p["root"] / "one-pass-torch", scale=0.7, chunk_elems=CHUNK).output
    assert 0 < sum(unpacked) <= 2 * N, unpacked
    assert np.array_equal(_bits(fast, "w"), _bits(slow, "w"))


def test_composed_apply_uses_both_exact_deltas(planted):
    p = planted
    out = deltaport.apply([p["r1"].output, p["r2"].output], p["m"]["t"], p["root"] / "composed").output
    want = _expected(p["t"], [(1.0, p["f"], p["b"]), (1.0, p["f2"], p["b"])], p["fmt"])
    exact = p["t"] + (p["f"] - p["b"]) + (p["f2"] - p["b"])  # only its zeros are used
    _check(_bits(out, "w"), want, exact, p["fmt"], "composed apply")


def test_ties_uses_the_delta_with_its_residual(planted):
    """TIES of a Δ with a copy of itself (density 1: every entry kept, all agree) is the Δ itself: apply's
    output, for every element whose exact Δ fits in float64 (TIES adds the residual to it in float64)."""
    p = planted
    copy = p["root"] / "d1-copy"
    shutil.copytree(p["r1"].output, copy, dirs_exist_ok=True)
    ties = deltaport.apply([p["r1"].output, copy], p["m"]["t"], p["root"] / "ties", ties=1.0).output
    single = deltaport.apply(p["r1"].output, p["m"]["t"], p["root"] / "single").output
    fits = np.array([_fits_float64(Fraction(float(f)) - Fraction(float(b))) for f, b in zip(p["f"], p["b"])])
    assert fits[0]  # the SmolLM2 repro is among them
    a, b = _bits(ties, "w")[fits], _bits(single, "w")[fits]
    # the one tolerated difference: TIES's composed rounding may give -0.0 where the exact sum is zero
    # (numerics.round_composed_exactly copies the sign of its lower bracket; docs/FORMAT.md)
    assert np.array_equal(np.where(_is_zero(a, p["fmt"]), 0, a), np.where(_is_zero(b, p["fmt"]), 0, b))


def test_ties_bytes_do_not_depend_on_the_chunk(planted, monkeypatch):
    """The TIES thresholds' passes read through the composed chunks' buffers and residual cache, and a TIES
    apply streams chunks of its own default size (engine.TIES_CHUNK_ELEMS): the bytes are the same in one
    chunk and in chunks that end inside the planted runs, with the thresholds' final gather as well."""
    import deltaport.engine.compose as compose_mod

    p = planted
    ds = [p["r1"].output, p["r2"].output]
    whole = deltaport.apply(ds, p["m"]["t"], p["root"] / "ties-whole", scale=[0.7, 0.3], ties=0.3).output
    monkeypatch.setattr(compose_mod, "TIES_GATHER", 50)
    chunked = deltaport.apply(ds, p["m"]["t"], p["root"] / "ties-chunked", scale=[0.7, 0.3], ties=0.3,
                              chunk_elems=CHUNK).output
    assert np.array_equal(_bits(whole, "w"), _bits(chunked, "w"))


def test_explicit_lossy_dtype_counts_what_it_loses(planted, tmp_path):
    """--delta-dtype float32 is taken as asked: no residual, and the elements where base + Δ does not round
    back to F are counted in inexact_delta_elements (as before)."""
    p = planted
    r = deltaport.diff(p["m"]["b"], p["m"]["f"], tmp_path / "lossy", delta_dtype="float32")
    assert "exact_residual" not in r.provenance and not (r.output / "delta-residual.safetensors").exists()
    stored = load_file(str(r.output / "model.safetensors"))["w"].double().numpy()
    back = torch.from_numpy(stored + p["b"]).to(p["dt"]).double().numpy()  # (double rounding is fine for a count floor)
    assert r.provenance["inexact_delta_elements"].get("w", 0) >= 1 and (back != p["f"]).sum() >= 1


def test_delta_without_residual_keeps_its_layout(tmp_path):
    """Ordinary values: no residual, one model.safetensors, no index, no record (bytes as before)."""
    g = np.random.default_rng(5)
    b = torch.from_numpy(g.standard_normal(500)).to(torch.bfloat16).double().numpy()
    f = torch.from_numpy(b + g.standard_normal(500) * 1e-2).to(torch.bfloat16).double().numpy()
    r = deltaport.diff(_save(tmp_path / "b", {"w": b}, torch.bfloat16), _save(tmp_path / "f", {"w": f}, torch.bfloat16),
                       tmp_path / "d")
    assert sorted(x.name for x in r.output.glob("*.safetensors*")) == ["model.safetensors"]
    assert "exact_residual" not in r.provenance


def test_compress_keeps_the_residual_of_exact_tensors_and_adds_it_to_compressed_ones(tmp_path):
    """compress: a tensor kept exact keeps its residual (apply gives the same bytes as the uncompressed Δ);
    a compressed one is compressed from Δ + residual; decompress keeps the residual too."""
    b, f = _planted("bf16", 0)
    names = {"model.layers.0.mlp.down_proj.weight": (50, 60), "model.norm.weight": (N,)}
    bt = {n: b[: int(np.prod(s))].reshape(s) for n, s in names.items()}
    ft = {n: f[: int(np.prod(s))].reshape(s) for n, s in names.items()}
    mb, mf = _save(tmp_path / "b", bt, torch.bfloat16), _save(tmp_path / "f", ft, torch.bfloat16)
    d = deltaport.diff(mb, mf, tmp_path / "d").output
    rec = json.loads((d / "deltaport.json").read_text())["exact_residual"]["tensors"]
    assert set(rec) == set(names)
    comp = deltaport.compress(d, tmp_path / "c", method="sparse", density=1.0)
    assert comp["tensors"]["model.norm.weight"]["method"] == "exact"
    prov = json.loads((tmp_path / "c" / "deltaport.json").read_text())
    assert set(prov["exact_residual"]["tensors"]) == {"model.norm.weight"}
    a1 = deltaport.apply(d, mb, tmp_path / "a1").output
    a2 = deltaport.apply(tmp_path / "c", mb, tmp_path / "a2").output
    for n in names:  # the uncompressed Δ with its residuals gives F back (no −0.0 planted in these rows? zeros aside)
        got, want = _bits(a1, n), _bits(mf, n)
        assert np.array_equal(got[want != -(1 << 15)], want[want != -(1 << 15)]), n
    norm = "model.norm.weight"
    assert np.array_equal(_bits(a2, norm), _bits(a1, norm))
    back = deltaport.compression.decompress(tmp_path / "c", tmp_path / "dd")
    a3 = deltaport.apply(back, mb, tmp_path / "a3").output
    assert np.array_equal(_bits(a3, norm), _bits(a1, norm))


def _fits_float64(x: Fraction) -> bool:
    return Fraction(float(x)) == x


def _check(got: np.ndarray, want: np.ndarray, exact: np.ndarray, fmt: str, what: str) -> None:
    zero = exact == 0
    bad = np.flatnonzero((got != want) & ~(zero & _is_zero(got, fmt) & _is_zero(want, fmt)))
    assert not bad.size, f"{what}: {bad.size} element(s) differ from the exact result, first at {bad[:5].tolist()}"


def _is_zero(bits: np.ndarray, fmt: str) -> np.ndarray:
    """A zero of either sign: bits 0, or the sign bit alone (as the signed integers _bits returns)."""
    return np.isin(bits, (0, -(1 << (15 if fmt in ("BF16", "F16") else 31))))


def test_a_delta_with_its_residual_is_byte_identical_across_processes(planted, tmp_path):
    """Two processes diffing the same pair write the same bytes, the residual file included (safetensors
    serialises a metadata map of two keys in a per-process random order: the file keeps one key)."""
    import hashlib
    import subprocess
    import sys

    p = planted
    digests = []
    for i in range(5):  # with two metadata keys, five processes agree by chance 1 time in 16
        out = tmp_path / f"d{i}"
        subprocess.run([sys.executable, "-c", "import sys, deltaport; deltaport.diff(*sys.argv[1:])", str(p["m"]["b"]),
                        str(p["m"]["f"]), str(out)], check=True, capture_output=True)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
                        if f.suffix in (".safetensors", ".json") and f.name != "deltaport.json"})
    assert "delta-residual.safetensors" in digests[0]
    assert all(d == digests[0] for d in digests)
