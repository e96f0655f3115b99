"""Plan a transfer whose fine-tune is a PEFT LoRA adapter: Δ(W) = scaling · B @ A for the adapted
modules (its transpose for ``fan_in_fan_out``), the full weight for ``modules_to_save``, 0 elsewhere."""

from __future__ import annotations

import re

from deltaport.io.checkpoint import Checkpoint
from deltaport.io.tensors import TensorSpec
from deltaport.plan.policy import Policies, choose_compute_dtype
from deltaport.plan.problems import Problems
from deltaport.plan.types import LoraTerm, Plan, TensorOp, Term


def plan_lora_transfer(sb: Checkpoint, sf: Checkpoint, tb: Checkpoint, policies: Policies) -> Plan:
    """Finetuned side is a PEFT LoRA adapter: Δ(W) = scaling · B @ A for adapted modules, 0 elsewhere."""
    problems = Problems("cannot plan the LoRA transfer")
    cfg = sf.lora or {}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.add(f"LoRA adapter {sf.dir}: rank_pattern/alpha_pattern are not supported yet; merge it with peft first")
    loras: dict[str, dict[str, TensorSpec]] = {}
    full: dict[str, TensorSpec] = {}
    for n, spec in sf.tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$", n)
        if m:
            loras.setdefault(m.group(1) + ".weight", {})[m.group(2)] = spec
            continue
        m = re.match(r"^(?:base_model\.model\.)?(.*?)(?:\.modules_to_save(?:\.default)?)?(\.weight|\.bias)$", n)
        if m and "modules_to_save" in n:
            full[m.group(1) + m.group(2)] = spec
            continue
        problems.add(f"LoRA adapter tensor {n} is not a lora_A/lora_B/modules_to_save weight (DoRA and other variants "
                     "are not supported; merge the adapter with peft and pass the merged model)")
    plan = Plan("transfer", [], "float32")
    for name, c in tb.tensors.items():
        out_dtype = policies.output_dtype_for(c.dtype_name)
        src = policies.map_key(name)
        if not policies.selected(name) or (src not in loras and src not in full):
            notes = ["not adapted by the LoRA: Δ = 0, copied from target"] if policies.selected(name) else ["not selected"]
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=notes))
            continue
        scale = policies.scale_for(name)
        if src in full:
            if src not in sb.tensors or sb.tensors[src].shape != full[src].shape or c.shape != full[src].shape:
                problems.add(f"{name}: modules_to_save weight does not match source base/target shapes")
                continue
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(sf, full[src]),
                                     Term(sb, sb.tensors[src]), scale=scale, notes=["modules_to_save"]))
            continue
        factors = loras[src]
        if set(factors) != {"A", "B"}:
            problems.add(f"{name}: LoRA adapter has only lora_{''.join(factors)}")
            continue
        fan = bool(cfg.get("fan_in_fan_out"))
        want = (factors["A"].shape[1], factors["B"].shape[0]) if fan else (factors["B"].shape[0], factors["A"].shape[1])
        if want != tuple(c.shape):
            what = "(B@A)^T (fan_in_fan_out)" if fan else "B@A"
            problems.add(f"{name}: LoRA {what} has shape {list(want)} but the target has {list(c.shape)}")
            continue
        plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", base=Term(tb, c),
                                 lora=LoraTerm(factors["A"], factors["B"], sf, scaling, transposed=fan), scale=scale,
                                 notes=[f"LoRA r={r} scaling={scaling:g}" + (" fan_in_fan_out" if fan else "")]))
    missing = (set(loras) | set(full)) - {policies.map_key(n) for n in tb.tensors}
    for n in sorted(missing):
        problems.add(f"LoRA adapts {n}, which the target does not have")
    problems.raise_if_any()
    plan.compute_dtype = choose_compute_dtype(policies.compute_dtype)
    plan.info["lora"] = {"r": r, "lora_alpha": alpha, "scaling": scaling, "use_rslora": bool(cfg.get("use_rslora"))}
    return plan
