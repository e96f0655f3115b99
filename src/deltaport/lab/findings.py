"""The paper's findings as statistics with a minimum effect, decided on a 95 % interval.

The definitions, thresholds and directions below are the design frozen in docs/lab.md ("Findings and
their minimum effects") before any transfer result of this design was looked at. Each statistic is
computed within one seed from per-item correctness (``results.json`` → ``items``); across seeds the
estimate is the mean, and the interval comes from :func:`deltaport.lab.stats.hierarchical_bootstrap`.
Verdicts: ``yes`` (interval entirely on the claim's side of the threshold), ``no`` (entirely on the
other side), ``inconclusive`` (it straddles the threshold). Nothing here is tuned to a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from deltaport.lab.stats import as_vector, hierarchical_bootstrap, seeds_needed, spearman, verdict


@dataclass(frozen=True)
class Finding:
    id: str
    claim: str
    statistic: str
    threshold: float
    direction: str  # ">=", ">" or "<="
    unit: str  # "points" (×100 when shown) or "fraction" (shown as %) or "rho"
    fn: Callable[[dict, np.ndarray], float]
    needs: Callable[[dict], bool]


def _m(d: dict, name: str, idx: np.ndarray, fs: bool = False) -> float:
    v = d["fs" if fs else "v"][name]
    return float(v[idx].mean())


def _last_two(d: dict) -> tuple[str, str]:
    return d["V"][-1], d["V"][-2]


def _recovery(d, idx):
    t, s = _last_two(d)
    base = _m(d, t, idx, fs=True)
    gain = _m(d, f"FT({t})", idx) - base
    return (_m(d, f"{t}+Δ{s[1:]}", idx) - base) / gain if gain >= 0.05 else float("nan")


def _ctrl(target: str):
    def fn(d, idx):
        base = _m(d, target, idx)
        return float(np.mean([_m(d, f"{target}+Δ{s[1:]}", idx) - base for s in d["V"]]))
    return fn


def _ttf_half(d, idx):
    t, s = _last_two(d)
    return _m(d, f"FT½({t}+Δ{s[1:]})", idx) - _m(d, f"FT({t})", idx)


def _dir_minus_plain(d, idx):
    return float(np.mean([_m(d, f"evolve:dir:{v}", idx) - _m(d, f"evolve:ft:{v}", idx) for v in d["V"][1:]]))


def _iter_minus_dir(d, idx):
    return float(np.mean([_m(d, f"evolve:iter:{v}", idx) - _m(d, f"evolve:dir:{v}", idx) for v in d["V"][2:]]))


def _backport(d, idx):
    diffs = []
    for old, new in d["same_stage_pairs"]:
        b = _m(d, f"{old}+Δ{new[1:]}", idx) - _m(d, old, idx)
        r = _m(d, f"{new}+Δ{old[1:]}", idx) - _m(d, new, idx)
        diffs.append(b - r)
    return float(np.mean(diffs))


def _barrier_rho(d, idx):
    barrier, gain = [], []
    for (t, s), rb in d["barrier"].items():
        barrier.append(rb)
        gain.append(_m(d, f"{t}+Δ{s[1:]}", idx) - _m(d, t, idx))
    rho = spearman(barrier, gain)
    return float("nan") if rho is None else rho


def _has(*names_fn):
    def need(d):
        return all(n in d["v"] for n in names_fn[0](d))
    return need


FINDINGS: list[Finding] = [
    Finding("a", "Recycling onto the newest version recovers the fine-tuning gain (M_t + Δ_{t−1}, t = newest; "
                 "paper M5 + Δ4: 116 %)",
            "(EM(M_t+Δ_s) − EM_fewshot(M_t)) / (EM(FT(M_t)) − EM_fewshot(M_t))", 0.75, ">=", "fraction", _recovery,
            lambda d: d["has_fs"] and f"{d['V'][-1]}+Δ{d['V'][-2][1:]}" in d["v"]),
    Finding("b1", "Transfer across an independent initialisation fails (Mx + Δ_s)",
            "mean over s of EM(Mx+Δ_s) − EM(Mx)", 0.05, "<=", "points", _ctrl("Mx"),
            lambda d: all(f"Mx+Δ{s[1:]}" in d["v"] for s in d["V"])),
    Finding("b2", "Transfer onto a random initialisation fails (M0 + Δ_s; Table 8)",
            "mean over s of EM(M0+Δ_s) − EM(M0)", 0.05, "<=", "points", _ctrl("M0"),
            lambda d: all(f"M0+Δ{s[1:]}" in d["v"] for s in d["V"])),
    Finding("c", "Transfer-then-finetune reaches plain FT's final score with half the steps (newest M_t + Δ_{t−1}; "
                 "Fig. 2)",
            "EM(FT_{T/2}(M_t+Δ_s)) − EM(FT_T(M_t))", -0.02, ">=", "points", _ttf_half,
            lambda d: f"FT½({d['V'][-1]}+Δ{d['V'][-2][1:]})" in d["v"]),
    Finding("d1", "Δ^dir (recycling-then-finetuning) beats plain FT (Algorithm 1, Table 6)",
            "mean over links of EM(FT(M_i+Δ^dir)) − EM(FT(M_i))", 0.02, ">=", "points", _dir_minus_plain,
            lambda d: all(f"evolve:dir:{v}" in d["v"] and f"evolve:ft:{v}" in d["v"] for v in d["V"][1:])
            and len(d["V"]) >= 2),
    Finding("d2", "Δ^iter is at least as good as Δ^dir (Algorithm 1, Table 6)",
            "mean over links after the first of EM(FT(M_i+Δ^iter)) − EM(FT(M_i+Δ^dir))", 0.0, ">=", "points",
            _iter_minus_dir,
            lambda d: len(d["V"]) >= 3 and all(f"evolve:iter:{v}" in d["v"] for v in d["V"][2:])),
    Finding("e", "Backporting gains more than recycling, between versions that know the same facts (Table 1)",
            "mean over same-stage adjacent pairs of [gain of old+Δ_new] − [gain of new+Δ_old]", 0.0, ">", "points",
            _backport, lambda d: bool(d["same_stage_pairs"])),
    Finding("f", "(not in the paper) The loss barrier between two bases ranks the transfer outcome",
            "Spearman(relative barrier, gain of M_t+Δ_s) over cells, targets incl. Mx and M0", -0.5, "<=", "rho",
            _barrier_rho, lambda d: len(d["barrier"]) >= 3),
]


def seed_data(r: dict) -> dict:
    """The per-item vectors and per-cell facts of one run's ``results.json`` the statistics read."""
    items = r.get("items", {})
    v = {n: as_vector(s) for n, s in items.get("heldout", {}).items()}
    fs = {n: as_vector(s) for n, s in items.get("heldout_fewshot", {}).items()}
    n = {len(x) for x in v.values()} | {len(x) for x in fs.values()}
    if len(n) > 1:
        raise ValueError(f"per-item vectors of different lengths in one run: {sorted(n)}")
    bp = (r.get("backport") or {}).get("rows", [])
    conn = r.get("connectivity") or {}
    return {"V": r["config"]["versions"], "v": v, "fs": fs, "has_fs": bool(fs), "n_items": n.pop() if n else 0,
            "same_stage_pairs": [(x["old"], x["new"]) for x in bp if x.get("same_stage")],
            "barrier": {(c["target"], c["source"]): c["relative_barrier"] for c in conn.get("cells", [])},
            "seed": r.get("config", {}).get("seed")}


