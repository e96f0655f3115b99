"""Execute a :class:`~deltaport.plan.Plan`: stream every output tensor in chunks through reused
buffers (memory stays a small multiple of one chunk, whatever the model size), overlap arithmetic
with reading and writing (a reader and a writer thread; optionally several worker threads computing
chunks side by side, handed to the writer in order), check every chunk for NaN/Inf, and round once to
the output dtype.

The arithmetic itself lives in :mod:`deltaport.numerics` (the transfer formula, the composed sum, the
exact rounding decisions); this module only streams. It is longer than the ~500 lines a module should
have because the chunk loop, its reader and writer threads and the worker pool share one state (the
reused buffers and the chunk sequence, which the reader must walk in step with the loop); split, each
part would reach into the others' private state.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from deltaport import kernel
from deltaport.errors import DeltaportError, InputError, NumericalError, RuntimeFailure
from deltaport.io.tensors import FLOAT_DTYPES, dtype_name
from deltaport.io.compressed_format import unpack_bits
from deltaport.io.reader import FilePool, pread_into
from deltaport.io.writer import ShardedWriter
from deltaport.numerics import compose_deltas, round_composed_exactly, round_into, transfer_into
from deltaport.plan import Plan, TensorOp, Term

LOG = logging.getLogger(__name__)

# 512K elements: 2 MB per float32 buffer, so a chunk's working set (raw reads, three float32 operands, the
# output) stays in this CPU's L3 cache; 4M-element chunks measured ~1.5x the CPU time (and +160 MB RSS)
DEFAULT_CHUNK_ELEMS = 1 << 19

# ``threads`` = worker threads for the arithmetic, each running torch on ONE thread over whole chunks (never
# OpenMP threads inside a chunk: with 2 torch threads and the second core busy, the benchmark's transfer
# took 25-62 s instead of 5-9 s, the OpenMP threads spinning while waiting for each other). Default 1: on
# 2 cores the reader and writer threads already use the second one.
DEFAULT_THREADS = 1

# TIES thresholds: candidates gathered for the final kthvalue once this few remain (8 MB of float64 bits)
TIES_GATHER = 1 << 20


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    seconds: float = 0.0
    nonfinite_inputs: list[str] = field(default_factory=list)
    inexact_delta: dict[str, int] = field(default_factory=dict)  # diff: elements where base + Δ != finetuned
    exact_fixups: int = 0  # elements rounded from the exact value (composed apply; λ not a power of two)
    residuals: dict[str, list] = field(default_factory=dict)  # diff: (flat indices, r) where Δ != f − b (io/residual)
    arithmetic: dict[str, str] = field(default_factory=dict)  # tensor -> "numba" (the kernel) or "torch" (fallback)

    def arithmetic_record(self) -> dict[str, int]:
        """What ``deltaport.json`` records of the path that computed the output: tensors per path."""
        paths = list(self.arithmetic.values())
        return {"numba_kernel": paths.count("numba"), "torch_fallback": paths.count("torch")}

    def ran(self, name: str, path: str) -> None:
        if self.arithmetic.get(name) != "torch":  # a tensor with any fallback chunk counts as the fallback's
            self.arithmetic[name] = path


def _all_finite(x: torch.Tensor) -> bool:
    """True iff every value of ``x`` is finite.

    ``torch.isfinite(x).all()`` allocates a fresh bool tensor per call and ran at ~0.15 G elements/s here
    (a third of the whole transfer's time); a sum runs at ~10 G elements/s and is finite only when every
    value is (NaN and Inf propagate). A non-finite sum can also be an overflow of large finite values, so
    that case falls back to the exact test."""
    if torch.isfinite(x.sum()):
        return True
    return bool(torch.isfinite(x).all())


class _Buffers:
    """Reused buffers, grown on demand (never shrunk), so steady state allocates nothing."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        b = self._bufs.get((key, dtype))
        if b is None or b.numel() < n:
            b = torch.empty(max(n, 1), dtype=dtype)
            self._bufs[(key, dtype)] = b
        return b[:n]


class _Writer(threading.Thread):
    """Writes finished chunks while the main thread computes the next one."""

    def __init__(self, writer: ShardedWriter, nbufs: int = 3):
        super().__init__(daemon=True, name="deltaport-writer")
        self.w = writer
        self.q: queue.Queue = queue.Queue(maxsize=nbufs)
        self.free: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.bytes = 0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, a, b = item
            try:
                if self.error is None:
                    if kind == "begin":
                        self.w.begin(a, b)
                    else:
                        self.w.write(a[:b])
                        self.bytes += b
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            finally:
                if kind == "data":
                    self.free.put(a)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.join()


class _Prefetcher(threading.Thread):
    """Reads the raw bytes of the next chunks while the main thread computes on the current one.

    It walks the same (tensor, chunk) sequence as the main loop and, for every chunk, preads the inputs the
    main thread would read itself (file-backed terms without a row map) into one of a few reused buffer
    sets; ``os.preadv`` releases the GIL, so reading overlaps the arithmetic on the other core. Chunks
    whose inputs are read another way get an empty set, which keeps the two sequences in step."""

    def __init__(self, engine: "Engine", ops: list[TensorOp], depth: int = 2, extra_sets: int = 0):
        super().__init__(daemon=True, name="deltaport-reader")
        self.engine = engine
        self.ops = ops
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.free: queue.Queue = queue.Queue()
        self.nsets = 0
        self.maxsets = depth + 2 + extra_sets  # queued + the one(s) in use (one per worker) + the one being filled
        self.files = FilePool()
        self.stopping = threading.Event()

    def _take(self) -> _Buffers | None:
        while not self.stopping.is_set():
            try:
                return self.free.get_nowait()
            except queue.Empty:
                if self.nsets < self.maxsets:
                    self.nsets += 1
                    return _Buffers()
                try:
                    return self.free.get(timeout=0.1)
                except queue.Empty:
                    continue
        return None

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for op in self.ops:
                reads = self.engine._prefetchable(op)
                for e0, e1, _ in self.engine._chunks(op):
                    raws: dict[str, torch.Tensor] = {}
                    bufs = None
                    if reads:
                        bufs = self._take()
                        if bufs is None:
                            return
                        for key, term in reads:
                            spec = term.spec
                            itemsize = spec.dtype.itemsize
                            k = max(0, min(e1, spec.numel) - e0)
                            if k:
                                raw = bufs.get(key, k * itemsize, torch.uint8)
                                pread_into(self.files.fd(spec.file), raw, spec.start + e0 * itemsize, k * itemsize,
                                           f"{spec.file}:{spec.name}")
                                self.engine._observe(spec, e0 * itemsize, raw)
                                raws[key] = raw
                    if not self._put((op.name, e0, bufs, raws)):
                        return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread at this chunk
            self._put(exc)
        finally:
            self.files.close()

    def next(self, name: str, e0: int) -> tuple[_Buffers | None, dict[str, torch.Tensor]]:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        if item is None or item[0] != name or item[1] != e0:
            raise RuntimeFailure(f"internal: reader out of step at tensor {name} element {e0}")
        return item[2], item[3]

    def release(self, bufs: _Buffers | None) -> None:
        if bufs is not None:
            self.free.put(bufs)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


class _LoraView:
    """What :meth:`Engine._lora` reads of an op (its name: the factor cache key, and its LoRA term)."""

    def __init__(self, name, lora):
        self.name, self.lora = name, lora


class Engine:
    def __init__(self, plan: Plan, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS, strict: bool = False, prefetch: bool = True,
                 hashers: dict | None = None):
        self.plan = plan
        self.hashers = hashers or {}  # file -> io.checkpoint.StreamedHash: the card's content hashes, from these reads
        self.prefetch = prefetch
        self.chunk = max(int(chunk_elems), 1)
        self.strict = strict
        self.compute_dtype = plan.compute_dtype
        self.bufs = _Buffers()
        self.files = FilePool()
        self.stats = Stats()
        self._reader: _Prefetcher | None = None
        self._pre: dict[str, torch.Tensor] = {}  # this chunk's prefetched raw bytes, by key
        self._raw: dict[str, torch.Tensor] = {}  # the raw bytes _fill last converted, by key
        self._workers = 1
        self._packed_cache: dict[str, dict] = {}  # compressed tensor parts, by key (one tensor each)
        # the fused kernel (deltaport.kernel) computes the float64 (exact) arithmetic unless DELTAPORT_KERNEL=torch
        self.use_kernel = kernel.available() and self.compute_dtype == torch.float64
        self._kernel_threads = 1
        self._kernel_pool: ThreadPoolExecutor | None = None

    # -- reading -------------------------------------------------------------------------------------
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
                        raw = self.bufs.get(key + ":r", k * itemsize, torch.uint8)
                        pread_into(self.files.fd(spec.file), raw, spec.start + e0 * itemsize, k * itemsize, f"{spec.file}:{spec.name}")
                        self._observe(spec, e0 * itemsize, raw)
                    self._raw[key] = raw
                    self.stats.bytes_read += k * itemsize
                    out[:k].copy_(raw.view(spec.dtype))
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
        raw = self.bufs.get(key + ":r", (r1 - r0) * row_elems * itemsize, torch.uint8)
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
                pread_into(self.files.fd(spec.file), part, spec.start + i * rowbytes, run * rowbytes, f"{spec.file}:{spec.name}")
                self.stats.bytes_read += run * rowbytes
                out2[j:j + run].copy_(part.view(spec.dtype).view(run, row_elems))
            j += run

    def _observe(self, spec, offset: int, raw: torch.Tensor) -> None:
        """Bytes just read from ``spec`` at byte ``offset``: to the content hash of its checkpoint, if one is kept."""
        hasher = self.hashers.get(spec.file)
        if hasher is not None:
            hasher.feed(spec, offset, raw.numpy())

    # -- one tensor ----------------------------------------------------------------------------------
    def _chunks(self, op: TensorOp):
        numel = op.numel
        rows = op.shape[0] if op.shape else 1
        row_elems = numel // rows if rows else 1
        aligned = any(t.rowmap is not None for t in op.inputs())
        step = self.chunk
        if aligned:
            step = max(1, self.chunk // max(row_elems, 1)) * row_elems
        e = 0
        while e < numel:
            yield e, min(numel, e + step), row_elems
            e += step

    def _lora(self, op: TensorOp, e0: int, e1: int, row_elems: int, key: str = "plus:f") -> torch.Tensor:
        """Δ = scaling·B·A for output elements [e0, e1), which may start and end inside a row.

        Every element is ``scaling · Σ_k B[i,k]·A[k,j]`` summed in the order k = 0..r-1 with one rounding per
        product and per addition (no BLAS, whose blocking, FMA use and kernel choice vary with the number of
        rows), so the bytes do not depend on the chunk size, and memory is the chunk (a row may be split)."""
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
        if e0 != e_next:  # out of order: count the kept entries before e0
            v_next = int(unpack_bits(cache["bits"], 0, e0).sum()) if e0 else 0
        k = int(mask.sum())
        out.zero_()
        out[mask] = cache["values"][v_next:v_next + k].to(self.compute_dtype)
        cache["next"] = (e1, v_next + k)
        return out

    def _part_values(self, op: TensorOp, i: int, part, e0: int, e1: int, row_elems: int, key: str) -> torch.Tensor:
        """Δ_i of a composed op for elements [e0, e1), in float64."""
        if part.lora is not None:
            v = self._lora(_LoraView(op.name + f"#{i}", part.lora), e0, e1, row_elems, key=key + ":f")
        elif part.packed is not None:
            v = self._packed(part.packed, op.name, e0, e1, key=key + ":f")
        else:
            v = self._fill(key, part.plus, e0, e1, row_elems)
        v = v if v.dtype == torch.float64 else v.to(torch.float64)
        if part.residual is not None:  # TIES: Δ = stored + exact residual, summed in float64 (docs/FORMAT.md)
            v = v + self._packed(part.residual, op.name, e0, e1, key=key + ":res")
        return v

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
        gathered and the rest is one ``kthvalue`` (memory: a 65 536-bin histogram and those candidates)."""
        numel = op.numel
        k = max(1, math.ceil(op.ties_density * numel))
        if k >= numel:
            return 0.0
        rank = numel - k + 1  # 1-based, ascending: kthvalue's k

        def magnitudes():
            for e0, e1, rows in self._chunks(op):
                v = self._part_values(op, i, part, e0, e1, rows, key=f"ties{i}")
                yield v.abs().view(torch.int64)

        prefix, shift = 0, 64
        while shift > 0:
            shift -= 16
            hist = torch.zeros(1 << 16, dtype=torch.int64)
            for bits in magnitudes():
                if shift < 48:
                    bits = bits[(bits >> (shift + 16)) == prefix]
                hist += torch.bincount(((bits >> shift) & 0xFFFF).reshape(-1), minlength=1 << 16)
            cum = hist.cumsum(0)
            b = int(torch.searchsorted(cum, torch.tensor([rank]))[0])
            rank -= int(cum[b - 1]) if b else 0
            prefix = (prefix << 16) | b
            if int(hist[b]) <= TIES_GATHER:
                break
        if shift > 0:
            cand = torch.cat([bits[(bits >> shift) == prefix] for bits in magnitudes()])
            prefix = int(torch.kthvalue(cand, rank).values)
        return float(torch.tensor([prefix], dtype=torch.int64).view(torch.float64)[0])

    def _compose(self, op: TensorOp, e0: int, e1: int, row_elems: int) -> torch.Tensor:
        """d = Σ_i λ_i·Δ_i (or the TIES merge of the λ_i·Δ_i) for a composed apply, in float64
        (:func:`~deltaport.numerics.compose_deltas`); the Δ_i and the error bound are kept for
        :meth:`_compose_fixup`."""
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
        if op.out_dtype == torch.float64 or self.compute_dtype != torch.float64:
            return
        target = self._fill("base", op.base, e0, e1, op.shape[-1] if op.shape else 1)
        thresholds = self._ties_thresholds(op, 1) if op.ties_density is not None else None
        self.stats.exact_fixups += round_composed_exactly(
            out, target, self._compose_d, self._compose_mag, self._compose_vals, [part.scale for part in op.deltas],
            thresholds, self._compose_unsure, buf=self.bufs.get)

    def _diagnose(self, op: TensorOp, e0: int, e1: int, row_elems: int) -> None:
        bad_inputs = []
        for key, term in (("diag_c", op.base), ("diag_a", op.plus), ("diag_b", op.minus)):
            if term is not None and term.spec.dtype in FLOAT_DTYPES:
                v = self._fill(key, term, e0, e1, row_elems)
                if not torch.isfinite(v).all():
                    bad_inputs.append(f"{term.ck.source}")
        if bad_inputs:
            msg = f"tensor {op.name}: NaN/Inf in input(s) {', '.join(bad_inputs)}"
            if self.strict:
                raise InputError(msg + "; --strict refuses non-finite inputs. Fix or exclude the tensor (--exclude).")
            if op.name not in self.stats.nonfinite_inputs:
                LOG.warning("%s; the output carries them (use --strict to fail instead)", msg)
                self.stats.nonfinite_inputs.append(op.name)
            return
        raise NumericalError(
            f"tensor {op.name}: the arithmetic produced NaN/Inf from finite inputs (scale {op.scale:g}, output dtype "
            f"{str(op.out_dtype).replace('torch.', '')}): the result overflows the output dtype. Use a smaller --scale, "
            "a wider --out-dtype, or exclude the tensor. No output was written."
        )

    @staticmethod
    def _raw_copy(op: TensorOp) -> bool:
        return (op.kind == "copy" and op.base.rowmap is None and op.base.spec.dtype == op.out_dtype
                and op.base.spec.numel == op.numel and op.base.ck.memory_tensor(op.base.spec.name) is None)

    def _prefetchable(self, op: TensorOp) -> list[tuple[str, Term]]:
        """The (key, term) pairs :meth:`_fill` reads from a file for every chunk of ``op`` (see _run_op)."""
        if self._raw_copy(op) or op.out_dtype not in FLOAT_DTYPES:
            return []
        if op.kind == "copy" or op.scale == 0.0:
            terms = [("base", op.base)]
        else:
            direct = op.lora is None and op.packed is None and not op.deltas
            terms = [("plus", op.plus), ("minus", op.minus)] if direct else []
            terms.append(("base", op.base))
        return [(k, t) for k, t in terms
                if t is not None and t.rowmap is None and t.ck.memory_tensor(t.spec.name) is None]

    def _run_op(self, op: TensorOp, writer_thread: _Writer) -> None:
        writer_thread.q.put(("begin", op.name, op.nbytes))
        out_itemsize = op.out_dtype.itemsize
        for e0, e1, row_elems in self._chunks(op):
            n = e1 - e0
            pre_bufs = None
            if self._reader is not None:
                pre_bufs, self._pre = self._reader.next(op.name, e0)
            obuf = self._take(writer_thread, n * out_itemsize)
            self._chunk(op, e0, e1, row_elems, obuf)
            if self._reader is not None:
                self._pre = {}
                self._reader.release(pre_bufs)
            writer_thread.q.put(("data", obuf, n * out_itemsize))
            writer_thread.check()
            self._progress(n * out_itemsize)
        self.stats.tensors += 1

    def _chunk(self, op: TensorOp, e0: int, e1: int, row_elems: int, obuf: torch.Tensor) -> None:
        """Output elements [e0, e1) of ``op`` into the byte buffer ``obuf`` (this chunk's prefetched raw
        bytes, if any, in ``self._pre``). Touches only this engine's own buffers, files and stats, so
        workers (copies of the engine, see :meth:`_run_workers`) can run it side by side."""
        n = e1 - e0
        out_itemsize = op.out_dtype.itemsize
        floating = op.out_dtype in FLOAT_DTYPES
        if self._raw_copy(op):
            spec = op.base.spec
            pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * out_itemsize, n * out_itemsize, f"{spec.file}:{spec.name}")
            self._observe(spec, e0 * out_itemsize, obuf[: n * out_itemsize])
            self.stats.bytes_read += n * out_itemsize
            if floating and not _all_finite(obuf[: n * out_itemsize].view(op.out_dtype)):
                self._diagnose(op, e0, e1, row_elems)
        elif not floating:  # non-float copy with a row map or from memory
            src = op.base.ck.memory_tensor(op.base.spec.name)
            if src is None:
                spec = op.base.spec
                pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * out_itemsize, n * out_itemsize, f"{spec.file}:{spec.name}")
            else:
                obuf[: n * out_itemsize].copy_(src.reshape(-1)[e0:e1].contiguous().view(torch.uint8))
        else:
            out = obuf[: n * out_itemsize].view(op.out_dtype)
            if op.kind == "copy" or op.scale == 0.0:
                self._round(out, self._fill("base", op.base, e0, e1, row_elems), n)
            elif self._kernel_chunk(op, e0, e1, row_elems, obuf[: n * out_itemsize]):
                self.stats.ran(op.name, "numba")
            else:
                self.stats.ran(op.name, "torch")
                minus = None
                if op.deltas:
                    plus = self._compose(op, e0, e1, row_elems)
                elif op.lora is not None:
                    plus = self._lora(op, e0, e1, row_elems)
                elif op.packed is not None:
                    plus = self._packed(op.packed, op.name, e0, e1)
                else:
                    plus = self._fill("plus", op.plus, e0, e1, row_elems)
                    if op.minus is not None:
                        minus = self._fill("minus", op.minus, e0, e1, row_elems)
                target = None if op.base is None else self._fill("base", op.base, e0, e1, row_elems)
                self.stats.exact_fixups += transfer_into(out, target, plus, minus, op.scale,
                                                         scratch=self.bufs.get("round", n, torch.int64), buf=self.bufs.get)
                if op.residual:
                    self._keep_residual(op, out, plus, minus, e0, e1, row_elems)
                if op.deltas:
                    self._compose_fixup(op, out, e0, e1)
            if not _all_finite(out):
                self._diagnose(op, e0, e1, row_elems)
            if op.base is None and (op.minus is not None or op.check is not None):
                self._verify_roundtrip(op, out, e0, e1, row_elems)

    # -- the fused kernel ------------------------------------------------------------------------------
    def _kernel_input(self, key: str, term: Term, e0: int, e1: int, row_elems: int):
        """``term``'s values for output elements [e0, e1) as the kernel reads them: the stored bytes (this
        chunk's prefetched ones, or read now) viewed as :func:`deltaport.kernel.in_view`; float64 values
        from :meth:`_fill` where the term is not one plain file range (row maps, padding, memory)."""
        spec = term.spec
        view = kernel.in_view(dtype_name(spec.dtype))
        if view is None or term.rowmap is not None or spec.numel < e1 or term.ck.memory_tensor(spec.name) is not None:
            return self._fill(key, term, e0, e1, row_elems).numpy()
        nbytes = (e1 - e0) * spec.dtype.itemsize
        raw = self._pre.get(key)
        if raw is None:
            raw = self.bufs.get(key + ":r", nbytes, torch.uint8)
            pread_into(self.files.fd(spec.file), raw, spec.start + e0 * spec.dtype.itemsize, nbytes, f"{spec.file}:{spec.name}")
        self._raw[key] = raw
        self.stats.bytes_read += nbytes
        return raw[:nbytes].numpy().view(view)

    def _kernel_chunk(self, op: TensorOp, e0: int, e1: int, row_elems: int, obuf: torch.Tensor) -> bool:
        """Compute a chunk with :func:`deltaport.kernel.fused_into` into the byte buffer ``obuf``; False where
        the kernel does not apply (forced off, float32 math, TIES, a diff's round-trip check, a chunk it
        refuses): the torch fallback then computes it."""
        out_name = dtype_name(op.out_dtype)
        if (not self.use_kernel or op.ties_density is not None or kernel.out_view(out_name) is None
                or (op.base is None and (op.minus is not None or op.check is not None))
                or getattr(op, "residual", None) or any(getattr(p, "residual", None) for p in op.deltas)):
            return False  # (a Δ's exact residual, #21b: summed by the fallback)
        target = None if op.base is None else self._kernel_input("base", op.base, e0, e1, row_elems)
        if op.deltas:
            vals = [self._kernel_input(f"d{i}", part.plus, e0, e1, row_elems) if part.lora is None and part.packed is None
                    else self._part_values(op, i, part, e0, e1, row_elems, key=f"d{i}").numpy()
                    for i, part in enumerate(op.deltas)]
            if len({v.dtype for v in vals}) > 1:  # one dtype per call: the mixed ones as float64
                vals = [self._part_values(op, i, part, e0, e1, row_elems, key=f"d{i}").numpy()
                        for i, part in enumerate(op.deltas)]
            terms, scales = [(v, None) for v in vals], [part.scale for part in op.deltas]
        else:
            if op.lora is not None:
                plus = self._lora(op, e0, e1, row_elems).numpy()
            elif op.packed is not None:
                plus = self._packed(op.packed, op.name, e0, e1).numpy()
            else:
                plus = self._kernel_input("plus", op.plus, e0, e1, row_elems)
            minus = None if op.minus is None else self._kernel_input("minus", op.minus, e0, e1, row_elems)
            terms, scales = [(plus, minus)], [op.scale]
        out = obuf.numpy().view(kernel.out_view(out_name))
        got = self._kernel_run(out, out_name, target, terms, scales)
        if got == kernel.KERNEL_REFUSED:
            return False
        self.stats.exact_fixups += got
        return True

    def _kernel_run(self, out, out_name: str, target, terms, scales) -> int:
        """The kernel over the chunk, split into ``threads`` parts run side by side (it releases the GIL)."""
        n = out.shape[0]
        parts = self._kernel_threads if n >= 8 * kernel.BLOCK else 1
        if parts == 1:
            return kernel.fused_into(out, out_name, target, terms, scales)
        step = -(-n // parts // kernel.BLOCK) * kernel.BLOCK
        cut = lambda a, i: None if a is None else a[i:i + step]  # noqa: E731
        futs = [self._kernel_pool.submit(kernel.fused_into, out[i:i + step], out_name, cut(target, i),
                                         [(cut(p, i), cut(m, i)) for p, m in terms], scales) for i in range(0, n, step)]
        got = [f.result() for f in futs]
        return kernel.KERNEL_REFUSED if kernel.KERNEL_REFUSED in got else sum(got)

    # -- workers -------------------------------------------------------------------------------------
    def _worker_copy(self) -> "Engine":
        """An engine sharing the plan but with its own buffers, files and stats (one per worker thread)."""
        w = copy.copy(self)
        w.bufs, w.files, w.stats = _Buffers(), FilePool(), Stats()
        w._pre, w._raw, w._lora_cache, w._reader, w._bar = {}, {}, None, None, None
        w._packed_cache, w._ties_cache = {}, None
        return w

    def _run_workers(self, ops: list[TensorOp], writer_thread: _Writer, workers: int) -> None:
        """Compute chunks on ``workers`` threads (each a copy of the engine; torch runs 1 thread per op and
        releases the GIL inside it) while this thread hands out the prefetched inputs and passes finished
        chunks to the writer strictly in plan order: the bytes are those of the sequential loop. At most
        ``workers`` chunks are in flight, each holding one prefetched input set and one output buffer."""
        local = threading.local()
        copies: list[Engine] = []
        lock = threading.Lock()

        def task(op: TensorOp, e0: int, e1: int, row_elems: int, obuf: torch.Tensor, pre: dict) -> None:
            w = getattr(local, "engine", None)
            if w is None:
                w = local.engine = self._worker_copy()
                with lock:
                    copies.append(w)
            w._pre = pre
            try:
                with torch.inference_mode():  # thread-local in torch
                    w._chunk(op, e0, e1, row_elems, obuf)
            finally:
                w._pre = {}

        pending: deque = deque()

        def hand_on() -> None:  # the oldest entry, in plan order
            kind, fut, op, obuf, nbytes, pre_bufs = pending.popleft()
            if kind == "begin":
                writer_thread.q.put(("begin", op.name, op.nbytes))
                return
            if kind == "end":
                self.stats.tensors += 1
                return
            fut.result()  # a worker's exception is raised here, at its chunk
            if self._reader is not None:
                self._reader.release(pre_bufs)
            writer_thread.q.put(("data", obuf, nbytes))
            writer_thread.check()
            self._progress(nbytes)

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltaport-worker")
        try:
            for op in ops:
                out_itemsize = op.out_dtype.itemsize
                pending.append(("begin", None, op, None, 0, None))
                for e0, e1, row_elems in self._chunks(op):
                    pre_bufs, pre = (None, {}) if self._reader is None else self._reader.next(op.name, e0)
                    while sum(1 for p in pending if p[0] == "data") >= workers:
                        hand_on()
                    obuf = self._take(writer_thread, (e1 - e0) * out_itemsize)
                    fut = pool.submit(task, op, e0, e1, row_elems, obuf, pre)
                    pending.append(("data", fut, op, obuf, (e1 - e0) * out_itemsize, pre_bufs))
                pending.append(("end", None, op, None, 0, None))
            while pending:
                hand_on()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for w in copies:
                w.files.close()
                self.stats.bytes_read += w.stats.bytes_read
                self.stats.exact_fixups += w.stats.exact_fixups
                for k, v in w.stats.arithmetic.items():
                    self.stats.ran(k, v)
                for k, v in w.stats.inexact_delta.items():
                    self.stats.inexact_delta[k] = self.stats.inexact_delta.get(k, 0) + v
                for k, v in w.stats.residuals.items():
                    self.stats.residuals.setdefault(k, []).extend(v)
                self.stats.nonfinite_inputs += [x for x in w.stats.nonfinite_inputs if x not in self.stats.nonfinite_inputs]
            order = {op.name: i for i, op in enumerate(ops)}
            self.stats.nonfinite_inputs.sort(key=lambda x: order.get(x, len(order)))

    def _round(self, out: torch.Tensor, acc: torch.Tensor, n: int) -> None:
        """One correct rounding of the compute-dtype result into the output dtype (see numerics)."""
        if acc.dtype == torch.float64 and out.dtype in (torch.bfloat16, torch.float16):
            round_into(out, acc, self.bufs.get("round", n, torch.int64))  # (acc is scratch: modified)
        else:
            out.copy_(acc)

    def _keep_residual(self, op: TensorOp, out: torch.Tensor, s: torch.Tensor, b: torch.Tensor, e0: int, e1: int,
                       row_elems: int) -> None:
        """diff, exact encoding: keep r = (f − b) − Δ where the stored Δ (``out``) is not the exact difference
        (``s``: fl64(f − b), ``b``: the base values, both float64; :mod:`deltaport.io.residual`)."""
        from deltaport.io.residual import residual_of

        n = e1 - e0
        spec, raw = op.plus.spec, self._raw.get("plus")
        f = self.bufs.get("residual:f", n, torch.float64)
        if (op.plus.rowmap is None and spec.numel >= e1 and raw is not None and raw.numel() >= n * spec.dtype.itemsize
                and op.plus.ck.memory_tensor(spec.name) is None):
            f.copy_(raw[: n * spec.dtype.itemsize].view(spec.dtype))  # this chunk's bytes, read by _fill just now
        else:
            f.copy_(self._fill("residual", op.plus, e0, e1, row_elems))
        # screen: Δ + b == f and f − Δ == b in float64 wherever r = 0; where r != 0 one of them fails (r is a
        # multiple of the last bit of the smaller of f, b: far above float64's rounding of either)
        h = self.bufs.get("residual:h", n, torch.float64)
        t = self.bufs.get("residual:t", n, torch.float64)
        h.copy_(out)
        unsure = torch.add(h, b, out=t) != f
        unsure |= torch.sub(f, h, out=t) != b
        if not bool(unsure.any()):
            return
        idx = torch.nonzero(unsure).flatten()
        r, ok = residual_of(f[idx], b[idx], s[idx], h[idx])
        keep = (r != 0) & torch.isfinite(r) & ok
        if bool(keep.any()):
            self.stats.residuals.setdefault(op.name, []).append((idx[keep] + e0, r[keep]))
        bad = int((~ok).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _verify_roundtrip(self, op: TensorOp, out: torch.Tensor, e0: int, e1: int, row_elems: int) -> None:
        """diff: check that base + stored Δ rounds back to the finetuned value, element by element (an exact
        encoding, ``op.residual``, was checked by :meth:`_keep_residual` instead)."""
        if op.residual:
            return
        n = e1 - e0
        if op.lora is not None:
            self._verify_lora(op, out, e0, e1, row_elems)
            return
        a, b = op.plus.spec, op.minus.spec
        if (op.plus.rowmap is not None or a.numel != op.numel or b.numel != op.numel
                or op.plus.ck.memory_tensor(a.name) is not None or op.out_dtype == torch.float64):
            return
        bvals = self.bufs.get("minus:f", n, self.compute_dtype)
        tmp = self.bufs.get("verify", n, self.compute_dtype)
        tmp.copy_(out)
        tmp.add_(bvals)
        rt = self.bufs.get("verify2", n, a.dtype)
        self._round(rt, tmp, n)
        araw = self._raw["plus"][: n * a.dtype.itemsize].view(a.dtype)
        bad = int((rt != araw).sum()) - int((rt.isnan() & araw.isnan()).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _verify_lora(self, op: TensorOp, out: torch.Tensor, e0: int, e1: int, row_elems: int) -> None:
        """diff of a LoRA adapter stored narrower than computed: base + stored Δ must round to what base +
        the computed Δ rounds to (the merged model), element by element."""
        if op.check is None:
            return
        n = e1 - e0
        exact = self._lora(op, e0, e1, row_elems, key="verify:x")
        b = self._fill("check", op.check, e0, e1, row_elems)
        dt = op.check.spec.dtype
        tmp = self.bufs.get("verify", n, self.compute_dtype)
        want = self.bufs.get("verify:w", n, dt)
        got = self.bufs.get("verify2", n, dt)
        torch.add(b, exact, out=tmp)
        self._round(want, tmp, n)
        tmp.copy_(out)
        tmp.add_(b)
        self._round(got, tmp, n)
        bad = int((got != want).sum()) - int((got.isnan() & want.isnan()).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _take(self, writer_thread: _Writer, nbytes: int) -> torch.Tensor:
        while True:
            try:
                b = writer_thread.free.get_nowait()
            except queue.Empty:
                if self._nout < 3 + self._workers:
                    self._nout += 1
                    b = torch.empty(0, dtype=torch.uint8)
                else:
                    b = writer_thread.free.get()
            if b.numel() < nbytes:
                b = torch.empty(max(nbytes, self._out_cap()), dtype=torch.uint8)
            return b

    def _out_cap(self) -> int:
        return self.chunk * 8

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar[0].update(self._bar[1], advance=n)

    # -- everything ----------------------------------------------------------------------------------
    def run(self, writer: ShardedWriter, *, progress: bool = False, threads: int | None = None, label: str = "") -> Stats:
        ops = {op.name: op for op in self.plan.ops}
        t0 = time.perf_counter()
        old_threads = torch.get_num_threads()
        workers = max(1, int(threads or DEFAULT_THREADS))
        torch.set_num_threads(1)  # each worker runs torch on one thread (see DEFAULT_THREADS)
        if self.use_kernel and self.plan.operation != "diff" and workers > 1:
            # the kernel's own parallelism: one chunk split over ``threads`` threads (the fallback's chunks,
            # where the kernel does not apply, then run on one worker)
            self._kernel_threads, workers = workers, 1
            self._kernel_pool = ThreadPoolExecutor(max_workers=self._kernel_threads, thread_name_prefix="deltaport-kernel")
        self._workers = workers
        self._nout = 0
        self._bar = None
        writer_thread = _Writer(writer)
        writer_thread.start()
        ctx = nullcontext()
        if progress:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            ctx = prog
            self._bar = (prog, prog.add_task(label or self.plan.operation, total=self.plan.total_out_bytes))
        if self.prefetch:
            self._reader = _Prefetcher(self, [ops[entry.name] for entry in writer.order], extra_sets=workers - 1)
            self._reader.start()
        try:
            with ctx, torch.inference_mode():
                if workers == 1:
                    for entry in writer.order:
                        self._run_op(ops[entry.name], writer_thread)
                else:
                    self._run_workers([ops[entry.name] for entry in writer.order], writer_thread, workers)
            writer_thread.close()
            writer_thread.check()
        except BaseException:
            writer_thread.close()
            writer.abort()
            raise
        finally:
            if self._reader is not None:
                self._reader.stop()
                self._reader = None
            self.files.close()
            torch.set_num_threads(old_threads)
            if self._kernel_pool is not None:
                self._kernel_pool.shutdown(wait=True)
                self._kernel_pool = None
        self.stats.bytes_written = writer_thread.bytes
        self.stats.seconds = time.perf_counter() - t0
        return self.stats


def execute(plan: Plan, writer: ShardedWriter, *, progress: bool = False, threads: int | None = None,
            chunk_elems: int = DEFAULT_CHUNK_ELEMS, strict: bool = False, label: str = "", hashers: dict | None = None) -> Stats:
    """Run ``plan`` into ``writer``; raises DeltaportError subclasses on bad data. ``hashers``: file ->
    :class:`~deltaport.io.checkpoint.StreamedHash`, fed with the bytes read from that file."""
    try:
        return Engine(plan, chunk_elems=chunk_elems, strict=strict, hashers=hashers).run(writer, progress=progress, threads=threads,
                                                                                      label=label)
    except (DeltaportError, KeyboardInterrupt, SystemExit):
        raise
    except OSError as exc:
        from deltaport.errors import DiskError

        raise DiskError(f"I/O error: {exc}") from None
    except RuntimeError as exc:  # torch runtime errors (out of memory, ...)
        raise RuntimeFailure(f"{type(exc).__name__}: {exc}") from None
