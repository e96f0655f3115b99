"""What compressing Δ costs the transfer, on the lab family: Δ bytes against the held-out score.

The lab's ``compression`` experiment takes every transfer cell of the grid (M_t + Δ_s, s ≠ t, targets
including Mx and M0), compresses each source's exact Δ with ``deltaport.compress`` at every setting of the
config's ``compression`` list, applies it with ``deltaport.apply`` and scores the result with the lab's own
held-out scorer. The ends of the scale are the exact Δ (the grid's own cells) and "no Δ" (the target
base). Three pieces, each usable on its own:

- :func:`frontier`: the step (compress, apply, score; cached by content like every lab step), returns a
  table (``results.json`` → ``compression``);
- :func:`figure`: Δ bytes (log x) against the mean held-out score, one line per method, ends marked;
- :func:`report_section`: the report's markdown for one run; :func:`combine` / :func:`summary_section`
  do the same across the seeds of a multi-seed run.

Bytes are the Δ directory's tensor files (``*.safetensors``); the ``deltaport.json`` provenance (a few KB
here: one record per tensor) and the tokenizer copy are not counted, for the exact Δ as for the
compressed ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

#: the recommendation rule, fixed before the full run: the smallest setting (mean bytes) whose mean gain
#: over "no Δ", summed over every transfer cell, is at least this fraction of the exact Δ's
RECOMMEND_MIN_GAIN_RETAINED = 0.95

_PARAM = {"lowrank": "rank", "sparse": "density", "sign": None}


def setting_errors(settings: Any) -> list[str]:
    """Problems with a config's ``compression`` list (empty when well-formed)."""
    from deltaport.io.compressed_format import METHODS

    if not isinstance(settings, list) or not settings:
        return ["compression: need a non-empty list of settings, e.g. [{method: sign}, {method: lowrank, rank: 4}]"]
    errors, seen = [], set()
    for i, s in enumerate(settings):
        where, n_before = f"compression[{i}]", len(errors)
        if not isinstance(s, dict) or s.get("method") not in METHODS:
            errors.append(f"{where}: need a mapping with method one of {', '.join(METHODS)}, got {s!r}")
            continue
        param = _PARAM[s["method"]]
        allowed = {"method", "include"} | ({param} if param else set())
        extra = sorted(set(s) - allowed)
        if extra:
            errors.append(f"{where}: unknown key(s) {', '.join(extra)} for method {s['method']} "
                          f"(known: {', '.join(sorted(allowed))})")
        if param == "rank" and not (isinstance(s.get("rank"), int) and s["rank"] > 0):
            errors.append(f"{where}: lowrank needs rank, a positive integer")
        if param == "density" and not (isinstance(s.get("density"), (int, float)) and 0 < s["density"] <= 1):
            errors.append(f"{where}: sparse needs density in (0, 1]")
        inc = s.get("include")
        if inc is not None and not (isinstance(inc, list) and all(isinstance(x, str) for x in inc)):
            errors.append(f"{where}: include must be a list of regexes")
        if len(errors) == n_before:
            if slug(s) in seen:
                errors.append(f"{where}: listed twice")
            seen.add(slug(s))
    return errors


def label(s: dict) -> str:
    """``lowrank r4``, ``sparse p=0.3``, ``sign``; ``+ vocab`` when vocabulary tensors are compressed too."""
    m = s["method"]
    core = f"lowrank r{s['rank']}" if m == "lowrank" else f"sparse p={s['density']:g}" if m == "sparse" else m
    return core + (" + vocab" if s.get("include") else "")


def slug(s: dict) -> str:
    """File-name form of a setting (``lowrank-r4``, ``sparse-p0.3``, ``sign-vocab``)."""
    m = s["method"]
    core = f"{m}-r{s['rank']}" if m == "lowrank" else f"{m}-p{s['density']:g}" if m == "sparse" else m
    return core + ("-vocab" if s.get("include") else "")


def tensor_bytes(delta_dir: Path) -> int:
    """Bytes of a Δ directory's tensor files (``*.safetensors``)."""
    return sum(f.stat().st_size for f in sorted(Path(delta_dir).glob("*.safetensors")))


