"""Every model operation of the lab: one call into deltaport's library, cached by the content of its inputs.

:class:`CachedLibrary` owns a run directory::

    RUN_DIR/models/<name>/     fine-tuned and merged models (HF dirs + provenance)
    RUN_DIR/deltas/<name>/     Δ = FT(M) − M, written by deltaport.diff
    RUN_DIR/cache/*.json       evaluation / curve / barrier / check records, keyed by content hashes
    RUN_DIR/tasks/             the lm-eval local tasks

Each method computes its cache key first (:func:`deltaport.lab.store.step_key`: the content hashes of
its inputs and its parameters); a finished result with that key is reused, anything else is computed
by the library (``deltaport.diff``, ``deltaport.apply``, ``deltaport.finetune``, ``deltaport.evaluate``,
``deltaport.connectivity``, ``deltaport.check``) and stored under the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator

from deltaport.lab.store import JsonCache, is_built, mark_built, model_hash, step_key


class CachedLibrary:
    """deltaport's library calls for one lab run, each cached by content.

    Counters read by the report: ``reused`` (``computed_<kind>``: steps run now; ``<kind>``: results found
    from an earlier run in this directory; ``repeated_<kind>``: requests for a result already computed
    earlier in this same run, so a fresh run reuses nothing from before),
    ``timings`` (seconds per kind of step), ``items`` (per-item correctness of every scored
    ``(model, task)``) and ``item_mismatch`` (largest gap between the per-item scorer and lm-eval).
    """

    def __init__(self, run_dir: Path, tokenizer, tasks: dict[str, Path], *, seed: int = 0,
                 tick: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.tasks = tasks
        self.seed = seed
        self.cache = JsonCache(self.run_dir / "cache")
        self.tick = tick or (lambda label: None)
        self.timings: dict[str, float] = {}
        # every counter present, zeros included (the report tells "from an earlier run" from "repeated")
        self.reused: dict[str, int] = {f"{how}{what}": 0 for what in ("evals", "finetunes", "compressed_deltas")
                                       for how in ("computed_", "", "repeated_")}
        self.items: dict[tuple[str, str], str] = {}
        self.item_mismatch = 0.0
        self._loaded: dict[str, object] = {}  # content hash -> model in memory
        self._made: set[str] = set()  # keys of the steps computed in this run

    def _count(self, what: str) -> None:
        self.reused[what] = self.reused.get(what, 0) + 1

    def _computed(self, what: str, key: str) -> None:
        self._made.add(key)
        self._count(f"computed_{what}")

    def _found(self, what: str, key: str) -> None:
        """A cache hit: from an earlier run (``what``) or from earlier in this run (``repeated_<what>``)."""
        self._count(f"repeated_{what}" if key in self._made else what)

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Add the block's wall time to ``timings[kind]``."""
        start = time.perf_counter()
        yield
        self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - start

    def load(self, path: Path):
        """The model at ``path`` in memory (loaded once per content hash)."""
        from transformers import AutoModelForCausalLM

        digest = model_hash(path)
        if digest not in self._loaded:
            if len(self._loaded) > 64:
                self._loaded.clear()
            self._loaded[digest] = AutoModelForCausalLM.from_pretrained(path).eval()
        return self._loaded[digest]

    # ------------------------------------------------------------ diff / apply
    def delta(self, base: Path, finetuned: Path, name: str) -> Path:
        """Δ = finetuned − base, written by ``deltaport.diff`` into ``deltas/<name>``."""
        from deltaport.api import diff

        out = self.run_dir / "deltas" / name
        key = step_key("diff", base=model_hash(base), finetuned=model_hash(finetuned))
        if is_built(out, key):
            return out
        with self.timed("diff"):
            diff(base, finetuned, out, overwrite=True)
            mark_built(out, key, {"base": str(base), "finetuned": str(finetuned)})
        return out

    def apply(self, delta: Path, target: Path, name: str, *, scale: float = 1.0) -> Path:
        """``target + scale·Δ``, written by ``deltaport.apply`` into ``models/<name>``."""
        from deltaport.api import apply

        out = self.run_dir / "models" / name
        key = step_key("apply", delta=model_hash(delta), target=model_hash(target), scale=scale)
        if is_built(out, key):
            return out
        with self.timed("apply"):
            apply(delta, target, out, scale=scale, overwrite=True)
            mark_built(out, key, {"delta": str(delta), "target": str(target), "scale": scale})
        return out

    def compress(self, delta: Path, name: str, *, method: str, seed: int, **setting) -> Path:
        """Δ compressed by ``deltaport.compress`` (``method`` and its ``setting``: rank, density, include)
        into ``deltas/<name>``; DARE's mask and the randomised SVD are seeded with ``seed``."""
        from deltaport.compression import compress

        out = self.run_dir / "deltas" / name
        key = step_key("compress", delta=model_hash(delta), setting={"method": method, **setting}, seed=seed)
        if is_built(out, key):
            self._found("compressed_deltas", key)
            return out
        with self.timed("compress"):  # (a setting without include keeps the vocabulary exact: compress's default)
            compress(delta, out, method=method, seed=seed, overwrite=True, threads=1, **setting)
            mark_built(out, key, {"delta": str(delta), "setting": {"method": method, **setting}, "seed": seed})
        self._computed("compressed_deltas", key)
        return out

    # ------------------------------------------------------------ fine-tuning
    def finetune(self, init: Path, records: list[dict], name: str, *, steps: int, lr: float, batch_size: int,
                 curve_task: str | None = None, curve_every: int = 0, data_label: str = "sft") -> tuple[Path, list]:
        """Fine-tune ``init`` on chat ``records`` with ``deltaport.finetune`` into ``models/<name>``;
        returns (path, curve).

        ``curve`` is ``[(step, exact match), ...]`` on ``curve_task`` when given (evaluated every
        ``curve_every`` steps, step 0 included), else ``[]``.
        """
        from deltaport.finetune import finetune

        out = self.run_dir / "models" / name
        key = step_key("finetune", init=model_hash(init), data=records, steps=steps, lr=lr, bs=batch_size,
                       seed=self.seed, recipe="quick")
        curve_key = step_key("curve", ft=key, task=curve_task, items=_task_hash(self.tasks[curve_task])
                             if curve_task else None, every=curve_every)
        if is_built(out, key) and (curve_task is None or self.cache.get(curve_key) is not None):
            self._found("finetunes", key)
            return out, (self.cache.get(curve_key) or {}).get("curve", [])
        with self.timed("finetune"):
            options = dict(recipe="quick", steps=steps, lr=lr, batch_size=batch_size, seed=self.seed, overwrite=True,
                           progress=False)
            if curve_task:
                options.update(eval_every=curve_every, eval_tasks=[str(self.tasks[curve_task])])
            result = finetune(str(init), records, str(out), **options)
            curve = curve_of(result.evals, curve_task) if curve_task else []
            if curve_task and not any(step == 0 for step, _ in curve):
                curve.insert(0, (0, self.exact_match({init.name: init}, [curve_task])[init.name][curve_task]))
            mark_built(out, key, {"init": str(init), "steps": steps, "lr": lr, "data": data_label})
            if curve_task:
                self.cache.put(curve_key, {"curve": curve})
        self._computed("finetunes", key)
        self.tick(f"finetune {name}")
        return out, curve

    # ------------------------------------------------------------ evaluation
    def task_items(self, task: str) -> list[dict]:
        """The items (jsonl rows: prompt, answer, ...) of lab task ``task``."""
        path = Path(str(self.tasks[task]).replace(".yaml", ".jsonl"))
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def exact_match(self, models: dict[str, Path], tasks: list[str], *, limit: int | None = None,
                    with_items: bool = True) -> dict[str, dict[str, float]]:
        """``{name: {task: exact_match}}`` through ``deltaport.evaluate``; only uncached (model, task) pairs run.

        With ``with_items`` the per-item correctness (``"0110…"``, one character per item, task order)
        is also measured by :func:`item_correct` and kept in ``self.items[(name, task)]`` (for the
        bootstrap); ``self.item_mismatch`` records the largest difference between its mean and
        lm-eval's exact match (0 when both scorers agree).
        """
        from deltaport.evaluation import evaluate

        out: dict[str, dict[str, float]] = {name: {} for name in models}
        todo: dict[str, Path] = {}
        keys = {}
        for name, path in models.items():
            for task in tasks:
                key = step_key("eval", model=model_hash(path), task=task, items=_task_hash(self.tasks[task]),
                               limit=limit, seed=self.seed, scorer="lm-eval exact_match + item_correct")
                keys[(name, task)] = key
                record = self.cache.get(key)
                if record is None or (with_items and "items" not in record):
                    todo[name] = path
                else:
                    out[name][task] = record["exact_match"]
                    if "items" in record:
                        self.items[(name, task)] = record["items"]
                        self._note_mismatch(record["items"], record["exact_match"])
                    self._found("evals", keys[(name, task)])
        if not todo:
            return out
        with self.timed("eval"):
            result = evaluate({name: (self.load(path), self.tokenizer) for name, path in todo.items()},
                              [str(self.tasks[task]) for task in tasks], limit=limit, device="cpu", batch_size=64,
                              seed=self.seed, progress=False)
            for name, path in todo.items():
                for task in tasks:
                    out[name][task] = exact_match_of(result["results"][name], task)
                    record = {"exact_match": out[name][task], "model": str(path), "task": task}
                    if with_items:
                        items = self.task_items(task)[:limit] if limit else self.task_items(task)
                        record["items"] = item_correct(self.load(path), self.tokenizer, items)
                        self.items[(name, task)] = record["items"]
                        self._note_mismatch(record["items"], out[name][task])
                    self.cache.put(keys[(name, task)], record)
                    self._computed("evals", keys[(name, task)])
        self.tick(f"eval {len(todo)} model(s)")
        return out

    def _note_mismatch(self, items: str, exact_match: float) -> None:
        """Keep the largest gap between the per-item scorer's mean and lm-eval's exact match, for evals computed
        now and read from the cache alike (a resumed run reports the gap of every eval it uses)."""
        mean = items.count("1") / max(1, len(items))
        self.item_mismatch = max(self.item_mismatch, abs(mean - exact_match))

    # ------------------------------------------------------------ diagnostics
    def barrier(self, a: Path, b: Path, texts: list[str], *, points: int, max_tokens: int) -> dict:
        """The loss curve on the straight line from ``a`` to ``b`` (``deltaport.connectivity``) and its barrier."""
        from deltaport.connectivity import connectivity

        key = step_key("conn", a=model_hash(a), b=model_hash(b), texts=texts, points=points, seed=self.seed)
        record = self.cache.get(key)
        if record is None:
            found = connectivity(str(a), str(b), texts, points=points, max_tokens=max_tokens, seed=self.seed)
            record = {k: found[k] for k in ("alphas", "losses", "barrier", "relative_barrier", "loss_a", "loss_b")}
            self.cache.put(key, record)
            self.tick(f"barrier {a.name}-{b.name}")
        return record

    def check(self, source_base: Path, source_ft: Path, target: Path, texts: list[str], *, max_tokens: int) -> dict:
        """``deltaport check``'s verdict and signals for moving FT(source) − source onto ``target``
        (``{"verdict": "error", "error": ...}`` when check refuses the pair)."""
        from deltaport.check import SIGNALS, check, load_calibration
        from deltaport.errors import DeltaportError
        from deltaport.lab.config import config_hash

        key = step_key("check", a=model_hash(source_base), b=model_hash(target), texts=texts, points=5, seed=self.seed,
                       ft=model_hash(source_ft), calibration=config_hash(load_calibration()))
        record = self.cache.get(key)
        if record is None:
            try:
                found = check(str(source_base), str(source_ft), str(target), texts, max_tokens=max_tokens,
                              seed=self.seed)
                record = {"verdict": found["verdict"], "signals": {k: found["signals"][k] for k in SIGNALS}}
            except DeltaportError as exc:
                record = {"verdict": "error", "error": str(exc), "signals": {}}
            self.cache.put(key, record)
            self.tick(f"check {source_base.name} -> {target.name}")
        return record


