"""Which tensor is which, by name and config: vocabulary tensors (embedding and output rows), tied
input/output embeddings, and a tensor's counterpart in another checkpoint."""

from __future__ import annotations

import re

from deltaport.io.checkpoint import Checkpoint

EMBED_PATTERNS = (r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$", r"(^|\.)wte\.weight$",
                  r"(^|\.)embed_out\.weight$", r"(^|\.)word_embeddings\.weight$", r"(^|\.)output\.weight$",
                  r"(^|\.)embeddings\.weight$")


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is a tensor with one row per token (an input embedding or an output head)."""
    return any(re.search(p, name) for p in EMBED_PATTERNS)


def ties_word_embeddings(ck: Checkpoint) -> bool:
    """Whether the checkpoint's config ties its output head to its input embedding
    (``tie_word_embeddings``, at the top level or in ``text_config``; absent means untied)."""
    cfg = ck.config or {}
    tied = cfg.get("tie_word_embeddings")
    if tied is None and isinstance(cfg.get("text_config"), dict):
        tied = cfg["text_config"].get("tie_word_embeddings")
    return bool(tied)


def input_embedding_name(ck: Checkpoint) -> str | None:
    """The name of the checkpoint's ``embed_tokens`` weight (None when it has none)."""
    for n in ck.tensors:
        if re.search(r"(^|\.)embed_tokens\.weight$", n):
            return n
    return None


def counterpart(ck: Checkpoint, name: str) -> tuple[str | None, str | None]:
    """Find ``name`` in ``ck``: (its name there, a note); a missing lm_head of a tied checkpoint resolves
    to its input embedding. (None, None) when ``ck`` has no such tensor."""
    if name in ck.tensors:
        return name, None
    if re.search(r"(^|\.)lm_head\.weight$", name) and ties_word_embeddings(ck):
        embedding = input_embedding_name(ck)
        if embedding:
            return embedding, f"{ck.source} ties lm_head to {embedding}; its Δ is used once"
    return None, None
