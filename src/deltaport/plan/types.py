"""What a plan is made of: a :class:`Plan` lists one :class:`TensorOp` per output tensor, each built
from :class:`Term` inputs (and a :class:`LoraTerm`, :class:`PackedTerm` or several :class:`DeltaPart`
where the Δ is stored another way). These are data only; the planners fill them from headers and the
engine executes them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltaport.io.checkpoint import Checkpoint
from deltaport.io.tensors import DtypeField, TensorSpec, dtype_size

if TYPE_CHECKING:  # annotations only: planning must not import torch (header-only paths)
    import torch


@dataclass
class Term:
    """One input of an output tensor. ``rowmap`` (for vocab ``align``) maps output row -> input row
    (-1 = zeros). Without a rowmap, output element i reads input element i, zeros past the input's end
    (which is exactly zero-padding rows, since tensors are row-major). ``overlay`` (with a rowmap of its
    own) supplies the rows its rowmap names instead (``--unmatched-rows finetuned``: those rows of the
    target term are read from the fine-tune)."""

    ck: Checkpoint
    spec: TensorSpec
    rowmap: torch.Tensor | None = None
    overlay: "Term | None" = None
    fill: float = 0.0  # value of the rows the rowmap leaves out (-1)


@dataclass
class LoraTerm:
    """Δ = scaling · B @ A, from a PEFT adapter; its transpose for ``fan_in_fan_out`` (Conv1D weights
    stored as [in, out], e.g. GPT-2)."""

    a: TensorSpec
    b: TensorSpec
    ck: Checkpoint
    scaling: float
    transposed: bool = False


@dataclass
class PackedTerm:
    """A Δ stored as packed bits (compressed delta format 1, docs/FORMAT.md): ``sparse`` (a bitmask and the
    kept values in element order) or ``sign`` (sign bits and one scale α: Δ = ±α)."""

    method: str  # "sparse" | "sign"
    ck: Checkpoint
    bits: TensorSpec  # uint8 [ceil(numel / 8)], element i at bit i % 8 of byte i // 8
    values: TensorSpec  # sparse: the kept values; sign: α, float32 [1]


@dataclass
class DeltaPart:
    """One Δ of a composed apply (``apply D1 D2 ...``): exactly one of ``plus``, ``lora``, ``packed``, times ``scale``."""

    scale: float
    plus: Term | None = None
    lora: LoraTerm | None = None
    packed: PackedTerm | None = None
    source: str = ""
    residual: PackedTerm | None = None  # TIES only: the exact residual of ``plus`` (a diff's, docs/FORMAT.md),
    # added to it in float64 before trimming; without TIES the residual is a part of its own (exact sum)


@dataclass
class TensorOp:
    """One output tensor. ``out_dtype`` is set as a name or a torch dtype and read as a torch dtype;
    planning uses ``out_dtype_name`` (no torch import)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: Any = DtypeField()  # type: ignore[assignment]  # required (the descriptor gives no default)
    kind: str  # "copy" (target bytes) | "delta" (out = [base] + scale * (plus - minus))
    base: Term | None = None
    plus: Term | None = None
    minus: Term | None = None
    lora: LoraTerm | None = None
    scale: float = 1.0
    notes: list[str] = field(default_factory=list)
    check: Term | None = None  # diff of a LoRA stored narrower than computed: base + Δ must round back
    packed: PackedTerm | None = None  # Δ from a compressed delta's sparse/sign parts
    deltas: list[DeltaPart] = field(default_factory=list)  # composed apply: out = base + Σ scale_i·Δ_i
    ties_density: float | None = None  # composed apply with TIES sign consensus: trim to this density
    residual: bool = False  # diff: keep, beside the stored Δ, where it differs from the exact f − b (docs/FORMAT.md)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.out_dtype_name)

    def inputs(self) -> list[Term]:
        return [t for t in (self.base, self.plus, self.minus) if t is not None]


@dataclass
class Plan:
    """Everything one operation will write, decided from headers: one :class:`TensorOp` per output tensor
    (in output order), the tensors left out and why, warnings, and ``info`` for provenance (vocabulary
    alignment, LoRA scaling, what ``--force`` overrode)."""

    operation: str  # transfer | diff | apply
    ops: list[TensorOp]
    compute_dtype: Any = DtypeField()  # type: ignore[assignment]  # torch dtype when read; compute_dtype_name: no torch
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vocab_rows: int | None = None  # rows of the output embedding if a vocab policy changed them
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total_out_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def total_in_bytes(self) -> int:
        def parts(op: TensorOp) -> int:  # Δ read another way: LoRA/low-rank factors, packed bits, composed Δs
            n = (op.lora.a.nbytes + op.lora.b.nbytes) if op.lora else 0
            n += (op.packed.bits.nbytes + op.packed.values.nbytes) if op.packed else 0
            for part in op.deltas:
                n += part.plus.spec.nbytes if part.plus else 0
                n += (part.lora.a.nbytes + part.lora.b.nbytes) if part.lora else 0
                n += (part.packed.bits.nbytes + part.packed.values.nbytes) if part.packed else 0
                n += (part.residual.bits.nbytes + part.residual.values.nbytes) if part.residual else 0
            return n

        return sum(t.spec.nbytes for op in self.ops for t in op.inputs()) + sum(parts(op) for op in self.ops)

    @property
    def received_delta(self) -> int:
        """Output tensors that receive Δ (λ = 0 counts: the tensor is computed, not copied)."""
        return sum(op.kind == "delta" for op in self.ops)

    def coverage(self) -> str:
        """``"N of M tensors received Δ"`` (transfer, apply) or ``"Δ stored for N tensors"`` (diff)."""
        if self.operation == "diff":
            return f"Δ stored for {self.received_delta} tensors"
        return f"{self.received_delta} of {len(self.ops)} tensors received Δ"

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for op in self.ops:
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
        return {
            "operation": self.operation,
            "tensors": len(self.ops),
            "received_delta": self.received_delta,
            "coverage": self.coverage(),
            "by_kind": kinds,
            "skipped": len(self.skipped),
            "compute_dtype": self.compute_dtype_name,
            "output_bytes": self.total_out_bytes,
            "input_bytes": self.total_in_bytes,
        }

    def describe(self) -> str:
        """Human-readable plan (``--dry-run``)."""
        cover = (self.coverage() if self.operation == "diff" else
                 f"{self.received_delta} of {len(self.ops)} output tensors receive Δ")
        lines = [f"plan: {self.operation}, {cover}, compute dtype "
                 f"{self.compute_dtype_name}, reads {self.total_in_bytes / 1e6:.1f} MB, writes "
                 f"{self.total_out_bytes / 1e6:.1f} MB of tensors"]
        for op in self.ops:
            scale = f" x{op.scale:g}" if op.kind == "delta" else ""
            if op.deltas:
                scale = " x(" + ", ".join(f"{part.scale:g}" for part in op.deltas) + ")" + (" TIES" if op.ties_density else "")
            notes = f"  [{'; '.join(op.notes)}]" if op.notes else ""
            lines.append(f"  {op.kind:5s}{scale:7s} {op.name} {list(op.shape)} {op.out_dtype_name}{notes}")
        for s in self.skipped:
            lines.append(f"  skipped: {s['name']}: {s['reason']}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)
