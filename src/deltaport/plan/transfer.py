"""Plan a transfer, ``out = target + λ·(source_finetuned − source_base)``, over the target's tensors,
with the vocabulary policies (``pad``, ``align``) and the shape policy. A LoRA adapter as the fine-tune
is planned by :mod:`deltaport.plan.lora`.

Within a tensor, ``a``, ``b`` and ``c`` are the source fine-tune's, the source base's and the target's
:class:`TensorSpec`: ``out = c + λ·(a − b)``."""

from __future__ import annotations

import json

from deltaport.io.checkpoint import Checkpoint
from deltaport.io.tensors import FLOAT_DTYPE_NAMES, TensorSpec
from deltaport.plan.lora import plan_lora_transfer
from deltaport.plan.names import counterpart, is_vocab_tensor, ties_word_embeddings
from deltaport.plan.policy import Policies, choose_compute_dtype
from deltaport.plan.problems import Problems, all_float, refuse_no_delta
from deltaport.plan.types import Plan, TensorOp, Term
from deltaport.plan.vocab import UNMATCHED_SHOWN, named_tokens, align_rows, load_vocab


def plan_transfer(sb: Checkpoint, sf: Checkpoint, tb: Checkpoint, policies: Policies, *,
                  tokenizer_from: str = "target") -> Plan:
    """Plan ``out = tb + λ·(sf − sb)`` over the target's tensors. ``tokenizer_from`` (``target`` or
    ``source-finetuned``): whose tokenizer the output gets; under vocabulary ``align`` its ids are the
    output's rows (see :class:`~deltaport.plan.vocab.RowAlignment`)."""
    problems = Problems("cannot plan the transfer")
    plan = Plan("transfer", [], "float32")
    used_src: set[str] = set()
    align_maps: dict[str, tuple] = {}

    if sf.kind == "lora":
        plan = plan_lora_transfer(sb, sf, tb, policies)
        refuse_no_delta(plan, policies, "the LoRA adapter")
        return plan

    def vocab_maps():
        if "maps" not in align_maps:
            src_vocab = load_vocab(sf.dir)
            base_vocab = load_vocab(sb.dir)
            tgt_vocab = load_vocab(tb.dir)
            align_maps["maps"] = (src_vocab, base_vocab, tgt_vocab)
        return align_maps["maps"]

    def align_op(name: str, a: TensorSpec, b: TensorSpec, c: TensorSpec, out_dtype, scale: float, notes: list[str],
                 desc: str) -> TensorOp | None:
        """The ``align`` op of one vocabulary tensor; None when the three vocabularies and row counts agree
        (then row i is the same token everywhere, padding rows included: a plain transfer)."""
        src_vocab, base_vocab, tgt_vocab = vocab_maps()
        if a.shape == b.shape == c.shape and src_vocab == base_vocab == tgt_vocab:
            return None
        by_ft = tokenizer_from == "source-finetuned"
        alignment = align_rows(src_vocab, base_vocab, tgt_vocab, ft_rows=a.shape[0], base_rows=b.shape[0],
                               tgt_rows=c.shape[0], unmatched=policies.unmatched_rows,
                               out_vocab=src_vocab if by_ft else None)
        record = plan.info.setdefault("vocab_align", {
            "unmatched_rows": policies.unmatched_rows, "tensors": [], "target_rows": c.shape[0],
            "output_tokenizer": "source-finetuned" if by_ft else "target", "output_rows": alignment.rows,
            "tokens_new_to_target": {"count": len(alignment.new_tokens), "first": [
                {"token": t, "output_id": j} for t, j in alignment.new_tokens[:UNMATCHED_SHOWN]]},
            "target_tokens_dropped": {"count": len(alignment.target_dropped), "first": [
                {"token": t, "target_id": j} for t, j in alignment.target_dropped[:UNMATCHED_SHOWN]]},
            "matched": alignment.matched,
            "tokens_without_base_row": {"count": len(alignment.no_base), "first": [
                {"token": t, "target_id": j} for t, j in alignment.no_base[:UNMATCHED_SHOWN]]},
            "tokens_without_finetuned_row": {"count": len(alignment.no_finetuned), "first": [
                {"token": t, "target_id": j} for t, j in alignment.no_finetuned[:UNMATCHED_SHOWN]]},
            "rows_without_token": alignment.rows_without_token,
        })
        record["tensors"].append(name)
        if len(record["tensors"]) == 1:
            kept = ("keep the target's rows (--unmatched-rows finetuned copies the fine-tune's rows instead)"
                    if policies.unmatched_rows == "target" else
                    "take the fine-tune's rows where it has the token, else keep the target's (--unmatched-rows finetuned)")
            for what, items in (("have no row in the source base", alignment.no_base),
                                ("have a base row but none in the source fine-tune", alignment.no_finetuned)):
                if items:
                    shown = ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in items[:10]) + (", ..." if len(items) > 10 else "")
                    plan.warnings.append(f"vocab align: {len(items)} target token(s) {what} (no Δ is defined): they {kept}: "
                                         f"{shown}")
            if alignment.new_tokens:
                plan.warnings.append(f"vocab align: {len(alignment.new_tokens)} token(s) of the fine-tune's tokenizer have no "
                                     "row in the target: they get new rows, λ × the fine-tune's row (as under --vocab-policy "
                                     f"pad): {named_tokens(alignment.new_tokens)}")
            if alignment.target_dropped:
                plan.warnings.append(f"vocab align: {len(alignment.target_dropped)} target token(s) are not in the output's "
                                     f"tokenizer (the fine-tune's), so their rows are left out: {named_tokens(alignment.target_dropped)}")
        base_term = Term(tb, c, alignment.target)
        if alignment.overlay is not None:
            base_term = Term(tb, c, alignment.target, overlay=Term(sf, a, alignment.overlay))
        plus = Term(sf, a, alignment.plus, fill=-0.0 if scale >= 0 else 0.0)
        if alignment.rows != c.shape[0]:
            plan.vocab_rows = alignment.rows
        new = f", {len(alignment.new_tokens)} new (λ·fine-tuned row)" if alignment.new_tokens else ""
        return TensorOp(name, (alignment.rows, *c.shape[1:]), out_dtype, "delta", base_term, plus,
                        Term(sb, b, alignment.minus), scale=scale,
                        notes=notes + [f"vocab align: {alignment.matched} of {alignment.rows} output rows matched by token "
                                       f"string in the target and both source models{new}; {desc}"])

    for name, c in tb.tensors.items():
        src = policies.map_key(name)
        a_name, note_a = counterpart(sf, src)
        b_name, note_b = counterpart(sb, src)
        if a_name is None or b_name is None:
            where = " and ".join(w for w, n in (("source-finetuned", a_name), ("source-base", b_name)) if n is None)
            msg = f"{name}" + (f" (mapped to {src})" if src != name else "") + f" is in the target but not in {where}"
            if policies.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": msg})
                plan.ops.append(TensorOp(name, c.shape, policies.output_dtype_for(c.dtype_name), "copy", base=Term(tb, c),
                                         notes=["not in source: copied from target"]))
            else:
                problems.add(msg + "; use --key-map for renamed modules or --shape-policy skip to copy it from the target")
            continue
        used_src.update({a_name, b_name})
        a, b = sf.tensors[a_name], sb.tensors[b_name]
        out_dtype = policies.output_dtype_for(c.dtype_name)
        notes = [n for n in (note_a, note_b) if n]
        if not all_float(name, [("source-base", b), ("source-finetuned", a), ("target", c)], problems):
            if a.dtype_name in FLOAT_DTYPE_NAMES or c.dtype_name in FLOAT_DTYPE_NAMES:
                continue
            plan.ops.append(TensorOp(name, c.shape, c.dtype_name, "copy", base=Term(tb, c), notes=["non-float: copied from target"]))
            continue
        if not policies.selected(name):
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["not selected by --include/--exclude"]))
            continue
        scale = policies.scale_for(name)
        shapes_equal = a.shape == b.shape == c.shape
        if (shapes_equal and policies.vocab_policy == "align" and is_vocab_tensor(name) and len(c.shape) == 2):
            # equal row counts do not mean equal vocabularies (padded embeddings, added tokens)
            desc = f"source-base {list(b.shape)}, source-finetuned {list(a.shape)}, target {list(c.shape)}"
            op = align_op(name, a, b, c, out_dtype, scale, notes, desc)
            if op is not None:
                plan.ops.append(op)
                continue
        if shapes_equal:
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(sf, a), Term(sb, b), scale=scale, notes=notes))
            continue
        rows_only = (len(a.shape) == len(b.shape) == len(c.shape) >= 1 and a.shape[1:] == b.shape[1:] == c.shape[1:])
        if rows_only and is_vocab_tensor(name):
            desc = f"source-base {list(b.shape)}, source-finetuned {list(a.shape)}, target {list(c.shape)}"
            if policies.vocab_policy == "error":
                problems.add(f"{name}: vocabulary sizes differ ({desc}). Choose --vocab-policy pad (official script: "
                             "zero rows appended to the shorter models, new tokens get λ × their fine-tuned rows) or "
                             "--vocab-policy align (rows matched by token string using both tokenizers; "
                             "target-only tokens get no Δ)")
                continue
            if policies.vocab_policy == "pad":
                rows = max(a.shape[0], b.shape[0], c.shape[0])
                shape = (rows, *c.shape[1:])
                plan.vocab_rows = rows
                plan.ops.append(TensorOp(name, shape, out_dtype, "delta", Term(tb, c), Term(sf, a), Term(sb, b), scale=scale,
                                         notes=notes + [f"vocab pad: {desc} -> {rows} rows, missing rows are zeros"]))
            else:  # align
                plan.ops.append(align_op(name, a, b, c, out_dtype, scale, notes, desc))
            continue
        msg = (f"{name}: shapes differ (source-base {list(b.shape)}, source-finetuned {list(a.shape)}, "
               f"target {list(c.shape)})")
        if policies.shape_policy == "skip":
            plan.skipped.append({"name": name, "reason": msg})
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["shape mismatch: copied from target"]))
        else:
            problems.add(msg + "; use --shape-policy skip to transfer only shape-matching tensors (paper App. B.3)")

    # source tensors the target never asked for
    for who, ck in (("source-finetuned", sf), ("source-base", sb)):
        extra = [n for n in ck.tensors if n not in used_src]
        for n in extra:
            msg = f"{n} is in the {who} but has no counterpart in the target"
            if policies.shape_policy == "skip":
                if not any(s["name"] == n for s in plan.skipped):
                    plan.skipped.append({"name": n, "reason": msg})
            else:
                problems.add(msg + "; use --key-map for renamed modules or --shape-policy skip to leave it out")
    # the two source models must agree with each other on shapes
    for n in used_src:
        if n in sf.tensors and n in sb.tensors and sf.tensors[n].shape != sb.tensors[n].shape and not is_vocab_tensor(n):
            problems.add(f"{n}: source-base {list(sb.tensors[n].shape)} vs source-finetuned {list(sf.tensors[n].shape)}; "
                         "the source pair must share shapes")
    problems.raise_if_any()
    refuse_no_delta(plan, policies, "the source models")
    plan.compute_dtype = choose_compute_dtype(policies.compute_dtype)
    if ties_word_embeddings(tb):
        plan.warnings.append("target ties input/output embeddings: the shared matrix receives Δ once")
    return plan
