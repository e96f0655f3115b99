"""Intervals for the lab's findings: the bootstrap of :mod:`deltaport.stats` (one implementation, shared
with ``deltaport eval``'s paired comparisons) and the lab's encoding of per-item correctness.

Every finding is a statistic computed within one seed from per-item correctness vectors; the
multi-seed estimate is the mean over seeds, with the two-level (seeds, then items) bootstrap interval
of :func:`deltaport.stats.hierarchical_bootstrap`.
"""

from __future__ import annotations

import numpy as np

from deltaport.stats import Statistic, hierarchical_bootstrap, point, seeds_needed, spearman, verdict, z_of

__all__ = ["Statistic", "as_vector", "hierarchical_bootstrap", "point", "seeds_needed", "spearman", "verdict", "z_of"]


def as_vector(items: str) -> np.ndarray:
    """``"0110"`` (one character per item) -> float array."""
    return np.frombuffer(items.encode(), dtype=np.uint8).astype(np.float64) - ord("0")