def frontier(settings: list[dict], lib, deltas: dict[str, Path], targets: dict[str, Path],
             score: Callable[[dict[str, Path]], dict[str, float]], *, seed: int) -> dict[str, Any]:
    """Compress each source's Δ at every setting, apply it to every other target, score the results.

    Args:
        settings: the config's ``compression`` list (see :func:`setting_errors`).
        lib: the run's :class:`~deltaport.lab.steps.CachedLibrary` (its ``compress`` and ``apply``).
        deltas: source version -> its exact Δ directory (made by ``deltaport diff``).
        targets: target name -> base model directory (M1.., Mx, M0); a cell is every (t, s) with s ≠ t.
        score: the lab's held-out scorer, ``{name: model dir} -> {name: held-out exact match}``.
        seed: the lab seed; seeds DARE's mask (``compress --seed``).

    Returns ``{"cells", "rows", "settings", "seed", "n_deltas", "bytes_counted", "exact_delta_dtype",
    "timings_s"}``. ``rows``: the exact Δ, "no Δ", then one per setting, each with the Δ bytes (mean over
    the sources), ``ratio`` to the exact Δ's, the score per cell, ``mean`` over cells and ``gain_retained``
    (Σ cells (score − no Δ) / Σ cells (exact − no Δ)).
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cells = [(t, s) for t in targets for s in deltas if s != t]

    def row(name: str, method: str | None, setting: dict | None, nbytes: float, by_cell: dict) -> dict:
        return {"label": name, "method": method, "setting": setting, "bytes": nbytes, "cells": by_cell}

    def merged(s: str, t: str, d: Path, tag: str) -> tuple[str, Path]:
        name = f"{t}+{Path(deltas[s]).name}{tag}"
        return name, lib.apply(d, targets[t], name)

    t_apply = [0.0]

    def score_cells(dirs: dict[str, Path], tag: str) -> dict[str, dict[str, float]]:
        t0 = time.perf_counter()
        named = dict(merged(s, t, dirs[s], tag) for t, s in cells)
        t_apply[0] += time.perf_counter() - t0
        sc = score(named)
        out: dict[str, dict[str, float]] = {}
        for t, s in cells:
            out.setdefault(t, {})[s] = sc[f"{t}+{Path(deltas[s]).name}{tag}"]
        return out

    base = score(dict(targets))
    exact_bytes = {s: tensor_bytes(d) for s, d in deltas.items()}
    rows = [row("exact Δ", None, None, _mean(exact_bytes.values()), score_cells(dict(deltas), "")),
            row("no Δ", None, None, 0, {t: {s: base[t] for s in deltas if s != t} for t in targets})]
    timings = {"exact": {"apply_s": round(t_apply[0], 3)}}
    for s_ in settings:
        t_apply[0] = 0.0
        t0 = time.perf_counter()
        comp = {s: lib.compress(d, f"{Path(d).name}~{slug(s_)}", method=s_["method"], seed=seed,
                                    **{k: v for k, v in s_.items() if k != "method"}) for s, d in deltas.items()}
        t_comp = time.perf_counter() - t0
        nbytes = {s: tensor_bytes(d) for s, d in comp.items()}
        r = row(label(s_), s_["method"], s_, _mean(nbytes.values()), score_cells(comp, f"~{slug(s_)}"))
        r["bytes_per_delta"] = nbytes
        r["rel_frobenius_error"] = {s: _rel_error(d) for s, d in comp.items()}
        rows.append(r)
        timings[label(s_)] = {"compress_s": round(t_comp, 3), "apply_s": round(t_apply[0], 3)}
    exact, none = rows[0], rows[1]
    for r in rows:
        vals = [r["cells"][t][s] for t, s in cells]
        r["mean"] = sum(vals) / len(vals)
        r["ratio"] = r["bytes"] / exact["bytes"]
        den = sum(exact["cells"][t][s] - none["cells"][t][s] for t, s in cells)
        num = sum(r["cells"][t][s] - none["cells"][t][s] for t, s in cells)
        r["gain_retained"] = num / den if den else None
    timings["step"] = {"wall_s": round(time.perf_counter() - wall0, 2), "cpu_s": round(time.process_time() - cpu0, 2)}
    return {"cells": [list(c) for c in cells], "rows": rows, "settings": list(settings), "seed": seed,
            "n_deltas": len(deltas), "bytes_counted": "tensor files (*.safetensors) of the Δ directory",
            "exact_delta_dtype": _delta_dtype(next(iter(deltas.values()))), "timings_s": timings}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _rel_error(comp_dir: Path) -> float | None:
    """Mean relative Frobenius error ‖Δ − D‖/‖Δ‖ of the compressed tensors (compress's per-tensor record)."""
    rec = json.loads((Path(comp_dir) / "deltaport.json").read_text())["compression"]["tensors"]
    errs = [r["rel_frobenius_error"] for r in rec.values()
            if r["method"] != "exact" and r.get("rel_frobenius_error") is not None]
    return sum(errs) / len(errs) if errs else None


def _delta_dtype(d: Path) -> str:
    from deltaport.io.checkpoint import open_checkpoint

    return sorted({spec.dtype_name for spec in open_checkpoint(d).tensors.values()})[0]


# ----------------------------------------------------------------------------------------------- across seeds
def combine(tables: list[dict]) -> dict[str, Any]:
    """One frontier across seeds (the ``compression`` tables of several runs of one config): per row the
    per-seed mean score and gain retained, their mean, min and max, and the mean bytes; the recommended
    setting by :data:`RECOMMEND_MIN_GAIN_RETAINED`."""
    labels = [r["label"] for r in tables[0]["rows"]]
    for t in tables[1:]:
        if [r["label"] for r in t["rows"]] != labels:
            raise ValueError("compression tables of different settings cannot be combined")
    rows = []
    for i, lab in enumerate(labels):
        rs = [t["rows"][i] for t in tables]
        per = [r["mean"] for r in rs]
        gain = [r["gain_retained"] for r in rs]
        rows.append({"label": lab, "method": rs[0]["method"], "setting": rs[0]["setting"],
                     "bytes": _mean(r["bytes"] for r in rs), "ratio": _mean(r["ratio"] for r in rs),
                     "score_per_seed": per, "score": _mean(per), "score_min": min(per), "score_max": max(per),
                     "gain_per_seed": gain, "gain_retained": None if None in gain else _mean(gain),
                     "rel_frobenius_error": _mean(_mean(v for v in r["rel_frobenius_error"].values() if v is not None)
                                                  for r in rs) if rs[0].get("rel_frobenius_error") else None,
                     "compress_s": _mean(t["timings_s"].get(lab, {}).get("compress_s", 0.0) for t in tables),
                     "apply_s": _mean(t["timings_s"].get(lab, {}).get("apply_s", 0.0) for t in tables)})
    return {"seeds": [t["seed"] for t in tables], "n_cells": len(tables[0]["cells"]), "n_deltas": tables[0]["n_deltas"],
            "rows": rows, "recommended": recommend(rows), "rule": recommend_rule(),
            "bytes_counted": tables[0]["bytes_counted"], "exact_delta_dtype": tables[0]["exact_delta_dtype"]}


def recommend_rule() -> str:
    return (f"the smallest setting whose gain over no Δ, summed over every transfer cell, is ≥ "
            f"{100 * RECOMMEND_MIN_GAIN_RETAINED:.0f} % of the exact Δ's (mean over seeds)")


def recommend(rows: list[dict]) -> str | None:
    """Label of the smallest compressed setting retaining ≥ RECOMMEND_MIN_GAIN_RETAINED of the exact gain."""
    ok = [r for r in rows if r["method"] and r["gain_retained"] is not None
          and r["gain_retained"] >= RECOMMEND_MIN_GAIN_RETAINED]
    return min(ok, key=lambda r: (r["bytes"], r["label"]))["label"] if ok else None


# ----------------------------------------------------------------------------------------------- figure, text
def figure(table: dict, path: Path, *, title: str) -> Path:
    """Δ bytes (log x) against the mean held-out score over every transfer cell; one line per method,
    the exact Δ and "no Δ" marked (no Δ has 0 bytes: a horizontal line). ``table``: :func:`frontier`'s or
    :func:`combine`'s (the mean over seeds; the seeds' spread is mostly a shift of every setting together,
    so it is in the tables, not drawn)."""
    from deltaport.figures import pyplot, save_figure

    plt = pyplot()
    rows = table["rows"]
    y = (lambda r: r["score"]) if "score" in rows[0] else (lambda r: r["mean"])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    exact, none = rows[0], rows[1]
    ax.axhline(100 * y(none), color="grey", ls="--", lw=1)
    ax.text(exact["bytes"], 100 * y(none), "  no Δ (0 bytes)", va="bottom", ha="right", fontsize=8, color="grey")
    ax.axhline(100 * y(exact), color="black", ls=":", lw=1)
    ax.plot([exact["bytes"]], [100 * y(exact)], marker="*", ms=14, color="black", ls="", label="exact Δ", zorder=5)
    methods = []
    for r in rows[2:]:
        if r["method"] not in methods:
            methods.append(r["method"])
    markers = {"lowrank": "o", "sparse": "s", "sign": "D"}
    for i, m in enumerate(methods):
        for vocab in (False, True):
            pts = sorted((r for r in rows[2:] if r["method"] == m and bool(r["setting"].get("include")) == vocab),
                         key=lambda r: r["bytes"])
            if not pts:
                continue
            xs, ys = [r["bytes"] for r in pts], [100 * y(r) for r in pts]
            kw = dict(marker=markers.get(m, "o"), color=f"C{i}", ls="-" if not vocab else "--",
                      mfc="white" if vocab else f"C{i}", label=m + (" + vocab" if vocab else ""))
            ax.plot(xs, ys, **kw)
            for r, xv, yv in zip(pts, xs, ys):
                note = r["label"].replace(m, "").replace(" + vocab", "").strip()
                if note:
                    ax.annotate(note, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
    ax.set_xscale("log")
    # the y axis starts at 0 (no score is lower) so a gap of 0.1 points looks as small as it is
    ax.set_ylim(0, y_top(rows, y))
    ax.set_xlabel("Δ bytes (tensor files, log scale)")
    ax.set_ylabel("held-out exact match (%), mean over\ntransfer cells (y axis from 0)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110, bbox_inches=None)
    return path


def y_top(rows: list[dict], y: Callable[[dict], float]) -> float:
    """The top of the figure's y axis (%): the highest score plus a fifth, at least 1."""
    return max(1.0, 1.2 * max(100 * y(r) for r in rows))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _kb(b: float) -> str:
    return f"{b / 1024:,.1f}"


def report_section(table: dict, fig: str | None = None) -> str:
    """Markdown for one run's ``compression`` table (the section body; the caller numbers the heading)."""
    cells = table["cells"]
    L = [f"Every transfer cell ({len(cells)}: M_t + Δ_s, s ≠ t, Mx and M0 included) with the source's Δ "
         "compressed by `deltaport compress` and applied by `deltaport apply`, scored like the grid. Δ bytes: "
         f"the {table['bytes_counted']}, mean over the {table['n_deltas']} sources; the exact Δ is "
         f"{table['exact_delta_dtype']}. Gain retained: Σ over cells of (score − no Δ) / Σ of (exact Δ − no Δ). "
         f"One seed ({table['seed']}); across seeds see docs/compression.md.", ""]
    if fig:
        L += [f"![compression]({fig})", "", "The figure's y axis starts at 0.", ""]
    hdr = ["Δ", "KiB", "of exact", "rel. Frobenius error (mean)", "held-out, mean over cells", "gain retained",
           "compress s", "apply s"]
    rows = []
    for r in table["rows"]:
        tm = table["timings_s"].get(r["label"], {})
        err = r.get("rel_frobenius_error")
        rows.append([r["label"], _kb(r["bytes"]), f"{r['ratio']:.3f}",
                     "–" if not err else f"{_mean(v for v in err.values() if v is not None):.3f}", _pct(r["mean"]),
                     "–" if r["gain_retained"] is None else f"{100 * r['gain_retained']:.0f} %",
                     f"{tm['compress_s']:.2f}" if "compress_s" in tm else "", f"{tm['apply_s']:.2f}" if "apply_s" in tm
                     else ""])
    step = table["timings_s"].get("step", {})
    L += [_md_table(hdr, rows), "",
          "Compress time: all sources at that setting (0 when reused from the cache); apply time: every cell. This "
          f"experiment took {step.get('wall_s', 0):.0f} s wall, {step.get('cpu_s', 0):.0f} s CPU (this process; "
          "evaluations reused from the cache cost nothing).", ""]
    return "\n".join(L)


def threads_text(n: int | None) -> str:
    """``one torch thread`` / ``2 torch threads`` as the run's environment recorded it (``torch_threads``)."""
    return "torch threads not recorded" if n is None else "one torch thread" if n == 1 else f"{n} torch threads"


def summary_section(sm: dict, *, threads: int | None = None) -> str:
    """Markdown for :func:`combine`'s table (a multi-seed run's summary and docs/compression.md); ``threads``:
    the runs' torch thread count (``environment.torch_threads``)."""
    seeds = ", ".join(map(str, sm["seeds"]))
    L = [f"Held-out exact match of M_t + compressed Δ_s over every transfer cell ({sm['n_cells']} per seed), "
         f"seeds {seeds}: per seed the mean over cells, then their mean [min, max]. Δ bytes: the "
         f"{sm['bytes_counted']}; the exact Δ is {sm['exact_delta_dtype']}. Gain retained: Σ cells (score − no Δ) "
         "/ Σ cells (exact Δ − no Δ).", "",
         _md_table(["Δ", "KiB", "of exact", "rel. Frobenius error (mean)", "held-out % per seed", "mean [min, max]",
                    "gain retained", "compress s", "apply s"],
                   [[r["label"], _kb(r["bytes"]), f"{r['ratio']:.3f}",
                     "–" if r["rel_frobenius_error"] is None else f"{r['rel_frobenius_error']:.3f}",
                     " / ".join(_pct(x) for x in r["score_per_seed"]),
                     f"{_pct(r['score'])} [{_pct(r['score_min'])}, {_pct(r['score_max'])}]",
                     "–" if r["gain_retained"] is None else f"{100 * r['gain_retained']:.0f} %",
                     f"{r['compress_s']:.2f}" if r["method"] else "",
                     f"{r['apply_s']:.2f}" if r["method"] else ""] for r in sm["rows"]]),
         "", f"compress s: the {sm['n_deltas']} source Δs at that setting; apply s: all {sm['n_cells']} cells (mean "
             f"over seeds, wall time on a shared machine, {threads_text(threads)}). The exact Δ's cells are the "
             "grid's own models.", ""]
    rec = sm.get("recommended")
    if rec:
        r = next(x for x in sm["rows"] if x["label"] == rec)
        ex = sm["rows"][0]
        L += [f"Recommended by the rule fixed before the run ({sm['rule']}): **{rec}**: {r['ratio']:.3f} of the exact "
              f"Δ's bytes ({_kb(r['bytes'])} vs {_kb(ex['bytes'])} KiB), {100 * r['gain_retained']:.0f} % of its "
              f"gain; held-out {_pct(r['score'])} vs {_pct(ex['score'])} % with the exact Δ.", ""]
    else:
        L += [f"No setting meets the rule fixed before the run ({sm['rule']}).", ""]
    return "\n".join(L)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ----------------------------------------------------------------------------------------------- committed results
def collect(run_dir: Path, dest: Path) -> dict:
    """The frontier of a multi-seed run (``RUN_DIR/seed-*/results.json``) into ``dest/compression.json`` (per-seed
    tables and their combination) and ``dest/compression.png``."""
    runs = [json.loads((d / "results.json").read_text()) for d in sorted(Path(run_dir).glob("seed-*"))]
    runs = [r for r in runs if r.get("compression")]
    if len(runs) < 2:
        raise ValueError(f"{run_dir}: need seed-*/results.json of at least two seeds with a compression experiment")
    runs.sort(key=lambda r: r["config"]["seed"])
    doc = {"name": runs[0]["name"], "experiments": runs[0]["config"]["experiments"],
           "settings": runs[0]["config"]["compression"],
           "combined": combine([r["compression"] for r in runs]), "per_seed": [r["compression"] for r in runs],
           "environment": runs[0].get("environment", {})}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "compression.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    figure(doc["combined"], dest / "compression.png", title="compressed Δ: bytes vs held-out score (mean over "
           f"seeds {', '.join(map(str, doc['combined']['seeds']))} and {doc['combined']['n_cells']} transfer cells)")
    return doc


def readme_block(doc: dict) -> str:
    """The generated README / docs/compression.md block from :func:`collect`'s ``compression.json``."""
    from deltaport.lab.env import kind_of

    env = doc.get("environment", {})
    return (summary_section(doc["combined"], threads=env.get("torch_threads")).rstrip("\n") + "\n\n"
            f"Run `{doc['name']}` (experiments: {', '.join(doc['experiments'])}); {kind_of(env)}, torch "
            f"{env.get('versions', {}).get('torch')}, {threads_text(env.get('torch_threads'))}.")
