"""``deltaport lab run``: the paper's controlled study (§3–§6) on the lab's tiny model family.

Top function: :func:`run_lab` - build the family, run the experiments the config lists, write
``results.json``, figures and ``report.md``. Every model operation goes through deltaport's library
(:mod:`deltaport.lab.steps`); everything is cached by content, so a rerun or a resumed run reuses
finished work.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from deltaport.lab.config import LabConfig, config_hash
from deltaport.lab.family import build_family, world_of
from deltaport.lab.steps import Steps
from deltaport.lab.world import (COLORS, N_SHOTS, Mix, make_tokenizer, sample_block, sft_records,
                                 write_eval_tasks)

LOG = logging.getLogger(__name__)
CHANCE = 1 / len(COLORS)
RESULTS_SCHEMA = 1


def _d(s: str) -> str:
    """Delta label of version ``s`` (ASCII, used in file names): ``M3`` -> ``D3``, ``Mx`` -> ``Dx``."""
    return "D" + s[1:]


class _Progress:
    """Progress on stderr: rich bars (``enabled=True``, a terminal), plain status lines (``"lines"``: a
    redirected log gets one line when a stage starts, about every 30 s while it runs, and when it ends),
    or nothing (``False``)."""

    def __init__(self, enabled: bool | str):
        self.enabled = enabled
        self._p = None
        self._tasks: dict[str, Any] = {}
        self._said: dict[str, float] = {}

    def __enter__(self):
        if self.enabled is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._p.__enter__()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def _line(self, msg: str, now: float) -> None:
        sys.stderr.write(f"[{now - self._t0:5.0f} s] {msg}\n")
        sys.stderr.flush()

    def bar(self, label: str, done: int, total: int) -> None:
        if self.enabled == "lines":
            now, last = time.monotonic(), self._said.get(label)
            finished = done >= total
            if last != "done" and (last is None or finished or now - last >= 30):
                self._line(f"{label}: {done}/{total}", now)
                self._said[label] = "done" if finished else now
            return
        if self._p is None:
            return
        if label not in self._tasks:
            self._tasks[label] = self._p.add_task(label, total=total)
        self._p.update(self._tasks[label], completed=done, total=total)

    def note(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.log(msg)
        elif self.enabled == "lines":
            self._line(msg, time.monotonic())


def run_lab(cfg: LabConfig, run_dir: str | Path, *, progress: bool | str = False, resume: bool = True) -> dict:
    """Run the lab described by ``cfg`` into ``run_dir``; returns the results dict (also in results.json).

    Args:
        cfg: a :class:`~deltaport.lab.config.LabConfig` (see :func:`~deltaport.lab.config.load_config`).
        run_dir: output directory; created if missing. Existing finished artifacts whose content key
            matches are reused (a killed run resumes).
        progress: ``True`` for rich progress bars on stderr, ``"lines"`` for plain status lines (a
            redirected log), ``False`` for nothing.
        resume: if False, refuse a non-empty ``run_dir`` made by another config.
    """
    import os

    import torch

    from deltaport.errors import OutputError

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / "lab_config.json"
    if marker.exists() and not resume:
        old = json.loads(marker.read_text())
        if old.get("hash") != config_hash(cfg.to_dict()):
            raise OutputError(f"{run_dir} holds a lab run of another config ({old.get('name')}); "
                              "choose another -o directory or pass --resume to reuse its artifacts")
    marker.write_text(json.dumps({"name": cfg.name, "hash": config_hash(cfg.to_dict()), "config": cfg.to_dict()},
                                 indent=1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(max(1, cfg.threads))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    world = world_of(cfg)
    tok = make_tokenizer(world)
    tasks = write_eval_tasks(world, tok, run_dir / "tasks", langs=("a", "b"))
    timings: dict[str, float] = {}
    with _Progress(progress) as prog:
        t0 = time.perf_counter()
        from deltaport.lab.family import family_exists

        fam_reused = family_exists(cfg, run_dir / "family")
        fam = build_family(cfg, run_dir / "family", progress=prog.bar)
        timings["family"] = time.perf_counter() - t0
        n_total = _count_units(cfg)
        done = [0]

        def tick(label: str) -> None:
            done[0] += 1
            prog.bar("experiments", min(done[0], n_total), n_total)

        st = Steps(run_dir, tok, tasks, seed=cfg.seed, tick=tick)
        st.reused["family"] = int(fam_reused)
        lab = _Lab(cfg, world, tok, st, fam, run_dir, prog)
        results = lab.run()
    timings.update({f"steps.{k}": round(v, 2) for k, v in st.timings.items()})
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    results["backends"] = st.backends
    from deltaport.lab.env import environment

    results["environment"] = environment()
    results["cache"] = dict(st.reused)
    results["item_scorer_max_mismatch"] = st.item_mismatch
    from deltaport.lab.report import write_outputs

    write_outputs(results, run_dir)
    return results


def _count_units(cfg: LabConfig) -> int:
    v = len(cfg.versions)
    n = v + 2 + v * (v - 1) + 2 * v  # FTs + evals, grid merges (rough: progress only)
    return n


class _Lab:
    def __init__(self, cfg: LabConfig, world, tok, st: Steps, fam: dict[str, Path], run_dir: Path, prog: _Progress):
        self.cfg, self.world, self.tok, self.st, self.fam, self.run_dir, self.prog = cfg, world, tok, st, fam, run_dir, prog
        f = cfg.finetune
        self.ft_kw = dict(steps=f.steps, lr=f.lr, batch_size=f.batch_size)
        self.records = sft_records(world)
        self.models: dict[str, Path] = {}
        self.scores: dict[str, dict[str, float]] = {}
        self.items: dict[str, str] = {}
        self.items_fs: dict[str, str] = {}
        n_known, n_new = len(world.known), len(world.new)
        self.n_known, self.n_new = n_known, n_new

    # ------------------------------------------------------------ basics
    def score(self, named: dict[str, Path], lang: str = "a") -> dict[str, dict[str, float]]:
        """``{name: {"known", "new", "heldout"}}`` for models (language ``lang`` tasks)."""
        sfx = "" if lang == "a" else "_b"
        tasks = [f"lab_known{sfx}", f"lab_new{sfx}"]
        raw = self.st.scores(named, tasks, limit=self.cfg.eval_limit)
        out = {}
        for n, r in raw.items():
            k, nw = r[tasks[0]], r[tasks[1]]
            nk = min(self.n_known, self.cfg.eval_limit or self.n_known)
            nn = min(self.n_new, self.cfg.eval_limit or self.n_new)
            out[n] = {"known": k, "new": nw, "heldout": (k * nk + nw * nn) / (nk + nn)}
        if lang == "a":
            self.scores.update(out)
            for n in raw:
                a, b = self.st.items.get((n, tasks[0])), self.st.items.get((n, tasks[1]))
                if a is not None and b is not None:
                    self.items[n] = a + b
        return out

    def score_fewshot(self, named: dict[str, Path]) -> dict[str, float]:
        """Held-out exact match after N_SHOTS solved examples in context (bases scored few-shot)."""
        raw = self.st.scores(named, ["lab_heldout_fs"], limit=self.cfg.eval_limit)
        for n in raw:
            if (n, "lab_heldout_fs") in self.st.items:
                self.items_fs[n] = self.st.items[(n, "lab_heldout_fs")]
        return {n: r["lab_heldout_fs"] for n, r in raw.items()}

    def ft(self, v: str, *, curve: bool = False) -> Path:
        """FT(M_v): plain fine-tuning of a base (with a convergence curve if asked)."""
        path, c = self.st.finetune(self.fam[v], self.records, f"FT-{v}", curve_task="lab_heldout" if curve else None,
                                   curve_every=self.cfg.finetune.curve_every, **self.ft_kw)
        if curve:
            self.curves[f"FT({v})"] = c
        self.models[f"FT({v})"] = path
        return path

    def delta(self, v: str) -> Path:
        return self.st.delta(self.fam[v], self.models[f"FT({v})"], _d(v))

    def merge(self, target: str, source: str) -> Path:
        name = f"{target}+{_d(source)}"
        p = self.st.apply(self.delta(source), self.fam[target], name)
        self.models[f"{target}+Δ{source[1:]}"] = p
        return p

    # ------------------------------------------------------------ experiments
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.curves: dict[str, list] = {}
        res: dict[str, Any] = {"schema": RESULTS_SCHEMA, "name": cfg.name, "config": cfg.to_dict(),
                               "seeds": {"world": cfg.seed, "M1-M5": cfg.seed, "Mx": cfg.seed + 1000,
                                         "M0": cfg.seed + 2000, "finetune": cfg.seed, "eval": cfg.seed},
                               "chance": CHANCE,
                               "n_items": {"sft": len(self.world.sft), "known": self.n_known, "new": self.n_new},
                               "family": {n: str(p) for n, p in self.fam.items()},
                               "family_provenance": {n: json.loads((p / "lab_provenance.json").read_text())
                                                     for n, p in self.fam.items()}}
        V = list(cfg.versions)
        curve_targets = {t for t, _ in cfg.curve_pairs} if "transfer_then_finetune" in cfg.experiments else set()
        # bases and plain fine-tunes
        self.prog.note("scoring bases, fine-tuning every version")
        for v in V:
            self.ft(v, curve=v in curve_targets)
        self.score({n: self.fam[n] for n in V + ["Mx", "M0"]})
        self.score({f"FT({v})": self.models[f"FT({v})"] for v in V})
        res["fewshot"] = {"n_shots": N_SHOTS, "task": "lab_heldout_fs",
                          "base": self.score_fewshot({n: self.fam[n] for n in V + ["Mx", "M0"]})}
        res["invariants"] = self.invariants(V)
        if "grid" in cfg.experiments or "recovery" in cfg.experiments or "backport" in cfg.experiments:
            res["grid"] = self.grid(V)
        if "recovery" in cfg.experiments:
            res["recovery"] = self.recovery(V)
        if "transfer_then_finetune" in cfg.experiments:
            res["transfer_then_finetune"] = self.transfer_then_finetune(V)
        if "iterative" in cfg.experiments:
            res["iterative"] = self.iterative(V)
        if "backport" in cfg.experiments:
            res["backport"] = self.backport(V)
        if "language" in cfg.experiments:
            res["language"] = self.language(V)
        if "connectivity" in cfg.experiments:
            res["connectivity"] = self.connectivity(V, res.get("recovery"))
        if "compression" in cfg.experiments:  # Δ bytes vs held-out score: deltaport.lab.compression
            from deltaport.lab.compression import frontier

            self.prog.note("compression: every transfer cell with a compressed Δ")
            res["compression"] = frontier(cfg.compression, self.st, {s: self.delta(s) for s in V},
                                          {t: self.fam[t] for t in V + ["Mx", "M0"]},
                                          lambda named: {n: x["heldout"] for n, x in self.score(named).items()},
                                          seed=cfg.seed)
        res["scores"] = self.scores
        res["items"] = {"heldout": self.items, "heldout_fewshot": self.items_fs,
                        "order": "known items then new items, as tasks/lab_known.jsonl + tasks/lab_new.jsonl"}
        res["models"] = {n: str(p) for n, p in self.models.items()}
        res["curves"] = {k: [list(x) for x in c] for k, c in self.curves.items()}
        return res

    def invariants(self, V: list[str]) -> dict:
        """Exact identity M_i + Δ_i == FT(M_i) (tensor-equal), and M0 + Δ at chance or below."""
        ident = {}
        for v in V:
            p = self.merge(v, v)
            a = _tensors(p)
            b = _tensors(self.models[f"FT({v})"])
            ident[v] = sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
        return {"identity_Mi_plus_Di_equals_FT": ident}

    def grid(self, V: list[str]) -> dict:
        self.prog.note("transfer grid: every M_t + Δ_s")
        cells: dict[str, dict[str, float]] = {}
        named = {}
        for t in V + ["Mx", "M0"]:
            for s in V:
                if s == t:
                    continue
                named[f"{t}+Δ{s[1:]}"] = self.merge(t, s)
        sc = self.score(named)
        for t in V + ["Mx", "M0"]:
            cells[t] = {s: sc[f"{t}+Δ{s[1:]}"]["heldout"] for s in V if s != t}
        return {"targets": V + ["Mx", "M0"], "sources": V, "metric": "heldout exact match", "cells": cells,
                "cells_known": {t: {s: sc[f"{t}+Δ{s[1:]}"]["known"] for s in V if s != t} for t in V + ["Mx", "M0"]},
                "cells_new": {t: {s: sc[f"{t}+Δ{s[1:]}"]["new"] for s in V if s != t} for t in V + ["Mx", "M0"]},
                "base": {t: self.scores[t]["heldout"] for t in V + ["Mx", "M0"]},
                "ft": {t: self.scores[f"FT({t})"]["heldout"] for t in V}}

    def recovery(self, V: list[str]) -> dict:
        """(score(M_t+Δ_s) − score(M_t)) / (score(FT(M_t)) − score(M_t)); None when FT gains < 0.05."""
        out: dict[str, dict[str, float | None]] = {}
        for t in V:
            base, ft = self.scores[t]["heldout"], self.scores[f"FT({t})"]["heldout"]
            out[t] = {}
            for s in V:
                if s == t:
                    continue
                m = self.scores[f"{t}+Δ{s[1:]}"]["heldout"]
                out[t][s] = (m - base) / (ft - base) if ft - base >= 0.05 else None
        return {"fraction": out, "min_ft_gain": 0.05}

    def transfer_then_finetune(self, V: list[str]) -> dict:
        self.prog.note("transfer-then-finetune vs plain fine-tuning")
        every = self.cfg.finetune.curve_every
        pairs = [tuple(p) for p in self.cfg.curve_pairs]
        table: dict[str, dict[str, float]] = {}
        steps_to: dict[str, Any] = {}
        for t, s in pairs:
            init = self.merge(t, s)
            path, c = self.st.finetune(init, self.records, f"FT-{t}+{_d(s)}", curve_task="lab_heldout",
                                       curve_every=every, **self.ft_kw)
            name = f"FT({t}+Δ{s[1:]})"
            self.models[name] = path
            self.curves[name] = c
        # the same fine-tune with half the step budget (its own linear schedule): the finding (c) statistic
        # "transfer-then-finetune with half the steps reaches plain FT's final score" is per item
        half = max(1, self.cfg.finetune.steps // 2)
        halves = {}
        for t, s in pairs:
            path, _ = self.st.finetune(self.merge(t, s), self.records, f"FThalf-{t}+{_d(s)}",
                                       **{**self.ft_kw, "steps": half})
            halves[f"FT½({t}+Δ{s[1:]})"] = path
            self.models[f"FT½({t}+Δ{s[1:]})"] = path
        sc_half = self.score(halves)
        if self.cfg.ttf_all_pairs:
            for t, s in itertools.permutations(V, 2):
                if (t, s) in pairs:
                    continue
                path, _ = self.st.finetune(self.merge(t, s), self.records, f"FT-{t}+{_d(s)}", **self.ft_kw)
                self.models[f"FT({t}+Δ{s[1:]})"] = path
        names = {n: p for n, p in self.models.items() if n.startswith("FT(") and "+Δ" in n}
        sc = self.score(names)
        for n in names:
            t, s = n[3:-1].split("+Δ")
            table.setdefault(t, {})[f"M{s}"] = sc[n]["heldout"]
        for t, s in pairs:
            plain = self.curves.get(f"FT({t})", [])
            merged = self.curves[f"FT({t}+Δ{s[1:]})"]
            target = self.scores[f"FT({t})"]["heldout"]
            steps_to[f"{t}+Δ{s[1:]}"] = {"plain_final": target,
                                         "first_step_plain": _first_reach(plain, target),
                                         "first_step_transfer": _first_reach(merged, target),
                                         "start_transfer": merged[0][1] if merged else None,
                                         "start_plain": plain[0][1] if plain else None,
                                         "half_budget_steps": half,
                                         "half_budget_transfer": sc_half[f"FT½({t}+Δ{s[1:]})"]["heldout"]}
        return {"pairs": [list(p) for p in pairs], "table": table, "steps_to_plain_final": steps_to,
                "curve_every": every, "ft": {t: self.scores[f"FT({t})"]["heldout"] for t in V}}

    def iterative(self, V: list[str]) -> dict:
        """Algorithm 1 (Δ^iter) vs Δ^dir vs plain FT over the chain ``versions``, run by ``deltaport.evolve``."""
        self.prog.note("iterative recycling-then-finetuning (Algorithm 1, deltaport evolve)")
        from deltaport.evolve import run_chain

        from deltaport.lab.steps import _exact_match

        data = self.run_dir / "tasks" / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        f = self.cfg.finetune
        chain = {"versions": [{"name": v, "path": str(self.fam[v].resolve())} for v in V], "data": str(data.resolve()),
                 "finetune": {"steps": f.steps, "lr": f.lr, "batch_size": f.batch_size, "eval_every": f.curve_every,
                              "seed": self.cfg.seed},
                 "eval": {"tasks": [str(self.st.tasks["lab_known"].resolve()), str(self.st.tasks["lab_new"].resolve())],
                          "limit": self.cfg.eval_limit},
                 "strategies": ["iterative", "direct", "plain"]}
        t0 = time.perf_counter()
        out = run_chain(chain, self.run_dir / "evolve", resume=True)
        self.st.timings["evolve"] = self.st.timings.get("evolve", 0.0) + time.perf_counter() - t0
        self.st.backends["evolve"] = "deltaport.evolve.run_chain"
        nk, nn = self.n_known, self.n_new

        def heldout(metrics: dict) -> float:
            k, n = _exact_match(metrics, "lab_known"), _exact_match(metrics, "lab_new")
            return (k * nk + n * nn) / (nk + nn)

        plan, scores = out["strategies"], out["scores"]
        from deltaport.evolve import slug

        evolve_models = {}
        for strategy, short in (("iterative", "iter"), ("direct", "dir"), ("plain", "ft")):
            for v in V[1:]:
                p = self.run_dir / "evolve" / "models" / slug(plan[strategy][v])
                if (p / "config.json").exists():
                    evolve_models[f"evolve:{short}:{v}"] = p
        self.score(evolve_models)
        rows: dict[str, dict[str, float]] = {}
        for v in V[1:]:
            rows[v] = {"base": self.scores[v]["heldout"],
                       "dir": heldout(scores[plan["direct"][v]]), "iter": heldout(scores[plan["iterative"][v]]),
                       "ft": heldout(scores[plan["plain"][v]]), "ft_lab": self.scores[f"FT({v})"]["heldout"]}
        for strategy, per_v in (out.get("curves_data") or {}).items():
            if strategy == "plain":
                continue
            for v, evals in per_v.items():
                if v == V[0]:
                    continue
                label = f"FT({v}+Δ{'iter' if strategy == 'iterative' else 'dir'})"
                try:
                    self.curves[label] = sorted((int(e["step"]), heldout(e["results"])) for e in evals)
                except Exception:  # noqa: BLE001 - a curve without both tasks is left out of the figure
                    continue
        return {"chain": V, "rows": rows, "identical_at_first_link": V[1] if len(V) > 1 else None,
                "table_md": out.get("table"), "run_dir": str(self.run_dir / "evolve"),
                "backend": "deltaport.evolve.run_chain (strategies iterative, direct, plain)"}

    def backport(self, V: list[str]) -> dict:
        """Backporting (newer Δ into older base) beside recycling, for every adjacent pair (Table 1)."""
        rows = []
        for old, new in zip(V, V[1:]):
            rows.append({"old": old, "new": new,
                         "old_base": self.scores[old]["heldout"], "old_ft": self.scores[f"FT({old})"]["heldout"],
                         "backport": self.scores[f"{old}+Δ{new[1:]}"]["heldout"],
                         "new_base": self.scores[new]["heldout"], "new_ft": self.scores[f"FT({new})"]["heldout"],
                         "recycle": self.scores[f"{new}+Δ{old[1:]}"]["heldout"],
                         "same_stage": _stage(old) == _stage(new) and old != "M1"})
        return {"rows": rows}

    def language(self, V: list[str]) -> dict:
        """Second-language fine-tune on the source 'instruct' model, transferred to the target's (Table 2)."""
        self.prog.note("second-language fine-tune transferred to the next version")
        src, tgt = self.cfg.language_pair or (V[-2], V[-1])
        recs_b = sft_records(self.world, lang="b")
        inst_s, inst_t = self.models[f"FT({src})"], self.models[f"FT({tgt})"]
        lang_s, _ = self.st.finetune(inst_s, recs_b, f"FTb-FT-{src}", data_label="sft-lang-b", **self.ft_kw)
        d = self.st.delta(inst_s, lang_s, f"Db{src[1:]}")
        merged = self.st.apply(d, inst_t, f"FT-{tgt}+Db{src[1:]}")
        names = {f"FT({src})": inst_s, f"FTb(FT({src}))": lang_s, f"FT({tgt})": inst_t,
                 f"FT({tgt})+Δb{src[1:]}": merged}
        sc = self.score(names, lang="b")
        self.models.update({f"FTb(FT({src}))": lang_s, f"FT({tgt})+Δb{src[1:]}": merged})
        return {"source": src, "target": tgt, "rows": {n: sc[n] for n in names}}

    def connectivity(self, V: list[str], recovery: dict | None) -> dict:
        """Loss barrier between every pair of bases, ``deltaport check`` on every grid cell, and how well
        each predicts the transfer outcome (Spearman)."""
        self.prog.note("connectivity: loss barriers and deltaport check")
        from deltaport.connectivity import connectivity
        from deltaport.lab.store import model_hash
        from deltaport.errors import DeltaportError

        rng = random.Random(f"conn-{self.cfg.seed}")
        mix = Mix(**self.cfg.pretrain.stage2_mix)
        texts = [" ".join(sample_block(self.world, mix, rng, self.cfg.model.seq_len)[1:])
                 for _ in range(self.cfg.connectivity_items)]
        max_tokens = self.cfg.connectivity_items * self.cfg.model.seq_len
        sample = self.run_dir / "sample.jsonl"
        sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        bases = V + ["Mx", "M0"]
        curves = {}
        for a, b in itertools.combinations(bases, 2):
            key = f"conn-{a}-{b}"
            rec = self.st.cache.get(_conn_key(self.st, key, self.fam[a], self.fam[b], texts, self.cfg.connectivity_points))
            if rec is None:
                r = connectivity(str(self.fam[a]), str(self.fam[b]), texts, points=self.cfg.connectivity_points,
                                 max_tokens=max_tokens, seed=self.cfg.seed)
                rec = {k: r[k] for k in ("alphas", "losses", "barrier", "relative_barrier", "loss_a", "loss_b")}
                self.st.cache.put(_conn_key(self.st, key, self.fam[a], self.fam[b], texts,
                                            self.cfg.connectivity_points), rec)
                self.st.tick(key)
            curves[f"{a}-{b}"] = rec
        self.st.backends["connectivity"] = "deltaport.connectivity"
        checks = {}
        try:
            from deltaport.check import check
        except ImportError:
            check = None
        if check is not None:
            from deltaport.check import load_calibration
            from deltaport.lab.config import config_hash as _h

            calib_hash = _h(load_calibration())
            for t in V + ["Mx", "M0"]:
                for s in V:
                    if s == t:
                        continue
                    ck = _conn_key(self.st, f"check-{s}-{t}", self.fam[s], self.fam[t], texts, 5,
                                   extra={"ft": model_hash(self.models[f"FT({s})"]), "calibration": calib_hash})
                    rec = self.st.cache.get(ck)
                    if rec is None:
                        try:
                            r = check(str(self.fam[s]), str(self.models[f"FT({s})"]), str(self.fam[t]), texts,
                                      max_tokens=max_tokens, seed=self.cfg.seed)
                            rec = {"verdict": r["verdict"], "signals": {k: r["signals"][k] for k in
                                                                         ("relative_barrier", "rel_distance",
                                                                          "excess_loss_rel")}}
                        except DeltaportError as exc:
                            rec = {"verdict": "error", "error": str(exc), "signals": {}}
                        self.st.cache.put(ck, rec)
                        self.st.tick(ck)
                    checks[f"{t}+Δ{s[1:]}"] = rec
            self.st.backends["check"] = "deltaport.check"
        # outcome per cell: recovery where defined, else the merged score minus the base score
        outcome, barrier, verdict_rank, signals = [], [], [], {k: [] for k in ("relative_barrier", "rel_distance",
                                                                               "excess_loss_rel")}
        rank = {"unlikely": 0, "uncertain": 1, "likely": 2}
        cells = []
        for t in V + ["Mx", "M0"]:
            for s in V:
                if s == t:
                    continue
                gain = self.scores[f"{t}+Δ{s[1:]}"]["heldout"] - self.scores[t]["heldout"]
                a, b = sorted([s, t], key=bases.index)
                cells.append({"target": t, "source": s, "gain": gain,
                              "relative_barrier": curves[f"{a}-{b}"]["relative_barrier"],
                              "check": checks.get(f"{t}+Δ{s[1:]}", {}).get("verdict")})
                outcome.append(gain)
                barrier.append(curves[f"{a}-{b}"]["relative_barrier"])
                c = checks.get(f"{t}+Δ{s[1:]}")
                if c and c.get("verdict") in rank:
                    verdict_rank.append((rank[c["verdict"]], gain))
                if c:
                    for k in signals:
                        if k in c.get("signals", {}):
                            signals[k].append((c["signals"][k], gain))
        corr = {"barrier_vs_gain": spearman(barrier, outcome)}
        if verdict_rank:
            corr["check_verdict_vs_gain"] = spearman([r for r, _ in verdict_rank], [g for _, g in verdict_rank])
        for k, pairs in signals.items():
            if pairs:
                corr[f"check_{k}_vs_gain"] = spearman([x for x, _ in pairs], [g for _, g in pairs])
        return {"curves": curves, "checks": checks, "cells": cells, "spearman": corr,
                "outcome": "heldout gain of M_t+Δ_s over M_t", "n_texts": len(texts),
                "sample": str(sample), "check_calibration": check_calibration_scope(self.cfg)}


