"""Plans: decide, from headers only, what every output tensor is made of.

A :class:`Plan` lists one :class:`TensorOp` per output tensor (``out = [c] + λ·(a − b)`` with
optional row maps for vocabulary policies), the tensors skipped and why, and warnings. Every
problem found is collected and reported at once (:class:`~deltaport.errors.PlanError`), before a
single tensor byte is read.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaport.errors import InputError, PlanError
from deltaport.io.checkpoint import FLOAT_DTYPE_NAMES, Checkpoint, DtypeField, TensorSpec, dtype_size, torch_dtype

if TYPE_CHECKING:  # annotations only: these modules must not import torch (header-only paths)
    import torch

LOG = logging.getLogger(__name__)

VOCAB_POLICIES = ("error", "pad", "align")
UNMATCHED_ROWS = ("target", "finetuned")
SHAPE_POLICIES = ("error", "skip")
EMBED_PATTERNS = (r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$", r"(^|\.)wte\.weight$",
                  r"(^|\.)embed_out\.weight$", r"(^|\.)word_embeddings\.weight$", r"(^|\.)output\.weight$",
                  r"(^|\.)embeddings\.weight$")


def is_vocab_tensor(name: str) -> bool:
    return any(re.search(p, name) for p in EMBED_PATTERNS)


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
            for p in op.deltas:
                n += p.plus.spec.nbytes if p.plus else 0
                n += (p.lora.a.nbytes + p.lora.b.nbytes) if p.lora else 0
                n += (p.packed.bits.nbytes + p.packed.values.nbytes) if p.packed else 0
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
                 f"{self.total_out_bytes / 1e6:.1f} MB"]
        for op in self.ops:
            scale = f" x{op.scale:g}" if op.kind == "delta" else ""
            if op.deltas:
                scale = " x(" + ", ".join(f"{p.scale:g}" for p in op.deltas) + ")" + (" TIES" if op.ties_density else "")
            notes = f"  [{'; '.join(op.notes)}]" if op.notes else ""
            lines.append(f"  {op.kind:5s}{scale:7s} {op.name} {list(op.shape)} {op.out_dtype_name}{notes}")
        for s in self.skipped:
            lines.append(f"  skipped: {s['name']}: {s['reason']}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# options


@dataclass
class Policies:
    scale: float = 1.0
    vocab_policy: str = "error"
    shape_policy: str = "error"
    unmatched_rows: str = "target"
    key_map: list[tuple[re.Pattern, str]] = field(default_factory=list)
    include: list[re.Pattern] = field(default_factory=list)
    exclude: list[re.Pattern] = field(default_factory=list)
    scale_map: list[tuple[re.Pattern, float]] = field(default_factory=list)
    compute_dtype: str = "auto"
    out_dtype: str | None = None

    def validate(self) -> None:
        if self.vocab_policy not in VOCAB_POLICIES:
            raise InputError(f"--vocab-policy must be one of {', '.join(VOCAB_POLICIES)}, not {self.vocab_policy!r}")
        if self.shape_policy not in SHAPE_POLICIES:
            raise InputError(f"--shape-policy must be one of {', '.join(SHAPE_POLICIES)}, not {self.shape_policy!r}")
        if self.unmatched_rows not in UNMATCHED_ROWS:
            raise InputError(f"--unmatched-rows must be one of {', '.join(UNMATCHED_ROWS)}, not {self.unmatched_rows!r}")
        if self.unmatched_rows != "target" and self.vocab_policy != "align":
            raise InputError(f"--unmatched-rows applies to --vocab-policy align (rows matched by token string), not to "
                             f"--vocab-policy {self.vocab_policy}")
        if self.compute_dtype not in ("auto", "float32", "float64"):
            raise InputError(f"--compute-dtype must be auto, float32 or float64, not {self.compute_dtype!r}")
        for x in [self.scale] + [s for _, s in self.scale_map]:
            if x != x or x in (float("inf"), float("-inf")):
                raise InputError(f"scale {x} is not finite")

    def scale_for(self, name: str) -> float:
        for pat, s in self.scale_map:
            if pat.search(name):
                return s
        return self.scale

    def selected(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def map_key(self, name: str) -> str:
        for pat, repl in self.key_map:
            if pat.search(name):
                return pat.sub(repl, name)
        return name


def _compile(regex: str, flag: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise InputError(f"{flag}: invalid regular expression {regex!r}: {exc}") from None


def _load_yaml(path: str | Path, flag: str) -> Any:
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as exc:
        raise InputError(f"{flag}: cannot read {p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{flag}: {p} is not valid YAML: {exc}") from None


def make_policies(*, scale: float = 1.0, vocab_policy: str = "error", shape_policy: str = "error",
                  unmatched_rows: str = "target", key_map: str | Path | dict | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, scale_map: str | Path | dict | None = None,
                  compute_dtype: str = "auto", out_dtype: str | None = None) -> Policies:
    """Build validated :class:`Policies` from CLI-shaped options (YAML paths or dicts for the maps).

    ``key_map``: ``{target_name_regex: source_name_replacement}`` (``re.sub`` syntax, first match wins).
    ``scale_map``: ``{tensor_name_regex: λ}`` (first match wins, others use ``scale``).
    ``unmatched_rows`` (vocab ``align``): a target token without a row in both source models keeps the
    ``target``'s row, or takes the ``finetuned`` model's row when the fine-tune has the token.
    """
    km = _load_yaml(key_map, "--key-map") if isinstance(key_map, (str, Path)) else key_map
    sm = _load_yaml(scale_map, "--scale-map") if isinstance(scale_map, (str, Path)) else scale_map
    if km is not None and not isinstance(km, dict):
        raise InputError("--key-map must be a YAML mapping {target_regex: source_replacement}")
    if sm is not None and not isinstance(sm, dict):
        raise InputError("--scale-map must be a YAML mapping {regex: scale}")
    scale_items = []
    for k, v in (sm or {}).items():
        try:
            scale_items.append((_compile(str(k), "--scale-map"), float(v)))
        except (TypeError, ValueError):
            raise InputError(f"--scale-map: scale for {k!r} must be a number, got {v!r}") from None
    pol = Policies(
        scale=float(scale), vocab_policy=vocab_policy, shape_policy=shape_policy, unmatched_rows=unmatched_rows,
        key_map=[(_compile(str(k), "--key-map"), str(v)) for k, v in (km or {}).items()],
        include=[_compile(r, "--include") for r in include or []],
        exclude=[_compile(r, "--exclude") for r in exclude or []],
        scale_map=scale_items, compute_dtype=compute_dtype, out_dtype=out_dtype,
    )
    pol.validate()
    return pol


def choose_compute_dtype(policy: str, dtypes: set[torch.dtype]) -> torch.dtype:
    """``auto`` is float64. float32 arithmetic is not exact for the identities: when a fine-tuned value
    nearly cancels its base value (|F| < 2^-16·|B| for bf16), ``b + fl32(a - b)`` rounds to a neighbour
    of ``a``; random tests hit that in ~4 of a million elements. In float64 the difference of two
    16/32-bit floats is exact unless their exponents differ by more than ~29-45, so ``transfer`` onto
    the source base reproduces the fine-tuned model and λ = 0 reproduces the target bit for bit. The
    cost is ~15 % slower arithmetic; ``float32`` is offered for speed."""
    import torch

    if policy == "float32":
        return torch.float32
    return torch.float64


def _tied(ck: Checkpoint) -> bool:
    cfg = ck.config or {}
    tie = cfg.get("tie_word_embeddings")
    if tie is None and isinstance(cfg.get("text_config"), dict):
        tie = cfg["text_config"].get("tie_word_embeddings")
    return bool(tie) if tie is not None else False


def _embed_name(ck: Checkpoint) -> str | None:
    for n in ck.tensors:
        if re.search(r"(^|\.)embed_tokens\.weight$", n):
            return n
    return None


def _source_name(ck: Checkpoint, name: str) -> tuple[str | None, str | None]:
    """Find ``name`` in ``ck``; a missing lm_head of a tied checkpoint resolves to its input embedding."""
    if name in ck.tensors:
        return name, None
    if re.search(r"(^|\.)lm_head\.weight$", name) and _tied(ck):
        emb = _embed_name(ck)
        if emb:
            return emb, f"{ck.source} ties lm_head to {emb}; its Δ is used once"
    return None, None


# --------------------------------------------------------------------------------------------------
# vocabulary alignment


def load_vocab(directory: Path) -> dict[str, int]:
    """token string -> id, through transformers (never trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise PlanError(f"--vocab-policy align needs the tokenizer of {directory}, which failed to load: {exc}") from None
    return dict(tok.get_vocab())


UNMATCHED_SHOWN = 100  # tokens listed by name in provenance (all are counted)


@dataclass
class RowAlignment:
    """Row maps of one vocabulary tensor under ``align`` (output row = target row j).

    A target token found in *both* source vocabularies (within their row counts) gets its Δ,
    ``finetuned[i_a] − base[i_b]``, each row found through its own model's tokenizer. Any other target
    row has no Δ defined: it keeps the target's row, or, with ``unmatched="finetuned"`` and a token the
    fine-tune has, takes the fine-tune's row as it is (``overlay``; λ does not scale it). Both are exact
    copies, the sign of zero included: the fine-tune's term reads −0.0 for those rows (+0.0 when λ < 0),
    so their Δ·λ is −0.0 and x + (−0.0) = x for every x."""

    plus: torch.Tensor  # target row -> fine-tune row (-1: no Δ)
    minus: torch.Tensor  # target row -> base row (-1: no Δ)
    target: torch.Tensor | None  # target row -> target row, -1 where the overlay supplies it (None: identity)
    overlay: torch.Tensor | None  # target row -> fine-tune row copied as is (-1: not overlaid)
    matched: int
    no_base: list[tuple[str, int]]  # target tokens without a base row, by target id
    no_finetuned: list[tuple[str, int]]  # target tokens with a base row but none in the fine-tune
    rows_without_token: int  # target rows no target token maps to (padding rows): no Δ


def align_rows(ft_vocab: dict[str, int], base_vocab: dict[str, int], tgt_vocab: dict[str, int], *, ft_rows: int,
               base_rows: int, tgt_rows: int, unmatched: str = "target") -> RowAlignment:
    """Match every target row to the fine-tune's and the base's rows of the same token string."""
    plus, minus, overlay = [-1] * tgt_rows, [-1] * tgt_rows, [-1] * tgt_rows  # lists: 150K-token vocabularies
    covered = [False] * tgt_rows
    matched, no_base, no_ft = 0, [], []
    for tok, j in sorted(tgt_vocab.items(), key=lambda kv: kv[1]):
        if not 0 <= j < tgt_rows:
            continue
        covered[j] = True
        ia, ib = ft_vocab.get(tok), base_vocab.get(tok)
        ia = ia if ia is not None and 0 <= ia < ft_rows else None
        ib = ib if ib is not None and 0 <= ib < base_rows else None
        if ia is not None and ib is not None:
            plus[j], minus[j] = ia, ib
            matched += 1
            continue
        (no_base if ib is None else no_ft).append((tok, j))
        if unmatched == "finetuned" and ia is not None:
            overlay[j] = ia
    import torch

    target = None
    if any(i >= 0 for i in overlay):
        target = torch.tensor([-1 if o >= 0 else j for j, o in enumerate(overlay)], dtype=torch.int64)
    return RowAlignment(torch.tensor(plus, dtype=torch.int64), torch.tensor(minus, dtype=torch.int64), target,
                        torch.tensor(overlay, dtype=torch.int64) if target is not None else None, matched, no_base, no_ft,
                        tgt_rows - sum(covered))


# --------------------------------------------------------------------------------------------------
# planners


class _Problems:
    def __init__(self, what: str):
        self.what = what
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            shown = self.items[:20]
            more = f"\n  ... and {n - 20} more" if n > 20 else ""
            raise PlanError(f"{self.what}: {n} problem(s) found before reading any weights:\n  " + "\n  ".join(shown) + more)


def _out_dtype(pol: Policies, default: str) -> str:
    """The output dtype's name (planning compares dtypes by name, without torch)."""
    if pol.out_dtype in (None, "", "auto", "target"):
        return default
    from deltaport.io.checkpoint import parse_dtype_name

    return parse_dtype_name(pol.out_dtype)


def _check_dtypes(name: str, specs: list[tuple[str, TensorSpec]], probs: _Problems) -> bool:
    """True when all are floating point. Mixed float/non-float cannot be combined."""
    floats = [s.dtype_name in FLOAT_DTYPE_NAMES for _, s in specs]
    if all(floats):
        return True
    if not any(floats):
        return False
    desc = ", ".join(f"{who} {s.dtype_name}" for who, s in specs)
    probs.add(f"{name}: dtypes cannot be combined ({desc}); a difference needs floating-point tensors on "
              "every side. Exclude it with --exclude, or fix the checkpoint that stores it as an integer.")
    return False


def plan_transfer(sb: Checkpoint, sf: Checkpoint, tb: Checkpoint, pol: Policies) -> Plan:
    """Plan ``out = tb + λ·(sf − sb)`` over the target's tensors."""
    probs = _Problems("cannot plan the transfer")
    plan = Plan("transfer", [], "float32")
    dtypes: set[str] = set()  # names; torch dtypes only once the plan stands
    used_src: set[str] = set()
    align_maps: dict[str, tuple] = {}

    if sf.kind == "lora":
        plan = _plan_lora_transfer(sb, sf, tb, pol)
        _refuse_no_delta(plan, pol, "the LoRA adapter")
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
        al = align_rows(src_vocab, base_vocab, tgt_vocab, ft_rows=a.shape[0], base_rows=b.shape[0],
                        tgt_rows=c.shape[0], unmatched=pol.unmatched_rows)
        rec = plan.info.setdefault("vocab_align", {
            "unmatched_rows": pol.unmatched_rows, "tensors": [], "target_rows": c.shape[0], "matched": al.matched,
            "tokens_without_base_row": {"count": len(al.no_base), "first": [
                {"token": t, "target_id": j} for t, j in al.no_base[:UNMATCHED_SHOWN]]},
            "tokens_without_finetuned_row": {"count": len(al.no_finetuned), "first": [
                {"token": t, "target_id": j} for t, j in al.no_finetuned[:UNMATCHED_SHOWN]]},
            "rows_without_token": al.rows_without_token,
        })
        rec["tensors"].append(name)
        if len(rec["tensors"]) == 1:
            kept = ("keep the target's rows (--unmatched-rows finetuned copies the fine-tune's rows instead)"
                    if pol.unmatched_rows == "target" else
                    "take the fine-tune's rows where it has the token, else keep the target's (--unmatched-rows finetuned)")
            for what, items in (("have no row in the source base", al.no_base),
                                ("have a base row but none in the source fine-tune", al.no_finetuned)):
                if items:
                    shown = ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in items[:10]) + (", ..." if len(items) > 10 else "")
                    plan.warnings.append(f"vocab align: {len(items)} target token(s) {what} (no Δ is defined): they {kept}: "
                                         f"{shown}")
        base_term = Term(tb, c)
        if al.overlay is not None:
            base_term = Term(tb, c, al.target, overlay=Term(sf, a, al.overlay))
        plus = Term(sf, a, al.plus, fill=-0.0 if scale >= 0 else 0.0)
        return TensorOp(name, c.shape, out_dtype, "delta", base_term, plus, Term(sb, b, al.minus), scale=scale,
                        notes=notes + [f"vocab align: {al.matched} of {c.shape[0]} target rows matched by token string "
                                       f"in both source models; {desc}"])

    for name, c in tb.tensors.items():
        src = pol.map_key(name)
        a_name, note_a = _source_name(sf, src)
        b_name, note_b = _source_name(sb, src)
        if a_name is None or b_name is None:
            where = " and ".join(w for w, n in (("source-finetuned", a_name), ("source-base", b_name)) if n is None)
            msg = f"{name}" + (f" (mapped to {src})" if src != name else "") + f" is in the target but not in {where}"
            if pol.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": msg})
                plan.ops.append(TensorOp(name, c.shape, _out_dtype(pol, c.dtype_name), "copy", base=Term(tb, c), notes=["not in source: copied from target"]))
            else:
                probs.add(msg + "; use --key-map for renamed modules or --shape-policy skip to copy it from the target")
            continue
        used_src.update({a_name, b_name})
        a, b = sf.tensors[a_name], sb.tensors[b_name]
        out_dtype = _out_dtype(pol, c.dtype_name)
        notes = [n for n in (note_a, note_b) if n]
        if not _check_dtypes(name, [("source-base", b), ("source-finetuned", a), ("target", c)], probs):
            if a.dtype_name in FLOAT_DTYPE_NAMES or c.dtype_name in FLOAT_DTYPE_NAMES:
                continue
            plan.ops.append(TensorOp(name, c.shape, c.dtype_name, "copy", base=Term(tb, c), notes=["non-float: copied from target"]))
            continue
        if not pol.selected(name):
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["not selected by --include/--exclude"]))
            continue
        scale = pol.scale_for(name)
        shapes_equal = a.shape == b.shape == c.shape
        if (shapes_equal and pol.vocab_policy == "align" and is_vocab_tensor(name) and len(c.shape) == 2):
            # equal row counts do not mean equal vocabularies (padded embeddings, added tokens)
            dtypes.update({a.dtype_name, b.dtype_name, c.dtype_name})
            desc = f"source-base {list(b.shape)}, source-finetuned {list(a.shape)}, target {list(c.shape)}"
            op = align_op(name, a, b, c, out_dtype, scale, notes, desc)
            if op is not None:
                plan.ops.append(op)
                continue
        if shapes_equal:
            dtypes.update({a.dtype_name, b.dtype_name, c.dtype_name})
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(sf, a), Term(sb, b), scale=scale, notes=notes))
            continue
        rows_only = (len(a.shape) == len(b.shape) == len(c.shape) >= 1 and a.shape[1:] == b.shape[1:] == c.shape[1:])
        if rows_only and is_vocab_tensor(name):
            desc = f"source-base {list(b.shape)}, source-finetuned {list(a.shape)}, target {list(c.shape)}"
            if pol.vocab_policy == "error":
                probs.add(f"{name}: vocabulary sizes differ ({desc}). Choose --vocab-policy pad (official script: "
                          "zero rows appended to the shorter models, new tokens get the fine-tuned rows) or "
                          "--vocab-policy align (rows matched by token string using both tokenizers; "
                          "target-only tokens get no Δ)")
                continue
            dtypes.update({a.dtype_name, b.dtype_name, c.dtype_name})
            if pol.vocab_policy == "pad":
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
        if pol.shape_policy == "skip":
            plan.skipped.append({"name": name, "reason": msg})
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["shape mismatch: copied from target"]))
        else:
            probs.add(msg + "; use --shape-policy skip to transfer only shape-matching tensors (paper App. B.3)")

    # source tensors the target never asked for
    for who, ck in (("source-finetuned", sf), ("source-base", sb)):
        extra = [n for n in ck.tensors if n not in used_src and not _tied_alias(ck, n, tb)]
        for n in extra:
            msg = f"{n} is in the {who} but has no counterpart in the target"
            if pol.shape_policy == "skip":
                if not any(s["name"] == n for s in plan.skipped):
                    plan.skipped.append({"name": n, "reason": msg})
            else:
                probs.add(msg + "; use --key-map for renamed modules or --shape-policy skip to leave it out")
    # the two source models must agree with each other on shapes
    for n in used_src:
        if n in sf.tensors and n in sb.tensors and sf.tensors[n].shape != sb.tensors[n].shape and not is_vocab_tensor(n):
            probs.add(f"{n}: source-base {list(sb.tensors[n].shape)} vs source-finetuned {list(sf.tensors[n].shape)}; "
                      "the source pair must share shapes")
    probs.raise_if_any()
    _refuse_no_delta(plan, pol, "the source models")
    plan.compute_dtype = choose_compute_dtype(pol.compute_dtype, {torch_dtype(d) for d in dtypes})
    if _tied(tb):
        plan.warnings.append("target ties input/output embeddings: the shared matrix receives Δ once")
    return plan


