"""Evaluate models with lm-evaluation-harness, the paper's protocol, with a result cache.

::

    from deltaport.evaluate import evaluate, comparison_table
    res = evaluate(["base/", "base+delta/"], ["arc_easy"], limit=100)          # paths or hub ids
    res = evaluate({"M1+Δ": (model, tok)}, ["tests/data/tiny_qa.yaml"])          # in-memory models
    print(comparison_table(res, baseline="base/"))

Tasks are lm-eval task/group names or paths to local task YAML files. A local YAML's relative
``dataset_kwargs.data_files`` are resolved against the YAML's own folder, so a task works from any
working directory. Results are cached (when ``cache_dir`` is given) under a key made of the model's
weight content hash, its tokenizer/config, the task (for local tasks: the YAML and its data files'
bytes) and every setting that changes a score, so re-running a comparison evaluates only what changed.

Protocols (``protocol=``): ``base`` scores the raw prompt (pretraining style); ``chat`` applies the
model's chat template (``apply_chat_template=True``, few-shot examples as multi-turn); ``both`` runs
both and reports rows ``NAME [base]`` and ``NAME [chat]``; ``auto`` picks ``chat`` when the tokenizer
has a chat template and ``base`` otherwise. The paper scored base models pretraining-style and
instruct/transferred models with the chat template; ``both`` makes the comparison explicit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import CheckpointError, InputError, RuntimeFailure

LOG = logging.getLogger(__name__)

PROTOCOLS = ("base", "chat", "both", "auto")
BACKENDS = ("hf", "vllm")
CACHE_VERSION = 1
_NON_METRIC_KEYS = {"alias", "name", "sample_len", "samples", " "}


# --------------------------------------------------------------------------------------------------
# tasks


@dataclass
class TaskSpec:
    """A task as deltaport runs it: what goes to lm-eval, its shots, its table column."""

    name: str  # key in the results (the lm-eval task or group name)
    spec: str | dict  # what simple_evaluate receives
    num_fewshot: int | None = None
    metric: str | None = None  # the metric the comparison table shows (None: the first one)
    label: str | None = None  # column title
    derived: dict[str, list[str]] = field(default_factory=dict)
    fingerprint: str = ""  # content identity for the cache
    include_path: str | None = None  # folder lm-eval must index (group YAMLs)
    source: str | None = None  # the YAML path for local tasks


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_data_files(value: Any, base: Path, yaml_path: Path) -> Any:
    """Make data_files (str | list | dict of those) absolute against the YAML's folder; check they exist."""
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base, yaml_path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve_data_files(v, base, yaml_path) for v in value]
    if isinstance(value, str):
        if "://" in value:
            return value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (base / p)
        if not any(ch in value for ch in "*?[") and not p.exists():
            raise InputError(f"task {yaml_path}: data file {value!r} not found (looked for {p}); paths in "
                             "dataset_kwargs.data_files are relative to the YAML file's folder")
        return str(p)
    return value


def _local_task(path: Path) -> TaskSpec:
    from lm_eval.tasks._yaml_loader import load_yaml

    path = path.expanduser().resolve()
    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as exc:  # noqa: BLE001 - yaml/import errors of many kinds
        raise InputError(f"cannot read task YAML {path}: {type(exc).__name__}: {exc}") from None
    base = path.parent
    h = hashlib.sha256()
    h.update(path.read_bytes())
    for py in sorted(base.glob("*.py")):  # !function helpers live next to the YAML
        h.update(py.name.encode() + b"\0" + py.read_bytes())
    if "group" in cfg and isinstance(cfg.get("task"), list):
        for y in sorted(base.rglob("*.yaml")):
            h.update(str(y.relative_to(base)).encode() + b"\0" + y.read_bytes())
        return TaskSpec(name=cfg["group"], spec=cfg["group"], fingerprint=h.hexdigest(),
                        include_path=str(base), source=str(path))
    if not isinstance(cfg.get("task"), str):
        raise InputError(f"task YAML {path} defines neither a task (`task: NAME`) nor a group "
                         "(`group: NAME` with a `task:` list)")
    dk = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in dk:
        dk["data_files"] = _resolve_data_files(dk["data_files"], base, path)
        cfg["dataset_kwargs"] = dk
        files = dk["data_files"]
        flat = (list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files])
        for f in flat:
            for g in (f if isinstance(f, list) else [f]):
                if Path(g).is_file():
                    h.update(_file_sha(Path(g)).encode())
    dp = cfg.get("dataset_path")
    if isinstance(dp, str) and not Path(dp).is_absolute() and (base / dp).exists():
        cfg["dataset_path"] = str(base / dp)
        h.update(_sha(str(base / dp)).encode())
    return TaskSpec(name=cfg["task"], spec=cfg, num_fewshot=None, fingerprint=h.hexdigest(), source=str(path))


