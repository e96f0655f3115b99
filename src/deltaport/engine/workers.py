"""Several worker threads computing chunks side by side (each a copy of the engine with its own buffers,
files and stats), their results handed to the writer strictly in plan order, so the bytes are those of the
sequential loop."""

from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from deltaport.engine.pipeline import Buffers, Writer
from deltaport.engine.stats import Stats
from deltaport.io import reader
from deltaport.io.tensors import dtype_size
from deltaport.plan import TensorOp

if TYPE_CHECKING:
    from deltaport.engine.core import Engine


class WorkersMixin:
    """:class:`~deltaport.engine.core.Engine`'s worker pool (``--threads`` where the kernel does not split chunks)."""

    def _worker_copy(self) -> "Engine":
        """An engine sharing the plan but with its own buffers, files and stats (one per worker thread)."""
        w = copy.copy(self)
        w.bufs, w.files, w.stats = Buffers(), reader.FilePool(), Stats()
        w._pre, w._raw, w._lora_cache, w._reader, w._bar = {}, {}, None, None, None
        w._packed_cache, w._ties_cache = {}, None
        return w

    def _run_workers(self, ops: list[TensorOp], writer_thread: Writer, workers: int) -> None:
        """Compute chunks on ``workers`` threads (each a copy of the engine; torch runs 1 thread per op and
        releases the GIL inside it) while this thread hands out the prefetched inputs and passes finished
        chunks to the writer strictly in plan order: the bytes are those of the sequential loop. At most
        ``workers`` chunks are in flight, each holding one prefetched input set and one output buffer."""
        local = threading.local()
        copies: list[Engine] = []
        lock = threading.Lock()

        import torch

        def task(op: TensorOp, e0: int, e1: int, row_elems: int, obuf: np.ndarray, pre: dict) -> None:
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
                out_itemsize = dtype_size(op.out_dtype_name)
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
