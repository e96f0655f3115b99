"""The arithmetic of a transfer, rounded once, correctly: pure functions on tensors, which the engine calls
chunk by chunk and ``check`` on whole tensors.

* :func:`transfer_into` — the transfer formula t + λ·(f − b), every element the value of the output dtype
  nearest the exact result (λ: its float64 value);
* :func:`compose_deltas`, :func:`ties_threshold`, :func:`round_composed_exactly` — a composed apply's sum
  Σ λ_i·Δ_i (or TIES merge) and its exact rounding;
* :func:`rounding_brackets`, :func:`decide_exactly` — shared by both: find the elements whose float64 result
  lies too near a rounding boundary to tell, and decide those from the exact value (error-free products,
  Shewchuk's expansion sign; :class:`fractions.Fraction` for the rest);
* :func:`round_into` / :func:`round_to` — one rounding float64 → 16-bit (below), :func:`round_fraction`.

Rounding float64 results once, correctly, to a 16-bit float:

``torch`` converts float64 → bfloat16/float16 through float32, which rounds twice: a float64 value just
above a 16-bit midpoint can first round *onto* the midpoint in float32, and then round-to-even goes the
wrong way (``1 + 2**-8 + 2**-30`` → 1.0 in bf16; the nearest bf16 is 1.0078125). At ``--scale 0.7`` on
bf16 Llama weights that hits ~2 in 10,000 elements. deltaport promises one rounding of ``T + λ·Δ``, so
:func:`round_into` first rounds the float64 value to float32 precision *to odd* (truncate, then set the
last kept bit if anything was dropped: "jamming"), which makes the float32 step exact, and then lets
torch round float32 → 16-bit to nearest even. Round-to-odd followed by round-to-nearest is exact when
the intermediate format has at least two more significand bits than the final one (Boldo & Melquiond,
"When double rounding is odd", 2005): float32 has 24, bfloat16 8, float16 11.

It works on the float64 bit pattern with four integer operations, in place. Below float32's normal
range (|x| < 2**-126, where bfloat16 has subnormals) float32 has fewer than 24 significand bits, so the
float64 → float32 step would round at a coarser bit than the jam set and lose the sticky bit (rounding
twice again). For bfloat16 the float32 step is therefore done into a buffer, and the elements whose
float32 value is a nonzero subnormal are redone from the jammed float64 value, which is that value
rounded to odd at 24 bits, by rounding it straight to a multiple of bfloat16's subnormal step 2**-133 in
float64 (one rounding; Boldo & Melquiond again, with 16 bits to
spare). A float32 zero needs no redo (it comes from |x| <= 2**-150, whose nearest bfloat16 is zero), nor
does a normal float32 (that step was exact). Finding them costs two integer passes over the float32
values and a reduction; exact zeros, common in outputs, do not trigger the (slow, gathering) redo. float16 needs no such
step: its subnormals (>= 2**-24) lie far above float32's.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

_DROPPED = (1 << 29) - 1  # float64 significand bits below float32's last one (bit 29)
_SIXTEEN = (torch.bfloat16, torch.float16)
_F32_MIN_NORMAL = 0x7FFFFF  # bit pattern of 2**-126 in float32, less one: the largest subnormal


def jam_to_float32(acc: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """Round a float64 tensor, in place, to float32 precision by round-to-odd (exactly representable after)."""
    bits = acc.view(torch.int64)
    low = torch.empty_like(bits) if scratch is None else scratch[: bits.numel()].view(bits.shape)
    torch.bitwise_and(bits, _DROPPED, out=low)
    low.add_(_DROPPED)  # bit 29 set iff a dropped bit was set (the sticky bit)
    bits.bitwise_or_(low)  # last kept bit |= sticky
    bits.bitwise_and_(~_DROPPED)  # dropped bits cleared: the float32 conversion is exact (and ±inf stays ±inf:
    # leaving junk there made the significand of an infinity nonzero, i.e. a NaN)


def round_into(out: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``out.copy_(acc)`` with a single round-to-nearest-even. **Modifies ``acc``** when it is float64
    and ``out`` is 16-bit (pass a copy to keep it). ``scratch``: optional int64 buffer to reuse."""
    if acc.dtype == torch.float64 and out.dtype in _SIXTEEN:
        jam_to_float32(acc, scratch)
        if out.dtype == torch.float16:
            out.copy_(acc)
            return
        n = acc.numel()
        if scratch is None or scratch.numel() < n:
            scratch = torch.empty(n, dtype=torch.int64)
        two = scratch.reshape(-1)[:n].view(torch.int32)  # 2n int32: the float32 value, then a key
        s32 = two[:n].view(torch.float32)
        s32.copy_(acc.reshape(-1))  # exact: acc has float32 precision now, except below 2**-126
        out.copy_(s32.view(out.shape))
        # key = (bits - 1) without the sign bit: |s32| - 1 for every nonzero value, 0x7FFFFFFF for +-0;
        # below 0x7FFFFF iff s32 is a nonzero float32 subnormal
        key = two[n:]
        torch.sub(two[:n], 1, out=key)
        key.bitwise_and_(0x7FFFFFFF)
        if n and int(key.min()) < _F32_MIN_NORMAL:
            _redo_bf16_tiny(out, acc, key)
        return
    out.copy_(acc)