def _is_yaml_path(t: str) -> bool:
    return t.endswith((".yaml", ".yml")) or os.sep in t or Path(t).is_file()


def resolve_tasks(tasks: str | list[str] | None, *, preset: str | None = None, num_fewshot: int | None = None,
                  languages: list[str] | None = None, task_manager=None) -> list[TaskSpec]:
    """Turn task names / YAML paths / a preset into :class:`TaskSpec` s (validated, no model needed)."""
    from deltaport.eval_presets import get_preset

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or [])
    out: list[TaskSpec] = []
    if preset:
        p = get_preset(preset, languages=languages)
        for pt in p.tasks:
            out.append(TaskSpec(name=pt.task, spec=pt.task, num_fewshot=pt.num_fewshot, metric=pt.metric,
                                label=pt.label, derived=dict(pt.derived), fingerprint=f"lm_eval:{pt.task}"))
    for t in tasks:
        if _is_yaml_path(t):
            p = Path(t)
            if not p.is_file():
                raise InputError(f"task file {t} not found; pass an lm-eval task name or a path to a task YAML")
            out.append(_local_task(p))
        else:
            out.append(TaskSpec(name=t, spec=t, fingerprint=f"lm_eval:{t}"))
    if not out:
        raise InputError("no tasks given; pass --tasks NAME[,NAME...] (lm-eval names or task YAML paths) "
                         "or --preset NAME")
    seen: set[str] = set()
    for ts in out:
        if ts.name in seen:
            raise InputError(f"task {ts.name!r} is listed twice (check --tasks and --preset)")
        seen.add(ts.name)
        if num_fewshot is not None:
            ts.num_fewshot = num_fewshot
    if task_manager is not None:
        _check_known(out, task_manager)
    return out


def _check_known(specs: list[TaskSpec], task_manager) -> None:
    """Raise InputError naming close matches for task names lm-eval does not know."""
    known = set(task_manager.all_tasks)
    for ts in specs:
        if isinstance(ts.spec, str) and ts.spec not in known:
            import difflib

            close = difflib.get_close_matches(ts.spec, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"unknown lm-eval task {ts.spec!r}{hint} (a local task must be a path to its "
                             "YAML file)")


def _task_manager(specs: list[TaskSpec]):
    """A TaskManager; lm-eval's own ~10k task YAMLs are indexed (~7 s) only when a named task needs them."""
    from lm_eval.tasks import TaskManager

    include = sorted({s.include_path for s in specs if s.include_path})
    needs_defaults = any(isinstance(s.spec, str) and s.include_path is None for s in specs)
    return TaskManager(include_path=include or None, include_defaults=needs_defaults)


# --------------------------------------------------------------------------------------------------
# fingerprints and cache


_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "generation_config.json")


def _path_fingerprint(d: Path, cache_dir: Path | None) -> str:
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
    for name in _TOKENIZER_FILES:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    fp = h.hexdigest()
    if memo is not None:
        _atomic_write(memo, fp)
    return fp


def _object_fingerprint(model, tok) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(_tokenizer_fingerprint(tok).encode())
    return h.hexdigest()


