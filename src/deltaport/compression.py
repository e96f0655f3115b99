"""Compress a stored Δ (``deltaport compress``): low-rank factors, a DARE-sparse bitmask + values, or
BitDelta sign bits + one scale per matrix. The format (version 1) is specified in docs/FORMAT.md.

One tensor at a time: memory is a small multiple of the largest tensor compressed, never the model.
Randomised steps are seeded per tensor, so a rerun writes the same bytes (on one machine, with the same
number of torch threads: LAPACK's SVD may sum in another order with another thread count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import deltaport
from deltaport.errors import InputError, PlanError
from deltaport.io.atomic import atomic_output_dir
from deltaport.io.checkpoint import PROVENANCE_NAME, Checkpoint, open_checkpoint
from deltaport.io.residual import RECORD as RESIDUAL_RECORD
from deltaport.io.residual import is_residual_part, residual_parts, residual_record, with_residual
from deltaport.io.tensors import dtype_name
from deltaport.io.writer import OutEntry, ShardedWriter, parse_size
from deltaport.options import COMPRESS, CompressOptions, declared
from deltaport.plan import is_vocab_tensor

LOG = logging.getLogger(__name__)

from deltaport.io.compressed_format import (  # noqa: E402,F401  (re-exported: the format's names live torch-free)
    FORMAT_NAME,
    FORMAT_VERSION,
    METHODS,
    PART_SEP,
    compression_record,
    pack_bits,
    part_names,
)

EXACT_SVD_MAX = 2048  # LAPACK SVD up to this min(m, n) (or r >= min/4); a seeded randomised SVD above
RSVD_OVERSAMPLE = 10
RSVD_POWER_ITERS = 4


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def dare_mask(seed: int, name: str, numel: int, density: float) -> torch.Tensor:
    """DARE's keep mask: depends on the seed, the tensor's name and size only (never its values)."""
    if density >= 1.0:
        return torch.ones(numel, dtype=torch.bool)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.rand(numel, generator=g, dtype=torch.float64) < density


# --------------------------------------------------------------------------------------------------
# the methods (each returns the parts and D, the Δ the parts mean)


def _svd(x: torch.Tensor, r: int, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    m, n = x.shape
    k = min(m, n)
    if k <= EXACT_SVD_MAX or r >= k // 4:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r], "lapack"
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    p = min(k, r + RSVD_OVERSAMPLE)
    Q, _ = torch.linalg.qr(x @ torch.randn(n, p, generator=g, dtype=x.dtype))
    for _ in range(RSVD_POWER_ITERS):
        Z, _ = torch.linalg.qr(x.T @ Q)
        Q, _ = torch.linalg.qr(x @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ x, full_matrices=False)
    return (Q @ Ub)[:, :r], S[:r], Vh[:r], f"randomized (p={p}, q={RSVD_POWER_ITERS})"


def lowrank_product(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """B·A as the LoRA path computes it (see engine._lora): Σ_k in order, one rounding per step."""
    A, B = A.to(dtype), B.to(dtype)
    out = B[:, 0:1] * A[0:1]
    for k in range(1, A.shape[0]):
        out.add_(B[:, k:k + 1] * A[k:k + 1])
    return out


def compress_tensor(delta: torch.Tensor, name: str, method: str, *, rank: int | None = None,
                    density: float | None = None, seed: int = 0, stored: torch.dtype = torch.float32
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Compress one Δ tensor; returns (role -> part tensor, record). ``record`` has the method's parameters
    and ``rel_frobenius_error`` (of D, what the parts mean, against ``delta``)."""
    x = delta.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"Δ tensor {name} holds NaN/Inf, which {method} cannot compress; leave it exact with "
                         f"--exclude '{re.escape(name)}' or fix the models the delta was made from")
    rec: dict[str, Any] = {}
    if method == "lowrank":
        m, n = x.shape
        r = min(int(rank), m, n)
        U, S, Vh, solver = _svd(x, r, seed, name)
        root = S.sqrt()
        B = (U * root).to(torch.float32).contiguous()
        A = (root[:, None] * Vh).to(torch.float32).contiguous()
        parts = {"A": A, "B": B}
        D = B.double() @ A.double()  # error only: the float64 BLAS product differs from D by ~1e-16 relative
        rec.update(rank=r, solver=solver)
    elif method == "sparse":
        mask = dare_mask(seed, name, x.numel(), float(density))
        vals = x.reshape(-1)[mask]
        if density < 1.0:
            vals = vals / float(density)
        vals = vals.to(stored)
        parts = {"mask": pack_bits(mask), "values": vals.contiguous()}
        D = torch.zeros(x.numel(), dtype=torch.float64)
        D[mask] = vals.double()
        D = D.view(x.shape)
        rec.update(density=float(density), kept=int(mask.sum()))
    elif method == "sign":
        pos = x.reshape(-1) >= 0
        alpha = torch.tensor([float(x.abs().mean())], dtype=torch.float64).to(torch.float32)
        parts = {"bits": pack_bits(pos), "scale": alpha}
        D = torch.where(pos, alpha.double(), -alpha.double()).view(x.shape)
        rec.update(scale=float(alpha))
    else:  # pragma: no cover - validated by the caller
        raise InputError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    norm = float(torch.linalg.vector_norm(x))
    rec["rel_frobenius_error"] = float(torch.linalg.vector_norm(x - D)) / norm if norm else None
    return parts, rec


