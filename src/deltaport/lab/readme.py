"""The README's lab tables, generated from the committed result files under ``docs/results/``.

    python benchmarks/readme_tables.py collect --quick RUN_DIR --full RUN_DIR   # copy runs into docs/results
    python benchmarks/readme_tables.py                                          # rewrite README's tables
    python benchmarks/readme_tables.py --check                                  # exit 1 if README disagrees
    python benchmarks/readme_tables.py reports [--check]     # re-render docs/results' report.md / summary.md

The README holds three generated blocks between ``<!-- lab:quick:begin -->``/``<!-- lab:quick:end -->``,
``<!-- lab:findings:begin -->``/``<!-- lab:findings:end -->`` and ``<!-- lab:compression:begin -->``/
``<!-- lab:compression:end -->`` (the last also in docs/compression.md); nothing between the markers is
hand-edited. ``tests/test_lab.py`` compares them with the files (it never reruns the lab).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from deltaport.lab.findings import fmt, with_seeds_needed
from deltaport.lab.report import span
from deltaport.lab.store import wall_seconds

QUICK = "docs/results/quick/results.json"
#: the same demo at ``--threads 2`` on the same machine (its claims are compared with QUICK's in the README)
QUICK_THREADS2 = "docs/results/quick/threads-2/results.json"
FULL = "docs/results/full/summary.json"
COMPRESSION = "docs/results/full/compression.json"  # deltaport.lab.compression.collect
BLOCKS = ("quick", "findings", "compression")


def _p(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def design_of(r: dict) -> int:
    """The lab design (docs/lab.md) a results.json or summary.json comes from (2 before the key existed)."""
    return int(r.get("design", 2))


def quick_table(r: dict) -> str:
    """The one-seed demo's headline numbers (held-out exact match, %), with its noise twin's beside them."""
    V = r["config"]["versions"]
    fs = r.get("fewshot", {}).get("base", {})
    t, s = V[-1], V[-2]
    seed = r["config"]["seed"]
    twin = r.get("noise_twin")
    conn = r.get("connectivity", {})
    within = [v["barrier"] for k, v in conn.get("curves", {}).items() if "Mx" not in k and "M0" not in k]
    across = [v["barrier"] for k, v in conn.get("curves", {}).items() if "Mx" in k and "M0" not in k]
    ttf = r.get("transfer_then_finetune", {}).get("steps_to_plain_final", {}).get(f"{t}+Δ{s[1:]}", {})

    def cells(sc: dict, bold: bool = False) -> dict[str, str]:
        """The score rows from held-out scores ``{model: EM}`` (the run's or its twin's)."""
        best = lambda target: max((v for n, v in sc.items() if n.startswith(f"{target}+Δ")), default=None)  # noqa: E731
        first = f"**{_p(sc.get(f'{t}+Δ{s[1:]}'))}**" if bold else _p(sc.get(f"{t}+Δ{s[1:]}"))
        out = {"recycle": f"{first} vs {_p(sc.get(f'FT({t})'))}",
               "backport": f"{_p(sc.get(f'{s}+Δ{t[1:]}'))} vs {_p(sc.get(f'FT({s})'))}",
               "weak": _p(sc.get(f"{t}+Δ{V[0][1:]}")), "controls": f"{_p(best('Mx'))} / {_p(best('M0'))}"}
        if ttf:
            out["ttf"] = f"{_p(sc.get(f'FT½({t}+Δ{s[1:]})'))} vs {_p(sc.get(f'FT({t})'))}"
        return out

    ours = cells({n: v["heldout"] for n, v in r["scores"].items()}, bold=True)
    ours["recycle"] += f" (base {t}: {_p(r['scores'][t]['heldout'])} zero-shot, {_p(fs.get(t))} few-shot)"
    if ttf:
        ours["ttf"] = (f"{_p(ttf.get('half_budget_transfer'))} ({ttf.get('half_budget_steps')} steps) vs "
                       f"{_p(ttf.get('plain_final'))} ({r['config']['finetune']['steps']} steps)")
    noisy = cells(twin["scores"]) if twin else {}
    labels = {"recycle": (f"{t} + Δ{s[1:]} vs FT({t})", "Table 3"),
              "backport": (f"{s} + Δ{t[1:]} (backport) vs FT({s})", "Table 1"),
              "weak": (f"{t} + Δ{V[0][1:]} (weak source)", "Table 3"),
              "controls": ("Mx + Δ_s (other seed) / M0 + Δ_s (random init), best s", "Table 8"),
              "ttf": (f"FT from {t} + Δ{s[1:]} with half the steps vs plain FT({t})", "Table 4, Fig. 2")}
    rows = [(labels[k][0], v, noisy.get(k, "–"), labels[k][1]) for k, v in ours.items()]
    if within and across:
        rows.append(("loss barrier: within the lineage / to Mx (nats)",
                     f"{span(within, '{:.2f}'.format)} / {span(across, '{:.2f}'.format)}", "–",
                     "not in the paper"))
    if r.get("compression"):  # rows: the exact Δ, no Δ, then one per setting (lab.compression.frontier)
        exact, _no_delta, *settings = r["compression"]["rows"]
        for row in settings:
            rows.append((f"compressed Δ ({row['label']}, {row['ratio']:.2f} of the bytes) vs exact Δ, every transfer cell",
                         f"{_p(row['mean'])} vs {_p(exact['mean'])} ({100 * row['gain_retained']:.0f} % of the gain)",
                         "–", "not in the paper"))
    if twin:
        lines = [f"| | ours (quick, design v{design_of(r)}, **one seed: {seed}**) | its noise twin | paper |",
                 "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    else:
        lines = [f"| | ours (quick, design v{design_of(r)}, **one seed: {seed}**) | paper |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {d} |" for a, b, _c, d in rows]
    verdicts = ", ".join(f"({c['id']}) {c['reproduced']}" for c in r.get("claims", []))
    if twin:
        same = [c["id"] for c in r.get("claims", []) if c.get("twin_verdict") not in (None, c["verdict"])]
        gap = twin.get("max_score_spread")
        moved = "the same verdicts" if not same else "other verdicts on " + ", ".join(f"({x})" for x in same)
        verdicts += (f"; its noise twin reached {moved}, and no held-out score moved more than "
                     f"{'–' if gap is None else f'{100 * gap:.1f}'} points")
    env = r.get("environment", {})
    from deltaport.lab.env import kind_of

    other = r.get("_threads2")  # render() adds the committed --threads 2 run of the same seed, if any
    if other:
        from deltaport.lab.noise import agreement

        ag = agreement(r, other)
        bad = [f"({i})" for i, x in ag["claims"].items() if not x["ok"]]
        worst = max((x["gap"] for x in ag["claims"].values() if x["gap"] is not None), default=None)
        score_gap = ag["max_score_gap"]
        verdicts += (f". The same demo at `--threads 2` on {kind_of(other.get('environment', {}))} "
                     + ("agrees with it (same claims, identical verdicts, every claim mean within 0.03 for points, "
                        "0.10 otherwise" if ag["agree"] else "does **not** agree with it (" + ", ".join(bad)
                        + " in verdict or by more than 0.03 for points, 0.10 otherwise")
                     + f"; largest claim gap {'–' if worst is None else f'{worst:.3f}'}, largest held-out score gap "
                     + ("–" if score_gap is None else f"{100 * score_gap:.1f}") + " points)")

    lines += ["", f"One seed, item intervals widened by the design's noise margin (docs/lab.md) — verdicts of this run: {verdicts}. The decided findings "
                  "are the multi-seed ones below. Produced with "
              + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if k in
                          ("deltaport", "python", "torch", "transformers", "trl", "lm-eval"))
              + f" on {kind_of(env)}; " + (
                  f"total {wall_seconds(r) or 0:.0f} s (shared machine: load in docs/lab.md)."
                  if "passes" in r.get("timings_s", {}) else
                  "its results hold only the last pass's time (written before deltaport recorded every pass): "
                  "measured wall times and load in docs/lab.md.")]
    return "\n".join(lines)


def findings_table(sm: dict) -> str:
    seeds = ", ".join(map(str, sm["seeds"]))
    noisy = bool(sm.get("noise_twin"))
    twinned = (sm.get("noise_twin") or {}).get("seeds", sm["seeds"])
    some = noisy and list(twinned) != list(sm["seeds"])
    lines = [f"Design v{design_of(sm)} (docs/lab.md), `{sm['name']}` preset, seeds {seeds}"
             + (f"; noise twins of seed{'s' if len(twinned) > 1 else ''} {', '.join(map(str, twinned))}" if some else "")
             + ":", "",
             f"| finding | θ per seed ({seeds}) | mean [95 % interval] | rule | reproduced? |"
             + ((" seed spread | noise spread" + (f" (seeds {', '.join(map(str, twinned))})" if some else "")
                 + " | noise twins' verdict |") if noisy else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if noisy else "")]
    for f in sm["findings"]:
        per = " / ".join(fmt(x, f["unit"]) for x in f["per_seed"])
        v = f["verdict"] if f["verdict"] == "yes" else f"**{f['verdict']}**"
        row = f"| ({f['id']}) {f['claim']} | {per} | {f['ours']} | {f['rule']} | {v} |"
        if noisy:
            row += (f" {fmt(f.get('seed_spread'), f['unit']).lstrip('+')} | {fmt(f.get('noise_spread'), f['unit']).lstrip('+')}"
                    f" | {f.get('twin_verdict') or '–'} |")
        lines.append(row)
    return "\n".join(lines)


def undecided_lines(sm: dict) -> str:
    """Below the findings table: how many seeds would decide each finding the run left undecided
    (``seeds_needed``, :func:`deltaport.lab.stats.seeds_needed`, from the finding's own numbers)."""
    from deltaport.lab.stats import z_of

    said, levels = [], set()
    for f in map(with_seeds_needed, sm["findings"]):
        levels.add(f.get("level", 0.95))
        if "seeds_needed" in f:
            said.append(f"({f['id']}) about {f['seeds_needed']}")
        elif "seeds_needed_note" in f:
            said.append(f"({f['id']}) {f['seeds_needed_note']}")
    if not said:
        return ""
    z = " / ".join(f"{z_of(x):.2f}" for x in sorted(levels))
    return (f"Seeds a decision would need, n = ⌈(z · sd / |mean − threshold|)²⌉ with the between-seed SD and z = {z} "
            "(an estimate that assumes more seeds show the same mean and SD; `seeds_needed` in summary.json): "
            + "; ".join(said) + ".")


def findings_block(sm: dict) -> str:
    """The README's findings block: :func:`findings_table` and :func:`undecided_lines`."""
    extra = undecided_lines(sm)
    return findings_table(sm) + ("\n\n" + extra if extra else "")


def render(root: Path) -> dict[str, str]:
    """Both blocks from the committed files (a block whose file is not committed is empty)."""
    root = Path(root)
    out = {}
    from deltaport.lab.compression import readme_block

    for name, rel, fn in (("quick", QUICK, quick_table), ("findings", FULL, findings_block),
                          ("compression", COMPRESSION, readme_block)):
        f = root / rel
        data = json.loads(f.read_text()) if f.exists() else None
        if name == "quick" and data is not None and (root / QUICK_THREADS2).exists():
            data["_threads2"] = json.loads((root / QUICK_THREADS2).read_text())
        out[name] = fn(data) if data is not None else ""
    return out


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- lab:{name}:begin -->\n)(?:.*?\n)?(<!-- lab:{name}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"README has no <!-- lab:{name}:begin --> ... <!-- lab:{name}:end --> block")
        text = pat.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(2), text)
    return text


