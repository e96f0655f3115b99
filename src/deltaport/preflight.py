"""Refusals before anything heavy is imported: what the diagnostics' inputs can be checked for from
files and headers alone, with neither torch nor transformers loaded.

``connectivity``, ``check`` and ``similarity`` load whole models (and torch, transformers and a
tokenizer) before they compute anything; a bad ``--data`` file, an unknown ``--dtype`` or device, two
models whose tensors differ in shape, or a corrupt shard used to be found only after that (seconds on
real models). The command line calls :func:`diagnostics` first, so each of these is refused within the
wall time of ``deltaport --help`` plus the headers' reading. The library functions keep their own
checks (they are also called with in-memory models and documents); the messages are the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from deltaport.errors import InputError, PlanError

_DEVICE = re.compile(r"(cpu|cuda(:\d+)?|mps|xpu(:\d+)?|meta)")


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The ``"text"`` of every line of a JSONL file (blank lines skipped). A missing file, a line that is not
    JSON or has no string ``"text"``, and a file with no document are :class:`InputError` naming the line."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"data file {path} {what}; pass a JSONL file with one {{\"text\": ...}} per line")
    docs: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{i} is not valid JSON ({exc}); each line must be {{\"text\": ...}}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputError(f"{path}:{i} has no string field \"text\"; each line must be {{\"text\": ...}}")
                docs.append(obj["text"])
    except UnicodeDecodeError as exc:
        raise InputError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a JSONL file "
                         "with one {\"text\": ...} per line") from None
    if not docs:
        raise InputError(f"data file {path} has no documents")
    return docs


def check_device(device: str) -> None:
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InputError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N")


def check_positive(value: int, flag: str, minimum: int = 1) -> None:
    if value < minimum:
        raise InputError(f"{flag} must be at least {minimum} (got {value})")


def _local_models(specs: Iterable[Any]) -> dict[str, Path]:
    """Each spec that is a local directory; a file or mistyped path is refused, a hub id passes (checked
    when loaded)."""
    from deltaport.io.checkpoint import require_dir_or_hub_id

    out = {}
    for spec in specs:
        if spec is None or not isinstance(spec, (str, Path)):
            continue
        p = Path(str(spec)).expanduser()
        if not p.is_dir():
            require_dir_or_hub_id(str(spec), p)
            continue
        out[str(spec)] = p
    return out


def full_model(label: str, d: Path) -> None:
    """Refuse a directory the diagnostics cannot load as a model: a deltaport delta or a LoRA adapter (they
    hold differences, not weights), or a config.json without ``model_type`` (transformers cannot build it)."""
    import json as _json

    if (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
        raise InputError(f"{label} is a LoRA adapter, not a model; the diagnostics compare full models (merge it "
                         "first, e.g. with `deltaport transfer`)")
    prov = d / "deltaport.json"
    if prov.is_file():
        try:
            kind = _json.loads(prov.read_text()).get("kind")
        except (ValueError, AttributeError, OSError):
            kind = None
        if kind == "delta":
            raise InputError(f"{label} is a deltaport delta (Δ = finetuned − base), not a model; pass full models "
                             f"(`deltaport apply {label} --to BASE -o MODEL` makes one)")
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            model_type = _json.loads(cfg.read_text()).get("model_type")
        except (ValueError, AttributeError, OSError):
            return  # an unreadable config is the model check's to word
        if not model_type:
            raise InputError(f"{cfg} has no \"model_type\"; transformers cannot build this model. Add it (e.g. "
                             "\"llama\") or pass a Hugging Face model directory")


def _shapes(d: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a safetensors model directory's headers; None when it has none (pickles)."""
    from deltaport.io.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint(d)
    except InputError:
        return None
    return {n: tuple(s.shape) for n, s in ck.tensors.items()}


def same_shapes(models: dict[str, Path]) -> None:
    """Refuse models whose common tensors differ in shape (another architecture or vocabulary size), from
    the headers; the same message as the check on loaded models. Tensor names present in only some of
    them (a tied ``lm_head``) are left to that check."""
    shapes = {label: s for label, d in models.items() if (s := _shapes(d)) is not None}
    labels = list(shapes)
    for other in labels[1:]:
        a, b = shapes[labels[0]], shapes[other]
        for n in sorted(set(a) & set(b)):
            if a[n] != b[n]:
                raise PlanError(f"parameter {n!r} has shape {a[n]} in {labels[0]} but {b[n]} in {other}; the models "
                                "must have identical shapes (same architecture and vocabulary size)")


def diagnostics(models: Iterable[Any], data: str | Path | None, *, allow_pickle: bool = False, device: str | None = None,
                dtype: str | None = None, points: int | None = None, max_tokens: int | None = None) -> None:
    """Every refusal ``connectivity``/``check``/``similarity`` can make before loading a model, cheapest first:
    options, the data file (parsed in full), the models' shapes against each other (headers: a corrupt
    header is refused here too), then each local model against its config.json."""
    from deltaport.io.tensors import parse_dtype_name

    if points is not None:
        check_positive(points, "--points", 2)
    if max_tokens is not None:
        check_positive(max_tokens, "--max-tokens", 2)
    if device is not None:
        check_device(device)
    if dtype is not None:
        parse_dtype_name(dtype)
    if data is not None:
        read_jsonl_texts(data)
    local = _local_models(models)
    for label, d in local.items():
        full_model(label, d)
    same_shapes(local)  # headers only
    from deltaport.io.model_check import check_weights

    for d in local.values():  # against config.json (imports transformers: ~2 s, still before any weight is read)
        check_weights(d, allow_pickle=allow_pickle, pickle_option=True)


def compress_options(method: str, rank, density, seed, shard_size) -> tuple[int | None, float | None]:
    """``compress``'s options checked (the method's parameters, the seed, the shard size); returns the rank and
    density as the method uses them. Raises :class:`InputError` naming the flag."""
    from deltaport.io.compressed_format import METHODS
    from deltaport.io.writer import parse_size

    parse_size(shard_size)
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "lowrank":
        if rank is None:
            raise InputError("--method lowrank needs --rank R (a positive integer)")
        if density is not None:
            raise InputError("--density applies to --method sparse, not lowrank")
        if int(rank) != rank or rank <= 0:
            raise InputError(f"--rank must be a positive integer, not {rank}")
        rank = int(rank)
    elif method == "sparse":
        if density is None:
            raise InputError("--method sparse needs --density p, the fraction of entries kept, in (0, 1]")
        if rank is not None:
            raise InputError("--rank applies to --method lowrank, not sparse")
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise InputError(f"--density must be in (0, 1] (the fraction of entries kept), not {density}")
        density = float(density)
    elif rank is not None or density is not None:
        raise InputError("--method sign takes neither --rank nor --density")
    if int(seed) != seed or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, not {seed}")
    return rank, density
