"""``deltaport lab run``: the paper's controlled study (§3–§6) on the lab's tiny model family.

:func:`run_lab` is the pipeline, five steps one after another. Where each step's output shows up in
``report.md`` (the report numbers the experiment sections that ran, so numbers depend on the config)::

    step            function (file)                              report.md
    1 data          prepare_data (run.py)                        opening paragraph: items, chance
    2 family        build_family (family.py)                     "Run": seeds (results.json: family,
                                                                 family_provenance)
    3 fine-tunes    finetune_versions (run.py)                   the invariant line; the base, base
                                                                 few-shot and FT(M_t) columns of the grid
    4 experiments   experiments.IN_REPORT_ORDER (experiments.py), one function per section:
                      transfer_grid                              Transfer grid (Table 3)
                      recovery                                   Fraction of the fine-tuning gain recovered
                      transfer_then_finetune                     Transfer-then-finetune (Table 4, Fig. 2)
                      iterative                                  Iterative Δ^iter vs Δ^dir vs plain FT (Table 6)
                      backport                                   Backporting beside recycling (Table 1)
                      second_language                            Second-language fine-tune (Table 2)
                      connectivity                               Connectivity: barriers and check
                      compression                                Compressed Δ: bytes vs held-out score
    5 report        write_outputs (report.py)                    the whole file, figures/, results.json;
                      claims -> findings.decide (findings.py)    "What reproduced"
                      (run_lab's last lines, run.py)             "Run": environment, cache, timings

Every model operation is one call into deltaport's library (diff, apply, finetune, evaluate,
connectivity, check, evolve), cached by the content of its inputs (:mod:`deltaport.lab.steps`,
:mod:`deltaport.lab.store`), so a rerun or a resumed run reuses finished work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from deltaport.lab import experiments
from deltaport.lab.experiments import delta_label, transfer_name
from deltaport.lab.config import LabConfig, config_hash
from deltaport.lab.family import build_family, family_exists, world_of
from deltaport.lab.steps import CachedLibrary
from deltaport.lab.store import wall_seconds, write_text
from deltaport.lab.world import COLORS, N_SHOTS, World, make_tokenizer, sft_records, write_eval_tasks

CHANCE = 1 / len(COLORS)
#: 2: ``backends`` (results.json) and ``iterative.backend`` removed - every step runs through the library
RESULTS_SCHEMA = 2
#: the design (docs/lab.md, "Design v5") a run of this code follows; results.json → ``design``
LAB_DESIGN = 5


class Progress:
    """Progress on stderr: rich bars (``enabled=True``, a terminal), plain status lines (``"lines"``: a
    redirected log gets one line when a stage starts, about every 30 s while it runs, and when it ends),
    or nothing (``False``)."""

    def __init__(self, enabled: bool | str):
        self.enabled = enabled
        self._bars = None
        self._tasks: dict[str, Any] = {}
        self._said: dict[str, float | str] = {}

    def __enter__(self):
        if self.enabled is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._bars.__enter__()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def _line(self, msg: str, now: float) -> None:
        sys.stderr.write(f"[{now - self._start:5.0f} s] {msg}\n")
        sys.stderr.flush()

    def bar(self, label: str, done: int, total: int) -> None:
        if self.enabled == "lines":
            now, last = time.monotonic(), self._said.get(label)
            finished = done >= total
            if last != "done" and (last is None or finished or now - last >= 30):
                self._line(f"{label}: {done}/{total}", now)
                self._said[label] = "done" if finished else now
            return
        if self._bars is None:
            return
        if label not in self._tasks:
            self._tasks[label] = self._bars.add_task(label, total=total)
        self._bars.update(self._tasks[label], completed=done, total=total)

    def note(self, msg: str) -> None:
        if self._bars is not None:
            self._bars.console.log(msg)
        elif self.enabled == "lines":
            self._line(msg, time.monotonic())


@dataclasses.dataclass
class Lab:
    """What the pipeline has built so far, shared by its steps.

    Inputs: the config, the world and its fine-tuning records, the cached library calls, the family's
    model directories. Filled in step by step: ``models`` (every fine-tuned or merged model, by report
    name), ``scores`` (``{name: {"known", "new", "heldout"}}``), ``items`` / ``items_fewshot`` (per-item
    correctness on the held-out items, for the intervals) and ``curves`` (``{name: [(step, score)]}``).
    """

    cfg: LabConfig
    world: World
    sft: list[dict]
    """the fine-tuning records: chat turns of the SFT facts, language a"""
    lib: CachedLibrary
    family: dict[str, Path]
    run_dir: Path
    note: Callable[[str], None]
    models: dict[str, Path] = dataclasses.field(default_factory=dict)
    scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    items: dict[str, str] = dataclasses.field(default_factory=dict)
    items_fewshot: dict[str, str] = dataclasses.field(default_factory=dict)
    curves: dict[str, list] = dataclasses.field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        return list(self.cfg.versions)

    @property
    def targets(self) -> list[str]:
        """Every base a Δ is added to: the versions, Mx (another seed) and M0 (random init)."""
        return self.versions + ["Mx", "M0"]

    @property
    def recipe(self) -> dict:
        """steps, lr and batch size of every fine-tune."""
        f = self.cfg.finetune
        return dict(steps=f.steps, lr=f.lr, batch_size=f.batch_size)

    def score(self, named: dict[str, Path], lang: str = "a") -> dict[str, dict[str, float]]:
        """``{name: {"known", "new", "heldout"}}`` for models on the language-``lang`` held-out items; the
        language-a scores and per-item answers are also kept in ``scores`` / ``items``."""
        suffix = "" if lang == "a" else "_b"
        known_task, new_task = f"lab_known{suffix}", f"lab_new{suffix}"
        limit = self.cfg.eval_limit
        measured = self.lib.exact_match(named, [known_task, new_task], limit=limit)
        n_known = min(len(self.world.known), limit or len(self.world.known))
        n_new = min(len(self.world.new), limit or len(self.world.new))
        out = {}
        for name, by_task in measured.items():
            known, new = by_task[known_task], by_task[new_task]
            out[name] = {"known": known, "new": new, "heldout": (known * n_known + new * n_new) / (n_known + n_new)}
        if lang == "a":
            self.scores.update(out)
            for name in measured:
                known, new = self.lib.items.get((name, known_task)), self.lib.items.get((name, new_task))
                if known is not None and new is not None:
                    self.items[name] = known + new
        return out

    def score_fewshot(self, named: dict[str, Path]) -> dict[str, float]:
        """Held-out exact match after N_SHOTS solved examples in context (bases scored few-shot)."""
        measured = self.lib.exact_match(named, ["lab_heldout_fs"], limit=self.cfg.eval_limit)
        for name in measured:
            if (name, "lab_heldout_fs") in self.lib.items:
                self.items_fewshot[name] = self.lib.items[(name, "lab_heldout_fs")]
        return {name: by_task["lab_heldout_fs"] for name, by_task in measured.items()}

    def delta(self, v: str) -> Path:
        """Δ_v = FT(M_v) − M_v."""
        return self.lib.delta(self.family[v], self.models[f"FT({v})"], delta_label(v))

    def transfer(self, target: str, source: str) -> Path:
        """M_target + Δ_source (kept in ``models`` as ``"M5+Δ4"``)."""
        path = self.lib.apply(self.delta(source), self.family[target], f"{target}+{delta_label(source)}")
        self.models[transfer_name(target, source)] = path
        return path


def run_lab(cfg: LabConfig, run_dir: str | Path, *, progress: bool | str = False, resume: bool = True,
            noise_twin: bool | None = None) -> dict:
    """Run the lab described by ``cfg`` into ``run_dir``; returns the results dict (also in results.json).

    Args:
        cfg: a :class:`~deltaport.lab.config.LabConfig` (see :func:`~deltaport.lab.config.load_config`).
        run_dir: output directory; created if missing. Existing finished artifacts whose content key
            matches are reused (a killed run resumes).
        progress: ``True`` for rich progress bars on stderr, ``"lines"`` for plain status lines (a
            redirected log), ``False`` for nothing.
        resume: if False, refuse a non-empty ``run_dir`` made by another config.
        noise_twin: also run the seed's noise twin into ``run_dir/twin`` (:mod:`deltaport.lab.noise`) and
            record every claim's and score's noise spread (``results.json`` → ``noise_twin``,
            ``claims[].noise_spread``); default: the config's ``noise_twin``.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    _claim_run_dir(cfg, run_dir, resume)
    _quiet_libraries(cfg.threads)
    with Progress(progress) as shown:
        # 1. data: the world, its tokenizer, the evaluation tasks
        world, tokenizer, tasks = prepare_data(cfg, run_dir)
        # 2. family: M0, M1..M5, Mx pretrained from scratch (or reused)
        family_reused = family_exists(cfg, run_dir / "family")
        family_start = time.perf_counter()
        family = build_family(cfg, run_dir / "family", progress=shown.bar)
        family_seconds = time.perf_counter() - family_start
        lib = CachedLibrary(run_dir, tokenizer, tasks, seed=cfg.seed, tick=_counter(cfg, shown))
        lib.reused["family"] = int(family_reused)
        lab = Lab(cfg, world, sft_records(world), lib, family, run_dir, shown.note)
        results = _header(lab)
        # 3. fine-tunes: FT(M_v) of every version; bases and fine-tunes scored
        results.update(finetune_versions(lab))
        # 4. experiments: one section of report.md each, in the report's order
        wanted = set(cfg.experiments)
        if wanted & {"recovery", "backport"}:
            wanted.add("grid")  # both read the grid's scores
        for name, experiment in experiments.IN_REPORT_ORDER.items():
            if name in wanted:
                results[name] = experiment(lab)
    results.update(_collected(lab))
    timings = {"family": family_seconds, **{f"steps.{k}": round(v, 2) for k, v in lib.timings.items()},
               "total": time.perf_counter() - started}
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    results["timings_s"]["passes"] = [*_earlier_passes(run_dir), results["timings_s"]["total"]]
    from deltaport.lab.env import environment

    results["environment"] = environment()
    results["cache"] = dict(lib.reused)
    results["item_scorer_max_mismatch"] = lib.item_mismatch
    if cfg.noise_twin if noise_twin is None else noise_twin:
        from deltaport.lab.noise import twin_config, twin_record

        twin = run_lab(twin_config(cfg), run_dir / "twin", progress=progress, resume=resume, noise_twin=False)
        _quiet_libraries(cfg.threads)  # the twin ran at its own thread count
        results["noise_twin"] = twin_record(results, twin, run_dir / "twin")
        results["timings_s"]["twin_total"] = wall_seconds(twin)
    # 5. report: results.json, figures/, report.md
    from deltaport.lab.report import write_outputs

    write_outputs(results, run_dir)
    return results


