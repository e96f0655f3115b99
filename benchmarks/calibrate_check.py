"""Calibrate the thresholds of ``deltaport check`` on a tiny model family, score them on others.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py              # lab family: ~15 min, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py --family tiny  # own tiny lineage: ~1 min

Writes ``src/deltaport/_check_calibration.py`` (the thresholds the package ships) and
``docs/check-calibration.md`` (the table behind them). Nothing there is hand-edited.

Families (one per seed; the first seed calibrates, the others are scored with its thresholds):

* ``lab`` (default): the demo/lab issue's family (``deltaport.lab``, config
  ``benchmarks/check-calibration-lab.yaml``): M1–M3 along one stage-1 run, M4–M5 continued on the
  stage-2 mix, Mx = independent seed, M0 = random init; FT(M_i) = fine-tuned on the flag-colour QA
  task. Built and scored by ``deltaport lab run`` (experiments grid + connectivity; cached in
  ``--lab-dir``). Outcome of M_t + Δ_s: recovery = [EM(M_t+Δ_s) − EM(M_t)] / [EM(FT(M_t)) − EM(M_t)]
  (held-out exact match; for Mx and M0, which the lab does not fine-tune, the source's gain).
* ``tiny``: ``deltaport.tinylineage.build_grid`` (v1; v2 = v1 continued; v3 = v2 on shifted data;
  v2x = another init seed; rand). Outcome: recovery = [T(m_t) − T(m_t+Δ_s)] / [T(m_t) − T(m'_t)],
  T = task answer NLL, m'_t = the target fine-tuned with the same recipe.

Every ordered pair (source s, target t), s ≠ t, s trained, gives the three signals of ``check``
(on a fixed text sample) and the outcome. Label: "works" if recovery ≥ 0.5, "fails" if < 0.2,
else "partial".

Thresholds (fitted on the calibration family only): for each signal, ``hi`` = the largest value seen
on a working pair, ``f`` = the smallest value above ``hi`` seen on a failing pair. ``likely_max`` =
hi + (f − hi)/3, ``unlikely_min`` = hi + 2(f − hi)/3. A signal with no failing pair above hi does
not separate the outcomes on this family: it is reported but not used for the verdict. The verdict is "unlikely" if any signal is ≥ its
unlikely_min, "likely" if all are ≤ likely_max, else "uncertain".
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import pprint
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltaport import tinylineage as TL  # noqa: E402
from deltaport.check import SIGNALS, add_delta_into, check, classify  # noqa: E402
from deltaport import causal_lm  # noqa: E402

SOURCES = ["v1", "v2", "v3", "v2x"]
TARGETS = ["v1", "v2", "v3", "v2x", "rand"]
KIND = {("v1", "v2"): "within lineage", ("v2", "v1"): "within lineage (backport)",
        ("v1", "v3"): "cross-stage", ("v2", "v3"): "cross-stage", ("v3", "v1"): "cross-stage (backport)",
        ("v3", "v2"): "cross-stage (backport)"}


def kind_of(s: str, t: str) -> str:
    if t == "rand":
        return "random init"
    if "v2x" in (s, t):
        return "independent seed"
    return KIND[(s, t)]


def label(recovery: float) -> str:
    return "works" if recovery >= 0.5 else "fails" if recovery < 0.2 else "partial"


def measure_family(seed: int, steps: int, ft_steps: int, max_tokens: int) -> list[dict]:
    models = TL.build_grid(None, seed, steps=steps, ft_steps=ft_steps, save=False)
    lang = TL.Language(TL.tokenizer())
    data = lang.docs(200, 1, seed=7777 + seed)  # held-out stage-1 text, as token ids
    rows = []
    for s in SOURCES:
        for t in TARGETS:
            if s == t:
                continue
            r = check(models[s], models[f"ft_{s}"], models[t], data, max_tokens=max_tokens, seed=0,
                      calibration={})
            tr = copy.deepcopy(models[f"ft_{s}"])
            add_delta_into(causal_lm.named_params(tr), causal_lm.named_params(models[s]), causal_lm.named_params(models[t]))
            t_base, t_tr, t_ft = (TL.task_nll(m, lang) for m in (models[t], tr, models[f"ft_{t}"]))
            recovery = (t_base - t_tr) / (t_base - t_ft)
            rows.append({"family": f"tiny {seed}", "source": s, "target": t, "kind": kind_of(s, t),
                         **{k: r["signals"][k] for k in SIGNALS}, "barrier": r["signals"]["barrier"],
                         "task_base": t_base, "task_transfer": t_tr, "task_ft": t_ft, "recovery": recovery,
                         "label": label(recovery), "num_parameters": r["num_parameters"]})
    return rows


LAB_CONFIG = ROOT / "benchmarks" / "check-calibration-lab.yaml"


def lab_kind(s: str, t: str) -> str:
    if t == "M0":
        return "random init"
    if "Mx" in (s, t):
        return "independent seed"
    stage = lambda v: 1 if v in ("M1", "M2", "M3") else 2  # noqa: E731
    kind = "within lineage" if stage(s) == stage(t) else "cross-stage"
    return kind + (" (backport)" if s > t else "")


def measure_lab(seed: int, lab_dir: Path, max_tokens: int) -> list[dict]:
    """Run (or reuse) the lab for ``seed``; measure check's signals on every grid cell incl. M0."""
    import dataclasses
    import json
    import random

    from deltaport.lab.config import load_config
    from deltaport.lab.family import world_of
    from deltaport.lab.run import run_lab
    from deltaport.lab.world import Mix, sample_block

    cfg = load_config(LAB_CONFIG)
    cfg = dataclasses.replace(cfg, seed=seed, name=f"{cfg.name}-s{seed}")
    run_dir = lab_dir / f"seed{seed}"
    res_path = run_dir / "results.json"
    if not res_path.exists():
        run_lab(cfg, run_dir, progress=False)
    res = json.loads(res_path.read_text())
    world = world_of(cfg)
    rng = random.Random(f"check-calibration-{seed}")
    mix = Mix(**cfg.pretrain.stage2_mix)
    texts = [" ".join(sample_block(world, mix, rng, cfg.model.seq_len)[1:]) for _ in range(cfg.connectivity_items)]
    def where(p: str) -> str:  # the lab records paths relative to the directory it was run from
        q = Path(p)
        return str(q if q.is_absolute() or q.exists() else run_dir.resolve().parent / q)

    fam = {k: where(v) for k, v in res["family"].items()}
    models = {k: where(v) for k, v in res["models"].items()}
    grid, scores = res["grid"], res["scores"]
    rows = []
    V = list(cfg.versions)
    for s in V:
        for t in V + ["Mx", "M0"]:
            if s == t:
                continue
            r = check(fam[s], models[f"FT({s})"], fam[t], texts, max_tokens=max_tokens, seed=0, calibration={})
            gain = grid["cells"][t][s] - grid["base"][t]
            # the target's own fine-tuning gain; the lab does not fine-tune Mx / M0: the source's gain there
            ft_of = t if f"FT({t})" in scores else s
            ft_gain = scores[f"FT({ft_of})"]["heldout"] - scores[ft_of]["heldout"]
            recovery = gain / ft_gain if ft_gain >= 0.05 else float("nan")
            rows.append({"family": f"lab {seed}", "source": s, "target": t, "kind": lab_kind(s, t),
                         **{k: r["signals"][k] for k in SIGNALS}, "barrier": r["signals"]["barrier"],
                         "score_base": grid["base"][t], "score_transfer": grid["cells"][t][s],
                         "ft_gain": ft_gain, "recovery": recovery,
                         "label": label(recovery) if recovery == recovery else "partial",
                         "num_parameters": r["num_parameters"]})
    return rows