def _refuse_no_delta(plan: Plan, pol: Policies, source: str) -> None:
    """A transfer/apply in which no output tensor receives Δ would write a copy of the target and call it a
    result: an input error, stating how many tensors matched and why the others did not."""
    if plan.received_delta or not plan.ops:
        return
    n = len(plan.ops)
    reasons: dict[str, int] = {}
    for op in plan.ops:
        why = "; ".join(op.notes) or "copied"
        reasons[why] = reasons.get(why, 0) + 1
    why = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    hint = []
    if pol.shape_policy == "skip":
        hint.append("--shape-policy skip left out every tensor: the models are not the same architecture and size, "
                    "or their tensor names differ (--key-map maps renamed modules)")
    if pol.include or pol.exclude:
        hint.append("check --include/--exclude")
    raise PlanError(f"no tensor would receive Δ: 0 of {n} target tensors matched {source} ({why}). "
                    + (". ".join(hint) + ". " if hint else "") + "Nothing was written.")


def _tied_alias(ck: Checkpoint, name: str, tb: Checkpoint) -> bool:
    """A source lm_head with no counterpart in a tied target is dropped on purpose (reported as skipped elsewhere)."""
    return False


def _plan_lora_transfer(sb: Checkpoint, sf: Checkpoint, tb: Checkpoint, pol: Policies) -> Plan:
    """Finetuned side is a PEFT LoRA adapter: Δ(W) = scaling · B @ A for adapted modules, 0 elsewhere."""
    probs = _Problems("cannot plan the LoRA transfer")
    cfg = sf.lora or {}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        probs.add(f"LoRA adapter {sf.dir}: rank_pattern/alpha_pattern are not supported yet; merge it with peft first")
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
        probs.add(f"LoRA adapter tensor {n} is not a lora_A/lora_B/modules_to_save weight (DoRA and other variants "
                  "are not supported; merge the adapter with peft and pass the merged model)")
    plan = Plan("transfer", [], "float32")
    dtypes: set[str] = set()  # names; torch dtypes only once the plan stands
    for name, c in tb.tensors.items():
        out_dtype = _out_dtype(pol, c.dtype_name)
        src = pol.map_key(name)
        if not pol.selected(name) or (src not in loras and src not in full):
            notes = ["not adapted by the LoRA: Δ = 0, copied from target"] if pol.selected(name) else ["not selected"]
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=notes))
            continue
        scale = pol.scale_for(name)
        if src in full:
            if src not in sb.tensors or sb.tensors[src].shape != full[src].shape or c.shape != full[src].shape:
                probs.add(f"{name}: modules_to_save weight does not match source base/target shapes")
                continue
            dtypes.update({c.dtype_name, full[src].dtype_name})
            plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(sf, full[src]), Term(sb, sb.tensors[src]), scale=scale, notes=["modules_to_save"]))
            continue
        ab = loras[src]
        if set(ab) != {"A", "B"}:
            probs.add(f"{name}: LoRA adapter has only lora_{''.join(ab)}")
            continue
        fan = bool(cfg.get("fan_in_fan_out"))
        want = (ab["A"].shape[1], ab["B"].shape[0]) if fan else (ab["B"].shape[0], ab["A"].shape[1])
        if want != tuple(c.shape):
            what = "(B@A)^T (fan_in_fan_out)" if fan else "B@A"
            probs.add(f"{name}: LoRA {what} has shape {list(want)} but the target has {list(c.shape)}")
            continue
        dtypes.add(c.dtype_name)
        plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", base=Term(tb, c),
                                 lora=LoraTerm(ab["A"], ab["B"], sf, scaling, transposed=fan), scale=scale,
                                 notes=[f"LoRA r={r} scaling={scaling:g}" + (" fan_in_fan_out" if fan else "")]))
    missing = (set(loras) | set(full)) - {pol.map_key(n) for n in tb.tensors}
    for n in sorted(missing):
        probs.add(f"LoRA adapts {n}, which the target does not have")
    probs.raise_if_any()
    plan.compute_dtype = choose_compute_dtype(pol.compute_dtype, {torch_dtype(d) for d in dtypes})
    plan.info["lora"] = {"r": r, "lora_alpha": alpha, "scaling": scaling, "use_rslora": bool(cfg.get("use_rslora"))}
    return plan


