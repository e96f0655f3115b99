"""The lab's experiments, one function per section of ``report.md`` (docs/lab.md, "Experiments").

Each takes the :class:`~deltaport.lab.run.Lab` built so far (family, FT(M_v) of every version,
their scores), adds the models it makes to it, and returns its part of ``results.json`` (the key
in brackets):

* :func:`transfer_grid` (``grid``) - every M_t + Δ_s, targets incl. Mx and M0 (paper Table 3);
* :func:`recovery` (``recovery``) - the fraction of the fine-tuning gain each cell recovers;
* :func:`transfer_then_finetune` (``transfer_then_finetune``) - FT(M_t + Δ_s) vs plain FT(M_t), curves
  and a half-budget fine-tune (Table 4, Fig. 2);
* :func:`iterative` (``iterative``) - Algorithm 1 through ``deltaport.evolve`` (Table 6);
* :func:`backport` (``backport``) - newer Δ into the older base beside recycling (Table 1);
* :func:`second_language` (``language``) - a language-b fine-tune moved to the next version (Table 2);
* :func:`connectivity` (``connectivity``) - loss barriers and ``deltaport check`` vs the transfer outcome.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from typing import TYPE_CHECKING, Any

from deltaport.lab.compression import frontier as compression_frontier
from deltaport.lab.config import LabConfig
from deltaport.lab.stats import spearman
from deltaport.lab.steps import exact_match_of
from deltaport.lab.store import write_text
from deltaport.lab.world import Mix, sample_block, sft_records

if TYPE_CHECKING:
    from deltaport.lab.run import Lab

#: a recovery fraction is left undefined where plain fine-tuning gains less than this (held-out EM)
MIN_FT_GAIN = 0.05


def transfer_name(target: str, source: str) -> str:
    """Report name of a transfer M_target + Δ_source: ``"M5+Δ4"``."""
    return f"{target}+Δ{source[1:]}"


def delta_label(v: str) -> str:
    """Δ label of version ``v`` in file names (ASCII): ``M3`` -> ``D3``, ``Mx`` -> ``Dx``."""
    return "D" + v[1:]


def transfer_grid(lab: Lab) -> dict:
    """Every M_t + Δ_s (targets: the versions, Mx and M0), scored on the held-out items (paper Table 3)."""
    lab.note("transfer grid: every M_t + Δ_s")
    versions, targets = lab.versions, lab.targets
    merged = {transfer_name(t, s): lab.transfer(t, s) for t in targets for s in versions if s != t}
    scored = lab.score(merged)

    def cells(split: str) -> dict:
        return {t: {s: scored[transfer_name(t, s)][split] for s in versions if s != t} for t in targets}

    return {"targets": targets, "sources": versions, "metric": "heldout exact match", "cells": cells("heldout"),
            "cells_known": cells("known"), "cells_new": cells("new"),
            "base": {t: lab.scores[t]["heldout"] for t in targets},
            "ft": {t: lab.scores[f"FT({t})"]["heldout"] for t in versions}}


def recovery(lab: Lab) -> dict:
    """(score(M_t+Δ_s) − score(M_t)) / (score(FT(M_t)) − score(M_t)); None when FT gains < MIN_FT_GAIN."""
    fraction: dict[str, dict[str, float | None]] = {}
    for t in lab.versions:
        base, finetuned = lab.scores[t]["heldout"], lab.scores[f"FT({t})"]["heldout"]
        fraction[t] = {}
        for s in lab.versions:
            if s != t:
                transferred = lab.scores[transfer_name(t, s)]["heldout"]
                fraction[t][s] = ((transferred - base) / (finetuned - base) if finetuned - base >= MIN_FT_GAIN
                                  else None)
    return {"fraction": fraction, "min_ft_gain": MIN_FT_GAIN}


def transfer_then_finetune(lab: Lab) -> dict:
    """FT(M_t + Δ_s) with convergence curves for the config's ``curve_pairs``, the same fine-tune with half
    the steps (finding c), and with ``ttf_all_pairs`` from every grid cell; compared with plain FT(M_t)."""
    lab.note("transfer-then-finetune vs plain fine-tuning")
    cfg, versions = lab.cfg, lab.versions
    every = cfg.finetune.curve_every
    pairs = [tuple(p) for p in cfg.curve_pairs]
    for t, s in pairs:
        path, curve = lab.lib.finetune(lab.transfer(t, s), lab.sft, f"FT-{t}+{delta_label(s)}",
                                       curve_task="lab_heldout", curve_every=every, **lab.recipe)
        lab.models[f"FT({transfer_name(t, s)})"] = path
        lab.curves[f"FT({transfer_name(t, s)})"] = curve
    # the same fine-tune with half the step budget (its own linear schedule): the finding (c) statistic
    # "transfer-then-finetune with half the steps reaches plain FT's final score" is per item
    half = max(1, cfg.finetune.steps // 2)
    halves = {}
    for t, s in pairs:
        path, _ = lab.lib.finetune(lab.transfer(t, s), lab.sft, f"FThalf-{t}+{delta_label(s)}",
                                   **{**lab.recipe, "steps": half})
        halves[f"FT½({transfer_name(t, s)})"] = path
        lab.models[f"FT½({transfer_name(t, s)})"] = path
    scored_half = lab.score(halves)
    if cfg.ttf_all_pairs:
        for t, s in itertools.permutations(versions, 2):
            if (t, s) not in pairs:
                path, _ = lab.lib.finetune(lab.transfer(t, s), lab.sft, f"FT-{t}+{delta_label(s)}", **lab.recipe)
                lab.models[f"FT({transfer_name(t, s)})"] = path
    finetuned = {n: p for n, p in lab.models.items() if n.startswith("FT(") and "+Δ" in n}
    scored = lab.score(finetuned)
    table: dict[str, dict[str, float]] = {}
    for name in finetuned:
        t, s = name[3:-1].split("+Δ")
        table.setdefault(t, {})[f"M{s}"] = scored[name]["heldout"]
    steps_to: dict[str, Any] = {}
    for t, s in pairs:
        plain, transferred = lab.curves.get(f"FT({t})", []), lab.curves[f"FT({transfer_name(t, s)})"]
        target = lab.scores[f"FT({t})"]["heldout"]
        steps_to[transfer_name(t, s)] = {"plain_final": target,
                                 "first_step_plain": _first_reach(plain, target),
                                 "first_step_transfer": _first_reach(transferred, target),
                                 "start_transfer": transferred[0][1] if transferred else None,
                                 "start_plain": plain[0][1] if plain else None,
                                 "half_budget_steps": half,
                                 "half_budget_transfer": scored_half[f"FT½({transfer_name(t, s)})"]["heldout"]}
    return {"pairs": [list(p) for p in pairs], "table": table, "steps_to_plain_final": steps_to,
            "curve_every": every, "ft": {t: lab.scores[f"FT({t})"]["heldout"] for t in versions}}


def _first_reach(curve: list, target: float) -> int | None:
    """The first step of ``[(step, score)]`` whose score reaches ``target`` (None if none does)."""
    for step, score in curve:
        if score >= target - 1e-9:
            return int(step)
    return None


def iterative(lab: Lab) -> dict:
    """Algorithm 1 (Δ^iter) vs Δ^dir vs plain FT over the chain of versions, run by ``deltaport.evolve``."""
    from deltaport.evolve import run_chain, slug

    lab.note("iterative recycling-then-finetuning (Algorithm 1, deltaport evolve)")
    cfg, versions, lib = lab.cfg, lab.versions, lab.lib
    data = lab.run_dir / "tasks" / "sft.jsonl"
    write_text(data, "".join(json.dumps(r) + "\n" for r in lab.sft))
    f = cfg.finetune
    chain = {"versions": [{"name": v, "path": str(lab.family[v].resolve())} for v in versions],
             "data": str(data.resolve()),
             "finetune": {"steps": f.steps, "lr": f.lr, "batch_size": f.batch_size, "eval_every": f.curve_every,
                          "seed": cfg.seed},
             "eval": {"tasks": [str(lib.tasks["lab_known"].resolve()), str(lib.tasks["lab_new"].resolve())],
                      "limit": cfg.eval_limit},
             "strategies": ["iterative", "direct", "plain"]}
    with lib.timed("evolve"):
        out = run_chain(chain, lab.run_dir / "evolve", resume=True)
    n_known, n_new = len(lab.world.known), len(lab.world.new)

    def heldout(metrics: dict) -> float:
        known, new = exact_match_of(metrics, "lab_known"), exact_match_of(metrics, "lab_new")
        return (known * n_known + new * n_new) / (n_known + n_new)

    plan, evolve_scores = out["strategies"], out["scores"]
    evolved = {}
    for strategy, short in (("iterative", "iter"), ("direct", "dir"), ("plain", "ft")):
        for v in versions[1:]:
            path = lab.run_dir / "evolve" / "models" / slug(plan[strategy][v])
            if (path / "config.json").exists():
                evolved[f"evolve:{short}:{v}"] = path
    lab.score(evolved)
    rows = {v: {"base": lab.scores[v]["heldout"],
                "dir": heldout(evolve_scores[plan["direct"][v]]), "iter": heldout(evolve_scores[plan["iterative"][v]]),
                "ft": heldout(evolve_scores[plan["plain"][v]]), "ft_lab": lab.scores[f"FT({v})"]["heldout"]}
            for v in versions[1:]}
    for strategy, per_version in (out.get("curves_data") or {}).items():
        if strategy == "plain":
            continue
        for v, evals in per_version.items():
            if v == versions[0]:
                continue
            label = f"FT({v}+Δ{'iter' if strategy == 'iterative' else 'dir'})"
            try:
                lab.curves[label] = sorted((int(e["step"]), heldout(e["results"])) for e in evals)
            except Exception:  # noqa: BLE001 - a curve without both tasks is left out of the figure
                continue
    return {"chain": versions, "rows": rows, "identical_at_first_link": versions[1] if len(versions) > 1 else None,
            "table_md": out.get("table"), "run_dir": str(lab.run_dir / "evolve")}


def backport(lab: Lab) -> dict:
    """Backporting (newer Δ into older base) beside recycling, for every adjacent pair (Table 1)."""
    rows = []
    for old, new in zip(lab.versions, lab.versions[1:]):
        rows.append({"old": old, "new": new,
                     "old_base": lab.scores[old]["heldout"], "old_ft": lab.scores[f"FT({old})"]["heldout"],
                     "backport": lab.scores[transfer_name(old, new)]["heldout"],
                     "new_base": lab.scores[new]["heldout"], "new_ft": lab.scores[f"FT({new})"]["heldout"],
                     "recycle": lab.scores[transfer_name(new, old)]["heldout"],
                     "same_stage": _stage(old) == _stage(new) and old != "M1"})
    return {"rows": rows}


def _stage(v: str) -> int:
    """The pretraining stage a version was saved in (M1-M3: stage 1, M4/M5: stage 2)."""
    return 1 if v in ("M1", "M2", "M3") else 2


def second_language(lab: Lab) -> dict:
    """The source 'instruct' model FT(M_s) fine-tuned further in language b; that Δ_b added to FT(M_t) (Table 2)."""
    lab.note("second-language fine-tune transferred to the next version")
    source, target = lab.cfg.language_pair or (lab.versions[-2], lab.versions[-1])
    instruct_source, instruct_target = lab.models[f"FT({source})"], lab.models[f"FT({target})"]
    lang_b, _ = lab.lib.finetune(instruct_source, sft_records(lab.world, lang="b"), f"FTb-FT-{source}",
                                 data_label="sft-lang-b", **lab.recipe)
    delta_b = lab.lib.delta(instruct_source, lang_b, f"Db{source[1:]}")
    merged = lab.lib.apply(delta_b, instruct_target, f"FT-{target}+Db{source[1:]}")
    named = {f"FT({source})": instruct_source, f"FTb(FT({source}))": lang_b, f"FT({target})": instruct_target,
             f"FT({target})+Δb{source[1:]}": merged}
    scored = lab.score(named, lang="b")
    lab.models.update({f"FTb(FT({source}))": lang_b, f"FT({target})+Δb{source[1:]}": merged})
    return {"source": source, "target": target, "rows": {n: scored[n] for n in named}}


def connectivity(lab: Lab) -> dict:
    """Loss barrier between every pair of bases, ``deltaport check`` on every grid cell, and how well each
    predicts the transfer outcome (Spearman over cells)."""
    from deltaport.check import SIGNALS

    lab.note("connectivity: loss barriers and deltaport check")
    cfg, versions, targets = lab.cfg, lab.versions, lab.targets
    rng = random.Random(f"conn-{cfg.seed}")
    mix = Mix(**cfg.pretrain.stage2_mix)
    texts = [" ".join(sample_block(lab.world, mix, rng, cfg.model.seq_len)[1:]) for _ in range(cfg.connectivity_items)]
    max_tokens = cfg.connectivity_items * cfg.model.seq_len
    sample = lab.run_dir / "sample.jsonl"
    write_text(sample, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    curves = {f"{a}-{b}": lab.lib.barrier(lab.family[a], lab.family[b], texts, points=cfg.connectivity_points,
                                          max_tokens=max_tokens)
              for a, b in itertools.combinations(targets, 2)}
    checks = {transfer_name(t, s): lab.lib.check(lab.family[s], lab.models[f"FT({s})"], lab.family[t], texts,
                                         max_tokens=max_tokens)
              for t in targets for s in versions if s != t}
    # outcome per cell: the held-out gain of M_t + Δ_s over M_t, beside each predictor
    verdict_rank = {"unlikely": 0, "uncertain": 1, "likely": 2}
    cells, gains, barriers = [], [], []
    ranked_verdicts: list[tuple[int, float]] = []
    signals: dict[str, list[tuple[float, float]]] = {k: [] for k in SIGNALS}
    for t in targets:
        for s in versions:
            if s == t:
                continue
            gain = lab.scores[transfer_name(t, s)]["heldout"] - lab.scores[t]["heldout"]
            a, b = sorted([s, t], key=targets.index)
            barrier = curves[f"{a}-{b}"]["relative_barrier"]
            check = checks[transfer_name(t, s)]
            cells.append({"target": t, "source": s, "gain": gain, "relative_barrier": barrier,
                          "check": check.get("verdict")})
            gains.append(gain)
            barriers.append(barrier)
            if check.get("verdict") in verdict_rank:
                ranked_verdicts.append((verdict_rank[check["verdict"]], gain))
            for k in signals:
                if k in check.get("signals", {}):
                    signals[k].append((check["signals"][k], gain))
    rho = {"barrier_vs_gain": spearman(barriers, gains)}
    if ranked_verdicts:
        rho["check_verdict_vs_gain"] = spearman([r for r, _ in ranked_verdicts], [g for _, g in ranked_verdicts])
    for k, pairs in signals.items():
        if pairs:
            rho[f"check_{k}_vs_gain"] = spearman([x for x, _ in pairs], [g for _, g in pairs])
    return {"curves": curves, "checks": checks, "cells": cells, "spearman": rho,
            "outcome": "heldout gain of M_t+Δ_s over M_t", "n_texts": len(texts),
            "sample": str(sample), "check_calibration": check_calibration_scope(cfg)}


def compression(lab: Lab) -> dict:
    """Δ bytes vs held-out score: every transfer cell again with each compressed Δ of the config's
    ``compression`` settings (:func:`deltaport.lab.compression.frontier`)."""
    lab.note("compression: every transfer cell with a compressed Δ")
    return compression_frontier(lab.cfg.compression, lab.lib, {s: lab.delta(s) for s in lab.versions},
                                {t: lab.family[t] for t in lab.targets},
                                lambda named: {n: x["heldout"] for n, x in lab.score(named).items()},
                                seed=lab.cfg.seed)


#: config experiment name (= its key in results.json) -> the function that makes its report section
IN_REPORT_ORDER = {"grid": transfer_grid, "recovery": recovery, "transfer_then_finetune": transfer_then_finetune,
                   "iterative": iterative, "backport": backport, "language": second_language,
                   "connectivity": connectivity, "compression": compression}


#: the lab preset whose world and pretraining schedule ``deltaport check``'s shipped thresholds were fitted
#: on (benchmarks/calibrate_check.py, configs benchmarks/check-calibration-lab*.yaml: the quick preset's
#: world and schedule at several model sizes, seed 0); the sizes and seeds are in the calibration itself. Those
#: families keep the seed's random rows for the tokens pretraining never sees (``unseen_rows: random``, designs
#: v1-v3); the quick preset zeroes them since design v4, so a v4 quick family is never in sample
CHECK_CALIBRATION_FAMILY = {"preset": "quick", "seed": 0, "unseen_rows": "random"}


def check_calibration_scope(cfg: LabConfig) -> dict:
    """Whether this run's family is one ``check``'s thresholds were fitted on (in sample) or not, and a
    sentence naming the families, read from the shipped calibration (``families``, ``held_out``)."""
    from deltaport.check import load_calibration
    from deltaport.lab.config import load_config

    fitted = load_config(CHECK_CALIBRATION_FAMILY["preset"])
    fitted = dataclasses.replace(fitted, pretrain=dataclasses.replace(
        fitted.pretrain, unseen_rows=CHECK_CALIBRATION_FAMILY["unseen_rows"]))
    calib = load_calibration() or {}
    families = calib.get("families") or [{"seed": CHECK_CALIBRATION_FAMILY["seed"], "model": None}]
    keys = [dict(fitted.family_key(), seed=f.get("seed", CHECK_CALIBRATION_FAMILY["seed"]),
                 **({"model": f["model"]} if f.get("model") else {})) for f in families]
    sizes = [f"{f['num_parameters']:,}" for f in families if f.get("num_parameters")]
    if sizes:  # a calibration that records its families (benchmarks/calibrate_check.py since issue 22)
        held = calib.get("held_out") or []
        fitted_on = (f"lab families of the quick preset's world and schedule (design v3's random rows for the "
                     f"tokens pretraining never sees) with {len(sizes)} model size(s) "
                     f"({', '.join(sizes)} parameters), seed {CHECK_CALIBRATION_FAMILY['seed']} (docs/check-calibration.md)"
                     + (f"; scored there on {', '.join(held)}" if held else ""))
    else:  # the one-family calibration: what its generated table says
        fitted_on = ("lab family of the quick preset (design v3's random rows for the tokens pretraining never "
                     "sees), seed 0 (docs/check-calibration.md); scored there on "
                     "lab seed 1 and on a separate tiny lineage")
    return {"fitted_on": fitted_on,
            "this_family": f"{cfg.name} preset family, seed {cfg.seed}", "in_sample": cfg.family_key() in keys}