# --------------------------------------------------------------------------------------------------
# planning (headers only, plus DARE's value-independent mask sizes)


@dataclass
class _Item:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    method: str  # "exact" or a method
    reason: str = ""
    parts: dict[str, OutEntry] = field(default_factory=dict)  # role -> entry


def _compressible(name: str, shape: tuple[int, ...], method: str, include: list[re.Pattern],
                  exclude: list[re.Pattern]) -> str:
    """'' if ``name`` is compressed, else why it stays exact."""
    if any(p.search(name) for p in exclude):
        return "excluded by --exclude"
    if include and not any(p.search(name) for p in include):
        return "not matched by --include"
    if len(shape) < 2:
        return "1-D tensor (norm or bias): kept exact"
    if method == "lowrank" and len(shape) != 2:
        return f"{len(shape)}-D tensor: low rank applies to matrices"
    if is_vocab_tensor(name) and not include:
        return VOCAB_EXACT_WHY[method]
    return ""


#: why a vocabulary tensor stays exact by default, per method (docs/compression.md)
VOCAB_EXACT_WHY = {
    "lowrank": "vocabulary tensor: kept exact (the lab frontier's recommendation since design v4: low rank with "
               "the vocabulary exact kept >= 95 % of the fine-tuning gain, with it compressed 91-94 %; name it "
               "with --include to compress it, e.g. 1/23 of the Δ's bytes on SmolLM2 instead of 0.247)",
    "sign": "vocabulary tensor: kept exact (one scale per embedding matrix lost 63 % of the gain in the lab's "
            "frontier; name it with --include to compress it)",
    "sparse": "vocabulary tensor: kept exact (sparse values are stored at the Δ's precision, so it saves less "
              "than low rank; name it with --include to compress it)",
}


def _plan(dk: Checkpoint, method: str, rank, density, seed, include, exclude) -> list[_Item]:
    items = []
    residuals = residual_record(dk)
    for name, spec in dk.tensors.items():
        if is_residual_part(name) and name.split(PART_SEP)[0] in residuals:
            continue  # belongs to its tensor: kept beside it when that stays exact, added to it when compressed
        if PART_SEP in name:
            raise InputError(f"{dk.source}: tensor {name!r} is a compressed part; compress takes an exact delta made by "
                             "`deltaport diff`")
        if not spec.dtype.is_floating_point:
            items.append(_Item(name, spec.dtype, spec.shape, "exact", "non-float tensor"))
            continue
        why = _compressible(name, spec.shape, method, include, exclude)
        it = _Item(name, spec.dtype, spec.shape, "exact" if why else method, why)
        if why and name in residuals:
            it.parts = {role: OutEntry(p, dk.tensors[p].dtype, dk.tensors[p].shape)
                        for role, p in residual_parts(name).items()}
        if not why:
            pn = part_names(name, method)
            nbits = (spec.numel + 7) // 8
            if method == "lowrank":
                m, n = spec.shape
                r = min(rank, m, n)
                shapes = {"A": (torch.float32, (r, n)), "B": (torch.float32, (m, r))}
            elif method == "sparse":
                k = int(dare_mask(seed, name, spec.numel, density).sum())
                shapes = {"mask": (torch.uint8, (nbits,)), "values": (spec.dtype, (k,))}
            else:
                shapes = {"bits": (torch.uint8, (nbits,)), "scale": (torch.float32, (1,))}
            it.parts = {role: OutEntry(pn[role], dt, shp) for role, (dt, shp) in shapes.items()}
        items.append(it)
    return items


