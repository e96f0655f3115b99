"""The fused exact kernel: one pass per chunk, every element computed in registers and rounded once.

:func:`fused_into` computes, for every element of a chunk, the value of the output dtype nearest the
exact

* ``t + λ·(f − b)`` (a transfer, an apply, a diff: ``t`` and ``b`` may be absent), or
* ``t + Σ λ_i·Δ_i`` (a composed apply),

with λ its float64 value (docs/FORMAT.md, "What λ means"). :func:`torch_into` is the fallback with the
same arguments (``deltaport.numerics``, element-wise torch operations, ~20 passes over the chunk); both
give the same bytes (``tests/test_kernel.py``). ``DELTAPORT_KERNEL=torch`` forces the fallback; the
engine also uses it where the kernel refuses (numba missing, a product of magnitude below 2⁻⁹⁶⁰: see
:data:`KERNEL_REFUSED`) and ``deltaport.json`` records which path ran (``arithmetic``). TIES has its own
kernel beside this one, :mod:`deltaport.kernel_ties` (same helpers, same fallback rule).

How one element is computed (numba, ``@njit(nogil=True, cache=True, error_model="numpy")``): the inputs are
read in their stored dtypes (bf16 and fp16 enter as 16-bit integers: numba has no bf16 type; the array's
integer type says which: ``uint16`` = bf16 bits, ``int16`` = fp16 bits) and widened to float64, which is
exact. The float64 result ``s`` is formed in the fallback's order of operations (so NaN, Inf and the sign
of an exact zero come out as the fallback's), and beside it the exact errors of each step: Knuth's TwoSum
for every addition, an FMA for every product. Where every error is zero (λ a power of two and 16-bit
inputs: nearly every element) ``s`` *is* the exact value and its rounding to the output format (integer
arithmetic on the float64 bits, round half to even) is the answer. Otherwise ``s`` differs from the
exact value x by less than the sum of the errors' magnitudes, B; where ``s`` is farther than B from
every midpoint of the output format, s and x round alike. The remaining elements (within B of a
midpoint M: ~3 % at λ = 0.7 on N(0, 0.02) bf16 weights, where the value for 7/10 is on a midpoint) are
decided by the sign of x − M, exactly: for a transfer ``fma(λ, f − b, t − M)`` (one rounding of an
exact value keeps its sign) when ``f − b`` and ``t − M`` are exact; for a composed apply one
Ogita–Rump–Oishi Sum2 of t, the products' halves (FMA-split) and −M, with its error bound, M cut from
s's bits (2026-12-06: 61 → ~23 ns per such element); otherwise the full decision: an estimate of x by
Sum2, its bracket, Sum2 again and, where even that cannot tell, a Shewchuk expansion of x − M. A chunk
takes two passes: a branch-free first pass over the whole chunk (which LLVM vectorises) writes every
output and a flag byte per element (uncertain or not); the second, scalar pass visits only the flagged
elements, found eight flags at a time by a bit scan of 8-byte words (little-endian byte order, as on
every platform numba supports). (Blocks of 512 elements with a small flag array, as before 2026-12-06,
kept LLVM from vectorising the first pass: twice the time at λ = 1.) A result that rounds to zero
without being exactly zero keeps the float64 result's sign of zero, as the fallback's. The engine
splits a chunk over ``--threads`` threads (whole multiples of :data:`BLOCK` elements), one kernel call
each, the first on its own thread (the kernel releases the GIL); its reader and writer threads run beside
them.
"""

from __future__ import annotations

import logging
import os

import numpy as np

LOG = logging.getLogger(__name__)

ENV_SWITCH = "DELTAPORT_KERNEL"  # "torch": always the fallback; "numba" (default): the kernel where it applies
KERNEL_REFUSED = -1  # what the kernel returns for a chunk it cannot decide exactly (the fallback then computes it)
BLOCK = 512  # the engine cuts a chunk for --threads at multiples of this

