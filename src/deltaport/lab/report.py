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


def span(values, show) -> str:
    """``lo–hi`` of ``values`` as ``show`` prints them; one value when both ends print the same."""
    lo, hi = show(min(values)), show(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _names(names) -> str:
    """``A``, ``A and B``, ``A, B and C``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _model_order(r: dict) -> list[str]:
    """The run's bases in the report's order: the versions, then Mx and M0."""
    return list(r["config"]["versions"]) + ["Mx", "M0"]


def _rank(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def _pair_key(order: list[str]):
    """Sort key of a connectivity pair ``"A-B"`` (and of a cell ``"T+ΔS"``) by the run's model order."""
    def key(pair: str):
        if "+Δ" in pair:
            t, s = pair.split("+Δ", 1)
            a, b = t, f"M{s}"
        else:
            a, _, b = pair.partition("-")
        return _rank(order, a), _rank(order, b), pair
    return key


#: the connectivity section's predictors in the order the experiment computes them
_PREDICTORS = ("barrier_vs_gain", "check_verdict_vs_gain", "check_relative_barrier_vs_gain",
               "check_rel_distance_vs_gain", "check_excess_loss_rel_vs_gain")


def _paper_recovery(t: str, s: str) -> float | None:
    try:
        b, f, m = PAPER_T3["base"][t], PAPER_T3["FT"][t], PAPER_T3[t][s]
    except KeyError:
        return None
    return (m - b) / (f - b)


def claims(r: dict) -> list[dict]:
    """The findings of docs/lab.md decided on this run alone (one seed: the interval resamples items only).

    ``verdict`` is decided on the item interval widened by the design's noise margin
    (:func:`deltaport.lab.findings.one_seed_verdict`); ``item_verdict`` is the interval's own verdict."""
    from deltaport.lab.findings import NOISE_MARGIN, decide, fmt, one_seed_verdict, rule_text

    out = []
    for f in decide([r]):
        v = one_seed_verdict(f)
        out.append({**f, "item_verdict": f["verdict"], "verdict": v, "noise_margin": NOISE_MARGIN[f["unit"]],
                    "rule": rule_text(f), "ours": f"{fmt(f['mean'], f['unit'])} "
                                                  f"[{fmt(f['lo'], f['unit'])}, {fmt(f['hi'], f['unit'])}]",
                    "reproduced": v})
    return out


# ----------------------------------------------------------------------------------------------- figures
def figures(r: dict, fig_dir: Path) -> dict[str, str]:
    from deltaport.figures import pyplot, save_figure

    plt = pyplot()
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
        fig.colorbar(im, ax=ax, fraction=0.04).set_label("held-out exact match (%), scale 0–100")
        fig.tight_layout()
        p = fig_dir / "grid.png"
        save_figure(fig, p, dpi=110, bbox_inches=None)
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
        save_figure(fig, p, dpi=110, bbox_inches=None)
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
        save_figure(fig, p, dpi=110, bbox_inches=None)
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


def _full_seeds() -> str:
    """``, seeds 0, 1, 2``: the seeds the full preset runs today ('' if the preset cannot be read)."""
    from deltaport.lab.config import load_config

    try:
        seeds = load_config("full").seeds
    except Exception:  # noqa: BLE001 - a sentence of the report is not worth failing it for
        return ""
    return f", seeds {', '.join(map(str, seeds))}" if seeds else ""


def cache_text(cache: dict[str, int]) -> str:
    """What a run computed and what it took from the cache (``results.json`` → ``cache``), said plainly: a hit
    on a result made earlier in the same run is not reuse from an earlier run."""
    kinds = {"evals": ("evaluation", "evaluations"), "finetunes": ("fine-tune", "fine-tunes"),
             "compressed_deltas": ("compressed Δ", "compressed Δs")}

    def count(prefix: str) -> list[str]:
        return [f"{cache[prefix + k]} {one if cache[prefix + k] == 1 else many}" for k, (one, many) in kinds.items()
                if cache.get(prefix + k)]

    family = cache.get("family")
    L = []
    if family is not None:
        L.append("the family was " + ("reused from an earlier run in this directory." if family
                                      else "pretrained in this run."))
    done = count("computed_")
    L.append(f"Computed in this run: {_names(done)}." if done else "Nothing was computed in this run.")
    if not any(k.startswith("repeated_") for k in cache):
        # results.json written before the counters told the two apart: a hit may be from either
        hits = count("")
        if hits:
            L.append(f"Answered from the cache (from an earlier run in this directory or from earlier in this run; "
                     f"this results.json does not tell them apart): {_names(hits)}.")
    else:
        earlier, again = count(""), count("repeated_")
        L.append(f"Reused from an earlier run in this directory: {_names(earlier)} (keys cover every input's content "
                 "hash, the recipe and the library versions)." if earlier else
                 "Nothing was reused from an earlier run.")
        if again:
            L.append(f"Asked for again within this run and answered from its own cache: {_names(again)}.")
    return "Cache: " + " ".join(L)


def report_md(r: dict, figs: dict[str, str] | None = None) -> str:
    """``report.md`` from a results dict alone (``figs``: figure paths relative to the run directory; default
    ``r["figures"]``), so a committed ``results.json`` re-renders its report (:func:`rerender`)."""
    figs = r.get("figures") or {} if figs is None else figs
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
          f"dominates here: the decided findings are the multi-seed ones (`deltaport demo --preset full`{_full_seeds()}; "
          "committed results in docs/results/full/summary.md)." + _margin_sentence(r["claims"]), "",
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
        pairs = sorted(c["curves"], key=_pair_key(_model_order(r)))
        L += [_table(["pair", "barrier (nats)", "relative barrier", "loss A", "loss B"],
                     [[k, f"{v['barrier']:.3f}", f"{v['relative_barrier']:.3f}", f"{v['loss_a']:.3f}",
                       f"{v['loss_b']:.3f}"] for k, v in ((k, c["curves"][k]) for k in pairs)]), ""]
        targets = sorted({x["target"] for x in c["cells"]}, key=lambda t: _rank(_model_order(r), t))
        rho = c["spearman"]
        predictors = sorted(rho, key=lambda k: (_rank(list(_PREDICTORS), k), k))
        L += ["Spearman correlation with the transfer outcome (held-out gain of M_t + Δ_s over M_t) across "
              f"{len(c['cells'])} grid cells (targets {_names(targets)}):", "",
              _table(["predictor", "Spearman ρ"], [[k, "–" if rho[k] is None else f"{rho[k]:+.2f}"] for k in predictors]),
              ""]
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
                f"{k}: {c['checks'][k]['verdict']}" for k in sorted(c["checks"], key=_pair_key(_model_order(r)))), ""]
        L += [_reading_conn(r), ""]
    if r.get("compression"):  # Δ bytes vs held-out score: deltaport.lab.compression
        from deltaport.lab.compression import report_section

        L += [sec("What compressing Δ costs the transfer (Δ bytes vs held-out score)"), "",
              report_section(r["compression"], figs.get("compression"))]
    env = r.get("environment") or {}
    from deltaport.lab.env import kind_of

    L += ["## Run", "", f"Seeds: {json.dumps(r['seeds'])}.", "",
          f"Environment: python {env.get('versions', {}).get('python')}, {env.get('platform')}, CPU "
          f"{kind_of(env)}, flags {', '.join(env.get('cpu', {}).get('kernel_flags', []))}, "
          f"{env.get('torch_threads')} torch thread(s).", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ".", "",
          "Reproducibility: the same versions (`pip install -c constraints.txt`) on the same CPU kind with the same "
          "torch thread count give the same bytes and numbers. Another CPU kind or thread count rounds differently "
          "(training kernels differ, e.g. with or without AVX-512), so the numbers can differ; this report does not "
          "measure by how much.", "",
          cache_text(r.get("cache") or {}), "",
          f"Per-item scorer vs lm-eval exact match: largest difference {r.get('item_scorer_max_mismatch', 0):.4f}.", "",
          "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r.get("timings_s", {}).items()) + ".", ""]
    return "\n".join(L)


def best_sources(row: dict[str, float]) -> list[str] | None:
    """The sources whose Δ gives a target its highest score (several when tied at one decimal); None when
    every Δ gives the same score (then no Δ is best)."""
    top = _pct(max(row.values()))
    best = [s for s, v in row.items() if _pct(v) == top]
    return None if len(best) == len(row) else best


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _reading_grid(r: dict) -> str:
    g = r["grid"]
    V = [t for t in r["config"]["versions"] if g["cells"].get(t)]
    parts = ["**Reading.** "]
    parts.append(f"The bases score {span([g['base'][t] for t in V], _pct)} % zero-shot: they have never seen the "
                 "question format (later versions know more facts). Adding another version's Δ gives the format "
                 "back where the two versions are close: ")
    said = []
    for t in V:
        row, ft = g["cells"][t], _pct(g["ft"].get(t))
        best = best_sources(row)
        if best is None:
            said.append(f"{t} scores {_pct(next(iter(row.values())))} with every Δ, none is best (FT {ft})")
        else:
            said.append(f"{t} is best with {_names([f'Δ{s[1:]}' for s in best])} ({_pct(row[best[0]])} vs FT {ft})")
    parts.append(", ".join(said) + ".")
    for name, what in (("Mx", "same data, other initialisation"), ("M0", "random")):
        row = g["cells"].get(name)
        if row and name in g["base"]:
            gains = [v - g["base"][name] for v in row.values()]
            parts.append(f" A Δ moves {name} ({what}) by {span(gains, _pts)} points over its base "
                         f"({_pct(g['base'][name])}).")
    return "".join(parts)


#: a fine-tune at most this much above chance (exact match, as a fraction) has learned the format only
NEAR_CHANCE = 0.05


def _reading_recovery(r: dict) -> str:
    rec = r["recovery"]["fraction"]
    V = r["config"]["versions"]
    sc = r["scores"]
    chance = r["chance"]
    parts = ["**Reading.** "]
    at_chance = [t for t in V if sc[f"FT({t})"]["heldout"] <= chance + NEAR_CHANCE]
    if at_chance:
        which = _names([f"FT({t}) {_pct(sc[f'FT({t})']['heldout'])}" for t in at_chance])
        parts.append(f"Plain fine-tuning scores at most {100 * NEAR_CHANCE:.0f} points above chance "
                     f"({_pct(chance)} %) on {'that base' if len(at_chance) == 1 else 'those bases'} ({which} %): "
                     "the facts are not learned yet, so the 'gain' is the answer format only and a recovery above "
                     "100 % there means little. ")
    per_source = {}
    for s in V:
        vals = [rec[t][s] for t in V if t != s and t not in at_chance and rec[t].get(s) is not None]
        if vals:
            per_source[s] = vals
    if per_source:
        left_out = f" (leaving out {_names(at_chance)})" if at_chance else ""
        parts.append(f"Recovery by source Δ over the other targets{left_out}: "
                     + "; ".join(f"Δ{s[1:]} {span(vals, _frac)}" for s, vals in per_source.items()) + ".")
    return "".join(parts).rstrip()


def _reading_ttf(r: dict) -> str:
    t = r["transfer_then_finetune"]
    parts = ["**Reading.** "]
    for pair, d in t["steps_to_plain_final"].items():
        a, b = d["first_step_transfer"], d["first_step_plain"]
        plain = "plain FT never did" if b is None else f"plain FT at step {b}"
        if a is None:
            parts.append(f"From {pair} fine-tuning never reached plain FT's final {_pct(d['plain_final'])} within the "
                         f"budget ({plain}). ")
        elif b is None or a < b:
            parts.append(f"From {pair} it starts at {_pct(d['start_transfer'])} and reaches plain FT's final score "
                         f"({_pct(d['plain_final'])}) at step {a}, {plain}. ")
        else:
            parts.append(f"From {pair} it reaches plain FT's final score ({_pct(d['plain_final'])}) at step {a}, no "
                         f"earlier than plain FT ({b}). ")
    return "".join(parts).rstrip()


def _reading_iter(r: dict) -> str:
    rows = r["iterative"]["rows"]
    cmp = [0 if _pct(x["iter"]) == _pct(x["dir"]) else 1 if x["iter"] > x["dir"] else -1 for x in rows.values()]
    counts = [f"{what} at {n}" for n, what in ((cmp.count(1), "above"), (cmp.count(0), "equal"),
                                               (cmp.count(-1), "below")) if n]
    return (f"**Reading.** FT(M_i + Δ^iter) against FT(M_i + Δ^dir): {_names(counts)} of {len(rows)} versions "
            f"(at the first link they are the same model). Both minus plain FT, in points: "
            + "; ".join(f"{v} {_pts(x['iter'] - x['ft'])} / {_pts(x['dir'] - x['ft'])}" for v, x in rows.items())
            + " (iter / dir).")


def _reading_backport(r: dict) -> str:
    rows = r["backport"]["rows"]
    return ("**Reading.** " + "; ".join(
        f"({x['old']}, {x['new']}): backporting gains {_pts(x['backport'] - x['old_base'])} points where FT(old) "
        f"gains {_pts(x['old_ft'] - x['old_base'])}, recycling {_pts(x['recycle'] - x['new_base'])} where FT(new) "
        f"gains {_pts(x['new_ft'] - x['new_base'])}" for x in rows) + ".")


def _reading_language(r: dict) -> str:
    lg = r["language"]
    rows = lg["rows"]
    s, t = lg["source"], lg["target"]
    src, src_b = rows[f"FT({s})"]["heldout"], rows[f"FTb(FT({s}))"]["heldout"]
    tgt, merged = rows[f"FT({t})"]["heldout"], rows[f"FT({t})+Δb{s[1:]}"]["heldout"]
    return (f"**Reading.** The language-b fine-tune lifts the source instruct model from {_pct(src)} to {_pct(src_b)} "
            f"on language-b questions; adding its Δ to {t}'s instruct model moves that from {_pct(tgt)} to "
            f"{_pct(merged)}" + (" — above the fine-tuned source, as Malagasy in Table 2."
                                 if _pct(merged) != _pct(src_b) and merged > src_b else "."))


#: a within-run barrier below this (nats) reads as "flat"
FLAT_BARRIER = 0.05


def barrier_groups(r: dict) -> dict[str, dict[str, float]]:
    """The connectivity pairs' barriers (nats) in three groups: ``within`` (two versions of one run),
    ``to_mx`` (a version and Mx, the other initialisation) and ``to_m0`` (M0, the random init, and any
    other base, Mx included)."""
    V = set(r["config"]["versions"])
    out: dict[str, dict[str, float]] = {"within": {}, "to_mx": {}, "to_m0": {}}
    for pair, v in (r.get("connectivity") or {}).get("curves", {}).items():
        a, _, b = pair.partition("-")
        group = "to_m0" if "M0" in (a, b) else "to_mx" if "Mx" in (a, b) else "within" if {a, b} <= V else None
        if group:
            out[group][pair] = v["barrier"]
    return out


def _nats(x: float) -> str:
    return f"{x:.3f}"


def _reading_conn(r: dict) -> str:
    c = r["connectivity"]
    g = barrier_groups(r)
    within, to_mx, to_m0 = (list(g[k].values()) for k in ("within", "to_mx", "to_m0"))
    said = []
    if within:
        said.append(f"between two versions of one run the loss barrier is {span(within, _nats)} nats")
    if to_mx:
        said.append(f"between a version and Mx (same data, other initialisation) {span(to_mx, _nats)}")
    if to_m0:
        said.append(f"between M0 (random initialisation) and any other base {span(to_m0, _nats)}")
    txt = "**Reading.** "
    if said:
        txt += said[0][0].upper() + "; ".join(said)[1:] + ". "
    rho = c["spearman"]
    best = max(((k, v) for k, v in rho.items() if v is not None), key=lambda kv: (abs(kv[1]), kv[0]), default=None)
    if best:
        tied = sorted(k for k, v in rho.items() if v is not None and f"{abs(v):.2f}" == f"{abs(best[1]):.2f}")
        if len(tied) > 1:
            names = _names([k.replace("_vs_gain", "") for k in tied])
            txt += (f"The strongest predictors of the gain here are {names} "
                    f"(|ρ| = {abs(best[1]):.2f}). ")
        else:
            name = best[0].replace("_vs_gain", "")
            txt += f"The strongest predictor of the gain here is {name} (ρ = {best[1]:+.2f}). "
    if within and to_mx:
        if min(to_mx) > max(within):
            txt += (f"The barrier separates Mx from the family (every pair with Mx ≥ {_nats(min(to_mx))}, every pair "
                    f"within the run ≤ {_nats(max(within))} nats)")
            txt += (f" but is flat inside it (below {FLAT_BARRIER} nats), so it cannot rank Δ sources of one lineage."
                    if max(within) < FLAT_BARRIER else ".")
        else:
            txt += (f"The barrier does not separate Mx from the family: a pair within the run reaches "
                    f"{_nats(max(within))} nats, a pair with Mx is as low as {_nats(min(to_mx))}.")
    return txt.rstrip()


def _margin_sentence(cl: list[dict]) -> str:
    """How a one-seed verdict is decided (the noise margin), from the claims' own numbers; lists the claims the
    margin leaves undecided although their item interval alone clears the threshold."""
    from deltaport.lab.findings import NOISE_MARGIN, fmt

    if not cl or "noise_margin" not in cl[0]:
        return ""
    width = ", ".join(f"{fmt(m, u).lstrip('+')} {name}" for u, m, name in
                      [(u, m, {"points": "points for a difference of scores", "fraction": "for a recovery", "rho": "for a rank correlation"}[u])
                       for u, m in NOISE_MARGIN.items()])
    txt = (" Floating-point noise is not in a one-seed interval either, so each verdict here is decided on the "
           f"interval widened on both sides by the design's noise bound ({width}): a claim within that bound of its "
           "threshold is left *inconclusive* at one seed.")
    held = [c["id"] for c in cl if c.get("item_verdict") not in (None, "inconclusive") and c["verdict"] == "inconclusive"]
    if held:
        txt += (f" That margin alone leaves {', '.join(f'({i})' for i in held)} undecided here; the item interval alone "
                "would say " + ", ".join(f"{c['item_verdict']} for ({c['id']})" for c in cl if c["id"] in held) + ".")
    return txt


def refresh_claims(r: dict) -> dict:
    """``r`` with its claims decided again by today's rules from its own per-item answers, and its noise twin's
    verdicts likewise from the twin's stored interval (no lab step reruns)."""
    from deltaport.lab.findings import FINDINGS, one_seed_verdict
    from deltaport.lab.noise import attach

    r["claims"] = claims(r)
    tw = r.get("noise_twin")
    if tw:
        meta = {f.id: f for f in FINDINGS}
        for i, c in tw["claims"].items():
            f = meta[i]
            c["verdict"] = one_seed_verdict({**c, "unit": f.unit, "threshold": f.threshold, "direction": f.direction})
    attach(r["claims"], tw)
    return r


def write_outputs(r: dict, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    r["claims"] = claims(r)
    from deltaport.lab.noise import attach  # the noise twin's value beside every claim (docs/lab.md)

    attach(r["claims"], r.get("noise_twin"))
    figs = figures(r, run_dir / "figures")
    r["figures"] = figs
    text = json.dumps(r, indent=1, sort_keys=True, default=str)
    write_text(run_dir / "results.json", text)
    # rendered from the file just written, so report.md is exactly what rerender(run_dir) gives
    write_text(run_dir / "report.md", report_md(json.loads(text)))


def rerender(run_dir: Path) -> str:
    """``report.md`` of a finished (or committed) run, from its ``results.json`` alone: no lab step reruns."""
    return report_md(json.loads((Path(run_dir) / "results.json").read_text()))
