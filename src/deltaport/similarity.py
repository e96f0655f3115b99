"""Weight-space similarity of the checkpoints a transfer involves, per tensor and per layer.

For every tensor (streamed: one tensor of each checkpoint in memory at a time, math in float64 chunks):

* ``rel_distance`` = ‖m_t − m_s‖ / ‖m_s‖ — how far the target base moved from the source base;
* ``delta_norm`` = ‖Δ_s‖ with Δ_s = m'_s − m_s, and ``delta_rel`` = ‖Δ_s‖ / ‖m_s‖;
* when the target's own fine-tune m'_t exists: ``cos`` = cos(Δ_s, Δ_t) with Δ_t = m'_t − m_t
  ("diff-vector agreement", paper §3.2 candidate metric), and ``delta_t_norm``.

Per-layer and whole-model values aggregate sums of squares and dot products (not averages of ratios).
Tied weights (``tie_word_embeddings``) are counted once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from deltaport import causal_lm
from deltaport.errors import PlanError
from deltaport.figures import pyplot, save_figure
from deltaport.options import SIMILARITY, SimilarityOptions, declared
from deltaport.plan.names import ties_word_embeddings

CHUNK = 1 << 22  # elements per float64 chunk

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder\.layers)\.(\d+)\.")


def _open(spec: Any, allow_pickle: bool = False):
    from deltaport.io.checkpoint import open_checkpoint

    return open_checkpoint(spec, allow_pickle=allow_pickle)


def layer_of(name: str) -> str:
    """Group name of a tensor: ``layer 3``, ``embed``, ``head``, ``final norm`` or its module path."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    low = name.lower()
    if "embed" in low or low.startswith(("wte", "wpe")) or ".wte." in low or ".wpe." in low:
        return "embed"
    if "lm_head" in low or low.startswith("output.") or "score" in low:
        return "head"
    if "norm" in low or ".ln_f" in low:
        return "final norm"
    return name.rsplit(".", 1)[0]


def _group_order(g: str) -> tuple:
    if g == "embed":
        return (0, 0, "")
    if g.startswith("layer "):
        return (1, int(g.split()[1]), "")
    if g == "final norm":
        return (2, 0, "")
    if g == "head":
        return (3, 0, "")
    return (4, 0, g)


def _stats(ms: torch.Tensor, fs: torch.Tensor, mt: torch.Tensor, ft: torch.Tensor | None) -> dict[str, float]:
    """Sums of squares / dots in float64, chunk by chunk (no full float64 copy of a big tensor)."""
    acc = dict(ss=0.0, dd=0.0, tt=0.0, dt=0.0, dst=0.0)
    ms, fs, mt = ms.reshape(-1), fs.reshape(-1), mt.reshape(-1)
    ft = ft.reshape(-1) if ft is not None else None
    for i in range(0, ms.numel(), CHUNK):
        a = ms[i:i + CHUNK].double()
        d = fs[i:i + CHUNK].double() - a
        t = mt[i:i + CHUNK].double()
        acc["ss"] += float(a.dot(a))
        acc["dd"] += float(d.dot(d))
        dist = t - a
        acc["dst"] += float(dist.dot(dist))
        if ft is not None:
            dtv = ft[i:i + CHUNK].double() - t
            acc["tt"] += float(dtv.dot(dtv))
            acc["dt"] += float(d.dot(dtv))
    return acc


def _finish(acc: dict[str, float], has_t: bool) -> dict[str, float | None]:
    ss, dd, dst = acc["ss"] ** 0.5, acc["dd"] ** 0.5, acc["dst"] ** 0.5
    out: dict[str, float | None] = {
        "source_norm": ss,
        "distance": dst,
        "rel_distance": dst / ss if ss > 0 else None,
        "delta_norm": dd,
        "delta_rel": dd / ss if ss > 0 else None,
    }
    if has_t:
        tt = acc["tt"] ** 0.5
        out["delta_t_norm"] = tt
        out["cos"] = acc["dt"] / (dd * tt) if dd > 0 and tt > 0 else None
    return out