# output formats: (significand bits p, min normal exponent, exponent bias, exponent bits, width, NaN mode)
# NaN modes mimic torch's conversions on this CPU: 0 = bf16 (torch writes 0xFFFF), 1 = fp16 (sign | 0x7E00),
# 2 = fp32 (sign, quiet bit and the top of the float64 payload), 3 = fp64 (the float64 result itself)
FORMATS = {"bfloat16": (8, -126, 127, 8, 16, 0), "float16": (11, -14, 15, 5, 16, 1),
           "float32": (24, -126, 127, 8, 32, 2), "float64": (53, -1022, 1023, 11, 64, 3)}
_OUT_VIEW = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32, "float64": np.uint64}
_IN_VIEW = {"bfloat16": np.uint16, "float16": np.int16, "float32": np.float32, "float64": np.float64}

_numba_error: str | None = None
try:
    import numba
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError as exc:  # pragma: no cover - numba is a core dependency; kept for exotic platforms
    numba = None
    _numba_error = f"numba is not importable ({exc})"


def available() -> bool:
    """True when the kernel can run (numba imports) and ``DELTAPORT_KERNEL`` does not force the fallback."""
    return numba is not None and os.environ.get(ENV_SWITCH, "numba").strip().lower() != "torch"


def in_view(dtype_name: str):
    """The numpy dtype a stored input of ``dtype_name`` is viewed as (bf16 → uint16, fp16 → int16)."""
    return _IN_VIEW.get(dtype_name)


def out_view(dtype_name: str):
    return _OUT_VIEW.get(dtype_name)


