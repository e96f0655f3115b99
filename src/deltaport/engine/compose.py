"""A composed apply (several Δs onto one target) on the torch path: the sum Σ λ_i·Δ_i or its TIES merge, per
chunk in float64 (the arithmetic is :func:`deltaport.numerics.compose_deltas`), and the exact rounding where
float64 cannot decide; and the TIES magnitude cut-offs found by streaming each Δ (never held whole), with
numba (:mod:`deltaport.kernel_ties`) where the kernel computes the merge, else with torch. (The kernels'
chunks: :mod:`deltaport.engine.fused`.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from deltaport.plan import TensorOp

if TYPE_CHECKING:
    import torch

# TIES thresholds: candidates gathered for the final selection once this few remain (8 MB of float64 bits)
TIES_GATHER = 1 << 20
# the sampled first try (numba path): this many windows of this many elements, spread over the tensor
SAMPLE_WINDOWS, SAMPLE_WINDOW = 32, 8192


class ComposeMixin:
    """:class:`~deltaport.engine.core.Engine`'s composed apply."""

    def _ties_thresholds(self, op: TensorOp, row_elems: int) -> list[float]:
        """TIES trim: per delta, the magnitude its entries must reach in this tensor to be kept
        (:func:`~deltaport.numerics.ties_threshold`: the ⌈density·N⌉-th largest |Δ_i|), found by streaming."""
        cache = getattr(self, "_ties_cache", None)
        if cache is not None and cache[0] == op.name:
            return cache[1]
        thresholds = [self._streamed_threshold(op, i, part) for i, part in enumerate(op.deltas)]
        self._ties_cache = (op.name, thresholds)
        return thresholds

    def _streamed_threshold(self, op: TensorOp, i: int, part) -> float:
        """The k-th largest |Δ_i| of one tensor (k = ⌈density·N⌉), the value ``torch.kthvalue`` gives on the
        whole tensor, without holding it: a radix select on the float64 bit patterns of the magnitudes
        (non-negative floats order as their bits do). Each pass streams the Δ chunk by chunk and counts the
        candidates by their next 16 bits; once at most :data:`TIES_GATHER` candidates remain they are
        gathered and the rest is one selection (memory: a 65 536-bin histogram and those candidates).
        The passes read through the chunk buffers and residual cache of :meth:`_compose` (key ``d{i}``):
        the thresholds are found before the tensor's first chunk is composed, which then reads them again."""
        numel = op.numel
        k = max(1, math.ceil(op.ties_density * numel))
        if k >= numel:
            return 0.0
        rank = numel - k + 1  # 1-based, ascending: kthvalue's k
        fused = self._ties_applies(op)  # numba, no torch (kernel_ties); else torch's abs, mask, shift and bincount
        if fused:
            from deltaport import kernel_ties

            got = self._sampled_threshold(op, i, part, rank)
            if got is not None:
                return got

        def magnitudes():
            for e0, e1, rows in self._chunks(op):
                if fused:
                    yield self._ties_values(op, i, part, e0, e1, rows)
                else:
                    import torch

                    v = self._part_values(op, i, part, e0, e1, rows, key=f"d{i}")
                    yield v.abs_().view(torch.int64)  # (v is this chunk's own buffer)

        prefix, shift = 0, 64
        while shift > 0:
            shift -= 16
            hist = np.zeros(1 << 16, dtype=np.int64)
            for bits in magnitudes():
                if fused:
                    kernel_ties.magnitude_histogram(bits, shift, prefix, hist)
                    continue
                if shift < 48:
                    bits = bits[(bits >> (shift + 16)) == prefix]
                hist += np.bincount(((bits >> shift) & 0xFFFF).reshape(-1).numpy(), minlength=1 << 16)
            cum = hist.cumsum(0)
            b = int(np.searchsorted(cum, rank))
            rank -= int(cum[b - 1]) if b else 0
            prefix = (prefix << 16) | b
            if int(hist[b]) <= TIES_GATHER:
                break
        if shift > 0:  # the hist[b] candidates into one array, selected in place (kthvalue would copy them)
            cand = np.empty(int(hist[b]), dtype=np.int64)
            j = 0
            for bits in magnitudes():
                if fused:
                    j = kernel_ties.magnitude_gather(bits, shift, prefix, cand, j)
                    continue
                sel = bits[(bits >> shift) == prefix].numpy()
                cand[j:j + len(sel)] = sel
                j += len(sel)
            cand.partition(rank - 1)
            prefix = int(cand[rank - 1])
        return float(np.array([prefix], dtype=np.int64).view(np.float64)[0])

    def _sampled_threshold(self, op: TensorOp, i: int, part, rank: int) -> float | None:
        """The rank-th smallest |Δ_i| in one pass over the tensor where a sample brackets it (else None: the
        radix select then, two or more passes). A tensor of at most :data:`TIES_GATHER` elements is gathered
        whole. Otherwise a sample (:data:`SAMPLE_WINDOWS` windows of :data:`SAMPLE_WINDOW` elements, evenly
        spread, read apart from the stream) gives magnitudes lo ≤ hi around the rank's quantile (± 4 standard
        deviations of a sample quantile, and no wider than half the gather buffer is expected to hold); the pass
        counts the magnitudes below lo and gathers those in [lo, hi]: where the rank falls among them, it is
        selected there, exactly (the sample only chooses the bracket)."""
        from deltaport import kernel_ties

        numel = op.numel
        rows = op.shape[0] if op.shape else 1
        row_elems = numel // rows if rows else 1
        cap = TIES_GATHER
        lo, hi = 0, np.iinfo(np.int64).max
        if numel > cap:
            win = min(SAMPLE_WINDOW, numel // SAMPLE_WINDOWS)
            starts = [(numel - win) * w // (SAMPLE_WINDOWS - 1) for w in range(SAMPLE_WINDOWS)]
            sample = np.sort(np.concatenate([np.abs(self._ties_f64(op, i, part, s, s + win, row_elems)).view(np.int64)
                                             for s in starts]))
            n, q = len(sample), rank / numel
            margin = min(int(4 * math.sqrt(n * q * (1 - q))) + 8, max(8, int(cap / 4 / numel * n)))
            a, b = int(q * n) - margin, int(q * n) + margin
            lo = int(sample[a]) if a > 0 else 0
            hi = int(sample[b]) if b < n - 1 else hi
        cand = np.empty(min(cap, numel), dtype=np.int64)
        counts = np.zeros(2, dtype=np.int64)
        j = 0
        for e0, e1, rows_ in self._chunks(op):
            j = kernel_ties.window_gather(self._ties_values(op, i, part, e0, e1, rows_), lo, hi, cand, j, counts)
        below, inside = int(counts[0]), int(counts[1])
        self.stats.ties_sampled[0 if (inside <= len(cand) and below < rank <= below + inside) else 1] += 1
        if inside > len(cand) or not below < rank <= below + inside:
            return None
        cand = cand[:inside]
        cand.partition(rank - below - 1)
        return float(cand[rank - below - 1:rank - below].view(np.float64)[0])

    def _compose(self, op: TensorOp, e0: int, e1: int, row_elems: int) -> torch.Tensor:
        """d = Σ_i λ_i·Δ_i (or the TIES merge of the λ_i·Δ_i) for a composed apply, in float64
        (:func:`~deltaport.numerics.compose_deltas`); the Δ_i and the error bound are kept for
        :meth:`_compose_fixup`."""
        from deltaport.numerics import compose_deltas

        thresholds = self._ties_thresholds(op, row_elems) if op.ties_density is not None else None
        self._compose_vals = [self._part_values(op, i, part, e0, e1, row_elems, key=f"d{i}")
                              for i, part in enumerate(op.deltas)]
        d, self._compose_mag, self._compose_unsure = compose_deltas(
            self._compose_vals, [part.scale for part in op.deltas], thresholds, buf=self.bufs.get)
        self._compose_d = d
        return d

    def _compose_fixup(self, op: TensorOp, out: torch.Tensor, e0: int, e1: int) -> None:
        """Round a composed chunk from the exact value where float64 cannot decide
        (:func:`~deltaport.numerics.round_composed_exactly`). float64 outputs and a float32 compute dtype keep
        the result as computed."""
        from deltaport.numerics import round_composed_exactly

        if op.out_dtype_name == "float64" or self.compute_dtype_name != "float64":
            return
        target = self._fill("base", op.base, e0, e1, op.shape[-1] if op.shape else 1)
        thresholds = self._ties_thresholds(op, 1) if op.ties_density is not None else None
        self.stats.exact_fixups += round_composed_exactly(
            out, target, self._compose_d, self._compose_mag, self._compose_vals, [part.scale for part in op.deltas],
            thresholds, self._compose_unsure, buf=self.bufs.get)
