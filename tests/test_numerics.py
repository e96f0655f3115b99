"""float64 → bf16/fp16 rounds once (round-to-nearest-even), checked against exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaport.numerics import round_to

DT = [torch.bfloat16, torch.float16]


def _exact_rne(x: float, dtype: torch.dtype) -> float:
    """Nearest value of ``dtype`` to ``x`` by exact rationals, ties to the even significand."""
    if x != x:
        return x
    guess = torch.tensor([x], dtype=torch.float64).to(dtype)  # torch's (double-rounded) answer: within one step
    if guess.isinf().item():
        return guess.item()
    b = int(guess.view(torch.int16).item()) & 0xFFFF
    sign, mag = b & 0x8000, b & 0x7FFF
    cands = []
    for m in (mag - 1, mag, mag + 1):
        if m < 0:
            continue
        u = sign | m
        val = torch.tensor([u - 0x10000 if u >= 0x8000 else u], dtype=torch.int16).view(dtype)
        if val.isfinite().item():
            cands.append((abs(Fraction(val.item()) - Fraction(x)), m & 1, val.item()))
    best = min(cands, key=lambda c: (c[0], c[1]))
    return best[2]


def test_known_double_rounding_cases():
    # torch rounds these through float32 and lands on the wrong side of a midpoint
    x = torch.tensor([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30), 1 + 2 ** -8, 3 * 2 ** -130 + 2 ** -160],
                     dtype=torch.float64)
    assert x.to(torch.bfloat16)[0].item() == 1.0  # the bug this module exists for
    got = round_to(x, torch.bfloat16).tolist()
    assert got[0] == 1 + 2 ** -7 and got[1] == -(1 + 2 ** -7)
    assert got[2] == 1.0  # an exact midpoint still rounds to even
    y = torch.tensor([1 + 2 ** -11 + 2 ** -40, 2 ** -20 + 2 ** -25 + 2 ** -60], dtype=torch.float64)
    assert y.to(torch.float16)[0].item() == 1.0
    assert round_to(y, torch.float16).tolist() == [_exact_rne(v, torch.float16) for v in y.tolist()]
    assert round_to(y, torch.float16)[0].item() == 1 + 2 ** -10


def _near_midpoints(dtype):
    """float64 values within a few float32 steps of a 16-bit midpoint, with a tail below float32."""
    sig = 7 if dtype == torch.bfloat16 else 10
    lo, hi = (-130, 120) if dtype == torch.bfloat16 else (-26, 15)
    return st.builds(
        lambda s, m, e, tail: s * (1 + (2 * m + 1) * 2.0 ** -(sig + 1)) * 2.0 ** e * (1 + tail * 2.0 ** -40),
        st.sampled_from([1.0, -1.0]), st.integers(0, 2 ** sig - 1), st.integers(lo, hi), st.integers(-3, 3))


@pytest.mark.parametrize("dtype", DT, ids=lambda d: str(d).replace("torch.", ""))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_round_to_matches_exact_rounding(dtype, data):
    vals = data.draw(st.lists(st.one_of(_near_midpoints(dtype), st.floats(-1e6, 1e6, allow_nan=False),
                                        st.floats(-1e-6, 1e-6, allow_nan=False)), min_size=1, max_size=20))
    got = round_to(torch.tensor(vals, dtype=torch.float64), dtype).tolist()
    want = [_exact_rne(v, dtype) for v in vals]
    assert got == want


@pytest.mark.parametrize("dtype", DT, ids=lambda d: str(d).replace("torch.", ""))
def test_round_to_agrees_with_torch_where_torch_rounds_once(dtype):
    """Values exact in float32 (one rounding in torch too) and non-finite values come out as torch's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g).double() * 0.02
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e300], dtype=torch.float64)
    got, ref = round_to(x, dtype), x.to(dtype)
    assert torch.equal(got.view(torch.int16)[3:], ref.view(torch.int16)[3:]) and got[2].isnan()
