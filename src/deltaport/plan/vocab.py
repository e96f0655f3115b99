"""Vocabularies: a model's token -> id map (through its tokenizer), the one a delta recorded for its
fine-tune, the row maps of vocabulary ``align`` (each output row matched to the models' rows of the
same token string), and the check that an output's tokenizer fits its embedding: every id it can
produce has a row (:func:`check_tokenizer_fits`), and the fine-tune's tokens it drops are named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deltaport.errors import PlanError
from deltaport.io.checkpoint import Checkpoint

if TYPE_CHECKING:  # annotations only: planning must not import torch (header-only paths)
    import torch

UNMATCHED_SHOWN = 100  # tokens listed by name in provenance (all are counted)
WARNED = 10  # tokens listed by name in a warning


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
    """Row maps of one vocabulary tensor under ``align`` (output row = the output tokenizer's id j).

    The output's tokenizer is the target's (the default: output row j is target row j) or the
    fine-tune's (``--tokenizer-from source-finetuned``: output row j is the fine-tune's token j, found in
    the target by its string). An output token found in the target and in *both* source vocabularies
    (within their row counts) gets its Δ, ``finetuned[i_a] − base[i_b]``, each row found through its own
    model's tokenizer. Any other token the target has has no Δ defined: it keeps the target's row, or,
    with ``unmatched="finetuned"`` and a token the fine-tune has, takes the fine-tune's row as it is
    (``overlay``; λ does not scale it). Both are exact copies, the sign of zero included: the fine-tune's
    term reads −0.0 for those rows (+0.0 when λ < 0), so their Δ·λ is −0.0 and x + (−0.0) = x for every x.
    A token the target has no row for (one the fine-tune added; only with the fine-tune's tokenizer)
    gets a new row as ``--vocab-policy pad`` gives one: the target's and the base's rows read as zeros,
    so the row is λ·(the fine-tune's row)."""

    plus: torch.Tensor  # output row -> fine-tune row (-1: no Δ)
    minus: torch.Tensor  # output row -> base row (-1: no Δ, or zeros for a new token)
    target: torch.Tensor | None  # output row -> target row, -1: zeros or the overlay's row (None: identity)
    overlay: torch.Tensor | None  # output row -> fine-tune row copied as is (-1: not overlaid)
    matched: int
    no_base: list[tuple[str, int]]  # output tokens the target has, without a base row, by output id
    no_finetuned: list[tuple[str, int]]  # output tokens the target has, with a base row but none in the fine-tune
    rows_without_token: int  # output rows no output token maps to (padding rows): no Δ
    rows: int = 0  # output rows
    new_tokens: list[tuple[str, int]] = field(default_factory=list)  # output tokens without a target row: λ·f
    target_dropped: list[tuple[str, int]] = field(default_factory=list)  # target tokens the output's tokenizer lacks


def _row(vocab: dict[str, int], token: str, rows: int) -> int | None:
    i = vocab.get(token)
    return i if i is not None and 0 <= i < rows else None


def align_rows(ft_vocab: dict[str, int], base_vocab: dict[str, int], tgt_vocab: dict[str, int], *, ft_rows: int,
               base_rows: int, tgt_rows: int, unmatched: str = "target",
               out_vocab: dict[str, int] | None = None) -> RowAlignment:
    """Match every output row to the target's, the fine-tune's and the base's rows of the same token
    string. ``out_vocab`` is the output tokenizer's vocabulary (None: the target's); its rows are the
    target's, or more when its ids reach past them (the fine-tune's added tokens)."""
    own = out_vocab is None or out_vocab == tgt_vocab
    out_vocab = tgt_vocab if out_vocab is None else out_vocab
    rows = tgt_rows if own else max([tgt_rows] + [j + 1 for j in out_vocab.values() if j >= 0])
    plus, minus, overlay = [-1] * rows, [-1] * rows, [-1] * rows  # lists: 150K-token vocabularies
    target = [j if j < tgt_rows else -1 for j in range(rows)]
    covered = [False] * rows
    matched, no_base, no_ft, new, orphans = 0, [], [], [], []
    for token, j in sorted(out_vocab.items(), key=lambda kv: kv[1]):
        if not 0 <= j < rows:
            continue
        covered[j] = True
        k = j if own else _row(tgt_vocab, token, tgt_rows)
        ft_row, base_row = _row(ft_vocab, token, ft_rows), _row(base_vocab, token, base_rows)
        if k is None:  # new to the target: a new row, as pad gives one (target and base rows read as zeros)
            target[j] = -1
            if ft_row is None:
                orphans.append((token, j))
            else:
                plus[j] = ft_row
                new.append((token, j))
            continue
        target[j] = k
        if ft_row is not None and base_row is not None:
            plus[j], minus[j] = ft_row, base_row
            matched += 1
            continue
        (no_base if base_row is None else no_ft).append((token, j))
        if unmatched == "finetuned" and ft_row is not None:
            overlay[j] = ft_row
            target[j] = -1
    if orphans:
        shown = ", ".join(json.dumps(t, ensure_ascii=False) + f" (id {j})" for t, j in orphans[:WARNED])
        raise PlanError(f"vocab align: {len(orphans)} token(s) of the output's tokenizer have a row neither in the target "
                        f"({tgt_rows} rows) nor in the source fine-tune ({ft_rows} rows): {shown}. The fine-tune's "
                        "tokenizer does not fit its own embedding; take the tokenizer from the target (--tokenizer-from target)")
    dropped = [] if own else sorted(((t, i) for t, i in tgt_vocab.items() if t not in out_vocab and 0 <= i < tgt_rows),
                                    key=lambda kv: kv[1])
    import torch

    keep = own and all(i >= 0 for i in target) and not any(o >= 0 for o in overlay)
    return RowAlignment(torch.tensor(plus, dtype=torch.int64), torch.tensor(minus, dtype=torch.int64),
                        None if keep else torch.tensor(target, dtype=torch.int64),
                        torch.tensor(overlay, dtype=torch.int64) if any(o >= 0 for o in overlay) else None,
                        matched, no_base, no_ft, rows - sum(covered), rows, new, dropped)


def tokenizer_ids(directory: Path) -> dict[str, int] | None:
    """token string -> id of every token the tokenizer in ``directory`` can produce: its vocabulary and its
    added tokens. Read from ``tokenizer.json`` (with ``added_tokens.json`` and ``tokenizer_config.json``'s
    ``added_tokens_decoder``) without transformers; a tokenizer without ``tokenizer.json`` is loaded with
    transformers (:func:`load_vocab`). None when ``directory`` holds no tokenizer file."""
    from deltaport.assets import TOKENIZER_FILES

    d = Path(directory)
    if not any((d / f).exists() for f in TOKENIZER_FILES if f not in ("tokenizer_config.json", "special_tokens_map.json")):
        return None
    if not (d / "tokenizer.json").exists():
        return load_vocab(d)
    try:
        tok = json.loads((d / "tokenizer.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise PlanError(f"{d / 'tokenizer.json'} is not valid JSON ({exc}); fix or re-download it") from None
    model = tok.get("model") if isinstance(tok, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids: dict[str, int] = {}
    if isinstance(vocab, list):  # unigram: [[token, score], ...]
        ids = {str(t[0]): i for i, t in enumerate(vocab) if isinstance(t, list) and t}
    elif isinstance(vocab, dict):
        ids = {str(t): i for t, i in vocab.items() if isinstance(i, int)}
    elif vocab is not None or not isinstance(model, dict):
        return load_vocab(d)
    for a in tok.get("added_tokens") or []:
        if isinstance(a, dict) and isinstance(a.get("id"), int):
            ids[str(a.get("content"))] = a["id"]
    extra = []
    if (d / "added_tokens.json").exists():
        try:
            extra += [(str(t), i) for t, i in json.loads((d / "added_tokens.json").read_text()).items()]
        except (OSError, ValueError, AttributeError):
            pass
    if (d / "tokenizer_config.json").exists():
        try:
            dec = json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
            extra += [(str(v.get("content")), int(i)) for i, v in dec.items() if isinstance(v, dict)]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    for t, i in extra:
        if isinstance(i, int):
            ids.setdefault(t, i)
    return ids


def _tokens(items: list[tuple[str, int]], key: str) -> dict:
    return {"count": len(items), "first": [{"token": t, key: i} for t, i in items[:UNMATCHED_SHOWN]]}


def named_tokens(items: list[tuple[str, int]]) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in items[:WARNED]) + (", ..." if len(items) > WARNED else "")


def check_tokenizer_fits(tokenizer_dir: Path | None, rows: dict[str, int], *, finetuned_dir: Path | None = None,
                         fix: str = "") -> dict:
    """Refuse an output whose tokenizer can produce an id without a row in one of its vocabulary tensors
    (``rows``: tensor name -> output rows; the input embedding, and the output head when it is untied).
    :class:`~deltaport.errors.PlanError` names the tensor, the tokens and the way out (``fix``). Returns
    the record for provenance, with the tokens of the fine-tune's tokenizer (``finetuned_dir``) that the
    output's tokenizer lacks (``finetuned_tokens_dropped``), and ``warnings`` to show."""
    record: dict = {"tokenizer": None if tokenizer_dir is None else str(tokenizer_dir), "checked": False, "warnings": []}
    try:
        ids = tokenizer_ids(tokenizer_dir) if tokenizer_dir is not None else None
    except PlanError as exc:  # a tokenizer transformers cannot load either: say so, do not guess
        record["reason"] = f"the output's tokenizer could not be read: {exc}"
        record["warnings"].append(f"could not check that every id of the output's tokenizer has an embedding row: {exc}")
        return record
    if ids is None:
        record["reason"] = "the output has no tokenizer"
        return record
    top = max(ids.values(), default=-1)
    record.update(checked=True, tokens=len(ids), max_id=top, rows=dict(sorted(rows.items())))
    short = {name: n for name, n in sorted(rows.items()) if top >= n}
    if short:
        n = min(short.values())
        over = sorted(((t, i) for t, i in ids.items() if i >= n), key=lambda kv: kv[1])
        shown = ", ".join(json.dumps(t, ensure_ascii=False) + f" (id {i})" for t, i in over[:WARNED])
        has = " and ".join(f"{name} has {k} rows" for name, k in short.items())
        raise PlanError(f"the output's tokenizer (from {tokenizer_dir}) has {len(over)} token id(s) at or past row {n}, "
                        f"but {has}: {shown}{', ...' if len(over) > WARNED else ''}. A forward pass over those tokens "
                        f"would fail (index out of range). {fix}".rstrip())
    try:
        ft_ids = (tokenizer_ids(finetuned_dir) if finetuned_dir is not None and Path(finetuned_dir) != Path(tokenizer_dir)
                  else None)
    except PlanError:  # the fine-tune's tokenizer is not the output's: an unreadable one only means no names
        ft_ids = None
    if ft_ids is not None:
        dropped = sorted(((t, i) for t, i in ft_ids.items() if t not in ids), key=lambda kv: kv[1])
        record["finetuned_tokens_dropped"] = _tokens(dropped, "finetuned_id")
        if dropped:
            record["warnings"].append(
                f"the output's tokenizer lacks {len(dropped)} token(s) of the source fine-tune's tokenizer: the output "
                f"cannot produce them, so what the fine-tune learned for them is lost: {named_tokens(dropped)} (to keep "
                "them: --tokenizer-from source-finetuned, with --vocab-policy align or pad)")
    return record