def _earlier_passes(run_dir: Path) -> list[float]:
    """Wall seconds of every earlier pass over ``run_dir`` (a resumed run finds its artifacts cached, so its
    own ``total`` is seconds, not the minutes the run cost): from the results.json an earlier pass wrote."""
    try:
        t = json.loads((run_dir / "results.json").read_text()).get("timings_s", {})
    except (OSError, ValueError):
        return []
    return list(t.get("passes", [t["total"]] if "total" in t else []))


def prepare_data(cfg: LabConfig, run_dir: Path) -> tuple[World, Any, dict[str, Path]]:
    """The synthetic world of ``cfg.seed``, its word-level tokenizer and the lm-eval tasks (``run_dir/tasks``)."""
    world = world_of(cfg)
    tokenizer = make_tokenizer(world)
    tasks = write_eval_tasks(world, tokenizer, run_dir / "tasks", langs=("a", "b"))
    return world, tokenizer, tasks


def finetune_versions(lab: Lab) -> dict:
    """FT(M_v) for every version (with a convergence curve where transfer-then-finetune compares to it),
    every base and fine-tune scored, the bases also few-shot; and the invariant M_i + Δ_i == FT(M_i)."""
    lab.note("scoring bases, fine-tuning every version")
    cfg = lab.cfg
    curve_targets = {t for t, _ in cfg.curve_pairs} if "transfer_then_finetune" in cfg.experiments else set()
    for v in lab.versions:
        curved = v in curve_targets
        path, curve = lab.lib.finetune(lab.family[v], lab.sft, f"FT-{v}", curve_task="lab_heldout" if curved else None,
                                       curve_every=cfg.finetune.curve_every, **lab.recipe)
        if curved:
            lab.curves[f"FT({v})"] = curve
        lab.models[f"FT({v})"] = path
    lab.score({n: lab.family[n] for n in lab.targets})
    lab.score({f"FT({v})": lab.models[f"FT({v})"] for v in lab.versions})
    fewshot = {"n_shots": N_SHOTS, "task": "lab_heldout_fs",
               "base": lab.score_fewshot({n: lab.family[n] for n in lab.targets})}
    identity = {}
    for v in lab.versions:
        merged, finetuned = _tensors(lab.transfer(v, v)), _tensors(lab.models[f"FT({v})"])
        identity[v] = sorted(merged) == sorted(finetuned) and all(bool((merged[k] == finetuned[k]).all())
                                                                  for k in merged)
    return {"fewshot": fewshot, "invariants": {"identity_Mi_plus_Di_equals_FT": identity}}


