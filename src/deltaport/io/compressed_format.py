"""Names of the compressed delta format (version 1, docs/FORMAT.md), without torch at import: planning an
apply reads them from headers and ``deltaport.json`` only. The bit packing of masks and signs (used when a
delta is written and when it is applied) imports numpy and torch when called."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from deltaport.errors import PlanError

FORMAT_NAME = "deltaport-compressed-delta"
FORMAT_VERSION = 1
METHODS = ("lowrank", "sparse", "sign")
PART_SEP = "@"


def _installed_version() -> str:
    try:
        return version("deltaport")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown version"


def pack_bits(mask):
    """bool [N] -> uint8 [ceil(N/8)], element i at bit i % 8 of byte i // 8."""
    import numpy as np
    import torch

    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed, start: int, n: int):
    """Bits [start, start + n) of a packed uint8 tensor, as a bool tensor."""
    import numpy as np
    import torch

    b0, b1 = start // 8, (start + n + 7) // 8
    bits = np.unpackbits(packed[b0:b1].numpy(), bitorder="little")
    off = start - 8 * b0
    return torch.from_numpy(bits[off:off + n].astype(bool))


def part_names(name: str, method: str) -> dict[str, str]:
    """Role -> stored tensor name of a compressed tensor's parts."""
    roles = {"lowrank": ("A", "B"), "sparse": ("mask", "values"), "sign": ("bits", "scale")}[method]
    return {r: f"{name}{PART_SEP}{method}.{r}" for r in roles}


def compression_record(ck) -> dict[str, Any] | None:
    """The ``compression`` record of a delta directory (None for an exact delta); refuses unknown versions."""
    comp = (ck.provenance or {}).get("compression")
    if comp is None:
        return None
    if not isinstance(comp, dict) or comp.get("format") != FORMAT_NAME or not isinstance(comp.get("tensors"), dict):
        raise PlanError(f"{ck.dir}/deltaport.json: 'compression' is malformed; it was edited or damaged. Recreate the "
                        "delta with `deltaport compress`.")
    if comp.get("version") != FORMAT_VERSION:
        raise PlanError(f"{ck.dir} is a compressed delta of format version {comp.get('version')!r}; this deltaport "
                        f"({_installed_version()}) reads version {FORMAT_VERSION}. Upgrade deltaport.")
    for name, rec in comp["tensors"].items():
        if rec.get("method") in METHODS:
            for part in part_names(name, rec["method"]).values():
                if part not in ck.tensors:
                    raise PlanError(f"{ck.dir}: compressed tensor {name} lacks its part {part}; the delta is incomplete. "
                                    "Recreate it with `deltaport compress`.")
    return comp
