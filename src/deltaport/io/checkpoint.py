"""One resolver for every checkpoint layout: local dir or hub id; single or sharded safetensors;
pickled ``.bin`` (opt-in); PEFT LoRA adapters; deltaport delta dirs.

Only headers are read here (plus :func:`read_tensor`, one whole tensor through :mod:`deltaport.io.reader`,
for callers that need a tensor's values, and pickled files, which can only be read whole). Each
safetensors file's header is read and checked by :mod:`deltaport.io.tensors` (dtype names,
:class:`~deltaport.io.tensors.TensorSpec`, the header check); this module finds the files (index,
single file, adapter, hub repository, pickles) and puts their tensors together. Errors name the file
and what to do.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import CheckpointError
from deltaport.io.compressed_format import PART_SEP
from deltaport.io.tensors import ST_DTYPE_NAMES, TensorSpec, dtype_name, parse_header, read_safetensors_header

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROVENANCE_NAME = "deltaport.json"


@dataclass
class Checkpoint:
    """A model (or delta) checkpoint, known from its headers only."""

    dir: Path
    source: str  # what the user passed (path or hub id)
    kind: str  # "safetensors" | "pickle" | "lora" | "delta"
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    config: dict[str, Any] | None = None
    revision: str | None = None
    provenance: dict[str, Any] | None = None  # deltaport.json for delta dirs
    lora: dict[str, Any] | None = None  # adapter_config for LoRA adapters
    hub: Any = None  # deltaport.io.hub.HubRepo when planned from the hub (weights downloaded after the plan)
    _memory: dict[str, Any] | None = None  # pickled checkpoints are loaded into memory
    content_sha256: str | None = field(default=None, repr=False, compare=False)  # set by StreamedHash.finish

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in {self.source}") from None

    @property
    def in_memory(self) -> bool:
        """True when the tensors were loaded into memory (a pickled checkpoint), not read from safetensors."""
        return self._memory is not None

    def tensor(self, name: str):
        """Read one whole tensor (a copy)."""
        spec = self.spec(name)
        if self._memory is not None:
            return self._memory[name].clone()
        return read_tensor(spec)

    def memory_tensor(self, name: str):
        return None if self._memory is None else self._memory[name]

    def structure_signature(self) -> str:
        """sha256 over sorted (name, dtype, shape): what ``apply`` checks a target against."""
        return structure_signature({n: (s.dtype_name, s.shape) for n, s in self.tensors.items()})

    def header_fingerprint(self) -> dict[str, Any]:
        files = {}
        for f in self.files:
            size = self.hub.sizes.get(f.name) if self.hub is not None and not f.exists() else f.stat().st_size
            files[f.name] = {"size": size}
        return {"structure": self.structure_signature(), "files": files, "num_tensors": len(self.tensors)}

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())


def read_tensor(spec: TensorSpec):
    """One whole tensor, read from its file into a new tensor (torch is imported here)."""
    import torch

    from deltaport.io.reader import FilePool, pread_into

    buf = torch.empty(spec.nbytes, dtype=torch.uint8)
    with FilePool() as pool:
        if spec.nbytes:
            pread_into(pool.fd(spec.file), buf, spec.start, spec.nbytes, f"{spec.file}:{spec.name}")
    return buf.view(spec.dtype).reshape(spec.shape) if spec.nbytes else torch.empty(spec.shape, dtype=spec.dtype)


def structure_signature(entries: dict[str, tuple[Any, tuple[int, ...]]]) -> str:
    """sha256 over sorted (name, dtype, shape); dtypes as names or torch dtypes."""
    h = hashlib.sha256()
    for name in sorted(entries):
        dt, shape = entries[name]
        h.update(f"{name}\0{dtype_name(dt)}\0{list(shape)}\n".encode())
    return h.hexdigest()


def content_hash(path: str | Path, *, allow_pickle: bool = False) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): what caches key on.

    Independent of sharding and header layout: the same weights give the same hash.
    """
    ck = open_checkpoint(path, allow_pickle=allow_pickle)
    if ck._memory is not None:
        import torch

        h = hashlib.sha256()
        for name in sorted(ck.tensors):
            spec = ck.tensors[name]
            h.update(_hash_line(name, spec))
            t = ck._memory[name].contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
    return StreamedHash(ck).finish()


def _hash_line(name: str, spec: TensorSpec) -> bytes:
    return f"{name}\0{spec.dtype_name}\0{list(spec.shape)}\n".encode()


