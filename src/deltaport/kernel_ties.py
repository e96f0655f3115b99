"""The TIES merge through the fused kernel's machinery (:mod:`deltaport.kernel`): the magnitude cut-offs by a
streamed radix select, and one chunk of ``t + merge(λ_i·Δ_i)`` rounded once, both in numba, without torch.

:func:`ties_into` gives the bytes of the torch path (``deltaport.numerics.compose_deltas`` with thresholds,
``transfer_into``, ``round_composed_exactly``; :func:`torch_ties_into` runs it with the same arguments), by
doing its float64 arithmetic in its order for every element, then deciding exactly where it does:

* trim: ``c_i = λ_i·v_i``, or +0 where ``|v_i| <`` the cut-off; ``total = Σ c_i``, ``mag = Σ |c_i|``;
* elect: the sign of ``total`` (``torch.sign``: 0 for ±0 and NaN); the entries of that sign (and ≠ 0) agree;
  ``d = Σ agreeing c_i / max(count, 1)``; ``s = t + d``;
* round: ``s`` rounded, then (16- and 32-bit outputs) ``s ∓ E`` with ``E = (2m + 4)·2⁻⁵²·(mag + |t|)``: where both
  round alike, that value; where they do not, or where the election's float64 total lies within its rounding
  error of 0 (``|total| ≤ 2m·2⁻⁵²·mag``), the value nearest the exact merge (the election on the exact total,
  the mean of the agreeing exact products), as ``round_fraction`` of the exact rational (an exact zero is +0,
  a value that rounds to zero keeps its sign). Those elements (a few per cent at λ ≠ 1; the exact
  cancellations of two Δs' kept entries) are decided from error-free products (FMA) and an error-free sum
  (Ogita–Rump–Oishi Sum2, else a Shewchuk expansion), as in :func:`deltaport.kernel._decide`.

Where it cannot decide (a product below 2⁻⁹⁶⁰, a non-finite input, a sum that overflows) it returns
:data:`~deltaport.kernel.KERNEL_REFUSED` and the engine computes the chunk on the torch path.
"""

from __future__ import annotations

import numpy as np

from deltaport import kernel as K
from deltaport.kernel import FORMATS, KERNEL_REFUSED

