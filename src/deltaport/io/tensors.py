"""Tensors as a safetensors header describes them: dtype names (torch dtypes are made from them only
where bytes are touched), :class:`TensorSpec` (where one tensor lives: file, dtype, shape, byte range),
and the check of one file's header, shared by local files (:func:`read_safetensors_header`, validated
by the safetensors library too) and hub files read by range requests (:func:`parse_header`).

Headers only: the JSON is read with plain ``json`` (never pickle/eval) and nothing here imports torch
until a torch dtype is asked for. Resolving a checkpoint (directory, index, hub, pickles) is
:mod:`deltaport.io.checkpoint`; the bytes of a tensor are :mod:`deltaport.io.reader`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaport.errors import CheckpointError, InputError

# Dtypes are known by name (torch's spelling: "bfloat16", "float8_e4m3fn", ...) from the header on;
# torch dtypes are made from the names only where tensor bytes are touched (:func:`torch_dtype`), so
# that header-only work (inspect, planning, a plan that fails) never imports torch.

#: safetensors dtype code -> dtype name
ST_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
NAME_TO_ST: dict[str, str] = {v: k for k, v in ST_DTYPE_NAMES.items()}
FLOAT_DTYPE_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
#: bytes per element, by dtype name
DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}

def __getattr__(name: str):
    """``ST_DTYPES``, ``TORCH_TO_ST`` and ``FLOAT_DTYPES`` (torch dtypes) import torch when first used."""
    if name in ("ST_DTYPES", "TORCH_TO_ST", "FLOAT_DTYPES"):
        torch_of_code = {k: torch_dtype(v) for k, v in ST_DTYPE_NAMES.items()}
        table = {"ST_DTYPES": torch_of_code, "TORCH_TO_ST": {v: k for k, v in torch_of_code.items()},
                 "FLOAT_DTYPES": {torch_dtype(n) for n in FLOAT_DTYPE_NAMES}}
        globals().update(table)
        return table[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dt) -> str:
    """The name of a dtype (``"bfloat16"``), from a torch dtype or a name; imports nothing."""
    return dt if isinstance(dt, str) else str(dt).replace("torch.", "")


def torch_dtype(dt):
    """The torch dtype of a name (or a torch dtype, returned as is): the one place names become torch dtypes."""
    if not isinstance(dt, str):
        return dt
    import torch

    try:
        return getattr(torch, dt)
    except AttributeError:
        raise CheckpointError(f"dtype {dt!r} is not known to this torch version") from None


def dtype_size(dt) -> int:
    """Bytes per element of a dtype (name or torch dtype); torch is asked only for a dtype safetensors lacks."""
    size = DTYPE_SIZES.get(dtype_name(dt))
    if size is None:
        import torch

        size = torch.empty((), dtype=torch_dtype(dt)).element_size()
    return size


_DTYPE_WORDS = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp64": "float64",
                "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def parse_dtype_name(name: str) -> str:
    """The dtype name a user's spelling means (``bf16`` -> ``bfloat16``); no torch import. An unknown
    spelling is a usage error (:class:`InputError`, exit 2)."""
    try:
        return _DTYPE_WORDS[str(name).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; use one of float32, float64, bfloat16, float16") from None


def parse_dtype(value):
    """The torch dtype a user's spelling means (``bf16`` -> ``torch.bfloat16``); a torch dtype is returned
    as is. An unknown spelling is a usage error (:class:`InputError`, exit 2)."""
    if not isinstance(value, str):
        import torch

        if isinstance(value, torch.dtype):
            return value
    return torch_dtype(parse_dtype_name(value))


class DtypeField:
    """A dataclass field that holds a dtype by name: set with a name or a torch dtype, read as a torch
    dtype (torch is imported then). ``<field>_name`` reads the name and imports nothing."""

    def __set_name__(self, owner, name: str) -> None:
        self.key = f"{name}_name"

    def __get__(self, obj, owner=None):
        if obj is None:  # no class-level default: the dataclass field stays required
            raise AttributeError(self.key)
        return torch_dtype(obj.__dict__[self.key])

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.key] = dtype_name(value)


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """Where one tensor lives: file, dtype, shape and absolute byte range.

    ``dtype`` is given as a name or a torch dtype and read back as a torch dtype; ``dtype_name``
    (``"bfloat16"``) is what header-only work uses."""

    name: str
    file: Path
    dtype: Any = DtypeField()  # type: ignore[assignment]  # required (the descriptor gives no default)
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in ``file``
    end: int

    def _key(self) -> tuple:
        return (self.name, self.file, self.dtype_name, self.shape, self.start, self.end)

    def __eq__(self, other) -> bool:
        return self._key() == other._key() if isinstance(other, TensorSpec) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"TensorSpec(name={self.name!r}, file={self.file!r}, dtype={self.dtype_name}, shape={self.shape!r}, "
                f"start={self.start}, end={self.end})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Validate ``path`` with the safetensors library and return (header dict, data start offset)."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read shard {path}: {exc}") from None
    if not path.is_file():
        raise CheckpointError(f"shard {path} is not a regular file (a directory, device or pipe); replace it with the "
                              "real safetensors file")
    if size < 8:
        raise CheckpointError(f"shard {path} is truncated ({size} bytes; a safetensors file starts with an "
                              "8-byte header length). Re-download the file.")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read shard {path}: {exc}") from None
    with f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"shard {path}: header length {n} runs past the end of the file ({size} bytes); "
                                  "the file is truncated or not a safetensors file. Re-download it.")
        if n > 100_000_000:
            raise CheckpointError(f"shard {path}: header length {n} is implausibly large; the file is corrupt.")
        raw = f.read(n)
    _check_not_truncated(path, raw, 8 + n, size)
    try:  # the library is the authority on validity (offsets, overlaps, dtypes, sizes)
        with safe_open(str(path), framework="numpy") as sf:  # "pt" would import torch; only keys are read
            lib_keys = set(sf.keys())
    except SafetensorError as exc:
        raise CheckpointError(f"shard {path} is not a valid safetensors file: {exc}. Re-download or "
                              "re-export this shard.") from None
    except Exception as exc:  # noqa: BLE001 - anything the binding raises on a broken file
        raise CheckpointError(f"shard {path} could not be opened by safetensors: {exc}") from None
    header = parse_header(raw, 8 + n, size, path)
    if set(k for k in header if k != "__metadata__") != lib_keys:
        raise CheckpointError(f"shard {path}: header does not match what safetensors reads; the file is corrupt")
    return header, 8 + n


def parse_header(raw: bytes, data_start: int, size: int, where) -> dict[str, Any]:
    """The JSON header ``raw`` of safetensors file ``where`` (``size`` bytes, -1 when unknown; its data
    starts at ``data_start``), checked without the file: a JSON object whose every tensor has a known
    dtype, a shape and a byte range of exactly that size, inside the file. Local files are also
    validated by the safetensors library; hub files (planned from their header alone) only here."""
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"shard {where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {where}: header is not a JSON object; the file is corrupt")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            s, e = (int(x) for x in info["data_offsets"])
            want = math.prod(int(d) for d in info["shape"]) * DTYPE_SIZES[ST_DTYPE_NAMES[info["dtype"]]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {where}: tensor {name!r} has a malformed header entry {info!r}") from None
        if e - s != want or s < 0:
            raise CheckpointError(f"shard {where}: tensor {name!r} spans {e - s} bytes but its dtype and shape need {want}")
        if size >= 0 and data_start + e > size:
            raise CheckpointError(f"shard {where}: tensor {name!r} ends at byte {data_start + e} past the end of the "
                                  f"file ({size} bytes); the shard is truncated. Re-download it.")
    return header


def _check_not_truncated(path: Path, raw: bytes, data_start: int, size: int) -> None:
    """Name a truncated shard as such (the safetensors library only says the header is invalid).

    Best effort on a header that parses; anything malformed is left to the library's validation."""
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except Exception:  # noqa: BLE001 - malformed headers are reported by safe_open below
        return
    if ends and data_start + max(ends) > size:
        raise CheckpointError(f"shard {path} is truncated: its header needs {data_start + max(ends)} bytes, the file has "
                              f"{size}. The download or copy was cut short - re-download this shard.")
