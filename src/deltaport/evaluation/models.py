"""The models an evaluation scores: paths, hub ids or in-memory ``(model, tokenizer)`` pairs, each
named, checked before loading (:mod:`deltaport.io.model_check`) and fingerprinted for the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaport.errors import InputError
from deltaport.evaluation.cache import dir_fingerprint, object_fingerprint


@dataclass
class EvalModel:
    """One model of an evaluation: its row name, where it comes from, and what is known about it."""

    name: str
    source: Any  # path string, or (model, tokenizer)
    local_dir: Path | None = None
    fingerprint: str | None = None
    has_chat_template: bool = False
    tokenizer_id: str | None = None  # the tokenizer's identity (comparisons warn when models' differ)
    lm: Any = None  # the lm-eval model while this model is evaluated


def normalise_models(models) -> list[EvalModel]:
    """``models`` (a path, a list of paths / ``(name, source)`` pairs, or ``{name: source}``) as named
    :class:`EvalModel` s; a source is a path / hub id or a ``(model, tokenizer)`` pair."""
    if isinstance(models, (str, Path)):
        models = [models]
    if isinstance(models, dict):
        items = list(models.items())
    else:
        items = []
        for m in models:
            if isinstance(m, (str, Path)):
                items.append((str(m), str(m)))
            elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str):
                items.append(m)  # (name, path-or-pair)
            else:
                raise InputError("models must be paths/hub ids, or a dict {name: path or (model, tokenizer)}; "
                                 f"got {type(m).__name__}")
    out, seen = [], set()
    for name, src in items:
        if name in seen:
            raise InputError(f"model name {name!r} appears twice; give each model a distinct name")
        seen.add(name)
        if isinstance(src, Path):
            src = str(src)
        if not (isinstance(src, str) or (isinstance(src, tuple) and len(src) == 2)):
            raise InputError(f"model {name!r}: expected a path, hub id or a (model, tokenizer) pair")
        out.append(EvalModel(name=name, source=src))
    if not out:
        raise InputError("no models given")
    return out


def prepare_model(m: EvalModel, cache_dir: Path | None, need_fp: bool) -> None:
    """Resolve ``m`` (a hub id is fetched), check it before loading, note its chat template and, with
    ``need_fp``, its fingerprint for the result cache."""
    if isinstance(m.source, tuple):
        model, tok = m.source
        if tok is None:
            raise InputError(f"model {m.name!r}: an in-memory model needs its tokenizer: pass (model, tokenizer)")
        m.has_chat_template = bool(getattr(tok, "chat_template", None))
        m.tokenizer_id = _vocab_id(tok)
        if need_fp:
            m.fingerprint = object_fingerprint(model, tok)
        return
    from deltaport.io.checkpoint import resolve_dir
    from deltaport.io.model_check import check_model_dir

    d, _rev = resolve_dir(m.source)
    check_model_dir(d, m.source)
    m.local_dir = d
    m.has_chat_template = _dir_has_chat_template(d)
    m.tokenizer_id = _dir_tokenizer_id(d)
    if need_fp:
        m.fingerprint = dir_fingerprint(d, cache_dir)


def _dir_has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            return bool(json.loads(tc.read_text()).get("chat_template"))
        except ValueError:
            return False
    return False


def _dir_tokenizer_id(d: Path) -> str | None:
    """The bytes of a directory's vocabulary files (assets' list, less the special-token and chat settings),
    hashed; None when it has none."""
    import hashlib

    from deltaport.assets import TOKENIZER_FILES

    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        if name not in ("tokenizer_config.json", "special_tokens_map.json") and (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
            found = True
    return h.hexdigest() if found else None


def _vocab_id(tok) -> str:
    """An in-memory tokenizer's vocabulary, hashed."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
