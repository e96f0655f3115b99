"""A chunk through the fused kernel (:func:`deltaport.kernel.fused_into`): the inputs as their stored bytes,
one pass, one rounding; where the kernel does not apply the engine's torch path computes the chunk."""

from __future__ import annotations

import numpy as np

from deltaport import kernel
from deltaport.io import reader
from deltaport.io.tensors import dtype_size
from deltaport.plan import TensorOp, Term


def is_sparse_part(part) -> bool:
    """A composed op's part that is a sparse packed Δ (read by :meth:`FusedMixin._sparse_values`, no torch)."""
    return (part.lora is None and part.packed is not None and part.packed.method == "sparse" and part.residual is None
            and kernel.in_view(part.packed.values.dtype_name) is not None)


def _mask_bits(bits: np.ndarray, e0: int, n: int) -> np.ndarray:
    """Bits [e0, e0 + n) of a packed mask (element i at bit i % 8 of byte i // 8), as a bool array."""
    b0 = e0 // 8
    return np.unpackbits(bits[b0:(e0 + n + 7) // 8], bitorder="little")[e0 - 8 * b0:e0 - 8 * b0 + n].view(bool)


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
_bitcount = getattr(np, "bitwise_count", None) or _POPCOUNT.__getitem__  # (np.bitwise_count: numpy >= 2)


_PREFIX_BYTES = 1 << 12  # a packed mask's set bits are counted per this many bytes, once, for _count_before


def _count_before(bits: np.ndarray, e0: int, cache: dict) -> int:
    """How many bits of a packed mask are set before element e0: from per-block counts (made on first use
    and kept in ``cache``), then the block's bytes before e0 by popcount, then the bits of a partial byte.
    (Reads out of order, as a TIES cut-off's sample does, cost a block, not the mask up to e0.)"""
    if e0 == 0:
        return 0
    if "prefix" not in cache:
        nb = -(-len(bits) // _PREFIX_BYTES)
        per = np.zeros(nb * _PREFIX_BYTES, dtype=np.uint8)
        per[:len(bits)] = _bitcount(bits)
        per = per.reshape(nb, _PREFIX_BYTES).sum(axis=1, dtype=np.int64)
        cache["prefix"] = np.concatenate([[0], np.cumsum(per)])
    whole = e0 // 8
    blk = whole // _PREFIX_BYTES
    n = int(cache["prefix"][blk]) + int(_bitcount(bits[blk * _PREFIX_BYTES:whole]).sum(dtype=np.int64))
    return n + (int(np.count_nonzero(_mask_bits(bits, 8 * whole, e0 - 8 * whole))) if e0 % 8 else 0)


def plain_term(term: Term, numel: int) -> bool:
    """A term the kernel reads as stored bytes: a file tensor of a kernel dtype, no row map, covering ``numel``."""
    return (kernel.in_view(term.spec.dtype_name) is not None and term.rowmap is None and term.spec.numel >= numel
            and term.ck.memory_tensor(term.spec.name) is None)


class FusedMixin:
    """:class:`~deltaport.engine.core.Engine`'s use of the fused kernel."""

    def _kernel_input(self, key: str, term: Term, e0: int, e1: int, row_elems: int):
        """``term``'s values for output elements [e0, e1) as the kernel reads them: the stored bytes (this
        chunk's prefetched ones, or read now) viewed as :func:`deltaport.kernel.in_view`; float64 values
        from :meth:`_fill` where the term is not one plain file range (row maps, padding, memory)."""
        spec = term.spec
        view = kernel.in_view(spec.dtype_name)
        if view is None or term.rowmap is not None or spec.numel < e1 or term.ck.memory_tensor(spec.name) is not None:
            return self._fill(key, term, e0, e1, row_elems).numpy()
        itemsize = dtype_size(spec.dtype_name)
        nbytes = (e1 - e0) * itemsize
        raw = self._pre.get(key)
        if raw is None:
            raw = self.bufs.get(key + ":r", nbytes, np.uint8)
            reader.pread_into(self.files.fd(spec.file), raw, spec.start + e0 * itemsize, nbytes, f"{spec.file}:{spec.name}")
            self._observe(spec, e0 * itemsize, raw)  # (a composed apply's Δs are read here, not prefetched)
        self._raw[key] = raw
        self.stats.bytes_read += nbytes
        return raw[:nbytes].view(view)

    def _kernel_applies(self, op: TensorOp) -> bool:
        """Whether :func:`deltaport.kernel.fused_into` computes ``op``'s chunks (bar a chunk it refuses): not when
        forced off or with float32 math, nor for TIES (:meth:`_ties_applies`), an output dtype it does not
        write, a diff's round-trip check or a Δ's exact residual kept by a diff."""
        return (self.use_kernel and op.ties_density is None and kernel.out_view(op.out_dtype_name) is not None
                and not (op.base is None and (op.minus is not None or op.check is not None))
                and not getattr(op, "residual", None) and not any(getattr(p, "residual", None) for p in op.deltas))

    def _ties_applies(self, op: TensorOp) -> bool:
        """Whether :func:`deltaport.kernel_ties.ties_into` computes a TIES op's chunks (and its cut-offs): each Δ a
        plain file tensor of a kernel dtype covering the output (with or without a sparse exact residual)."""
        return (self.use_kernel and op.ties_density is not None and kernel.out_view(op.out_dtype_name) is not None
                and op.base is not None and all(
                    p.lora is None and p.packed is None and p.plus is not None and plain_term(p.plus, op.numel)
                    and (p.residual is None or (p.residual.method == "sparse"
                                                and kernel.in_view(p.residual.values.dtype_name) is not None))
                    for p in op.deltas))

    def _ties_values(self, op: TensorOp, i: int, part, e0: int, e1: int, row_elems: int) -> np.ndarray:
        """Δ_i of a TIES op for elements [e0, e1) as the kernel reads it: the stored bytes' view where its exact
        residual has no entry there, else float64 with the residual added (as the torch path's
        :meth:`_part_values`); read without torch; the caller's until the next read of Δ_i."""
        raw = self._kernel_input(f"d{i}", part.plus, e0, e1, row_elems)
        r = None if part.residual is None else self._sparse_values(part.residual, op.name, e0, e1, key=f"d{i}:res")
        if r is None:
            return raw
        v = self.bufs.get(f"d{i}:v", e1 - e0, np.float64)
        v[:] = raw if raw.dtype.kind == "f" else kernel.widen(raw)
        v += r  # (the torch path adds zeros elsewhere too: a −0 becomes +0, which no TIES step tells apart)
        return v

    def _ties_f64(self, op: TensorOp, i: int, part, e0: int, e1: int, row_elems: int) -> np.ndarray:
        """:meth:`_ties_values` as float64 values."""
        v = self._ties_values(op, i, part, e0, e1, row_elems)
        return v if v.dtype == np.float64 else kernel.widen(v)

    def _ties_chunk(self, op: TensorOp, e0: int, e1: int, row_elems: int, obuf: np.ndarray) -> bool:
        """A TIES chunk by :func:`deltaport.kernel_ties.ties_into`; False where it refuses (the torch path then)."""
        from deltaport import kernel_ties

        thresholds = self._ties_thresholds(op, row_elems)
        target = self._kernel_input("base", op.base, e0, e1, row_elems)
        vals = [self._ties_values(op, i, part, e0, e1, row_elems) for i, part in enumerate(op.deltas)]
        if len({v.dtype for v in vals}) > 1:  # one dtype per call (see _kernel_chunk): the others as float64
            vals = [v if v.dtype == np.float64 else kernel.widen(v) for v in vals]
        got = kernel_ties.ties_into(obuf.view(kernel.out_view(op.out_dtype_name)), op.out_dtype_name, target, vals,
                                    [part.scale for part in op.deltas], thresholds)
        if got == kernel.KERNEL_REFUSED:
            return False
        self.stats.exact_fixups += got
        return True

    def _kernel_chunk(self, op: TensorOp, e0: int, e1: int, row_elems: int, obuf: np.ndarray) -> bool:
        """Compute a chunk with :func:`deltaport.kernel.fused_into` (a TIES op: :meth:`_ties_chunk`) into the byte
        buffer ``obuf``; False where the kernel does not apply (forced off, float32 math, a diff's round-trip
        check, a chunk it refuses): the torch fallback then computes it."""
        out_name = op.out_dtype_name
        if op.ties_density is not None:
            return self._ties_applies(op) and self._ties_chunk(op, e0, e1, row_elems, obuf)
        if not self._kernel_applies(op):
            return False
        target = None if op.base is None else self._kernel_input("base", op.base, e0, e1, row_elems)
        compose = bool(op.deltas)
        if op.deltas:
            vals, parts = [], []
            for i, part in enumerate(op.deltas):
                if part.lora is None and part.packed is None:
                    v = self._kernel_input(f"d{i}", part.plus, e0, e1, row_elems)
                elif is_sparse_part(part):
                    v = self._sparse_values(part.packed, op.name, e0, e1, key=f"d{i}")
                    if v is None and (vals or i + 1 < len(op.deltas)):
                        continue  # no kept entry in this chunk: see _sparse_values
                    if v is None:  # every part left out: one zero term keeps the composed sum's form
                        v = self.bufs.get(f"d{i}:sparse", e1 - e0, np.float64)
                        v[:] = 0.0
                else:
                    v = self._part_values(op, i, part, e0, e1, row_elems, key=f"d{i}").numpy()
                vals.append(v)
                parts.append((i, part))
            if len({v.dtype for v in vals}) > 1:  # one dtype per call: the mixed ones as float64
                # (float32 values widen exactly in place of a second read; 16-bit views are bit patterns: read
                # again as values; packed parts' values are float64 already)
                vals = [v if v.dtype == np.float64 else self._widened(f"d{i}", v) if v.dtype == np.float32
                        else self._part_values(op, i, part, e0, e1, row_elems, key=f"d{i}").numpy()
                        for v, (i, part) in zip(vals, parts)]
            terms, scales = [(v, None) for v in vals], [part.scale for _, part in parts]
        else:
            if op.lora is not None:
                plus = self._lora(op, e0, e1, row_elems).numpy()
            elif op.packed is not None:
                plus = self._packed(op.packed, op.name, e0, e1).numpy()
            else:
                plus = self._kernel_input("plus", op.plus, e0, e1, row_elems)
            minus = None if op.minus is None else self._kernel_input("minus", op.minus, e0, e1, row_elems)
            terms, scales = [(plus, minus)], [op.scale]
        out = obuf.view(kernel.out_view(out_name))
        got = self._kernel_run(out, out_name, target, terms, scales, compose)
        if got == kernel.KERNEL_REFUSED:
            return False
        self.stats.exact_fixups += got
        return True

    def _sparse_values(self, packed, name: str, e0: int, e1: int, key: str) -> np.ndarray | None:
        """A sparse packed Δ part (a diff's exact residual, a compressed Δ's kept entries) for elements [e0, e1),
        as float64 values (0 where the mask is clear), read without torch; None where the chunk has no kept
        entry.

        Leaving such a term out of the kernel's composed sum changes no bit: the sum starts at +0 and is never −0
        after its first term (x + (±0) = x for x ≠ 0, +0 + (±0) = +0), and a zero term adds no rounding error;
        so an apply of a diff's Δ (Δ + residual, the residual in a few elements) is, chunk by chunk, the plain
        Δ's composed sum: the stored dtypes, no widening. The torch fallback sums every part (same bytes,
        tests/test_kernel.py). The parts are read whole on the tensor's first chunk (like :meth:`_packed`);
        the kept values are counted on, so chunks in order cost one pass."""
        cache = self._sparse_cache.get(key)
        if cache is None or cache["name"] != name:
            cache = {"name": name, "bits": self._read_whole(packed.bits),
                     "values": self._read_whole(packed.values).view(kernel.in_view(packed.values.dtype_name)),
                     "next": (0, 0)}
            self._sparse_cache[key] = cache
        bits, n = cache["bits"], e1 - e0
        e_next, v_next = cache["next"]
        if not bits[e0 // 8:(e1 + 7) // 8].any():  # no kept entry here (the common case: one cheap scan)
            if e0 == e_next:
                cache["next"] = (e1, v_next)
            return None
        seg = _mask_bits(bits, e0, n)
        if e0 != e_next:  # out of order: count the kept entries before e0
            v_next = _count_before(bits, e0, cache)
        k = int(np.count_nonzero(seg))
        cache["next"] = (e1, v_next + k)
        if k == 0:
            return None
        out = self.bufs.get(key + ":sparse", n, np.float64)
        out[:] = 0.0
        out[seg] = kernel.widen(cache["values"][v_next:v_next + k])  # (stored dtype kept: widened per chunk)
        return out

    def _read_whole(self, spec) -> np.ndarray:
        """A stored tensor's bytes, whole (a sparse part's mask or kept values)."""
        raw = np.empty(spec.nbytes, dtype=np.uint8)
        if spec.nbytes:
            reader.pread_into(self.files.fd(spec.file), raw, spec.start, spec.nbytes, f"{spec.file}:{spec.name}")
        self.stats.bytes_read += spec.nbytes
        return raw

    def _widened(self, key: str, v: np.ndarray) -> np.ndarray:
        """float32 values as float64 (exact) in a reused buffer: a new 4 MB array per chunk would be mapped and
        unmapped each time (the mmap threshold, deltaport._memory), ~10 % of an apply's CPU time."""
        out = self.bufs.get(key + ":w", len(v), np.float64)
        out[:] = v
        return out

    def _kernel_run(self, out, out_name: str, target, terms, scales, compose: bool = False) -> int:
        """The kernel over the chunk, split into ``threads`` parts run side by side (it releases the GIL)."""
        n = out.shape[0]
        parts = self._kernel_threads if n >= 8 * kernel.BLOCK else 1
        if parts == 1:
            return kernel.fused_into(out, out_name, target, terms, scales, compose=compose)
        step = -(-n // parts // kernel.BLOCK) * kernel.BLOCK
        cut = lambda a, i: None if a is None else a[i:i + step]  # noqa: E731
        starts = list(range(0, n, step))
        run = lambda i: kernel.fused_into(out[i:i + step], out_name, cut(target, i),  # noqa: E731
                                          [(cut(p, i), cut(m, i)) for p, m in terms], scales, compose=compose)
        futs = [self._kernel_pool.submit(run, i) for i in starts[1:]]
        got = [run(starts[0])] + [f.result() for f in futs]  # (the first part on this thread: one hand-off fewer)
        return kernel.KERNEL_REFUSED if kernel.KERNEL_REFUSED in got else sum(got)
