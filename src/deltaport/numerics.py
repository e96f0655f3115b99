"""Rounding float64 results once, correctly, to a 16-bit float.

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
                  scale: float = 1.0, *, scratch: torch.Tensor | None = None) -> None:
    """The transfer formula: ``out ← t + λ·(f − b)``, rounded once into ``out``'s dtype.

    ``target`` (t; None for no target: the Δ itself), ``plus`` (f) and ``minus`` (b; None when ``plus`` is
    already the Δ) are tensors of one compute dtype and of ``out``'s shape; the sum is formed in that dtype
    and rounded once by :func:`round_into`. **Overwrites** ``plus`` and ``target`` (they are the caller's
    scratch: the engine passes reused chunk buffers, ``check`` whole-tensor copies). ``scratch``: an optional
    int64 buffer for the rounding."""
    d = plus
    if minus is not None:
        d.sub_(minus)
    if scale != 1.0:
        d.mul_(scale)
    acc = d
    if target is not None:
        acc = target.add_(d)
    round_into(out, acc, scratch)


_FORMATS = {torch.float32: (24, -126, 128), torch.bfloat16: (8, -126, 128), torch.float16: (11, -14, 16),
            torch.float64: (53, -1022, 1024)}  # significand bits, min normal exponent, overflow exponent


def round_fraction(x, dtype: torch.dtype) -> float:
    """The value of ``dtype`` nearest the exact rational ``x`` (ties to even; overflow to ±inf), as a float."""
    from fractions import Fraction

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
