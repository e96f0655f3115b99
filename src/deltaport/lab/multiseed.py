"""Several seeds of one lab config, and the findings decided on intervals across them.

``run_seeds(cfg, OUT, [0, 1, 2])`` runs the lab once per seed into ``OUT/seed-N`` (each a complete
run with its own report) and writes ``OUT/summary.json`` and ``OUT/summary.md``: per finding the
per-seed values, their mean, the seed-level spread and a 95 % hierarchical-bootstrap interval
(:mod:`deltaport.lab.stats`), and the verdict against the minimum effect of docs/lab.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from deltaport.lab.config import LabConfig
from deltaport.lab.findings import decide, fmt, rule_text, with_seeds_needed
from deltaport.lab.stats import z_of
from deltaport.lab.store import wall_seconds, write_text

SUMMARY_SCHEMA = 1


def run_seeds(cfg: LabConfig, out: str | Path, seeds: list[int], *, progress: bool | str = False,
              resume: bool = True) -> dict:
    from deltaport.lab.run import run_lab

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs, per_seed_s = [], {}
    for s in seeds:
        t1 = time.perf_counter()
        runs.append(run_lab(dataclasses.replace(cfg, seed=s), out / f"seed-{s}", progress=progress, resume=resume))
        per_seed_s[s] = round(time.perf_counter() - t1, 1)
    summary = summarize(runs)
    summary["timings_s"] = {"total": round(time.perf_counter() - t0, 1), "per_seed": per_seed_s}
    write_summary(summary, out)
    return summary


def summarize(runs: list[dict]) -> dict:
    """Findings across ``runs`` (one results dict per seed, same config but the seed)."""
    names = {r["name"] for r in runs}
    if len(names) != 1:
        raise ValueError(f"runs of different configs cannot be summarised together: {sorted(names)}")
    findings = decide(runs)
    for f in findings:
        f["ours"] = f"{fmt(f['mean'], f['unit'])} [{fmt(f['lo'], f['unit'])}, {fmt(f['hi'], f['unit'])}]"
        f["rule"] = rule_text(f)
    envs = [r.get("environment", {}) for r in runs]
    V = runs[0]["config"]["versions"]
    headline = {}
    for key in [f"FT({v})" for v in V] + V + [f"{V[-1]}+Δ{V[-2][1:]}"]:
        vals = [r["scores"][key]["heldout"] for r in runs if key in r["scores"]]
        if len(vals) == len(runs):
            headline[key] = vals
    fewshot = {v: [r.get("fewshot", {}).get("base", {}).get(v) for r in runs] for v in V}
    sm = {"schema": SUMMARY_SCHEMA, "design": runs[0].get("design", 2), "name": runs[0]["name"], "seeds": [r["config"]["seed"] for r in runs],
          "findings": findings, "heldout_per_seed": headline, "fewshot_base_per_seed": fewshot,
          "environment": envs[0], "same_environment_every_seed": all(e == envs[0] for e in envs),
          "config": {k: v for k, v in runs[0]["config"].items() if k != "seed"},
          "timings_per_seed_s": [wall_seconds(r) for r in runs]}
    if any(r.get("noise_twin") for r in runs):  # the seeds' noise twins: deltaport.lab.noise
        _add_noise(sm, runs)
    if all(r.get("compression") for r in runs):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import combine

        sm["compression"] = combine([r["compression"] for r in runs])
    return sm


def _add_noise(sm: dict, runs: list[dict]) -> None:
    """Each finding's twin and its noise spread, from the seeds that ran a noise twin (all of them, or some).

    The findings are decided again on the runs with every twinned seed's run replaced by its twin (the multi-seed
    verdict under floating-point noise: ``twin_verdict``); per seed |θ − θ_twin| (``None`` for a seed without a
    twin), ``noise_spread`` = the largest; beside it ``seed_spread`` = max − min over seeds. The held-out scores get
    the same (``heldout_noise_per_seed``). ``noise_twin.seeds`` lists the twinned seeds."""
    twin_of = {i: json.loads((Path(r["noise_twin"]["run_dir"]) / "results.json").read_text())
               for i, r in enumerate(runs) if r.get("noise_twin")}
    by_id = {f["id"]: f for f in decide([twin_of.get(i, r) for i, r in enumerate(runs)])}
    for f in sm["findings"]:
        t = by_id.get(f["id"])
        f["seed_spread"] = max(f["per_seed"]) - min(f["per_seed"])
        if t is None:
            f.update(twin_per_seed=None, twin_mean=None, twin_verdict=None, noise_per_seed=None, noise_spread=None)
            continue
        gaps = [abs(a - b) if i in twin_of else None for i, (a, b) in enumerate(zip(f["per_seed"], t["per_seed"]))]
        known = [g for g in gaps if g is not None]
        f.update(twin_per_seed=t["per_seed"], twin_mean=t["mean"], twin_lo=t["lo"], twin_hi=t["hi"],
                 twin_verdict=t["verdict"], same_verdict=t["verdict"] == f["verdict"], noise_per_seed=gaps,
                 noise_spread=None if not known or any(g != g for g in known) else max(known))
    sm["heldout_noise_per_seed"] = {k: [abs(r["scores"][k]["heldout"] - r["noise_twin"]["scores"][k])
                                        if r.get("noise_twin") and k in r["noise_twin"]["scores"] else None
                                        for r in runs]
                                    for k in sm["heldout_per_seed"]}
    first = next(r for r in runs if r.get("noise_twin"))
    sm["noise_twin"] = {"what": first["noise_twin"]["what"],
                        "seeds": [r["config"]["seed"] for r in runs if r.get("noise_twin")],
                        "verdicts_identical": all(f.get("same_verdict", True) for f in sm["findings"]),
                        "twin_timings_s": [wall_seconds(r["noise_twin"]) if r.get("noise_twin")
                                           else None for r in runs]}


def summarize_dir(out: str | Path, seeds: list[int] | None = None) -> dict:
    """``OUT/summary.{json,md}`` from finished seed runs already in ``OUT/seed-N`` (every ``seed-*`` by default),
    reading their ``results.json`` and rerunning nothing: for seeds run by separate processes (or machines) into
    one directory, or some with a noise twin and some without."""
    out = Path(out)
    dirs = ([out / f"seed-{s}" for s in seeds] if seeds is not None
            else sorted(out.glob("seed-*"), key=lambda d: int(d.name.split("-", 1)[1])))
    from deltaport.errors import InputError

    missing = [str(d) for d in dirs if not (d / "results.json").is_file()]
    if missing or len(dirs) < 2:
        raise InputError(f"{out}: a summary needs at least two finished seed runs (OUT/seed-N/results.json); "
                         + (f"missing: {', '.join(missing)}" if missing else f"found {len(dirs)}")
                         + ". Run them with `deltaport lab run CONFIG -o OUT --seeds ...` first.")
    runs = []
    for d in dirs:
        try:
            r = json.loads((d / "results.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{d / 'results.json'}: not a readable lab results file ({exc}); rerun that seed") from exc
        if not isinstance(r, dict) or "config" not in r or "name" not in r:
            raise InputError(f"{d / 'results.json'}: not a lab run's results.json (no config/name); rerun that seed")
        runs.append(r)
    try:
        summary = summarize(runs)
    except ValueError as exc:  # runs of different configs
        raise InputError(f"{out}: {exc}") from exc
    summary["timings_s"] = {"per_seed": {r["config"]["seed"]: wall_seconds(r) for r in runs},
                            "from": "each seed's results.json (summarised apart)"}
    write_summary(summary, out)
    return summary


def _noise_sentence(sm: dict) -> str:
    nt = sm["noise_twin"]
    tw = nt.get("seeds", sm["seeds"])
    same = "yes" if nt["verdicts_identical"] else "**no**"
    if list(tw) == list(sm["seeds"]):
        return (f" Every seed also ran its {nt['what']}; the findings were decided again on the twins "
                f"(verdicts identical: {same}).")
    return (f" Seed{'s' if len(tw) > 1 else ''} {', '.join(map(str, tw))} of {len(sm['seeds'])} also ran "
            f"{'their' if len(tw) > 1 else 'its'} {nt['what']}; the findings were decided again with "
            f"{'those seeds' if len(tw) > 1 else 'that seed'} replaced by {'their twins' if len(tw) > 1 else 'its twin'}"
            f" (verdicts identical: {same}); noise spreads are over the twinned seeds only.")


def summary_md(sm: dict) -> str:
    from deltaport.lab.env import kind_of

    env = sm.get("environment", {})
    seeds = ", ".join(map(str, sm["seeds"]))
    noisy = bool(sm.get("noise_twin"))
    L = [f"# deltaport lab: `{sm['name']}` over seeds {seeds}", "",
         "Each finding is a statistic θ computed within one seed from per-item correctness on the held-out items; "
         "the estimate is the mean over seeds, the 95 % interval a hierarchical bootstrap (resample seeds, then "
         "items within each seed; 2000 replicates, fixed RNG seed). Verdict against the minimum effect frozen in "
         "docs/lab.md: *yes* = interval entirely on the claim's side, *no* = entirely on the other side, "
         "*inconclusive* = it straddles the threshold."
         + (_noise_sentence(sm) if noisy else ""),
         "",
         "| finding | statistic θ | rule | per seed | mean [95 % interval] | seed sd | reproduced? |"
         + (" seed spread (max − min) | noise spread (max over seeds) | noise twin: verdict |" if noisy else ""),
         "|---|---|---|---|---|---|---|" + ("---|---|---|" if noisy else "")]
    for f in sm["findings"]:
        per = " / ".join(fmt(x, f["unit"]) for x in f["per_seed"])
        sd = "–" if f["seed_sd"] is None else fmt(f["seed_sd"], f["unit"]).lstrip("+")
        v = f["verdict"] if f["verdict"] == "yes" else f"**{f['verdict']}**"
        row = f"| ({f['id']}) {f['claim']} | {f['statistic']} | {f['rule']} | {per} | {f['ours']} | {sd} | {v} |"
        if noisy:
            twin = f.get("twin_verdict") or "–"
            row += (f" {fmt(f.get('seed_spread'), f['unit']).lstrip('+')} | "
                    f"{fmt(f.get('noise_spread'), f['unit']).lstrip('+')} | "
                    f"{twin if twin == f['verdict'] else f'**{twin}**'} |")
        L.append(row)
    noise = sm.get("heldout_noise_per_seed") or {}
    L += ["", "Held-out exact match (%) per seed" + (", with the seed spread (max − min) and the noise spread "
                                                     "(largest |seed − its noise twin|) side by side:" if noisy else ":"),
          "", "| model | " + " | ".join(f"seed {s}" for s in sm["seeds"]) + " |"
          + (" seed spread | noise spread |" if noisy else ""),
          "|---|" + "---|" * len(sm["seeds"]) + ("---|---|" if noisy else "")]
    for k, vals in sm["heldout_per_seed"].items():
        row = f"| {k} | " + " | ".join(f"{100 * x:.1f}" for x in vals) + " |"
        if noisy:
            gaps = [g for g in noise.get(k, []) if g is not None]
            row += f" {100 * (max(vals) - min(vals)):.1f} | {f'{100 * max(gaps):.1f}' if gaps else '–'} |"
        L.append(row)
    for k, vals in sm["fewshot_base_per_seed"].items():
        L.append(f"| {k} few-shot | " + " | ".join("–" if x is None else f"{100 * x:.1f}" for x in vals) + " |")
    if sm.get("compression"):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import summary_section

        L += ["", "## Compressed Δ: bytes vs held-out score", "", "![compression](compression.png)", "",
              summary_section(sm["compression"], threads=env.get("torch_threads"))]
    L += seeds_section(sm["findings"])
    L += ["", f"Environment: CPU {kind_of(env)}, python {env.get('versions', {}).get('python')}, "
              f"{env.get('platform')}; versions: "
          + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ".",
          "", f"Wall time per seed (s, every pass over the seed's directory summed): "
              f"{', '.join(str(x) for x in sm.get('timings_per_seed_s', []))} "
              "(shared machine: see docs/lab.md for the load during the run; results written before deltaport "
              "recorded passes hold only the last pass, seconds when it was a resume).", ""]
    return "\n".join(L)


def _fine(x: float, unit: str, sign: str = "") -> str:
    """A finding's number with one digit more than the tables (:func:`~deltaport.lab.findings.fmt`), so a reader
    can redo the seed count from it."""
    scale, digits, pc = {"points": (100, 2, ""), "fraction": (100, 1, " %")}.get(unit, (1, 3, ""))
    return f"{scale * x:{sign}.{digits}f}{pc}"


def seeds_section(findings: list[dict]) -> list[str]:
    """summary.md's lines on the findings left undecided: how many seeds would decide each
    (:func:`deltaport.lab.stats.seeds_needed`, from the finding's own numbers) and how that is estimated."""
    undecided = [with_seeds_needed(f) for f in findings if f["verdict"] == "inconclusive" and f.get("n_seeds", 1) > 1]
    if not undecided:
        return []
    level = undecided[0].get("level", 0.95)
    L = ["", "## Undecided findings: the seeds a decision would need", ""]
    for f in undecided:
        if f["mean"] is None or f["mean"] != f["mean"] or f.get("seed_sd") is None or f["seed_sd"] != f["seed_sd"]:
            L.append(f"- ({f['id']}) θ is undefined on some seeds: no seed count follows.")
            continue
        u, d = f["unit"], abs(f["mean"] - f["threshold"])
        L.append(f"- ({f['id']}) θ = {_fine(f['mean'], u, '+')}, {_fine(d, u)} from the threshold "
                 f"{_fine(f['threshold'], u, '+')}, between-seed SD {_fine(f['seed_sd'], u)} over {f['n_seeds']} "
                 "seeds: "
                 + (f"about **{f['seeds_needed']}** seeds would decide it." if "seeds_needed" in f
                    else f"{f['seeds_needed_note']}."))
    L += ["", f"`seeds_needed` (summary.json) = ⌈(z · sd / |mean − threshold|)²⌉, z = {z_of(level):.2f} for a "
              f"{100 * level:g} % interval, sd the between-seed SD: the interval's half-width shrinks as "
              "z · sd / √n and the finding is decided once it is below the mean's distance from the threshold; at least one "
              "more seed than ran. It assumes more seeds show the same mean and SD, independent seeds and a normal "
              "mean over seeds: an estimate of scale, not a promise."]
    return L


def write_summary(sm: dict, out: Path) -> None:
    out = Path(out)
    if sm.get("compression"):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import figure

        figure(sm["compression"], out / "compression.png", title="compressed Δ: bytes vs held-out score, every "
               f"transfer cell, mean over seeds {', '.join(map(str, sm['seeds']))}")
    write_text(out / "summary.json", json.dumps(sm, indent=1, sort_keys=True, default=str))
    write_text(out / "summary.md", summary_md(sm))
