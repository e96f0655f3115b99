"""Rounding float64 results once, correctly, to a 16-bit float.

``torch`` converts float64 → bfloat16/float16 through float32, which rounds twice: a float64 value just
above a 16-bit midpoint can first round *onto* the midpoint in float32, and then round-to-even goes the
wrong way (``1 + 2**-8 + 2**-30`` → 1.0 in bf16; the nearest bf16 is 1.0078125). deltaport promises one
rounding of ``T + λ·Δ``, so :func:`round_into` uses *round-to-odd* for the float64 → float32 step (exact
for any format with at least two fewer significand bits — Boldo & Melquiond, "When double rounding is
odd", 2005) and then float32 → 16-bit round-to-nearest-even.

Cost: the fix only matters where the float32 value sits exactly on a 16-bit midpoint (or, for float16, in
its subnormal range). A cheap scan (one shift and one min per chunk) finds those; only they are corrected.
"""

from __future__ import annotations

import torch

_INT_MIN = -(2 ** 31)
# shift that moves the lowest bit kept by the 16-bit format to bit 31 ... i.e. a float32 whose dropped
# bits are exactly "1000…0" (a midpoint) becomes INT_MIN, the unique minimum of an int32 tensor
_TIE_SHIFT = {torch.bfloat16: 16, torch.float16: 19}
_FP16_NORMAL_BITS = 0x38800000  # float32 bits of 2**-14, float16's smallest normal


def round_into(out: torch.Tensor, acc: torch.Tensor, f32: torch.Tensor | None = None,
               i32: torch.Tensor | None = None) -> None:
    """``out.copy_(acc)`` with a single round-to-nearest-even, whatever the dtypes.

    ``f32`` / ``i32``: optional scratch tensors (float32 / int32, ``acc.numel()`` elements) reused by the
    engine between chunks."""
    if acc.dtype != torch.float64 or out.dtype not in _TIE_SHIFT:
        out.copy_(acc)  # one rounding already (or none)
        return
    n = acc.numel()
    f32 = torch.empty(n, dtype=torch.float32) if f32 is None else f32[:n]
    i32 = torch.empty(n, dtype=torch.int32) if i32 is None else i32[:n]
    flat = acc.reshape(-1)
    f32.copy_(flat)  # round-to-nearest-even to float32
    bits = f32.view(torch.int32)
    torch.bitwise_left_shift(bits, _TIE_SHIFT[out.dtype], out=i32)
    fp16 = out.dtype == torch.float16
    tie = n > 0 and int(i32.amin()) == _INT_MIN
    small = fp16 and n > 0 and float(f32.abs().amin()) < 2.0 ** -14
    if tie or small:
        cand = i32 == _INT_MIN
        if small:
            cand |= (bits & 0x7FFFFFFF) < _FP16_NORMAL_BITS
        idx = cand.nonzero().squeeze(1)
        sub, exact = f32[idx], flat[idx]
        back = sub.double()
        sb = sub.view(torch.int32)
        # inexact and even: move one float32 step towards the exact value, onto the odd neighbour
        fix = (back != exact) & (exact == exact) & ((sb & 1) == 0)
        step = torch.where(back.abs() > exact.abs(), -1, 1).to(torch.int32)
        sb.add_(step * fix)
        f32[idx] = sub
    out.reshape(-1).copy_(f32)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` rounded once (see :func:`round_into`)."""
    out = torch.empty(x.shape, dtype=dtype)
    round_into(out, x.contiguous())
    return out