def _tokenizer_fingerprint(tok) -> str:
    return _sha(json.dumps({
        "class": type(tok).__name__,
        "vocab": sorted(tok.get_vocab().items()),
        "chat_template": getattr(tok, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "add_bos": getattr(tok, "add_bos_token", None),
    }, default=str))


def _atomic_write(path: Path, text: str) -> None:
    """Cache and run-folder files: temporary sibling + rename; the temporary file is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary sibling + rename (never half-written);
    without ``overwrite`` an existing file is refused (:func:`deltaport.io.atomic.atomic_write_file`)."""
    from deltaport.io.atomic import atomic_write_file

    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write_file(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


# --------------------------------------------------------------------------------------------------
# models


@dataclass
class _Model:
    name: str
    source: Any  # path string, or (model, tokenizer)
    local_dir: Path | None = None
    fingerprint: str | None = None
    has_chat_template: bool = False
    lm: Any = None


def _normalise_models(models) -> list[_Model]:
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
        out.append(_Model(name=name, source=src))
    if not out:
        raise InputError("no models given")
    return out


def _prepare_model(m: _Model, cache_dir: Path | None, need_fp: bool) -> None:
    if isinstance(m.source, tuple):
        model, tok = m.source
        if tok is None:
            raise InputError(f"model {m.name!r}: an in-memory model needs its tokenizer: pass (model, tokenizer)")
        m.has_chat_template = bool(getattr(tok, "chat_template", None))
        if need_fp:
            m.fingerprint = _object_fingerprint(model, tok)
        return
    from deltaport.io.checkpoint import resolve_dir

    d, _rev = resolve_dir(m.source)
    _refuse_delta_dir(d, m.source)
    if not (d / "config.json").is_file():
        raise InputError(f"model {m.source}: no config.json in {d}; pass a Hugging Face model directory")
    check_weights(d)
    m.local_dir = d
    m.has_chat_template = _dir_has_chat_template(d)
    if need_fp:
        m.fingerprint = _path_fingerprint(d, cache_dir)


def check_weights(d: Path) -> None:
    """Before transformers is asked to load anything: safetensors weights present and readable (headers
    only; a directory of pickled ``.bin`` files only is refused, ``.bin`` files beside safetensors are
    ignored, never unpickled), and every parameter config.json implies present in its shape (the model
    built on the meta device)."""
    from deltaport.assets import missing_parameters
    from deltaport.io.checkpoint import open_checkpoint, refuse_pickle

    try:
        ck = open_checkpoint(d)
    except CheckpointError as exc:
        if not hasattr(exc, "pickle_only"):
            raise
        # these commands have no --allow-pickle: say how to convert instead
        raise refuse_pickle(*exc.pickle_only, fix=(
            "The eval, finetune and evolve commands read safetensors only. Convert once, e.g. `python -c \"from transformers "
            f"import AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('{d}-safetensors')\"` "
            "(transformers loads .bin with torch.load(weights_only=True)), and pass the converted directory.")) from None
    missing = missing_parameters(d, ck.tensors)
    if missing:
        raise CheckpointError(
            f"{d}: {len(missing)} parameter(s) that config.json implies are missing from the checkpoint or have "
            f"another shape ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); transformers would "
            "initialise them at random. Check that the weights are complete and match config.json.")


def _refuse_delta_dir(d: Path, source) -> None:
    """A `deltaport diff` output holds Δ, not a model: say so instead of letting transformers fail."""
    prov = d / "deltaport.json"
    if prov.is_file():
        try:
            kind = json.loads(prov.read_text()).get("kind")
        except ValueError:
            return
        if kind == "delta":
            raise InputError(f"{source} is a delta directory (deltaport diff output), not a model; apply it first: "
                             f"deltaport apply {source} --to BASE -o MODEL")


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


def _resolve_device(device: str | None) -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                         "use --device cpu (or auto)")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def _build_lm(m: _Model, *, backend: str, device: str, batch_size, seed: int, model_args: dict):
    if backend == "vllm":
        import importlib.util

        if isinstance(m.source, tuple):
            raise InputError(f"model {m.name!r}: the vllm backend loads models from disk; save the model "
                             "first or use backend='hf' for in-memory models")
        if importlib.util.find_spec("vllm") is None:
            raise InputError("backend 'vllm' needs the vllm package (pip install vllm, on a CUDA machine); "
                             "use --backend hf otherwise")
        from lm_eval.models.vllm_causallms import VLLM

        args = {"pretrained": str(m.local_dir), "dtype": "auto", "seed": seed, "gpu_memory_utilization": 0.9,
                "batch_size": batch_size, **model_args}
        return VLLM(**args)
    from lm_eval.models.huggingface import HFLM

    if isinstance(m.source, tuple):
        model, tok = m.source
        if tok.pad_token is None:
            raise InputError(f"model {m.name!r}: the tokenizer has no pad token; set tok.pad_token "
                             "(e.g. to the eos token) before evaluating")
        return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **model_args)
    args = {"dtype": "auto", **model_args}
    return HFLM(pretrained=str(m.local_dir), device=device, batch_size=batch_size, **args)


