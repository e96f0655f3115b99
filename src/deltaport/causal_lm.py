"""Causal language models in memory, as the diagnostics (connectivity, similarity, check) measure them:
loading a model (checked first by the core's header reader) and its tokenizer, its parameters, text
turned into a fixed token sample, the mean next-token loss on that sample, and the progress bar of
these measurements. Reports and plots are written by :func:`deltaport.io.atomic.write_json` and
:func:`deltaport.figures.save_figure`.

Nothing here prints; errors are :mod:`deltaport.errors` classes that name the input and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle  # noqa: S403 - only for its exception class; nothing is unpickled here
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from deltaport.errors import CheckpointError, InputError
from deltaport.io.checkpoint import open_checkpoint, pickle_only, require_dir_or_hub_id

LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Any]:
    """A rich progress bar (to stderr) when ``enabled``; otherwise a no-op with the same ``advance``."""

    class _Null:
        def advance(self, n: int = 1) -> None:
            pass

    if not enabled:
        yield _Null()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)

    class _Bar:
        def __init__(self) -> None:
            self.task = prog.add_task(description, total=total)

        def advance(self, n: int = 1) -> None:
            prog.advance(self.task, n)

    with prog:
        yield _Bar()


# ----------------------------------------------------------------------------------------------- models


def model_label(spec: Any) -> str:
    if isinstance(spec, torch.nn.Module):
        return getattr(getattr(spec, "config", None), "_name_or_path", "") or f"<in-memory {type(spec).__name__}>"
    return str(spec)


def _local_dir(spec: Any) -> Path | None:
    """The local model directory ``spec`` names; None for a hub id. Raises for a file or a missing path."""
    src = str(spec)
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    require_dir_or_hub_id(src, p)  # a file or a mistyped local path is named as such; a hub id passes
    return None


def preflight(spec: Any, *, allow_pickle: bool = False) -> Path | None:
    """Cheap checks before any model is loaded: the path exists and is a directory, and the checks every
    command makes on a local model directory (:func:`deltaport.io.model_check.check_weights`, headers
    only): its safetensors are complete and valid (a truncated or corrupt shard is named, with the fix),
    every parameter config.json implies is there in its shape, and a directory that holds only pickled
    weights is refused unless ``allow_pickle``. Pickled files beside safetensors are ignored, as
    everywhere. Returns the local directory (None for a hub id or a module: a hub id is checked after
    loading, by what transformers reports missing)."""
    if isinstance(spec, torch.nn.Module):
        return None
    from deltaport.io.model_check import check_weights

    d = _local_dir(spec)
    if d is not None:
        check_weights(d, allow_pickle=allow_pickle, pickle_option=True)
    return d


def load_causal_lm(spec: Any, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   allow_pickle: bool = False) -> torch.nn.Module:
    """``spec`` (a local HF directory or hub id) loaded with ``AutoModelForCausalLM`` in eval mode.

    Safetensors only, unless ``allow_pickle``: a directory with only pickled weights
    (``pytorch_model*.bin``, ``*.pt``) is then read with ``torch.load(weights_only=True)`` (through
    :func:`deltaport.io.checkpoint.open_checkpoint`); a directory with both is read as safetensors.
    Custom modeling code (``auto_map``) is never run. An ``nn.Module`` is returned as is (never
    modified, moved or cast).
    """
    if isinstance(spec, torch.nn.Module):
        return spec
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    src = str(spec)
    d = preflight(spec, allow_pickle=allow_pickle)
    if d is not None and pickle_only(d):
        model = _load_pickled(d, dtype)
        return model.to(device).eval()
    # safetensors only (a hub repo with only .bin fails here) unless pickles are allowed; never custom code
    kwargs: dict[str, Any] = {"use_safetensors": True} if (d is not None or not allow_pickle) else {}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(d) if d is not None else src, dtype=dtype,
                                                           weights_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: download it first or pass a local directory)" if offline else ""
        if d is None and not allow_pickle and "safetensors" in str(exc):
            hint += "; a model with only pickled .bin weights is loaded only with --allow-pickle"
        raise CheckpointError(f"cannot load {src} as a causal LM with transformers: {exc}{hint}") from None
    if d is None:  # a local directory was checked from its headers by preflight
        _refuse_incomplete(src, info)
    return model.to(device).eval()


def _refuse_incomplete(src: str, info: dict) -> None:
    """transformers fills parameters the checkpoint lacks (or has in another shape) with random values
    and only warns; a loss measured on such a model means nothing, so it is an input error here. For
    what :func:`preflight` cannot check from headers: a hub id, and pickled weights (read once, here)."""
    missing = list(info.get("missing_keys") or [])
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        names = missing + mismatched
        raise CheckpointError(
            f"{src}: {len(missing)} parameter(s) missing from the checkpoint and {len(mismatched)} with another shape "
            f"than config.json says ({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''}); "
            "transformers would initialise them at random. Check that the weights are complete and match config.json.")


def _load_pickled(d: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM from a directory of pickled weights: the tensors come from ``open_checkpoint``
    (``torch.load(weights_only=True)``, which refuses anything but tensors), the class from config.json."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    ck = open_checkpoint(d, allow_pickle=True)
    state = {n: ck.tensor(n) for n in ck.names}
    try:
        config = AutoConfig.from_pretrained(str(d))
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {d} (pickled weights) as a causal LM with transformers: "
                              f"{type(exc).__name__}: {exc}") from None
    _refuse_incomplete(str(d), info)
    return model


def load_tokenizer(spec: Any) -> Any:
    """The tokenizer saved with ``spec`` (a directory/hub id, or a module whose config names one)."""
    from transformers import AutoTokenizer

    src = model_label(spec) if isinstance(spec, torch.nn.Module) else str(spec)
    if not src or src.startswith("<in-memory"):
        raise InputError("the model was passed in memory and has no path to load its tokenizer from; "
                         "pass tokenizer=... (a tokenizer or a directory) or pre-tokenized data (lists of ids)")
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {src}: {exc}; pass tokenizer=... or "
                              "pre-tokenized data") from None


def named_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, tied parameters once (``named_parameters`` de-duplicates shared storage)."""
    return dict(model.named_parameters())


