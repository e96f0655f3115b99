"""Bootstrap intervals over items (and seeds): one implementation, for the lab and for ``deltaport eval``.

A statistic is computed *within one seed* from per-item vectors (all models of a seed are scored on
the same items, so resampling items keeps the pairing). The estimate is the mean over seeds; its
95 % interval comes from a two-level percentile bootstrap: resample the seeds with replacement, then,
inside each drawn seed, resample its items with replacement, recompute the statistic per drawn seed
and average. With one seed only the items are resampled: that is the paired bootstrap over items of
:func:`paired_bootstrap` (``deltaport eval``'s comparisons), and the lab's single-seed intervals.

Deterministic: the resampling uses ``numpy.random.default_rng(seed)``. :func:`spearman` is a rank
correlation (the lab's connectivity section and finding (f)). Needs numpy only.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

#: statistic(seed_data, item_index) -> value; ``item_index`` indexes every vector of ``seed_data``
Statistic = Callable[[dict, np.ndarray], float]


def point(stat: Statistic, seeds: Sequence[dict]) -> list[float]:
    """The statistic of every seed on all its items."""
    return [float(stat(d, np.arange(d["n_items"]))) for d in seeds]


def hierarchical_bootstrap(stat: Statistic, seeds: Sequence[dict], *, n_boot: int = 2000, seed: int = 0,
                           level: float = 0.95) -> dict:
    """Mean over seeds of ``stat`` with a two-level (seeds, then items) percentile bootstrap interval.

    Args:
        stat: the within-seed statistic (see :data:`Statistic`).
        seeds: one dict per seed, each with ``n_items`` and the vectors ``stat`` reads.
        n_boot: bootstrap replicates.
        seed: the resampling RNG seed (same inputs + same seed -> same interval).
        level: the interval's coverage.

    Returns:
        ``{"per_seed", "mean", "lo", "hi", "seed_sd", "seed_range", "n_seeds", "n_boot", "level"}``;
        ``lo``/``hi`` are None if the statistic is undefined (NaN) in more than 5 % of replicates.
    """
    if not seeds:
        raise ValueError("hierarchical_bootstrap needs at least one seed")
    per_seed = point(stat, seeds)
    mean = float(np.mean(per_seed))
    rng = np.random.default_rng(seed)
    k = len(seeds)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        drawn = rng.integers(0, k, size=k) if k > 1 else np.zeros(1, dtype=int)
        vals = []
        for j in drawn:
            n = seeds[j]["n_items"]
            vals.append(stat(seeds[j], rng.integers(0, n, size=n)))
        reps[b] = float(np.mean(vals))
    ok = reps[~np.isnan(reps)]
    alpha = (1 - level) / 2
    if len(ok) < 0.95 * n_boot or math.isnan(mean):
        lo = hi = None
    else:
        lo, hi = (float(x) for x in np.quantile(ok, [alpha, 1 - alpha]))
        # percentile intervals of a skewed statistic can miss a mean of few seeds; widen to contain it
        lo, hi = min(lo, mean), max(hi, mean)
    return {"per_seed": per_seed, "mean": mean, "lo": lo, "hi": hi,
            "seed_sd": float(np.std(per_seed, ddof=1)) if k > 1 else None,
            "seed_range": [float(min(per_seed)), float(max(per_seed))], "n_seeds": k, "n_boot": n_boot,
            "level": level}


def paired_bootstrap(reference: Sequence[float], other: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """``mean(other − reference)`` over paired items, with its percentile bootstrap interval over items.

    The two vectors hold one value per item, in the same item order (both models scored on the same
    items); items are resampled together, so the pairing is kept. This is :func:`hierarchical_bootstrap`
    with one seed. The interval always contains the difference (see there).

    Returns:
        ``{"difference", "lo", "hi", "n_items", "n_boot", "level"}``.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two non-empty vectors of one length, got {a.shape} and {b.shape}")
    d = b - a
    ci = hierarchical_bootstrap(lambda data, idx: float(data["d"][idx].mean()), [{"d": d, "n_items": d.size}],
                                n_boot=n_boot, seed=seed, level=level)
    return {"difference": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "n_items": int(d.size), "n_boot": n_boot,
            "level": level}


def verdict(ci: dict, threshold: float, direction: str) -> str:
    """``yes`` / ``no`` / ``inconclusive`` for a claim about the statistic, decided on the interval.

    ``direction``: ``">="`` (claim: θ ≥ threshold), ``">"`` (θ > threshold) or ``"<="`` (θ ≤ threshold).
    yes: the whole interval is on the claim's side; no: the whole interval is on the other side;
    inconclusive: the interval straddles the threshold (or is undefined).
    """
    lo, hi = ci.get("lo"), ci.get("hi")
    if lo is None or hi is None:
        return "inconclusive"
    if direction == ">=":
        return "yes" if lo >= threshold else "no" if hi < threshold else "inconclusive"
    if direction == ">":
        return "yes" if lo > threshold else "no" if hi <= threshold else "inconclusive"
    if direction == "<=":
        return "yes" if hi <= threshold else "no" if lo > threshold else "inconclusive"
    raise ValueError(f"direction must be '>=', '>' or '<=', got {direction!r}")


def z_of(level: float) -> float:
    """The two-sided normal quantile of a coverage ``level`` (1.959964 for 0.95)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def seeds_needed(mean: float, seed_sd: float | None, threshold: float, n_seeds: int, *,
                 level: float = 0.95) -> int | None:
    """How many seeds an undecided finding would need for its interval to clear the threshold.

    The interval of a mean over ``n`` seeds has a half-width of about ``z · sd / sqrt(n)`` (``z`` the normal
    quantile of ``level``, ``sd`` the between-seed standard deviation); it excludes the threshold once that
    is below ``d = |mean − threshold|``, i.e. from ``n = ceil((z · sd / d)²)`` seeds. Never fewer than
    ``n_seeds + 1``: the finding is undecided on the seeds that ran.

    Assumes the observed mean and between-seed SD are what more seeds would show (the estimate moves with
    them: a mean nearer the threshold needs many more seeds), that seeds are independent, and that the
    normal approximation holds for the mean over seeds. The per-seed values already carry the item-level
    noise, so ``sd`` covers both levels; the hierarchical bootstrap's interval is only near ``z · sd /
    sqrt(n)`` (resampling items inside each seed widens it a little, percentiles of a skewed statistic can
    narrow it), so the count is an estimate of scale, not a guarantee.

    Returns None when no seed count follows from the spread: one seed (no SD), a mean on the threshold
    (within 1e-9: no count moves the interval off it), or seeds that agree exactly (SD 0: the interval is item
    noise inside each seed, which more items, not more seeds, would narrow).
    """
    if seed_sd is None or n_seeds < 2 or mean is None or math.isnan(mean) or math.isnan(seed_sd):
        return None
    d = abs(mean - threshold)
    if d <= 1e-9 or seed_sd == 0:  # on the threshold up to rounding (0.05 summed as 0.05000000000000001)
        return None
    return max(n_seeds + 1, math.ceil((z_of(level) * seed_sd / d) ** 2))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    if len(x) < 3 or len(x) != len(y):
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        rank = [0.0] * len(values)
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                rank[order[k]] = (i + j) / 2
            i = j + 1
        return rank

    rx, ry = ranks(x), ranks(y)
    mean_x, mean_y = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(rx, ry))
    sd_x = sum((a - mean_x) ** 2 for a in rx) ** 0.5
    sd_y = sum((b - mean_y) ** 2 for b in ry) ** 0.5
    return cov / (sd_x * sd_y) if sd_x > 0 and sd_y > 0 else None
