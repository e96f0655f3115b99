"""What a run of the engine counts (bytes, tensors, exact fix-ups, the path that computed each tensor) and
its cheap finiteness test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    seconds: float = 0.0
    nonfinite_inputs: list[str] = field(default_factory=list)
    inexact_delta: dict[str, int] = field(default_factory=dict)  # diff: elements where base + Δ != finetuned
    exact_fixups: int = 0  # elements rounded from the exact value (composed apply; λ not a power of two)
    residuals: dict[str, list] = field(default_factory=dict)  # diff: (flat indices, r) where Δ != f − b (io/residual)
    arithmetic: dict[str, str] = field(default_factory=dict)  # tensor -> "numba" (the kernel) or "torch" (fallback)
    ties_sampled: list[int] = field(default_factory=lambda: [0, 0])  # TIES cut-offs found in one pass / not (compose)

    def arithmetic_record(self) -> dict[str, int]:
        """What ``deltaport.json`` records of the path that computed the output: tensors per path."""
        paths = list(self.arithmetic.values())
        return {"numba_kernel": paths.count("numba"), "torch_fallback": paths.count("torch")}

    def ran(self, name: str, path: str) -> None:
        if self.arithmetic.get(name) != "torch":  # a tensor with any fallback chunk counts as the fallback's
            self.arithmetic[name] = path


def all_finite(x: torch.Tensor) -> bool:
    """True iff every value of ``x`` is finite.

    ``torch.isfinite(x).all()`` allocates a fresh bool tensor per call and ran at ~0.15 G elements/s here
    (a third of the whole transfer's time); a sum runs at ~10 G elements/s and is finite only when every
    value is (NaN and Inf propagate). A non-finite sum can also be an overflow of large finite values, so
    that case falls back to the exact test."""
    import torch

    if torch.isfinite(x.sum()):
        return True
    return bool(torch.isfinite(x).all())


def all_finite_bytes(raw: np.ndarray, dtype_name: str) -> bool:
    """True iff the bytes ``raw`` hold only finite ``dtype_name`` values: on their bits where torch is not
    loaded (:func:`deltaport.kernel.all_finite`; a plan the kernel computes whole never imports torch), by
    :func:`all_finite` where it is (its float sum is the faster pass), or where the kernel cannot tell."""
    import sys

    from deltaport import kernel

    if "torch" not in sys.modules:
        found = kernel.all_finite(raw, dtype_name)
        if found is not None:
            return found
    from deltaport.engine.pipeline import torch_view
    from deltaport.io.tensors import torch_dtype

    return all_finite(torch_view(raw, torch_dtype(dtype_name)))
