"""What an evaluation reports: lm-eval's result entries parsed into ``{metric: value}``, derived
metrics, the primary metric of a column, the comparison table and the results file.
"""

from __future__ import annotations

import math

from deltaport.errors import InputError

_NON_METRIC_KEYS = {"alias", "name", "sample_len", "samples", " "}


def _metric_name(key: str) -> tuple[str, bool] | None:
    """'acc,none' -> ('acc', False); 'acc_stderr,none' -> ('acc', True); 'exact_match,strict-match' ->
    ('exact_match,strict-match', False)."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    stderr = metric.endswith("_stderr")
    if stderr:
        metric = metric[: -len("_stderr")]
    name = metric if filt == "none" else f"{metric},{filt}"
    return name, stderr


def parse_metrics(entry: dict) -> dict[str, float | None]:
    """One task's lm-eval result entry as ``{metric: value, metric + "_stderr": value}`` (None: not a number)."""
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        if key in _NON_METRIC_KEYS:
            continue
        parsed = _metric_name(key)
        if parsed is None:
            continue
        name, is_err = parsed
        try:
            value = None if isinstance(value, (bool, str)) or value is None else float(value)
        except (TypeError, ValueError):
            value = None
        if value is not None and math.isnan(value):
            value = None
        out[name + "_stderr" if is_err else name] = value
    for name in [k for k in out if not k.endswith("_stderr")]:
        out.setdefault(name + "_stderr", None)
    return out


def add_derived_metrics(metrics: dict, derived: dict[str, list[str]]) -> None:
    """Add each ``new: [parts]`` of ``derived`` as the mean of its parts (when all are numbers)."""
    for new, parts in derived.items():
        vals = [metrics.get(p) for p in parts]
        if all(isinstance(v, (int, float)) for v in vals):
            metrics[new] = sum(vals) / len(vals)
            metrics[new + "_stderr"] = None


def primary_metric(metrics: dict, preferred: str | None) -> str | None:
    """The metric a column shows: ``preferred`` when present, else the first numeric non-stderr one."""
    if preferred and preferred in metrics:
        return preferred
    for k in metrics:
        if not k.endswith("_stderr") and isinstance(metrics[k], (int, float)):
            return k
    return None


def comparison_table(results: dict, baseline: str | None = None) -> str:
    """A Markdown table like the paper's Table 1: a row per model, a column per task, the average.

    Scores are the column's primary metric (the preset's, else the task's first), shown ×100 when every
    value lies in [0, 1], with the standard error and the number of documents scored beside each, e.g.
    ``56.9 ± 2.2 (n=500)``. With ``baseline`` (a row name) every cell also shows the difference to the
    baseline's cell, e.g. ``56.9 ± 2.2 (n=500) [+30.3]``.
    """
    rows = results.get("results", results)
    if not rows:
        return "(no results)\n"
    cols_meta = results.get("columns") or {}
    tasks: list[str] = list(cols_meta) or sorted({t for r in rows.values() for t in r})
    if baseline is not None and baseline not in rows:
        raise InputError(f"baseline {baseline!r} is not one of the evaluated models: {', '.join(rows)}")
    metric_of: dict[str, str | None] = {}
    for t in tasks:
        pref = (cols_meta.get(t) or {}).get("metric")
        found = None
        for r in rows.values():
            if t in r:
                found = primary_metric(r[t], pref)
                if found:
                    break
        metric_of[t] = found

    def value(row: str, t: str) -> float | None:
        m = metric_of[t]
        v = rows[row].get(t, {}).get(m) if m else None
        return v if isinstance(v, (int, float)) else None

    def stderr(row: str, t: str) -> float | None:
        m = metric_of[t]
        v = rows[row].get(t, {}).get(m + "_stderr") if m else None
        return v if isinstance(v, (int, float)) and v == v else None

    details = results.get("details") or {}

    def n_of(row: str, t: str) -> int | None:
        ns = ((details.get(row) or {}).get(t) or {}).get("n_samples") or {}
        n = ns.get(t)
        if isinstance(n, dict):
            n = n.get("effective", n.get("original"))
        return n if isinstance(n, int) else None

    scale = {t: 100.0 if all(0.0 <= (value(r, t) or 0.0) <= 1.0 for r in rows) else 1.0 for t in tasks}

    def avg(row: str) -> float | None:
        vals = [value(row, t) for t in tasks]
        if not vals or any(v is None for v in vals):
            return None
        return sum(v * scale[t] for v, t in zip(vals, tasks)) / len(vals)

    def cell(v: float | None, b: float | None, se: float | None = None, n: int | None = None) -> str:
        if v is None:
            return "–"
        s = f"{v:.1f}"
        if se is not None:
            s += f" ± {se:.1f}"
        if n is not None:
            s += f" (n={n})"
        if b is not None:
            s += f" [{v - b:+.1f}]"
        return s

    labels = [(cols_meta.get(t) or {}).get("label") or t for t in tasks]
    lines = ["| Model | " + " | ".join(labels) + " | Avg |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = []
        for t in tasks:
            v = value(row, t)
            b = value(baseline, t) if baseline is not None and row != baseline else None
            se = stderr(row, t)
            cells.append(cell(None if v is None else v * scale[t], None if b is None else b * scale[t],
                              None if se is None else se * scale[t], n_of(row, t)))
        a = avg(row)
        ab = avg(baseline) if baseline is not None and row != baseline else None
        cells.append(cell(a, ab))
        name = f"**{row}** (baseline)" if row == baseline else row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = ", ".join(f"{lab}: {metric_of[t] or '?'}{' ×100' if scale[t] == 100.0 else ''}"
                      for lab, t in zip(labels, tasks))
    lines.append("")
    lines.append(f"Metrics — {notes}. Each score ± its standard error (lm-eval's), n = documents scored"
                 + (f"; [differences] are to {baseline}." if baseline else "."))
    return "\n".join(lines) + "\n"