if K.numba is not None:
    from numba import njit

    from deltaport.kernel import (_bits_f64, _bracket, _compose_fix, _expansion_sign, _f64_bits, _flag_array,
                                  _flagged_at, _fma, _load, _midpoint_distance, _round_bits, _sum2, _two_sum_err)

    @njit(nogil=True, cache=True)
    def _magnitude_histogram(values, shift, prefix, hist):
        """hist[(bits >> shift) & 0xFFFF] += 1 over the float64 bits of |v| (v in ``values``) whose bits above
        ``shift + 16`` equal ``prefix`` (all of them at shift 48): one level of the radix select."""
        for i in range(values.shape[0]):
            bits = np.int64(_f64_bits(abs(_load(values, i))))
            if shift >= 48 or (bits >> (shift + 16)) == prefix:
                hist[(bits >> shift) & 0xFFFF] += 1

    @njit(nogil=True, cache=True)
    def _magnitude_gather(values, shift, prefix, out, j):
        """Append to ``out`` from ``j`` the bits of |v| whose bits above ``shift`` equal ``prefix``; the new end."""
        for i in range(values.shape[0]):
            bits = np.int64(_f64_bits(abs(_load(values, i))))
            if (bits >> shift) == prefix:
                out[j] = bits
                j += 1
        return j

    @njit(nogil=True, cache=True)
    def _window_gather(values, lo, hi, out, j, counts):
        """Over the float64 bits of |v|: count those below ``lo`` (counts[0]) and those in [lo, hi] (counts[1]),
        appending the latter to ``out`` from ``j`` while it has room; returns the new end. Counted by blocks of
        32 without branches (vectorised: a magnitude's side of a cut-off is a coin toss a branch predictor
        loses), a block gathered only where it holds one (the window is a fraction of a per cent)."""
        cap = out.shape[0]
        n = values.shape[0]
        nfull = n // 32
        below = 0
        inside = 0
        for b in range(nfull + 1):
            b0 = b * 32
            m = 32 if b < nfull else n - b0
            ni = 0
            if m == 32:  # (a constant trip count: LLVM vectorises it)
                for k in range(32):
                    bits = np.int64(_f64_bits(abs(_load(values, b0 + k))))
                    below += bits < lo
                    ni += (bits >= lo) & (bits <= hi)
            else:
                for k in range(m):
                    bits = np.int64(_f64_bits(abs(_load(values, b0 + k))))
                    below += bits < lo
                    ni += (bits >= lo) & (bits <= hi)
            if ni:
                inside += ni
                for k in range(m):
                    bits = np.int64(_f64_bits(abs(_load(values, b0 + k))))
                    if (bits >= lo) & (bits <= hi) & (j < cap):
                        out[j] = bits
                        j += 1
        counts[0] += below
        counts[1] += inside
        return j

    @njit(inline="always", error_model="numpy")
    def _trimmed(v, lam, th):
        c = v * lam  # (v: a float64 value)
        return 0.0 if abs(v) < th else c  # (masked_fill(|v| < th, 0.0): NaN is kept)

    @njit(inline="always", error_model="numpy")
    def _sign(x):  # torch.sign: 0 for ±0 and NaN
        return np.float64(x > 0.0) - np.float64(x < 0.0)

    @njit(error_model="numpy")
    def _decide_mean(terms, n, k, p, emin, bias, ebits, width, nanmode):
        """Bits of the value nearest x = (exact sum of ``terms[:n]``) / k (k ≥ 1 a small integer), with
        ``round_fraction``'s zeros (x = 0: +0; x ≠ 0 rounding to zero: x's sign); -1 where it cannot tell."""
        est, bound = _sum2(terms, n)
        if not np.isfinite(est):
            return -1
        if abs(est) <= bound:
            sg = _expansion_sign(terms, n)
            if sg == 0:
                return _round_bits(0.0, p, emin, bias, ebits, width, nanmode)
            if bound > 2.0 ** -200:
                return -1
            est = sg * bound
        xe = est / k
        lo, q = _bracket(xe, p, emin)
        mid = lo + 0.5 * q
        neg = xe < 0.0
        terms[n] = (mid if neg else -mid) * k  # k·(x − M), M with x's sign (k·M exact: M has p + 1 bits)
        r, b = _sum2(terms, n + 1)
        sg = 0
        if r > b:
            sg = 1
        elif r < -b:
            sg = -1
        else:
            sg = _expansion_sign(terms, n + 1)
        if neg:
            sg = -sg  # the sign of |x| − |M|
        kk = lo / q
        up = sg > 0 or (sg == 0 and np.floor(kk * 0.5) * 2.0 != kk)
        v = lo + q if up else lo
        return _round_bits(-v if neg else v, p, emin, bias, ebits, width, nanmode)

    @njit(inline="always", error_model="numpy")
    def _ties_float64_is_exact(Ds, lams, ths, i, t):
        """(ok, s): the float64 merge's t + d at element i, and whether every step was exact (products by FMA,
        sums by TwoSum, the mean by FMA): then s is the exact merge, election included."""
        nd = len(Ds)
        total = 0.0
        ok = True
        for j in range(nd):
            v = _load(Ds[j], i)
            w = v if abs(v) >= ths[j] else 0.0
            c = w * lams[j]
            ok &= (_fma(w, lams[j], -c) == 0.0) & ~((c == 0.0) & (w != 0.0) & (lams[j] != 0.0)) \
                & ~((c != 0.0) & (abs(c) < 2.0 ** -960))
            a = total + c
            ok &= _two_sum_err(total, c, a) == 0.0
            total = a
        sg = _sign(total)
        d = 0.0
        cnt = 0.0
        for j in range(nd):
            c = _trimmed(_load(Ds[j], i), lams[j], ths[j])
            if (_sign(c) == sg) & (c != 0.0):
                a = d + c
                ok &= _two_sum_err(d, c, a) == 0.0
                d = a
                cnt += 1.0
        k = max(cnt, 1.0)
        m = d / k
        ok &= _fma(m, k, -d) == 0.0
        s = t + m
        return ok & (_two_sum_err(t, m, s) == 0.0), s

    @njit(inline="always", error_model="numpy")
    def _ties_fix(Ds, lams, ths, i, t, s, err, sg, terms, p, emin, emax, bias, width):
        """The short exact decision (:func:`deltaport.kernel._compose_fix`) for an element whose election is
        certain (not unsure: the float64 total's sign ``sg`` is the exact total's, so the float64 products' signs
        give the agreeing entries): x = t + (Σ agreeing exact products)/k from k·t, the FMA-split products and
        −k·M. -1 where it does not decide (no agreeing entry, a product below 2⁻⁹⁶⁰, a tie within Sum2's bound,
        s outside the normal range, err above q/8)."""
        m = 1
        for j in range(len(Ds)):
            v = _load(Ds[j], i)
            w = v if abs(v) >= ths[j] else 0.0
            hi = lams[j] * w
            if (hi != 0.0) & (_sign(hi) == sg):
                if abs(hi) < 2.0 ** -960:
                    return -1  # the FMA's error term could underflow
                terms[m] = hi
                terms[m + 1] = _fma(lams[j], w, -hi)
                m += 2
        k = (m - 1) // 2
        if k == 0:
            return -1
        terms[0] = k * t  # exact: k ≤ the number of Δs
        return _compose_fix(terms, m, s, err, p, emin, emax, bias, width, np.float64(k))

    @njit(error_model="numpy")
    def _ties_exact(T, Ds, lams, ths, i, terms, kept, p, emin, bias, ebits, width, nanmode):
        """The rounding of the exact TIES merge at element i (see the module), or -1."""
        nd = len(Ds)
        t = _load(T, i)
        if not np.isfinite(t):
            return -1
        for j in range(nd):
            v = _load(Ds[j], i)
            if not np.isfinite(v):
                return -1
            w = v if abs(v) >= ths[j] else 0.0
            hi = lams[j] * w
            if w != 0.0 and lams[j] != 0.0 and abs(hi) < 2.0 ** -960:
                return -1  # the FMA's error term could underflow
            terms[2 * j] = hi
            terms[2 * j + 1] = _fma(lams[j], w, -hi)
        tsg = _expansion_sign(terms, 2 * nd)  # the exact total's sign
        m = 1
        for j in range(nd):
            hi = terms[2 * j]
            if hi != 0.0 and tsg != 0 and (hi > 0.0) == (tsg > 0):  # agrees with the exact election
                kept[m] = hi
                kept[m + 1] = terms[2 * j + 1]
                m += 2
        k = (m - 1) // 2
        if k == 0:
            return _round_bits(t + 0.0, p, emin, bias, ebits, width, nanmode)  # x = t (−0 → +0, as a Fraction)
        kept[0] = k * t  # exact: k ≤ the number of Δs
        return _decide_mean(kept, m, np.float64(k), p, emin, bias, ebits, width, nanmode)

    @njit(inline="always", error_model="numpy")
    def _ties_plain(T, Ds, lams, ths, i, k_err, k_uns):
        """The torch path's float64 merge at element i: (s, err, unsure, sg) with s = t + d, err its error bound,
        unsure whether the election's total lies within its rounding error of 0 and sg the total's sign."""
        t = _load(T, i)
        total = 0.0
        mag = 0.0
        for j in range(len(Ds)):
            c = _trimmed(_load(Ds[j], i), lams[j], ths[j])
            mag += abs(c)
            total += c
        sg = _sign(total)
        d = 0.0
        cnt = 0.0
        for j in range(len(Ds)):
            c = _trimmed(_load(Ds[j], i), lams[j], ths[j])
            agree = (_sign(c) == sg) & (c != 0.0)
            d += c if agree else 0.0
            cnt += np.float64(agree)
        s = t + d / max(cnt, 1.0)
        return s, (mag + abs(t)) * k_err, (abs(total) <= mag * k_uns) & (mag > 0.0), sg

    @njit(nogil=True, cache=True, error_model="numpy")
    def _ties_kernel(out, T, Ds, lams, ths, fmt, fixup):
        p, emin, bias, ebits, width, nanmode = fmt
        emax = 1 << (ebits - 1)
        nd = len(Ds)
        n = out.shape[0]
        k_err = (2 * nd + 4) * 2.0 ** -52
        k_uns = 2 * nd * 2.0 ** -52
        zero_mask = (np.int64(1) << (width - 1)) - 1
        inf_mag = ((np.int64(1) << ebits) - 1) << (p - 1)
        flags, words = _flag_array(n)
        near = 0
        for i in range(n):  # pass 1, branch-free (vectorised): every output, and which ones may round otherwise
            s, err, unsure, _ = _ties_plain(T, Ds, lams, ths, i, k_err, k_uns)
            out[i] = _round_bits(s, p, emin, bias, ebits, width, nanmode)
            dist = _midpoint_distance(s, p, emin, emax)
            e64 = (np.int64(_f64_bits(s)) >> 52) & 0x7FF
            q8 = _bits_f64(max(e64 - (p - 1) - 3, 1) << 52)  # an eighth of the format's spacing at s
            # not flagged: no midpoint within err of s (nor a binade edge), so s ∓ err round as s does
            f = fixup & np.isfinite(s) & (unsure | (dist <= err * (1.0 + 2.0 ** -40)) | (err >= q8))
            flags[i] = f
            near += f
        if near == 0:
            return 0
        terms = np.empty(2 * nd + 2)
        kept = np.empty(2 * nd + 2)
        hard = 0
        for kw in range(words.shape[0]):  # pass 2: the flagged elements
            w = words[kw]
            while w != 0:
                i = _flagged_at(w, kw)
                w &= w - np.uint64(1)
                s, err, unsure, sg = _ties_plain(T, Ds, lams, ths, i, k_err, k_uns)
                lo = _round_bits(s - err, p, emin, bias, ebits, width, nanmode)
                hi = _round_bits(s + err, p, emin, bias, ebits, width, nanmode)
                lo_nan = (lo & zero_mask) > inf_mag
                same = ((lo == hi) | (((lo | hi) & zero_mask) == 0)) & ~lo_nan  # equal as values
                if same and not unsure:
                    out[i] = lo
                    continue
                hard += 1
                t = _load(T, i)
                exact, s2 = _ties_float64_is_exact(Ds, lams, ths, i, t)
                if exact:  # s is the exact merge: its rounding is round_fraction's value (an exact zero: +0, as s)
                    out[i] = _round_bits(s2, p, emin, bias, ebits, width, nanmode)
                    continue
                if not unsure:
                    r = _ties_fix(Ds, lams, ths, i, t, s, err, sg, terms, p, emin, emax, bias, width)
                    if r >= 0:
                        out[i] = r
                        continue
                r = _ties_exact(T, Ds, lams, ths, i, terms, kept, p, emin, bias, ebits, width, nanmode)
                if r < 0:
                    return KERNEL_REFUSED
                out[i] = r
        return hard


