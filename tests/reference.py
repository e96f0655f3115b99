"""A slow, independent float64 reference for deltaport's arithmetic, for the tests only.

It shares no code with the library: it parses safetensors files itself (8-byte header length, JSON
header, raw little-endian bytes), decodes bf16/fp16/fp32 with numpy bit operations, computes
``T + λ·(F − B)`` (or ``T + λ·scaling·B@A`` for a LoRA adapter) in float64, and rounds each result
once to the output format with its own integer round-to-nearest-even (:func:`round_bits`, itself
checked against :class:`fractions.Fraction` in ``test_reference.py``). λ is its float64 value and every
element is the format's value nearest the *exact* ``T + λ·(F − B)``: where the float64 result lies too
near a rounding boundary to tell, :func:`round_transfer` decides from :class:`fractions.Fraction`. Nothing here imports
``deltaport``, and nothing here uses torch.

The semantics written down here are the documented ones:

* a tensor not selected by include/exclude, or with λ = 0, is the target's bytes;
* λ comes from the first scale-map regex that matches the name (``re.search``), else the scale;
* a missing ``lm_head.weight`` of a tied source stands for its ``embed_tokens.weight`` (Δ used once);
* vocabulary ``pad``: every input is zero-padded to the largest row count;
* vocabulary ``align``: target row j (token string s) gets ``T[j] + λ·(F[f(s)] − B[b(s)])`` when s has
  a row in both the fine-tune's and the base's vocabulary (each looked up in its *own* tokenizer);
  otherwise it keeps ``T[j]`` (no Δ is defined); rows no target token maps to (padding) keep ``T[j]``;
  this holds whenever the three vocabularies differ, also at equal row counts (one shared vocabulary
  with equal shapes is positional, padding rows included);
* LoRA: Δ = scaling · B @ A with scaling = α/r (α/√r with rsLoRA); modules it does not adapt are copied.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# name: (precision p incl. the implicit bit, minimum normal exponent, exponent bias, exponent bits, storage)
FORMATS = {
    "BF16": (8, -126, 127, 8, np.uint16),
    "F16": (11, -14, 15, 5, np.uint16),
    "F32": (24, -126, 127, 8, np.uint32),
}
_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


# --------------------------------------------------------------------------------------------------
# rounding float64 -> 16/32-bit, once, by integer arithmetic on the float64 bit pattern


def round_bits(x: np.ndarray, fmt: str) -> np.ndarray:
    """Bit patterns of the ``fmt`` values nearest to the float64 values ``x`` (ties to even).

    Results in ``fmt``'s normal range (most elements) take the short path: round the float64 bit
    pattern itself to p significant bits with the integer round-half-even ``(mag + half − 1 + lsb) >> s``
    (a carry moves into the exponent field, as it should) and re-bias the exponent. Everything else
    (zeros, subnormal results, inf, NaN) takes :func:`_round_bits_general`."""
    p, emin, bias, ebits, store = FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    b = x.view(np.uint64)
    e = (b >> np.uint64(52)) & np.uint64(0x7FF)
    normal = (e >= np.uint64(1023 + emin)) & (e <= np.uint64(1023 + (1 << ebits) - 2 - bias))
    s = np.uint64(53 - p)
    mag = b & np.uint64((1 << 63) - 1)
    lsb = (mag >> s) & np.uint64(1)
    mag += np.uint64((1 << (53 - p - 1)) - 1)
    mag += lsb
    mag >>= s
    mag -= np.uint64((1023 - bias) << (p - 1))  # re-bias: float64 exponent field -> fmt's (in range here)
    mag |= (b >> np.uint64(63)) << np.uint64(width - 1)
    out = mag.astype(store)
    if not normal.all():
        rest = ~normal
        out[rest] = _round_bits_general(x[rest], fmt)
    return out


def _round_bits_general(x: np.ndarray, fmt: str) -> np.ndarray:
    """:func:`round_bits` for any float64 values, by the significand and a per-element shift.

    Works on |x| = M·2^(e−1075) (M the 53-bit significand): the result's unit in the last place is
    2^u with u = max(E − (p−1), emin − (p−1)); N = M >> s counts those units, the dropped bits decide
    the rounding. IEEE encodings are monotone in the magnitude, so the bit pattern of N·2^u is
    ((u + p − 1 + bias) << (p−1)) + N − 2^(p−1), which also covers subnormals (u at its floor) and the
    carry into the next binade (N = 2^p); anything at or past the all-ones exponent is infinity."""
    p, emin, bias, ebits, store = FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    x = np.ascontiguousarray(x, dtype=np.float64)
    b = x.view(np.uint64)
    sign = (b >> np.uint64(63)).astype(np.uint64)
    e = ((b >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    frac = b & np.uint64((1 << 52) - 1)
    m = np.where(e > 0, frac | np.uint64(1 << 52), frac)
    e_eff = np.maximum(e, 1)
    big_e = e_eff - 1023
    u = np.maximum(big_e - (p - 1), emin - (p - 1))
    s = np.minimum(u - (e_eff - 1075), 63).astype(np.uint64)  # >= 53 - p > 0
    n = m >> s
    rem = m & ((np.uint64(1) << s) - np.uint64(1))
    half = np.uint64(1) << (s - np.uint64(1))
    up = (rem > half) | ((rem == half) & ((n & np.uint64(1)) == 1))
    n = n + up.astype(np.uint64)
    enc = ((u + (p - 1) + bias).astype(np.int64) << (p - 1)) + n.astype(np.int64) - (1 << (p - 1))
    inf = ((1 << ebits) - 1) << (p - 1)
    enc = np.where(n == 0, 0, np.minimum(enc, inf))
    enc = np.where(e == 0x7FF, np.where(frac == 0, inf, inf | (1 << (p - 2))), enc)  # inf, quiet NaN
    enc = enc.astype(np.uint64) | (sign << np.uint64(width - 1))
    return enc.astype(store)


def decode(bits: np.ndarray, fmt: str) -> np.ndarray:
    """float64 values of ``fmt`` bit patterns (exact: every bf16/fp16/fp32 value is a float64)."""
    if fmt == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if fmt == "F16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    if fmt == "F32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    if fmt == "F64":
        return bits.view(np.float64).copy()
    raise ValueError(fmt)


def exact_value(bit: int, fmt: str) -> Fraction | None:
    """The exact rational value of one finite bit pattern (None for inf/NaN), from the IEEE fields."""
    p, emin, bias, ebits, store = FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    sign = -1 if bit >> (width - 1) else 1
    e = (bit >> (p - 1)) & ((1 << ebits) - 1)
    f = bit & ((1 << (p - 1)) - 1)
    if e == (1 << ebits) - 1:
        return None
    if e == 0:
        return sign * Fraction(f) * Fraction(2) ** (emin - (p - 1))
    return sign * Fraction(f + (1 << (p - 1))) * Fraction(2) ** (e - bias - (p - 1))


def round_transfer(t: np.ndarray, f: np.ndarray, b: np.ndarray, lam: float, fmt: str) -> np.ndarray:
    """Bits of the ``fmt`` values nearest the exact ``t + lam·(f − b)`` (float64 arrays of one shape).

    The float64 result s is within 2⁻⁴⁸·(|t| + |lam·(f − b)|) of the exact value x (a few roundings of
    2⁻⁵³ each); where s minus and plus that bound round alike, so does x. Elsewhere x is formed from
    :class:`Fraction` and compared with the two candidates' exact values (ties to the even pattern)."""
    t, f, b = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (t, f, b))
    d = (f - b) if lam == 1.0 else (f - b) * lam
    s = t + d
    out = round_bits(s, fmt)
    if lam == 1.0 or (lam != 0.0 and math.isfinite(lam) and math.frexp(abs(lam))[0] == 0.5):
        return out  # a power of two: λ·(f − b) is exact, the float64 sum is for 16-bit inputs
    with np.errstate(invalid="ignore", over="ignore"):
        e = (np.abs(t) + np.abs(d)) * 2.0 ** -48
        lo, hi = round_bits(s - e, fmt), round_bits(s + e, fmt)
        near = np.nonzero((decode(lo, fmt) != decode(hi, fmt)) & np.isfinite(s))[0]
    if not near.size:
        return out
    p, emin, bias, ebits, store = FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    lo, hi = lo[near].astype(np.int64), hi[near].astype(np.int64)
    vlo, vhi = decode(lo.astype(store), fmt), decode(hi.astype(store), fmt)
    mags = (1 << (width - 1)) - 1
    adjacent = ((lo >> (width - 1)) == (hi >> (width - 1))) & (np.abs((lo & mags) - (hi & mags)) == 1) \
        & np.isfinite(vlo) & np.isfinite(vhi)
    mid = (vlo + vhi) / 2  # exact: two neighbouring values of at most 24 bits
    ln, ld = float(lam).as_integer_ratio()
    for i, j in enumerate(near.tolist()):
        if not adjacent[i]:
            out[j] = nearest_bits(Fraction(float(t[j])) + Fraction(lam) * (Fraction(float(f[j])) - Fraction(float(b[j]))), fmt)
            continue
        # sign of x − M = t − M + lam·(f − b), all dyadic: integers over one power-of-two denominator
        (tn, td), (mn, md), (fn, fd), (bn, bd) = (float(v).as_integer_ratio() for v in (t[j], mid[i], f[j], b[j]))
        den = max(td, md, ld * fd, ld * bd)
        num = tn * (den // td) - mn * (den // md) + ln * (fn * (den // (ld * fd)) - bn * (den // (ld * bd)))
        lo_j, hi_j = store(lo[i]), store(hi[i])
        out[j] = hi_j if num > 0 else lo_j if num < 0 else (lo_j if int(lo[i]) % 2 == 0 else hi_j)
    return out


def nearest_bits(x: Fraction, fmt: str) -> int:
    """Bit pattern of the ``fmt`` value nearest the rational ``x`` (ties to the even pattern; overflow to inf).
    ``float(x)`` is within half a float64 step of x, so :func:`round_bits` of it is the answer or a neighbour:
    the three are compared by their exact distance to x."""
    p, emin, bias, ebits, store = FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    g = int(round_bits(np.array([float(x)]), fmt)[0])
    sign, mag = g & (1 << (width - 1)), g & ((1 << (width - 1)) - 1)
    inf = ((1 << ebits) - 1) << (p - 1)
    best = None
    for m in (mag - 1, mag, mag + 1):
        if m < 0 or m > inf:
            continue
        v = exact_value(sign | m, fmt)
        if v is None:  # inf: the answer when |x| is at least max + half a step
            top = exact_value(m - 1, fmt)
            if abs(x) >= top + (top - exact_value(m - 2, fmt)) / 2:
                return sign | m
            continue
        key = (abs(v - x), m & 1)
        if best is None or key < best[0]:
            best = (key, sign | m)
    return best[1]


# --------------------------------------------------------------------------------------------------
# reading safetensors without the safetensors library


@dataclass
class _Spec:
    path: Path
    fmt: str
    shape: tuple[int, ...]
    start: int
    end: int


class Ckpt:
    """The tensors of a safetensors checkpoint directory (all ``*.safetensors`` files), read lazily."""

    def __init__(self, d: str | Path, pattern: str = "*.safetensors"):
        self.dir = Path(d)
        self.specs: dict[str, _Spec] = {}
        for f in sorted(self.dir.glob(pattern)):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                a, z = h["data_offsets"]
                self.specs[name] = _Spec(f, h["dtype"], tuple(h["shape"]), 8 + n + a, 8 + n + z)
        cfg = self.dir / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.exists() else {}
        ad = self.dir / "adapter_config.json"
        self.adapter = json.loads(ad.read_text()) if ad.exists() else None

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def names(self) -> list[str]:
        return list(self.specs)

    def fmt(self, name: str) -> str:
        return self.specs[name].fmt

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name].shape

    def bits(self, name: str) -> np.ndarray:
        s = self.specs[name]
        store = {2: np.uint16, 4: np.uint32, 8: np.uint64}[_ST_ITEMSIZE[s.fmt]]
        n = (s.end - s.start) // np.dtype(store).itemsize
        if n == 0:
            return np.zeros(s.shape, dtype=store)
        return np.memmap(s.path, dtype=store, mode="r", offset=s.start, shape=(n,)).reshape(s.shape)

    def f64(self, name: str) -> np.ndarray:
        return decode(self.bits(name), self.fmt(name)).reshape(self.shape(name))

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


