"""The chunk loop: every output tensor of a :class:`~deltaport.plan.Plan` in chunks through reused buffers
(memory stays a small multiple of one chunk, whatever the model size), each chunk computed by the fused
kernel or the torch path, checked for NaN/Inf and rounded once to the output dtype, while the reader and
writer threads (:mod:`~deltaport.engine.pipeline`) overlap I/O with the arithmetic."""

from __future__ import annotations

import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np

from deltaport import kernel
from deltaport._memory import pin_mmap_threshold
from deltaport.engine.checks import ChecksMixin
from deltaport.engine.compose import ComposeMixin
from deltaport.engine.fused import FusedMixin, is_sparse_part, plain_term
from deltaport.engine.pipeline import Buffers, Prefetcher, Writer, torch_view
from deltaport.engine.reads import ReadsMixin
from deltaport.engine.stats import Stats, all_finite, all_finite_bytes
from deltaport.engine.workers import WorkersMixin
from deltaport.errors import DeltaportError, RuntimeFailure
from deltaport.io import reader
from deltaport.io.tensors import FLOAT_DTYPE_NAMES, dtype_size, torch_dtype
from deltaport.io.writer import ShardedWriter
from deltaport.plan import Plan, TensorOp, Term

if TYPE_CHECKING:
    import torch

# 512K elements: 2 MB per float32 buffer, so a chunk's working set (raw reads, three float32 operands, the
# output) stays in this CPU's L3 cache; 4M-element chunks measured ~1.5x the CPU time (and +160 MB RSS)
DEFAULT_CHUNK_ELEMS = 1 << 19
# a TIES apply holds ~16 float64 chunk buffers (each Δ_i, its residual, the merge's terms), a transfer ~6: half
# a chunk keeps it near a transfer's memory, and its float64 temporaries (2 MB) under the mmap threshold
# (deltaport._memory), which maps and unmaps each 4 MB one. Two Δs onto a 0.77 GB bf16 model, in-process at load
# ~4: 372 MB in 59-61 s instead of 397 MB in 69-76 s (same bytes: every step is elementwise or an exact selection)
TIES_CHUNK_ELEMS = DEFAULT_CHUNK_ELEMS // 2

# ``threads`` = worker threads for the arithmetic, each running torch on ONE thread over whole chunks (never
# OpenMP threads inside a chunk: with 2 torch threads and the second core busy, the benchmark's transfer
# took 25-62 s instead of 5-9 s, the OpenMP threads spinning while waiting for each other). Default 1: on
# 2 cores the reader and writer threads already use the second one.
DEFAULT_THREADS = 1


