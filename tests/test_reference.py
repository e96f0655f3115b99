"""The tests' own float64 reference (tests/reference.py) is itself right: its single rounding agrees
with exact rational arithmetic, and its safetensors reader with the safetensors library."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R

FMTS = ["BF16", "F16", "F32"]


def _nearest_by_fractions(x: float, fmt: str) -> int:
    """Bit pattern of the ``fmt`` value nearest to ``x``, by exact rationals over all candidates near
    R.round_bits's answer (ties: even significand; past the largest finite value: infinity)."""
    p, emin, bias, ebits, store = R.FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    sign = (1 << (width - 1)) if np.signbit(x) else 0
    ax = Fraction(abs(x))
    max_bits = (((1 << ebits) - 2) << (p - 1)) | ((1 << (p - 1)) - 1)
    max_val = R.exact_value(max_bits, fmt)
    ulp_max = Fraction(2) ** ((1 << ebits) - 2 - bias - (p - 1))
    if ax >= max_val + ulp_max / 2:  # IEEE: rounds to infinity at and past the midpoint above max
        return sign | (((1 << ebits) - 1) << (p - 1))
    guess = int(R.round_bits(np.array([abs(x)]), fmt)[0])
    best = None
    for m in range(max(0, guess - 2), min(max_bits, guess + 2) + 1):
        err = abs(R.exact_value(m, fmt) - ax)
        key = (err, m & 1)
        if best is None or key < best[0]:
            best = (key, m)
    return sign | best[1]


def _midpoints(fmt: str):
    """float64 values at, just above and just below midpoints between neighbours, normal and subnormal."""
    p, emin, bias, ebits, _ = R.FORMATS[fmt]
    emax = (1 << ebits) - 2 - bias
    return st.builds(
        lambda s, m, e, off: s * float((Fraction(2 * m + 1, 2 ** p) + 1) * Fraction(2) ** e
                                       * (1 + Fraction(off, 2 ** 50))),
        st.sampled_from([1.0, -1.0]), st.integers(0, 2 ** (p - 1) - 1), st.integers(emin - p, emax),
        st.integers(-3, 3))


def _subnormal_midpoints(fmt: str):
    p, emin, *_ = R.FORMATS[fmt]
    q = Fraction(2) ** (emin - (p - 1))  # the subnormal quantum
    return st.builds(lambda s, k, off: s * float((Fraction(2 * k + 1, 2) * q) * (1 + Fraction(off, 2 ** 45))),
                     st.sampled_from([1.0, -1.0]), st.integers(0, 2 ** (p - 1)), st.integers(-3, 3))


@pytest.mark.parametrize("fmt", FMTS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_round_bits_is_the_nearest_value(fmt, data):
    vals = data.draw(st.lists(st.one_of(_midpoints(fmt), _subnormal_midpoints(fmt),
                                        st.floats(allow_nan=False, allow_infinity=False, width=64)),
                              min_size=1, max_size=12))
    got = R.round_bits(np.array(vals, dtype=np.float64), fmt).astype(np.int64).tolist()
    assert got == [_nearest_by_fractions(v, fmt) for v in vals]


@pytest.mark.parametrize("fmt", FMTS)
def test_round_bits_special_values(fmt):
    p, emin, bias, ebits, store = R.FORMATS[fmt]
    width = 8 * np.dtype(store).itemsize
    inf = ((1 << ebits) - 1) << (p - 1)
    got = R.round_bits(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 1.0]), fmt).astype(np.int64)
    assert got[:4].tolist() == [0, 1 << (width - 1), inf, inf | (1 << (width - 1))]
    assert (got[4] & inf) == inf and (got[4] & ((1 << (p - 1)) - 1)) != 0  # a NaN
    assert got[5] == inf and got[6] == inf | (1 << (width - 1))
    assert R.exact_value(int(got[7]), fmt) == 1


def test_round_bits_agrees_with_numpy_single_roundings():
    """numpy rounds float64 → float16 and → float32 once (correctly); the reference must agree."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 5, 100_000),
                        rng.standard_normal(1000) * 1e-7, rng.standard_normal(100) * 7e4])
    with np.errstate(over="ignore"):  # 7e4-sized values overflow float16 to inf on purpose
        want16 = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(R.round_bits(x, "F16"), want16)
    assert np.array_equal(R.round_bits(x, "F32"), x.astype(np.float32).view(np.uint32))


def test_round_bits_catches_double_rounding():
    """1 + 2^-8 + 2^-30 lies just above a bf16 midpoint; via float32 it would round down to 1.0."""
    x = np.array([1 + 2 ** -8 + 2 ** -30, 1 + 2 ** -8, 1 + 3 * 2 ** -8])
    got = R.decode(R.round_bits(x, "BF16"), "BF16").tolist()
    assert got == [1 + 2 ** -7, 1.0, 1 + 2 ** -6]


def test_reader_agrees_with_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, 2, generator=g), "d": torch.randn(4, generator=g).double()}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    ck = R.Ckpt(tmp_path)
    for k, t in tensors.items():
        assert ck.shape(k) == tuple(t.shape)
        assert np.array_equal(ck.f64(k), t.double().numpy()), k