# --------------------------------------------------------------------------------------------------
# the operations


_BLOCK = 1 << 18


def _blocked(fn, inputs, fmt: str, shape, rounded: bool = False) -> np.ndarray:
    """``round_bits(fn(*decoded inputs), fmt)`` (``fn(...)`` itself when it returns bits: ``rounded``) over
    the flattened tensors, a block at a time (small arrays stay in cache; a 28M-element tensor in float64
    all at once is slow on page faults alone)."""
    srcs = [(ck.bits(n).reshape(-1), ck.fmt(n)) for ck, n in inputs]
    total = srcs[0][0].size
    out = np.empty(total, dtype=FORMATS[fmt][4])
    for i in range(0, total, _BLOCK):
        vals = [decode(np.asarray(b[i:i + _BLOCK]), f) for b, f in srcs]
        out[i:i + _BLOCK] = fn(*vals) if rounded else round_bits(fn(*vals), fmt)
    return out.reshape(shape)


def _first_scale(name: str, scale: float, scale_map) -> float:
    for pat, val in (scale_map.items() if isinstance(scale_map, dict) else (scale_map or [])):
        if re.search(pat, name):
            return float(val)
    return float(scale)


def _selected(name: str, include, exclude) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in (exclude or []))


def _src_name(ck: Ckpt, name: str) -> str | None:
    if name in ck:
        return name
    if re.search(r"(^|\.)lm_head\.weight$", name) and ck.tied:
        emb = [n for n in ck.names() if re.search(r"(^|\.)embed_tokens\.weight$", n)]
        return emb[0] if emb else None
    return None


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), dtype=np.float64)
    out[: x.shape[0]] = x
    return out


