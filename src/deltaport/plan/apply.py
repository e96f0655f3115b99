"""Plan an apply, ``out = target + λ·Δ``, where Δ comes from a ``deltaport diff`` directory (exact
tensors) or a ``deltaport compress`` one (low-rank, sparse or sign parts)."""

from __future__ import annotations

from deltaport.errors import PlanError
from deltaport.io.checkpoint import Checkpoint
from deltaport.io.residual import residual_parts, residual_record
from deltaport.io.tensors import FLOAT_DTYPE_NAMES
from deltaport.plan.names import counterpart, is_vocab_tensor
from deltaport.plan.policy import Policies, choose_compute_dtype
from deltaport.plan.problems import Problems, refuse_no_delta
from deltaport.plan.provenance import check_delta_provenance, differences_from_recorded_base
from deltaport.plan.types import DeltaPart, LoraTerm, PackedTerm, Plan, TensorOp, Term

SHOWN = 20  # structure differences listed in the error (all are counted)


def plan_apply(delta: Checkpoint, tb: Checkpoint, policies: Policies, *, force: bool = False) -> Plan:
    """Plan ``out = tb + λ·Δ`` where Δ comes from a ``deltaport diff`` directory."""
    provenance = check_delta_provenance(delta)
    problems = Problems("cannot apply the delta")
    plan = Plan("apply", [], "float32")
    mismatch = differences_from_recorded_base(provenance, tb)
    if mismatch:
        if not force:
            shown = "\n  ".join(mismatch[:SHOWN])
            raise PlanError(f"target {tb.source} does not match the structure the delta was made on "
                            f"(base {provenance.get('base', {}).get('source')}); {len(mismatch)} difference(s):\n  {shown}\n"
                            "Use a target of the same architecture and size, or pass --force to apply to matching "
                            "tensors anyway (recorded in provenance).")
        plan.warnings.append(f"--force: target structure differs from the delta's base ({len(mismatch)} differences)")
        plan.info["forced"] = mismatch[:50]
    from deltaport.io.compressed_format import compression_record

    compression = compression_record(delta)
    packed = {n: r for n, r in (compression or {}).get("tensors", {}).items() if r.get("method") not in (None, "exact")}
    residuals = residual_record(delta)
    for name, c in tb.tensors.items():
        out_dtype = policies.output_dtype_for(c.dtype_name)
        if policies.map_key(name) in packed and policies.selected(name) and c.dtype_name in FLOAT_DTYPE_NAMES:
            d_name = policies.map_key(name)
            record = packed[d_name]
            if tuple(record["shape"]) != tuple(c.shape):
                problems.add(f"{name}: compressed delta {record['shape']} vs target {list(c.shape)}; a compressed tensor must "
                             "have the target's shape (--vocab-policy pad applies to exact tensors only)")
                continue
            op = TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), scale=policies.scale_for(name))
            compressed_term(op, delta, d_name, record)
            plan.ops.append(op)
            continue
        d_name, note = counterpart(delta, policies.map_key(name))
        if d_name is None or not policies.selected(name) or c.dtype_name not in FLOAT_DTYPE_NAMES:
            why = "no Δ for this tensor" if d_name is None else ("not selected" if c.dtype_name in FLOAT_DTYPE_NAMES else "non-float")
            plan.ops.append(TensorOp(name, c.shape, out_dtype if c.dtype_name in FLOAT_DTYPE_NAMES else c.dtype_name, "copy",
                                     base=Term(tb, c), notes=[why + ": copied from target"]))
            continue
        d = delta.tensors[d_name]
        scale = policies.scale_for(name)
        if d.shape != c.shape:
            rows_only = len(d.shape) == len(c.shape) >= 1 and d.shape[1:] == c.shape[1:]
            if rows_only and is_vocab_tensor(name) and (policies.vocab_policy == "pad" or
                                                        provenance.get("policies", {}).get("vocab_policy") == "pad"):
                rows = max(d.shape[0], c.shape[0])
                plan.vocab_rows = rows
                plan.ops.append(TensorOp(name, (rows, *c.shape[1:]), out_dtype, "delta", Term(tb, c), Term(delta, d), None, scale=scale,
                                         notes=[f"vocab pad: delta {list(d.shape)}, target {list(c.shape)}"]))
                continue
            msg = f"{name}: delta {list(d.shape)} vs target {list(c.shape)}"
            if policies.shape_policy == "skip" or force:
                plan.skipped.append({"name": name, "reason": msg})
                plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["shape mismatch: copied"]))
            else:
                problems.add(msg + "; use --vocab-policy pad for vocabulary rows or --shape-policy skip")
            continue
        op = TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(delta, d), None, scale=scale, notes=[note] if note else [])
        if d_name in residuals and scale != 0.0:
            residual_terms(op, delta, d_name, residuals[d_name])
        plan.ops.append(op)
    problems.raise_if_any()
    refuse_no_delta(plan, policies, "the delta")
    plan.compute_dtype = choose_compute_dtype(policies.compute_dtype)
    # the delta's own dtype must not be rounded before use: compute at least as wide as it
    if any(op.plus is not None and op.plus.spec.dtype_name == "float64" for op in plan.ops):
        plan.compute_dtype = "float64"
    return plan


def compressed_term(op: TensorOp, delta: Checkpoint, name: str, record: dict) -> None:
    """Set ``op``'s Δ to the compressed tensor ``name`` of ``delta`` (``record`` of its compression):
    low rank through the LoRA path (Δ = 1·B·A), sparse and sign as a :class:`PackedTerm`."""
    from deltaport.io.compressed_format import part_names

    method = record["method"]
    parts = {role: delta.tensors[n] for role, n in part_names(name, method).items()}
    if method == "lowrank":
        op.lora = LoraTerm(parts["A"], parts["B"], delta, 1.0)
        op.notes.append(f"compressed: lowrank r={parts['A'].shape[0]}")
    elif method == "sparse":
        op.packed = PackedTerm("sparse", delta, parts["mask"], parts["values"])
        op.notes.append(f"compressed: sparse p={record.get('density')}")
    else:
        op.packed = PackedTerm("sign", delta, parts["bits"], parts["scale"])
        op.notes.append("compressed: sign")


def residual_terms(op: TensorOp, delta: Checkpoint, name: str, count: int) -> None:
    """Make ``op`` (``out = t + λ·Δ``) add the exact residual r of the stored Δ ``name`` too (docs/FORMAT.md):
    ``out = t + λ·Δ + λ·r``, two parts of a composed sum, which the engine rounds once from the exact value."""
    parts = residual_parts(name)
    r = PackedTerm("sparse", delta, delta.tensors[parts["mask"]], delta.tensors[parts["values"]])
    op.deltas = [DeltaPart(op.scale, plus=op.plus, source=delta.source),
                 DeltaPart(op.scale, packed=r, source=delta.source, residual=None)]
    op.plus, op.scale = None, 1.0  # λ is in the parts
    op.notes.append(f"exact residual: {count} element(s)")
