"""What a delta's ``deltaport.json`` promises, checked before it is applied: it is a delta, the fields
apply relies on have the types ``diff`` writes, and the target has the structure the delta was made on."""

from __future__ import annotations

from pathlib import Path

from deltaport.errors import PlanError
from deltaport.io.checkpoint import Checkpoint


def check_delta_provenance(delta: Checkpoint) -> dict:
    """The delta's provenance, once it is known to be a deltaport delta whose recorded fields have the
    types ``diff`` writes; a :class:`PlanError` naming the fix otherwise."""
    provenance = delta.provenance or {}
    if provenance.get("kind") != "delta":
        raise PlanError(f"{delta.dir} is not a deltaport delta (no deltaport.json with kind 'delta'); "
                        "create one with `deltaport diff --base B --finetuned F -o DELTA`")
    _check_field_types(delta.dir, provenance)
    return provenance


def _check_field_types(where: Path, provenance: dict) -> None:
    """The fields of a delta's deltaport.json that apply relies on have the types ``diff`` writes."""
    problems = []
    base = provenance.get("base", {})
    if not isinstance(base, dict):
        problems.append("'base' is not an object")
        base = {}
    tensors = base.get("tensors", {})
    if not isinstance(tensors, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], list) for v in tensors.values()):
        problems.append("'base.tensors' does not map tensor names to [dtype, shape]")
    if not isinstance(base.get("structure"), (str, type(None))):
        problems.append("'base.structure' is not a string")
    if not isinstance(provenance.get("policies", {}), dict):
        problems.append("'policies' is not an object")
    if problems:
        raise PlanError(f"{where}/deltaport.json is malformed ({'; '.join(problems)}); it was edited or damaged. "
                        "Recreate the delta with `deltaport diff`.")


def differences_from_recorded_base(provenance: dict, tb: Checkpoint) -> list[str]:
    """How the target differs from the base the delta recorded (missing tensors, other dtype or shape, extra
    tensors); empty when its structure signature matches or none was recorded."""
    recorded = provenance.get("base", {}).get("tensors", {})  # name -> [dtype, shape]
    want_signature = provenance.get("base", {}).get("structure")
    got_signature = tb.structure_signature()
    differences: list[str] = []
    if want_signature and want_signature != got_signature:
        for n, (dtype, shape) in recorded.items():
            if n not in tb.tensors:
                differences.append(f"{n} missing from target")
            elif list(tb.tensors[n].shape) != list(shape) or tb.tensors[n].dtype_name != dtype:
                differences.append(f"{n}: delta recorded {dtype} {shape}, target has {tb.tensors[n].dtype_name} "
                                   f"{list(tb.tensors[n].shape)}")
        for n in tb.tensors:
            if n not in recorded:
                differences.append(f"{n} in target but not in the delta's base")
        if not differences:
            differences.append("structure signature differs")
    return differences
