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
twice again). bfloat16 results of magnitude ≤ 2**-126 (zero included: a value just above the midpoint
2**-134 would otherwise come out as 0) are therefore redone from the jammed float64 value, which is that
value rounded to odd at 24 bits, by rounding it straight to a multiple of bfloat16's subnormal step
2**-133 in float64 (one rounding; Boldo & Melquiond again, with 16 bits to spare). Finding them costs two
passes over the 16-bit output; float16 needs no such step, since its subnormals (≥ 2**-24) lie far above
float32's.
"""

from __future__ import annotations

import torch

_DROPPED = (1 << 29) - 1  # float64 significand bits below float32's last one (bit 29)
_NOT_HALF = ~(1 << 28)  # clears the "half" bit of the dropped ones: what is left rounds down
_SIXTEEN = (torch.bfloat16, torch.float16)
_BF16_MIN_NORMAL = 0x0080  # bit pattern of 2**-126 in bfloat16 (sign cleared)


def jam_to_float32(acc: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """Round a float64 tensor, in place, to float32 precision by round-to-odd (exactly representable after)."""
    bits = acc.view(torch.int64)
    low = torch.empty_like(bits) if scratch is None else scratch[: bits.numel()].view(bits.shape)
    torch.bitwise_and(bits, _DROPPED, out=low)
    low.add_(_DROPPED)  # bit 29 set iff a dropped bit was set (the sticky bit); bits 0-28 are don't-cares
    bits.bitwise_or_(low)  # last kept bit |= sticky
    bits.bitwise_and_(_NOT_HALF)  # dropped bits now < half: the float32 conversion truncates, exactly


def round_into(out: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``out.copy_(acc)`` with a single round-to-nearest-even. **Modifies ``acc``** when it is float64
    and ``out`` is 16-bit (pass a copy to keep it). ``scratch``: optional int64 buffer to reuse."""
    if acc.dtype == torch.float64 and out.dtype in _SIXTEEN:
        jam_to_float32(acc, scratch)
        out.copy_(acc)
        if out.dtype == torch.bfloat16:
            _redo_bf16_tiny(out, acc, scratch)
        return
    out.copy_(acc)


def _redo_bf16_tiny(out: torch.Tensor, jammed: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """Round again, straight from ``jammed`` (float64, rounded to odd at 24 bits), the elements of the
    bfloat16 ``out`` whose magnitude is at most 2**-126: every value below float32's normal range lands
    there, and there the float32 step rounded at a coarser bit than the jam (see the module's text)."""
    o = out.reshape(-1).view(torch.int16)
    n = o.numel()
    if scratch is None or scratch.numel() < (n + 3) // 4:
        mag = torch.empty_like(o)
    else:
        mag = scratch.reshape(-1).view(torch.int16)[:n]
    torch.bitwise_and(o, 0x7FFF, out=mag)
    if n == 0 or int(mag.min()) > _BF16_MIN_NORMAL:
        return
    idx = torch.nonzero(mag <= _BF16_MIN_NORMAL).squeeze(1)
    x = (jammed.reshape(-1).view(torch.int64)[idx] & ~_DROPPED).view(torch.float64)  # the jam left junk below bit 29
    # x * 2**133 is exact and below 2**9 here; torch.round is round-half-to-even and keeps the sign of zero
    r = torch.round(x * 2.0 ** 133) * 2.0 ** -133
    o[idx] = r.to(torch.bfloat16).view(torch.int16)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` rounded once (see :func:`round_into`); ``x`` is left unchanged."""
    out = torch.empty(x.shape, dtype=dtype)
    round_into(out, x.clone() if x.dtype == torch.float64 else x)
    return out
