"""The options a planner obeys: λ and its per-tensor map, the vocabulary/shape policies, key maps,
include/exclude filters (maps given as YAML files or dicts), and the dtypes they choose (compute dtype,
output dtype, stored Δ dtype). Validated once, before any checkpoint is read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaport.errors import InputError

if TYPE_CHECKING:  # annotations only: planning must not import torch (header-only paths)
    import torch

VOCAB_POLICIES = ("error", "pad", "align")
UNMATCHED_ROWS = ("target", "finetuned")
SHAPE_POLICIES = ("error", "skip")


@dataclass
class Policies:
    """The validated options of one planned operation (build it with :func:`make_policies`)."""

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
        for pattern, scale in self.scale_map:
            if pattern.search(name):
                return scale
        return self.scale

    def selected(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def map_key(self, name: str) -> str:
        for pattern, replacement in self.key_map:
            if pattern.search(name):
                return pattern.sub(replacement, name)
        return name

    def output_dtype_for(self, default: str) -> str:
        """The output dtype's name for a tensor whose own dtype is ``default`` (planning compares dtypes by
        name, without torch)."""
        if self.out_dtype in (None, "", "auto", "target"):
            return default
        from deltaport.io.tensors import parse_dtype_name

        return parse_dtype_name(self.out_dtype)


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
    key_map_read = _load_yaml(key_map, "--key-map") if isinstance(key_map, (str, Path)) else key_map
    scale_map_read = _load_yaml(scale_map, "--scale-map") if isinstance(scale_map, (str, Path)) else scale_map
    if key_map_read is not None and not isinstance(key_map_read, dict):
        raise InputError("--key-map must be a YAML mapping {target_regex: source_replacement}")
    if scale_map_read is not None and not isinstance(scale_map_read, dict):
        raise InputError("--scale-map must be a YAML mapping {regex: scale}")
    scale_items = []
    for k, v in (scale_map_read or {}).items():
        try:
            scale_items.append((_compile(str(k), "--scale-map"), float(v)))
        except (TypeError, ValueError):
            raise InputError(f"--scale-map: scale for {k!r} must be a number, got {v!r}") from None
    policies = Policies(
        scale=float(scale), vocab_policy=vocab_policy, shape_policy=shape_policy, unmatched_rows=unmatched_rows,
        key_map=[(_compile(str(k), "--key-map"), str(v)) for k, v in (key_map_read or {}).items()],
        include=[_compile(r, "--include") for r in include or []],
        exclude=[_compile(r, "--exclude") for r in exclude or []],
        scale_map=scale_items, compute_dtype=compute_dtype, out_dtype=out_dtype,
    )
    policies.validate()
    return policies


def choose_compute_dtype(policy: str) -> str:
    """The compute dtype's name (a plan's ``compute_dtype`` takes names; no torch import). ``auto`` is float64. float32 arithmetic is not exact for the identities: when a fine-tuned value
    nearly cancels its base value (|F| < 2^-16·|B| for bf16), ``b + fl32(a - b)`` rounds to a neighbour
    of ``a``; random tests hit that in ~4 of a million elements. In float64 the difference of two
    16/32-bit floats is exact unless their exponents differ by more than ~29-45, so ``transfer`` onto
    the source base reproduces the fine-tuned model and λ = 0 reproduces the target bit for bit. The
    cost is ~15 % slower arithmetic; ``float32`` is offered for speed."""
    return "float32" if policy == "float32" else "float64"


def delta_dtype_for(inputs: set, requested: str | None) -> str:
    """Stored Δ dtype's name: float32 for 16-bit inputs, float64 for float32 inputs, by default (with the
    exact residual where they cannot hold f − b, docs/FORMAT.md); ``inputs``: dtype names or torch dtypes."""
    from deltaport.io.tensors import dtype_name, parse_dtype_name

    if requested not in (None, "", "auto"):
        return parse_dtype_name(requested)
    return "float64" if {dtype_name(d) for d in inputs} & {"float32", "float64"} else "float32"
