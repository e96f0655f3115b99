"""float64 → bf16/fp16 rounds once (round-to-nearest-even), checked against exact rational arithmetic."""

from __future__ import annotations

import math
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
    if guess.isinf().item():  # torch overflowed, possibly by rounding twice: at or past max + half a step only
        fi = torch.finfo(dtype)
        limit = Fraction(fi.max) + Fraction(fi.eps) * Fraction(2) ** math.frexp(fi.max)[1] / 4  # max + half ulp
        return guess.item() if abs(Fraction(x)) >= limit else math.copysign(fi.max, x)
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
    # just below float16's overflow threshold (65504 + half a step): torch rounds up to 65520, then to inf
    z = torch.tensor([65520 - 2 ** -20, 65520.0], dtype=torch.float64)
    assert z.to(torch.float16)[0].item() == float("inf")
    assert round_to(z, torch.float16).tolist() == [65504.0, float("inf")]
    assert [_exact_rne(v, torch.float16) for v in z.tolist()] == [65504.0, float("inf")]


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


# -- below float32's normal range ---------------------------------------------------------------------
# 16-bit subnormal steps: bfloat16 shares float32's exponent range (step 2**-133 below 2**-126); float16's
# subnormals (step 2**-24 below 2**-14) lie far above float32's, so only bfloat16 could round twice there.
_SUB = {torch.bfloat16: (-133, 128), torch.float16: (-24, 1024)}  # dtype: (log2 of the step, subnormals)


def _exact_subnormal(x: float, dtype: torch.dtype) -> float:
    """x rounded to the nearest multiple of the subnormal step, ties to even, by exact rationals; x's sign
    is kept for a zero result (as IEEE rounding does)."""
    step = Fraction(2) ** _SUB[dtype][0]
    q = round(Fraction(x) / step)  # Fraction.__round__: half to even
    return math.copysign(float(q * step), x)


@pytest.mark.parametrize("dtype", DT, ids=lambda d: str(d).replace("torch.", ""))
def test_every_subnormal_midpoint_rounds_once(dtype):
    """Every subnormal midpoint (the one below the smallest normal included), exactly and ± an offset far
    below float32's resolution there, both signs: the result is the exact nearest value, ties to even."""
    e, count = _SUB[dtype]
    xs = []
    for k in range(count):
        mid = (2 * k + 1) * 2.0 ** (e - 1)
        for off in (0.0, 2.0 ** (e - 30), -(2.0 ** (e - 30))):
            xs += [mid + off, -(mid + off)]
    got = round_to(torch.tensor(xs, dtype=torch.float64), dtype).double()
    want = torch.tensor([_exact_subnormal(v, dtype) for v in xs], dtype=torch.float64)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64)), \
        f"{int((got != want).sum())} of {len(xs)} differ, e.g. {[(v, g) for v, g, w in zip(xs, got.tolist(), want.tolist()) if g != w][:3]}"


def test_subnormal_results_of_a_scaled_transfer_round_once(tmp_path):
    """End to end, λ = 0.7: the source fine-tune holds every bfloat16 value below 2**-125 (both signs), so
    λ·(f − b) covers the whole subnormal range of the output; each element must be the exact nearest bf16."""
    import json

    from safetensors.torch import load_file, save_file

    import deltaport

    mags = torch.arange(0, 0x0100, dtype=torch.int16)  # bit patterns of 0 .. just below 2**-125
    f = torch.cat([mags, mags | -0x8000]).view(torch.bfloat16)
    zeros = torch.zeros_like(f)
    for name, w in (("b", zeros), ("f", f), ("t", zeros)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    deltaport.transfer(tmp_path / "b", tmp_path / "f", tmp_path / "t", tmp_path / "o", scale=0.7)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))["w"]
    # the reference is the multiple of the subnormal step nearest the exact 0.7 × f (λ: its float64 value;
    # round() of a Fraction breaks ties to even). The float64 product 0.7 * v lands on a midpoint the exact
    # value is not on for 20 of these 512 elements: those are decided from the exact value.
    step = Fraction(2) ** -133
    want = [float(round(Fraction(0.7) * Fraction(v) / step) * step) for v in f.tolist()]
    wrong = [(v, g, w) for v, g, w in zip(f.tolist(), got.double().tolist(), want) if g != w]
    assert not wrong, f"{len(wrong)} wrong, e.g. (f, got, exact) {wrong[:3]}"


def test_zeros_keep_their_sign_and_tiny_values_their_side():
    """±0 and values far below the smallest bf16 subnormal come out as zeros of their own sign; the
    smallest float32 subnormals and the boundary 2**-126 stay exact."""
    x = torch.tensor([0.0, -0.0, 2.0 ** -160, -(2.0 ** -160), 2.0 ** -149, 2.0 ** -126, -(2.0 ** -126),
                      2.0 ** -134 + 2.0 ** -170, -(2.0 ** -134 + 2.0 ** -170)], dtype=torch.float64)
    got = round_to(x, torch.bfloat16).view(torch.int16).tolist()
    neg = -0x10000  # int16 view of a bf16 with the sign bit set
    assert got == [0x0000, 0x8000 + neg, 0x0000, 0x8000 + neg, 0x0000, 0x0080, 0x8080 + neg, 0x0001, 0x8001 + neg]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_infinities_and_nans_survive_the_single_rounding(dtype):
    """±inf stays ±inf (the jam used to leave junk below the float32 significand, turning an infinity into
    a NaN), a NaN stays a NaN, and a finite value past the format's range overflows to ±inf."""
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e300, -1e300, 3.0], dtype=torch.float64)
    got = round_to(x, dtype)
    assert got[0].item() == float("inf") and got[1].item() == -float("inf")
    assert torch.isnan(got[2]) and got[3].item() == float("inf") and got[4].item() == -float("inf")
    assert got[5].item() == 3.0