def _compile(regs, flag):
    out = []
    for r in regs or []:
        try:
            out.append(re.compile(r))
        except re.error as exc:
            raise InputError(f"{flag}: invalid regular expression {r!r}: {exc}") from None
    return out


@declared(CompressOptions)
def compress(delta, output, *, method: str, rank: int | None = COMPRESS.rank, density: float | None = COMPRESS.density,
             include: list[str] | None = COMPRESS.include, exclude: list[str] | None = COMPRESS.exclude,
             seed: int = COMPRESS.seed, shard_size: str | int = COMPRESS.shard_size, overwrite: bool = COMPRESS.overwrite,
             threads: int | None = COMPRESS.threads) -> dict[str, Any]:
    """Write a compressed copy of the delta directory ``delta`` (made by ``deltaport diff``) to ``output``.

    ``lowrank`` stores factors B [m, R], A [R, n] per matrix (applied through the LoRA path). By default every
    method compresses every 2-D tensor except vocabulary tensors (embeddings, lm_head: kept exact, the lab
    frontier's recommendation since design v4, docs/compression.md); ``include``/``exclude`` select others
    (an ``include`` naming a vocabulary tensor compresses it); 1-D tensors always stay exact.

    Returns the ``compression`` record written to ``deltaport.json`` (per-tensor method, parameters, bytes
    before/after, relative Frobenius error). Raises :class:`~deltaport.errors.InputError` for bad input.
    """
    from deltaport.preflight import compress_options

    rank, density = compress_options(method, rank, density, seed, shard_size)  # also the CLI's, before torch
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    dk = open_checkpoint(delta)
    prov = dk.provenance or {}
    if dk.kind != "delta" or prov.get("kind") != "delta":
        raise InputError(f"{dk.source} is not a deltaport delta (no deltaport.json with kind 'delta'); "
                         "create one with `deltaport diff --base B --finetuned F -o DELTA`")
    if prov.get("compression"):
        raise InputError(f"{dk.source} is already compressed ({prov['compression'].get('method')}); compress the exact "
                         "delta made by `deltaport diff`")
    items = _plan(dk, method, rank, density, seed, inc, exc)
    if not any(it.method != "exact" for it in items):
        raise PlanError(f"no tensor of {dk.source} is compressed: every tensor is 1-D, a vocabulary tensor, or left out "
                        "by --include/--exclude. Check the regexes (a vocabulary tensor needs an --include naming it).")
    entries: list[OutEntry] = []
    for it in items:
        if it.method == "exact":
            entries.append(OutEntry(it.name, it.dtype, it.shape))
        entries.extend(it.parts.values())
    output = Path(output)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    by_part = {e.name: (it, role) for it in items if it.method != "exact" for role, e in it.parts.items()}
    kept_residual = {e.name for it in items if it.method == "exact" for e in it.parts.values()}
    residuals = residual_record(dk)
    by_name = {it.name: it for it in items}
    records: dict[str, dict[str, Any]] = {}
    try:
        with atomic_output_dir(output, overwrite=overwrite, inputs=[dk.dir]) as tmp:
            src = dk.dir / "source_finetuned"
            if src.is_dir():
                shutil.copytree(src, tmp / "source_finetuned")
            writer = ShardedWriter(tmp, entries, parse_size(shard_size),
                                   metadata={"producer": f"deltaport {deltaport.__version__}"})
            cache: tuple[str, dict[str, torch.Tensor]] | None = None
            for e in writer.order:
                if e.name in kept_residual:  # the exact residual of a tensor kept exact, copied
                    data = dk.tensor(e.name).contiguous()
                elif e.name in by_name and by_name[e.name].method == "exact":
                    data = dk.tensor(e.name).contiguous()
                    it = by_name[e.name]
                    nbytes = e.nbytes + sum(p.nbytes for p in it.parts.values())
                    records[it.name] = {"method": "exact", "reason": it.reason, "shape": list(it.shape),
                                        "dtype": dtype_name(it.dtype), "bytes_before": nbytes, "bytes_after": nbytes,
                                        "rel_frobenius_error": 0.0}
                else:
                    it, role = by_part[e.name]
                    if cache is None or cache[0] != it.name:
                        # parts of one tensor may sit apart in the shard order (sorted by item size, then name):
                        # the tensor is then compressed again (deterministic) rather than kept in memory
                        parts, rec = compress_tensor(with_residual(dk, it.name, dk.tensor(it.name)), it.name, method,
                                                     rank=rank, density=density, seed=seed, stored=it.dtype)
                        cache = (it.name, parts)
                        if it.name not in records:
                            before = math.prod(it.shape) * it.dtype.itemsize + (sum(
                                dk.tensors[p].nbytes for p in residual_parts(it.name).values()) if it.name in residuals else 0)
                            after = sum(p.nbytes for p in it.parts.values())
                            records[it.name] = {"method": method, "shape": list(it.shape), "dtype": dtype_name(it.dtype),
                                                "parts": {p.name: r for r, p in it.parts.items()}, **rec,
                                                "bytes_before": before, "bytes_after": after}
                    data = cache[1][role]
                    if tuple(data.shape) != tuple(e.shape) or data.dtype != e.dtype:  # pragma: no cover - internal
                        raise RuntimeError(f"internal: part {e.name} is {data.dtype} {list(data.shape)}, planned "
                                           f"{e.dtype} {list(e.shape)}")
                writer.begin(e.name, e.nbytes)
                if e.nbytes:
                    writer.write(data.contiguous().reshape(-1).view(torch.uint8))  # reshape: stride 1 for [1, n] too
            writer.finalize()
            before = sum(r["bytes_before"] for r in records.values())
            after = sum(r["bytes_after"] for r in records.values())
            cb = sum(r["bytes_before"] for r in records.values() if r["method"] != "exact")
            ca = sum(r["bytes_after"] for r in records.values() if r["method"] != "exact")
            comp = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "method": method,
                "params": {"rank": rank} if method == "lowrank" else {"density": density} if method == "sparse" else {},
                "seed": int(seed), "include": [p.pattern for p in inc], "exclude": [p.pattern for p in exc],
                "source_delta": {"source": dk.source, "path": str(dk.dir.absolute()), "fingerprint": dk.header_fingerprint()},
                "tensors": {n: records[n] for n in sorted(records)},
                "totals": {"bytes_before": before, "bytes_after": after, "ratio": after / before if before else None,
                           "compressed_tensors": sum(r["method"] != "exact" for r in records.values()),
                           "compressed_bytes_before": cb, "compressed_bytes_after": ca,
                           "compressed_ratio": ca / cb if cb else None},
            }
            new = dict(prov)
            new.update(operation="compress", deltaport_version=deltaport.__version__, compression=comp)
            kept = {n: c for n, c in residuals.items() if by_name.get(n) is not None and by_name[n].method == "exact"}
            new.pop(RESIDUAL_RECORD, None)
            if kept:  # the residuals of the tensors kept exact, now in the shards beside them
                new[RESIDUAL_RECORD] = {"tensors": kept, "elements": sum(kept.values())}
            (tmp / PROVENANCE_NAME).write_text(json.dumps(new, indent=2, sort_keys=True, default=str) + "\n")
    finally:
        torch.set_num_threads(old_threads)
    LOG.info("compressed %s -> %s in %.2f s", dk.source, output, time.perf_counter() - t0)
    return comp