def _redo_bf16_tiny(out: torch.Tensor, jammed: torch.Tensor, key: torch.Tensor) -> None:
    """Round again, straight from ``jammed`` (float64, rounded to odd at 24 bits), the elements of the
    bfloat16 ``out`` whose float32 intermediate was a nonzero subnormal (``key`` below 0x7FFFFF): there
    the float32 step rounded at a coarser bit than the jam (see the module's text). A float32 zero comes
    from |x| <= 2**-150 and a normal float32 from an exact step, so both are right already."""
    idx = torch.nonzero(key < _F32_MIN_NORMAL).squeeze(1)
    o = out.reshape(-1).view(torch.int16)
    x = (jammed.reshape(-1).view(torch.int64)[idx] & ~_DROPPED).view(torch.float64)  # the jam left junk below bit 29
    # x * 2**133 is exact and below 2**7 here; torch.round is round-half-to-even and keeps the sign of zero
    r = torch.round(x * 2.0 ** 133) * 2.0 ** -133
    o[idx] = r.to(torch.bfloat16).view(torch.int16)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` rounded once (see :func:`round_into`); ``x`` is left unchanged."""
    out = torch.empty(x.shape, dtype=dtype)
    round_into(out, x.clone() if x.dtype == torch.float64 else x)
    return out


def transfer_into(out: torch.Tensor, target: torch.Tensor | None, plus: torch.Tensor, minus: torch.Tensor | None = None,
                  scale: float = 1.0, *, scratch: torch.Tensor | None = None, buf=None) -> int:
    """The transfer formula: ``out ← t + λ·(f − b)``, rounded once into ``out``'s dtype.

    ``target`` (t; None for no target: the Δ itself), ``plus`` (f) and ``minus`` (b; None when ``plus`` is
    already the Δ) are flat tensors of one compute dtype and of ``out``'s size. λ is taken as its float64
    value. With a float64 compute dtype every element is the value of ``out``'s dtype nearest the exact
    t + λ·(f − b):

    * λ = 1, λ = −1 and every other power of two (and a float64 ``out``): the float64 sum is exact for
      16-bit inputs, so it is rounded once by :func:`round_into` (the fast path);
    * any other λ: λ·(f − b) is not exact in float64, and its rounding can move the sum across a rounding
      boundary of ``out``'s dtype. The float64 sum s lies within 8·2⁻⁵³·(|t| + |λ·(f − b)|) of the exact
      value, so only the elements where s minus and plus that bound round differently (:func:`rounding_brackets`;
      on 16-bit weights about one in 10⁵) are decided from the exact value (:func:`decide_exactly`, the
      composed apply's machinery with the terms t, λ·f and −λ·b).

    On the fast path ``plus`` and ``target`` are **overwritten** (the caller's scratch: the engine passes reused
    chunk buffers, ``check`` whole-tensor copies); the exact path leaves the inputs as they are and takes its
    working tensors from ``buf(key, n, dtype)`` (default: new tensors). ``scratch``: an optional int64 buffer
    for the rounding. Returns the number of elements decided exactly."""
    if not _needs_exact_decisions(scale, plus.dtype, out.dtype):
        d = plus
        if minus is not None:
            d.sub_(minus)
        if scale != 1.0:
            d.mul_(scale)
        acc = d
        if target is not None:
            acc = target.add_(d)
        round_into(out, acc, scratch)
        return 0
    buf = buf or _new_buffer
    n = plus.numel()
    delta, product = plus, buf("transfer:p", n, torch.float64)
    if minus is not None:
        delta = torch.sub(plus, minus, out=buf("transfer:d", n, torch.float64))
    torch.mul(delta, scale, out=product)
    if target is None:
        target = torch.zeros_like(product)
    s = buf("transfer:s", n, torch.float64)
    torch.add(target, product, out=s)
    err = buf("transfer:err", n, torch.float64)
    torch.abs(target, out=err)
    err.add_(product.abs_()).mul_(8 * 2.0 ** -53)
    lo, hi = rounding_brackets(s, err, out.dtype, buf)
    idx = torch.nonzero(lo != hi).flatten()
    round_into(out, s, scratch)
    idx = idx[torch.isfinite(s[idx])]  # NaN/Inf keep the plain result (reported by the caller)
    if len(idx):
        values, scales = [delta], [scale]
        if minus is not None:  # f − b is exact in float64 nearly always; the terms λ·f and −λ·b otherwise
            f, b, d = plus[idx], minus[idx], delta[idx]
            back = d - f
            if not bool((((f - (d - back)) + (-b - back)) == 0).all()):  # Knuth's TwoSum: the error of f − b
                values, scales = [plus, minus], [scale, -scale]
        decide_exactly(out, idx, lo, hi, target, values, scales)
    return len(idx)


def _needs_exact_decisions(scale: float, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """True when λ·(f − b) is not exact in float64 and the result is rounded to a narrower float: λ not a
    power of two (λ = 0 is a copy), float64 arithmetic, a 16- or 32-bit float output."""
    return (compute_dtype == torch.float64 and out_dtype in (torch.bfloat16, torch.float16, torch.float32)
            and scale != 0.0 and math.isfinite(scale) and math.frexp(abs(scale))[0] != 0.5)


_FORMATS = {torch.float32: (24, -126, 128), torch.bfloat16: (8, -126, 128), torch.float16: (11, -14, 16),
            torch.float64: (53, -1022, 1024)}  # significand bits, min normal exponent, overflow exponent


def round_fraction(x, dtype: torch.dtype) -> float:
    """The value of ``dtype`` nearest the exact rational ``x`` (ties to even; overflow to ±inf), as a float."""
    p, emin, emax = _FORMATS[dtype]
    if x == 0:
        return 0.0
    a = abs(Fraction(x))
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # now 2**e <= a < 2**(e+1)
    q = Fraction(2) ** (max(e, emin) - (p - 1))  # the spacing of dtype's values around a
    m = a / q
    k = m.numerator // m.denominator
    rest = m - k
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and k % 2 == 1):
        k += 1
    v = k * q
    if v >= Fraction(2) ** emax:
        v = float("inf")
    else:
        v = float(v)  # exact: at most p significant bits
    return v if x > 0 else -v


_SPLITTER = 134217729.0  # 2**27 + 1 (Veltkamp)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Veltkamp's split of float64 ``x`` into ``hi + lo`` (exactly), each with at most 26 significant bits,
    so the product of two halves is exact in float64."""
    c = x * _SPLITTER
    hi = c - (c - x)
    return hi, x - hi


def exact_product_terms(lam: float, v: torch.Tensor) -> list[torch.Tensor]:
    """Four float64 tensors whose exact sum is ``lam·v`` (Dekker's product by halves; no underflow assumed)."""
    lh, ll = (float(t) for t in split(torch.tensor([lam], dtype=torch.float64)))
    vh, vl = split(v)
    return [vh * lh, vl * lh, vh * ll, vl * ll]


def sign_of_exact_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """The sign (−1, 0, 1) of the exact sum of float64 tensors, element-wise.

    Shewchuk's Grow-Expansion (1997) adds each term into a nonoverlapping expansion with TwoSum (no
    rounding error is lost); the sign of a nonoverlapping expansion is that of its largest nonzero part."""
    comps: list[torch.Tensor] = []
    for x in terms:
        q, new = x, []
        for c in comps:
            s = q + c
            bv = s - q
            new.append((q - (s - bv)) + (c - bv))
            q = s
        new.append(q)
        comps = new
    sign = torch.zeros_like(terms[0])
    for c in reversed(comps):
        sign = torch.where(sign == 0, torch.sign(c), sign)
    return sign


# --------------------------------------------------------------------------------------------------
# exact decisions where float64 cannot tell which way a sum rounds

def _new_buffer(key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, dtype=dtype)


def ties_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """TIES trim of one Δ: the k-th largest of its magnitudes (k = ⌈density·N⌉); entries at least that
    large are kept (0.0 when every entry is kept)."""
    numel = magnitudes.numel()
    k = max(1, math.ceil(density * numel))
    return float(torch.kthvalue(magnitudes, numel - k + 1).values) if k < numel else 0.0


def compose_deltas(values: list[torch.Tensor], scales: list[float], ties_thresholds: list[float] | None = None,
                   buf=_new_buffer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """d = Σ_i λ_i·Δ_i (or, with ``ties_thresholds``, the TIES merge of the λ_i·Δ_i) in float64, elementwise.

    ``values``: the Δ_i as float64 tensors of one shape (flat); ``buf(key, n, dtype)``: where the results go
    (the engine passes its reused chunk buffers). Returns ``(d, mag, unsure)``: ``mag`` = Σ|λ_i·Δ_i| (kept),
    the size the rounding error of d is measured against (see :func:`round_composed_exactly`); ``unsure``
    marks the elements whose TIES sign election float64 cannot decide (None without TIES)."""
    n = values[0].numel()
    d = buf("compose:acc", n, torch.float64)
    mag = buf("compose:mag", n, torch.float64)
    d.zero_()
    mag.zero_()
    ties = ties_thresholds is not None
    cs = []
    for i, (v, scale) in enumerate(zip(values, scales)):
        c = buf(f"compose:c{i}", n, torch.float64)
        torch.mul(v, scale, out=c)
        if ties:
            c.masked_fill_(v.abs() < ties_thresholds[i], 0.0)  # trim
            cs.append(c)
        else:
            d.add_(c)
        mag.add_(c.abs())
    if not ties:
        return d, mag, None
    total = buf("compose:total", n, torch.float64)
    total.zero_()
    for c in cs:
        total.add_(c)
    sign = torch.sign(total)  # elect: the sign of the larger total magnitude
    count = buf("compose:cnt", n, torch.float64)
    count.zero_()
    for c in cs:
        agree = (torch.sign(c) == sign) & (c != 0)
        d.add_(torch.where(agree, c, 0.0))
        count.add_(agree)
    d.div_(count.clamp_(min=1.0))  # disjoint mean
    # a total within its own rounding error of 0 may have the wrong sign: decide those exactly
    unsure = (total.abs() <= mag * (2 * len(cs) * 2.0 ** -52)) & (mag > 0)
    return d, mag, unsure


def rounding_brackets(s: torch.Tensor, err: torch.Tensor, dtype: torch.dtype,
                      buf=_new_buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: ``s − err`` and ``s + err`` each rounded once into ``dtype``. Rounding is monotone, so
    every value within ``err`` of ``s`` rounds to one of ``lo`` … ``hi``: where they are equal, that value."""
    n = s.numel()
    lo = buf("exact:lo", n, dtype)
    hi = buf("exact:hi", n, dtype)
    scratch = buf("round", n, torch.int64)
    shifted = buf("exact:shifted", n, torch.float64)  # round_into works in place on it
    round_into(lo, torch.sub(s, err, out=shifted), scratch)
    round_into(hi, torch.add(s, err, out=shifted), scratch)
    return lo, hi


def round_composed_exactly(out: torch.Tensor, target: torch.Tensor, d: torch.Tensor, mag: torch.Tensor,
                           values: list[torch.Tensor], scales: list[float], ties_thresholds: list[float] | None = None,
                           unsure: torch.Tensor | None = None, buf=_new_buffer) -> int:
    """Make ``out`` (the rounding of ``target + d`` from :func:`compose_deltas`) the rounding of the exact
    t + Σ λ_i·Δ_i (or TIES merge) for every finite element. Returns how many were decided exactly.

    A float64 sum of m products errs by at most 2⁻⁵³ of its magnitude per product, addition (and TIES's one
    division), so s = t + d lies within E = (2m+4)·2⁻⁵³·(|t| + Σ|λ_i·Δ_i|) of the exact value (E is doubled
    for safety). The rounding of s − E is kept where s − E and s + E round alike; the rest is decided from
    the exact value (:func:`decide_exactly`). NaN/Inf elements keep the plain result."""
    s = torch.add(target, d)  # the value that was rounded
    err = mag.add_(target.abs()).mul_((2 * len(values) + 4) * 2.0 ** -52)
    lo, hi = rounding_brackets(s, err, out.dtype, buf)
    finite = torch.isfinite(s)
    out.copy_(torch.where(finite, lo, out))
    undecided = lo != hi
    if unsure is not None:
        undecided |= unsure
    idx = torch.nonzero(finite & undecided).flatten()
    if len(idx):
        decide_exactly(out, idx, lo, hi, target, values, scales, ties_thresholds, unsure)
    return len(idx)


def decide_exactly(out: torch.Tensor, idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor,
                   values: list[torch.Tensor], scales: list[float], ties_thresholds: list[float] | None = None,
                   unsure: torch.Tensor | None = None) -> None:
    """Set ``out[idx]`` to the rounding of the exact x = t + Σ λ_i·Δ_i (the TIES merge with
    ``ties_thresholds``), given that x rounds to a value between ``lo[idx]`` and ``hi[idx]``.

    Where lo < hi are adjacent, x rounds to hi iff it exceeds their midpoint M: decided vectorised by the sign
    of t + Σ λ_i·Δ_i − M as an expansion of error-free products and sums (:func:`sign_of_exact_sum`), a tie to
    the even one. The rest (lo, hi not adjacent; a TIES sign election in ``unsure``) in exact rationals."""
    rest = _decide_by_expansion(out, idx, lo, hi, target, values, scales, ties_thresholds, unsure)
    if rest:
        _decide_by_fractions(out, rest, target, values, scales, ties_thresholds)


def _decide_by_expansion(out, idx, lo, hi, target, values, scales, ties_thresholds, unsure) -> list[int]:
    int_type = {2: torch.int16, 4: torch.int32}[out.dtype.itemsize]
    los, his = lo.view(-1)[idx], hi.view(-1)[idx]
    lo_bits, hi_bits = los.view(int_type).to(torch.int64), his.view(int_type).to(torch.int64)
    # adjacent finite values of one sign (at the overflow threshold their midpoint is not a float: rationals)
    ok = ((torch.signbit(los) == torch.signbit(his)) & ((lo_bits - hi_bits).abs() == 1)
          & torch.isfinite(los) & torch.isfinite(his))
    if unsure is not None:
        ok &= ~unsure.view(-1)[idx]
    rest = idx[~ok].tolist()
    sel = idx[ok]
    if not len(sel):
        return rest
    los, his, lo_bits = los[ok], his[ok], lo_bits[ok]
    mid = (los.double() + his.double()) * 0.5  # exact: two adjacent values of at most 24 bits
    t = target.view(-1)[sel]
    vals = [v.view(-1)[sel] for v in values]
    if ties_thresholds is None:
        terms = [t, -mid]
        for scale, v in zip(scales, vals):
            terms += exact_product_terms(scale, v)
    else:  # t + (Σ agreeing c_i) / k  vs  M:  sign of k·t − k·M + Σ agreeing c_i (k ≥ 1; k = 0: t − M)
        cs = [torch.where(v.abs() >= th, v * scale, 0.0) for scale, v, th in zip(scales, vals, ties_thresholds)]
        sign = torch.sign(sum(cs))
        agree = [(torch.sign(c) == sign) & (c != 0) for c in cs]
        k = sum(a.to(torch.float64) for a in agree).clamp(min=1.0)
        terms = [t * k, -mid * k]  # exact: k is a small integer
        for scale, v, a, th in zip(scales, vals, agree, ties_thresholds):
            terms += [p * a for p in exact_product_terms(scale, torch.where(v.abs() >= th, v, 0.0))]
    sgn = sign_of_exact_sum(terms)
    even_lo = (lo_bits & 1) == 0
    pick = torch.where(sgn > 0, his, torch.where(sgn < 0, los, torch.where(even_lo, los, his)))
    out.view(-1)[sel] = pick
    return rest


def _decide_by_fractions(out, rest: list[int], target, values, scales, ties_thresholds) -> None:
    flat_t, flat_v, flat_out = target.view(-1), [v.view(-1) for v in values], out.view(-1)
    for j in rest:
        cs = [Fraction(scale) * Fraction(float(v[j])) for scale, v in zip(scales, flat_v)]
        if ties_thresholds is not None:
            cs = [c if abs(float(v[j])) >= th else Fraction(0) for c, v, th in zip(cs, flat_v, ties_thresholds)]
            total = sum(cs, Fraction(0))
            agree = [c for c in cs if c != 0 and (c > 0) == (total > 0) and total != 0]
            x = sum(agree, Fraction(0)) / max(len(agree), 1)
        else:
            x = sum(cs, Fraction(0))
        flat_out[j] = round_fraction(Fraction(float(flat_t[j])) + x, out.dtype)
