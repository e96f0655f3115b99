"""Plan a diff, ``Δ = finetuned − base`` over the fine-tune's tensors, stored unscaled in an exact dtype
(or the one asked for); a LoRA adapter's Δ is scaling · B @ A over the base's tensors."""

from __future__ import annotations

import re

from deltaport.io.checkpoint import Checkpoint
from deltaport.io.tensors import FLOAT_DTYPE_NAMES
from deltaport.plan.lora import plan_lora_transfer
from deltaport.plan.names import counterpart, is_vocab_tensor, ties_word_embeddings
from deltaport.plan.policy import Policies, choose_compute_dtype, delta_dtype_for
from deltaport.plan.problems import Problems, all_float
from deltaport.plan.types import Plan, TensorOp, Term


def plan_diff(sb: Checkpoint, sf: Checkpoint, policies: Policies, delta_dtype: str | None = None) -> Plan:
    """Plan ``Δ = sf − sb`` over the finetuned model's tensors (stored unscaled)."""
    if sf.kind == "lora":
        lora_plan = plan_lora_transfer(sb, sf, sb, policies)  # Δ over the base's tensors
        plan = Plan("diff", [], lora_plan.compute_dtype_name, info=lora_plan.info)
        # scaling·B·A is computed in the compute dtype and is not exactly representable in a narrower one:
        # auto stores it as computed (float64), so apply(diff(adapter)) equals a direct LoRA transfer for
        # every target and λ. A narrower --delta-dtype is checked element by element like a full diff.
        stored = lora_plan.compute_dtype_name if delta_dtype in (None, "", "auto") else delta_dtype_for(set(), delta_dtype)
        for op in lora_plan.ops:
            if op.kind == "copy":
                continue  # Δ = 0: not stored; apply copies the target for tensors absent from the delta
            if op.lora is not None and stored != lora_plan.compute_dtype_name:
                op.check = op.base
            op.base, op.out_dtype, op.scale = None, stored, 1.0
            plan.ops.append(op)
        return plan
    problems = Problems("cannot plan the diff")
    plan = Plan("diff", [], "float32")
    dtypes: set[str] = set()  # names; torch dtypes only once the plan stands
    for name, a in sf.tensors.items():
        src = policies.map_key(name)
        b_name, note = counterpart(sb, src)
        if b_name is None:
            msg = f"{name} is in the finetuned model but not in the base"
            if policies.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": msg})
            else:
                problems.add(msg + "; use --key-map for renamed modules or --shape-policy skip to leave it out")
            continue
        b = sb.tensors[b_name]
        if not all_float(name, [("base", b), ("finetuned", a)], problems):
            if a.dtype_name in FLOAT_DTYPE_NAMES or b.dtype_name in FLOAT_DTYPE_NAMES:
                continue
            plan.skipped.append({"name": name, "reason": "non-float tensor: no Δ"})
            continue
        if not policies.selected(name):
            plan.skipped.append({"name": name, "reason": "not selected by --include/--exclude"})
            continue
        if a.shape != b.shape:
            rows_only = len(a.shape) == len(b.shape) >= 1 and a.shape[1:] == b.shape[1:]
            desc = f"base {list(b.shape)}, finetuned {list(a.shape)}"
            if rows_only and is_vocab_tensor(name) and policies.vocab_policy == "pad":
                rows = max(a.shape[0], b.shape[0])
                dtypes.update({a.dtype_name, b.dtype_name})
                plan.vocab_rows = rows
                plan.ops.append(TensorOp(name, (rows, *a.shape[1:]), a.dtype_name, "delta", None, Term(sf, a), Term(sb, b),
                                         notes=[f"vocab pad: {desc}"]))
                continue
            if rows_only and is_vocab_tensor(name):
                problems.add(f"{name}: vocabulary sizes differ ({desc}); use --vocab-policy pad for diff "
                             "(align needs the target's tokenizer: use `deltaport transfer --vocab-policy align`)")
                continue
            if policies.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": f"shapes differ ({desc})"})
                continue
            problems.add(f"{name}: shapes differ ({desc}); use --shape-policy skip to leave it out")
            continue
        dtypes.update({a.dtype_name, b.dtype_name})
        plan.ops.append(TensorOp(name, a.shape, a.dtype_name, "delta", None, Term(sf, a), Term(sb, b), notes=[note] if note else []))
    for n in sb.tensors:
        if n not in {policies.map_key(x) for x in sf.tensors} and not (re.search(r"lm_head\.weight$", n) and ties_word_embeddings(sf)):
            msg = f"{n} is in the base but not in the finetuned model"
            if policies.shape_policy == "skip":
                plan.skipped.append({"name": n, "reason": msg})
            else:
                problems.add(msg + "; use --shape-policy skip to leave it out")
    problems.raise_if_any()
    plan.compute_dtype = choose_compute_dtype(policies.compute_dtype)
    stored = delta_dtype_for(dtypes, delta_dtype)
    # the default encoding is lossless: where the stored dtype cannot hold f − b, the exact residual is kept
    # beside it (docs/FORMAT.md); an explicit --delta-dtype is lossy where it must be, and counted
    exact = delta_dtype in (None, "", "auto") and plan.compute_dtype_name == "float64"
    for op in plan.ops:
        op.out_dtype = stored
        op.residual = exact
    return plan
