"""What a run of the engine counts (bytes, tensors, exact fix-ups, the path that computed each tensor) and
its cheap finiteness test."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    if torch.isfinite(x.sum()):
        return True
    return bool(torch.isfinite(x).all())