def check_same_architecture(params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor], label_a: str,
                            label_b: str) -> None:
    from deltaport.errors import PlanError

    missing = sorted(set(params_a) - set(params_b))
    extra = sorted(set(params_b) - set(params_a))
    if missing or extra:
        raise PlanError(
            f"{label_a} and {label_b} do not have the same parameters: only in the first: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; only in the second: {extra[:5]}{' ...' if len(extra) > 5 else ''}. "
            "Interpolation needs two models of the same architecture.")
    for n, t in params_a.items():
        if t.shape != params_b[n].shape:
            raise PlanError(f"parameter {n!r} has shape {tuple(t.shape)} in {label_a} but {tuple(params_b[n].shape)} "
                            f"in {label_b}; interpolation needs identical shapes (same architecture and vocabulary size)")


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in named_params(model).values())


# ----------------------------------------------------------------------------------------------- text


def load_texts(data: str | Path | Sequence[Any]) -> list[Any]:
    """Documents from a JSONL file (``{"text": ...}`` per line) or a list of strings / lists of token ids."""
    if isinstance(data, (str, Path)):
        from deltaport.preflight import read_jsonl_texts

        return read_jsonl_texts(data)
    docs = list(data)
    if not docs:
        raise InputError("no documents given (empty data list)")
    for i, d in enumerate(docs):
        if not isinstance(d, str) and not (isinstance(d, (list, tuple)) and all(isinstance(x, int) for x in d)):
            raise InputError(f"data item {i} is {type(d).__name__}; expected a string or a list of token ids")
    return docs


def token_sample(docs: Sequence[Any], tokenizer: Any, *, max_tokens: int, seed: int, block_len: int) -> list[torch.Tensor]:
    """A deterministic sample of ``max_tokens`` tokens cut into blocks of ``block_len`` (last one shorter).

    Documents are shuffled with ``random.Random(seed)``, tokenised without special tokens, joined with
    the tokenizer's eos id (if any) and concatenated until ``max_tokens`` tokens are collected.
    Returns a list of 1-D LongTensors.
    """
    if max_tokens < 2:
        raise InputError(f"max_tokens must be at least 2 (got {max_tokens})")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    ids: list[int] = []
    for i in order:
        d = docs[i]
        if isinstance(d, str):
            if tokenizer is None:
                raise InputError("text data needs a tokenizer; pass tokenizer=... or lists of token ids")
            toks = tokenizer(d, add_special_tokens=False)["input_ids"]
        else:
            toks = list(d)
        ids.extend(toks)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InputError("the data gives fewer than 2 tokens; pass more text")
    t = torch.tensor(ids, dtype=torch.long)
    blocks = list(t.split(block_len))
    if len(blocks) > 1 and blocks[-1].numel() < 2:  # a 1-token tail predicts nothing
        blocks = blocks[:-1]
    return blocks


#: logits elements per forward pass (tokens × vocabulary): ~512 MB of float32 logits at most
LOGITS_BUDGET = 1 << 27


def batch_tokens_for(vocab: int) -> int:
    """Tokens per forward pass: 8192, fewer for large vocabularies so the logits stay within
    :data:`LOGITS_BUDGET` (the layer-by-layer path forms the same batches and cuts the logits finer)."""
    return max(1, min(8192, LOGITS_BUDGET // vocab))


@torch.no_grad()
def mean_nll(model: torch.nn.Module, blocks: list[torch.Tensor], *, batch_tokens: int | None = None) -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``model`` over ``blocks``.

    Blocks of equal length are batched up to ``batch_tokens`` tokens (default: 8192, fewer for large
    vocabularies so the logits stay within :data:`LOGITS_BUDGET`). Deterministic for a given model,
    sample and batching; the model's training flag is restored.
    """
    device = next(model.parameters()).device
    if batch_tokens is None:
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 32000
        batch_tokens = batch_tokens_for(vocab)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        i = 0
        while i < len(blocks):
            n = blocks[i].numel()
            j = i
            while j < len(blocks) and blocks[j].numel() == n and (j - i + 1) * n <= max(batch_tokens, n):
                j += 1
            batch = torch.stack(blocks[i:j]).to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
            total += nll_sum.double().cpu()
            count += batch[:, 1:].numel()
            i = j
    finally:
        model.train(was_training)
    loss = float(total / count)
    if loss != loss or loss in (float("inf"), float("-inf")):
        from deltaport.errors import NumericalError

        raise NumericalError("the loss is NaN/Inf on the text sample: the model's logits are not finite")
    return loss
