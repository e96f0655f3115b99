"""Content hashes remembered on disk, keyed by the identity of the weight files they were computed from.

A checkpoint's :func:`~deltaport.io.checkpoint.content_hash` reads every weight byte (sha256: ~1.8 GB/s on
one core here, the largest single cost of a transfer on 2 cores: 1.3 s of CPU for three 0.77 GB inputs).
The same base model is an input of many runs (every transfer to one target, every apply of a Δ, every
evaluation cache key), so the hash is remembered as git's index remembers file hashes: under a key made of
every weight file's resolved path, size, inode, device, mtime and ctime (nanoseconds). Any write to a file
changes its ctime (which no tool can set back), a replaced file has a new inode, so a changed file never
meets an old hash. Two guards keep a racing writer out: a hash is stored only when the files' stat is the
same after hashing as before, and only when their last change is older than :data:`RACY_SECONDS` before the
hash began (a write within the same timestamp tick could otherwise keep ctime).

Where: ``$DELTAPORT_HASH_CACHE`` (a directory, or ``off``), else ``$DELTAPORT_CACHE/content-hashes``, else
``$XDG_CACHE_HOME/deltaport/content-hashes`` (``~/.cache/deltaport/content-hashes``). One small text file
per key; a cache that cannot be written is skipped silently (the hash is then computed each time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

LOG = logging.getLogger(__name__)

ENV = "DELTAPORT_HASH_CACHE"
RACY_SECONDS = 2.0
FORMAT = 1  # the content hash's definition (sha256 over sorted name, dtype, shape, bytes); bump on change


def cache_dir() -> Path | None:
    """The memo's directory, or None where ``DELTAPORT_HASH_CACHE=off``."""
    v = os.environ.get(ENV, "").strip()
    if v.lower() in ("off", "0", "false", "no"):
        return None
    if v:
        return Path(v)
    root = os.environ.get("DELTAPORT_CACHE")
    if root:
        return Path(root) / "content-hashes"
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltaport" / "content-hashes"
    except RuntimeError:  # no home directory to be found: nothing remembered
        return None


def _stat(files: list[Path]) -> list[list] | None:
    try:
        out = []
        for f in files:
            st = os.stat(f)
            out.append([str(Path(f).resolve()), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns])
        return out
    except OSError:
        return None


class Memo:
    """One checkpoint's entry: made before its bytes are hashed (:meth:`begin`), read (:meth:`get`) and
    written after (:meth:`put`)."""

    def __init__(self, directory: Path, files: list[Path], stat: list[list], started: float):
        self.directory, self.files, self.stat, self.started = directory, files, stat, started
        blob = json.dumps({"format": FORMAT, "files": stat}, sort_keys=True)
        self.path = directory / f"{hashlib.sha256(blob.encode()).hexdigest()}.txt"

    @classmethod
    def begin(cls, files) -> "Memo | None":
        """The entry for these weight files (None: no memo directory, no files, or a file cannot be stat'ed)."""
        d = cache_dir()
        files = sorted({Path(f) for f in files})
        if d is None or not files:
            return None
        started = time.time()
        stat = _stat(files)
        return None if stat is None else cls(d, files, stat, started)

    def get(self) -> str | None:
        try:
            v = self.path.read_text().strip()
        except OSError:
            return None
        return v if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else None

    def put(self, digest: str) -> bool:
        """Remember ``digest`` if the files are unchanged since :meth:`begin` and were last changed well before
        it. True when stored."""
        newest = max(max(s[4], s[5]) for s in self.stat) / 1e9
        if newest > self.started - RACY_SECONDS or _stat(self.files) != self.stat:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(digest + "\n")
            os.replace(tmp, self.path)
            return True
        except OSError as exc:  # a read-only or full cache: the hash is computed again next time
            LOG.debug("content hash memo not written (%s): %s", self.path, exc)
            return False
