"""The result cache: what identifies a model, a task and a setting, and where a result is kept.

A result is cached (when ``cache_dir`` is given) under a key made of the model's weight content hash,
its tokenizer/config, the task (for local tasks: the YAML and its data files' bytes) and every setting
that changes a score, so re-running a comparison evaluates only what changed. Layout under
``cache_dir``: ``results/KEY[:2]/KEY.json`` (one record per model, task and protocol) and
``fingerprints/*.txt`` (a directory's fingerprint, memoised by its files' sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from deltaport.assets import CHAT_FILES, TOKENIZER_FILES
from deltaport.io.atomic import json_default
from deltaport.evaluation.tasks import TaskSpec
from deltaport.io.atomic import atomic_write_file

LOG = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: records carry per-item records (``items``) and lm-eval's own entries

#: the non-weight files that make a model directory's identity, hashed in this order (assets' lists:
#: every tokenizer file a model may carry, e.g. a BPE tokenizer's vocab.json/merges.txt)
_MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, *CHAT_FILES)

#: settings that change a score (``device`` by its kind: cuda:0 and cuda:1 give the same numbers)
_KEY_SETTINGS = ("limit", "device", "backend", "batch_size", "seed", "model_args", "lm_eval_version", "gen_kwargs",
                 "system_instruction")


def _sha(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def _write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text), overwrite=True)


def dir_fingerprint(d: Path, cache_dir: Path | None) -> str:
    """content_hash of the weights + config/tokenizer bytes; memoised by file sizes and mtimes."""
    from deltaport.io.checkpoint import content_hash

    stat = []
    for p in sorted(d.iterdir()):
        if p.is_file():
            st = p.stat()
            stat.append([p.name, st.st_size, st.st_mtime_ns])
    memo_key = _sha(json.dumps([str(d.resolve()), stat]))
    memo = (cache_dir / "fingerprints" / f"{memo_key}.txt") if cache_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256(content_hash(d).encode())
    for name in _MODEL_FILES:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    fp = h.hexdigest()
    if memo is not None:
        _write_text(memo, fp)
    return fp


def object_fingerprint(model, tok) -> str:
    """The identity of an in-memory model: every tensor's bytes, the config and the tokenizer."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(tokenizer_fingerprint(tok).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    return _sha(json.dumps({
        "class": type(tok).__name__,
        "vocab": sorted(tok.get_vocab().items()),
        "chat_template": getattr(tok, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "add_bos": getattr(tok, "add_bos_token", None),
    }, default=str))


def cache_key(model_fingerprint: str | None, ts: TaskSpec, protocol: str, settings: dict) -> str:
    """The key of one (model, task, protocol) result under ``settings`` (those of :func:`evaluate`)."""
    relevant = {k: settings[k] for k in _KEY_SETTINGS}
    relevant["device"] = relevant["device"].split(":")[0]
    relevant["fewshot_as_multiturn"] = protocol == "chat" and settings["fewshot_as_multiturn"] is not False
    return _sha(json.dumps({"v": CACHE_VERSION, "model": model_fingerprint, "task": ts.fingerprint,
                            "task_name": ts.name, "num_fewshot": ts.num_fewshot, "protocol": protocol,
                            "settings": relevant}, sort_keys=True, default=str))


def _entry(cache: Path, key: str) -> Path:
    return cache / "results" / key[:2] / f"{key}.json"


def cache_get(cache: Path, key: str) -> dict | None:
    """The cached record under ``key``; None when absent or unreadable (then evaluated again)."""
    p = _entry(cache, key)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["record"]
    except (ValueError, KeyError, OSError):
        LOG.warning("ignoring unreadable cache entry %s", p)
        return None


def cache_put(cache: Path, key: str, record: dict, *, model: str, model_fingerprint: str | None, task: str,
              protocol: str) -> None:
    """Keep ``record`` under ``key`` (written to a temporary sibling, then renamed)."""
    _write_text(_entry(cache, key), json.dumps({"model": model, "model_fingerprint": model_fingerprint,
                                                "task": task, "protocol": protocol, "record": record},
                                               default=json_default))
