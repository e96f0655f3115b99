"""A small streaming safetensors writer: the header is computed from the plan up front, then tensor
bytes are appended as they are produced, shard by shard, never holding a whole tensor.

Layout follows the safetensors spec (8-byte little-endian header length, JSON header padded with
spaces to 8 bytes, then the data) and Hugging Face sharding conventions (``model.safetensors`` for
one shard, else ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``). Within a
shard tensors are ordered by (decreasing item size, name), as the safetensors library orders them,
so every tensor is aligned to its item size.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltaport.errors import CheckpointError, DiskError, InputError, RuntimeFailure
from deltaport.io.atomic import DISK_ERRORS
from deltaport.io.checkpoint import INDEX_NAME, SINGLE_NAME
from deltaport.io.tensors import NAME_TO_ST, dtype_name, dtype_size, read_safetensors_header

if TYPE_CHECKING:  # annotations only: these modules must not import torch (header-only paths)
    import torch


@dataclass
class OutEntry:
    name: str
    dtype: torch.dtype  # or its name
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return dtype_size(self.dtype)

    @property
    def st_dtype(self) -> str:
        """The safetensors dtype code (``"BF16"``)."""
        return NAME_TO_ST[dtype_name(self.dtype)]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.itemsize


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int, what: str = "--shard-size") -> int:
    """A size in bytes from an int or a string: a number of bytes (``1000000``) or a number with a unit
    (``500MB``, ``5GB``, ``1.5GiB``; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024). Anything
    else, and a size under one byte, is an :class:`~deltaport.errors.InputError` naming ``what``."""
    fix = f"give a positive number of bytes or a number with a unit, e.g. {what} 5GB or {what} 500MB"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InputError(f"{what} {size!r} is not a size; {fix}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.fullmatch(size)
        if m is None:
            raise InputError(f"{what} {size!r} is not a size (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB); {fix}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n < 1:
        raise InputError(f"{what} {size!r} is {n} bytes; a shard needs at least one byte: {fix}")
    return n


WRITEBACK_BYTES = 64 << 20  # start writing dirty pages to disk every this many bytes (see _start_writeback)


def _load_sync_file_range():
    """libc ``sync_file_range`` (Linux) or None: lets the writer start writeback without waiting for it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _disk_error(exc: OSError, path: Path) -> DiskError:
    return DiskError(f"writing {path} failed: {DISK_ERRORS.get(exc.errno, exc.strerror)} ({exc}); free space or choose "
                     "another output location. The partial output was removed.")