def fit(rows: list[dict]) -> dict:
    signals = {}
    for sig in SIGNALS:
        good = [r[sig] for r in rows if r["label"] == "works"]
        if not good:
            raise SystemExit("no pair of the calibration family has a working transfer; nothing to calibrate on")
        hi = max(good)
        above = [r[sig] for r in rows if r["label"] == "fails" and r[sig] > hi]
        if above:
            f = min(above)
            signals[sig] = {"likely_max": hi + (f - hi) / 3, "unlikely_min": hi + 2 * (f - hi) / 3,
                            "max_working": hi, "min_failing_above": f}
        else:  # no failing pair above the working ones: the signal does not separate them; report it, don't use it
            signals[sig] = {"likely_max": None, "unlikely_min": None, "max_working": hi, "min_failing_above": None}
    n = rows[0]["num_parameters"]
    return {
        "signals": signals,
        "scale": {"num_parameters": [n // 10, n * 10],
                  "rel_distance_max": 3 * max(r["rel_distance"] for r in rows)},
        "source": f"benchmarks/calibrate_check.py (family {rows[0]['family']}; table: docs/check-calibration.md)",
    }


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict], calib: dict) -> list[str]:
    out = ["| family | source → target | kind | rel. barrier | rel. distance | excess loss (rel.) | "
           "recovery | outcome | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict, _, _ = classify({k: r[k] for k in SIGNALS}, r["num_parameters"], calib)
        r["verdict"] = verdict
        out.append(f"| {r['family']} | {r['source']} → {r['target']} | {r['kind']} | {_fmt(r['relative_barrier'])} | "
                   f"{_fmt(r['rel_distance'])} | {_fmt(r['excess_loss_rel'])} | {_fmt(r['recovery'], 2)} | "
                   f"{r['label']} | {verdict} |")
    return out


def agreement(rows: list[dict]) -> tuple[int, int, int, int]:
    """(right, wrong, hedged, total): 'likely' is right for a working pair, 'unlikely' for a failing one;
    an 'uncertain' verdict or a partial outcome counts as hedged."""
    ok = wrong = hedged = 0
    for r in rows:
        v, lab = r["verdict"], r["label"]
        if v == "uncertain" or lab == "partial":
            hedged += 1
        elif (v == "likely") == (lab == "works"):
            ok += 1
        else:
            wrong += 1
    return ok, wrong, hedged, len(rows)


def _lab_text(rows, args) -> list[str]:
    return [
        "The demo/lab issue's model family (`deltaport.lab`, config `benchmarks/check-calibration-lab.yaml`, "
        f"built and scored by `deltaport lab run`; tiny Llama, {rows[0]['num_parameters']:,} parameters, "
        "word-level synthetic world): M1–M3 along one stage-1 run, M4–M5 continued on the stage-2 data mix, "
        "Mx = the same schedule from another init seed, M0 = random init. FT(M_i) = M_i fine-tuned on the "
        "flag-colour QA task. Kinds of pairs: within lineage (same stage), cross-stage (stage 1 ↔ 2), "
        "independent seed (Mx), random init (M0 as target).",
        "Outcome: recovery = [EM(M_t + Δ_s) − EM(M_t)] / [EM(FT(M_t)) − EM(M_t)] — the share of the target's "
        "own fine-tuning gain (held-out exact match) that the transfer delivers without training (the paper's "
        "m'_t ≈ m_t + Δ_s). The lab does not fine-tune Mx and M0; for those targets the source's gain "
        "EM(FT(M_s)) − EM(M_s) is the denominator. Recovery is undefined (counted *partial*) when the gain "
        "is below 0.05.",
    ]


def _tiny_text(rows, args) -> list[str]:
    return [
        "A tiny model family built by `deltaport.tinylineage.build_grid` (tiny Llama, "
        f"{rows[0]['num_parameters']:,} parameters, vocabulary 64, a synthetic Markov-chain language): "
        "`v1` pretrained; `v2` = `v1` continued on the same data (within lineage); `v3` = `v2` continued on "
        "shifted data (cross-stage); `v2x` = the same schedule from another init seed (independent seed); "
        "`rand` = random init. Each version is fine-tuned on a small task (`Q x A y .` with a fixed mapping).",
        "Outcome: recovery = [T(m_t) − T(m_t + Δ_s)] / [T(m_t) − T(m'_t)], T = task answer NLL, m'_t = the "
        "target fine-tuned with the same recipe.",
    ]


FAMILY_TEXT = {"lab": _lab_text, "tiny": _tiny_text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("lab", "tiny"), default="lab")
    ap.add_argument("--lab-dir", default=str(ROOT / "runs" / "check-calibration"),
                    help="where the lab runs are built and cached (resumable)")
    ap.add_argument("--calibrate-seed", type=int, default=0)
    ap.add_argument("--score-seeds", type=int, nargs="+", default=None,
                    help="families scored with the fitted thresholds (default: 1 for lab, 1 2 for tiny)")
    ap.add_argument("--cross-seeds", type=int, nargs="*", default=None,
                    help="families of the *other* kind scored with the fitted thresholds (default: tiny 1 for lab)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--module", default=str(ROOT / "src/deltaport/_check_calibration.py"))
    ap.add_argument("--doc", default=str(ROOT / "docs/check-calibration.md"))
    args = ap.parse_args(argv)
    if args.score_seeds is None:
        args.score_seeds = [1] if args.family == "lab" else [1, 2]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.family == "lab":
        measure = lambda sd: measure_lab(sd, Path(args.lab_dir), args.max_tokens)  # noqa: E731
    else:
        measure = lambda sd: measure_family(sd, args.steps, args.ft_steps, args.max_tokens)  # noqa: E731
    cal_rows = measure(args.calibrate_seed)
    calib = fit(cal_rows)
    score_rows = [r for sd in args.score_seeds for r in measure(sd)]
    if args.cross_seeds is None:
        args.cross_seeds = [1] if args.family == "lab" else []
    other = "tiny" if args.family == "lab" else "lab"
    cross_measure = ((lambda sd: measure_family(sd, args.steps, args.ft_steps, args.max_tokens)) if other == "tiny"
                     else (lambda sd: measure_lab(sd, Path(args.lab_dir), args.max_tokens)))
    cross_rows = [r for sd in args.cross_seeds for r in cross_measure(sd)]
    elapsed = time.perf_counter() - t0
    cal_table = table(cal_rows, calib)
    score_table = table(score_rows, calib)
    c_ok, c_wrong, c_h, c_n = agreement(cal_rows)
    s_ok, s_wrong, s_h, s_n = agreement(score_rows)
    cross_table = table(cross_rows, calib) if cross_rows else []
    x_ok, x_wrong, x_h, x_n = agreement(cross_rows) if cross_rows else (0, 0, 0, 0)

    cmd = "OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py" + (" " + " ".join(argv) if argv else "")
    mod = ['"""Thresholds of ``deltaport check``. GENERATED by benchmarks/calibrate_check.py - do not edit.',
           "", f"Regenerate: ``{cmd}``; the table behind them is docs/check-calibration.md.", '"""', "",
           f"CALIBRATION = {pprint.pformat(calib, width=110, sort_dicts=False)}", ""]
    Path(args.module).write_text("\n".join(mod))

    th_lines = ["| signal | max on a working pair | min failing pair above it | likely if ≤ | unlikely if ≥ |",
                "|---|---|---|---|---|"]
    for sig, th in calib["signals"].items():
        th_lines.append(f"| `{sig}` | {_fmt(th['max_working'], 4)} | {_fmt(th['min_failing_above'], 4)} | "
                        f"{_fmt(th['likely_max'], 4)} | {_fmt(th['unlikely_min'], 4)} |")
    lo, hi = calib["scale"]["num_parameters"]
    doc = [
        "# `deltaport check`: calibration table",
        "",
        "GENERATED by `benchmarks/calibrate_check.py` — do not edit by hand. Regenerate with",
        "",
        f"    {cmd}",
        "",
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, torch "
        f"{torch.__version__}, 1 thread, {platform.machine()}.",
        "",
        "## What was measured",
        "",
        *(FAMILY_TEXT[args.family](cal_rows, args)),
        "For each ordered pair (source s, target t) the three signals of `deltaport check` are measured on "
        f"{args.max_tokens} tokens of fixed text; the outcome label is *works* (recovery ≥ 0.5), *fails* "
        "(< 0.2) or *partial*.",
        "",
        f"## Thresholds (fitted on family {cal_rows[0]['family']})",
        "",
        *th_lines,
        "",
        "Rule: *unlikely* if any signal ≥ its `unlikely if ≥`; *likely* if every used signal ≤ its `likely if ≤`; "
        "otherwise *uncertain*. Thresholds sit one third and two thirds of the way across the gap between "
        "the largest value on a working pair and the smallest larger value on a failing pair. A signal with "
        "no failing pair above the working ones (–) does not separate the outcomes here: `check` reports it "
        "but does not use it.",
        f"Calibrated scale: {lo:,}–{hi:,} parameters and relative distance ≤ "
        f"{calib['scale']['rel_distance_max']:.3g}; outside it the verdict is *uncalibrated* (every real LLM "
        "is outside it: the verdict for those is *uncalibrated* and the signals are reported for comparison "
        "with this table).",
        "",
        f"## Calibration family ({cal_rows[0]['family']}) — the rule fitted here",
        "",
        *cal_table,
        "",
        f"Agreement: {c_ok} right, {c_wrong} wrong, {c_h} hedged (uncertain verdict or partial outcome) of {c_n}.",
        "",
        f"## Held-out famil{'y' if len(args.score_seeds) == 1 else 'ies'} ({args.family}, seed "
        f"{', '.join(map(str, args.score_seeds))}) — scored with the thresholds above",
        "",
        *score_table,
        "",
        f"Agreement: {s_ok} right, {s_wrong} wrong, {s_h} hedged (uncertain verdict or partial outcome) of {s_n}.",
        "",
        *([f"## Out of family ({other}, seed {', '.join(map(str, args.cross_seeds))}) — the same thresholds on "
           "a family of another design",
           "",
           *FAMILY_TEXT[other](cross_rows, args),
           "",
           *cross_table,
           "",
           f"Agreement: {x_ok} right, {x_wrong} wrong, {x_h} hedged of {x_n}. Thresholds fitted on one family "
           "design need not hold for another: read the signals against the tables, not only the verdict.",
           ""] if cross_rows else []),
        f"Caveats: one tiny architecture and scale; {len(cal_rows)} pairs in the calibration family, so each "
        "threshold rests on a handful of points; the task is tiny and synthetic. Treat the verdict as a cheap "
        "first look, not a guarantee.",
        "",
    ]
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text("\n".join(doc))
    print("\n".join(cal_table + [""] + score_table))
    print(f"calibration agreement {c_ok}/{c_n} right, {c_wrong} wrong; held-out {s_ok}/{s_n} right, {s_wrong} wrong; "
          f"out-of-family {x_ok}/{x_n} right, {x_wrong} wrong; {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
