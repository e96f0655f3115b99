"""``inspect``: what a model or delta directory holds, from headers only."""

from __future__ import annotations

from collections import Counter
from typing import Any

from deltaport.io.checkpoint import open_checkpoint
from deltaport.options import INSPECT, InspectOptions, declared


@declared(InspectOptions)
def inspect(path, *, allow_pickle: bool = INSPECT.allow_pickle, tensors: bool = True) -> dict[str, Any]:
    """Describe a checkpoint: kind, files, tensor count/bytes by dtype, config summary, provenance.

    ``path``: a model or delta directory, or a hub id (read by HTTP range requests, without downloading its
    weights). Reads headers only. ``tensors``: include the per-tensor list (name, dtype, shape, file).
    """
    ck = open_checkpoint(path, allow_pickle=allow_pickle, remote=True)
    by_dtype: Counter = Counter()
    bytes_by_dtype: Counter = Counter()
    for s in ck.tensors.values():
        by_dtype[s.dtype_name] += 1
        bytes_by_dtype[s.dtype_name] += s.nbytes
    cfg = ck.config or {}
    info: dict[str, Any] = {
        "path": str(ck.dir),
        "source": ck.source,
        "kind": ck.kind,
        "revision": ck.revision,
        "files": [f.name for f in ck.files],
        "num_tensors": len(ck.tensors),
        "total_bytes": ck.total_bytes(),
        "num_parameters": sum(s.numel for s in ck.tensors.values()),
        "dtypes": {k: {"tensors": by_dtype[k], "bytes": bytes_by_dtype[k]} for k in sorted(by_dtype)},
        "structure_signature": ck.structure_signature(),
        "config": {k: cfg.get(k) for k in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                                          "tie_word_embeddings", "rope_theta", "rope_scaling", "max_position_embeddings")
                   if k in cfg} if cfg else None,
        "lora": ck.lora,
        "provenance": ck.provenance,
        "compression": _compression_summary(ck.provenance),
    }
    if tensors:
        info["tensors"] = [{"name": s.name, "dtype": s.dtype_name, "shape": list(s.shape), "file": s.file.name}
                           for s in ck.tensors.values()]
    return info


def _compression_summary(prov) -> dict[str, Any] | None:
    """Format, version, method, parameters, seed and byte totals of a compressed delta (None otherwise)."""
    comp = (prov or {}).get("compression") if isinstance(prov, dict) else None
    if not isinstance(comp, dict):
        return None
    return {k: comp.get(k) for k in ("format", "version", "method", "params", "seed", "totals")}