class StreamedHash:
    """:func:`content_hash` of a local safetensors checkpoint, fed with the bytes a run reads anyway.

    The hash is sequential over the tensors in name order, so it takes a read only where it continues
    the stream (this tensor, this byte offset); the engine reads a uniform-dtype model in that order
    (shards hold tensors by item size, then name). The parts of a deltaport Δ that the engine reads whole
    rather than in chunks (names with ``@``: a Δ's exact residual, ``X@residual.mask``; a compressed Δ's
    factors, masks and signs) are read from the file when the stream reaches them, so that they never stop
    it: they are small, and what follows them is still taken from the engine's reads. :meth:`finish` reads
    whatever else was not fed in order, so the value is :func:`content_hash`'s whatever the order (``reread``
    says how much). A hash remembered for these very files (:mod:`deltaport.io.hashmemo`) is not computed
    again (``known``): the feeds are ignored; a computed one is remembered by :meth:`finish`."""

    def __init__(self, ck: Checkpoint):
        from deltaport.io.hashmemo import Memo

        self.ck = ck
        self.order = sorted(ck.tensors)
        self.h = hashlib.sha256()
        self.i, self.off = 0, 0
        self.reread = 0
        self._lock = threading.Lock()
        self.memo = Memo.begin(spec.file for spec in ck.tensors.values())
        self.known = self.memo.get() if self.memo is not None else None  # remembered: nothing to hash
        if self.known is not None:
            self.i = len(self.order)
        self._next_tensor(advance=False)

    def _next_tensor(self, *, advance: bool = True) -> None:
        """Move to the next tensor (``advance``) and hash the header lines up to one with bytes."""
        if advance:
            self.i, self.off = self.i + 1, 0
        while self.i < len(self.order):
            spec = self.ck.tensors[self.order[self.i]]
            self.h.update(_hash_line(spec.name, spec))
            if spec.nbytes and PART_SEP not in spec.name:
                return
            if spec.nbytes:  # a part read whole by the engine, at its own time: hashed from the file now
                self._read_rest(spec)
            self.i += 1

    def feed(self, spec: TensorSpec, offset: int, data) -> None:
        """``data`` (a buffer of bytes) was read from ``spec``'s tensor at byte ``offset``."""
        with self._lock:
            if self.i >= len(self.order) or spec.name != self.order[self.i] or offset != self.off:
                return
            mine = self.ck.tensors[spec.name]
            if spec.start != mine.start or spec.file.name != mine.file.name:
                return
            view = memoryview(data).cast("B")[: mine.nbytes - self.off]
            self.h.update(view)
            self.off += len(view)
            if self.off == mine.nbytes:
                self._next_tensor()

    def finish(self) -> str:
        """The hash: what was not fed in order is read from the files now."""
        with self._lock:
            if self.known is not None:
                return self.known
            while self.i < len(self.order):
                self._read_rest(self.ck.tensors[self.order[self.i]])
                self._next_tensor()
            self.known = self.h.hexdigest()
            if self.memo is not None:
                self.memo.put(self.known)
            return self.known

    def _read_rest(self, spec: TensorSpec) -> None:
        """Hash ``spec``'s bytes from ``self.off`` on, read from its file."""
        with open(spec.file, "rb") as f:
            f.seek(spec.start + self.off)
            left = spec.nbytes - self.off
            while left:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise CheckpointError(f"{spec.file} ended early while reading {spec.name!r}")
                self.h.update(chunk)
                left -= len(chunk)
                self.reread += len(chunk)


# --------------------------------------------------------------------------------------------------
# resolution


def resolve_dir(source: str | Path, *, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory, or a hub id (``org/name`` or ``org/name@rev``) downloaded whole (small files and
    safetensors) at the commit the revision names now. Returns (directory, commit sha or None).

    Hub ids work from the local cache with ``HF_HUB_OFFLINE=1``. Commands that only need headers first
    use :func:`open_checkpoint` with ``remote=True``, which downloads no weights."""
    from deltaport.io import hub

    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        return p, None
    require_dir_or_hub_id(s, p)
    repo_id, rev = hub.split_ref(s, revision)
    if hub.offline():
        return hub.snapshot_offline(repo_id, rev, s)
    repo = hub.pin(repo_id, rev)
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=repo_id, revision=repo.sha, allow_patterns=hub.OFFLINE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (network, auth)
        raise CheckpointError(f"cannot download hub id {s!r} at {repo.sha}: {type(exc).__name__}: {exc}; check your "
                              "network and HF_TOKEN for gated models") from None
    return path, repo.sha


def require_dir_or_hub_id(s: str, p: Path) -> None:
    """``s`` (path ``p``) is not an existing directory: refuse a file, or a mistyped local path, before
    any hub look-up (only a string of the hub's ``org/name[@rev]`` shape goes on to the hub)."""
    from deltaport.io import hub

    if p.exists():
        raise CheckpointError(f"{s} is a file; pass the model directory that contains it")
    if hub.looks_like_path(s) or not hub.looks_like_hub_id(s):
        hint = "" if hub.looks_like_path(s) or "/" in s else " (and it is not a hub id of the form org/name)"
        raise CheckpointError(f"no local directory {s}{hint}; check the path")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc}); fix or re-download it") from None