def delta_dtype_for(inputs: set[torch.dtype], requested: str | None) -> torch.dtype:
    """Stored Δ dtype: exact by default (float32 for 16-bit inputs, float64 for float32 inputs)."""
    import torch

    if requested not in (None, "", "auto"):
        from deltaport.io.checkpoint import parse_dtype

        return parse_dtype(requested)
    return torch.float64 if inputs & {torch.float32, torch.float64} else torch.float32


def plan_diff(sb: Checkpoint, sf: Checkpoint, pol: Policies, delta_dtype: str | None = None) -> Plan:
    """Plan ``Δ = sf − sb`` over the finetuned model's tensors (stored unscaled)."""
    if sf.kind == "lora":
        tmp = _plan_lora_transfer(sb, sf, sb, pol)  # Δ over the base's tensors
        plan = Plan("diff", [], tmp.compute_dtype, info=tmp.info)
        # scaling·B·A is computed in the compute dtype and is not exactly representable in a narrower one:
        # auto stores it as computed (float64), so apply(diff(adapter)) equals a direct LoRA transfer for
        # every target and λ. A narrower --delta-dtype is checked element by element like a full diff.
        ddt = tmp.compute_dtype if delta_dtype in (None, "", "auto") else delta_dtype_for(set(), delta_dtype)
        for op in tmp.ops:
            if op.kind == "copy":
                continue  # Δ = 0: not stored; apply copies the target for tensors absent from the delta
            if op.lora is not None and ddt != tmp.compute_dtype:
                op.check = op.base
            op.base, op.out_dtype, op.scale = None, ddt, 1.0
            plan.ops.append(op)
        return plan
    probs = _Problems("cannot plan the diff")
    plan = Plan("diff", [], "float32")
    dtypes: set[str] = set()  # names; torch dtypes only once the plan stands
    for name, a in sf.tensors.items():
        src = pol.map_key(name)
        b_name, note = _source_name(sb, src)
        if b_name is None:
            msg = f"{name} is in the finetuned model but not in the base"
            if pol.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": msg})
            else:
                probs.add(msg + "; use --key-map for renamed modules or --shape-policy skip to leave it out")
            continue
        b = sb.tensors[b_name]
        if not _check_dtypes(name, [("base", b), ("finetuned", a)], probs):
            if a.dtype_name in FLOAT_DTYPE_NAMES or b.dtype_name in FLOAT_DTYPE_NAMES:
                continue
            plan.skipped.append({"name": name, "reason": "non-float tensor: no Δ"})
            continue
        if not pol.selected(name):
            plan.skipped.append({"name": name, "reason": "not selected by --include/--exclude"})
            continue
        if a.shape != b.shape:
            rows_only = len(a.shape) == len(b.shape) >= 1 and a.shape[1:] == b.shape[1:]
            desc = f"base {list(b.shape)}, finetuned {list(a.shape)}"
            if rows_only and is_vocab_tensor(name) and pol.vocab_policy == "pad":
                rows = max(a.shape[0], b.shape[0])
                dtypes.update({a.dtype_name, b.dtype_name})
                plan.vocab_rows = rows
                plan.ops.append(TensorOp(name, (rows, *a.shape[1:]), a.dtype_name, "delta", None, Term(sf, a), Term(sb, b),
                                         notes=[f"vocab pad: {desc}"]))
                continue
            if rows_only and is_vocab_tensor(name):
                probs.add(f"{name}: vocabulary sizes differ ({desc}); use --vocab-policy pad for diff "
                          "(align needs the target's tokenizer: use `deltaport transfer --vocab-policy align`)")
                continue
            if pol.shape_policy == "skip":
                plan.skipped.append({"name": name, "reason": f"shapes differ ({desc})"})
                continue
            probs.add(f"{name}: shapes differ ({desc}); use --shape-policy skip to leave it out")
            continue
        dtypes.update({a.dtype_name, b.dtype_name})
        plan.ops.append(TensorOp(name, a.shape, a.dtype_name, "delta", None, Term(sf, a), Term(sb, b), notes=[note] if note else []))
    for n in sb.tensors:
        if n not in {pol.map_key(x) for x in sf.tensors} and not (re.search(r"lm_head\.weight$", n) and _tied(sf)):
            msg = f"{n} is in the base but not in the finetuned model"
            if pol.shape_policy == "skip":
                plan.skipped.append({"name": n, "reason": msg})
            else:
                probs.add(msg + "; use --shape-policy skip to leave it out")
    probs.raise_if_any()
    plan.compute_dtype = choose_compute_dtype(pol.compute_dtype, {torch_dtype(d) for d in dtypes})
    ddt = delta_dtype_for({torch_dtype(d) for d in dtypes}, delta_dtype)
    for op in plan.ops:
        op.out_dtype = ddt
    return plan


