"""``evaluate``: every model on every task under the chosen protocol(s), through the cache.

The order of work: check the arguments and tasks (no model needed), then per model: prepare it
(checks, fingerprint), per protocol take what the cache holds and run the rest with lm-eval, one
call per few-shot count, the model loaded once. See :mod:`deltaport.evaluation` for the protocols.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from deltaport.devices import process_rank, resolve_device
from deltaport.errors import InputError
from deltaport.evaluation.cache import cache_get, cache_key, cache_put
from deltaport.evaluation.harness import build_lm, by_fewshot, parse_gen_kwargs, progress_bars, run_group
from deltaport.evaluation.items import item_metrics, lm_eval_results, public_records
from deltaport.evaluation.models import EvalModel, normalise_models, prepare_model
from deltaport.evaluation.results import add_derived_metrics
from deltaport.evaluation.tasks import TaskSpec, check_known_tasks, resolve_tasks, task_manager_for
from deltaport.options import EVALUATE, EvaluateOptions, declared

LOG = logging.getLogger(__name__)

PROTOCOLS = ("base", "chat", "both", "auto")
BACKENDS = ("hf", "vllm")


@declared(EvaluateOptions)
def evaluate(models, tasks, *, preset=EVALUATE.preset, languages: list[str] | None = EVALUATE.languages,
             limit=EVALUATE.limit, device=EVALUATE.device, backend=EVALUATE.backend, batch_size=EVALUATE.batch_size,
             protocol=EVALUATE.protocol, num_fewshot=EVALUATE.num_fewshot, seed=EVALUATE.seed,
             model_args: dict | None = EVALUATE.model_args, gen_kwargs: dict | str | None = EVALUATE.gen_kwargs,
             include_path=EVALUATE.include_path, system_instruction=EVALUATE.system_instruction,
             fewshot_as_multiturn=EVALUATE.fewshot_as_multiturn, log_samples=EVALUATE.log_samples,
             no_prompts=EVALUATE.no_prompts, cache_dir=None, progress=False, status: bool = False) -> dict:
    """Run lm-eval on every model and task; return per-task metrics with standard errors.

    Args:
        models: paths / hub ids (list), or ``{name: path or (model, tokenizer)}``; in-memory models are
            evaluated through ``HFLM(pretrained=model, tokenizer=tok)`` where they are (no copy, no move).
        tasks: lm-eval task/group names or paths to local task YAML files (comma-separated string or list).
        cache_dir: folder for cached results (None: no cache).
        progress: let lm-eval (and the model loading under it) draw its tqdm progress bars on stderr; off
            (the default) no bar is drawn during the call. ``deltaport eval`` turns them on when stderr
            is a terminal.
        status: print a line on stderr when each model/task group starts and ends (what ``deltaport eval``
            shows while it works, bars or not).

    Returns:
        ``{"results": {row: {task: {metric: value, metric + "_stderr": value}}}, "details": {row: {task:
        {...}}}, "columns": {task: {"metric", "label"}}, "settings": {...}, "items": {row: {task: {"ids",
        "metrics"}}}, "lm_eval": {row: lm-eval's results-file dict}, "warnings": [...]}``, and with
        ``log_samples`` ``"samples": {row: {task: [record, ...]}}`` (:mod:`deltaport.evaluation.items`). A row
        is the model's name (``NAME [base]`` / ``NAME [chat]`` with ``protocol="both"``). ``items`` (the
        per-item metric values, in the same item order for every row) is what
        :func:`deltaport.evaluation.compare` pairs.

    Under ``torchrun`` / ``accelerate launch`` (``settings["world_size"]`` > 1) lm-eval splits every task's
    items across the processes and rank 0 gathers them: rank 0 returns the scores (and alone writes the
    cache); the other ranks return rows without metrics. Every rank must be given the same arguments.
    """
    t_start = time.time()
    if protocol is None:
        protocol = "auto" if preset else "base"
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if limit is not None and (limit <= 0):
        raise InputError(f"limit must be positive, got {limit}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size > 0)):
        raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    device = resolve_device(device)
    if backend == "vllm" and not device.startswith("cuda"):
        raise InputError("backend 'vllm' runs on CUDA GPUs only; use --backend hf on this machine")
    model_args = dict(model_args or {})
    gen_kwargs = parse_gen_kwargs(gen_kwargs)
    if fewshot_as_multiturn and protocol == "base":
        raise InputError("fewshot_as_multiturn needs the chat protocol (few-shot examples become chat turns); "
                         "use --protocol chat (where it is on by default), both or auto, or drop it")
    if no_prompts and not log_samples:
        raise InputError("no_prompts changes the per-item records only; pass it with log_samples "
                         "(--log-samples --no-prompts)")
    entries = normalise_models(models)
    specs = resolve_tasks(tasks, preset=preset, num_fewshot=num_fewshot, languages=languages,
                          include_path=include_path)

    import lm_eval

    _tm: list = []

    def task_manager():  # built on first need: everything cached -> no indexing at all
        if not _tm:
            _tm.append(task_manager_for(specs))
            check_known_tasks(specs, _tm[0])
        return _tm[0]

    cache = Path(cache_dir).expanduser() if cache_dir else None
    settings = {
        "limit": limit, "device": device, "backend": backend, "batch_size": batch_size, "protocol": protocol,
        "num_fewshot": num_fewshot, "preset": preset, "seed": seed, "model_args": model_args,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"), "cache_dir": str(cache) if cache else None,
        "gen_kwargs": gen_kwargs, "include_path": str(include_path) if include_path is not None else None,
        "system_instruction": system_instruction, "fewshot_as_multiturn": fewshot_as_multiturn,
        "log_samples": log_samples, "no_prompts": no_prompts, "versions": _versions(),
        "world_size": process_rank()[1],
    }
    results: dict[str, dict] = {}
    details: dict[str, dict] = {}
    items: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    lm_eval_rows: dict[str, dict] = {}
    tokenizers: dict[str, str | None] = {}
    with progress_bars(progress):
        for m in entries:
            prepare_model(m, cache, need_fp=cache is not None)
            protos = _protocols_for(m, protocol)
            for proto in protos:
                shown = "chat" if proto == "skip-chat" else proto
                row = m.name if len(protos) == 1 and protocol != "both" else f"{m.name} [{shown}]"
                results[row], details[row] = {}, {}
                if proto == "skip-chat":
                    continue
                recs, cached_names = _scores(lm_eval, m, proto, specs, cache, settings, task_manager, status)
                items[row], samples[row], tokenizers[row] = {}, {}, m.tokenizer_id
                for ts in specs:
                    rec = recs[ts.name]
                    cached = ts.name in cached_names
                    metrics = dict(rec["metrics"])
                    add_derived_metrics(metrics, ts.derived)
                    results[row][ts.name] = metrics
                    details[row][ts.name] = ({k: v for k, v in rec.items() if k not in ("metrics", "items", "lm_eval")}
                                             | {"cached": cached})
                    items[row][ts.name] = item_metrics(rec["items"])
                    if log_samples:
                        samples[row].update({leaf: public_records(r, no_prompts) for leaf, r in rec["items"].items()})
                lm_eval_rows[row] = lm_eval_results([recs[ts.name]["lm_eval"] for ts in specs], model=m.name,
                                                    settings=settings, date=t_start)
                LOG.info("evaluated %s (%s) on %d task(s)", m.name, proto, len(specs))
            m.lm = None  # free the model before loading the next one
    columns = {ts.name: {"metric": ts.metric, "label": ts.label or ts.name, "source": ts.source} for ts in specs}
    settings["time_s"] = round(time.time() - t_start, 3)
    out = {"results": results, "details": details, "columns": columns, "settings": settings, "items": items,
           "lm_eval": lm_eval_rows, "warnings": _tokenizer_warnings(tokenizers, details)}
    if log_samples:
        out["samples"] = samples
    return out


def _tokenizer_warnings(tokenizers: dict[str, str | None], details: dict) -> list[str]:
    """Models with different tokenizers on generation tasks: allowed (the texts are compared), but
    said, since generation lengths and stop sequences count tokens."""
    if len({t for t in tokenizers.values()}) < 2:
        return []
    gen = sorted({t for row in details.values() for t, d in row.items() if "generate_until" in d.get("output_types", [])})
    if not gen:
        return []
    msg = (f"the models' tokenizers differ ({', '.join(tokenizers)}) and {', '.join(gen)} "
           f"{'is a generation task' if len(gen) == 1 else 'are generation tasks'}: compared as texts, but "
           "max_gen_toks and the prompt's length count each model's own tokens")
    LOG.warning(msg)
    return [msg]


def _scores(lm_eval, m: EvalModel, proto: str, specs: list[TaskSpec], cache: Path | None, settings: dict,
            task_manager, status: bool) -> tuple[dict[str, dict], set[str]]:
    """The record of every task for ``m`` under ``proto``: from the cache where it holds one, else from
    lm-eval (one call per few-shot count, the model built on first need); and the names that were cached."""
    limit, device, seed, batch_size = settings["limit"], settings["device"], settings["seed"], settings["batch_size"]
    recs: dict[str, dict] = {}
    cached_names: set[str] = set()
    missing: list[TaskSpec] = []
    for ts in specs:
        rec = cache_get(cache, cache_key(m.fingerprint, ts, proto, settings)) if cache else None
        if rec is None:
            missing.append(ts)
        else:
            recs[ts.name] = rec
            cached_names.add(ts.name)
    for group in by_fewshot(missing):
        task_manager()  # validates task names before a model is loaded
        if m.lm is None:
            m.lm = build_lm(m, backend=settings["backend"], device=device, batch_size=batch_size, seed=seed,
                            model_args=settings["model_args"])
        names = ", ".join(ts.name for ts in group)
        if status:
            _status(f"eval: {m.name} ({proto} protocol): running {names}")
        t_group = time.time()
        done = run_group(lm_eval, m, group, proto, task_manager(), limit=limit, device=device, seed=seed,
                         batch_size=batch_size, gen_kwargs=settings["gen_kwargs"],
                         system_instruction=settings["system_instruction"],
                         fewshot_as_multiturn=settings["fewshot_as_multiturn"])
        if status:
            _status(f"eval: {m.name} ({proto} protocol): {names} done in {time.time() - t_group:.1f} s")
        for ts in group:
            recs[ts.name] = done[ts.name]
            if cache and process_rank()[0] == 0:  # the other ranks of a multi-process run hold no scores
                cache_put(cache, cache_key(m.fingerprint, ts, proto, settings), done[ts.name], model=m.name,
                          model_fingerprint=m.fingerprint, task=ts.name, protocol=proto)
    if status and cached_names:
        _status(f"eval: {m.name} ({proto} protocol): {len(cached_names)} of {len(specs)} task(s) from the cache")
    return recs, cached_names


def _versions() -> dict[str, str | None]:
    """The versions that make a score what it is (recorded, not part of the cache key beyond lm-eval's)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("deltaport", "lm_eval", "torch", "transformers", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _status(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _protocols_for(m: EvalModel, protocol: str) -> list[str]:
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