def _load_config(d: Path, required: bool) -> dict | None:
    p = d / "config.json"
    if not p.exists():
        if required:
            raise CheckpointError(f"{d} has no config.json; a Hugging Face model directory needs one "
                                  "(copy it from the model's repo)")
        return None
    cfg = _read_json(p, "config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config {p} must be a JSON object")
    return cfg


def _specs_from_file(path: Path) -> dict[str, TensorSpec]:
    header, data_start = read_safetensors_header(path)
    return _specs_from_header(header, data_start, path)


def _specs_from_header(header: dict[str, Any], data_start: int, path: Path) -> dict[str, TensorSpec]:
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = ST_DTYPE_NAMES[info["dtype"]]
        except KeyError:
            raise CheckpointError(f"shard {path}: tensor {name!r} has unsupported dtype {info['dtype']}") from None
        s, e = info["data_offsets"]
        out[name] = TensorSpec(name, path, dt, tuple(int(x) for x in info["shape"]), data_start + s, data_start + e)
    return out


def _index_files(d: Path, index_path: Path, present=None) -> tuple[dict[str, str], list[Path]]:
    """An index's ``weight_map`` and its shard files, checked: each a plain file name inside ``d``
    (no path, no leading dot) that is present (``present(path)``, default: a local file)."""
    present = present or (lambda f: f.is_file())
    index = _read_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"index {index_path} has no weight_map; re-download it")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"index {index_path} names an invalid shard file {bad[0]!r} (not a file name); "
                              "re-download the index")
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise CheckpointError(f"index {index_path} names an invalid shard file {fname!r}")
        f = d / fname
        if not present(f):
            raise CheckpointError(f"index {index_path} names shard {fname} which is missing from {d}; "
                                  "the download is incomplete - re-download the missing shard")
        files.append(f)
    return weight_map, files


def _sharded(d: Path, index_path: Path, specs_of=None, present=None) -> tuple[dict[str, TensorSpec], list[Path]]:
    """The tensors of a sharded checkpoint. ``specs_of(path)`` reads one shard's header (default: the
    local file); ``present(path)`` says whether a shard exists (default: a local file)."""
    specs_of = specs_of or _specs_from_file
    weight_map, files = _index_files(d, index_path, present)
    tensors: dict[str, TensorSpec] = {}
    for f in files:
        for name, spec in specs_of(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards ({tensors[name].file.name} and "
                                      f"{f.name}) of {d}; the checkpoint is inconsistent")
            tensors[name] = spec
    for name, fname in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"index {index_path} maps tensor {name!r} to {fname}, but no shard contains it")
        if tensors[name].file.name != fname:
            raise CheckpointError(f"index {index_path} maps tensor {name!r} to {fname}, but it is in "
                                  f"{tensors[name].file.name}; the index and shards disagree - re-download")
    extra = set(tensors) - set(weight_map)
    if extra:
        raise CheckpointError(f"shards of {d} contain tensors the index {index_path.name} does not list: "
                              f"{sorted(extra)[:5]}; the index and shards disagree - re-download")
    return {n: tensors[n] for n in sorted(tensors)}, files


def refuse_pickle(d: Path, files: list[str],
                  fix: str = "Convert to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True).",
                  ) -> CheckpointError:
    """The error for a directory with only pickled weights (``files``) when pickles are not allowed;
    ``.pickle_only`` holds ``(d, files)`` so a caller can restate the fix for its own command."""
    exc = CheckpointError(f"{d} holds only pickled weights ({', '.join(files)}); pickle can execute code. {fix}")
    exc.pickle_only = (d, list(files))
    return exc


#: pickled weight files. They are read only when a directory has no ``.safetensors`` file (and only with
#: ``allow_pickle``); beside safetensors they are ignored, never unpickled, by every command.
PICKLE_GLOBS = ("pytorch_model*.bin", "*.pt", "adapter_model.bin")