class ShardedWriter:
    """Write ``entries`` into shards of at most ``shard_size`` bytes (a bigger tensor gets its own shard)."""

    def __init__(self, out_dir: Path, entries: list[OutEntry], shard_size: int, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        meta = {"format": "pt", **(metadata or {})}
        shards: list[list[OutEntry]] = []
        cur: list[OutEntry] = []
        cur_bytes = 0
        for e in entries:
            if cur and cur_bytes + e.nbytes > shard_size:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append(e)
            cur_bytes += e.nbytes
        if cur or not shards:
            shards.append(cur)
        n = len(shards)
        self.shards = []
        for i, group in enumerate(shards):
            fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            group = sorted(group, key=lambda e: (-e.itemsize, e.name))
            header: dict = {"__metadata__": meta}
            off = 0
            for e in group:
                header[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
                off += e.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self.shards.append({"file": fname, "entries": group, "header": raw, "data_bytes": off})
        self.order = [e for s in self.shards for e in s["entries"]]  # the order tensors must be produced in
        self._shard_of = {e.name: i for i, s in enumerate(self.shards) for e in s["entries"]}
        self._planned_bytes = {e.name: e.nbytes for e in entries}
        self._fd: int | None = None
        self._written = 0  # bytes written to the open shard
        self._flushed = 0  # bytes of it whose writeback has been started
        self._cur_shard = -1

    # -- streaming ---------------------------------------------------------------------------------
    def _open_shard(self, i: int) -> None:
        self._close_shard()
        s = self.shards[i]
        path = self.out_dir / s["file"]
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
            self._written = self._flushed = 0
            self._write_all(struct.pack("<Q", len(s["header"])) + s["header"], path)
        except OSError as exc:
            raise _disk_error(exc, path) from None
        self._cur_shard = i

    def _write_all(self, data, path: Path) -> None:
        mv = memoryview(data).cast("B")
        while mv:
            try:
                n = os.write(self._fd, mv)
            except OSError as exc:
                raise _disk_error(exc, path) from None
            mv = mv[n:]
            self._written += n
        if self._written - self._flushed >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing what we wrote so far, without waiting: the dirty pages then go
        to disk while we compute, instead of all at once in the fsync that closes the shard (which would
        otherwise wait for the whole shard to reach the disk). A hint only; errors surface at fsync."""
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(self._fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE)
        self._flushed = self._written

    def _close_shard(self) -> None:
        if self._fd is not None:
            path = self.out_dir / self.shards[self._cur_shard]["file"]
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise _disk_error(exc, path) from None
            finally:
                os.close(self._fd)
                self._fd = None

    def begin(self, name: str, nbytes: int) -> None:
        """Start tensor ``name``, whose ``nbytes`` bytes follow through :meth:`write`: it must be the next
        tensor of :attr:`order`, of the size the header was planned with."""
        if nbytes != self._planned_bytes[name]:
            raise RuntimeFailure(f"internal: tensor {name} is {nbytes} bytes, the header was planned with "
                                 f"{self._planned_bytes[name]}")
        i = self._shard_of[name]
        if i != self._cur_shard:
            if i != self._cur_shard + 1:
                raise RuntimeFailure(f"internal: tensor {name} produced out of order")
            self._open_shard(i)

    def write(self, data: torch.Tensor | bytes) -> None:
        torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
        if torch is not None and isinstance(data, torch.Tensor):
            data = data.contiguous().view(torch.uint8).numpy()
        self._write_all(data, self.out_dir / self.shards[self._cur_shard]["file"])

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finalize(self) -> dict[str, str]:
        """Close the last shard, write the index (if sharded), re-open and verify every shard."""
        if self._cur_shard != len(self.shards) - 1:  # empty trailing shards (no tensors) still get written
            for i in range(self._cur_shard + 1, len(self.shards)):
                self._open_shard(i)
        self._close_shard()
        weight_map = {e.name: s["file"] for s in self.shards for e in s["entries"]}
        if len(self.shards) > 1:
            total = sum(s["data_bytes"] for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            path = self.out_dir / INDEX_NAME
            try:
                path.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise _disk_error(exc, path) from None
        self.verify()
        return weight_map

    def verify(self) -> None:
        for s in self.shards:
            path = self.out_dir / s["file"]
            want = 8 + len(s["header"]) + s["data_bytes"]
            got = path.stat().st_size
            if got != want:
                raise RuntimeFailure(f"verification failed: {path} has {got} bytes, expected {want}")
            try:
                header, _ = read_safetensors_header(path)
            except CheckpointError as exc:  # our own output: a write failure, not bad input
                raise RuntimeFailure(f"verification failed: {exc}") from None
            names = {k for k in header if k != "__metadata__"}
            if names != {e.name for e in s["entries"]}:
                raise RuntimeFailure(f"verification failed: tensors in {path} differ from the plan")
            for e in s["entries"]:
                h = header[e.name]
                if h["dtype"] != e.st_dtype or tuple(h["shape"]) != tuple(e.shape):
                    raise RuntimeFailure(f"verification failed: {e.name} in {path} has wrong dtype/shape")
        self._verify_index()

    def _verify_index(self) -> None:
        """index <-> shards <-> sizes: the index read back names every tensor's shard and the total size."""
        planned = {s["file"] for s in self.shards}
        stray = {p.name for p in self.out_dir.glob("*.safetensors")} - planned
        if stray:
            raise RuntimeFailure(f"verification failed: unexpected weight files {sorted(stray)} in {self.out_dir}")
        path = self.out_dir / INDEX_NAME
        if len(self.shards) == 1:
            if path.exists():
                raise RuntimeFailure(f"verification failed: {path} exists beside a single {SINGLE_NAME}")
            return
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"verification failed: cannot read back {path}: {exc}") from None
        want_map = {e.name: s["file"] for s in self.shards for e in s["entries"]}
        if not isinstance(index, dict) or index.get("weight_map") != want_map:
            raise RuntimeFailure(f"verification failed: {path} does not match the shards written")
        total = sum(s["data_bytes"] for s in self.shards)
        if (index.get("metadata") or {}).get("total_size") != total:
            raise RuntimeFailure(f"verification failed: {path} total_size is not {total}")