def decompress(delta, output, *, overwrite: bool = False, compute_dtype: str = "auto") -> Path:
    """Write the dense delta a compressed delta means (D per tensor: float64 for low rank, as computed by
    the LoRA path; the stored dtype for sparse and sign), so that ``apply`` of either writes the same bytes."""
    from deltaport.engine import execute
    from deltaport.io.tensors import parse_dtype
    from deltaport.plan import Plan, Term, TensorOp, choose_compute_dtype, compressed_term

    dk = open_checkpoint(delta)
    comp = compression_record(dk)
    if comp is None:
        raise InputError(f"{dk.source} is not a compressed delta")
    compute = choose_compute_dtype(compute_dtype)
    plan = Plan("decompress", [], compute)
    for name, spec in dk.tensors.items():
        if PART_SEP not in name:
            plan.ops.append(TensorOp(name, spec.shape, spec.dtype, "delta", plus=Term(dk, spec)))
        elif is_residual_part(name):  # the exact residual of a tensor kept exact: kept, byte for byte
            plan.ops.append(TensorOp(name, spec.shape, spec.dtype, "copy", base=Term(dk, spec)))
    for name, rec in comp["tensors"].items():
        if rec.get("method") not in METHODS:
            continue
        parts = part_names(name, rec["method"])
        if rec["method"] == "lowrank":
            out_dtype = compute  # B·A as computed: not representable in a narrower dtype
        elif rec["method"] == "sparse":
            out_dtype = dk.tensors[parts["values"]].dtype
        else:  # ±α with α float32: exact in float32 and wider
            out_dtype = parse_dtype(rec["dtype"]) if parse_dtype(rec["dtype"]).itemsize >= 4 else torch.float32
        op = TensorOp(name, tuple(rec["shape"]), out_dtype, "delta")
        compressed_term(op, dk, name, rec)
        plan.ops.append(op)
    output = Path(output)
    entries = [OutEntry(op.name, op.out_dtype, op.shape) for op in plan.ops]
    with atomic_output_dir(output, overwrite=overwrite, inputs=[dk.dir]) as tmp:
        src = dk.dir / "source_finetuned"
        if src.is_dir():
            shutil.copytree(src, tmp / "source_finetuned")
        writer = ShardedWriter(tmp, entries, parse_size("5GB"), metadata={"producer": f"deltaport {deltaport.__version__}"})
        execute(plan, writer)
        writer.finalize()
        new = {k: v for k, v in dk.provenance.items() if k != "compression"}
        new.update(operation="decompress", decompressed_from={"source": dk.source, "method": comp["method"],
                                                               "params": comp["params"], "seed": comp["seed"]})
        (tmp / PROVENANCE_NAME).write_text(json.dumps(new, indent=2, sort_keys=True, default=str) + "\n")
    return output