def _check_delta_provenance(where: Path, prov: dict) -> None:
    """The fields of a delta's deltaport.json that apply relies on have the types ``diff`` writes."""
    problems = []
    base = prov.get("base", {})
    if not isinstance(base, dict):
        problems.append("'base' is not an object")
        base = {}
    tensors = base.get("tensors", {})
    if not isinstance(tensors, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], list) for v in tensors.values()):
        problems.append("'base.tensors' does not map tensor names to [dtype, shape]")
    if not isinstance(base.get("structure"), (str, type(None))):
        problems.append("'base.structure' is not a string")
    if not isinstance(prov.get("policies", {}), dict):
        problems.append("'policies' is not an object")
    if problems:
        raise PlanError(f"{where}/deltaport.json is malformed ({'; '.join(problems)}); it was edited or damaged. "
                        "Recreate the delta with `deltaport diff`.")


def plan_apply(delta: Checkpoint, tb: Checkpoint, pol: Policies, *, force: bool = False) -> Plan:
    """Plan ``out = tb + λ·Δ`` where Δ comes from a ``deltaport diff`` directory."""
    prov = delta.provenance or {}
    if prov.get("kind") != "delta":
        raise PlanError(f"{delta.dir} is not a deltaport delta (no deltaport.json with kind 'delta'); "
                        "create one with `deltaport diff --base B --finetuned F -o DELTA`")
    _check_delta_provenance(delta.dir, prov)
    probs = _Problems("cannot apply the delta")
    plan = Plan("apply", [], "float32")
    recorded = prov.get("base", {}).get("tensors", {})  # name -> [dtype, shape]
    want_sig = prov.get("base", {}).get("structure")
    got_sig = tb.structure_signature()
    mismatch = []
    if want_sig and want_sig != got_sig:
        for n, (dt, shape) in recorded.items():
            if n not in tb.tensors:
                mismatch.append(f"{n} missing from target")
            elif list(tb.tensors[n].shape) != list(shape) or tb.tensors[n].dtype_name != dt:
                mismatch.append(f"{n}: delta recorded {dt} {shape}, target has {tb.tensors[n].dtype_name} {list(tb.tensors[n].shape)}")
        for n in tb.tensors:
            if n not in recorded:
                mismatch.append(f"{n} in target but not in the delta's base")
        if not mismatch:
            mismatch.append("structure signature differs")
        if not force:
            shown = "\n  ".join(mismatch[:20])
            raise PlanError(f"target {tb.source} does not match the structure the delta was made on "
                            f"(base {prov.get('base', {}).get('source')}); {len(mismatch)} difference(s):\n  {shown}\n"
                            "Use a target of the same architecture and size, or pass --force to apply to matching "
                            "tensors anyway (recorded in provenance).")
        plan.warnings.append(f"--force: target structure differs from the delta's base ({len(mismatch)} differences)")
        plan.info["forced"] = mismatch[:50]
    from deltaport.io.compressed_format import compression_record

    comp = compression_record(delta)
    packed = {n: r for n, r in (comp or {}).get("tensors", {}).items() if r.get("method") not in (None, "exact")}
    dtypes: set[str] = set()  # names; torch dtypes only once the plan stands
    for name, c in tb.tensors.items():
        out_dtype = _out_dtype(pol, c.dtype_name)
        if pol.map_key(name) in packed and pol.selected(name) and c.dtype_name in FLOAT_DTYPE_NAMES:
            d_name = pol.map_key(name)
            rec = packed[d_name]
            if tuple(rec["shape"]) != tuple(c.shape):
                probs.add(f"{name}: compressed delta {rec['shape']} vs target {list(c.shape)}; a compressed tensor must "
                          "have the target's shape (--vocab-policy pad applies to exact tensors only)")
                continue
            dtypes.add(c.dtype_name)
            op = TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), scale=pol.scale_for(name))
            compressed_term(op, delta, d_name, rec)
            plan.ops.append(op)
            continue
        d_name, note = _source_name(delta, pol.map_key(name))
        if d_name is None or not pol.selected(name) or c.dtype_name not in FLOAT_DTYPE_NAMES:
            why = "no Δ for this tensor" if d_name is None else ("not selected" if c.dtype_name in FLOAT_DTYPE_NAMES else "non-float")
            plan.ops.append(TensorOp(name, c.shape, out_dtype if c.dtype_name in FLOAT_DTYPE_NAMES else c.dtype_name, "copy", base=Term(tb, c), notes=[why + ": copied from target"]))
            continue
        d = delta.tensors[d_name]
        scale = pol.scale_for(name)
        if d.shape != c.shape:
            rows_only = len(d.shape) == len(c.shape) >= 1 and d.shape[1:] == c.shape[1:]
            if rows_only and is_vocab_tensor(name) and (pol.vocab_policy == "pad" or prov.get("policies", {}).get("vocab_policy") == "pad"):
                rows = max(d.shape[0], c.shape[0])
                plan.vocab_rows = rows
                dtypes.update({c.dtype_name, d.dtype_name})
                plan.ops.append(TensorOp(name, (rows, *c.shape[1:]), out_dtype, "delta", Term(tb, c), Term(delta, d), None, scale=scale,
                                         notes=[f"vocab pad: delta {list(d.shape)}, target {list(c.shape)}"]))
                continue
            msg = f"{name}: delta {list(d.shape)} vs target {list(c.shape)}"
            if pol.shape_policy == "skip" or force:
                plan.skipped.append({"name": name, "reason": msg})
                plan.ops.append(TensorOp(name, c.shape, out_dtype, "copy", base=Term(tb, c), notes=["shape mismatch: copied"]))
            else:
                probs.add(msg + "; use --vocab-policy pad for vocabulary rows or --shape-policy skip")
            continue
        dtypes.update({c.dtype_name})
        plan.ops.append(TensorOp(name, c.shape, out_dtype, "delta", Term(tb, c), Term(delta, d), None, scale=scale, notes=[note] if note else []))
    probs.raise_if_any()
    _refuse_no_delta(plan, pol, "the delta")
    plan.compute_dtype = choose_compute_dtype(pol.compute_dtype, {torch_dtype(d) for d in dtypes})
    # the delta's own dtype must not be rounded before use: compute at least as wide as it
    if any(op.plus is not None and op.plus.spec.dtype_name == "float64" for op in plan.ops):
        plan.compute_dtype = "float64"
    return plan


