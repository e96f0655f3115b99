"""Calibrate the thresholds of ``deltaport check`` on a tiny model family, score them on others.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py                        # lab families, 3 sizes
    OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py --sizes small medium   # the sizes you can afford
    OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py --family tiny          # own tiny lineage: ~1 min

Cost, 1 thread, lab families built from scratch: small (~14k parameters) ~5 min, medium (~150k) ~15 min,
large (~1.44M) about 10× the medium's training; each is cached in ``--lab-dir`` and reused.

Writes ``src/deltaport/_check_calibration.py`` (the thresholds the package ships) and
``docs/check-calibration.md`` (the table behind them). Nothing there is hand-edited.

Families (one per seed; the first seed calibrates, the others are scored with its thresholds):

* ``lab`` (default): the demo/lab issue's family (``deltaport.lab``) at several sizes (``--sizes``:
  the ``model:`` section of ``benchmarks/check-calibration-lab{-small,,-large}.yaml``; same world and
  schedule), fitted on all of them pooled: M1–M3 along one stage-1 run, M4–M5 continued on the
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

Thresholds (fitted on the calibration families only, seed 0 of every size pooled): for each signal, ``hi`` = the largest value seen
on a working pair, ``f`` = the smallest value above ``hi`` seen on a failing pair. ``likely_max`` =
hi + (f − hi)/3, ``unlikely_min`` = hi + 2(f − hi)/3. A signal with no failing pair above hi does
not separate the outcomes on this family: it is reported but not used for the verdict. The verdict is "unlikely" if any signal is ≥ its
unlikely_min, "likely" if all are ≤ likely_max, else "uncertain". The calibrated scale is the span of
parameter counts the calibration families cover, no wider. Per size the script also reports the signals'
spread by kind of pair, the thresholds that size alone would give, and each size scored with thresholds
fitted on the other sizes only (how well the rule carries across scale). Every row goes to
``docs/results/check-calibration.json``.
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
            rows.append({"family": f"tiny {seed}", "size": "tiny", "seed": seed, "source": s, "target": t,
                         "kind": kind_of(s, t),
                         **{k: r["signals"][k] for k in SIGNALS}, "barrier": r["signals"]["barrier"],
                         "task_base": t_base, "task_transfer": t_tr, "task_ft": t_ft, "recovery": recovery,
                         "label": label(recovery), "num_parameters": r["num_parameters"]})
    return rows


LAB_CONFIG = ROOT / "benchmarks" / "check-calibration-lab.yaml"
#: size -> lab config (the same world and schedule; only ``model:`` differs)
LAB_CONFIGS = {"small": ROOT / "benchmarks" / "check-calibration-lab-small.yaml", "medium": LAB_CONFIG,
               "large": ROOT / "benchmarks" / "check-calibration-lab-large.yaml"}


def lab_kind(s: str, t: str) -> str:
    if t == "M0":
        return "random init"
    if "Mx" in (s, t):
        return "independent seed"
    stage = lambda v: 1 if v in ("M1", "M2", "M3") else 2  # noqa: E731
    kind = "within lineage" if stage(s) == stage(t) else "cross-stage"
    return kind + (" (backport)" if s > t else "")


def lab_run_dir(size: str, seed: int, lab_dir: Path):
    """(config with ``seed``, its run directory under ``lab_dir``) of the lab family of ``size``."""
    import dataclasses

    from deltaport.lab.config import load_config

    cfg = load_config(LAB_CONFIGS[size])
    return dataclasses.replace(cfg, seed=seed, name=f"{cfg.name}-s{seed}"), lab_dir / cfg.name / f"seed{seed}"


def measure_lab(seed: int, lab_dir: Path, max_tokens: int, size: str = "medium") -> list[dict]:
    """Run (or reuse) the lab of ``size`` for ``seed``; measure check's signals on every grid cell incl. M0."""
    import json
    import random

    from deltaport.lab.family import world_of
    from deltaport.lab.run import run_lab
    from deltaport.lab.world import Mix, sample_block

    cfg, run_dir = lab_run_dir(size, seed, lab_dir)
    res_path = run_dir / "results.json"
    if not res_path.exists():
        run_lab(cfg, run_dir, progress=False)
    res = json.loads(res_path.read_text())
    cached = run_dir / f"check-rows-{max_tokens}.json"  # check's signals do not depend on the thresholds
    if cached.exists() and json.loads(cached.read_text()).get("results_sha") == _sha(res_path):
        return json.loads(cached.read_text())["rows"]
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
            rows.append({"family": f"lab {size} {seed}", "size": size, "seed": seed, "model": cfg.to_dict()["model"],
                         "source": s, "target": t, "kind": lab_kind(s, t),
                         **{k: r["signals"][k] for k in SIGNALS}, "barrier": r["signals"]["barrier"],
                         "score_base": grid["base"][t], "score_transfer": grid["cells"][t][s],
                         "ft_gain": ft_gain, "recovery": recovery,
                         "label": label(recovery) if recovery == recovery else "partial",
                         "num_parameters": r["num_parameters"]})
    cached.write_text(json.dumps({"results_sha": _sha(res_path), "rows": rows}, default=str))
    return rows


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    sizes = sorted({r["num_parameters"] for r in rows})
    families = sorted({r["family"] for r in rows}, key=lambda f: next(r["num_parameters"] for r in rows if r["family"] == f))
    return {
        "signals": signals,
        "scale": {"num_parameters": [sizes[0], sizes[-1]],
                  "rel_distance_max": 3 * max(r["rel_distance"] for r in rows)},
        "families": [{k: next(r for r in rows if r["family"] == f).get(k) for k in ("family", "num_parameters", "seed", "model")}
                     for f in families],
        "source": f"benchmarks/calibrate_check.py (famil{'y' if len(families) == 1 else 'ies'} {', '.join(families)}; "
                  "table: docs/check-calibration.md)",
    }


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict], calib: dict, *, scale_check: bool = True) -> list[str]:
    """The rows as a markdown table, each with the verdict ``calib`` gives it (``scale_check=False``: the
    thresholds alone, whatever the calibrated span: a size scored with the other sizes' thresholds)."""
    out = ["| family | source → target | kind | rel. barrier | rel. distance | excess loss (rel.) | "
           "recovery | outcome | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    if not scale_check:
        calib = dict(calib, scale=dict(calib["scale"], num_parameters=[0, 1 << 62], rel_distance_max=float("inf")))
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


def _params(rows) -> str:
    """The families' sizes in words: '14,256 (small), 150,336 (medium)'."""
    seen = {}
    for r in rows:
        seen.setdefault(r["size"], r["num_parameters"])
    return ", ".join(f"{n:,} ({k})" for k, n in sorted(seen.items(), key=lambda kv: kv[1]))


def _lab_text(rows, args) -> list[str]:
    return [
        "The demo/lab issue's model family (`deltaport.lab`, configs `benchmarks/check-calibration-lab{-small,,-large}.yaml`, "
        f"built and scored by `deltaport lab run`; tiny Llama of {_params(rows)} parameters: the configs differ only in "
        "their `model:` section; word-level synthetic world): M1–M3 along one stage-1 run, M4–M5 continued on the stage-2 data mix, "
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
KINDS = ("within lineage", "cross-stage", "independent seed", "random init")


def _spread(vals: list[float]) -> str:
    vals = sorted(v for v in vals if v == v)
    if not vals:
        return "–"
    return f"{vals[0]:.3f} – {vals[-1]:.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def scale_tables(cal_rows: list[dict]) -> tuple[list[str], dict]:
    """How the signals move with scale: per size, each signal's range by kind of pair (backports with
    their kind), the thresholds that size alone gives, and that size scored with thresholds fitted on the
    other sizes only. Returns the markdown lines and the same numbers for the results file."""
    sizes = sorted({r["size"] for r in cal_rows}, key=lambda k: next(r["num_parameters"] for r in cal_rows if r["size"] == k))
    record: dict = {}
    lines = ["| size | parameters | signal | " + " | ".join(KINDS) + " | fitted on this size alone: likely ≤ / unlikely ≥ |",
             "|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for size in sizes:
        rows = [r for r in cal_rows if r["size"] == size]
        try:
            own = fit(rows)["signals"]
        except SystemExit:
            own = None
        rec = record.setdefault(size, {"num_parameters": rows[0]["num_parameters"], "signals": {}})
        for sig in SIGNALS:
            by_kind = {k: [r[sig] for r in rows if r["kind"].split(" (")[0] == k] for k in KINDS}
            th = (own or {}).get(sig) or {}
            rec["signals"][sig] = {"by_kind": {k: [min(v), max(v)] if v else None for k, v in by_kind.items()},
                                   "own_thresholds": th or None}
            lines.append(f"| {size} | {rows[0]['num_parameters']:,} | `{sig}` | " +
                         " | ".join(_spread(by_kind[k]) for k in KINDS) +
                         f" | {_fmt(th.get('likely_max'), 4)} / {_fmt(th.get('unlikely_min'), 4)} |")
        labels = {k: sum(r["label"] == k for r in rows) for k in ("works", "partial", "fails")}
        rec["labels"] = labels
    held = []
    if len(sizes) > 1:
        held = ["| left-out size | parameters | fitted on | right | wrong | hedged | of |", "|---|---|---|---|---|---|---|"]
        for size in sizes:
            rest = [r for r in cal_rows if r["size"] != size]
            rows = [copy.copy(r) for r in cal_rows if r["size"] == size]
            try:
                cal = fit(rest)
            except SystemExit:
                continue
            table(rows, cal, scale_check=False)
            ok, wrong, hedged, n = agreement(rows)
            record[size]["left_out"] = {"fitted_on": sorted({r["size"] for r in rest}), "right": ok, "wrong": wrong,
                                        "hedged": hedged, "of": n}
            held.append(f"| {size} | {rows[0]['num_parameters']:,} | {', '.join(sorted({r['size'] for r in rest}))} | "
                        f"{ok} | {wrong} | {hedged} | {n} |")
    labels = ["| size | works | partial | fails |", "|---|---|---|---|"] + [
        f"| {k} | {v['labels']['works']} | {v['labels']['partial']} | {v['labels']['fails']} |" for k, v in record.items()]
    return lines + [""] + labels + ([""] + held if held else []), record


def main(argv=None) -> int:
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("lab", "tiny"), default="lab")
    ap.add_argument("--sizes", nargs="+", choices=tuple(LAB_CONFIGS), default=list(LAB_CONFIGS),
                    help="lab family sizes to calibrate on, pooled (default: all three)")
    ap.add_argument("--score-sizes", nargs="*", choices=tuple(LAB_CONFIGS), default=None,
                    help="sizes whose held-out seeds are scored (default: --sizes)")
    ap.add_argument("--lab-dir", default=str(ROOT / "runs" / "check-calibration"),
                    help="where the lab runs are built and cached (resumable)")
    ap.add_argument("--calibrate-seed", type=int, default=0)
    ap.add_argument("--score-seeds", type=int, nargs="*", default=None,
                    help="families scored with the fitted thresholds (default: 1 for lab, 1 2 for tiny)")
    ap.add_argument("--cross-seeds", type=int, nargs="*", default=None,
                    help="families of the *other* kind scored with the fitted thresholds (default: tiny 1 for lab)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--module", default=str(ROOT / "src/deltaport/_check_calibration.py"))
    ap.add_argument("--doc", default=str(ROOT / "docs/check-calibration.md"))
    ap.add_argument("--results", default=str(ROOT / "docs/results/check-calibration.json"))
    args = ap.parse_args(argv)
    if args.score_seeds is None:
        args.score_seeds = [1] if args.family == "lab" else [1, 2]
    if args.score_sizes is None:
        args.score_sizes = list(args.sizes)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lab_dir = Path(args.lab_dir)
    if args.family == "lab":
        cal_rows = [r for size in args.sizes for r in measure_lab(args.calibrate_seed, lab_dir, args.max_tokens, size)]
        score_rows = [r for size in args.score_sizes for sd in args.score_seeds
                      for r in measure_lab(sd, lab_dir, args.max_tokens, size)]
    else:
        cal_rows = measure_family(args.calibrate_seed, args.steps, args.ft_steps, args.max_tokens)
        score_rows = [r for sd in args.score_seeds for r in measure_family(sd, args.steps, args.ft_steps, args.max_tokens)]
    calib = fit(cal_rows)
    if args.cross_seeds is None:
        args.cross_seeds = [1] if args.family == "lab" else []
    other = "tiny" if args.family == "lab" else "lab"
    cross_measure = ((lambda sd: measure_family(sd, args.steps, args.ft_steps, args.max_tokens)) if other == "tiny"
                     else (lambda sd: measure_lab(sd, lab_dir, args.max_tokens)))
    cross_rows = [r for sd in args.cross_seeds for r in cross_measure(sd)]
    elapsed = time.perf_counter() - t0
    calib["held_out"] = sorted({r["family"] for r in score_rows}) + sorted({r["family"] for r in cross_rows})
    cal_table = table(cal_rows, calib)
    score_table = table(score_rows, calib)
    c_ok, c_wrong, c_h, c_n = agreement(cal_rows)
    s_ok, s_wrong, s_h, s_n = agreement(score_rows)
    cross_table = table(cross_rows, calib) if cross_rows else []
    x_ok, x_wrong, x_h, x_n = agreement(cross_rows) if cross_rows else (0, 0, 0, 0)
    scale_lines, scale_record = scale_tables(cal_rows) if args.family == "lab" else ([], {})

    cmd = "OMP_NUM_THREADS=1 python benchmarks/calibrate_check.py" + (" " + " ".join(argv) if argv else "")
    mod = ['"""Thresholds of ``deltaport check``. GENERATED by benchmarks/calibrate_check.py - do not edit.',
           "", f"Regenerate: ``{cmd}``; the table behind them is docs/check-calibration.md.", '"""', "",
           f"CALIBRATION = {pprint.pformat(calib, width=110, sort_dicts=False)}", ""]
    Path(args.module).write_text("\n".join(mod))
    run = {"command": cmd, "utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
           "seconds": round(elapsed), "torch": torch.__version__, "threads": 1, "machine": platform.machine()}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"run": run, "calibration": calib, "scale": scale_record,
                                              "rows": {"calibration": cal_rows, "held_out": score_rows,
                                                       "out_of_family": cross_rows}},
                                             indent=1, sort_keys=True, default=str) + "\n")

    th_lines = ["| signal | max on a working pair | min failing pair above it | likely if ≤ | unlikely if ≥ |",
                "|---|---|---|---|---|"]
    for sig, th in calib["signals"].items():
        th_lines.append(f"| `{sig}` | {_fmt(th['max_working'], 4)} | {_fmt(th['min_failing_above'], 4)} | "
                        f"{_fmt(th['likely_max'], 4)} | {_fmt(th['unlikely_min'], 4)} |")
    lo, hi = calib["scale"]["num_parameters"]
    fams = ", ".join(f["family"] for f in calib["families"])
    doc = [
        "# `deltaport check`: calibration table",
        "",
        "GENERATED by `benchmarks/calibrate_check.py` — do not edit by hand. Regenerate with",
        "",
        f"    {cmd}",
        "",
        f"Run: {run['utc']} UTC, {elapsed:.0f} s (lab families cached in `--lab-dir` are reused), torch "
        f"{torch.__version__}, 1 thread, {platform.machine()}. Every row below: `{os.path.relpath(args.results, ROOT)}`.",
        "",
        "## What was measured",
        "",
        *(FAMILY_TEXT[args.family](cal_rows, args)),
        "For each ordered pair (source s, target t) the three signals of `deltaport check` are measured on "
        f"{args.max_tokens} tokens of fixed text; the outcome label is *works* (recovery ≥ 0.5), *fails* "
        "(< 0.2) or *partial*.",
        "",
        f"## Thresholds (fitted on {fams}, pooled)",
        "",
        *th_lines,
        "",
        "Rule: *unlikely* if any signal ≥ its `unlikely if ≥`; *likely* if every used signal ≤ its `likely if ≤`; "
        "otherwise *uncertain*. Thresholds sit one third and two thirds of the way across the gap between "
        "the largest value on a working pair and the smallest larger value on a failing pair. A signal with "
        "no failing pair above the working ones (–) does not separate the outcomes here: `check` reports it "
        "but does not use it.",
        f"Calibrated scale: {lo:,}–{hi:,} parameters (the span of the calibration families, no wider) and relative "
        f"distance ≤ {calib['scale']['rel_distance_max']:.3g}; outside it the verdict is *uncalibrated*, and "
        "`check` says where the model sits relative to this span and how its signals read against these "
        "thresholds (every real LLM is outside it).",
        "",
        *([f"## How the signals move with scale (calibration families, seed {args.calibrate_seed})", "",
           "Range (min – max) of each signal by kind of pair (backports counted with their kind), per size, "
           "and the thresholds that size alone would give; then the outcome labels per size, and each size "
           "scored with thresholds fitted on the other sizes only.", "",
           *scale_lines, ""] if scale_lines else []),
        f"## Calibration famil{'y' if len(calib['families']) == 1 else 'ies'} ({fams}) — the rule fitted here",
        "",
        *cal_table,
        "",
        f"Agreement: {c_ok} right, {c_wrong} wrong, {c_h} hedged (uncertain verdict or partial outcome) of {c_n}.",
        "",
        *([f"## Held-out famil{'y' if len({r['family'] for r in score_rows}) == 1 else 'ies'} "
           f"({', '.join(sorted({r['family'] for r in score_rows}))}) — scored with the thresholds above",
           "",
           *score_table,
           "",
           f"Agreement: {s_ok} right, {s_wrong} wrong, {s_h} hedged (uncertain verdict or partial outcome) of {s_n}.",
           ""] if score_rows else []),
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
        f"Caveats: one tiny architecture; {len(cal_rows)} pairs in the calibration families, so each "
        "threshold rests on a handful of points; the task is tiny and synthetic. Treat the verdict as a cheap "
        "first look, not a guarantee.",
        "",
    ]
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text("\n".join(doc))
    print("\n".join(cal_table + [""] + score_table + [""] + scale_lines))
    print(f"calibration agreement {c_ok}/{c_n} right, {c_wrong} wrong; held-out {s_ok}/{s_n} right, {s_wrong} wrong; "
          f"out-of-family {x_ok}/{x_n} right, {x_wrong} wrong; {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
