"""The threads around the chunk loop: reused buffers, the writer thread that writes finished chunks while the
next one is computed, and the reader thread that preads the raw bytes of the next chunks (``os.preadv``
releases the GIL, so reading overlaps the arithmetic on the other core)."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import numpy as np

from deltaport.errors import RuntimeFailure
from deltaport.io import reader
from deltaport.io.tensors import dtype_size
from deltaport.io.writer import ShardedWriter
from deltaport.plan import TensorOp

if TYPE_CHECKING:
    import torch

    from deltaport.engine.core import Engine


class Buffers:
    """Reused buffers, grown on demand (never shrunk), so steady state allocates nothing: numpy arrays for a
    numpy dtype (raw bytes: ``np.uint8``; what the kernel reads and writes), torch tensors for a torch dtype
    (the torch path's values), so that a plan the kernel computes whole never imports torch."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, object], np.ndarray | torch.Tensor] = {}

    def get(self, key: str, n: int, dtype) -> np.ndarray | torch.Tensor:
        b = self._bufs.get((key, dtype))
        if b is None or len(b) < n:
            if type(dtype).__module__ == "torch":
                import torch

                b = torch.empty(max(n, 1), dtype=dtype)
            else:
                b = np.empty(max(n, 1), dtype=dtype)
            self._bufs[(key, dtype)] = b
        return b[:n]


def torch_view(buf: np.ndarray, dtype) -> torch.Tensor:
    """The bytes ``buf`` (a numpy buffer of :class:`Buffers`) as a torch tensor of ``dtype``, without a copy:
    how the torch path reads what the kernel's path keeps in numpy."""
    import torch

    return torch.from_numpy(buf).view(dtype)


class Writer(threading.Thread):
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


class Prefetcher(threading.Thread):
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
        self.files = reader.FilePool()
        self.stopping = threading.Event()

    def _take(self) -> Buffers | None:
        while not self.stopping.is_set():
            try:
                return self.free.get_nowait()
            except queue.Empty:
                if self.nsets < self.maxsets:
                    self.nsets += 1
                    return Buffers()
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
                    raws: dict[str, np.ndarray] = {}
                    bufs = None
                    if reads:
                        bufs = self._take()
                        if bufs is None:
                            return
                        for key, term in reads:
                            spec = term.spec
                            itemsize = dtype_size(spec.dtype_name)
                            k = max(0, min(e1, spec.numel) - e0)
                            if k:
                                raw = bufs.get(key, k * itemsize, np.uint8)
                                reader.pread_into(self.files.fd(spec.file), raw, spec.start + e0 * itemsize, k * itemsize,
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

    def next(self, name: str, e0: int) -> tuple[Buffers | None, dict[str, np.ndarray]]:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        if item is None or item[0] != name or item[1] != e0:
            raise RuntimeFailure(f"internal: reader out of step at tensor {name} element {e0}")
        return item[2], item[3]

    def release(self, bufs: Buffers | None) -> None:
        if bufs is not None:
            self.free.put(bufs)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
