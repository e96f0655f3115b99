"""Vocabularies: a model's token -> id map (through its tokenizer), the one a delta recorded for its
fine-tune, and the row maps of vocabulary ``align`` (each target row matched to the source models' rows
of the same token string)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltaport.errors import PlanError
from deltaport.io.checkpoint import Checkpoint

if TYPE_CHECKING:  # annotations only: planning must not import torch (header-only paths)
    import torch

UNMATCHED_SHOWN = 100  # tokens listed by name in provenance (all are counted)


def load_vocab(directory: Path) -> dict[str, int]:
    """token string -> id, through transformers (never trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise PlanError(f"--vocab-policy align needs the tokenizer of {directory}, which failed to load: {exc}") from None
    return dict(tokenizer.get_vocab())


def delta_finetuned_vocab(delta: Checkpoint) -> dict | None:
    """The token -> id map of a delta's ``source_finetuned/tokenizer.json`` (None when absent or not readable)."""
    path = delta.dir / "source_finetuned" / "tokenizer.json"
    try:
        vocab = json.loads(path.read_text()).get("model", {}).get("vocab")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(vocab, list):  # unigram: [[token, score], ...]
        vocab = {str(t[0]): i for i, t in enumerate(vocab) if isinstance(t, list) and t}
    return vocab if isinstance(vocab, dict) else None


@dataclass
class RowAlignment:
    """Row maps of one vocabulary tensor under ``align`` (output row = target row j).

    A target token found in *both* source vocabularies (within their row counts) gets its Δ,
    ``finetuned[i_a] − base[i_b]``, each row found through its own model's tokenizer. Any other target
    row has no Δ defined: it keeps the target's row, or, with ``unmatched="finetuned"`` and a token the
    fine-tune has, takes the fine-tune's row as it is (``overlay``; λ does not scale it). Both are exact
    copies, the sign of zero included: the fine-tune's term reads −0.0 for those rows (+0.0 when λ < 0),
    so their Δ·λ is −0.0 and x + (−0.0) = x for every x."""

    plus: torch.Tensor  # target row -> fine-tune row (-1: no Δ)
    minus: torch.Tensor  # target row -> base row (-1: no Δ)
    target: torch.Tensor | None  # target row -> target row, -1 where the overlay supplies it (None: identity)
    overlay: torch.Tensor | None  # target row -> fine-tune row copied as is (-1: not overlaid)
    matched: int
    no_base: list[tuple[str, int]]  # target tokens without a base row, by target id
    no_finetuned: list[tuple[str, int]]  # target tokens with a base row but none in the fine-tune
    rows_without_token: int  # target rows no target token maps to (padding rows): no Δ


def align_rows(ft_vocab: dict[str, int], base_vocab: dict[str, int], tgt_vocab: dict[str, int], *, ft_rows: int,
               base_rows: int, tgt_rows: int, unmatched: str = "target") -> RowAlignment:
    """Match every target row to the fine-tune's and the base's rows of the same token string."""
    plus, minus, overlay = [-1] * tgt_rows, [-1] * tgt_rows, [-1] * tgt_rows  # lists: 150K-token vocabularies
    covered = [False] * tgt_rows
    matched, no_base, no_ft = 0, [], []
    for token, j in sorted(tgt_vocab.items(), key=lambda kv: kv[1]):
        if not 0 <= j < tgt_rows:
            continue
        covered[j] = True
        ft_row, base_row = ft_vocab.get(token), base_vocab.get(token)
        ft_row = ft_row if ft_row is not None and 0 <= ft_row < ft_rows else None
        base_row = base_row if base_row is not None and 0 <= base_row < base_rows else None
        if ft_row is not None and base_row is not None:
            plus[j], minus[j] = ft_row, base_row
            matched += 1
            continue
        (no_base if base_row is None else no_ft).append((token, j))
        if unmatched == "finetuned" and ft_row is not None:
            overlay[j] = ft_row
    import torch

    target = None
    if any(i >= 0 for i in overlay):
        target = torch.tensor([-1 if o >= 0 else j for j, o in enumerate(overlay)], dtype=torch.int64)
    return RowAlignment(torch.tensor(plus, dtype=torch.int64), torch.tensor(minus, dtype=torch.int64), target,
                        torch.tensor(overlay, dtype=torch.int64) if target is not None else None, matched, no_base, no_ft,
                        tgt_rows - sum(covered))