def rerender_reports(root: Path) -> dict[Path, str]:
    """Every committed report.md and summary.md under ``root/docs/results`` rendered again from its
    results.json / summary.json by today's code (the lab is not rerun), and every results.json with its
    claims decided again from its per-item answers (:func:`deltaport.lab.report.refresh_claims`):
    ``{path: text}``."""
    from deltaport.lab.multiseed import summary_md
    from deltaport.lab.report import refresh_claims, report_md

    out = {}
    for results in sorted(Path(root, "docs/results").glob("**/results.json")):
        r = json.loads(results.read_text())
        if "claims" not in r:  # not a lab run (e.g. docs/results/eval)
            continue
        # claims decided again from the run's own per-item answers by today's rules (findings.py)
        text = json.dumps(refresh_claims(r), indent=1, sort_keys=True, default=str) + "\n"
        out[results] = text
        out[results.parent / "report.md"] = report_md(json.loads(text))
    for summary in sorted(Path(root, "docs/results").glob("**/summary.json")):
        out[summary.parent / "summary.md"] = summary_md(json.loads(summary.read_text()))
    return out


def _relativise(obj, prefix: str):
    if isinstance(obj, str):
        return obj.replace(prefix, "RUN_DIR")
    if isinstance(obj, list):
        return [_relativise(x, prefix) for x in obj]
    if isinstance(obj, dict):
        return {k: _relativise(v, prefix) for k, v in obj.items()}
    return obj


def collect(run_dir: Path, dest: Path, *, summary: bool) -> None:
    """Copy a run's results (every path made relative: ``RUN_DIR/...``) and reports into ``dest``."""
    run_dir, dest = Path(run_dir).resolve(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dirs = sorted(run_dir.glob("seed-*")) if summary else [run_dir]
    for d in dirs:
        out = dest / d.name if summary else dest
        out.mkdir(parents=True, exist_ok=True)
        r = json.loads((d / "results.json").read_text())
        (out / "results.json").write_text(json.dumps(_relativise(r, str(d)), indent=1, sort_keys=True) + "\n")
        shutil.copy(d / "report.md", out / "report.md")
    if summary:
        sm = json.loads((run_dir / "summary.json").read_text())
        (dest / "summary.json").write_text(json.dumps(_relativise(sm, str(run_dir)), indent=1, sort_keys=True) + "\n")
        shutil.copy(run_dir / "summary.md", dest / "summary.md")