# ---------------------------------------------------------------------------------------------- plumbing
def _claim_run_dir(cfg: LabConfig, run_dir: Path, resume: bool) -> None:
    """Create ``run_dir`` and write ``lab_config.json``; without ``resume`` refuse a run dir of another config."""
    from deltaport.errors import OutputError

    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / "lab_config.json"
    digest = config_hash(cfg.to_dict())
    if marker.exists() and not resume:
        old = json.loads(marker.read_text())
        if old.get("hash") != digest:
            raise OutputError(f"{run_dir} holds a lab run of another config ({old.get('name')}); "
                              "choose another -o directory or pass --resume to reuse its artifacts")
    write_text(marker, json.dumps({"name": cfg.name, "hash": digest, "config": cfg.to_dict()}, indent=1))


def _quiet_libraries(threads: int) -> None:
    """Offline, ``threads`` torch threads, no transformers progress bars or warnings."""
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(max(1, threads))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _counter(cfg: LabConfig, shown: Progress) -> Callable[[str], None]:
    """The "experiments" bar: one tick per computed step, out of a rough count (progress only)."""
    n = len(cfg.versions)
    total = n + 2 + n * (n - 1) + 2 * n
    done = [0]

    def tick(label: str) -> None:
        done[0] += 1
        shown.bar("experiments", min(done[0], total), total)

    return tick