def pad_bits(bits: np.ndarray, rows: int) -> np.ndarray:
    """Bit patterns padded with +0.0 rows to ``rows`` rows."""
    if bits.shape[0] == rows:
        return bits
    out = np.zeros((rows, *bits.shape[1:]), dtype=bits.dtype)
    out[: bits.shape[0]] = bits
    return out


def lora_scaling(adapter_config: dict) -> float:
    r = adapter_config.get("r", 8)
    alpha = adapter_config.get("lora_alpha", r)
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def lora_modules(adapter: Ckpt) -> dict[str, tuple[str, str]]:
    """Target weight name -> (lora_A name, lora_B name) of a PEFT adapter."""
    out: dict[str, dict[str, str]] = {}
    for n in adapter.names():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$", n)
        if m:
            out.setdefault(m.group(1) + ".weight", {})[m.group(2)] = n
    return {k: (v["A"], v["B"]) for k, v in out.items()}


def transfer_tensor(name: str, sb: Ckpt, sf: Ckpt, tb: Ckpt, *, scale: float = 1.0, scale_map=None,
                    include=(), exclude=(), vocab: str | None = None, vocabs: tuple | None = None,
                    out_fmt: str | None = None) -> np.ndarray:
    """Bits of output tensor ``name`` of ``transfer(sb, sf, tb)`` (``sf`` may be a LoRA adapter).

    ``vocabs`` (align only): (base vocab, fine-tune vocab, target vocab), each token string -> id."""
    fmt = out_fmt or tb.fmt(name)
    if not _selected(name, include, exclude):
        return tb.bits(name) if fmt == tb.fmt(name) else round_bits(tb.f64(name), fmt)
    lam = _first_scale(name, scale, scale_map)
    t = tb.f64(name)
    if sf.adapter is not None:
        mods = lora_modules(sf)
        if name not in mods or lam == 0.0:
            return tb.bits(name)
        a_name, b_name = mods[name]
        d = (sf.f64(b_name) @ sf.f64(a_name)) * lora_scaling(sf.adapter)
        return round_transfer(t, d, np.zeros_like(d), lam, fmt).reshape(t.shape)
    fa, ba = _src_name(sf, name), _src_name(sb, name)
    if sf.shape(fa) == sb.shape(ba) == tb.shape(name) and vocab != "align":  # the common case, block by block
        if lam == 0.0:
            return tb.bits(name)
        return _blocked(lambda fb, bb, tbk: round_transfer(tbk, fb, bb, lam, fmt),
                        [(sf, fa), (sb, ba), (tb, name)], fmt, tb.shape(name), rounded=True)
    f, b = sf.f64(fa), sb.f64(ba)
    if lam == 0.0:  # a copy of the target (padded with zero rows under vocab pad)
        rows = max(f.shape[0], b.shape[0], t.shape[0]) if vocab == "pad" else t.shape[0] if t.ndim else None
        return tb.bits(name) if rows is None else pad_bits(tb.bits(name), rows)
    if f.shape == b.shape == t.shape and (vocab != "align" or vocabs[0] == vocabs[1] == vocabs[2]):
        pass  # align with one shared vocabulary: row i is the same token everywhere (padding rows too)
    elif vocab == "pad":
        rows = max(f.shape[0], b.shape[0], t.shape[0])
        f, b, t = _pad_rows(f, rows), _pad_rows(b, rows), _pad_rows(t, rows)
    elif vocab == "align":
        vb, vf, vt = vocabs
        fa_rows, ba_rows = np.zeros_like(t), np.zeros_like(t)
        mask = np.zeros(t.shape[0], dtype=bool)
        for tok, j in vt.items():
            i_f, i_b = vf.get(tok), vb.get(tok)
            if j < t.shape[0] and i_f is not None and i_b is not None and i_f < f.shape[0] and i_b < b.shape[0]:
                fa_rows[j], ba_rows[j] = f[i_f], b[i_b]
                mask[j] = True
        out = round_transfer(t, fa_rows, ba_rows, lam, fmt).reshape(t.shape)
        out[~mask] = round_bits(t[~mask], fmt).reshape(t[~mask].shape)  # rows without a Δ keep the target's value (also its sign of zero)
        return out
    else:
        raise ValueError(f"{name}: shapes differ and no vocabulary policy given")
    return round_transfer(t, f, b, lam, fmt).reshape(t.shape)


def transfer(sb: Ckpt, sf: Ckpt, tb: Ckpt, **kw) -> dict[str, np.ndarray]:
    """Every output tensor of the transfer (names: the target's), as bit patterns."""
    return {n: transfer_tensor(n, sb, sf, tb, **kw) for n in tb.names()}


def diff_tensor(name: str, base: Ckpt, ft: Ckpt, delta_fmt: str = "F32") -> np.ndarray:
    """Bits of Δ = F − B, rounded once to ``delta_fmt`` (float32 is exact for bf16/fp16 pairs of
    nearby values)."""
    return round_bits(ft.f64(name) - base.f64(_src_name(base, name)), delta_fmt).reshape(ft.shape(name))
