"""Per-item records and lm-eval's own files: what ``--log-samples`` writes, what the comparisons pair.

lm-eval's samples (one per document and filter) become one record per item::

    {"doc_id": 3, "doc_hash": "…", "prompt_hash": "…", "prompt": "Q: …", "target": 1,
     "choices": [" red", " green"], "loglikelihoods": [-4.3, -4.1],          # log-likelihood tasks
     "response": "green.", "extracted": {"first_word": "green"},              # generation tasks
     "metrics": {"acc": 0.0, "acc_norm": 1.0}}

``metrics`` are named as in the results (``exact_match,first_word`` under a filter other than
``none``). With ``no_prompts`` a record keeps ``prompt_hash`` (lm-eval's sha256 of the prompt) but
neither the prompt nor the choices. Records are cached with the results (:mod:`.cache`), so asking for
them later evaluates nothing again.

Files beside ``-o r.json`` (:func:`write_lm_eval_dir`), in lm-eval's layout so that its tooling
(``lm_eval.utils.get_results_filenames``, ``get_latest_filename``, ``make_table``) reads them:
``r.lm_eval/<model>/results_<date>.json`` for every model, and with ``log_samples``
``r.lm_eval/<model>/samples_<task>_<date>.jsonl`` (one record per line, no header).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: lm-eval's top-level result keys, kept per task for its results file
_LM_EVAL_KEYS = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _plain(v: Any) -> Any:
    """JSON-able: numpy scalars as numbers, tuples as lists, anything else unknown as its str."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return _plain(v.item())
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def _metric_value(v: Any) -> Any:
    v = _plain(v)
    return float(v) if isinstance(v, (bool, int)) else v


def _is_generation(sample: dict) -> bool:
    resps = sample.get("resps") or []
    return bool(resps) and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], str) for r in resps)


def records_from_samples(samples: list[dict]) -> list[dict]:
    """lm-eval's samples of one task (``log_samples=True``) as per-item records, by ``doc_id``."""
    by_doc: dict[int, dict] = {}
    for s in samples:
        doc_id = _plain(s.get("doc_id"))
        args = list(s.get("arguments") or [])
        rec = by_doc.get(doc_id)
        if rec is None:
            prompt = args[0][0] if args and isinstance(args[0], (list, tuple)) and args[0] else None
            rec = by_doc[doc_id] = {"doc_id": doc_id, "doc_hash": s.get("doc_hash"),
                                    "prompt_hash": s.get("prompt_hash"), "prompt": _plain(prompt),
                                    "target": _plain(s.get("target"))}
            if _is_generation(s):
                rec["response"] = _plain(s["resps"][0][0])
            else:
                lls = [x[0] if isinstance(x, (list, tuple)) else x for x in (s.get("filtered_resps") or [])]
                rec["loglikelihoods"] = [_plain(x) for x in lls]
                if len(args) > 1 and all(isinstance(a, (list, tuple)) and len(a) > 1 for a in args):
                    rec["choices"] = [_plain(a[1]) for a in args]
            rec["metrics"] = {}
        filt = s.get("filter", "none")
        if filt != "none" and "response" in rec:
            fr = s.get("filtered_resps") or [None]
            rec.setdefault("extracted", {})[filt] = _plain(fr[0])
        for name in s.get("metrics") or []:
            rec["metrics"][name if filt == "none" else f"{name},{filt}"] = _metric_value(s.get(name))
    return [by_doc[k] for k in sorted(by_doc, key=lambda d: (str(type(d)), d))]


def public_records(records: list[dict], no_prompts: bool) -> list[dict]:
    """The records as written: without prompt text and choices when ``no_prompts``."""
    if not no_prompts:
        return records
    return [{k: v for k, v in r.items() if k not in ("prompt", "choices")} for r in records]


def item_metrics(leaves: dict[str, list[dict]]) -> dict:
    """The per-item values of one task (its leaves' records, concatenated in leaf order):
    ``{"ids": ["leaf/doc_id", ...], "metrics": {metric: [value or None, ...]}}`` (numbers only)."""
    ids: list[str] = []
    rows: list[dict] = []
    for leaf, records in leaves.items():
        for r in records:
            ids.append(f"{leaf}/{r['doc_id']}")
            rows.append(r.get("metrics") or {})
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    metrics = {}
    for name in names:
        vals = [r.get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            metrics[name] = [float(v) for v in vals]
    return {"ids": ids, "metrics": metrics}


def lm_eval_parts(out: dict, names: list[str]) -> dict:
    """lm-eval's own entries (results, configs, versions, …) for the tasks ``names`` of one call."""
    parts = {key: {k: _plain(v) for k, v in (out.get(key) or {}).items() if k in names} for key in _LM_EVAL_KEYS}
    parts["group_subtasks"] = {k: _plain(v) for k, v in (out.get("group_subtasks") or {}).items() if k in names}
    return parts


def lm_eval_results(parts: list[dict], *, model: str, settings: dict, date: float) -> dict:
    """One model's results in lm-eval's results-file format, from its tasks' parts (cached or new)."""
    from lm_eval.utils import sanitize_model_name

    merged: dict = {key: {} for key in (*_LM_EVAL_KEYS, "group_subtasks")}
    for p in parts:
        for key in merged:
            merged[key].update(p.get(key) or {})
    if not merged["groups"]:
        del merged["groups"]
    seed = settings.get("seed")
    merged["config"] = {
        "model": settings.get("backend"), "model_args": f"pretrained={model}", "batch_size": settings.get("batch_size"),
        "device": settings.get("device"), "limit": settings.get("limit"), "gen_kwargs": settings.get("gen_kwargs"),
        "random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": seed,
    }
    merged.update({"lm_eval_version": settings.get("lm_eval_version"), "date": date, "model_name": model,
                   "model_name_sanitized": sanitize_model_name(model), "written_by": "deltaport eval"})
    return merged


def lm_eval_dir_for(output: str | Path) -> Path:
    """The folder beside ``-o``: ``r.json`` -> ``r.lm_eval``."""
    output = Path(output)
    return output.with_name(output.stem + ".lm_eval")


def write_lm_eval_dir(folder: Path, res: dict, *, log_samples: bool, overwrite: bool) -> list[Path]:
    """Write every model's lm-eval results file (and with ``log_samples`` its samples files) into
    ``folder`` (built in a temporary sibling, then renamed in); return the files, relative to ``folder``."""
    from datetime import datetime

    from lm_eval.utils import sanitize_model_name, sanitize_task_name

    from deltaport.io.atomic import atomic_output_dir

    date_id = datetime.now().isoformat().replace(":", "-")
    written: list[Path] = []
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        for row, doc in (res.get("lm_eval") or {}).items():
            d = tmp / sanitize_model_name(row)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"results_{date_id}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            written.append(d.relative_to(tmp) / f"results_{date_id}.json")
            if not log_samples:
                continue
            for leaf, records in (res.get("samples") or {}).get(row, {}).items():
                name = f"samples_{sanitize_task_name(leaf)}_{date_id}.jsonl"
                with open(d / name, "w", encoding="utf-8") as fh:
                    for r in records:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                written.append(d.relative_to(tmp) / name)
    return written
