"""Iterative recycling-then-finetuning (paper §6, Algorithm 1) and its baselines, resumable.

A chain file (YAML) names base versions M1..Mn, the fine-tuning data and recipe, the eval tasks and the
strategies::

    versions: [m1/, m2/, m3/]            # or [{name: M1, path: m1/}, ...]; paths relative to this file
    data: sft.jsonl
    finetune: {recipe: quick, steps: 200, lr: 1e-4, batch_size: 8, eval_every: 50}
    eval: {tasks: [tiny_qa.yaml], limit: null, protocol: base}
    strategies: [iterative, direct, plain, transfer-only]

Strategies (M*_i is the strategy's model for version i):

* ``plain``:         M*_i = FT(M_i)
* ``direct``:        M*_i = FT(M_i + Δ_{i-1}),  Δ_{i-1} = FT(M_{i-1}) − M_{i-1}   (Δ^dir, paper §5)
* ``iterative``:     M*_1 = FT(M_1);  M*_i = FT(M_i + Δ^iter_{i-1}),  Δ^iter_{i-1} = M*_{i-1} − M_{i-1}
* ``transfer-only``: M_i + Δ_{i-1}, no training (vanilla recycling, paper §2)

Models are named by what they are, so shared work is done once: ``FT(M1)`` is M*_1 of every strategy,
and for i = 2 ``direct`` and ``iterative`` are the same model (Δ^iter_1 = Δ_1), as the paper notes.
Every model, delta and evaluation is a folder/file under RUN_DIR written atomically (temporary sibling,
then rename) with its provenance; ``resume=True`` skips everything already there, so a killed run
continues where it stopped and never recomputes a finished step. With ``finetune.save_every`` the
trainer state is saved every N steps, so even a fine-tune killed half-way continues from its last save.

RUN_DIR layout::

    chain.json            the resolved chain (resume refuses a different one)
    models/<id>/          fine-tuned models and initialisations (HF model dirs + deltaport.json)
    deltas/<id>/          Δ = M* − M (deltaport diff dirs)
    evals/<id>.json       evaluation of each model
    steps.jsonl           one line per completed step (what, when, how long)
    results.json          every score, per strategy and version; table.md (paper Table 6 style)
    curves_<strategy>.png convergence curves per strategy (a line per version), from finetune.eval_every
    curves_<version>.png  the strategies compared on one version (paper Fig. 4: Δ^iter vs Δ^dir)

Under ``torchrun`` / ``accelerate launch`` (several processes), rank 0 walks the chain and alone does the
diffs, applies and every write of RUN_DIR; each fine-tuning step and each evaluation runs in every
process (rank 0 sends the other ranks each call's arguments; :func:`deltaport.finetune.finetune` and
:func:`deltaport.evaluate` share the work, and rank 0 writes their results).
A chain with ``finetune.eval_every`` is refused there, as ``finetune`` refuses it.

Over ~500 lines because it is one resumable workflow: the chain file's checks, the four strategies'
model graph, and the table and figures of its results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import InputError, OutputError
from deltaport.options import EVOLVE, EvolveOptions, declared

LOG = logging.getLogger(__name__)

STRATEGIES = ("iterative", "direct", "plain", "transfer-only")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FT_KEYS = {"recipe", "steps", "lr", "batch_size", "lora", "eval_every", "eval_limit", "seed", "max_seq_length",
            "save_every", "micro_batch_size", "lora_r", "lora_alpha", "chat_template", "logging_steps"}
_EVAL_KEYS = {"tasks", "limit", "protocol", "batch_size", "num_fewshot", "preset"}


@dataclass
class Chain:
    versions: list[tuple[str, str]]  # (name, path or hub id)
    data: str
    finetune: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    device: str | None = None

    def as_dict(self) -> dict:
        return {"versions": [{"name": n, "path": p} for n, p in self.versions], "data": self.data,
                "finetune": self.finetune, "eval": self.eval, "strategies": self.strategies}


def load_chain(chain) -> Chain:
    """Parse and validate a chain (path to YAML/JSON or a dict); report every problem at once."""
    base = Path(".")
    if isinstance(chain, (str, Path)):
        p = Path(chain)
        if not p.is_file():
            raise InputError(f"chain file {p} not found")
        import yaml

        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"chain file {p} is not valid YAML: {exc}") from None
        base = p.parent
    else:
        raw = dict(chain)
    if not isinstance(raw, dict):
        raise InputError("a chain must be a mapping with versions, data, finetune, eval, strategies")
    errors: list[str] = []

    def local(v: str) -> str:
        q = Path(str(v)).expanduser()
        if not q.is_absolute() and (base / q).exists():
            return str((base / q).resolve())
        return str(q.resolve()) if q.exists() else str(v)

    versions = []
    for i, v in enumerate(raw.get("versions") or []):
        if isinstance(v, dict):
            name, path = str(v.get("name") or f"M{i + 1}"), v.get("path")
        else:
            name, path = f"M{i + 1}", v
        if not path:
            errors.append(f"versions[{i}]: needs a path")
            continue
        if not _NAME.match(name):
            errors.append(f"versions[{i}]: name {name!r} must be letters, digits, '.', '_' or '-'")
        versions.append((name, local(path)))
    if len(versions) < 2:
        errors.append("versions: list at least two base versions M1, M2, ... in release order")
    if len({n for n, _ in versions}) != len(versions):
        errors.append("versions: names must be distinct")
    data = raw.get("data")
    if not data:
        errors.append("data: the fine-tuning data (jsonl path or hub dataset) is required")
    finetune_opts = dict(raw.get("finetune") or {})
    bad = sorted(set(finetune_opts) - _FT_KEYS)
    if bad:
        errors.append(f"finetune: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(_FT_KEYS))}")
    eval_opts = dict(raw.get("eval") or {})
    bad = sorted(set(eval_opts) - _EVAL_KEYS)
    if bad:
        errors.append(f"eval: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(_EVAL_KEYS))}")
    if not eval_opts.get("tasks") and not eval_opts.get("preset"):
        errors.append("eval: give tasks (lm-eval names or task YAML paths) or a preset")
    tasks = eval_opts.get("tasks") or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    eval_opts["tasks"] = [local(t) if str(t).endswith((".yaml", ".yml")) else t for t in tasks]
    strategies = raw.get("strategies") or list(STRATEGIES)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        errors.append(f"strategies: unknown {', '.join(map(str, bad))}; known: {', '.join(STRATEGIES)}")
    extra = sorted(set(raw) - {"versions", "data", "finetune", "eval", "strategies", "device"})
    if extra:
        errors.append(f"unknown top-level key(s) {', '.join(extra)}")
    if errors:
        raise InputError("chain is not valid:\n  - " + "\n  - ".join(errors))
    return Chain(versions=versions, data=local(data), finetune=finetune_opts, eval=eval_opts,
                 strategies=list(strategies), device=raw.get("device"))


# --------------------------------------------------------------------------------------------------
# the plan: every model named by what it is


def ft_id(model_id: str) -> str:
    return f"FT({model_id})"


def init_id(version: str, source_ft: str) -> str:
    """M_i + Δ, where Δ = source_ft − (the base source_ft was trained from)."""
    return f"{version}+Δ[{source_ft}]"


def strategy_models(chain: Chain) -> dict[str, dict[str, str]]:
    """{strategy: {version name: model id}} — Algorithm 1 and the baselines, as model ids."""
    names = [n for n, _ in chain.versions]
    out: dict[str, dict[str, str]] = {}
    for s in chain.strategies:
        row: dict[str, str] = {}
        if s == "plain":
            row = {n: ft_id(n) for n in names}
        elif s == "direct":
            row = {names[0]: ft_id(names[0])}
            for i in range(1, len(names)):
                row[names[i]] = ft_id(init_id(names[i], ft_id(names[i - 1])))
        elif s == "iterative":
            row = {names[0]: ft_id(names[0])}
            for i in range(1, len(names)):
                row[names[i]] = ft_id(init_id(names[i], row[names[i - 1]]))
        elif s == "transfer-only":
            for i in range(1, len(names)):
                row[names[i]] = init_id(names[i], ft_id(names[i - 1]))
        out[s] = row
    return out


def slug(model_id: str) -> str:
    """Folder name for a model id: readable, filesystem-safe (Δ -> d, [] -> ())."""
    s = model_id.replace("Δ", "d").replace("[", "(").replace("]", ")")
    if len(s) > 200:  # very long chains: keep it unique and short
        s = s[:150] + "~" + hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return s


def _parse(model_id: str, versions: dict[str, str]) -> tuple[str, Any]:
    """('base', name) | ('ft', inner_id) | ('init', (version, source_ft_id))."""
    if model_id in versions:
        return "base", model_id
    if model_id.startswith("FT(") and model_id.endswith(")"):
        return "ft", model_id[3:-1]
    m = re.match(r"^([^+\[\]()]+)\+Δ\[(.*)\]$", model_id)
    if m:
        return "init", (m.group(1), m.group(2))
    raise InputError(f"internal: cannot parse model id {model_id!r}")  # pragma: no cover


def base_of(model_id: str, versions: dict[str, str]) -> str:
    """The raw base version a model descends from (FT(M2+Δ[...])) -> M2)."""
    kind, arg = _parse(model_id, versions)
    if kind == "base":
        return arg
    if kind == "ft":
        return base_of(arg, versions)
    return arg[0]


# --------------------------------------------------------------------------------------------------
# the runner


class _Runner:
    def __init__(self, chain: Chain, run_dir: Path, progress: bool):
        self.chain = chain
        self.run = run_dir
        self.versions = dict(chain.versions)
        self.progress = progress
        self.computed: list[str] = []  # steps done by this call (tests and the summary use it)

    # paths
    def model_dir(self, model_id: str) -> Path:
        kind, arg = _parse(model_id, self.versions)
        if kind == "base":
            return Path(self.versions[arg])
        return self.run / "models" / slug(model_id)

    def delta_dir(self, ft_model: str) -> Path:
        return self.run / "deltas" / slug(ft_model)

    def eval_path(self, model_id: str) -> Path:
        return self.run / "evals" / f"{slug(model_id)}.json"

    def _log_step(self, what: str, kind: str, t0: float, **info) -> None:
        self.computed.append(what)
        rec = {"step": what, "kind": kind, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "time_s": round(time.time() - t0, 3), **info}
        with open(self.run / "steps.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        LOG.info("evolve: %s done in %.1fs", what, rec["time_s"])

    # steps
    def ensure_model(self, model_id: str) -> Path:
        kind, arg = _parse(model_id, self.versions)
        out = self.model_dir(model_id)
        if kind == "base" or out.is_dir():
            return out
        if kind == "ft":
            init = self.ensure_model(arg)
            self._finetune(init, out, model_id)
        else:
            version, source_ft = arg
            delta = self.ensure_delta(source_ft)
            import deltaport

            t0 = time.time()
            deltaport.apply(delta, self.versions[version], out, progress=self.progress)
            self._log_step(model_id, "apply", t0, delta=str(delta), to=self.versions[version], output=str(out))
        return out

    def ensure_delta(self, ft_model: str) -> Path:
        """Δ = ft_model − the raw base it descends from (Δ^iter when ft_model is an iterative M*)."""
        out = self.delta_dir(ft_model)
        if out.is_dir():
            return out
        finetuned = self.ensure_model(ft_model)
        base = self.versions[base_of(ft_model, self.versions)]
        import deltaport

        t0 = time.time()
        deltaport.diff(base, finetuned, out, progress=self.progress)
        self._log_step(f"Δ[{ft_model}]", "diff", t0, base=base, finetuned=str(finetuned), output=str(out))
        return out

    def _finetune(self, init: Path, out: Path, model_id: str) -> None:
        from deltaport.finetune import finetune

        finetune_opts = dict(self.chain.finetune)
        eval_opts = self.chain.eval
        eval_every = finetune_opts.pop("eval_every", None)
        eval_limit = finetune_opts.pop("eval_limit", eval_opts.get("limit"))
        if finetune_opts.get("save_every"):  # trainer state every save_every steps: a killed fine-tune resumes
            finetune_opts.update(resume=True, work_dir=self.run / "work" / slug(model_id))
        t0 = time.time()
        kwargs = dict(eval_every=eval_every, eval_tasks=eval_opts.get("tasks") if eval_every else None,
                      eval_limit=eval_limit, eval_protocol=eval_opts.get("protocol", "base"),
                      device=self.chain.device, **finetune_opts)
        _send_to_workers(("finetune", (str(init), self.chain.data, str(out)), kwargs))
        res = finetune(str(init), self.chain.data, out, progress=self.progress, **kwargs)
        last = res.log[-1]["loss"] if res.log else None
        self._log_step(model_id, "finetune", t0, init=str(init), output=str(out), final_loss=last)

    def ensure_eval(self, model_id: str) -> dict:
        p = self.eval_path(model_id)
        if p.is_file():
            return json.loads(p.read_text())
        from deltaport.evaluation import evaluate
        from deltaport.io.atomic import write_json

        d = self.ensure_model(model_id)
        eval_opts = self.chain.eval
        t0 = time.time()
        kwargs = dict(limit=eval_opts.get("limit"), device=self.chain.device or "auto",
                      batch_size=eval_opts.get("batch_size", 8), protocol=eval_opts.get("protocol", "base"),
                      num_fewshot=eval_opts.get("num_fewshot"), preset=eval_opts.get("preset"),
                      cache_dir=self.run / "eval_cache")
        _send_to_workers(("evaluate", ({model_id: str(d)}, eval_opts.get("tasks")), kwargs))
        res = evaluate({model_id: str(d)}, eval_opts.get("tasks"), progress=self.progress, **kwargs)
        write_json(p, res)
        self._log_step(f"eval {model_id}", "eval", t0, model=str(d), output=str(p))
        return res


@declared(EvolveOptions)
def run_chain(chain, run_dir, *, resume: bool = EVOLVE.resume, progress: bool = False) -> dict:
    """Run (or resume) every strategy of ``chain`` under ``run_dir``; return the results (also in results.json).

    ``chain``: a CHAIN.yaml path or a dict (:func:`load_chain`); ``run_dir``: the run directory (``-o``);
    ``progress``: draw progress bars.

    Returns ``{"strategies": {strategy: {version: model id}}, "scores": {model id: {task: metrics}},
    "table": markdown, "curves": {strategy: png path}, "computed": [steps done by this call], ...}``.
    """
    from deltaport.devices import process_rank

    rank, world = process_rank()
    if world > 1 and rank != 0:
        return _work_for_rank0(chain)
    c = load_chain(chain)
    run = Path(run_dir).absolute()
    chain_json = json.dumps(dict(c.as_dict(), inputs=_input_fingerprints(c)), sort_keys=True, indent=2)
    if run.exists() and any(run.iterdir()):
        if not resume:
            raise OutputError(f"run directory {run} exists and is not empty; pass --resume to continue that run "
                              "or choose another directory")
        prev = run / "chain.json"
        cur = json.loads(chain_json)
        before = json.loads(prev.read_text()) if prev.is_file() else None
        if before is not None and "inputs" not in before:  # run dirs written before input hashes were kept
            cur.pop("inputs")
        if before is not None and before != cur:
            raise InputError(f"{run} was started with a different chain or different data/task files (see {prev}); "
                             "resume needs the same chain — use a new run directory for a changed chain")
    from deltaport.io.checkpoint import resolve_dir
    from deltaport.io.model_check import check_weights

    for _, p in c.versions:  # every base readable (headers only; hub ids resolve) before anything is written
        check_weights(resolve_dir(p)[0])
    fresh = not run.exists()
    try:
        out = _run(c, run, chain_json, progress)
        _send_to_workers(None)  # done: the other ranks return
        return out
    except BaseException:  # the other ranks wait in _work_for_rank0; the launcher stops them when rank 0 fails
        if fresh and not (run / "steps.jsonl").exists():  # nothing finished: leave no half-made run dir
            import shutil

            shutil.rmtree(run, ignore_errors=True)
        raise


def _run(c: Chain, run: Path, chain_json: str, progress: bool) -> dict:
    from deltaport.devices import process_rank
    from deltaport.io.atomic import atomic_write_file, write_json

    if process_rank()[1] > 1:
        _rendezvous(c.device)

    run.mkdir(parents=True, exist_ok=True)
    atomic_write_file(run / "chain.json", lambda tmp: tmp.write_text(chain_json + "\n"), overwrite=True)
    # a step killed mid-write left a temporary sibling; atomic_output_dir removes it when the step reruns
    r = _Runner(c, run, progress)
    plan = strategy_models(c)
    names = [n for n, _ in c.versions]
    # order: per version, so an interrupted run has complete early columns
    todo: list[str] = []
    for n in names:
        todo.append(n)
        for s in c.strategies:
            if n in plan[s]:
                todo.append(plan[s][n])
    scores: dict[str, dict] = {}
    for model_id in dict.fromkeys(todo):
        res = r.ensure_eval(model_id)
        scores[model_id] = res["results"][model_id]
    columns = res["columns"]
    out = {
        "chain": c.as_dict(),
        "strategies": plan,
        "scores": scores,
        "columns": columns,
        "curves_data": _curves_data(r, plan),
        "computed": r.computed,
    }
    out["table"] = strategy_table(out)
    out["curves"] = _plot_curves(out, run)
    write_json(run / "results.json", out)
    atomic_write_file(run / "table.md", lambda tmp: tmp.write_text(out["table"]), overwrite=True)
    return out


def _rendezvous(device: str | None) -> None:
    """Join the launch's process group (gloo on CPU processes, as finetune's trainer will)."""
    from accelerate import PartialState

    from deltaport.devices import release_at_exit, resolve_device

    PartialState(cpu=resolve_device(device) == "cpu")
    release_at_exit()


def _send_to_workers(call) -> None:
    """Rank 0 of a multi-process launch: hand every other rank the next call, ``(name, args, kwargs)`` of
    ``finetune`` or ``evaluate`` (None: done)."""
    from deltaport.devices import process_rank

    if process_rank()[1] == 1:
        return
    from accelerate.utils import broadcast_object_list

    broadcast_object_list([call], from_process=0)


def _work_for_rank0(chain) -> dict:
    """A rank other than 0: take part in each fine-tuning and evaluation rank 0 sends, until it says done.
    Returns ``{"rank": R, "computed": [(name, args) of each call]}``; rank 0 alone returns the results."""
    from accelerate.utils import broadcast_object_list

    from deltaport.evaluation import evaluate
    from deltaport.finetune import finetune

    c = load_chain(chain)
    _rendezvous(c.device)
    computed = []
    while True:
        msg = [None]
        broadcast_object_list(msg, from_process=0)
        if msg[0] is None:
            return {"rank": _rank(), "computed": computed}
        name, args, kwargs = msg[0]
        {"finetune": finetune, "evaluate": evaluate}[name](*args, **kwargs)
        computed.append((name, args))


def _rank() -> int:
    from deltaport.devices import process_rank

    return process_rank()[0]


def _input_fingerprints(c: Chain) -> dict:
    """sha256 of the local data and task files: resuming over changed data would mix two experiments."""
    out = {}
    for p in [c.data, *[t for t in c.eval.get("tasks", []) if str(t).endswith((".yaml", ".yml"))]]:
        q = Path(str(p))
        if q.is_file():
            h = hashlib.sha256(q.read_bytes())
            if q.suffix in (".yaml", ".yml"):  # a task's data files sit beside it
                for f in sorted(q.parent.glob("*.json*")):
                    h.update(f.name.encode() + b"\0" + f.read_bytes())
            out[str(p)] = h.hexdigest()
    return out


def _curves_data(r: _Runner, plan: dict) -> dict:
    data: dict[str, dict[str, list]] = {}
    for s, row in plan.items():
        for v, mid in row.items():
            if not mid.startswith("FT("):
                continue
            p = r.model_dir(mid) / "evals.json"
            if p.is_file():
                data.setdefault(s, {})[v] = json.loads(p.read_text())
    return data


def _primary(columns: dict, task: str, metrics: dict) -> str | None:
    from deltaport.evaluation.results import primary_metric as prim

    return prim(metrics, (columns.get(task) or {}).get("metric"))


_ROW_LABEL = {"direct": "+ Δ^dir → FT", "iterative": "+ Δ^iter → FT", "plain": "FT(M_i)",
              "transfer-only": "+ Δ (no FT)"}


def strategy_table(out: dict) -> str:
    """Paper Table 6 style: per task, rows = base and strategies, columns = versions, cell = score (gain)."""
    versions = [v["name"] for v in out["chain"]["versions"]]
    scores, plan, columns = out["scores"], out["strategies"], out.get("columns") or {}
    tasks = list(columns) or sorted({t for s in scores.values() for t in s})
    blocks = []
    for t in tasks:
        metric = None
        for s in scores.values():
            if t in s:
                metric = _primary(columns, t, s[t])
                break

        def val(mid):
            v = scores.get(mid, {}).get(t, {}).get(metric) if mid else None
            return None if v is None else 100.0 * v if 0.0 <= v <= 1.0 else v

        lines = [f"**{(columns.get(t) or {}).get('label') or t}** ({metric}; ×100 where in [0, 1]; "
                 "subscript-style numbers in parentheses are the gain over the raw base)", "",
                 "| | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
        lines.append("| base | " + " | ".join(_fmt(val(v), None) for v in versions) + " |")
        for s in ("direct", "iterative", "plain", "transfer-only"):
            if s not in plan:
                continue
            cells = []
            for v in versions:
                mid = plan[s].get(v)
                shared = s in ("direct", "iterative") and v == versions[0]
                cells.append("—" if mid is None or shared else _fmt(val(mid), val(v)))
            lines.append(f"| {_ROW_LABEL[s]} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    note = ("For M1 every strategy is FT(M1); for M2 direct and iterative are the same model "
            "(Δ^iter_1 = Δ_1), as in the paper.")
    return "\n\n".join(blocks) + "\n\n" + note + "\n"


def _fmt(v, base) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" + (f" ({v - base:+.1f})" if base is not None else "")


_PLOT_LABEL = {"direct": r"$+\Delta^{dir}$ → FT", "iterative": r"$+\Delta^{iter}$ → FT", "plain": "FT($M_i$)"}


def _plot_curves(out: dict, run: Path) -> dict[str, str]:
    """curves_<strategy>.png (one line per version) and curves_<version>.png (one line per strategy, the
    paper's Fig. 4 comparison of Δ^iter and Δ^dir); returns {name: path}."""
    data = out["curves_data"]
    if not data:
        return {}
    from deltaport.figures import pyplot, save_figure

    plt = pyplot()
    columns = out.get("columns") or {}
    tasks = sorted({t for pv in data.values() for evs in pv.values() for e in evs for t in e["results"]})
    versions = [v["name"] for v in out["chain"]["versions"]]
    figures: dict[str, list[tuple[str, list]]] = {}
    for s, per_version in data.items():
        figures[s] = [(v, per_version[v]) for v in versions if v in per_version]
    for v in versions:
        lines = [(_PLOT_LABEL.get(s, s), data[s][v]) for s in data if v in data[s]]
        if len(lines) > 1:
            figures[v] = lines
    paths = {}
    for name, lines in figures.items():
        if not lines:
            continue
        fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.5 * max(1, len(tasks)), 3.4), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for label, evs in lines:
                pts = [(e["step"], e["results"][t]) for e in evs if t in e["results"]]
                if not pts:
                    continue
                metric = _primary(columns, t, pts[0][1])
                ax.plot([p[0] for p in pts], [p[1].get(metric) for p in pts], marker="o", label=label)
                ax.set_ylabel(metric)
            title = _PLOT_LABEL.get(name, name)
            ax.set_title(f"{title}: {(columns.get(t) or {}).get('label') or t}")
            ax.set_xlabel("fine-tuning step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = run / f"curves_{name}.png"
        save_figure(fig, p, dpi=100, bbox_inches=None)
        paths[name] = str(p)
    return paths