class Engine(ReadsMixin, FusedMixin, ComposeMixin, ChecksMixin, WorkersMixin):
    """Runs one plan into one writer (:meth:`run`). Its parts, each in its own module: reading inputs
    (:mod:`~deltaport.engine.reads`), the fused kernel (:mod:`~deltaport.engine.fused`), composed applies and
    TIES (:mod:`~deltaport.engine.compose`), checks of a computed chunk (:mod:`~deltaport.engine.checks`),
    worker threads (:mod:`~deltaport.engine.workers`); the chunk loop is here."""

    def __init__(self, plan: Plan, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS, strict: bool = False, prefetch: bool = True,
                 hashers: dict | None = None):
        self.plan = plan
        self.hashers = hashers or {}  # file -> io.checkpoint.StreamedHash: the card's content hashes, from these reads
        self.prefetch = prefetch
        self.chunk = max(int(chunk_elems), 1)
        self.strict = strict
        self.compute_dtype_name = plan.compute_dtype_name
        self.bufs = Buffers()
        self.files = reader.FilePool()
        self.stats = Stats()
        self._reader: Prefetcher | None = None
        self._pre: dict[str, np.ndarray] = {}  # this chunk's prefetched raw bytes, by key
        self._raw: dict[str, np.ndarray] = {}  # the raw bytes _fill last converted, by key
        self._workers = 1
        self._packed_cache: dict[str, dict] = {}  # compressed tensor parts, by key (one tensor each)
        self._sparse_cache: dict[str, dict] = {}  # the kernel's numpy copy of sparse parts (engine.fused)
        # the fused kernel (deltaport.kernel) computes the float64 (exact) arithmetic unless DELTAPORT_KERNEL=torch
        self.use_kernel = kernel.available() and self.compute_dtype_name == "float64"
        self._kernel_threads = 1
        self._kernel_pool: ThreadPoolExecutor | None = None

    @property
    def compute_dtype(self) -> "torch.dtype":
        """The torch path's compute dtype (imports torch: the kernel's path reads ``compute_dtype_name``)."""
        return torch_dtype(self.compute_dtype_name)

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

    def _kernel_only(self) -> bool:
        """True when every op is a plain copy of file bytes or an op the kernel computes
        (:meth:`_kernel_applies`) from plain file reads of its own dtypes: such a plan needs no torch."""
        if self.plan.operation == "diff":
            return False
        for op in self.plan.ops:
            if self._raw_copy(op) or (op.kind == "copy" and op.out_dtype_name not in FLOAT_DTYPE_NAMES
                                      and op.base.rowmap is None and op.base.ck.memory_tensor(op.base.spec.name) is None):
                continue
            if op.ties_density is not None and op.kind != "copy" and op.scale != 0.0:
                if not (self._ties_applies(op) and plain_term(op.base, op.numel)):
                    return False  # (kernel_ties reads the Δs and their residuals itself, with numpy)
                continue
            if (op.kind == "copy" or op.scale == 0.0 or op.base is None or op.lora is not None or op.packed is not None
                    or not self._kernel_applies(op)):
                return False
            sparse = [p for p in op.deltas if is_sparse_part(p)]  # read by numpy (engine.fused._sparse_values)
            parts = [op.base, op.plus, op.minus] if not op.deltas else [op.base] + [
                None if (p.lora is not None or p.packed is not None) else p.plus
                for p in op.deltas if not is_sparse_part(p)]
            if op.deltas and (None in parts or len({t.spec.dtype_name for t in parts[1:]}) > 1):
                return False  # (a mixed-dtype composed chunk widens through the torch path's values)
            if sparse and any(t.spec.dtype_name not in ("float32", "float64") for t in parts[1:]):
                return False  # (beside a sparse part's float64 values a 16-bit Δ widens through torch)
            for t in parts:
                if t is not None and (kernel.in_view(t.spec.dtype_name) is None or t.rowmap is not None
                                      or t.spec.numel < op.numel or t.ck.memory_tensor(t.spec.name) is not None):
                    return False
        return True

    @staticmethod
    def _raw_copy(op: TensorOp) -> bool:
        return (op.kind == "copy" and op.base.rowmap is None and op.base.spec.dtype_name == op.out_dtype_name
                and op.base.spec.numel == op.numel and op.base.ck.memory_tensor(op.base.spec.name) is None)

    def _prefetchable(self, op: TensorOp) -> list[tuple[str, Term]]:
        """The (key, term) pairs :meth:`_fill` reads from a file for every chunk of ``op`` (see _run_op)."""
        if self._raw_copy(op) or op.out_dtype_name not in FLOAT_DTYPE_NAMES:
            return []
        if op.kind == "copy" or op.scale == 0.0:
            terms = [("base", op.base)]
        else:
            direct = op.lora is None and op.packed is None and not op.deltas
            terms = [("plus", op.plus), ("minus", op.minus)] if direct else []
            if op.deltas and op.ties_density is None:  # a composed apply's plain Δs, read once per chunk in order
                # (TIES reads every chunk of a Δ for its cut-off before the first one is composed: not prefetched)
                terms += [(f"d{i}", part.plus) for i, part in enumerate(op.deltas)
                          if part.lora is None and part.packed is None and part.plus is not None]
            terms.append(("base", op.base))
        return [(k, t) for k, t in terms
                if t is not None and t.rowmap is None and t.ck.memory_tensor(t.spec.name) is None]

    def _run_op(self, op: TensorOp, writer_thread: Writer) -> None:
        writer_thread.q.put(("begin", op.name, op.nbytes))
        out_itemsize = dtype_size(op.out_dtype_name)
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

    def _chunk(self, op: TensorOp, e0: int, e1: int, row_elems: int, obuf: np.ndarray) -> None:
        """Output elements [e0, e1) of ``op`` into the byte buffer ``obuf`` (this chunk's prefetched raw
        bytes, if any, in ``self._pre``). Touches only this engine's own buffers, files and stats, so
        workers (copies of the engine, see :meth:`_run_workers`) can run it side by side."""
        n = e1 - e0
        out_name = op.out_dtype_name
        out_itemsize = dtype_size(out_name)
        nbytes = n * out_itemsize
        floating = out_name in FLOAT_DTYPE_NAMES
        if self._raw_copy(op):
            spec = op.base.spec
            reader.pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * out_itemsize, nbytes, f"{spec.file}:{spec.name}")
            self._observe(spec, e0 * out_itemsize, obuf[:nbytes])
            self.stats.bytes_read += nbytes
            if floating and not all_finite_bytes(obuf[:nbytes], out_name):
                self._diagnose(op, e0, e1, row_elems)
        elif not floating:  # non-float copy with a row map or from memory
            src = op.base.ck.memory_tensor(op.base.spec.name)
            if src is None:
                spec = op.base.spec
                reader.pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * out_itemsize, nbytes, f"{spec.file}:{spec.name}")
            else:
                import torch

                obuf[:nbytes] = src.reshape(-1)[e0:e1].contiguous().view(torch.uint8).numpy()
        elif op.kind != "copy" and op.scale != 0.0 and self._kernel_chunk(op, e0, e1, row_elems, obuf[:nbytes]):
            self.stats.ran(op.name, "numba")
            if not all_finite_bytes(obuf[:nbytes], out_name):
                self._diagnose(op, e0, e1, row_elems)
        else:  # the torch path, on the chunk's bytes viewed as the output dtype
            import torch

            from deltaport.numerics import transfer_into

            out = torch_view(obuf[:nbytes], op.out_dtype)
            if op.kind == "copy" or op.scale == 0.0:
                self._round(out, self._fill("base", op.base, e0, e1, row_elems), n)
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
            if not all_finite(out):
                self._diagnose(op, e0, e1, row_elems)
            if op.base is None and (op.minus is not None or op.check is not None):
                self._verify_roundtrip(op, out, e0, e1, row_elems)

    def _round(self, out: torch.Tensor, acc: torch.Tensor, n: int) -> None:
        """One correct rounding of the compute-dtype result into the output dtype (see numerics)."""
        import torch

        from deltaport.numerics import round_into

        if acc.dtype == torch.float64 and out.dtype in (torch.bfloat16, torch.float16):
            round_into(out, acc, self.bufs.get("round", n, torch.int64))  # (acc is scratch: modified)
        else:
            out.copy_(acc)

    def _take(self, writer_thread: Writer, nbytes: int) -> np.ndarray:
        while True:
            try:
                b = writer_thread.free.get_nowait()
            except queue.Empty:
                if self._nout < 3 + self._workers:
                    self._nout += 1
                    b = np.empty(0, dtype=np.uint8)
                else:
                    b = writer_thread.free.get()
            if len(b) < nbytes:
                b = np.empty(max(nbytes, self._out_cap()), dtype=np.uint8)
            return b

    def _out_cap(self) -> int:
        # a chunk of the plan's widest output dtype: 1 MB per buffer for a bf16 model (8 bytes an element: 4 MB)
        return self.chunk * max((dtype_size(op.out_dtype_name) for op in self.plan.ops), default=8)

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar[0].update(self._bar[1], advance=n)

    def run(self, writer: ShardedWriter, *, progress: bool = False, threads: int | None = None, label: str = "") -> Stats:
        ops = {op.name: op for op in self.plan.ops}
        t0 = time.perf_counter()
        pin_mmap_threshold()  # chunk-sized temporaries are mapped and unmapped, not left to fragment the heap
        workers = max(1, int(threads or DEFAULT_THREADS))
        # torch only where a chunk needs it: a plan the kernel computes whole (plain file reads, kernel dtypes)
        # never imports it (~220 MB of the process and its import time); a chunk the kernel refuses after all
        # imports it then (element-wise, so its bytes do not depend on torch's thread count)
        torch = None if self._kernel_only() and "torch" not in sys.modules else _torch()
        old_threads = None if torch is None else torch.get_num_threads()
        if torch is not None:
            torch.set_num_threads(1)  # each worker runs torch on one thread (see DEFAULT_THREADS)
        if self.use_kernel and self.plan.operation != "diff" and workers > 1:
            # the kernel's own parallelism: one chunk split over ``threads`` threads (the fallback's chunks,
            # where the kernel does not apply, then run on one worker)
            self._kernel_threads, workers = workers, 1
            self._kernel_pool = ThreadPoolExecutor(max_workers=self._kernel_threads - 1, thread_name_prefix="deltaport-kernel")
        self._workers = workers
        self._nout = 0
        self._bar = None
        writer_thread = Writer(writer)
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
            self._reader = Prefetcher(self, [ops[entry.name] for entry in writer.order], extra_sets=workers - 1)
            self._reader.start()
        try:
            with ctx, (nullcontext() if torch is None else torch.inference_mode()):
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
            if old_threads is not None:
                torch.set_num_threads(old_threads)
            if self._kernel_pool is not None:
                self._kernel_pool.shutdown(wait=True)
                self._kernel_pool = None
        self.stats.bytes_written = writer_thread.bytes
        self.stats.seconds = time.perf_counter() - t0
        return self.stats


def _torch():
    import torch

    return torch


def default_chunk_elems(plan: Plan) -> int:
    """Elements per chunk for ``plan`` when the caller names none: :data:`TIES_CHUNK_ELEMS` for a TIES apply."""
    return TIES_CHUNK_ELEMS if any(op.ties_density is not None for op in plan.ops) else DEFAULT_CHUNK_ELEMS


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