if numba is not None:
    # ---- bit casts and FMA (numba has no scalar bit cast; LLVM's are free) ---------------------------
    @intrinsic
    def _f64_bits(typingctx, x):
        if x != types.float64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64))
        return types.uint64(types.float64), codegen

    @intrinsic
    def _bits_f64(typingctx, x):
        if not isinstance(x, types.Integer) or x.bitwidth != 64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(x), codegen

    @intrinsic
    def _bits_f32(typingctx, x):  # the low 32 bits of an integer, as a float32
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width > 32:
                v = builder.trunc(v, ir.IntType(32))
            elif v.type.width < 32:
                v = builder.zext(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(x), codegen

    @intrinsic
    def _fma(typingctx, a, b, c):
        if not (a == b == c == types.float64):
            return None

        def codegen(context, builder, sig, args):
            d = ir.DoubleType()
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(d, [d, d, d]), "llvm.fma.f64")
            return builder.call(fn, args)
        return types.float64(types.float64, types.float64, types.float64), codegen

    # ---- inputs: the stored dtype, widened to float64 exactly ----------------------------------------
    def _load(a, i):  # pragma: no cover - replaced by the overload inside compiled code
        raise NotImplementedError

    @overload(_load, inline="always")
    def _load_ol(a, i):
        dt = a.dtype
        if dt == types.uint16:  # bfloat16 bits: the top half of a float32
            return lambda a, i: np.float64(_bits_f32(np.uint32(a[i]) << np.uint32(16)))
        if dt == types.int16:  # float16 bits
            def f16(a, i):
                h = np.uint32(np.uint16(a[i]))
                sign = (h >> np.uint32(15)) << np.uint32(31)
                e = (h >> np.uint32(10)) & np.uint32(0x1F)
                m = h & np.uint32(0x3FF)
                # float32 bits of a normal (exponent rebiased) or Inf/NaN (e = 31 → 255), then the subnormals
                # (e = 0: m·2⁻²⁴, exact in float32) blended in arithmetically: numba's SSA check warns (at compile
                # time, on the user's screen) about selects here
                top = (e + np.uint32(112) + np.uint32(e == 31) * np.uint32(112)) << np.uint32(23)
                v = _bits_f32(sign | top | (m << np.uint32(13)))
                sub = np.float32(m) * np.float32(2.0 ** -24) * (np.float32(1.0) - np.float32(sign >> np.uint32(30)))
                z = np.float32(e == 0)
                v = v * (np.float32(1.0) - z) + sub * z  # exact: one term is ±0 (v finite where e = 0)
                return np.float64(v)
            return f16
        if dt == types.float32:
            return lambda a, i: np.float64(a[i])
        if dt == types.float64:
            return lambda a, i: a[i]
        return None

    # ---- rounding a float64 once into the output format (bits) ---------------------------------------
    @njit(inline="always", error_model="numpy")
    def _round_bits(s, p, emin, bias, ebits, width, nanmode):
        """Bits of the output-format value nearest the float64 ``s`` (ties to even; overflow to ±inf), as an
        int64. Branch-free (selects only), so that LLVM vectorises the loops that call it."""
        u = np.int64(_f64_bits(s))
        sign = (u >> 63) & 1
        mag = u & 0x7FFFFFFFFFFFFFFF
        e64 = mag >> 52
        sh = 53 - p
        inf_mag = ((np.int64(1) << ebits) - 1) << (p - 1)
        # normal range: round the float64 significand at bit sh, half to even; a carry moves into the exponent
        lsb = (mag >> sh) & 1
        r_norm = ((mag + ((np.int64(1) << (sh - 1)) - 1) + lsb) >> sh) - ((1023 - bias) << (p - 1))
        r_norm = min(r_norm, inf_mag)
        # below the normal range: |s|·2^(p−1−emin) (exact) rounded half-even to an integer by adding 2^52
        a = _bits_f64(mag) * _bits_f64(np.int64(1023 + p - 1 - emin) << 52)
        a = min(a, 2.0 ** 51)
        r_sub = np.int64(_f64_bits(a + 2.0 ** 52)) - np.int64(0x4330000000000000)
        r = r_norm if e64 >= 1023 + emin else r_sub
        nan = mag > 0x7FF0000000000000
        nan_r = inf_mag | (np.int64(1) << (p - 2)) | (((mag & 0xFFFFFFFFFFFFF) >> sh) if nanmode == 2 else 0)
        r = nan_r if nan else r
        res = r | (sign << (width - 1))
        res = ((np.int64(1) << width) - 1) if (nan & (nanmode == 0)) else res
        return u if nanmode == 3 else res

    @njit(inline="always", error_model="numpy")
    def _two_sum_err(a, b, s):
        bb = s - a
        return (a - (s - bb)) + (b - bb)

    @njit(inline="always", error_model="numpy")
    def _midpoint_distance(s, p, emin, emax):
        """|s − M| for the output-format midpoint M nearest s, for s in the format's normal range below
        its overflow (else -1.0: decide exactly)."""
        mag = np.int64(_f64_bits(s)) & 0x7FFFFFFFFFFFFFFF
        e = (mag >> 52) - 1023
        sh = 53 - p
        mid = (mag & ~((np.int64(1) << sh) - 1)) | (np.int64(1) << (sh - 1))  # |s| cut to p bits, plus half a step
        d = abs(_bits_f64(mag) - _bits_f64(mid))  # exact (Sterbenz: one binade)
        return d if (e >= emin) & (e < emax) else -1.0

    @njit(inline="always", error_model="numpy")
    def _bracket(a, p, emin):
        """For float64 |a| > 0: (lo, q): the output-format value lo ≤ |a| next below (toward zero) and the
        format's spacing q there (the candidates are lo and lo + q, their midpoint lo + q/2)."""
        mag = np.int64(_f64_bits(a)) & 0x7FFFFFFFFFFFFFFF
        e = (mag >> 52) - 1023
        qe = max(e, emin) - (p - 1)
        q = _bits_f64(np.int64(qe + 1023) << 52)
        lo = np.floor(abs(a) * _bits_f64(np.int64(1023 - qe) << 52)) * q  # |a|/q: exact, q a power of two
        return lo, q

    @njit(error_model="numpy")
    def _expansion_sign(terms, n):
        """Sign (−1, 0, 1) of the exact sum of ``terms[:n]`` (Shewchuk's Grow-Expansion; float64, no overflow)."""
        comps = np.empty(n)
        m = 0
        for j in range(n):
            q = terms[j]
            k = 0
            for c in range(m):
                s = q + comps[c]
                err = _two_sum_err(q, comps[c], s)
                q = s
                if err != 0.0:
                    comps[k] = err
                    k += 1
            comps[k] = q
            m = k + 1
        for c in range(m - 1, -1, -1):
            if comps[c] > 0.0:
                return 1
            if comps[c] < 0.0:
                return -1
        return 0

    @njit(error_model="numpy")
    def _sum2(terms, n):
        """(res, bound): Ogita–Rump–Oishi Sum2 of ``terms[:n]``; the exact sum has res's sign if |res| > bound."""
        s = terms[0]
        e = 0.0
        mags = abs(terms[0])
        for j in range(1, n):
            x = terms[j]
            t = s + x
            e += _two_sum_err(s, x, t)
            s = t
            mags += abs(x)
        res = s + e
        g = n * 2.0 ** -53
        return res, 4.0 * g * g * mags + 2.0 ** -1000

    @njit(error_model="numpy")
    def _decide(terms, n, s, p, emin, bias, ebits, width, nanmode):
        """Bits of the value nearest the exact sum of ``terms[:n]`` (all finite, products split exactly);
        ``s``: the plain float64 result (its sign is an exact zero's sign). Returns -1 where the sum's
        magnitude estimate cannot be trusted (never seen; the engine then uses the fallback)."""
        # estimate x: Sum2 is within 2⁻¹⁰⁰ of the terms' magnitudes; the expansion settles 0 and tiny values
        est, bound = _sum2(terms, n)
        if abs(est) <= bound:
            sg = _expansion_sign(terms, n)
            if sg == 0:  # exactly zero: the plain result's zero (the fallback's sign rules)
                return _round_bits(s if s == 0.0 else 0.0, p, emin, bias, ebits, width, nanmode)
            if bound > 2.0 ** -200:
                return -1
            est = sg * bound  # |x| ≤ 2·bound: far below every format's smallest subnormal
        lo, q = _bracket(est, p, emin)
        mid = lo + 0.5 * q
        neg = est < 0.0
        terms[n] = mid if neg else -mid  # x − M (M with x's sign)
        r, b = _sum2(terms, n + 1)
        sg = 0
        if r > b:
            sg = 1
        elif r < -b:
            sg = -1
        else:
            sg = _expansion_sign(terms, n + 1)
        if neg:
            sg = -sg  # now the sign of |x| − |M|
        k = lo / q
        up = sg > 0 or (sg == 0 and np.floor(k * 0.5) * 2.0 != k)
        v = lo + q if up else lo
        if v == 0.0:  # x ≠ 0 rounds to zero: the fallback's zero, i.e. that of the float64 result where it rounds
            r0 = _round_bits(s, p, emin, bias, ebits, width, nanmode)  # to zero too (its brackets are ±0, equal)
            if (r0 & ((np.int64(1) << (width - 1)) - 1)) == 0:
                return r0
        return _round_bits(-v if neg else v, p, emin, bias, ebits, width, nanmode)

    @njit(inline="always", error_model="numpy")
    def _split_product(lam, v, terms, j):
        """terms[j], terms[j+1] = λ·v exactly (FMA). False where the error term could underflow."""
        hi = lam * v
        terms[j] = hi
        terms[j + 1] = _fma(lam, v, -hi)
        return not (hi != 0.0 and abs(hi) < 2.0 ** -960)

    # ---- transfer: out = t + λ·(f − b) ---------------------------------------------------------------
    @njit(inline="always", error_model="numpy")
    def _transfer_plain(T, F, Bm, i, lam, has_t, has_b, zero_target):
        """The fallback's float64 arithmetic for one element (its order of operations) and the magnitude
        bound of its errors (0.0 exactly when every step was exact). Selects only: absent inputs are read
        from a stand-in array and ignored."""
        f = _load(F, i)
        b = _load(Bm, i)
        b = b if has_b else 0.0
        d = f - b if has_b else f
        err = abs(_two_sum_err(f, -b, d)) * abs(lam)
        p = d * lam  # exact for λ = 1 (also for NaN)
        err += abs(_fma(lam, d, -p))
        t = _load(T, i)
        t = t if has_t else 0.0
        s = t + p
        err += abs(_two_sum_err(t, p, s))
        s = s if (has_t | zero_target) else p  # the fallback's exact path adds a zero target (a zero's sign)
        return s, err

    @njit(inline="always", error_model="numpy")
    def _unsure(s, err, p, emin, emax):
        """True where s is within err of a midpoint of the output format (or outside its normal range)
        and some step was inexact: there s and the exact value may round differently."""
        dist = _midpoint_distance(s, p, emin, emax)
        return (err != 0.0) & (dist <= err * (1.0 + 2.0 ** -40)) & np.isfinite(s)

    @njit(inline="always", error_model="numpy")
    def _transfer_fix(T, F, Bm, i, lam, has_t, has_b, s, err, p, emin, bias, ebits, width, nanmode):
        """(bits, ok): the rounding of the exact t + λ·(f − b) for an element whose float64 result s is near a
        midpoint M, from the sign of ``fma(λ, f − b, t − M)`` (one rounding of an exact value keeps its
        sign); ok is False where that does not apply (f − b or t − M inexact, s outside the normal range,
        errors larger than a quarter step)."""
        f = _load(F, i)
        b = _load(Bm, i)
        b = b if has_b else 0.0
        t = _load(T, i)
        t = t if has_t else 0.0
        d = f - b
        lo, q = _bracket(s, p, emin)
        mid = lo + 0.5 * q
        m = -mid if s < 0.0 else mid
        c = t - m
        ok = (_two_sum_err(f, -b, d) == 0.0) & (_two_sum_err(t, -m, c) == 0.0) & (err < 0.125 * q) \
            & (_midpoint_distance(s, p, emin, (1 << (ebits - 1))) >= 0.0)
        r = _fma(lam, d, c)
        sg = np.float64(r > 0.0) - np.float64(r < 0.0)
        sg = -sg if s < 0.0 else sg  # the sign of |x| − |M|
        k = lo / q
        odd = np.floor(k * 0.5) * 2.0 != k
        up = (sg > 0.0) | ((sg == 0.0) & odd)
        v = lo + q if up else lo
        return _round_bits(-v if s < 0.0 else v, p, emin, bias, ebits, width, nanmode), ok

    @intrinsic
    def _cttz(typingctx, x):  # trailing zero bits of a nonzero uint64 (LLVM's cttz: one instruction)
        if x != types.uint64:
            return None

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
            return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])
        return types.uint64(types.uint64), codegen

    @njit(inline="always")
    def _flag_array(n):
        """Flags of n elements (0 or 1 bytes; the tail of the last 8-byte word zeroed) and their 8-byte words."""
        flags = np.empty(((n + 7) // 8) * 8, dtype=np.uint8)
        flags[n:] = 0
        return flags, flags.view(np.uint64)

    @njit(inline="always")
    def _flagged_at(w, k):
        """The element of word ``k``'s lowest set flag (``w`` its remaining flags: nonzero)."""
        return k * 8 + np.int64(_cttz(w) >> np.uint64(3))

    @njit(nogil=True, cache=True, error_model="numpy")
    def _transfer_kernel(out, T, F, Bm, lam, has_t, has_b, zero_target, fmt):
        p, emin, bias, ebits, width, nanmode = fmt
        emax = 1 << (ebits - 1)
        n = out.shape[0]
        exact_out = nanmode != 3  # float64 outputs are the plain result (as the fallback's)
        fuse = exact_out & (lam != 1.0)  # λ·d inexact: decide near-midpoint elements in the first pass
        flags, words = _flag_array(n)  # one byte per element: LLVM vectorises a flat loop storing them (a small
        # per-block array defeated it: 2x slower); pass 2 visits the set flags by words (bit scans, few branches)
        unsure = 0
        refused = 0
        terms = np.empty(8)
        hard = 0
        if fuse:  # pass 1, vectorised: every output, and which ones lie near a midpoint
            for i in range(n):
                s, err = _transfer_plain(T, F, Bm, i, lam, has_t, has_b, zero_target)
                out[i] = _round_bits(s, p, emin, bias, ebits, width, nanmode)
                u = _unsure(s, err, p, emin, emax)
                flags[i] = u
                hard += u
        else:
            for i in range(n):  # λ a power of two: nearly always exact; inexact steps are checked below
                s, err = _transfer_plain(T, F, Bm, i, lam, has_t, has_b, zero_target)
                out[i] = _round_bits(s, p, emin, bias, ebits, width, nanmode)
                u = (err != 0.0) & exact_out
                flags[i] = u
                hard += u
        if hard == 0:
            return 0
        for kw in range(words.shape[0]):  # pass 2: the uncertain elements, from the exact decisions
            w = words[kw]
            while w != 0:
                i = _flagged_at(w, kw)
                w &= w - np.uint64(1)
                s, err = _transfer_plain(T, F, Bm, i, lam, has_t, has_b, zero_target)
                if fuse or _unsure(s, err, p, emin, emax):
                    unsure += 1
                    done = False
                    if fuse:
                        r2, ok = _transfer_fix(T, F, Bm, i, lam, has_t, has_b, s, err, p, emin, bias, ebits, width, nanmode)
                        if ok:
                            out[i] = r2
                            done = True
                    if not done:
                        f = _load(F, i)
                        k = 0
                        if has_t:
                            terms[k] = _load(T, i)
                            k += 1
                        ok = _split_product(lam, f, terms, k)
                        k += 2
                        if has_b:
                            ok &= _split_product(-lam, _load(Bm, i), terms, k)
                            k += 2
                        r = _decide(terms, k, s, p, emin, bias, ebits, width, nanmode) if ok else -1
                        if r < 0:
                            refused += 1
                        else:
                            out[i] = r
        return KERNEL_REFUSED if refused else unsure

    # ---- composed apply: out = t + Σ λ_i·Δ_i ---------------------------------------------------------
    @njit(inline="always", error_model="numpy")
    def _compose_plain(T, Ds, lams, i):
        acc = 0.0
        err = 0.0
        for j in range(len(Ds)):
            v = _load(Ds[j], i)
            c = v * lams[j]
            err += abs(_fma(lams[j], v, -c))
            a = acc + c
            err += abs(_two_sum_err(acc, c, a))
            acc = a
        t = _load(T, i)
        s = t + acc
        err += abs(_two_sum_err(t, acc, s))
        return s, err

    @njit(inline="always", error_model="numpy")
    def _compose_fix(terms, n, s, err, p, emin, emax, bias, width, k=1.0):
        """Bits of the rounding of x = (exact sum of ``terms[:n]``)/k (t and the products' halves; k a small
        integer: kernel_ties' mean of k kept entries, the terms holding k·t) for an element whose float64 result
        s lies within err of x, near a midpoint, the short way: the midpoint M next to s and its neighbours are
        cut from s's bits (as in :func:`_transfer_fix`), the sign of x − M comes from one Sum2 of the terms and
        −k·M (exact: M has p + 1 bits, k ≤ 3). -1 where that does not decide (a tie within Sum2's bound, s
        outside the normal range, errors above q/8): :func:`_decide` then does it all."""
        u = np.int64(_f64_bits(s))
        sign = (u >> 63) & 1
        mag = u & 0x7FFFFFFFFFFFFFFF
        sh = 53 - p
        lo_mag = mag & ~((np.int64(1) << sh) - 1)
        m = _bits_f64(lo_mag | (np.int64(1) << (sh - 1)) | (sign << 63))  # M, with s's sign
        e64 = mag >> 52
        q8 = _bits_f64(max(e64 - (p - 1) - 3, 1) << 52)
        if not ((err < q8) & (e64 >= 1023 + emin) & (e64 < 1023 + emax)):
            return -1
        terms[n] = -m * k
        r, b = _sum2(terms, n + 1)
        if abs(r) <= b:
            return -1
        up = (r > 0.0) if sign == 0 else (r < 0.0)  # |x| > |M|
        lo = (lo_mag >> sh) - ((1023 - bias) << (p - 1))
        return (lo + np.int64(up)) | (sign << (width - 1))

    @njit(nogil=True, cache=True, error_model="numpy")
    def _compose_kernel(out, T, Ds, lams, fmt):
        p, emin, bias, ebits, width, nanmode = fmt
        emax = 1 << (ebits - 1)
        n = out.shape[0]
        nd = len(Ds)
        exact_out = nanmode != 3
        flags, words = _flag_array(n)
        terms = np.empty(2 * nd + 2)
        unsure = 0
        refused = 0
        for i in range(n):
            s, err = _compose_plain(T, Ds, lams, i)
            out[i] = _round_bits(s, p, emin, bias, ebits, width, nanmode)
            u = _unsure(s, err, p, emin, emax) & exact_out
            flags[i] = u
            unsure += u
        if unsure == 0:
            return 0
        for kw in range(words.shape[0]):
            w = words[kw]
            while w != 0:
                i = _flagged_at(w, kw)
                w &= w - np.uint64(1)
                s, err = _compose_plain(T, Ds, lams, i)
                terms[0] = _load(T, i)
                ok = True
                for j in range(nd):
                    ok &= _split_product(lams[j], _load(Ds[j], i), terms, 1 + 2 * j)
                r = -1
                if ok:
                    r = _compose_fix(terms, 1 + 2 * nd, s, err, p, emin, emax, bias, width)
                    if r < 0:
                        r = _decide(terms, 1 + 2 * nd, s, p, emin, bias, ebits, width, nanmode)
                if r < 0:
                    refused += 1
                else:
                    out[i] = r
        return KERNEL_REFUSED if refused else unsure


if numba is not None:
    @njit(nogil=True, cache=True)
    def _count_nonfinite(bits, mask):  # elements whose exponent bits are all ones (Inf, NaN): one vectorised pass
        n = 0
        for i in range(bits.shape[0]):
            n += (bits[i] & mask) == mask
        return n


def all_finite(raw: np.ndarray, dtype_name: str) -> bool | None:
    """True iff the bytes ``raw`` hold only finite ``dtype_name`` values, decided on the bits without torch;
    None where the kernel cannot tell (numba missing, or a dtype without :func:`out_view`)."""
    view = _OUT_VIEW.get(dtype_name)
    if numba is None or view is None:
        return None
    p, _, _, ebits, _, _ = FORMATS[dtype_name]
    return _count_nonfinite(raw.view(view), view(((1 << ebits) - 1) << (p - 1))) == 0  # (the exponent field)


def _is_pow2(lam: float) -> bool:
    import math
    return lam != 0.0 and math.isfinite(lam) and math.frexp(abs(lam))[0] == 0.5


def fused_into(out: np.ndarray, out_dtype: str, target: np.ndarray | None, terms: list[tuple[np.ndarray, np.ndarray | None]],
               scales: list[float], *, compose: bool = False) -> int:
    """The kernel: ``out ← round(target + Σ λ_i·(plus_i − minus_i))`` (one term with a ``minus``: a transfer;
    several without: a composed apply), each element the ``out_dtype`` value nearest the exact result.

    ``out``: the chunk's output bytes viewed as :func:`out_view` (uint16 for bf16/fp16, uint32 for fp32,
    uint64 for fp64); inputs: 1-D arrays of the chunk's length in their stored dtype, viewed as
    :func:`in_view`; ``target`` None for none (a diff). float64 outputs are the plain float64 result, as the
    fallback's. Returns how many elements needed a decision beyond the float64 result, or
    :data:`KERNEL_REFUSED` (then ``out`` is incomplete: compute the chunk with the fallback). ``compose``: a
    single term without ``minus`` is summed as a composed apply's one Δ (its sum starts at +0: t + (+0 + λ·Δ),
    whose zero signs differ from a transfer's t + λ·Δ where both t and λ·Δ are −0)."""
    fmt = FORMATS[out_dtype]
    if len(terms) == 1 and not (compose and target is not None and terms[0][1] is None):
        plus, minus = terms[0]
        lam = float(scales[0])
        has_t, has_b = target is not None, minus is not None
        if len({a.dtype for a in (target, plus, minus) if a is not None}) > 1:  # one specialisation per dtype
            target, plus, minus = (None if a is None else widen(a) for a in (target, plus, minus))
        return int(_transfer_kernel(out, target if has_t else plus, plus, minus if has_b else plus, lam, has_t, has_b,
                                    not _is_pow2(lam) and lam != 0.0 and out_dtype != "float64", fmt))
    if target is None or any(m is not None for _, m in terms):
        return KERNEL_REFUSED
    if len({a.dtype for a, _ in terms}) != 1:
        terms = [(widen(a), None) for a, _ in terms]
    return int(_compose_kernel(out, target, tuple(a for a, _ in terms), np.asarray(scales, dtype=np.float64), fmt))


def widen(a: np.ndarray) -> np.ndarray:
    """float64 values of a kernel input (a copy; used only where a chunk mixes dtypes, so that numba compiles
    one specialisation per stored dtype rather than one per combination)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if a.dtype == np.int16:
        return a.view(np.float16).astype(np.float64)
    return a.astype(np.float64)


_TORCH_OF_VIEW = {np.dtype(np.uint16): "bfloat16", np.dtype(np.int16): "float16", np.dtype(np.float32): "float32",
                  np.dtype(np.float64): "float64"}


def torch_into(out: np.ndarray, out_dtype: str, target: np.ndarray | None, terms: list[tuple[np.ndarray, np.ndarray | None]],
               scales: list[float], *, compose: bool = False) -> int:
    """The fallback, with :func:`fused_into`'s arguments: the same result from ``deltaport.numerics`` (element-
    wise torch operations in float64, the exact decisions where float64 cannot tell), as the engine computes
    a chunk without the kernel. Returns the number of elements decided exactly."""
    import torch

    from deltaport.numerics import compose_deltas, round_composed_exactly, transfer_into

    def f64(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        name = _TORCH_OF_VIEW[a.dtype]
        return t.view(getattr(torch, name)).to(torch.float64) if name != "float64" else t.clone()

    res = torch.from_numpy(out).view(getattr(torch, out_dtype))
    t = None if target is None else f64(target)
    if len(terms) == 1 and not (compose and t is not None and terms[0][1] is None):
        plus, minus = terms[0]
        return transfer_into(res, t, f64(plus), None if minus is None else f64(minus), float(scales[0]))
    vals = [f64(p) for p, _ in terms]
    d, mag, unsure = compose_deltas(vals, [float(s) for s in scales])
    transfer_into(res, t.clone(), d, None, 1.0)
    if out_dtype == "float64":
        return 0
    return round_composed_exactly(res, t, d, mag, vals, [float(s) for s in scales], None, unsure)