@declared(SimilarityOptions)
def similarity(source_base: Any, source_finetuned: Any, target_base: Any, target_finetuned: Any = None, *,
               progress: bool = False, allow_pickle: bool = SIMILARITY.allow_pickle) -> dict:
    """Per-tensor, per-layer and whole-model similarity of m_s, m'_s, m_t (and m'_t if given).

    All arguments are local HF model directories or hub ids (safetensors; a directory that holds
    only pickled weights is refused unless ``allow_pickle``, then read with
    ``torch.load(weights_only=True)``). Tensors whose shapes differ between the checkpoints (e.g. a
    resized vocabulary) are skipped and listed under ``"skipped"``; a tensor missing from one
    checkpoint is a :class:`PlanError`.

    Returns ``{"tensors": [...], "layers": [...], "total": {...}, "skipped": [...], "tied": [...],
    "num_parameters": int, ...}``.
    """
    cks = {"source_base": _open(source_base, allow_pickle), "source_finetuned": _open(source_finetuned, allow_pickle),
           "target_base": _open(target_base, allow_pickle)}
    if target_finetuned is not None:
        cks["target_finetuned"] = _open(target_finetuned, allow_pickle)
    base = cks["source_base"]
    names = list(base.names)
    tied_skip: list[str] = []
    if ties_word_embeddings(base) and "lm_head.weight" in names and any("embed_tokens" in n for n in names):
        names.remove("lm_head.weight")  # same storage as the input embedding: count it once
        tied_skip.append("lm_head.weight")
    for role, ck in cks.items():
        if role == "source_base":
            continue
        have = set(ck.names)
        missing = [n for n in names if n not in have]
        if missing:
            raise PlanError(f"{ck.source} ({role}) lacks {len(missing)} tensor(s) that {base.source} has, e.g. "
                            f"{missing[:3]}; similarity needs checkpoints of the same architecture")
    has_t = target_finetuned is not None
    tensors, skipped = [], []
    groups: dict[str, dict[str, float]] = {}
    total = dict(ss=0.0, dd=0.0, tt=0.0, dt=0.0, dst=0.0)
    gnumel: dict[str, int] = {}
    n_params = 0
    with causal_lm.progress_bar(progress, len(names), "similarity") as bar:
        for name in names:
            shapes = {role: tuple(ck.spec(name).shape) for role, ck in cks.items()}
            if len(set(shapes.values())) > 1:
                skipped.append({"name": name, "shapes": shapes})
                bar.advance()
                continue
            if not ck_is_float(base, name):
                bar.advance()
                continue
            ms = base.tensor(name)
            fs = cks["source_finetuned"].tensor(name)
            mt = cks["target_base"].tensor(name)
            ft = cks["target_finetuned"].tensor(name) if has_t else None
            acc = _stats(ms, fs, mt, ft)
            del ms, fs, mt, ft
            g = layer_of(name)
            numel = 1
            for s in shapes["source_base"]:
                numel *= s
            n_params += numel
            tensors.append({"name": name, "layer": g, "shape": list(shapes["source_base"]), "numel": numel,
                            **_finish(acc, has_t)})
            ga = groups.setdefault(g, dict(ss=0.0, dd=0.0, tt=0.0, dt=0.0, dst=0.0))
            for k, v in acc.items():
                ga[k] += v
                total[k] += v
            gnumel[g] = gnumel.get(g, 0) + numel
            bar.advance()
    layers = [{"layer": g, "numel": gnumel[g], **_finish(groups[g], has_t)} for g in sorted(groups, key=_group_order)]
    return {
        "source_base": base.source,
        "source_finetuned": cks["source_finetuned"].source,
        "target_base": cks["target_base"].source,
        "target_finetuned": cks["target_finetuned"].source if has_t else None,
        "num_parameters": n_params,
        "total": _finish(total, has_t),
        "layers": layers,
        "tensors": tensors,
        "skipped": skipped,
        "tied": tied_skip,
    }


def ck_is_float(ck, name: str) -> bool:
    return ck.spec(name).dtype.is_floating_point


def plot_layers(report: dict, path: str | Path, *, overwrite: bool = True) -> Path:
    """Heat map: one row per layer group, one column per metric (each column its own colour scale)."""
    import numpy as np

    plt = pyplot()
    cols = [("rel_distance", "‖m_t − m_s‖ / ‖m_s‖", "viridis"), ("delta_rel", "‖Δ_s‖ / ‖m_s‖", "magma")]
    if report.get("target_finetuned"):
        cols.append(("cos", "cos(Δ_s, Δ_t)", "RdBu"))
    rows = [r["layer"] for r in report["layers"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.4 * len(cols) + 1.2, 0.32 * len(rows) + 1.6), squeeze=False)
    for ax, (key, title, cmap) in zip(axes[0], cols):
        vals = np.array([[np.nan if r.get(key) is None else r[key]] for r in report["layers"]], dtype=float)
        kw = dict(vmin=-1, vmax=1) if key == "cos" else {}
        im = ax.imshow(vals, aspect="auto", cmap=cmap, **kw)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.set_xticks([])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals[:, 0]):
            if v == v:
                ax.text(0, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="black",
                        bbox=dict(facecolor="white", alpha=0.6, edgecolor="none", pad=1))
        fig.colorbar(im, ax=ax, fraction=0.08)
    fig.suptitle(f"total: rel. distance {report['total']['rel_distance']:.4g}, "
                 f"‖Δ_s‖/‖m_s‖ {report['total']['delta_rel']:.4g}"
                 + (f", cos {report['total']['cos']:.3f}" if report['total'].get('cos') is not None else ""), fontsize=9, y=1.03)
    return save_figure(fig, path, overwrite=overwrite, record=True)
