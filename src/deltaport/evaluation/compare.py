"""Paired comparisons: is a model's difference to the reference on a task real, and which items changed?

Every model of an evaluation is scored on the same items (same task, limit and seed), so a
difference in a metric that is a mean over items is the mean of per-item differences, and its
uncertainty is a paired bootstrap over items (:func:`deltaport.stats.paired_bootstrap`, the lab's
one implementation). For each task, each such metric and each model other than the reference
(``baseline``, default the first model) :func:`compare` gives::

    {"task", "metric", "model", "reference", "score", "reference_score", "difference", "ci_low",
     "ci_high", "level", "n_items", "right_to_wrong", "wrong_to_right"}

``difference`` is ``score − reference_score`` over the paired items, and always
``ci_low ≤ difference ≤ ci_high``. ``right_to_wrong`` / ``wrong_to_right`` count the items that
flipped (metrics with 0/1 values only; None otherwise); with ``list_items`` the entries also name
them (``right_to_wrong_items``: ``"task/doc_id"``). A metric that is not the mean of its per-item
values (a corpus-level score, a group averaged over subtasks) is not compared (logged).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from deltaport.errors import InputError

LOG = logging.getLogger(__name__)


def _is_item_mean(values: list[float], score) -> bool:
    if not isinstance(score, (int, float)) or not values:
        return False
    return math.isclose(sum(values) / len(values), float(score), rel_tol=1e-9, abs_tol=1e-12)


def compare(results: dict, baseline: str | None = None, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
            list_items: bool = False) -> list[dict]:
    """Each model against ``baseline`` (a row of ``results``; default the first) on every task and
    item-mean metric: the difference with its paired bootstrap interval and the flipped items.

    Args:
        results: what :func:`deltaport.evaluate` returned (needs its ``items``).
        baseline: the reference row; None: the first model.
        n_boot, seed, level: the bootstrap's replicates, RNG seed and coverage.
        list_items: also list the flipped items' ids.
    """
    from deltaport.stats import paired_bootstrap

    items = results.get("items")
    if items is None:
        raise InputError("these results carry no per-item values (`items`); compare needs what "
                         "deltaport.evaluate returns, not a results file")
    rows = [r for r in results["results"] if items.get(r)]
    if baseline is None:
        if not rows:
            return []
        baseline = rows[0]
    if baseline not in results["results"]:
        raise InputError(f"baseline {baseline!r} is not one of the evaluated models: {', '.join(results['results'])}")
    if baseline not in rows:
        raise InputError(f"baseline {baseline!r} has no scores (a chat row of a model without a chat template?)")
    tasks = list(results.get("columns") or items[baseline])
    out: list[dict] = []
    for task in tasks:
        ref = items[baseline].get(task)
        if not ref:
            continue
        for metric, ref_values in ref["metrics"].items():
            ref_score = results["results"][baseline][task].get(metric)
            if not _is_item_mean(ref_values, ref_score):
                LOG.info("%s %s: not the mean of its per-item values; not compared", task, metric)
                continue
            ref_at = dict(zip(ref["ids"], ref_values))
            for row in rows:
                if row == baseline or task not in items[row]:
                    continue
                mine = items[row][task]
                values = mine["metrics"].get(metric)
                score = results["results"][row].get(task, {}).get(metric)
                if values is None or not _is_item_mean(values, score):
                    continue
                at = dict(zip(mine["ids"], values))
                ids = [i for i in ref["ids"] if i in at]
                if len(ids) != len(ref["ids"]) or len(ids) != len(mine["ids"]):
                    LOG.warning("%s %s: %s and %s were scored on different items; %d shared items compared",
                                task, metric, row, baseline, len(ids))
                if not ids:
                    continue
                a = [ref_at[i] for i in ids]
                b = [at[i] for i in ids]
                ci = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, level=level)
                entry = {"task": task, "metric": metric, "model": row, "reference": baseline,
                         "score": sum(b) / len(b), "reference_score": sum(a) / len(a),
                         "difference": ci["difference"], "ci_low": ci["lo"], "ci_high": ci["hi"], "level": level,
                         "n_items": len(ids), "right_to_wrong": None, "wrong_to_right": None}
                if all(v in (0.0, 1.0) for v in a + b):
                    down = [i for i, x, y in zip(ids, a, b) if x == 1.0 and y == 0.0]
                    up = [i for i, x, y in zip(ids, a, b) if x == 0.0 and y == 1.0]
                    entry["right_to_wrong"], entry["wrong_to_right"] = len(down), len(up)
                    if list_items:
                        entry["right_to_wrong_items"], entry["wrong_to_right_items"] = down, up
                out.append(entry)
    return out


def _scale(comparisons: list[dict]) -> float:
    """100 when every score is a fraction (shown as points), else 1."""
    vals = [v for c in comparisons for v in (c["score"], c["reference_score"])]
    return 100.0 if vals and all(0.0 <= v <= 1.0 for v in vals) else 1.0


def comparisons_table(comparisons: list[dict]) -> str:
    """The comparisons as a Markdown table (readable on a terminal too); fractions shown ×100."""
    if not comparisons:
        return ""
    k = _scale(comparisons)
    level = comparisons[0]["level"]
    lines = [f"| task | metric | model | score | reference | difference [{level:.0%} CI] | items | "
             "right→wrong | wrong→right |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        flips = ("–", "–") if c["right_to_wrong"] is None else (str(c["right_to_wrong"]), str(c["wrong_to_right"]))
        lines.append(f"| {c['task']} | {c['metric']} | {c['model']} | {c['score'] * k:.1f} | "
                     f"{c['reference_score'] * k:.1f} | {c['difference'] * k:+.1f} [{c['ci_low'] * k:+.1f}, "
                     f"{c['ci_high'] * k:+.1f}] | {c['n_items']} | {flips[0]} | {flips[1]} |")
    refs = sorted({c["reference"] for c in comparisons})
    unit = "points (scores ×100)" if k == 100.0 else "metric units"
    lines += ["", f"Differences to {', '.join(refs)} in {unit}, with a {level:.0%} paired bootstrap interval over "
                  "the items all models were scored on; right→wrong / wrong→right count the items that flipped."]
    return "\n".join(lines) + "\n"


def plot_comparisons(comparisons: list[dict], path: str | Path, *, overwrite: bool = True) -> Path:
    """Draw each model's difference to the reference per task and metric, with its interval."""
    from deltaport.figures import pyplot, save_figure

    if not comparisons:
        raise InputError("nothing to plot: a comparison needs two or more models with per-item scores")
    plt = pyplot()
    k = _scale(comparisons)
    keys = list(dict.fromkeys((c["task"], c["metric"]) for c in comparisons))
    models = list(dict.fromkeys(c["model"] for c in comparisons))
    n_items = {(c["task"], c["metric"]): c["n_items"] for c in comparisons}
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.55 * len(keys) * max(1, len(models)) ** 0.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    step = 0.7 / max(1, len(models))
    for j, model in enumerate(models):
        mine = [c for c in comparisons if c["model"] == model]
        y = [keys.index((c["task"], c["metric"])) + (j - (len(models) - 1) / 2) * step for c in mine]
        x = [c["difference"] * k for c in mine]
        err = [[(c["difference"] - c["ci_low"]) * k for c in mine], [(c["ci_high"] - c["difference"]) * k for c in mine]]
        ax.errorbar(x, y, xerr=err, fmt="o", capsize=4, color=colors[j % len(colors)], label=model)
        for xi, yi in zip(x, y):
            ax.annotate(f"{xi:+.1f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    reach = max(abs(v) * k for c in comparisons for v in (c["ci_low"], c["ci_high"], c["difference"]))
    reach = max(reach * 1.15, 1.0 if k == 100.0 else 0.01)  # centred on 0; a zero interval still has an axis
    ax.set_xlim(-reach, reach)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{t} · {m}\n(n={n_items[(t, m)]})" for t, m in keys], fontsize=9)
    ax.set_ylim(len(keys) - 0.5, -0.5)
    level = comparisons[0]["level"]
    unit = "points (×100)" if k == 100.0 else "metric units"
    ax.set_xlabel(f"difference to {comparisons[0]['reference']}, {unit}")
    ax.set_title(f"Paired comparison: difference with its {level:.0%} bootstrap interval over items", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model", title_fontsize=8)
    return save_figure(fig, path, overwrite=overwrite, record=True)