def _header(lab: Lab) -> dict[str, Any]:
    """results.json's description of the run: config, seeds, items, the family and its provenance."""
    cfg = lab.cfg
    return {"schema": RESULTS_SCHEMA, "design": LAB_DESIGN, "name": cfg.name, "config": cfg.to_dict(),
            "seeds": {"world": cfg.seed, "M1-M5": cfg.seed, "Mx": cfg.seed + 1000, "M0": cfg.seed + 2000,
                      "finetune": cfg.seed, "eval": cfg.seed},
            "chance": CHANCE,
            "n_items": {"sft": len(lab.world.sft), "known": len(lab.world.known), "new": len(lab.world.new)},
            "family": {n: str(p) for n, p in lab.family.items()},
            "family_provenance": {n: json.loads((p / "lab_provenance.json").read_text())
                                  for n, p in lab.family.items()}}


def _collected(lab: Lab) -> dict[str, Any]:
    """What every step added to ``lab``: scores, per-item answers, model paths, curves."""
    return {"scores": lab.scores,
            "items": {"heldout": lab.items, "heldout_fewshot": lab.items_fewshot,
                      "order": "known items then new items, as tasks/lab_known.jsonl + tasks/lab_new.jsonl"},
            "models": {n: str(p) for n, p in lab.models.items()},
            "curves": {k: [list(x) for x in c] for k, c in lab.curves.items()}}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