def is_pickled_weights(name: str) -> bool:
    """True when a file name is a pickled weight file (see :data:`PICKLE_GLOBS`)."""
    return any(fnmatch.fnmatchcase(name, g) for g in PICKLE_GLOBS)


def pickled_files(d: Path) -> list[Path]:
    """The pickled weight files in ``d`` (see :data:`PICKLE_GLOBS`), in reading order."""
    return list(dict.fromkeys(f for g in PICKLE_GLOBS for f in sorted(d.glob(g))))


def pickle_only(d: Path) -> bool:
    """True when ``d`` holds pickled weights and no ``.safetensors`` file: the only case they are read."""
    return not any(d.glob("*.safetensors")) and bool(pickled_files(d))


_IGNORED_NOTED: set[Path] = set()


def _note_ignored_pickles(d: Path) -> None:
    """Safetensors present: any pickled weights (and ``pytorch_model.bin.index.json``) beside them are
    ignored, whatever they hold. Hub repositories often keep a stale ``.bin`` export next to the
    safetensors (e.g. an index that lists a tied ``lm_head``); deltaport reads the safetensors only."""
    bins = [f.name for f in pickled_files(d)] + [f.name for f in d.glob("pytorch_model.bin.index.json")]
    if not bins or d.resolve() in _IGNORED_NOTED:
        return
    _IGNORED_NOTED.add(d.resolve())
    LOG.warning("%s has .safetensors weights; ignoring the pickled files beside them (%s): never unpickled, "
                "not compared", d, ", ".join(bins))


