"""Plan a composed apply, ``out = target + Σ_i λ_i·Δ_i``: each delta planned as for one, then the plans
must agree (output shapes, the fine-tunes' vocabularies) before they are merged into one plan."""

from __future__ import annotations

from deltaport.errors import PlanError
from deltaport.io.checkpoint import Checkpoint
from deltaport.plan.apply import plan_apply
from deltaport.plan.policy import Policies, choose_compute_dtype
from deltaport.plan.problems import Problems
from deltaport.plan.types import DeltaPart, Plan, TensorOp
from deltaport.plan.vocab import delta_finetuned_vocab


def plan_apply_many(deltas: list[Checkpoint], tb: Checkpoint, policies_each: list[Policies], *, force: bool = False,
                    ties: float | None = None) -> Plan:
    """Plan ``out = tb + Σ_i λ_i·Δ_i`` for several deltas (``policies_each[i]`` holds Δ_i's λ and the shared
    options).

    Each delta is planned against the target as for one (same checks, same messages); then the plans must
    agree: the same output shape for every tensor (vocabulary rows included) and, when both record one,
    the same fine-tuned vocabulary. Every conflict is reported before a tensor byte is read."""
    problems = Problems(f"cannot compose the {len(deltas)} deltas")
    plans = []
    for delta, policies in zip(deltas, policies_each):
        try:
            plans.append(plan_apply(delta, tb, policies, force=force))
        except PlanError as exc:
            problems.add(f"{delta.source}: {exc}")
    problems.raise_if_any()
    vocabs = [(delta, delta_finetuned_vocab(delta)) for delta in deltas]
    known = [(delta, vocab) for delta, vocab in vocabs if vocab is not None]
    for delta, vocab in known[1:]:
        if vocab != known[0][1]:
            differing = len(set(vocab.items()) ^ set(known[0][1].items()))
            problems.add(f"{delta.source} was made on a fine-tune whose vocabulary differs from that of {known[0][0].source} "
                         f"({differing} token/id pairs differ): their embedding rows mean different tokens, so their Δs "
                         "cannot be added. Compose deltas made on fine-tunes of one tokenizer.")
    float64 = choose_compute_dtype("float64")
    out = Plan("apply", [], float64)
    for i, name in enumerate(op.name for op in plans[0].ops):
        ops = [plan.ops[i] for plan in plans]
        assert all(o.name == name for o in ops)
        shapes = {tuple(o.shape) for o in ops}
        if len(shapes) > 1:
            problems.add(f"{name}: the deltas give different output shapes "
                         f"({', '.join(f'{delta.source}: {list(o.shape)}' for delta, o in zip(deltas, ops))}); "
                         "vocabulary rows padded differently cannot be composed")
            continue
        first = ops[0]
        parts = []
        for delta, o in zip(deltas, ops):
            if o.kind != "delta":
                continue
            if o.deltas:  # a Δ with its exact residual (plan/apply.residual_terms): stored part, residual part
                stored, residual = o.deltas
                if ties is None:  # two parts of the sum: exact
                    parts.extend(o.deltas)
                else:  # TIES trims and elects on each Δ: the residual is added to its Δ (float64) first
                    parts.append(DeltaPart(stored.scale, plus=stored.plus, source=delta.source, residual=residual.packed))
                continue
            if o.minus is not None or (o.plus is not None and o.plus.rowmap is not None):
                problems.add(f"{name}: {delta.source}: internal: unexpected Δ term")  # pragma: no cover
                continue
            parts.append(DeltaPart(o.scale, plus=o.plus, lora=o.lora, packed=o.packed, source=delta.source))
        if not parts:
            out.ops.append(first)
            continue
        base = next(o.base for o in ops if o.kind == "delta")
        notes = [f"{sum(o.kind == 'delta' for o in ops)} of {len(deltas)} deltas"] + [n for o in ops for n in o.notes if o.kind == "delta"]
        out.ops.append(TensorOp(name, first.shape, first.out_dtype_name, "delta", base=base, deltas=parts, notes=notes,
                                ties_density=ties))
    problems.raise_if_any()
    for plan in plans:
        out.skipped.extend(plan.skipped)
        out.warnings.extend(plan.warnings)
        if plan.vocab_rows is not None:
            out.vocab_rows = plan.vocab_rows
    out.compute_dtype = float64 if any(plan.compute_dtype_name == float64 for plan in plans) else plans[0].compute_dtype_name
    if out.compute_dtype_name != float64 and any(o.deltas for o in out.ops):
        out.warnings.append("--compute-dtype float32: a composed sum is rounded in float32, not checked against the "
                            "exact sum")
    out.info["forced"] = [f for plan in plans for f in (plan.info.get("forced") or [])] or None
    return out
