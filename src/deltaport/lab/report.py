"""Write a lab run's outputs: ``results.json``, PNG figures and ``report.md``.

The report puts the paper's numbers beside ours and states, claim by claim, whether the finding
reproduced at this scale. The verdicts are computed from the numbers by fixed rules written here
before the first full run (see ``CLAIMS``); nothing is tuned to the result.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltaport.lab.noise import claim_columns, scores_table
from deltaport.lab.store import write_text

# --- the paper's numbers (docs/paper.md; GSM8K unless noted) -------------------------------------
PAPER_T3 = {  # Table 3: rows = target, cols = source delta
    "base": {"M1": 13.2, "M2": 19.4, "M3": 24.4, "M4": 64.5, "M5": 65.5},
    "FT": {"M1": 45.1, "M2": 50.7, "M3": 60.4, "M4": 75.7, "M5": 75.5},
    "M1": {"M2": 19.0, "M3": 14.3, "M4": 11.8, "M5": 11.9},
    "M2": {"M1": 26.6, "M3": 25.0, "M4": 18.0, "M5": 16.0},
    "M3": {"M1": 32.0, "M2": 39.8, "M4": 22.6, "M5": 24.0},
    "M4": {"M1": 27.5, "M2": 25.9, "M3": 68.6, "M5": 72.9},
    "M5": {"M1": 19.6, "M2": 17.3, "M3": 70.3, "M4": 77.1},
}
PAPER_T4 = {  # Table 4: FT(M_t + Δ_s)
    "M1": {"M2": 50.1, "M3": 48.5, "M4": 48.2, "M5": 47.6},
    "M2": {"M1": 56.9, "M3": 57.6, "M4": 56.7, "M5": 55.6},
    "M3": {"M1": 62.8, "M2": 62.7, "M4": 63.7, "M5": 63.5},
    "M4": {"M1": 77.8, "M2": 78.6, "M3": 77.6, "M5": 74.6},
    "M5": {"M1": 78.6, "M2": 78.7, "M3": 77.1, "M4": 77.0},
}
PAPER_T6 = {"M3": {"base": 24.4, "dir": 62.7, "iter": 63.4, "ft": 60.4},
            "M4": {"base": 64.5, "dir": 77.6, "iter": 77.4, "ft": 75.7},
            "M5": {"base": 65.5, "dir": 77.0, "iter": 78.6, "ft": 75.5}}
PAPER_T1 = "Llama 3.0 + Δ3.1 (backport) avg 53.0 vs 3.0 Instruct 49.8; Llama 3.1 + Δ3.0 (recycle) 51.2 vs 3.1 Instruct 55.2"
PAPER_T2 = ("Malagasy: 3.0 Instruct 23.1, +FT 30.8, 3.1 Instruct 27.6, 3.1 Instruct + Δ 32.3; Turkish: 30.8 / 43.2 / "
            "27.7 / 43.2; Sinhala (target already better): 23.3 / 29.0 / 33.0 / 32.3")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _frac(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _paper_recovery(t: str, s: str) -> float | None:
    try:
        b, f, m = PAPER_T3["base"][t], PAPER_T3["FT"][t], PAPER_T3[t][s]
    except KeyError:
        return None
    return (m - b) / (f - b)


def claims(r: dict) -> list[dict]:
    """The findings of docs/lab.md decided on this run alone (one seed: the interval resamples items only)."""
    from deltaport.lab.findings import decide, fmt, rule_text

    out = []
    for f in decide([r]):
        out.append({**f, "rule": rule_text(f), "ours": f"{fmt(f['mean'], f['unit'])} "
                                                      f"[{fmt(f['lo'], f['unit'])}, {fmt(f['hi'], f['unit'])}]",
                    "reproduced": f["verdict"]})
    return out


# ----------------------------------------------------------------------------------------------- figures
def figures(r: dict, fig_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    g = r.get("grid")
    if g:
        import numpy as np

        rows, cols = g["targets"], g["sources"]
        fs = (r.get("fewshot") or {}).get("base", {})
        ref = ["base", "base few-shot", "FT(M_t)"]
        m = np.full((len(rows), len(cols) + len(ref)), np.nan)
        for i, t in enumerate(rows):
            for j, s_ in enumerate(cols):
                if s_ in g["cells"][t]:
                    m[i, j] = 100 * g["cells"][t][s_]
            m[i, len(cols)] = 100 * g["base"][t]
            if t in fs:
                m[i, len(cols) + 1] = 100 * fs[t]
            if t in g["ft"]:
                m[i, len(cols) + 2] = 100 * g["ft"][t]
        fig, ax = plt.subplots(figsize=(0.75 * m.shape[1] + 2.0, 0.55 * len(rows) + 2.2))
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        ax.axvline(len(cols) - 0.5, color="white", lw=3)
        ax.set_xticks(range(m.shape[1]), [f"+Δ{s_[1:]}" for s_ in cols] + ref, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center",
                            color="white" if m[i, j] < 50 else "black", fontsize=7)
        ax.set_xlabel("Δ_s added (source of the fine-tuning update)  |  references for the target")
        ax.set_ylabel("target base M_t")
        ax.set_title("held-out exact match (%) of M_t + Δ_s, one decimal everywhere")
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        p = fig_dir / "grid.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["grid"] = str(p.relative_to(fig_dir.parent))
    curves = r.get("curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(9, 4.6))
        targets = sorted({name[3:].split("+")[0].rstrip(")") for name in curves})
        colour = {t: f"C{i % 10}" for i, t in enumerate(targets)}
        styles = ["-", "-.", ":", (0, (5, 1))]
        seen: dict[str, int] = {}
        for name, c in sorted(curves.items()):
            if c:
                xs, ys = zip(*c)
                tgt = name[3:].split("+")[0].rstrip(")")
                if "+" in name:
                    ls = styles[seen.get(tgt, 0) % len(styles)]
                    seen[tgt] = seen.get(tgt, 0) + 1
                else:
                    ls = "--"
                ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=name, color=colour[tgt], ls=ls,
                        lw=1.0 if "+" not in name else 1.6)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_title("plain FT (dashed) vs transfer-then-finetune; colour = target", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        p = fig_dir / "convergence.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["convergence"] = str(p.relative_to(fig_dir.parent))
    c = r.get("connectivity")
    if c:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
        groups = {0: [], 1: []}
        for name, cv in sorted(c["curves"].items()):
            groups[1 if ("Mx" in name or "M0" in name) else 0].append((name, cv))
        titles = ["within one lineage (versions of one run)", "to Mx (other seed) and M0 (random init)"]
        for k, ax in enumerate(axes):
            for name, cv in groups[k]:
                ax.plot(cv["alphas"], cv["losses"], marker=".", label=f"{name} (barrier {cv['barrier']:.2f})")
            ax.set_xlabel("α  (0 = first model, 1 = second)")
            ax.set_title(titles[k], fontsize=10)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("text loss (nats/token)")
        fig.suptitle("loss along the straight line between two bases")
        fig.tight_layout()
        p = fig_dir / "connectivity.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["connectivity"] = str(p.relative_to(fig_dir.parent))
    if r.get("compression"):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import figure

        p = figure(r["compression"], fig_dir / "compression.png",
                   title=f"compressed Δ: bytes vs held-out score, every transfer cell (seed {r['config']['seed']})")
        out["compression"] = str(p.relative_to(fig_dir.parent))
    return out


# ----------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_md(r: dict, figs: dict[str, str]) -> str:
    cfg = r["config"]
    V = cfg["versions"]
    n = r["n_items"]
    L = [f"# deltaport lab report: `{r['name']}`", "",
         "Fine-tuning transfer (arXiv 2503.20110) reproduced on a family of tiny Llama models trained from "
         "scratch on a synthetic world (docs/lab.md). Metric everywhere: greedy exact match (%) on "
         f"**held-out** QA items ({n['known']} 'known' F1 facts + {n['new']} 'new' F2 facts the stage-1 models "
         f"never read; fine-tuning saw {n['sft']} other F1 facts). Chance for a model that always answers "
         f"some colour: {_pct(r['chance'])} %. Paper numbers are GSM8K on OLMo 2 7B (Tables 3–6) — compare "
         "directions and shapes, not magnitudes.", ""]
    counter = [0]

    def sec(title: str) -> str:
        counter[0] += 1
        return f"## {counter[0]}. {title}"

    seed = cfg.get("seed")
    L += ["## What reproduced", "",
          f"**One seed ({seed}).** Each verdict is decided on a 95 % interval against the minimum effect written in "
          "docs/lab.md before the results were seen: *yes* = the interval lies entirely on the claim's side of the "
          "threshold, *no* = entirely on the other side, *inconclusive* = it straddles it. With one seed the "
          "interval resamples the held-out items only and says nothing about seed-to-seed variation, which "
          "dominates here: the decided findings are the multi-seed ones (`deltaport lab run full --seeds 0,1,2`; "
          "committed results in docs/results/full/summary.md).", "",
          _table(["finding", "statistic θ", "rule (fixed before the run)", "ours: θ [95 % interval]", "reproduced?"]
                 + (["noise twin: θ (verdict)", "noise spread |θ − θ_twin|"] if r.get("noise_twin") else []),
                 [[c["claim"], c["statistic"], c["rule"], c["ours"],
                   c["reproduced"] if c["reproduced"] == "yes" else f"**{c['reproduced']}**"]
                  + (claim_columns(c) if r.get("noise_twin") else []) for c in r["claims"]]), ""]
    if r.get("noise_twin"):  # floating-point noise beside every headline number (deltaport.lab.noise)
        L += [f"Noise: the {r['noise_twin']['what']}; it ran in `twin/`. Held-out scores beside the twin's (the seed "
              "spread of these numbers is in the multi-seed summary):", "", scores_table(r), ""]
    inv = r.get("invariants", {}).get("identity_Mi_plus_Di_equals_FT", {})
    L += ["Invariant M_i + Δ_i == FT(M_i), tensor-equal: "
          + ", ".join(f"{v}: {'exact' if ok else 'NOT exact'}" for v, ok in inv.items()), ""]
    g = r.get("grid")
    if g:
        L += [sec("Transfer grid (paper Table 3)"), ""]
        if "grid" in figs:
            L += [f"![grid]({figs['grid']})", ""]
        fsb = (r.get("fewshot") or {}).get("base", {})
        hdr = ["target \\ Δ from"] + [f"+Δ{s[1:]}" for s in g["sources"]] + ["base", "base few-shot", "FT(M_t)"]
        rows = []
        for t in g["targets"]:
            rows.append([t] + [_pct(g["cells"][t].get(s)) if s != t else "—" for s in g["sources"]]
                        + [_pct(g["base"][t]), _pct(fsb.get(t)), _pct(g["ft"].get(t))])
        L += [_table(hdr, rows), ""]
        prow = []
        for t in ("M1", "M2", "M3", "M4", "M5"):
            prow.append([t] + [str(PAPER_T3[t].get(s, "—")) for s in ("M1", "M2", "M3", "M4", "M5")]
                        + [str(PAPER_T3["base"][t]), str(PAPER_T3["FT"][t])])
        L += ["Paper, Table 3 (GSM8K, OLMo 2 7B checkpoints):", "",
              _table(["target \\ Δ from", "+Δ1", "+Δ2", "+Δ3", "+Δ4", "+Δ5", "base", "FT(M_t)"], prow), "",
              "Split scores (known F1 / new F2) of every model are in `results.json` (`scores`). 'base few-shot': "
              f"the base asked after {(r.get('fewshot') or {}).get('n_shots', 3)} solved examples in the same chat "
              "format (the paper scores its bases few-shot); recovery (finding a) is measured against it.", ""]
        L += [_reading_grid(r), ""]
    rec = r.get("recovery")
    if rec:
        L += [sec("Fraction of the fine-tuning gain recovered"), "",
              "(score(M_t+Δ_s) − score(M_t)) / (score(FT(M_t)) − score(M_t)); '–' where plain FT gains under "
              f"{int(100 * rec['min_ft_gain'])} points. Paper value (from Table 3) in brackets.", ""]
        rows = []
        for t in V:
            rows.append([t] + [("—" if s == t else f"{_frac(rec['fraction'][t].get(s))} "
                                f"({_frac(_paper_recovery(t, s))})") for s in V])
        L += [_table(["target \\ Δ from"] + [f"+Δ{s[1:]}" for s in V], rows), "", _reading_recovery(r), ""]
    t = r.get("transfer_then_finetune")
    if t:
        L += [sec("Transfer-then-finetune vs plain fine-tuning (paper Table 4, Fig. 2)"), ""]
        if "convergence" in figs:
            L += [f"![convergence]({figs['convergence']})", ""]
        rows = []
        for tg, row in sorted(t["table"].items()):
            for s, v in sorted(row.items()):
                rows.append([f"FT({tg} + Δ{s[1:]})", _pct(v), _pct(t["ft"].get(tg)),
                             str(PAPER_T4.get(tg, {}).get(s, "–")), str(PAPER_T3["FT"].get(tg, "–"))])
        L += [_table(["model", "ours", "FT(M_t) ours", "paper", "paper FT(M_t)"], rows), ""]
        rows = [[p, _pct(d["start_transfer"]), _pct(d["start_plain"]), _pct(d["plain_final"]),
                 str(d["first_step_transfer"]), str(d["first_step_plain"]),
                 f"{_pct(d.get('half_budget_transfer'))} ({d.get('half_budget_steps')} steps)"]
                for p, d in t["steps_to_plain_final"].items()]
        L += [f"Steps to reach plain FT's final score (evaluated every {t['curve_every']} steps; "
              f"{cfg['finetune']['steps']} steps in all). Paper (slides): M4+Δ3 at 10K of 30K, M5+Δ3 15K, M2+Δ1 15K, "
              "M3+Δ2 25K.", "",
              _table(["init", "score at step 0", "plain FT at step 0", "plain FT final", "first step (transfer init)",
                      "first step (plain)", "FT with half the budget from the transfer"], rows), "", _reading_ttf(r),
              ""]
    it = r.get("iterative")
    if it and it["rows"]:
        L += [sec("Iterative Δ^iter vs direct Δ^dir vs plain FT (Algorithm 1, Table 6)"), ""]
        rows = [[v, _pct(x["base"]), _pct(x["dir"]), _pct(x["iter"]), _pct(x["ft"]),
                 " / ".join(str(PAPER_T6[v][k]) for k in ("dir", "iter", "ft")) if v in PAPER_T6 else "–"]
                for v, x in it["rows"].items()]
        L += [_table(["version", "base", "FT(M_i + Δ^dir)", "FT(M_i + Δ^iter)", "FT(M_i)", "paper dir / iter / FT"], rows),
              "", f"Chain: {' → '.join(it['chain'])}. At the first link Δ^iter = Δ^dir by construction. "
              "'FT(M_i)' is the plain fine-tune inside the evolve run (same recipe and seed as the lab's).", "",
              _reading_iter(r), ""]
    bp = r.get("backport")
    if bp and bp["rows"]:
        L += [sec("Backporting beside recycling (paper Table 1)"), "",
              _table(["pair (old, new)", "old base", "old + Δ_new (backport)", "FT(old)", "new base",
                      "new + Δ_old (recycle)", "FT(new)", "same stage: counts for finding (e)"],
                     [[f"{x['old']}, {x['new']}", _pct(x["old_base"]), _pct(x["backport"]), _pct(x["old_ft"]),
                       _pct(x["new_base"]), _pct(x["recycle"]), _pct(x["new_ft"]),
                       "yes" if x.get("same_stage") else "no"] for x in bp["rows"]]),
              "", f"Paper: {PAPER_T1}.", "", _reading_backport(r), ""]
    lg = r.get("language")
    if lg:
        L += [sec("Second-language fine-tune transferred to the next version (paper Table 2)"), "",
              f"'Instruct' models are FT(M) in language a; the language-b fine-tune continues FT({lg['source']}) on "
              "the same facts asked and answered in language b (a token-substituted language present in "
              "pretraining text); Δ_b is added to the next version's instruct model. Scores on language-b "
              "held-out items.", "",
              _table(["model", "known", "new", "held-out"],
                     [[k, _pct(v["known"]), _pct(v["new"]), _pct(v["heldout"])] for k, v in lg["rows"].items()]),
              "", f"Paper (Global MMLU): {PAPER_T2}.", "", _reading_language(r), ""]
    c = r.get("connectivity")
    if c:
        L += [sec("Connectivity: loss barriers and `deltaport check` vs transfer outcome (not in the paper)"), ""]
        if "connectivity" in figs:
            L += [f"![connectivity]({figs['connectivity']})", ""]
        L += [_table(["pair", "barrier (nats)", "relative barrier", "loss A", "loss B"],
                     [[k, f"{v['barrier']:.3f}", f"{v['relative_barrier']:.3f}", f"{v['loss_a']:.3f}",
                       f"{v['loss_b']:.3f}"] for k, v in c["curves"].items()]), ""]
        L += ["Spearman correlation with the transfer outcome (held-out gain of M_t + Δ_s over M_t) across "
              f"{len(c['cells'])} grid cells (incl. Mx):", "",
              _table(["predictor", "Spearman ρ"], [[k, "–" if v is None else f"{v:+.2f}"]
                                                   for k, v in c["spearman"].items()]), ""]
        scope = c.get("check_calibration") or {}
        if scope:
            L += [f"`deltaport check`'s thresholds were fitted on the {scope['fitted_on']}. This run's family "
                  f"({scope['this_family']}) is **{'in sample: the check verdicts here are not a test of check' if scope['in_sample'] else 'out of sample'}**.", ""]
        if c.get("sample"):
            L += [f"The text sample used for every barrier and check is `{Path(c['sample']).name}` in the run "
                  "directory (jsonl, field `text`): rerun e.g. `deltaport connectivity family/<hash>/M4 "
                  f"family/<hash>/M5 --data {Path(c['sample']).name}` on it.", ""]
        if c["checks"]:
            L += ["`deltaport check` verdicts per cell: " + ", ".join(
                f"{k}: {v['verdict']}" for k, v in c["checks"].items()), ""]
        L += [_reading_conn(r), ""]
    if r.get("compression"):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import report_section

        L += [sec("What compressing Δ costs the transfer (Δ bytes vs held-out score)"), "",
              report_section(r["compression"], figs.get("compression"))]
    env = r.get("environment") or {}
    from deltaport.lab.env import kind_of

    cache = r.get("cache") or {}
    reused = {k: v for k, v in cache.items() if not k.startswith("computed") and v}
    L += ["## Run", "", f"Seeds: {json.dumps(r['seeds'])}.", "",
          f"Environment: python {env.get('versions', {}).get('python')}, {env.get('platform')}, CPU "
          f"{kind_of(env)}, flags {', '.join(env.get('cpu', {}).get('kernel_flags', []))}, "
          f"{env.get('torch_threads')} torch thread(s).", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ".", "",
          "Reproducibility: the same versions (`pip install -c constraints.txt`) on the same CPU kind give the same "
          "bytes and numbers; another CPU kind (training kernels differ, e.g. with or without AVX-512) gives numbers "
          "within the committed spread across seeds (docs/results/full/summary.md).", "",
          ("Cache: reused " + ", ".join(f"{v} {k}" for k, v in reused.items()) + " from this run directory "
           "(keys cover every input's content hash, the recipe and the library versions)." if reused else
           "Cache: nothing reused; every step was computed in this run."), "",
          f"Per-item scorer vs lm-eval exact match: largest difference {r.get('item_scorer_max_mismatch', 0):.4f}.", "",
          "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r.get("timings_s", {}).items()) + ".", ""]
    return "\n".join(L)


def _reading_grid(r: dict) -> str:
    g = r["grid"]
    V = r["config"]["versions"]
    best = {t: max(g["cells"][t].items(), key=lambda kv: kv[1]) for t in V}
    parts = ["**Reading.** "]
    parts.append("Base models score near zero: they have never seen the question format (later versions know more facts). "
                 "Adding another version's Δ gives the format back where the two versions are close: ")
    parts.append(", ".join(f"{t} is best with Δ{s[1:]} ({_pct(v)} vs FT {_pct(g['ft'][t])})" for t, (s, v) in best.items()))
    parts.append(f". Mx (same data, other initialisation) gains at most {_pct(max(g['cells']['Mx'].values()))} and "
                 f"M0 (random) at most {_pct(max(g['cells']['M0'].values()))}.")
    return "".join(parts)


def _reading_recovery(r: dict) -> str:
    rec = r["recovery"]["fraction"]
    V = r["config"]["versions"]
    sc = r["scores"]
    chance = r["chance"]
    parts = ["**Reading.** "]
    at_chance = [t for t in V if sc[f"FT({t})"]["heldout"] <= chance + 0.05]
    if at_chance:
        parts.append(f"FT({', '.join(at_chance)}) itself scores near chance: those bases have not learned the facts "
                     "yet, so their 'gain' is the answer format only and a recovery above 100 % there means little. ")
    per_source = {}
    for s in V:
        vals = [rec[t][s] for t in V if t != s and t not in at_chance and rec[t].get(s) is not None]
        if vals:
            per_source[s] = (min(vals), max(vals))
    if per_source:
        parts.append("Recovery by source Δ over the other targets: " + "; ".join(
            f"Δ{s[1:]} {_frac(lo)}–{_frac(hi)}" for s, (lo, hi) in per_source.items()) + ".")
    return "".join(parts)


def _reading_ttf(r: dict) -> str:
    t = r["transfer_then_finetune"]
    parts = ["**Reading.** "]
    for pair, d in t["steps_to_plain_final"].items():
        a, b = d["first_step_transfer"], d["first_step_plain"]
        if a is None:
            parts.append(f"From {pair} fine-tuning never reached plain FT's final {_pct(d['plain_final'])} within the "
                         f"budget (plain FT got there at step {b}). ")
        elif b is None or a < b:
            parts.append(f"From {pair} it starts at {_pct(d['start_transfer'])} and reaches plain FT's final score at "
                         f"step {a}, plain FT at step {b}. ")
        else:
            parts.append(f"From {pair} it reaches plain FT's final score at step {a}, no earlier than plain FT ({b}). ")
    return "".join(parts)


def _reading_iter(r: dict) -> str:
    rows = r["iterative"]["rows"]
    wins = sum(x["iter"] >= x["dir"] for x in rows.values())
    return (f"**Reading.** Δ^iter ≥ Δ^dir at {wins} of {len(rows)} versions; both vs plain FT: "
            + "; ".join(f"{v} {_pct(x['iter'] - x['ft'])} / {_pct(x['dir'] - x['ft'])} points" for v, x in rows.items())
            + " (iter / dir minus plain).")


def _reading_backport(r: dict) -> str:
    rows = r["backport"]["rows"]
    return ("**Reading.** " + "; ".join(
        f"({x['old']}, {x['new']}): backporting recovers {_pct(x['backport'] - x['old_base'])} points of FT(old)'s "
        f"{_pct(x['old_ft'] - x['old_base'])}, recycling {_pct(x['recycle'] - x['new_base'])} of FT(new)'s "
        f"{_pct(x['new_ft'] - x['new_base'])}" for x in rows) + ".")


def _reading_language(r: dict) -> str:
    lg = r["language"]
    rows = lg["rows"]
    s, t = lg["source"], lg["target"]
    src, src_b = rows[f"FT({s})"]["heldout"], rows[f"FTb(FT({s}))"]["heldout"]
    tgt, merged = rows[f"FT({t})"]["heldout"], rows[f"FT({t})+Δb{s[1:]}"]["heldout"]
    return (f"**Reading.** The language-b fine-tune lifts the source instruct model from {_pct(src)} to {_pct(src_b)} "
            f"on language-b questions; adding its Δ to {t}'s instruct model moves that from {_pct(tgt)} to "
            f"{_pct(merged)}" + (" — above the fine-tuned source, as Malagasy in Table 2." if merged > src_b else "."))


def _reading_conn(r: dict) -> str:
    c = r["connectivity"]
    same = [v["barrier"] for k, v in c["curves"].items() if "Mx" not in k]
    other = [v["barrier"] for k, v in c["curves"].items() if "Mx" in k]
    txt = "**Reading.** "
    if same and other:
        txt += (f"Between versions of one run the loss barrier is at most {max(same):.2f} nats; between any version "
                f"and Mx at least {min(other):.2f}. ")
    rho = c["spearman"]
    best = max(((k, v) for k, v in rho.items() if v is not None), key=lambda kv: abs(kv[1]), default=None)
    if best:
        txt += (f"The strongest predictor of the gain here is {best[0].replace('_vs_gain', '')} (ρ = {best[1]:+.2f}); "
                "the barrier separates Mx from the family but is flat inside it, so it cannot rank Δ sources of one "
                "lineage." if same and max(same) < 0.05 else "")
    return txt


def write_outputs(r: dict, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    r["claims"] = claims(r)
    from deltaport.lab.noise import attach  # the noise twin's value beside every claim (docs/lab.md)

    attach(r["claims"], r.get("noise_twin"))
    figs = figures(r, run_dir / "figures")
    r["figures"] = figs
    write_text(run_dir / "results.json", json.dumps(r, indent=1, sort_keys=True, default=str))
    write_text(run_dir / "report.md", report_md(r, figs))