def _pickled(d: Path, allow_pickle: bool) -> tuple[dict[str, TensorSpec], list[Path], dict[str, Any]]:
    bins = pickled_files(d)
    if not allow_pickle:
        raise refuse_pickle(d, [b.name for b in bins])
    import torch

    index = d / "pytorch_model.bin.index.json"
    if index.exists():
        _, bins = _index_files(d, index)
    mem: dict[str, Any] = {}
    for b in bins:
        try:
            state_dict = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - weights_only refusal, corrupt zip, ...
            raise CheckpointError(f"cannot load {b} with torch.load(weights_only=True): {exc}") from None
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{b} does not hold a state dict")
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor):
                continue
            if k in mem:
                raise CheckpointError(f"tensor {k!r} appears in two files of {d}")
            mem[k] = v.contiguous()
    specs = {k: TensorSpec(k, b, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in sorted(mem.items())}
    return specs, bins, mem


def _open_hub(source: str, revision: str | None, require_config: bool) -> Checkpoint:
    """A hub id planned from the hub: pinned to a commit, small files downloaded, safetensors headers
    read by HTTP range; the weight files are not downloaded (see :func:`deltaport.io.hub.download`)."""
    from deltaport.io import hub

    repo_id, rev = hub.split_ref(source, revision)
    repo = hub.pin(repo_id, rev)
    d = hub.fetch_small(repo)
    where = f"{repo_id}@{repo.sha}"

    def specs_of(f: Path) -> dict[str, TensorSpec]:
        raw, data_start, size, where = hub.remote_header_bytes(repo, f.name)
        return _specs_from_header(parse_header(raw, data_start, size, where), data_start, f)

    def present(f: Path) -> bool:
        return f.name in repo.sizes

    prov_path = d / PROVENANCE_NAME
    provenance = _read_json(prov_path, "provenance") if prov_path.exists() else None
    if provenance is not None and not isinstance(provenance, dict):
        raise CheckpointError(f"provenance {where}/{PROVENANCE_NAME} must be a JSON object")
    kind, lora = "safetensors", None
    safetensors_files = sorted(f for f in repo.sizes if f.endswith(".safetensors") and "/" not in f)
    if (d / "adapter_config.json").exists():
        lora = _read_json(d / "adapter_config.json", "adapter config")
        kind = "lora"
        if "adapter_model.safetensors" not in repo.sizes:
            raise CheckpointError(f"LoRA adapter {where} has adapter_config.json but no adapter_model.safetensors")
        files = [d / "adapter_model.safetensors"]
        tensors = specs_of(files[0])
    elif (d / INDEX_NAME).exists():
        tensors, files = _sharded(d, d / INDEX_NAME, specs_of, present)
    elif SINGLE_NAME in repo.sizes or len(safetensors_files) == 1:
        files = [d / (SINGLE_NAME if SINGLE_NAME in repo.sizes else safetensors_files[0])]
        tensors = specs_of(files[0])
    elif safetensors_files:
        raise CheckpointError(f"{where} has {len(safetensors_files)} safetensors files but no {INDEX_NAME}; the repository lacks its index")
    else:
        pickles = sorted(f for f in repo.sizes if "/" not in f and is_pickled_weights(f))
        raise CheckpointError(f"{where} holds no safetensors weights" + (f" (only {', '.join(pickles[:3])})" if pickles else "")
                              + "; deltaport plans from safetensors headers. Convert the model to safetensors first")
    if provenance and provenance.get("kind") == "delta":
        kind = "delta"
    config = _load_config(d, required=require_config and kind == "safetensors")
    if not tensors:
        raise CheckpointError(f"{where} contains no tensors")
    return Checkpoint(dir=d, source=source, kind=kind, tensors=tensors, files=files, config=config,
                      revision=repo.sha, provenance=provenance, lora=lora, hub=repo)


def verify_downloaded(ck: Checkpoint, files: list[Path]) -> None:
    """After downloading a hub checkpoint's weight files, check each one with the safetensors library
    and require the headers the plan was made from (same names, dtypes, shapes and byte ranges)."""
    for f in files:
        got = _specs_from_file(f)
        want = {n: s for n, s in ck.tensors.items() if s.file == f}
        if got != want:
            diff = sorted(set(got) ^ set(want)) or sorted(n for n in got if got[n] != want.get(n))
            raise CheckpointError(f"{ck.source}: the downloaded {f.name} differs from the header the plan was made "
                                  f"from (e.g. {diff[:3]}); the cache may be corrupt - delete it and retry")


def open_checkpoint(source: str | Path, *, allow_pickle: bool = False, revision: str | None = None,
                    require_config: bool = False, remote: bool = False) -> Checkpoint:
    """Resolve ``source`` and read its headers (never tensor bytes, except for pickled files).

    With ``remote=True`` a hub id (when online) is planned from the hub without downloading weights:
    ``ck.hub`` is set and the weight files appear in ``ck.dir`` once :func:`deltaport.io.hub.download`
    fetched them. Otherwise a hub id is downloaded whole first."""
    s = str(source)
    if remote and not Path(s).expanduser().is_dir():
        from deltaport.io import hub

        require_dir_or_hub_id(s, Path(s).expanduser())
        if not hub.offline():
            return _open_hub(s, revision, require_config)
    d, rev = resolve_dir(source, revision=revision)
    prov_path = d / PROVENANCE_NAME
    provenance = _read_json(prov_path, "provenance") if prov_path.exists() else None
    if provenance is not None and not isinstance(provenance, dict):
        raise CheckpointError(f"provenance {prov_path} must be a JSON object; it was edited or damaged - recreate it "
                              "(`deltaport diff` for a delta) or remove it from a model directory")
    kind = "safetensors"
    memory = None
    lora = None
    if (d / "adapter_config.json").exists():
        lora = _read_json(d / "adapter_config.json", "adapter config")
        kind = "lora"
        f = d / "adapter_model.safetensors"
        if f.exists():
            tensors, files = _specs_from_file(f), [f]
        elif (d / "adapter_model.bin").exists():
            tensors, files, memory = _pickled(d, allow_pickle)
        else:
            raise CheckpointError(f"LoRA adapter {d} has adapter_config.json but no adapter_model.safetensors")
    elif (d / INDEX_NAME).exists():
        tensors, files = _sharded(d, d / INDEX_NAME)
    elif (d / SINGLE_NAME).exists():
        tensors, files = _specs_from_file(d / SINGLE_NAME), [d / SINGLE_NAME]
    else:
        safetensors_files = sorted(d.glob("*.safetensors"))
        if len(safetensors_files) == 1:
            tensors, files = _specs_from_file(safetensors_files[0]), safetensors_files
        elif len(safetensors_files) > 1:
            raise CheckpointError(f"{d} has {len(safetensors_files)} safetensors files but no {INDEX_NAME}; "
                                  "the index is missing - re-download it")
        elif pickle_only(d):
            tensors, files, memory = _pickled(d, allow_pickle)
            kind = "pickle"
        else:
            raise CheckpointError(f"{d} contains no weights (no model.safetensors, {INDEX_NAME} or "
                                  "pytorch_model*.bin); is it a model directory?")
    if memory is None:
        _note_ignored_pickles(d)
    if provenance and provenance.get("kind") == "delta":
        kind = "delta"
    config = _load_config(d, required=require_config and kind in ("safetensors", "pickle"))
    if not tensors:
        raise CheckpointError(f"{d} contains no tensors")
    return Checkpoint(dir=d, source=str(source), kind=kind, tensors=tensors, files=files, config=config,
                      revision=rev, provenance=provenance, lora=lora, _memory=memory)
