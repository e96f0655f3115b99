"""Execute a :class:`~deltaport.plan.Plan`: stream every output tensor in chunks through reused
buffers (memory stays a small multiple of one chunk, whatever the model size), overlap arithmetic
with writing (a writer thread), check every chunk for NaN/Inf, and round once to the output dtype.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from deltaport.errors import DeltaportError, InputError, NumericalError, RuntimeFailure
from deltaport.io.checkpoint import FLOAT_DTYPES
from deltaport.io.reader import FilePool, pread_into
from deltaport.io.writer import ShardedWriter
from deltaport.plan import Plan, TensorOp, Term

LOG = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMS = 1 << 22  # 4M elements: 16 MB per float32 buffer


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    seconds: float = 0.0
    nonfinite_inputs: list[str] = field(default_factory=list)
    inexact_delta: dict[str, int] = field(default_factory=dict)  # diff: elements where base + Δ != finetuned


def _isz(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


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


class Engine:
    def __init__(self, plan: Plan, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS, strict: bool = False):
        self.plan = plan
        self.chunk = max(int(chunk_elems), 1)
        self.strict = strict
        self.cd = plan.compute_dtype
        self.bufs = _Buffers()
        self.files = FilePool()
        self.stats = Stats()

    # -- reading -------------------------------------------------------------------------------------
    def _fill(self, key: str, term: Term, e0: int, e1: int, row_elems: int) -> torch.Tensor:
        """Values of ``term`` for output elements [e0, e1) in the compute dtype (zeros past its end)."""
        n = e1 - e0
        spec = term.spec
        out = self.bufs.get(key + ":f", n, self.cd)
        isz = _isz(spec.dtype)
        mem = term.ck.memory_tensor(spec.name)
        if term.rowmap is None:
            k = max(0, min(e1, spec.numel) - e0)
            if k:
                if mem is not None:
                    out[:k].copy_(mem.reshape(-1)[e0:e0 + k])
                else:
                    raw = self.bufs.get(key + ":r", k * isz, torch.uint8)
                    pread_into(self.files.fd(spec.file), raw, spec.start + e0 * isz, k * isz, f"{spec.file}:{spec.name}")
                    self.stats.bytes_read += k * isz
                    out[:k].copy_(raw.view(spec.dtype))
            if k < n:
                out[k:].zero_()
            return out
        # row-gathered (vocab align): output rows r0..r1 read source rows rowmap[r]
        r0, r1 = e0 // row_elems, e1 // row_elems
        idx = term.rowmap[r0:r1].tolist()
        out2 = out.view(r1 - r0, row_elems)
        raw = self.bufs.get(key + ":r", n * isz, torch.uint8)
        rowbytes = row_elems * isz
        j = 0
        while j < len(idx):
            i = idx[j]
            if i < 0:
                out2[j].zero_()
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
        return out

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

    def _lora(self, op: TensorOp, e0: int, e1: int, row_elems: int) -> torch.Tensor:
        cache = getattr(self, "_lora_cache", None)
        if cache is None or cache[0] != op.name:
            A = op.lora.ck.tensor(op.lora.a.name).to(self.cd)
            B = op.lora.ck.tensor(op.lora.b.name).to(self.cd)
            self._lora_cache = cache = (op.name, A, B)
        _, A, B = cache
        r0, r1 = e0 // row_elems, e1 // row_elems
        out = self.bufs.get("plus:f", e1 - e0, self.cd).view(r1 - r0, row_elems)
        torch.matmul(B[r0:r1], A, out=out)
        out.mul_(op.lora.scaling)
        return out.view(-1)

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

    def _run_op(self, op: TensorOp, wt: _Writer) -> None:
        wt.q.put(("begin", op.name, op.nbytes))
        osz = _isz(op.out_dtype)
        raw_copy = (op.kind == "copy" and op.base.rowmap is None and op.base.spec.dtype == op.out_dtype
                    and op.base.spec.numel == op.numel and op.base.ck.memory_tensor(op.base.spec.name) is None)
        floating = op.out_dtype in FLOAT_DTYPES
        for e0, e1, row_elems in self._chunks(op):
            n = e1 - e0
            obuf = self._take(wt, n * osz)
            if raw_copy:
                spec = op.base.spec
                pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * osz, n * osz, f"{spec.file}:{spec.name}")
                self.stats.bytes_read += n * osz
                if floating and not torch.isfinite(obuf[: n * osz].view(op.out_dtype)).all():
                    self._diagnose(op, e0, e1, row_elems)
            elif not floating:  # non-float copy with a row map or from memory
                src = op.base.ck.memory_tensor(op.base.spec.name)
                if src is None:
                    spec = op.base.spec
                    pread_into(self.files.fd(spec.file), obuf, spec.start + e0 * osz, n * osz, f"{spec.file}:{spec.name}")
                else:
                    obuf[: n * osz].copy_(src.reshape(-1)[e0:e1].contiguous().view(torch.uint8))
            else:
                if op.kind == "copy" or op.scale == 0.0:
                    acc = self._fill("base", op.base, e0, e1, row_elems)
                else:
                    if op.lora is not None:
                        d = self._lora(op, e0, e1, row_elems)
                    else:
                        d = self._fill("plus", op.plus, e0, e1, row_elems)
                        if op.minus is not None:
                            d.sub_(self._fill("minus", op.minus, e0, e1, row_elems))
                    if op.scale != 1.0:
                        d.mul_(op.scale)
                    if op.base is not None:
                        acc = self._fill("base", op.base, e0, e1, row_elems)
                        acc.add_(d)
                    else:
                        acc = d
                out = obuf[: n * osz].view(op.out_dtype)
                out.copy_(acc)
                if not torch.isfinite(out).all():
                    self._diagnose(op, e0, e1, row_elems)
                if op.base is None and op.minus is not None and op.lora is None:
                    self._verify_roundtrip(op, out, n)
            wt.q.put(("data", obuf, n * osz))
            wt.check()
            self._progress(n * osz)
        self.stats.tensors += 1

    def _verify_roundtrip(self, op: TensorOp, out: torch.Tensor, n: int) -> None:
        """diff: check that base + stored Δ rounds back to the finetuned value, element by element."""
        a, b = op.plus.spec, op.minus.spec
        if (op.plus.rowmap is not None or a.numel != op.numel or b.numel != op.numel
                or op.plus.ck.memory_tensor(a.name) is not None or op.out_dtype == torch.float64):
            return
        bvals = self.bufs.get("minus:f", n, self.cd)
        tmp = self.bufs.get("verify", n, self.cd)
        tmp.copy_(out)
        tmp.add_(bvals)
        rt = self.bufs.get("verify2", n, a.dtype)
        rt.copy_(tmp)
        araw = self.bufs.get("plus:r", n * _isz(a.dtype), torch.uint8).view(a.dtype)
        bad = int((rt != araw).sum()) - int((rt.isnan() & araw.isnan()).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _take(self, wt: _Writer, nbytes: int) -> torch.Tensor:
        while True:
            try:
                b = wt.free.get_nowait()
            except queue.Empty:
                if self._nout < 3:
                    self._nout += 1
                    b = torch.empty(0, dtype=torch.uint8)
                else:
                    b = wt.free.get()
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
        if threads:
            torch.set_num_threads(threads)
        self._nout = 0
        self._bar = None
        wt = _Writer(writer)
        wt.start()
        ctx = nullcontext()
        if progress:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            ctx = prog
            self._bar = (prog, prog.add_task(label or self.plan.operation, total=self.plan.total_out_bytes))
        try:
            with ctx, torch.inference_mode():
                for entry in writer.order:
                    self._run_op(ops[entry.name], wt)
            wt.close()
            wt.check()
        except BaseException:
            wt.close()
            writer.abort()
            raise
        finally:
            self.files.close()
            torch.set_num_threads(old_threads)
        self.stats.bytes_written = wt.bytes
        self.stats.seconds = time.perf_counter() - t0
        return self.stats


def execute(plan: Plan, writer: ShardedWriter, *, progress: bool = False, threads: int | None = None,
            chunk_elems: int = DEFAULT_CHUNK_ELEMS, strict: bool = False, label: str = "") -> Stats:
    """Run ``plan`` into ``writer``; raises DeltaportError subclasses on bad data."""
    try:
        return Engine(plan, chunk_elems=chunk_elems, strict=strict).run(writer, progress=progress, threads=threads, label=label)
    except (DeltaportError, KeyboardInterrupt, SystemExit):
        raise
    except OSError as exc:
        from deltaport.errors import DiskError

        raise DiskError(f"I/O error: {exc}") from None
    except RuntimeError as exc:  # torch runtime errors (out of memory, ...)
        raise RuntimeFailure(f"{type(exc).__name__}: {exc}") from None