def _conn_key(st: Steps, kind: str, a: Path, b: Path, texts: list[str], points: int, extra: dict | None = None) -> str:
    from deltaport.lab.store import model_hash, step_key

    return step_key(kind.split("-")[0], a=model_hash(a), b=model_hash(b), texts=texts, points=points, seed=st.seed,
                    **(extra or {}))


def _stage(v: str) -> int:
    return 1 if v in ("M1", "M2", "M3") else 2


#: the lab family ``deltaport check``'s shipped thresholds were fitted on (benchmarks/calibrate_check.py,
#: config benchmarks/check-calibration-lab.yaml: the quick preset's world, model and pretraining, seed 0)
CHECK_CALIBRATION_FAMILY = {"preset": "quick", "seed": 0}


def check_calibration_scope(cfg: LabConfig) -> dict:
    """Whether this run's family is the one ``check``'s thresholds were fitted on (in sample) or not."""
    from deltaport.lab.config import load_config

    ref = load_config(CHECK_CALIBRATION_FAMILY["preset"])
    ref_key = dict(ref.family_key(), seed=CHECK_CALIBRATION_FAMILY["seed"])
    in_sample = cfg.family_key() == ref_key
    return {"fitted_on": "lab family of the quick preset, seed 0 (docs/check-calibration.md); scored there on "
                         "lab seed 1 and on a separate tiny lineage",
            "this_family": f"{cfg.name} preset family, seed {cfg.seed}", "in_sample": in_sample}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _first_reach(curve: list, target: float) -> int | None:
    for step, sc in curve:
        if sc >= target - 1e-9:
            return int(step)
    return None


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    if len(x) < 3 or len(x) != len(y):
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx > 0 and vy > 0 else None