def magnitude_histogram(values: np.ndarray, shift: int, prefix: int, hist: np.ndarray) -> None:
    """One level of a TIES cut-off's radix select over float64 ``values`` (``hist``: 65 536 counts, added to)."""
    _magnitude_histogram(values, shift, prefix, hist)


def magnitude_gather(values: np.ndarray, shift: int, prefix: int, out: np.ndarray, j: int) -> int:
    """The bits of |v| with ``prefix`` above ``shift`` appended to ``out`` from ``j``; returns the new end."""
    return int(_magnitude_gather(values, shift, prefix, out, j))


def window_gather(values: np.ndarray, lo: int, hi: int, out: np.ndarray, j: int, counts: np.ndarray) -> int:
    """One pass of a sampled selection: |v|'s bits below ``lo`` counted, those in [lo, hi] counted and gathered
    into ``out`` (from ``j``, while it has room); returns the new end. ``values``: a Δ chunk as the kernel
    reads it (a stored dtype's view, or float64)."""
    return int(_window_gather(values, np.int64(lo), np.int64(hi), out, j, counts))


def ties_into(out: np.ndarray, out_dtype: str, target: np.ndarray, values: list[np.ndarray], scales: list[float],
              thresholds: list[float]) -> int:
    """``out ← round(t + TIES merge of the λ_i·Δ_i)``, the torch path's bytes (see the module).

    ``out``: the chunk's output bytes viewed as :func:`deltaport.kernel.out_view`; ``target``: the stored
    target viewed as :func:`deltaport.kernel.in_view`; ``values``: each Δ_i (with its exact residual) as float64;
    ``thresholds``: their magnitude cut-offs (:func:`deltaport.numerics.ties_threshold`). Returns how many
    elements were decided exactly, or :data:`~deltaport.kernel.KERNEL_REFUSED`."""
    if K.numba is None:
        return KERNEL_REFUSED
    fmt = FORMATS[out_dtype]
    return int(_ties_kernel(out, target, tuple(values), np.asarray(scales, dtype=np.float64),
                            np.asarray(thresholds, dtype=np.float64), fmt, out_dtype != "float64"))


def torch_ties_into(out: np.ndarray, out_dtype: str, target: np.ndarray, values: list[np.ndarray], scales: list[float],
                    thresholds: list[float]) -> int:
    """The torch path with :func:`ties_into`'s arguments (as the engine computes a TIES chunk without the
    kernel). Returns the number of elements decided exactly."""
    import torch

    from deltaport.numerics import compose_deltas, round_composed_exactly, transfer_into

    res = torch.from_numpy(out).view(getattr(torch, out_dtype))
    t = torch.from_numpy(K.widen(target))
    vals = [torch.from_numpy(np.array(v, dtype=np.float64)) for v in values]
    d, mag, unsure = compose_deltas(vals, [float(s) for s in scales], [float(x) for x in thresholds])
    transfer_into(res, t.clone(), d, None, 1.0)
    if out_dtype == "float64":
        return 0
    return round_composed_exactly(res, t, d, mag, vals, [float(s) for s in scales], [float(x) for x in thresholds],
                                  unsure)