def _one_tensor_models(tmp_path, dtype, values: dict[str, float]) -> None:
    import json

    from safetensors.torch import save_file

    for name, v in values.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"w": torch.tensor([v, 0.25], dtype=dtype)}, str(tmp_path / name / "model.safetensors"))


def test_scaled_transfer_rounds_the_exact_value_not_the_float64_product(tmp_path):
    """t = 0.125, f − b = 5·2⁻¹⁰, λ = 0.7 (float64: 0.7 − 2⁻⁵⁴·…): the float64 product λ·5·2⁻¹⁰ rounds to
    3.5·2⁻¹⁰, so t + λ·Δ lands on the bf16 midpoint 0.125 + 3.5·2⁻¹⁰ and round-to-even goes up; the exact
    value lies just below it, so the nearest bf16 is 0.125 + 3·2⁻¹⁰. Transfer and apply write the latter."""
    from safetensors.torch import load_file

    import deltaport

    t, d = 0.125, 5 * 2.0 ** -10
    assert 0.7 * d == 3.5 * 2.0 ** -10 and Fraction(0.7) * Fraction(d) < Fraction(7, 2) * Fraction(2) ** -10
    _one_tensor_models(tmp_path, torch.bfloat16, {"b": 0.0, "f": d, "t": t})
    res = deltaport.transfer(tmp_path / "b", tmp_path / "f", tmp_path / "t", tmp_path / "o", scale=0.7)
    deltaport.diff(tmp_path / "b", tmp_path / "f", tmp_path / "d")
    deltaport.apply(tmp_path / "d", tmp_path / "t", tmp_path / "a", scale=0.7)
    want = t + 3 * 2.0 ** -10
    for out in ("o", "a"):
        assert load_file(str(tmp_path / out / "model.safetensors"))["w"][0].item() == want, out
    assert res.stats.exact_fixups >= 1
    # λ a power of two: the float64 sum is exact, no element needs a decision
    res = deltaport.transfer(tmp_path / "b", tmp_path / "f", tmp_path / "t", tmp_path / "p", scale=0.5)
    assert res.stats.exact_fixups == 0
    assert load_file(str(tmp_path / "p" / "model.safetensors"))["w"][0].item() == t + 2 * 2.0 ** -10  # a tie: even


def test_scaled_transfer_exact_when_f_minus_b_is_inexact_in_float64(tmp_path):
    """float32 inputs f = 1 + 2⁻²³, b = 2⁻⁶⁰, t = 0, λ = 3: f − b needs 84 bits, so float64 drops b and
    3·(f − b) lands on the float32 midpoint 3 + 1.5·2⁻²²; the exact value is 3·b below it: 3 + 2⁻²², not
    the even neighbour 3 + 2⁻²¹ a float64 evaluation gives."""
    from safetensors.torch import load_file

    import deltaport

    f, b = 1 + 2.0 ** -23, 2.0 ** -60
    _one_tensor_models(tmp_path, torch.float32, {"b": b, "f": f, "t": 0.0})
    deltaport.transfer(tmp_path / "b", tmp_path / "f", tmp_path / "t", tmp_path / "o", scale=3.0)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))["w"]
    assert got[0].item() == 3 + 2.0 ** -22
    assert torch.tensor(3 * (f - b), dtype=torch.float64).to(torch.float32).item() == 3 + 2.0 ** -21


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.sampled_from([0.7, 1.3, -0.3, 3.0, 0.1]),
       st.integers(0, 2 ** 31))
def test_transfer_into_is_the_nearest_value_of_the_exact_result(dtype, lam, seed):
    """numerics.transfer_into on small-Δ weights (where f − b has few bits and the float64 product often
    lands on a midpoint) against Fraction arithmetic, element by element."""
    from deltaport.numerics import round_fraction, transfer_into

    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(4000, generator=g) * 0.02).to(dtype)
    f = (b.float() + torch.randn(4000, generator=g) * 1e-3).to(dtype)
    t = (b.float() + torch.randn(4000, generator=g) * 5e-3).to(dtype)
    out = torch.empty(4000, dtype=dtype)
    transfer_into(out, t.double(), f.double(), b.double(), lam)
    for j in range(4000):
        x = Fraction(t[j].item()) + Fraction(lam) * (Fraction(f[j].item()) - Fraction(b[j].item()))
        assert out[j].item() == round_fraction(x, dtype), (j, t[j].item(), f[j].item(), b[j].item())