def _task_hash(task_yaml: Path) -> str:
    """Content hash of a lab task: its items (jsonl) and its definition (yaml)."""
    items = Path(str(task_yaml).replace(".yaml", ".jsonl"))
    return hashlib.sha256(items.read_bytes() + Path(task_yaml).read_bytes()).hexdigest()[:16]


def exact_match_of(task_results: dict, task: str) -> float:
    """The exact-match value of ``task`` in one model's results (metric keys look like
    ``exact_match,<filter>``)."""
    from deltaport.errors import RuntimeFailure

    for name, metrics in task_results.items():
        if Path(name).stem == task or name == task or name.endswith(task):
            for k, v in metrics.items():
                if k.startswith("exact_match") and "stderr" not in k:
                    return float(v)
    raise RuntimeFailure(f"lab: no exact_match for task {task!r} in evaluation results {task_results!r}")


def curve_of(evals: list[dict], task: str) -> list:
    """``[(step, exact match on task)]`` from ``FinetuneResult.evals`` (records without the task left out)."""
    curve = []
    for record in evals:
        try:
            curve.append((int(record["step"]), exact_match_of(record["results"], task)))
        except Exception:  # noqa: BLE001 - a record without this task
            continue
    return sorted(curve)


def item_correct(model, tokenizer, items: list[dict]) -> str:
    """Per-item greedy correctness (``"1"``/``"0"`` per item): the most likely next token after the prompt
    is the answer's single token (the lab's tokenizer is word-level, so the first generated word is one
    token). Used for the bootstrap; its mean is checked against lm-eval's exact match in every run."""
    import torch

    tokenizer.padding_side = "left"
    out = []
    with torch.no_grad():
        for i in range(0, len(items), 64):
            chunk = items[i:i + 64]
            enc = tokenizer([it["prompt"] for it in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            positions = enc["attention_mask"].long().cumsum(-1) - 1
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           position_ids=positions.clamp(min=0)).logits[:, -1, :]
            predicted = logits.argmax(-1).tolist()
            for it, token in zip(chunk, predicted):
                ids = tokenizer(it["answer"], add_special_tokens=False)["input_ids"]
                out.append("1" if len(ids) == 1 and ids[0] == token else "0")
    return "".join(out)
