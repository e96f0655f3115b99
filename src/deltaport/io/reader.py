"""Reading tensor bytes into reused buffers with ``os.preadv`` (no mmap: mapped pages would count
towards the process's resident memory and grow with model size).

Bytes only: where a tensor lives (:class:`deltaport.io.tensors.TensorSpec`) is known to the callers;
this module imports nothing of deltaport but its errors."""

from __future__ import annotations

import os

from deltaport.errors import CheckpointError


class FilePool:
    """Open file descriptors, one per shard, closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, path) -> int:
        key = str(path)
        if key not in self._fds:
            try:
                self._fds[key] = os.open(key, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot open shard {key}: {exc}") from None
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pread_into(fd: int, buf, offset: int, nbytes: int, what: str) -> None:
    """Fill ``buf[:nbytes]`` (a uint8 numpy array, or a uint8 torch tensor) from ``fd`` at ``offset``."""
    mv = memoryview(buf.numpy() if hasattr(buf, "numpy") else buf)[:nbytes]
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            raise CheckpointError(f"{what}: file ended early (wanted {nbytes} bytes at offset {offset}); "
                                  "the shard is truncated - re-download it")
        got += n

