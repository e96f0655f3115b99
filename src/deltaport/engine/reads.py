"""Reading an op's inputs for one chunk of output elements, in the compute dtype: plain file ranges
(prefetched or read now), rows gathered through a vocabulary map, tensors held in memory, a LoRA adapter's
B·A in a fixed summation order, compressed Δs (sparse bitmask + values, sign bits + α)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from deltaport.engine.pipeline import torch_view
from deltaport.io import reader
from deltaport.io.compressed_format import unpack_bits
from deltaport.plan import TensorOp, Term

if TYPE_CHECKING:
    import torch


class _LoraView:
    """What :meth:`Engine._lora` reads of an op (its name: the factor cache key, and its LoRA term)."""

    def __init__(self, name, lora):
        self.name, self.lora = name, lora


class ReadsMixin:
    """:class:`~deltaport.engine.core.Engine`'s reads (its ``bufs``, ``files``, ``stats``, ``_pre``, ``_raw``)."""

    def _fill(self, key: str, term: Term, e0: int, e1: int, row_elems: int) -> torch.Tensor:
        """Values of ``term`` for output elements [e0, e1) in the compute dtype (zeros past its end)."""
        n = e1 - e0
        spec = term.spec
        out = self.bufs.get(key + ":f", n, self.compute_dtype)
        itemsize = spec.dtype.itemsize
        mem = term.ck.memory_tensor(spec.name)
        if term.rowmap is None:
            k = max(0, min(e1, spec.numel) - e0)
            if k:
                if mem is not None:
                    out[:k].copy_(mem.reshape(-1)[e0:e0 + k])
                else:
                    raw = self._pre.get(key)
                    if raw is None:
                        raw = self.bufs.get(key + ":r", k * itemsize, np.uint8)
                        reader.pread_into(self.files.fd(spec.file), raw, spec.start + e0 * itemsize, k * itemsize, f"{spec.file}:{spec.name}")
                        self._observe(spec, e0 * itemsize, raw)
                    self._raw[key] = raw
                    self.stats.bytes_read += k * itemsize
                    out[:k].copy_(torch_view(raw[: k * itemsize], spec.dtype))
            if k < n:
                out[k:].zero_()
            return out
        # row-gathered (vocab align): output rows r0..r1 read source rows rowmap[r] (chunks are whole rows)
        r0, r1 = e0 // row_elems, e1 // row_elems
        out2 = out.view(r1 - r0, row_elems)
        self._gather_rows(key, term, r0, r1, out2, row_elems, zero=True)
        if term.overlay is not None:
            self._gather_rows(key, term.overlay, r0, r1, out2, row_elems, zero=False)
        return out

    def _gather_rows(self, key: str, term: Term, r0: int, r1: int, out2: torch.Tensor, row_elems: int, *,
                     zero: bool) -> None:
        """Write ``term``'s rows ``rowmap[r0:r1]`` into ``out2`` (runs of consecutive rows in one read);
        rows mapped to -1 are set to ``term.fill`` (``zero``; ±0.0) or left as they are (an overlay)."""
        spec = term.spec
        itemsize = spec.dtype.itemsize
        mem = term.ck.memory_tensor(spec.name)
        idx = term.rowmap[r0:r1].tolist()
        raw = self.bufs.get(key + ":r", (r1 - r0) * row_elems * itemsize, np.uint8)
        rowbytes = row_elems * itemsize
        j = 0
        while j < len(idx):
            i = idx[j]
            if i < 0:
                if zero:
                    out2[j].fill_(term.fill)
                j += 1
                continue
            run = 1
            while j + run < len(idx) and idx[j + run] == i + run:
                run += 1
            if mem is not None:
                out2[j:j + run].copy_(mem.reshape(-1, row_elems)[i:i + run])
            else:
                part = raw[: run * rowbytes]
                reader.pread_into(self.files.fd(spec.file), part, spec.start + i * rowbytes, run * rowbytes, f"{spec.file}:{spec.name}")
                self.stats.bytes_read += run * rowbytes
                out2[j:j + run].copy_(torch_view(part, spec.dtype).view(run, row_elems))
            j += run

    def _observe(self, spec, offset: int, raw: np.ndarray) -> None:
        """Bytes just read from ``spec`` at byte ``offset``: to the content hash of its checkpoint, if one is kept."""
        hasher = self.hashers.get(spec.file)
        if hasher is not None:
            hasher.feed(spec, offset, raw)

    def _lora(self, op: TensorOp, e0: int, e1: int, row_elems: int, key: str = "plus:f") -> torch.Tensor:
        """Δ = scaling·B·A for output elements [e0, e1), which may start and end inside a row.

        Every element is ``scaling · Σ_k B[i,k]·A[k,j]`` summed in the order k = 0..r-1 with one rounding per
        product and per addition (no BLAS, whose blocking, FMA use and kernel choice vary with the number of
        rows), so the bytes do not depend on the chunk size, and memory is the chunk (a row may be split)."""
        import torch

        cache = getattr(self, "_lora_cache", None)
        if cache is None or cache[0] != op.name:
            A = op.lora.ck.tensor(op.lora.a.name).to(self.compute_dtype)
            B = op.lora.ck.tensor(op.lora.b.name).to(self.compute_dtype)
            if op.lora.transposed:  # W is [in, out]: W[i, j] = Σ_k A[k, i]·B[j, k], the same terms in the same order
                A, B = B.T.contiguous(), A.T.contiguous()
            self._lora_cache = cache = (op.name, A, B)
        _, A, B = cache
        n = e1 - e0
        out = self.bufs.get(key, n, self.compute_dtype)
        tmp = self.bufs.get("lora:t", n, self.compute_dtype)
        r0, c0 = divmod(e0, row_elems)
        pos = 0
        while pos < n:  # pieces: the rest of a partial row, then whole rows, then the start of a row
            if c0 or n - pos < row_elems:
                w = min(row_elems - c0, n - pos)
                rows, cols = slice(r0, r0 + 1), slice(c0, c0 + w)
                m = 1
            else:
                m = (n - pos) // row_elems
                w = row_elems
                rows, cols = slice(r0, r0 + m), slice(0, row_elems)
            dst, prod = out[pos:pos + m * w].view(m, w), tmp[pos:pos + m * w].view(m, w)
            Bs, As = B[rows], A[:, cols]
            torch.mul(Bs[:, 0:1], As[0:1], out=dst)
            for k in range(1, Bs.shape[1]):
                torch.mul(Bs[:, k:k + 1], As[k:k + 1], out=prod)
                dst.add_(prod)
            pos += m * w
            c0 += w
            if c0 == row_elems:
                r0, c0 = r0 + m, 0
        out.mul_(op.lora.scaling)
        return out

    def _packed(self, term, name: str, e0: int, e1: int, key: str = "plus:f") -> torch.Tensor:
        """Δ of a compressed tensor (sparse bitmask + values, or sign bits + α) for elements [e0, e1).

        The parts of one tensor are read whole on its first chunk (together at most the size of its dense
        Δ); sparse keeps a running count of the values used, so chunks in order cost one pass."""
        cache = self._packed_cache.get(key)
        if cache is None or cache["name"] != name:
            cache = {"name": name, "bits": term.ck.tensor(term.bits.name), "values": term.ck.tensor(term.values.name),
                     "next": (0, 0)}
            self._packed_cache[key] = cache
        n = e1 - e0
        out = self.bufs.get(key, n, self.compute_dtype)
        mask = unpack_bits(cache["bits"], e0, n)
        if term.method == "sign":
            alpha = float(cache["values"][0])
            out.copy_(mask)  # 1 / 0
            out.mul_(2.0).sub_(1.0).mul_(alpha)  # ±1 · α: exact
            return out
        e_next, v_next = cache["next"]
        if e0 == cache.get("last", (None, 0))[0]:  # the same chunk again (the kernel's mixed-dtype retry)
            v_next = cache["last"][1]
        elif e0 != e_next:  # out of order: count the kept entries before e0
            v_next = int(np.count_nonzero(unpack_bits(cache["bits"], 0, e0).numpy())) if e0 else 0
        k = int(np.count_nonzero(mask.numpy()))  # (torch's sum of a bool tensor makes an int64 copy of it)
        out.zero_()
        out[mask] = cache["values"][v_next:v_next + k].to(self.compute_dtype)
        cache["next"], cache["last"] = (e1, v_next + k), (e0, v_next)
        return out

    def _part_values(self, op: TensorOp, i: int, part, e0: int, e1: int, row_elems: int, key: str) -> torch.Tensor:
        """Δ_i of a composed op for elements [e0, e1), in float64, in a buffer of this engine (the caller's
        scratch until the next read of ``key``)."""
        import torch

        if part.lora is not None:
            v = self._lora(_LoraView(op.name + f"#{i}", part.lora), e0, e1, row_elems, key=key + ":f")
        elif part.packed is not None:
            v = self._packed(part.packed, op.name, e0, e1, key=key + ":f")
        else:
            v = self._fill(key, part.plus, e0, e1, row_elems)
        v = v if v.dtype == torch.float64 else v.to(torch.float64)
        if part.residual is not None:  # TIES: Δ = stored + exact residual, summed in float64 (docs/FORMAT.md)
            v.add_(self._packed(part.residual, op.name, e0, e1, key=key + ":res"))
        return v