def decide(runs: list[dict], *, n_boot: int = 2000, boot_seed: int = 0) -> list[dict]:
    """Every finding that the runs can compute: per-seed values, mean, interval, spread and verdict."""
    data = [seed_data(r) for r in runs]
    out = []
    for f in FINDINGS:
        if not all(f.needs(d) for d in data):
            continue
        ci = hierarchical_bootstrap(f.fn, data, n_boot=n_boot, seed=boot_seed)
        out.append(with_seeds_needed({"id": f.id, "claim": f.claim, "statistic": f.statistic,
                                      "threshold": f.threshold, "direction": f.direction, "unit": f.unit, **ci,
                                      "seeds": [d["seed"] for d in data],
                                      "verdict": verdict(ci, f.threshold, f.direction)}))
    return out


#: The design's noise bounds (issue 20, docs/lab.md "Design v3"): the most a statistic may move between a run and
#: its noise twin. A one-seed run's interval resamples items only; neither seed variation nor floating-point
#: noise is in it, so a one-seed verdict is decided on the interval widened by this margin on both sides
#: (:func:`one_seed_verdict`). Across seeds the hierarchical bootstrap carries the seed variation (a larger
#: perturbation than the noise twin's), and no margin is added.
NOISE_MARGIN = {"points": 0.03, "fraction": 0.10, "rho": 0.10}


def one_seed_verdict(f: dict) -> str:
    """The verdict of a one-seed claim: its item interval widened by ``NOISE_MARGIN[unit]`` on both sides,
    then decided as across seeds. The margin can only turn a yes or a no into ``inconclusive``."""
    lo, hi = f.get("lo"), f.get("hi")
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return "inconclusive"
    m = NOISE_MARGIN[f["unit"]]
    return verdict({"lo": lo - m, "hi": hi + m}, f["threshold"], f["direction"])


#: why a multi-seed finding left undecided has no ``seeds_needed`` (see :func:`deltaport.lab.stats.seeds_needed`)
NO_SEED_COUNT = "no seed count follows from the spread: the mean is on the threshold, or the seeds agree exactly"


def with_seeds_needed(f: dict) -> dict:
    """``f`` with ``seeds_needed`` (:func:`deltaport.lab.stats.seeds_needed`) when it is inconclusive on
    two or more seeds (``seeds_needed_note`` instead when no count follows); reads only ``f``'s own numbers,
    so a committed summary.json gains it without rerunning anything."""
    f = {k: v for k, v in f.items() if k not in ("seeds_needed", "seeds_needed_note")}
    if f["verdict"] != "inconclusive" or f.get("n_seeds", 1) < 2:
        return f
    n = seeds_needed(f["mean"], f.get("seed_sd"), f["threshold"], f["n_seeds"], level=f.get("level", 0.95))
    if n is None:
        f["seeds_needed_note"] = NO_SEED_COUNT
    else:
        f["seeds_needed"] = n
    return f


def fmt(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if unit == "fraction":
        return f"{100 * x:.0f} %"
    if unit == "points":
        return f"{100 * x:+.1f}"
    return f"{x:+.2f}"


def rule_text(f: dict) -> str:
    sym = {">=": "≥", ">": ">", "<=": "≤"}[f["direction"]]
    return f"θ {sym} {fmt(f['threshold'], f['unit'])}"