# --------------------------------------------------------------------------------------------------
# result parsing


def _metric_name(key: str) -> tuple[str, bool] | None:
    """'acc,none' -> ('acc', False); 'acc_stderr,none' -> ('acc', True); 'exact_match,strict-match' ->
    ('exact_match,strict-match', False)."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    stderr = metric.endswith("_stderr")
    if stderr:
        metric = metric[: -len("_stderr")]
    name = metric if filt == "none" else f"{metric},{filt}"
    return name, stderr


def _parse_metrics(entry: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        if key in _NON_METRIC_KEYS:
            continue
        parsed = _metric_name(key)
        if parsed is None:
            continue
        name, is_err = parsed
        try:
            value = None if isinstance(value, (bool, str)) or value is None else float(value)
        except (TypeError, ValueError):
            value = None
        if value is not None and math.isnan(value):
            value = None
        out[name + "_stderr" if is_err else name] = value
    for name in [k for k in out if not k.endswith("_stderr")]:
        out.setdefault(name + "_stderr", None)
    return out


def _add_derived(metrics: dict, derived: dict[str, list[str]]) -> None:
    for new, parts in derived.items():
        vals = [metrics.get(p) for p in parts]
        if all(isinstance(v, (int, float)) for v in vals):
            metrics[new] = sum(vals) / len(vals)
            metrics[new + "_stderr"] = None


# --------------------------------------------------------------------------------------------------
# the API


def evaluate(models, tasks, *, limit=None, device="cpu", backend="hf", batch_size=8, protocol="base",
             num_fewshot=None, preset=None, cache_dir=None, seed=0, progress=False,
             model_args: dict | None = None, languages: list[str] | None = None, status: bool = False) -> dict:
    """Run lm-eval on every model and task; return per-task metrics with standard errors.

    Args:
        models: paths / hub ids (list), or ``{name: path or (model, tokenizer)}``; in-memory models are
            evaluated through ``HFLM(pretrained=model, tokenizer=tok)`` where they are (no copy, no move).
        tasks: lm-eval task/group names or paths to local task YAML files (comma-separated string or list).
        limit: evaluate only the first N documents per task (a float < 1: that fraction).
        device: ``cpu``, ``cuda[:N]`` or ``auto`` (cuda when available). Passed to lm-eval explicitly,
            so a CPU-only torch works.
        backend: ``hf`` (transformers) or ``vllm`` (needs vllm and a GPU; models from disk only).
        batch_size: an int or ``"auto"``.
        protocol: ``base``, ``chat``, ``both`` or ``auto`` (see the module docstring).
        num_fewshot: override every task's few-shot count.
        preset: ``llama3-instruct``, ``olmo2-tulu3`` or ``global-mmlu`` (see :mod:`deltaport.eval_presets`);
            its tasks come before ``tasks``.
        cache_dir: folder for cached results (None: no cache).
        seed: every lm-eval seed (python, numpy, torch, few-shot sampling).
        model_args: extra keyword arguments for the lm-eval model (HFLM / VLLM), e.g. ``max_length``,
            ``tensor_parallel_size``.
        languages: Global MMLU languages for ``preset="global-mmlu"``.
        progress: let lm-eval draw its progress bars (off: the caller disables tqdm, e.g. in a redirected log).
        status: print a line on stderr when each model/task group starts and ends (what ``deltaport eval``
            shows while it works, bars or not).

    Returns:
        ``{"results": {row: {task: {metric: value, metric + "_stderr": value}}}, "details": {row: {task:
        {...}}}, "columns": {task: {"metric", "label"}}, "settings": {...}}``. A row is the model's name
        (``NAME [base]`` / ``NAME [chat]`` with ``protocol="both"``).
    """
    t_start = time.time()
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if limit is not None and (limit <= 0):
        raise InputError(f"limit must be positive, got {limit}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size > 0)):
        raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    device = _resolve_device(device)
    if backend == "vllm" and not device.startswith("cuda"):
        raise InputError("backend 'vllm' runs on CUDA GPUs only; use --backend hf on this machine")
    model_args = dict(model_args or {})
    entries = _normalise_models(models)
    specs = resolve_tasks(tasks, preset=preset, num_fewshot=num_fewshot, languages=languages)

    import lm_eval

    _tm: list = []

    def task_manager():  # built on first need: everything cached -> no indexing at all
        if not _tm:
            _tm.append(_task_manager(specs))
            _check_known(specs, _tm[0])
        return _tm[0]

    cache = Path(cache_dir).expanduser() if cache_dir else None
    settings = {
        "limit": limit, "device": device, "backend": backend, "batch_size": batch_size, "protocol": protocol,
        "num_fewshot": num_fewshot, "preset": preset, "seed": seed, "model_args": model_args,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"), "cache_dir": str(cache) if cache else None,
    }
    results: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for m in entries:
        _prepare_model(m, cache, need_fp=cache is not None)
        protos = _protocols_for(m, protocol)
        for proto in protos:
            shown = "chat" if proto == "skip-chat" else proto
            row = m.name if len(protos) == 1 and protocol != "both" else f"{m.name} [{shown}]"
            results[row], details[row] = {}, {}
            if proto == "skip-chat":
                continue
            recs: dict[str, dict] = {}
            cached_names: set[str] = set()
            missing: list[TaskSpec] = []
            for ts in specs:
                rec = _cache_get(cache, _cache_key(m, ts, proto, settings)) if cache else None
                if rec is None:
                    missing.append(ts)
                else:
                    recs[ts.name] = rec
                    cached_names.add(ts.name)
            # one simple_evaluate call per few-shot count (lm-eval takes one num_fewshot per call)
            for group in _by_fewshot(missing):
                task_manager()  # validates task names before a model is loaded
                if m.lm is None:
                    m.lm = _build_lm(m, backend=backend, device=device, batch_size=batch_size, seed=seed,
                                     model_args=model_args)
                names = ", ".join(ts.name for ts in group)
                if status:
                    _status(f"eval: {m.name} ({proto} protocol): running {names}")
                t_group = time.time()
                done = _run_group(lm_eval, m, group, proto, task_manager(), limit=limit, device=device, seed=seed,
                                  batch_size=batch_size)
                if status:
                    _status(f"eval: {m.name} ({proto} protocol): {names} done in {time.time() - t_group:.1f} s")
                for ts in group:
                    recs[ts.name] = done[ts.name]
                    if cache:
                        _cache_put(cache, _cache_key(m, ts, proto, settings), done[ts.name], m, ts, proto)
            if status and cached_names:
                _status(f"eval: {m.name} ({proto} protocol): {len(cached_names)} of {len(specs)} task(s) from the cache")
            for ts in specs:
                rec = recs[ts.name]
                cached = ts.name in cached_names
                metrics = dict(rec["metrics"])
                _add_derived(metrics, ts.derived)
                results[row][ts.name] = metrics
                details[row][ts.name] = {k: v for k, v in rec.items() if k != "metrics"} | {"cached": cached}
            LOG.info("evaluated %s (%s) on %d task(s)", m.name, proto, len(specs))
        m.lm = None  # free the model before loading the next one
    columns = {ts.name: {"metric": ts.metric, "label": ts.label or ts.name, "source": ts.source} for ts in specs}
    settings["time_s"] = round(time.time() - t_start, 3)
    return {"results": results, "details": details, "columns": columns, "settings": settings}


def _status(line: str) -> None:
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _protocols_for(m: _Model, protocol: str) -> list[str]:
    if protocol == "base":
        return ["base"]
    if protocol == "chat":
        if not m.has_chat_template:
            raise InputError(f"model {m.name!r} has no chat template, so the chat protocol cannot be applied; "
                             "use protocol base (or both/auto, which skip chat for such models)")
        return ["chat"]
    if protocol == "auto":
        return ["chat" if m.has_chat_template else "base"]
    if not m.has_chat_template:  # both
        LOG.warning("model %s has no chat template: scored under the base protocol only", m.name)
        return ["base", "skip-chat"]
    return ["base", "chat"]


def _cache_key(m: _Model, ts: TaskSpec, proto: str, settings: dict) -> str:
    relevant = {k: settings[k] for k in ("limit", "device", "backend", "batch_size", "seed", "model_args",
                                          "lm_eval_version")}
    relevant["device"] = relevant["device"].split(":")[0]
    return _sha(json.dumps({"v": CACHE_VERSION, "model": m.fingerprint, "task": ts.fingerprint,
                            "task_name": ts.name, "num_fewshot": ts.num_fewshot, "protocol": proto,
                            "settings": relevant}, sort_keys=True, default=str))


def _cache_get(cache: Path | None, key: str | None) -> dict | None:
    if cache is None or key is None:
        return None
    p = cache / "results" / key[:2] / f"{key}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["record"]
    except (ValueError, KeyError, OSError):
        LOG.warning("ignoring unreadable cache entry %s", p)
        return None


def _cache_put(cache: Path, key: str, rec: dict, m: _Model, ts: TaskSpec, proto: str) -> None:
    p = cache / "results" / key[:2] / f"{key}.json"
    _atomic_write(p, json.dumps({"model": m.name, "model_fingerprint": m.fingerprint, "task": ts.name,
                                 "protocol": proto, "record": rec}, default=_json_default))


def _by_fewshot(specs: list[TaskSpec]) -> list[list[TaskSpec]]:
    groups: dict[int | None, list[TaskSpec]] = {}
    for ts in specs:
        groups.setdefault(ts.num_fewshot, []).append(ts)
    return list(groups.values())


@contextlib.contextmanager
def _cheap_env_info(lm_eval):
    """lm-eval records ``torch.utils.collect_env`` output in every result (~0.8 s: it spawns pip and
    friends) and the git hash of the working directory; deltaport keeps neither, so for our calls they
    are replaced by versions only and no hash."""
    ev = getattr(lm_eval, "evaluator", None)
    real = getattr(ev, "add_env_info", None)
    if real is None:  # a future lm-eval without it: nothing to do
        yield
        return

    def cheap(storage: dict) -> None:
        import transformers

        storage.update({"pretty_env_info": "not collected (deltaport)", "transformers_version":
                        transformers.__version__, "lm_eval_version": getattr(lm_eval, "__version__", "?"),
                        "upper_git_hash": None})

    real_git = getattr(ev, "get_git_commit_hash", None)
    ev.add_env_info = cheap
    if real_git is not None:
        # it runs `git describe` in the working directory, which prints "fatal: not a git repository"
        # to the terminal outside a checkout; the hash is of the cwd, not of anything evaluated
        ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.add_env_info = real
        if real_git is not None:
            ev.get_git_commit_hash = real_git


def _subtasks(group_subtasks: dict, name: str) -> list[str]:
    out, todo = [], list(group_subtasks.get(name, []))
    while todo:
        t = todo.pop(0)
        out.append(t)
        todo.extend(group_subtasks.get(t, []))
    return out


def _run_group(lm_eval, m: _Model, group: list[TaskSpec], proto: str, tm, *, limit, device, seed,
               batch_size) -> dict[str, dict]:
    """One simple_evaluate call for tasks sharing a few-shot count; a record per task."""
    import lm_eval.evaluator  # noqa: F401 - make sure the submodule is loaded for _cheap_env_info

    chat = proto == "chat"
    names = ", ".join(ts.name for ts in group)
    t0 = time.time()
    try:
        with _cheap_env_info(lm_eval):
            out = lm_eval.simple_evaluate(
                model=m.lm, tasks=[ts.spec for ts in group], num_fewshot=group[0].num_fewshot, limit=limit,
                device=device, batch_size=batch_size, task_manager=tm, apply_chat_template=chat,
                fewshot_as_multiturn=chat, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                verbosity=None,
            )
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(f"lm-eval could not run task(s) {names} on model {m.name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - surface any harness failure as a deltaport error
        raise RuntimeFailure(f"lm-eval failed on task(s) {names}, model {m.name!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if out is None:  # non-zero rank in a distributed run
        return {ts.name: {"metrics": {}, "subtasks": {}} for ts in group}
    res = out.get("results", {})
    gs = out.get("group_subtasks", {}) or {}
    elapsed = round(time.time() - t0, 3)
    recs = {}
    for ts in group:
        if ts.name not in res:
            raise RuntimeFailure(f"lm-eval returned no result for {ts.name!r} (got {sorted(res)}); a group needs "
                                 "an aggregate_metric_list to report one score")
        subs = _subtasks(gs, ts.name)
        mine = [ts.name, *subs]
        recs[ts.name] = {
            "metrics": _parse_metrics(res[ts.name]),
            "subtasks": {k: _parse_metrics(res[k]) for k in subs if k in res},
            "n_samples": {k: v for k, v in (out.get("n-samples") or {}).items() if k in mine},
            "n_shot": {k: v for k, v in (out.get("n-shot") or {}).items() if k in mine},
            "versions": {k: v for k, v in (out.get("versions") or {}).items() if k in mine},
            "protocol": proto,
            "apply_chat_template": chat,
            "time_s": elapsed,  # of the whole call (tasks sharing a few-shot count run together)
        }
    return recs


# --------------------------------------------------------------------------------------------------
# the table


def _primary(metrics: dict, preferred: str | None) -> str | None:
    if preferred and preferred in metrics:
        return preferred
    for k in metrics:
        if not k.endswith("_stderr") and isinstance(metrics[k], (int, float)):
            return k
    return None


def comparison_table(results: dict, baseline: str | None = None) -> str:
    """A Markdown table like the paper's Table 1: a row per model, a column per task, the average.

    Scores are the column's primary metric (the preset's, else the task's first), shown ×100 when every
    value lies in [0, 1], with the standard error and the number of documents scored beside each, e.g.
    ``56.9 ± 2.2 (n=500)``. With ``baseline`` (a row name) every cell also shows the difference to the
    baseline's cell, e.g. ``56.9 ± 2.2 (n=500) [+30.3]``.
    """
    rows = results.get("results", results)
    if not rows:
        return "(no results)\n"
    cols_meta = results.get("columns") or {}
    tasks: list[str] = list(cols_meta) or sorted({t for r in rows.values() for t in r})
    if baseline is not None and baseline not in rows:
        raise InputError(f"baseline {baseline!r} is not one of the evaluated models: {', '.join(rows)}")
    metric_of: dict[str, str | None] = {}
    for t in tasks:
        pref = (cols_meta.get(t) or {}).get("metric")
        found = None
        for r in rows.values():
            if t in r:
                found = _primary(r[t], pref)
                if found:
                    break
        metric_of[t] = found

    def value(row: str, t: str) -> float | None:
        m = metric_of[t]
        v = rows[row].get(t, {}).get(m) if m else None
        return v if isinstance(v, (int, float)) else None

    def stderr(row: str, t: str) -> float | None:
        m = metric_of[t]
        v = rows[row].get(t, {}).get(m + "_stderr") if m else None
        return v if isinstance(v, (int, float)) and v == v else None

    details = results.get("details") or {}

    def n_of(row: str, t: str) -> int | None:
        ns = ((details.get(row) or {}).get(t) or {}).get("n_samples") or {}
        n = ns.get(t)
        if isinstance(n, dict):
            n = n.get("effective", n.get("original"))
        return n if isinstance(n, int) else None

    scale = {t: 100.0 if all(0.0 <= (value(r, t) or 0.0) <= 1.0 for r in rows) else 1.0 for t in tasks}

    def avg(row: str) -> float | None:
        vals = [value(row, t) for t in tasks]
        if not vals or any(v is None for v in vals):
            return None
        return sum(v * scale[t] for v, t in zip(vals, tasks)) / len(vals)

    def cell(v: float | None, b: float | None, se: float | None = None, n: int | None = None) -> str:
        if v is None:
            return "–"
        s = f"{v:.1f}"
        if se is not None:
            s += f" ± {se:.1f}"
        if n is not None:
            s += f" (n={n})"
        if b is not None:
            s += f" [{v - b:+.1f}]"
        return s

    labels = [(cols_meta.get(t) or {}).get("label") or t for t in tasks]
    lines = ["| Model | " + " | ".join(labels) + " | Avg |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = []
        for t in tasks:
            v = value(row, t)
            b = value(baseline, t) if baseline is not None and row != baseline else None
            se = stderr(row, t)
            cells.append(cell(None if v is None else v * scale[t], None if b is None else b * scale[t],
                              None if se is None else se * scale[t], n_of(row, t)))
        a = avg(row)
        ab = avg(baseline) if baseline is not None and row != baseline else None
        cells.append(cell(a, ab))
        name = f"**{row}** (baseline)" if row == baseline else row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = ", ".join(f"{lab}: {metric_of[t] or '?'}{' ×100' if scale[t] == 100.0 else ''}"
                      for lab, t in zip(labels, tasks))
    lines.append("")
    lines.append(f"Metrics — {notes}. Each score ± its standard error (lm-eval's), n = documents scored"
                 + (f"; [differences] are to {baseline}." if baseline else "."))
    return "\n".join(lines) + "\n"