def compressed_term(op: TensorOp, delta: Checkpoint, name: str, rec: dict) -> None:
    """Set ``op``'s Δ to the compressed tensor ``name`` of ``delta`` (record ``rec`` of its compression):
    low rank through the LoRA path (Δ = 1·B·A), sparse and sign as a :class:`PackedTerm`."""
    from deltaport.io.compressed_format import part_names

    method = rec["method"]
    parts = {role: delta.tensors[n] for role, n in part_names(name, method).items()}
    if method == "lowrank":
        op.lora = LoraTerm(parts["A"], parts["B"], delta, 1.0)
        op.notes.append(f"compressed: lowrank r={parts['A'].shape[0]}")
    elif method == "sparse":
        op.packed = PackedTerm("sparse", delta, parts["mask"], parts["values"])
        op.notes.append(f"compressed: sparse p={rec.get('density')}")
    else:
        op.packed = PackedTerm("sign", delta, parts["bits"], parts["scale"])
        op.notes.append("compressed: sign")


def _finetuned_vocab(delta: Checkpoint) -> dict | None:
    """The token -> id map of a delta's ``source_finetuned/tokenizer.json`` (None when absent or not readable)."""
    p = delta.dir / "source_finetuned" / "tokenizer.json"
    try:
        vocab = json.loads(p.read_text()).get("model", {}).get("vocab")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(vocab, list):  # unigram: [[token, score], ...]
        vocab = {str(t[0]): i for i, t in enumerate(vocab) if isinstance(t, list) and t}
    return vocab if isinstance(vocab, dict) else None


