"""The lab's cache: content hashes, cache keys, and where a finished step's result is kept.

Every expensive step (a fine-tune, a Δ, a transfer, an evaluation, a barrier, a check) is keyed by
:func:`step_key`: the *content hashes* of its inputs, its parameters, and the library versions. Its
result is kept in one of two places, so a rerun (or a resumed, killed run) reuses what is done:

* a model or Δ directory carries ``lab_key.json`` with the key it was built for
  (:func:`is_built` / :func:`mark_built`);
* a JSON record (scores, curves, barriers, check verdicts) is ``cache/<key>.json`` (:class:`JsonCache`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from deltaport.io.atomic import atomic_write_file
from deltaport.io.checkpoint import content_hash
from deltaport.lab import env

#: (resolved directory, newest weight file's mtime) -> content hash: a model's hash is read once per run
_MODEL_HASHES: dict[tuple[str, float], str] = {}


def model_hash(path: Path) -> str:
    """Content hash of a model directory's weights (deltaport's ``content_hash``), memoised by mtime."""
    path = Path(path)
    key = (str(path.resolve()), max((p.stat().st_mtime for p in path.glob("*.safetensors")), default=0.0))
    if key not in _MODEL_HASHES:
        _MODEL_HASHES[key] = content_hash(path)
    return _MODEL_HASHES[key]


def step_key(kind: str, **parts: Any) -> str:
    """A cache key: ``kind`` + the JSON of ``parts`` (content hashes of every input, parameters) + the
    library versions and deltaport's release version (:func:`deltaport.lab.env.cache_salt`), hashed."""
    blob = json.dumps({"kind": kind, **parts, "_env": env.cache_salt()}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary sibling (a killed run never leaves half a file)."""
    atomic_write_file(path, lambda tmp: tmp.write_text(text), overwrite=True)


def is_built(path: Path, key: str) -> bool:
    """Whether the directory ``path`` holds the result of the step with cache key ``key``."""
    marker = Path(path) / "lab_key.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == key


def mark_built(path: Path, key: str, info: dict) -> None:
    """Record in ``path/lab_key.json`` that the directory holds the result of step ``key`` (``info``: its inputs)."""
    write_text(Path(path) / "lab_key.json", json.dumps({"key": key, **info}, indent=1, sort_keys=True, default=str))


class JsonCache:
    """``key -> JSON record`` stored as one file per key under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Any | None:
        path = self.root / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: Any) -> None:
        write_text(self.root / f"{key}.json", json.dumps(value, indent=1, sort_keys=True, default=str))


def wall_seconds(results: dict) -> float | None:
    """Wall seconds a lab run cost over all its passes (a first run, then resumed ones): ``timings_s.passes``
    summed; ``timings_s.total`` (this pass alone) for results written before passes were recorded."""
    t = results.get("timings_s", {})
    return round(sum(t["passes"]), 1) if "passes" in t else t.get("total")
