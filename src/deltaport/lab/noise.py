"""The noise twin of a lab run: the same config and seed with only floating-point noise changed.

Design v3 (docs/lab.md, "Noise twin") asks of every headline number that floating-point noise cannot move
it: a run with ``noise_twin`` also runs its twin into ``RUN_DIR/twin`` and records, per claim and per
score, how far the twin is from it (the *noise spread*), beside the spread across seeds.

What the twin changes (:func:`twin_config`), and nothing else:

* **the torch thread count** (1 ↔ 2): every matmul and reduction of pretraining, fine-tuning and
  evaluation sums in another order (the perturbation a user meets when they pass ``--threads`` or run on
  another machine);
* **every initial weight one ULP up** (``init_ulp``: the M1..M5 run, Mx and M0), so the twin differs
  even on a machine where the thread count happens not to change the bytes.

The world, the data of every step, every seed, the recipe and the evaluation items are the same.
The twin leaves out the compression experiment (no finding reads it) to save its cost.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from deltaport.lab.config import LabConfig

#: one line for reports: what the twin is
TWIN_TEXT = ("noise twin: same config and seed, torch threads 1 ↔ 2 and every initial weight moved up by one "
             "ULP (docs/lab.md, 'Noise twin')")


def twin_config(cfg: LabConfig) -> LabConfig:
    """The config of ``cfg``'s noise twin: the other thread count, every initial weight one ULP up, no
    compression experiment, no twin of its own."""
    return dataclasses.replace(cfg, threads=1 if cfg.threads > 1 else 2, init_ulp=cfg.init_ulp + 1, noise_twin=False,
                               experiments=[e for e in cfg.experiments if e != "compression"])


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _gap(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else abs(a - b)


def twin_record(main: dict, twin: dict, twin_dir: Path) -> dict:
    """``results.json`` → ``noise_twin``: the twin's claims and held-out scores and their gaps to the main run's.

    ``claims``: ``{id: {"mean", "lo", "hi", "verdict"}}`` of the twin; ``scores``: ``{name: twin held-out}``;
    ``score_spread``: ``{name: |main − twin|}`` for every model both runs scored; ``max_score_spread``.
    """
    scores = {n: s["heldout"] for n, s in twin.get("scores", {}).items()}
    spread = {n: _gap(main["scores"][n]["heldout"], v) for n, v in scores.items() if n in main.get("scores", {})}
    return {"what": TWIN_TEXT, "run_dir": str(twin_dir), "threads": twin["config"]["threads"],
            "init_ulp": twin["config"]["init_ulp"],
            "claims": {c["id"]: {k: c.get(k) for k in ("mean", "lo", "hi", "verdict")} for c in twin.get("claims", [])},
            "scores": scores, "score_spread": spread,
            "max_score_spread": max((v for v in spread.values() if v is not None), default=None),
            "timings_s": twin.get("timings_s")}


def attach(claims: list[dict], record: dict | None) -> list[dict]:
    """Add the twin's value to every claim: ``twin_mean``, ``twin_verdict``, ``noise_spread`` (|θ − θ_twin|)
    and ``same_verdict`` (None fields when the run has no twin)."""
    twins = (record or {}).get("claims", {})
    for c in claims:
        t = twins.get(c["id"])
        c["twin_mean"] = t["mean"] if t else None
        c["twin_verdict"] = t["verdict"] if t else None
        c["noise_spread"] = _gap(c.get("mean"), t["mean"]) if t else None
        c["same_verdict"] = (t["verdict"] == c["verdict"]) if t else None
    return claims


def differing_verdicts(claims: list[dict]) -> list[str]:
    """Ids of the claims whose twin reached another verdict (or that the twin could not compute)."""
    return [c["id"] for c in claims if c.get("twin_verdict") is not None and c["twin_verdict"] != c["verdict"]]


def headline_models(versions: list[str]) -> list[str]:
    """The held-out scores the README and the findings read: every FT(M_v), the newest version t with the Δ of
    the one before (s) and of the oldest, the backport s + Δ_t, and the transfer-then-finetune models."""
    t, s, first = versions[-1], versions[-2], versions[0]
    names = [f"FT({v})" for v in versions] + [t, f"{t}+Δ{s[1:]}", f"{s}+Δ{t[1:]}", f"{t}+Δ{first[1:]}",
                                              f"FT({t}+Δ{s[1:]})", f"FT½({t}+Δ{s[1:]})"]
    return list(dict.fromkeys(names))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def claim_columns(c: dict) -> list[str]:
    """The twin's θ and verdict, and |θ − θ_twin|, for the report's claims table."""
    from deltaport.lab.findings import fmt

    if c.get("twin_verdict") is None:
        return ["–", "–"]
    spread = c.get("noise_spread")
    shown = "–" if spread is None else fmt(spread, c["unit"]).lstrip("+")
    twin = f"{fmt(c['twin_mean'], c['unit'])} ({c['twin_verdict']})"
    return [twin if c["twin_verdict"] == c["verdict"] else f"**{twin}**", shown]


def scores_table(r: dict) -> str:
    """Markdown: every headline held-out score of a one-seed run beside its noise twin's, and the gap."""
    rec = r.get("noise_twin")
    if not rec:
        return ""
    sc = r["scores"]
    rows = [f"| {n} | {_pct(sc[n]['heldout'])} | {_pct(rec['scores'].get(n))} | {_pct(rec['score_spread'].get(n))} |"
            for n in headline_models(r["config"]["versions"]) if n in sc]
    return "\n".join(["| model | held-out EM | noise twin | noise spread (points) |", "|---|---|---|---|", *rows])


#: how far two runs of one seed may differ and still "agree" (issue 20's acceptance: claim means within 0.03 for
#: unit points, 0.10 otherwise, and identical verdicts)
AGREEMENT_TOLERANCE = {"points": 0.03, "other": 0.10}


def agreement(a: dict, b: dict) -> dict:
    """Whether two runs of one seed (e.g. ``--threads 1`` and ``--threads 2``) agree: the same claim ids,
    identical verdicts, and every claim's mean within :data:`AGREEMENT_TOLERANCE`.

    Returns ``{"agree", "same_ids", "claims": {id: {"verdicts", "gap", "tolerance", "ok"}}, "max_score_gap"}``.
    """
    ca, cb = {c["id"]: c for c in a.get("claims", [])}, {c["id"]: c for c in b.get("claims", [])}
    rows = {}
    for i in sorted(set(ca) & set(cb)):
        x, y = ca[i], cb[i]
        tol = AGREEMENT_TOLERANCE["points" if x["unit"] == "points" else "other"]
        gap = _gap(x.get("mean"), y.get("mean"))
        rows[i] = {"verdicts": [x["verdict"], y["verdict"]], "gap": gap, "tolerance": tol,
                   "ok": x["verdict"] == y["verdict"] and gap is not None and gap <= tol}
    sa, sb = a.get("scores", {}), b.get("scores", {})
    gaps = [abs(sa[k]["heldout"] - sb[k]["heldout"]) for k in sa if k in sb]
    same_ids = set(ca) == set(cb)
    return {"agree": same_ids and all(r["ok"] for r in rows.values()), "same_ids": same_ids, "claims": rows,
            "max_score_gap": max(gaps, default=None)}
