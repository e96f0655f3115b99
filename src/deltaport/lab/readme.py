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

QUICK = "docs/results/quick/results.json"
FULL = "docs/results/full/summary.json"
COMPRESSION = "docs/results/full/compression.json"  # deltaport.lab.compression.collect
BLOCKS = ("quick", "findings", "compression")


def _p(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def quick_table(r: dict) -> str:
    """The one-seed demo's headline numbers (held-out exact match, %)."""
    sc, V, g = r["scores"], r["config"]["versions"], r["grid"]
    fs = r.get("fewshot", {}).get("base", {})
    t, s = V[-1], V[-2]
    seed = r["config"]["seed"]
    conn = r.get("connectivity", {})
    within = [v["barrier"] for k, v in conn.get("curves", {}).items() if "Mx" not in k and "M0" not in k]
    across = [v["barrier"] for k, v in conn.get("curves", {}).items() if "Mx" in k and "M0" not in k]
    ttf = r.get("transfer_then_finetune", {}).get("steps_to_plain_final", {}).get(f"{t}+Δ{s[1:]}", {})
    rows = [
        (f"{t} + Δ{s[1:]} vs FT({t})", f"**{_p(sc[f'{t}+Δ{s[1:]}']['heldout'])}** vs {_p(sc[f'FT({t})']['heldout'])} "
         f"(base {t}: {_p(sc[t]['heldout'])} zero-shot, {_p(fs.get(t))} few-shot)", "Table 3"),
        (f"{s} + Δ{t[1:]} (backport) vs FT({s})", f"{_p(sc[f'{s}+Δ{t[1:]}']['heldout'])} vs {_p(sc[f'FT({s})']['heldout'])}",
         "Table 1"),
        (f"{t} + Δ{V[0][1:]} (weak source)", _p(sc[f"{t}+Δ{V[0][1:]}"]["heldout"]), "Table 3"),
        ("Mx + Δ_s (other seed) / M0 + Δ_s (random init), best s",
         f"{_p(max(g['cells']['Mx'].values()))} / {_p(max(g['cells']['M0'].values()))}", "Table 8"),
    ]
    if ttf:
        rows.append((f"FT from {t} + Δ{s[1:]} with half the steps vs plain FT({t})",
                     f"{_p(ttf.get('half_budget_transfer'))} ({ttf.get('half_budget_steps')} steps) vs "
                     f"{_p(ttf.get('plain_final'))} ({r['config']['finetune']['steps']} steps)", "Table 4, Fig. 2"))
    if within and across:
        rows.append(("loss barrier: within the lineage / to Mx (nats)",
                     f"{span(within, '{:.2f}'.format)} / {span(across, '{:.2f}'.format)}", "not in the paper"))
    if r.get("compression"):  # rows: the exact Δ, no Δ, then one per setting (lab.compression.frontier)
        exact, _no_delta, *settings = r["compression"]["rows"]
        for row in settings:
            rows.append((f"compressed Δ ({row['label']}, {row['ratio']:.2f} of the bytes) vs exact Δ, every transfer cell",
                         f"{_p(row['mean'])} vs {_p(exact['mean'])} ({100 * row['gain_retained']:.0f} % of the gain)",
                         "not in the paper"))
    lines = [f"| | ours (quick, **one seed: {seed}**) | paper |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    verdicts = ", ".join(f"({c['id']}) {c['reproduced']}" for c in r.get("claims", []))
    env = r.get("environment", {})
    from deltaport.lab.env import kind_of

    lines += ["", f"One seed, intervals over items only — verdicts of this run: {verdicts}. The decided findings "
                  "are the multi-seed ones below. Produced with "
              + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if k in
                          ("deltaport", "python", "torch", "transformers", "trl", "lm-eval"))
              + f" on {kind_of(env)}; total {r.get('timings_s', {}).get('total', 0):.0f} s "
                "(shared machine: load in docs/lab.md)."]
    return "\n".join(lines)


def findings_table(sm: dict) -> str:
    seeds = ", ".join(map(str, sm["seeds"]))
    lines = [f"| finding | θ per seed ({seeds}) | mean [95 % interval] | rule | reproduced? |", "|---|---|---|---|---|"]
    for f in sm["findings"]:
        per = " / ".join(fmt(x, f["unit"]) for x in f["per_seed"])
        v = f["verdict"] if f["verdict"] == "yes" else f"**{f['verdict']}**"
        lines.append(f"| ({f['id']}) {f['claim']} | {per} | {f['ours']} | {f['rule']} | {v} |")
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
        out[name] = fn(json.loads(f.read_text())) if f.exists() else ""
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
    results.json / summary.json by today's code (the lab is not rerun): ``{path: text}``."""
    from deltaport.lab.multiseed import summary_md
    from deltaport.lab.report import rerender

    out = {}
    for results in sorted(Path(root, "docs/results").glob("**/results.json")):
        out[results.parent / "report.md"] = rerender(results.parent)
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
