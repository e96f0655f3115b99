"""The lab's steps, each one call into deltaport's library, cached by the content of its inputs.

``Steps`` owns a run directory::

    RUN_DIR/models/<name>/     fine-tuned and merged models (HF dirs + provenance)
    RUN_DIR/deltas/<name>/     Δ = FT(M) − M, written by deltaport.diff
    RUN_DIR/cache/*.json       evaluation / connectivity / check records, keyed by content hashes
    RUN_DIR/tasks/             the lm-eval local tasks

A model directory carries ``lab_key.json``: the hash of its inputs' weights and the step's
parameters. A directory whose key matches is reused; otherwise it is rebuilt (atomically).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from deltaport.lab.store import JsonCache, model_hash, step_key

LOG = logging.getLogger(__name__)


class Steps:
    def __init__(self, run_dir: Path, tokenizer, tasks: dict[str, Path], *, seed: int = 0,
                 tick: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.tok = tokenizer
        self.tasks = tasks
        self.seed = seed
        self.cache = JsonCache(self.run_dir / "cache")
        self.timings: dict[str, float] = {}
        self.tick = tick or (lambda label: None)
        self._models: dict[str, Any] = {}
        self.items: dict[tuple[str, str], str] = {}
        self.item_mismatch = 0.0
        self.reused: dict[str, int] = {}

    # ------------------------------------------------------------ helpers
    def _timed(self, kind: str, t0: float) -> None:
        self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - t0

    def _cached_dir(self, path: Path, key: str) -> bool:
        f = path / "lab_key.json"
        return f.exists() and json.loads(f.read_text()).get("key") == key

    def _mark(self, path: Path, key: str, info: dict) -> None:
        (path / "lab_key.json").write_text(json.dumps({"key": key, **info}, indent=1, sort_keys=True, default=str))

    def load(self, path: Path):
        """An in-memory model for ``path`` (cached per content hash)."""
        from transformers import AutoModelForCausalLM

        h = model_hash(path)
        if h not in self._models:
            if len(self._models) > 64:
                self._models.clear()
            self._models[h] = AutoModelForCausalLM.from_pretrained(path).eval()
        return self._models[h]

    # ------------------------------------------------------------ diff / apply
    def delta(self, base: Path, finetuned: Path, name: str) -> Path:
        """Δ = finetuned − base, written by ``deltaport.diff``."""
        out = self.run_dir / "deltas" / name
        key = step_key("diff", base=model_hash(base), finetuned=model_hash(finetuned))
        if self._cached_dir(out, key):
            return out
        t0 = time.perf_counter()
        from deltaport.ops import diff

        diff(base, finetuned, out, overwrite=True)
        self._mark(out, key, {"base": str(base), "finetuned": str(finetuned)})
        self._timed("diff", t0)
        return out

    def apply(self, delta: Path, target: Path, name: str, *, scale: float = 1.0) -> Path:
        """``target + scale·Δ``, written by ``deltaport.apply``."""
        out = self.run_dir / "models" / name
        key = step_key("apply", delta=model_hash(delta), target=model_hash(target), scale=scale)
        if self._cached_dir(out, key):
            return out
        t0 = time.perf_counter()
        from deltaport.ops import apply

        apply(delta, target, out, scale=scale, overwrite=True)
        self._mark(out, key, {"delta": str(delta), "target": str(target), "scale": scale})
        self._timed("apply", t0)
        return out

    # ------------------------------------------------------------ fine-tuning
    def finetune(self, init: Path, records: list[dict], name: str, *, steps: int, lr: float, batch_size: int,
                 curve_task: str | None = None, curve_every: int = 0, data_label: str = "sft") -> tuple[Path, list]:
        """Fine-tune ``init`` on chat ``records`` with ``deltaport.finetune``; returns (path, curve).

        ``curve`` is ``[(step, heldout score), ...]`` when ``curve_task`` is given (evaluated every
        ``curve_every`` steps, step 0 included).
        """
        out = self.run_dir / "models" / name
        key = step_key("finetune", init=model_hash(init), data=records, steps=steps, lr=lr, bs=batch_size,
                       seed=self.seed, recipe="quick")
        curve_key = step_key("curve", ft=key, task=curve_task, items=_file_hash(self.tasks[curve_task])
                             if curve_task else None, every=curve_every)
        if self._cached_dir(out, key) and (curve_task is None or self.cache.get(curve_key) is not None):
            self.reused["finetunes"] = self.reused.get("finetunes", 0) + 1
            return out, (self.cache.get(curve_key) or {}).get("curve", [])
        t0 = time.perf_counter()
        curve: list = []
        from deltaport.finetune import finetune

        kwargs: dict[str, Any] = dict(recipe="quick", steps=steps, lr=lr, batch_size=batch_size, seed=self.seed,
                                      overwrite=True, progress=False)
        if curve_task:
            kwargs.update(eval_every=curve_every, eval_tasks=[str(self.tasks[curve_task])])
        res = finetune(str(init), records, str(out), **kwargs)
        curve = _curve_from_evals(getattr(res, "evals", None) or [], curve_task)
        if curve_task and not any(s == 0 for s, _ in curve):
            curve.insert(0, (0, self.score(init, curve_task)))
        self._mark(out, key, {"init": str(init), "steps": steps, "lr": lr, "data": data_label})
        if curve_task:
            self.cache.put(curve_key, {"curve": curve})
        self._timed("finetune", t0)
        self.reused["computed_finetunes"] = self.reused.get("computed_finetunes", 0) + 1
        self.tick(f"finetune {name}")
        return out, curve

    # ------------------------------------------------------------ evaluation
    def _items(self, task: str) -> list[dict]:
        path = Path(str(self.tasks[task]).replace(".yaml", ".jsonl"))
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def score(self, model: Path, task: str, *, limit: int | None = None) -> float:
        """Exact match of ``model`` on lab task ``task`` through ``deltaport.evaluate`` (cached)."""
        return self.scores({model.name: model}, [task], limit=limit)[model.name][task]

    def scores(self, models: dict[str, Path], tasks: list[str], *, limit: int | None = None,
               with_items: bool = True) -> dict[str, dict[str, float]]:
        """``{name: {task: exact_match}}`` for several models; only uncached (model, task) pairs run.

        With ``with_items`` the per-item correctness (``"0110…"``, one character per item, task order)
        is also measured by :func:`item_correct` and kept in ``self.items[(name, task)]`` (for the
        bootstrap); ``self.item_mismatch`` records the largest difference between its mean and
        lm-eval's exact match (0 when both scorers agree).
        """
        out: dict[str, dict[str, float]] = {n: {} for n in models}
        todo: dict[str, Path] = {}
        keys = {}
        for n, p in models.items():
            for t in tasks:
                k = step_key("eval", model=model_hash(p), task=t, items=_file_hash(self.tasks[t]), limit=limit,
                             seed=self.seed, scorer="lm-eval exact_match + item_correct")
                keys[(n, t)] = k
                rec = self.cache.get(k)
                if rec is None or (with_items and "items" not in rec):
                    todo[n] = p
                else:
                    out[n][t] = rec["exact_match"]
                    if "items" in rec:
                        self.items[(n, t)] = rec["items"]
                    self.reused["evals"] = self.reused.get("evals", 0) + 1
        if not todo:
            return out
        t0 = time.perf_counter()
        from deltaport.evaluate import evaluate

        res = evaluate({n: (self.load(p), self.tok) for n, p in todo.items()},
                       [str(self.tasks[t]) for t in tasks], limit=limit, device="cpu", batch_size=64,
                       seed=self.seed, progress=False)
        for n in todo:
            for t in tasks:
                out[n][t] = _exact_match(res["results"][n], t)
        for n in todo:
            for t in tasks:
                rec = {"exact_match": out[n][t], "model": str(todo[n]), "task": t}
                if with_items:
                    rec["items"] = item_correct(self.load(todo[n]), self.tok, self._items(t)[:limit] if limit
                                                else self._items(t))
                self.cache.put(keys[(n, t)], rec)
                self.reused["computed_evals"] = self.reused.get("computed_evals", 0) + 1
        for n in todo:
            for t in tasks:
                rec = self.cache.get(keys[(n, t)])
                if rec and "items" in rec:
                    self.items[(n, t)] = rec["items"]
                    mean = rec["items"].count("1") / max(1, len(rec["items"]))
                    self.item_mismatch = max(self.item_mismatch, abs(mean - out[n][t]))
        self._timed("eval", t0)
        self.tick(f"eval {len(todo)} model(s)")
        return out


def _file_hash(path: Path) -> str:
    import hashlib

    p = Path(str(path).replace(".yaml", ".jsonl"))
    return hashlib.sha256(p.read_bytes() + Path(path).read_bytes()).hexdigest()[:16]


def _exact_match(task_results: dict, task: str) -> float:
    """The exact-match value of ``task`` in one model's results (metric keys look like
    ``exact_match,<filter>``)."""
    from deltaport.errors import RuntimeFailure

    for tname, metrics in task_results.items():
        if Path(tname).stem == task or tname == task or tname.endswith(task):
            for k, v in metrics.items():
                if k.startswith("exact_match") and "stderr" not in k:
                    return float(v)
    raise RuntimeFailure(f"lab: no exact_match for task {task!r} in evaluation results {task_results!r}")


def _curve_from_evals(evals: Any, task: str | None) -> list:
    """Normalise ``FinetuneResult.evals`` into ``[(step, score)]``."""
    curve = []
    if not task:
        return curve
    items = evals.items() if isinstance(evals, dict) else enumerate(evals)
    for k, e in items:
        step = e.get("step", k) if isinstance(e, dict) else k
        res = e.get("results", e) if isinstance(e, dict) else e
        try:
            curve.append((int(step), _exact_match(res, task)))
        except Exception:  # noqa: BLE001 - a record without this task
            continue
    return sorted(curve)


def item_correct(model, tok, items: list[dict]) -> str:
    """Per-item greedy correctness (``"1"``/``"0"`` per item): the most likely next token after the prompt
    is the answer's single token (the lab's tokenizer is word-level, so the first generated word is one
    token). Used for the bootstrap; its mean is checked against lm-eval's exact match in every run."""
    import torch

    tok.padding_side = "left"
    out = []
    with torch.no_grad():
        for i in range(0, len(items), 64):
            chunk = items[i:i + 64]
            enc = tok([it["prompt"] for it in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            pos = enc["attention_mask"].long().cumsum(-1) - 1
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           position_ids=pos.clamp(min=0)).logits[:, -1, :]
            pred = logits.argmax(-1).tolist()
            for it, p in zip(chunk, pred):
                ids = tok(it["answer"], add_special_tokens=False)["input_ids"]
                out.append("1" if len(ids) == 1 and ids[0] == p else "0")
    return "".join(out)
