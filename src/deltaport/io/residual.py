"""The exact residual of a stored Δ (docs/FORMAT.md, "Δ dtype"): where ``diff``'s default float32 (for
16-bit models) or float64 (for float32 models) cannot hold f − b exactly, the difference r = (f − b) − Δ
is kept beside it, so that Δ + r is the exact f − b and ``apply`` adds both.

r is exactly a float64 (see :func:`residual_of`), and rare (a fine-tuned value that nearly cancels its
base: 21 of 134.5 M elements of SmolLM2 left a float32 Δ that does not even round back), so it is
stored sparsely, in the compressed format's ``sparse`` layout: for each tensor ``NAME`` that has one,
``NAME@residual.mask`` (uint8, element i at bit i % 8 of byte i // 8) and ``NAME@residual.values``
(float64, the nonzero r in element order), in one extra file, ``delta-residual.safetensors``, which the
``model.safetensors.index.json`` lists with the Δ's own shards. ``deltaport.json:exact_residual`` records
the file and, per tensor, how many elements have a residual. A delta without residuals (most) has
exactly the layout it had before.

Names only at import (planning an apply reads them without torch); the arithmetic and the writing
import torch when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltaport.errors import PlanError

RESIDUAL_FILE = "delta-residual.safetensors"
RECORD = "exact_residual"  # deltaport.json key


def residual_parts(name: str) -> dict[str, str]:
    """Role (``mask``, ``values``) -> stored tensor name of ``name``'s residual."""
    return {r: f"{name}@residual.{r}" for r in ("mask", "values")}


def is_residual_part(name: str) -> bool:
    return name.endswith(("@residual.mask", "@residual.values"))


def residual_record(ck) -> dict[str, int]:
    """Tensor name -> number of residual elements of the delta ``ck`` ({} for none); refuses a record whose
    parts are missing (a damaged or hand-edited delta)."""
    rec = (ck.provenance or {}).get(RECORD)
    if not rec:
        return {}
    tensors = rec.get("tensors") if isinstance(rec, dict) else None
    if not isinstance(tensors, dict):
        raise PlanError(f"{ck.dir}/deltaport.json: '{RECORD}' is malformed; it was edited or damaged. Recreate the "
                        "delta with `deltaport diff`.")
    for name in tensors:
        for part in residual_parts(name).values():
            if part not in ck.tensors:
                raise PlanError(f"{ck.dir}: the exact residual of {name} lacks its part {part}; the delta is incomplete. "
                                "Recreate it with `deltaport diff`.")
    return dict(tensors)


# --------------------------------------------------------------------------------------------------
# arithmetic (torch)

def residual_of(f, b, s, hi):
    """r = (f − b) − hi, exactly, element-wise, in float64.

    ``f``, ``b``: the fine-tuned and base values (float64 holding float32-or-narrower values); ``s``: the
    float64 difference fl(f − b); ``hi``: the stored Δ (fl(s) in its dtype). Returns ``(r, ok)``: ``ok`` is
    False where r is not exact (not expected; counted as inexact by the caller).

    f − b = s + e exactly, with e from Knuth's TwoSum; s − hi is exact (hi is s rounded to fewer bits). So
    r = (s − hi) + e, and that last sum is exact whenever one of its terms is 0, which is the case except
    where s itself is inexact and also has bits below hi's precision; there TwoSum says whether it was."""
    import torch

    bv = s - f
    e = (f - (s - bv)) - (b + bv)  # TwoSum(f, −b): f − b = s + e exactly
    d = s - hi.to(torch.float64)
    r = d + e
    ok = torch.ones_like(r, dtype=torch.bool)
    both = (d != 0) & (e != 0)
    if bool(both.any()):
        rv = r - d
        err = (d - (r - rv)) + (e - rv)  # TwoSum(d, e)
        ok = ~(both & (err != 0))
    return r, ok


# --------------------------------------------------------------------------------------------------
# writing (after the Δ's shards: the residuals are known only once every chunk was computed)

def write_residuals(out_dir: Path, residuals: dict[str, list], numels: dict[str, int], weight_map: dict[str, str],
                    data_bytes: int) -> dict[str, Any]:
    """Write ``RESIDUAL_FILE`` and the index that lists it with the Δ's shards (``weight_map``: tensor -> shard,
    ``data_bytes``: their tensor bytes). ``residuals``: tensor -> list of (flat indices int64, values float64)
    chunks in any order. Returns the ``exact_residual`` record."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from deltaport.io.checkpoint import INDEX_NAME

    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name in sorted(residuals):
        idx = torch.cat([i for i, _ in residuals[name]])
        vals = torch.cat([v for _, v in residuals[name]])
        if not len(idx):
            continue
        order = torch.argsort(idx)
        idx, vals = idx[order], vals[order]
        bits = np.zeros((numels[name] + 7) // 8, dtype=np.uint8)
        ii = idx.numpy()
        np.bitwise_or.at(bits, ii >> 3, (1 << (ii & 7)).astype(np.uint8))
        parts = residual_parts(name)
        tensors[parts["mask"]] = torch.from_numpy(bits)
        tensors[parts["values"]] = vals.to(torch.float64).contiguous()
        counts[name] = int(len(idx))
    if not tensors:
        return {}
    path = out_dir / RESIDUAL_FILE
    # one metadata key: safetensors serialises its metadata map in a per-process random order, so two keys
    # made the file's bytes differ between runs of the same diff (the producer is in deltaport.json anyway)
    save_file(tensors, str(path), metadata={"format": "pt"})
    wm = dict(weight_map)
    wm.update({n: RESIDUAL_FILE for n in tensors})
    total = data_bytes + sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return {"file": RESIDUAL_FILE, "tensors": counts, "elements": sum(counts.values())}


def with_residual(ck, name: str, delta):
    """``delta`` (the stored Δ ``name`` of the delta ``ck``, any float dtype) plus its exact residual, in
    float64 (the sum is rounded where f − b needs more than float64's 53 bits); ``delta`` as float64 when
    ``name`` has none."""
    import torch

    from deltaport.io.compressed_format import unpack_bits

    x = delta.to(torch.float64)
    if name not in residual_record(ck):
        return x
    parts = residual_parts(name)
    mask = unpack_bits(ck.tensor(parts["mask"]), 0, x.numel())
    flat = x.reshape(-1).clone()
    flat[mask] += ck.tensor(parts["values"]).to(torch.float64)
    return flat.view(x.shape)