def export_peft(delta, output, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the low-rank tensors of a ``lowrank`` compressed delta as a PEFT LoRA adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``): ``lora_A`` = A, ``lora_B`` = B, ``lora_alpha`` = r
    (scaling 1), so PEFT's merge and ``deltaport transfer --source-finetuned ADAPTER`` add B·A.

    Only the low-rank matrices of linear layers are in the adapter: the Δ of the tensors kept exact (norms,
    biases) and of vocabulary tensors (PEFT stores embedding factors in another layout) is not, which the
    returned record (also ``export.json`` in the adapter) lists. Every
    matrix must have the same rank (a rank above a matrix's smaller side gives it a smaller one: compress
    with a rank at most every matrix's smaller side)."""
    from safetensors.torch import save_file

    dk = open_checkpoint(delta)
    comp = compression_record(dk)
    if comp is None or comp.get("method") != "lowrank":
        raise InputError(f"{dk.source} is not a low-rank compressed delta; make one with "
                         "`deltaport compress DELTA -o OUT --method lowrank --rank R`")
    low = {n: r for n, r in comp["tensors"].items() if r.get("method") == "lowrank" and not is_vocab_tensor(n)}
    ranks = {r["rank"] for r in low.values()}
    if len(ranks) != 1:
        raise InputError(f"{dk.source}: the matrices have ranks {sorted(ranks)}; a PEFT adapter here needs one rank. "
                         f"Compress with --rank at most {min(min(r['shape']) for r in low.values())}")
    bad = [n for n in low if not n.endswith(".weight")]
    if bad:
        raise InputError(f"{dk.source}: {bad[0]} is not a module weight; it cannot be a LoRA target")
    r = ranks.pop()
    tensors = {}
    for name in sorted(low):
        parts = part_names(name, "lowrank")
        mod = name[: -len(".weight")]
        tensors[f"base_model.model.{mod}.lora_A.weight"] = dk.tensor(parts["A"]).contiguous()
        tensors[f"base_model.model.{mod}.lora_B.weight"] = dk.tensor(parts["B"]).contiguous()
    targets = sorted({n[: -len(".weight")].rsplit(".", 1)[-1] for n in low})
    left = {n: rec.get("reason", "") for n, rec in comp["tensors"].items() if rec.get("method") == "exact"}
    left.update({n: "vocabulary tensor: low rank in the delta, but PEFT keeps embedding factors in another layout "
                    "(lora_embedding_A/B); apply the compressed delta for it" for n, rec in comp["tensors"].items()
                 if rec.get("method") == "lowrank" and is_vocab_tensor(n)})
    prov = dk.provenance or {}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
           "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "base_model_name_or_path": (prov.get("base") or {}).get("source"), "inference_mode": True}
    record = {"deltaport_version": deltaport.__version__, "operation": "export-peft", "source_delta": dk.source,
              "rank": r, "tensors": sorted(low), "not_in_adapter": left}
    with atomic_output_dir(Path(output), overwrite=overwrite, inputs=[dk.dir]) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