def plan_apply_many(deltas: list[Checkpoint], tb: Checkpoint, pols: list[Policies], *, force: bool = False,
                    ties: float | None = None) -> Plan:
    """Plan ``out = tb + Σ_i λ_i·Δ_i`` for several deltas (``pols[i]`` holds Δ_i's λ and the shared options).

    Each delta is planned against the target as for one (same checks, same messages); then the plans must
    agree: the same output shape for every tensor (vocabulary rows included) and, when both record one,
    the same fine-tuned vocabulary. Every conflict is reported before a tensor byte is read."""
    probs = _Problems(f"cannot compose the {len(deltas)} deltas")
    plans = []
    for dk, pol in zip(deltas, pols):
        try:
            plans.append(plan_apply(dk, tb, pol, force=force))
        except PlanError as exc:
            probs.add(f"{dk.source}: {exc}")
    probs.raise_if_any()
    vocabs = [(dk, _finetuned_vocab(dk)) for dk in deltas]
    known = [(dk, v) for dk, v in vocabs if v is not None]
    for dk, v in known[1:]:
        if v != known[0][1]:
            diff = len(set(v.items()) ^ set(known[0][1].items()))
            probs.add(f"{dk.source} was made on a fine-tune whose vocabulary differs from that of {known[0][0].source} "
                      f"({diff} token/id pairs differ): their embedding rows mean different tokens, so their Δs cannot be "
                      "added. Compose deltas made on fine-tunes of one tokenizer.")
    f64 = choose_compute_dtype("float64", set())
    out = Plan("apply", [], f64)
    for i, name in enumerate(op.name for op in plans[0].ops):
        ops = [p.ops[i] for p in plans]
        assert all(o.name == name for o in ops)
        shapes = {tuple(o.shape) for o in ops}
        if len(shapes) > 1:
            probs.add(f"{name}: the deltas give different output shapes "
                      f"({', '.join(f'{dk.source}: {list(o.shape)}' for dk, o in zip(deltas, ops))}); "
                      "vocabulary rows padded differently cannot be composed")
            continue
        first = ops[0]
        parts = []
        for dk, o in zip(deltas, ops):
            if o.kind != "delta":
                continue
            if o.minus is not None or (o.plus is not None and o.plus.rowmap is not None):
                probs.add(f"{name}: {dk.source}: internal: unexpected Δ term")  # pragma: no cover
                continue
            parts.append(DeltaPart(o.scale, plus=o.plus, lora=o.lora, packed=o.packed, source=dk.source))
        if not parts:
            out.ops.append(first)
            continue
        base = next(o.base for o in ops if o.kind == "delta")
        notes = [f"{len(parts)} of {len(deltas)} deltas"] + [n for o in ops for n in o.notes if o.kind == "delta"]
        out.ops.append(TensorOp(name, first.shape, first.out_dtype, "delta", base=base, deltas=parts, notes=notes,
                                ties_density=ties))
    probs.raise_if_any()
    for p in plans:
        out.skipped.extend(p.skipped)
        out.warnings.extend(p.warnings)
        if p.vocab_rows is not None:
            out.vocab_rows = p.vocab_rows
    out.compute_dtype = f64 if any(p.compute_dtype == f64 for p in plans) else plans[0].compute_dtype
    if out.compute_dtype != f64 and any(o.deltas for o in out.ops):
        out.warnings.append("--compute-dtype float32: a composed sum is rounded in float32, not checked against the "
                            "exact sum")
    out.info["forced"] = [f for p in plans for f in (p.info.get("forced") or [])] or None
    return out
