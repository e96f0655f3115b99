"""Artifact store of a lab run: atomic directories and a content-keyed cache of step results.

Every expensive step (a fine-tune, a transfer, an evaluation) is keyed by the *content hashes* of
its inputs plus its parameters; its result (a model directory, or a JSON record) is stored under
that key, so a rerun (or a resumed, killed run) reuses what is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Write into a temporary sibling of ``path``; rename to ``path`` only on success."""
    try:
        from deltaport.io.atomic import atomic_output_dir
    except ImportError:  # core engine not importable (should not happen once it has landed)
        atomic_output_dir = None
    path = Path(path)
    if atomic_output_dir is not None:
        with atomic_output_dir(path, overwrite=True) as tmp:
            yield Path(tmp)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


_HASH_CACHE: dict[tuple[str, float], str] = {}


def model_hash(path: Path) -> str:
    """Content hash of a model directory's weights (deltaport's ``content_hash``), memoised by mtime."""
    path = Path(path)
    key = (str(path.resolve()), max((p.stat().st_mtime for p in path.glob("*.safetensors")), default=0.0))
    if key not in _HASH_CACHE:
        try:
            from deltaport.io.checkpoint import content_hash
        except ImportError:
            content_hash = None
        if content_hash is not None:
            _HASH_CACHE[key] = content_hash(path)
        else:
            h = hashlib.sha256()
            for f in sorted(path.glob("*.safetensors")):
                h.update(f.read_bytes())
            _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def step_key(kind: str, **parts: Any) -> str:
    """A cache key: ``kind`` + the JSON of ``parts`` (content hashes of every input, parameters) + the
    library versions and deltaport's release version (:func:`deltaport.lab.env.cache_salt`), hashed."""
    from deltaport.lab.env import cache_salt

    blob = json.dumps({"kind": kind, **parts, "_env": cache_salt()}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class JsonCache:
    """``key -> JSON record`` stored as one file per key under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Any | None:
        p = self.root / f"{key}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, key: str, value: Any) -> None:
        p = self.root / f"{key}.json"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True, default=str))
        tmp.replace(p)
