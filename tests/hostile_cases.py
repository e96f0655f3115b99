"""Hostile inputs and faults for every deltaport command: one catalogue, two users.

The tests run every case in-process (fast) and assert the expected exit code, message, untouched
inputs and the all-or-nothing output: ``tests/test_hostile_cli.py`` the core commands',
``tests/test_hostile_diag.py`` the diagnostics', ``tests/test_hostile_loop.py`` eval/finetune/evolve/lab's
(only cases marked ``real_cli_only`` are left out); ``benchmarks/reliability_report.py`` runs the same
cases through the real ``deltaport`` executable and writes ``docs/reliability.md``.

A case is a function ``build(ws) -> Spec``: it copies pristine tiny checkpoints into the workspace,
breaks them, and says which command to run and what must happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TMP_TAG = ".deltaport-tmp-"
OLD_TAG = ".deltaport-old-"
LOCK_TAG = ".deltaport-lock"
ROLES = ("source_base", "source_finetuned", "target_base")


# --------------------------------------------------------------------------------------------------
# pristine checkpoints and helpers


def build_pristine(root: str | Path) -> dict[str, Path]:
    """A tiny bf16 llama family (4 shards per model) plus a delta made from it, under ``root``."""
    import torch

    from deltaport import testing as T

    root = Path(root)
    fam = T.make_family(root, "llama", torch.bfloat16, max_shard_size="12KB")
    out = {k: Path(v) for k, v in fam.items()}
    from deltaport.api import diff

    diff(out["source_base"], out["source_finetuned"], root / "delta")
    out["delta"] = root / "delta"
    return out


def tree_hash(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> digest); {} when it does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(out: str | Path) -> list[str]:
    """Temporary / stranded folders and writer-lock files deltaport left next to ``out``."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}{TMP_TAG}") or p.name.startswith(f".{out.name}{OLD_TAG}")
                  or p.name == f".{out.name}{LOCK_TAG}")


def st_read(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file, parsed by hand for mutation."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(path: Path, header: dict | bytes, data: bytes, *, header_len: int | None = None) -> None:
    """Write a (possibly broken) safetensors file: header JSON (or raw bytes), then data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def shards(d: Path) -> list[Path]:
    return sorted(Path(d).glob("*.safetensors"))


def index_of(d: Path) -> dict:
    return json.loads((Path(d) / "model.safetensors.index.json").read_text())


def write_index(d: Path, index: dict) -> None:
    (Path(d) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class Workspace:
    """Fresh copies of the pristine checkpoints, one folder per case."""

    def __init__(self, root: str | Path, pristine: dict[str, Path]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pristine = pristine

    def copy(self, role: str, name: str | None = None) -> Path:
        dst = self.root / (name or role)
        shutil.copytree(self.pristine[role], dst, symlinks=True)
        return dst

    def family(self) -> dict[str, Path]:
        return {r: self.copy(r) for r in ROLES}

    def out(self, name: str = "out") -> Path:
        return self.root / name


def transfer_argv(fam: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["transfer", "--source-base", str(fam["source_base"]), "--source-finetuned", str(fam["source_finetuned"]),
            "--target-base", str(fam["target_base"]), "-o", str(out), "-q", *extra]


@dataclass
class Spec:
    """What to run and what must happen."""

    argv: list[str]
    inputs: list[Path]
    output: Path | None
    expect_rc: int | tuple[int, ...]
    expect: str  # regex searched in stderr (+ stdout)
    prev_output: bool = False  # the output existed before the run and must survive a failure intact
    marker: Path | None = None  # a file that would exist only if foreign code ran
    check: Callable[[], str | None] | None = None  # extra check after the run: a problem or None
    signal_after: float | None = None  # (real CLI only) send `signal` after this many seconds
    signal: int | None = None
    preexec: Callable[[], None] | None = None  # (real CLI only) e.g. resource limits
    real_cli_only: bool = False
    after_run: Callable[[], str | None] | None = None  # right after the run, before the output is checked: a problem or None


@dataclass
class Case:
    name: str
    category: str
    command: str
    build: Callable[[Workspace], Spec]
    needs: str | None = None  # a CLI command that must exist
    known_issue: str | None = None  # a reported bug in code this suite does not own (the test xfails strictly)


CASES: list[Case] = []


def case(name: str, category: str, command: str = "transfer", needs: str | None = None, real_cli_only: bool = False,
         known_issue: str | None = None):
    def deco(fn):
        CASES.append(Case(name, category, command, fn, needs or (command if command not in
                                                                   ("transfer", "diff", "apply", "inspect", "deltaport") else None),
                          known_issue))
        fn.real_cli_only = real_cli_only
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# no code execution from checkpoints


class _Evil:
    """Pickles into a call that creates ``path`` when unpickled by a full (unsafe) unpickler."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def make_pickle_model(ws: Workspace, role: str, name: str, evil_marker: Path | None = None, ext: str = ".bin") -> Path:
    """``role`` re-saved as pickled weights (``pytorch_model.bin`` or ``model.pt``), optionally booby-trapped."""
    import torch

    from deltaport.io.checkpoint import open_checkpoint

    src = ws.pristine[role]
    ck = open_checkpoint(src)
    sd = {n: ck.tensor(n) for n in ck.names}
    d = ws.root / name
    d.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, d / f.name)
    obj: dict = dict(sd)
    if evil_marker is not None:
        obj["__evil__"] = _Evil(evil_marker)
    torch.save(obj, d / ("pytorch_model.bin" if ext == ".bin" else "model.pt"))
    return d


def _no_marker(marker: Path) -> Callable[[], str | None]:
    return lambda: f"foreign code ran: {marker} was created" if marker.exists() else None


@case("pickle-only model (.bin) without --allow-pickle", "code execution")
def _pickle_refused(ws):
    fam = ws.family()
    marker = ws.root / "PWNED"
    fam["target_base"] = make_pickle_model(ws, "target_base", "target_bin", marker)
    out = ws.out()
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 2, r"pickle.*--allow-pickle", marker=marker,
                check=_no_marker(marker))


@case("pickle-only model (.pt) without --allow-pickle", "code execution", "inspect")
def _pt_refused(ws):
    marker = ws.root / "PWNED"
    d = make_pickle_model(ws, "target_base", "target_pt", marker, ext=".pt")
    return Spec(["inspect", str(d)], [d], None, 2, r"pickle", marker=marker, check=_no_marker(marker))


@case("booby-trapped pickle with --allow-pickle (weights_only=True refuses it)", "code execution")
def _pickle_evil_allowed(ws):
    fam = ws.family()
    marker = ws.root / "PWNED"
    fam["target_base"] = make_pickle_model(ws, "target_base", "target_bin", marker)
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--allow-pickle"), list(fam.values()), out, 2, r"weights_only", marker=marker,
                check=_no_marker(marker))


@case("clean pickle with --allow-pickle is loaded (weights_only=True)", "code execution")
def _pickle_clean_allowed(ws):
    fam = ws.family()
    fam["target_base"] = make_pickle_model(ws, "target_base", "target_bin")
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--allow-pickle"), list(fam.values()), out, 0, r"^$|wrote")


def _remote_code_dir(ws: Workspace, marker: Path) -> Path:
    d = ws.copy("target_base", "target_remote_code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModelForCausalLM": "evil_modeling.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_modeling.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                        "class EvilConfig: pass\nclass EvilModel: pass\n")
    return d


@case("config.json with auto_map + custom modeling code (trust_remote_code never implied)", "code execution")
def _remote_code(ws):
    fam = ws.family()
    marker = ws.root / "PWNED"
    fam["target_base"] = _remote_code_dir(ws, marker)
    out = ws.out()
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 0, r"^$|wrote", marker=marker, check=_no_marker(marker))


@case("safetensors header holding a Python expression", "code execution", "inspect")
def _header_expr(ws):
    d = ws.copy("target_base")
    marker = ws.root / "PWNED"
    f = shards(d)[0]
    _, data = st_read(f)
    st_write(f, f"__import__('os').system('touch {marker}')".encode(), data)
    return Spec(["inspect", str(d)], [d], None, 2, re.escape(f.name), marker=marker, check=_no_marker(marker))


@case("--key-map YAML with a !!python/object tag", "code execution")
def _yaml_tag(ws):
    fam = ws.family()
    marker = ws.root / "PWNED"
    km = ws.root / "keymap.yaml"
    km.write_text(f'x: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--key-map", str(km)), list(fam.values()) + [km], out, 2, r"key-map.*YAML",
                marker=marker, check=_no_marker(marker))


# --------------------------------------------------------------------------------------------------
# corrupt or inconsistent checkpoints


def _corrupt_case(name: str, mutate: Callable[[Path, Workspace], None], expect: str, role: str = "source_finetuned",
                  command: str = "transfer"):
    @case(name, "corrupt input", command)
    def build(ws):
        fam = ws.family()
        mutate(fam[role], ws)
        if command == "inspect":
            return Spec(["inspect", str(fam[role])], [fam[role]], None, 2, expect)
        out = ws.out()
        if command == "diff":
            return Spec(["diff", "--base", str(fam["source_base"]), "--finetuned", str(fam["source_finetuned"]), "-o",
                         str(out), "-q"], list(fam.values()), out, 2, expect)
        return Spec(transfer_argv(fam, out), list(fam.values()), out, 2, expect)

    return build


def _truncate(d, ws):
    f = shards(d)[-1]
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 100])


def _truncate_to_4(d, ws):
    f = shards(d)[0]
    f.write_bytes(f.read_bytes()[:4])


def _header_len_past_eof(d, ws):
    f = shards(d)[1]
    h, data = st_read(f)
    st_write(f, h, data, header_len=10**7)


def _header_len_huge(d, ws):
    f = shards(d)[1]
    h, data = st_read(f)
    st_write(f, h, data, header_len=2**63)


def _header_bad_json(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    raw = json.dumps(h).encode()
    st_write(f, raw[:-5] + b"!!!!!", data)


def _header_not_utf8(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    raw = json.dumps(h).encode()
    st_write(f, b"\xff\xfe" + raw[2:], data)


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _overlap(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    # b now starts inside a (same length, shifted back by one element)
    s, e = h[b]["data_offsets"]
    h[b]["data_offsets"] = [s - 2, e - 2]
    st_write(f, h, data)


def _out_of_range(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    s, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [s, e + 4096]
    h[last]["shape"] = [(e + 4096 - s) // 2]
    st_write(f, h, data)


def _shape_bytes_mismatch(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    k = _first_tensor(h)
    h[k]["shape"] = [3, 3]
    st_write(f, h, data)


def _bad_dtype(d, ws):
    f = shards(d)[0]
    h, data = st_read(f)
    h[_first_tensor(h)]["dtype"] = "Q99"
    st_write(f, h, data)


def _index_missing_shard(d, ws):
    shards(d)[2].unlink()


def _index_wrong_shard(d, ws):
    idx = index_of(d)
    wm = idx["weight_map"]
    k = sorted(wm)[0]
    files = sorted(set(wm.values()))
    wm[k] = next(f for f in files if f != wm[k])
    write_index(d, idx)


def _index_names_absent_tensor(d, ws):
    idx = index_of(d)
    idx["weight_map"]["model.layers.99.mlp.up_proj.weight"] = sorted(set(idx["weight_map"].values()))[0]
    write_index(d, idx)


def _index_bad_json(d, ws):
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')


def _index_path_traversal(d, ws):
    idx = index_of(d)
    k = sorted(idx["weight_map"])[0]
    idx["weight_map"][k] = "../../../../etc/passwd"
    write_index(d, idx)


def _duplicate_across_shards(d, ws):
    f0, f1 = shards(d)[0], shards(d)[1]
    h0, data0 = st_read(f0)
    h1, data1 = st_read(f1)
    k = _first_tensor(h0)
    s, e = h0[k]["data_offsets"]
    end = max(v["data_offsets"][1] for kk, v in h1.items() if kk != "__metadata__")
    h1[k] = {"dtype": h0[k]["dtype"], "shape": h0[k]["shape"], "data_offsets": [end, end + (e - s)]}
    st_write(f1, h1, data1[:end] + data0[s:e])


def _index_missing(d, ws):
    (d / "model.safetensors.index.json").unlink()


def _empty_dir(d, ws):
    for f in d.iterdir():
        f.unlink()


def _config_missing(d, ws):
    (d / "config.json").unlink()


def _config_bad_json(d, ws):
    (d / "config.json").write_text('{"model_type": "llama",')


def _config_not_object(d, ws):
    (d / "config.json").write_text("[1, 2, 3]")


def _config_wrong_vocab(d, ws):
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))


def _shard_is_dir(d, ws):
    for f in shards(d):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").mkdir()


def _config_deep(d, ws):
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)


_corrupt_case("truncated shard (last 100 bytes cut)", _truncate, r"truncated")
_corrupt_case("model.safetensors is a directory", _shard_is_dir, r"not a regular file")
_corrupt_case("config.json nested 100,000 levels deep", _config_deep, r"not valid JSON", role="target_base")
_corrupt_case("shard cut to 4 bytes", _truncate_to_4, r"truncated")
_corrupt_case("header length past end of file", _header_len_past_eof, r"header length .* past the end")
_corrupt_case("header length 2**63", _header_len_huge, r"header length")
_corrupt_case("header JSON invalid", _header_bad_json, r"safetensors|JSON")
_corrupt_case("header not UTF-8", _header_not_utf8, r"safetensors|JSON|UTF")
_corrupt_case("tensor offsets overlapping", _overlap, r"safetensors|overlap|offset")
_corrupt_case("tensor offsets out of range", _out_of_range, r"past the end|truncated|safetensors|offset")
_corrupt_case("shape disagrees with byte range", _shape_bytes_mismatch, r"safetensors|shape|offset")
_corrupt_case("unknown dtype in header", _bad_dtype, r"dtype|safetensors")
_corrupt_case("index.json names a missing shard", _index_missing_shard, r"missing")
_corrupt_case("index.json puts a tensor in the wrong shard", _index_wrong_shard, r"index .* maps tensor")
_corrupt_case("index.json names a tensor no shard has", _index_names_absent_tensor, r"no shard contains it")
_corrupt_case("index.json invalid JSON", _index_bad_json, r"not valid JSON")
_corrupt_case("index.json shard name with ../ (path traversal)", _index_path_traversal, r"invalid shard file")
_corrupt_case("duplicate tensor name across shards", _duplicate_across_shards, r"appears in two shards")
_corrupt_case("several shards but no index.json", _index_missing, r"no model.safetensors.index.json|index is missing")
_corrupt_case("model dir with no weights", _empty_dir, r"no weights|contains no")
_corrupt_case("target config.json missing", _config_missing, r"config\.json", role="target_base")
_corrupt_case("target config.json invalid JSON", _config_bad_json, r"not valid JSON", role="target_base")
_corrupt_case("target config.json not an object", _config_not_object, r"JSON object", role="target_base")
_corrupt_case("target config.json vocab_size disagrees with weights", _config_wrong_vocab, r"vocab_size|config",
              role="target_base")
_corrupt_case("inspect: truncated shard", _truncate, r"truncated", command="inspect")
_corrupt_case("inspect: duplicate tensor across shards", _duplicate_across_shards, r"two shards", command="inspect")
_corrupt_case("diff: header JSON invalid", _header_bad_json, r"safetensors|JSON", command="diff")


def _stale_bin_beside(d: Path, marker: Path, consistent: bool = False) -> Path:
    """``d`` plus a booby-trapped ``pytorch_model.bin`` (must never be unpickled) and a
    ``pytorch_model.bin.index.json`` that lists the safetensors' tensors, or (``consistent=False``,
    a stale export as found on the hub) three fewer and one they do not have."""
    import torch

    torch.save({"__evil__": _Evil(marker)}, d / "pytorch_model.bin")
    names = sorted(index_of(d)["weight_map"])
    if not consistent:
        names = names[:-3] + ["model.extra.weight"]
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {n: "pytorch_model.bin" for n in names}}))
    return d


def _both_bin_and_st(ws, consistent: bool):
    fam = ws.family()
    marker = ws.root / "PWNED"
    _stale_bin_beside(fam["target_base"], marker, consistent)
    return fam, marker


#: what deltaport logs when it ignores pickled files beside safetensors (every command, one code path)
IGNORED_BIN = r"ignoring the pickled files beside them \(pytorch_model\.bin, pytorch_model\.bin\.index\.json\)"


def _same_weights_as_plain_transfer(ws: Workspace, out: Path) -> Callable[[], str | None]:
    """The output equals a transfer of the untouched models (every file but the provenance, which names paths)."""
    def check():
        from deltaport.api import transfer

        ref = ws.out("reference")
        transfer(ws.pristine["source_base"], ws.pristine["source_finetuned"], ws.pristine["target_base"], ref)
        strip = lambda h: {k: v for k, v in h.items() if k != "deltaport.json"}  # noqa: E731
        return None if strip(tree_hash(out)) == strip(tree_hash(ref)) else "the output differs from a transfer without the .bin"

    return check


@case("dir with .safetensors and a stale .bin whose index disagrees: .bin ignored, never unpickled", "corrupt input")
def _both_inconsistent(ws):
    fam, marker = _both_bin_and_st(ws, consistent=False)
    out = ws.out()
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 0, IGNORED_BIN, marker=marker,
                check=_both(_no_marker(marker), _same_weights_as_plain_transfer(ws, out)))


@case("dir with .safetensors and .bin that agree: .bin ignored, never unpickled", "corrupt input")
def _both_consistent(ws):
    fam, marker = _both_bin_and_st(ws, consistent=True)
    out = ws.out()
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 0, IGNORED_BIN, marker=marker,
                check=_both(_no_marker(marker), _same_weights_as_plain_transfer(ws, out)))


def _non_object_json_case(name: str, role: str, file: str, text: str, drop_jinja: bool = False):
    """A model file that is valid JSON but not an object: exit 2, naming the file."""
    @case(name, "corrupt input")
    def build(ws):
        fam = ws.family()
        if drop_jinja:  # so that the chat template is read from the JSON file
            (fam[role] / "chat_template.jinja").unlink()
        (fam[role] / file).write_text(text)
        out = ws.out()
        return Spec(transfer_argv(fam, out), list(fam.values()), out, 2,
                    re.escape(f"{role}/{file} must be a JSON object"))


_non_object_json_case("source fine-tune tokenizer_config.json is a JSON list (chat template read from it)",
                      "source_finetuned", "tokenizer_config.json", "[1, 2]", drop_jinja=True)
_non_object_json_case("source fine-tune chat_template.json is a JSON string, not an object",
                      "source_finetuned", "chat_template.json", '"{{ messages }}"', drop_jinja=True)
_non_object_json_case("target tokenizer_config.json is a JSON list (tokenizer files copied from it)",
                      "target_base", "tokenizer_config.json", "[]")


# --------------------------------------------------------------------------------------------------
# models that do not fit together


def _resave(d: Path, fn: Callable[[dict], dict]) -> None:
    """Load every tensor of ``d``, transform the state dict, save it again as one safetensors file."""
    from safetensors.torch import save_file

    from deltaport.io.checkpoint import open_checkpoint

    ck = open_checkpoint(d)
    sd = fn({n: ck.tensor(n) for n in ck.names})
    for f in shards(d):
        f.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _mismatch_case(name: str, fn: Callable[[dict], dict], expect: str, role: str = "source_finetuned",
                   extra: tuple[str, ...] = (), rc: int = 2, check_nonfinite: bool = False):
    @case(name, "inconsistent models" if rc == 2 and "NaN" not in name else "numerics")
    def build(ws):
        fam = ws.family()
        _resave(fam[role], fn)
        out = ws.out()
        check = None
        if check_nonfinite:
            def check():
                p = out / "deltaport.json"
                if not p.exists():
                    return "no provenance"
                nf = json.loads(p.read_text()).get("nonfinite_inputs")
                return None if nf else f"provenance does not record the NaN input (nonfinite_inputs={nf!r})"
        return Spec(transfer_argv(fam, out, *extra), list(fam.values()), out, rc, expect, check=check)

    return build


def _drop_one(sd):
    k = sorted(sd)[3]
    del sd[k]
    return sd


def _add_one(sd):
    import torch

    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    return sd


def _reshape_one(sd):
    import torch

    k = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1], dtype=sd[k].dtype)
    return sd


def _int_dtype(sd):
    k = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
    sd[k] = sd[k].to(__import__("torch").int32)
    return sd


def _nan_one(sd):
    k = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    return sd


_mismatch_case("source fine-tune lacks a tensor (key sets differ)", _drop_one, r"missing|not in|key")
_mismatch_case("source fine-tune has an extra tensor", _add_one, r"extra|not in|key|missing")
_mismatch_case("shape differs among the three models", _reshape_one, r"\[\d+, \d+\]")
_mismatch_case("dtype differs (int32 vs bfloat16)", _int_dtype, r"dtype")
_mismatch_case("NaN in an input (warns, output written)", _nan_one, r"NaN", rc=0, check_nonfinite=True)
_mismatch_case("NaN in an input with --strict", _nan_one, r"NaN.*--strict", extra=("--strict",))


@case("NaN/Inf produced by the arithmetic (overflow at --scale 1e300)", "numerics")
def _overflow(ws):
    fam = ws.family()
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--scale", "1e300"), list(fam.values()), out, 1, r"NaN/Inf")


def _apply_spec(ws, target: Path, *extra: str, rc: int, expect: str, check=None) -> Spec:
    delta = ws.copy("delta")
    out = ws.out()
    return Spec(["apply", str(delta), "--to", str(target), "-o", str(out), "-q", *extra], [delta, target], out, rc, expect,
                check=check)


@case("apply: target shapes differ from what the delta recorded", "inconsistent models", "apply")
def _apply_mismatch(ws):
    t = ws.copy("target_base")
    _resave(t, _reshape_one)
    return _apply_spec(ws, t, rc=2, expect=r"does not match the structure.*--force")


def _to_f32(sd):
    import torch

    return {k: v.to(torch.float32) for k, v in sd.items()}


@case("apply: target dtypes differ from what the delta recorded", "inconsistent models", "apply")
def _apply_dtype_mismatch(ws):
    t = ws.copy("target_base")
    _resave(t, _to_f32)
    return _apply_spec(ws, t, rc=2, expect=r"does not match the structure.*--force")


@case("apply --force on a mismatched target (recorded in provenance)", "inconsistent models", "apply")
def _apply_force(ws):
    t = ws.copy("target_base")
    _resave(t, _to_f32)
    out = ws.out()

    def check():
        p = out / "deltaport.json"
        forced = json.loads(p.read_text()).get("forced") if p.exists() else None
        return None if forced else f"provenance lacks the forced differences (forced={forced!r})"

    return _apply_spec(ws, t, "--force", rc=0, expect=r"^$|wrote", check=check)


@case("apply: deltaport.json of the delta tampered (invalid JSON)", "corrupt input", "apply")
def _apply_tampered(ws):
    delta = ws.copy("delta")
    (delta / "deltaport.json").write_text("{not json")
    t = ws.copy("target_base")
    out = ws.out()
    return Spec(["apply", str(delta), "--to", str(t), "-o", str(out), "-q"], [delta, t], out, 2, r"not valid JSON")


@case("apply: deltaport.json of the delta with 'base': null", "corrupt input", "apply")
def _apply_prov_base_null(ws):
    delta = ws.copy("delta")
    prov = json.loads((delta / "deltaport.json").read_text())
    prov["base"] = None
    (delta / "deltaport.json").write_text(json.dumps(prov))
    t = ws.copy("target_base")
    out = ws.out()
    return Spec(["apply", str(delta), "--to", str(t), "-o", str(out), "-q"], [delta, t], out, 2, r"malformed")


# --------------------------------------------------------------------------------------------------
# output location


def _make_prev_output(ws: Workspace, fam: dict[str, Path], out: Path) -> None:
    from deltaport.api import transfer

    transfer(fam["source_base"], fam["source_finetuned"], fam["target_base"], out)


@case("output exists, no --overwrite", "output safety")
def _exists(ws):
    fam = ws.family()
    out = ws.out()
    _make_prev_output(ws, fam, out)
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 2, r"already exists.*--overwrite", prev_output=True)


@case("output exists, --overwrite, new run fails midway (overflow)", "output safety")
def _overwrite_fail(ws):
    fam = ws.family()
    out = ws.out()
    _make_prev_output(ws, fam, out)
    return Spec(transfer_argv(fam, out, "--overwrite", "--scale", "1e300"), list(fam.values()), out, 1, r"NaN/Inf",
                prev_output=True)


@case("output is an existing plain file", "output safety")
def _out_is_file(ws):
    fam = ws.family()
    out = ws.out("out.txt")
    out.write_text("keep me\n")
    return Spec(transfer_argv(fam, out, "--overwrite"), list(fam.values()), out, 2, r"not a directory", prev_output=True)


@case("output == an input directory (--overwrite)", "output safety")
def _out_is_input(ws):
    fam = ws.family()
    out = fam["target_base"]
    return Spec(transfer_argv(fam, out, "--overwrite"), list(fam.values()), out, 2, r"inside input", prev_output=True)


@case("output inside an input directory", "output safety")
def _out_inside_input(ws):
    fam = ws.family()
    out = fam["source_base"] / "sub" / "out"
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 2, r"inside input")


@case("output contains an input directory (--overwrite)", "output safety")
def _out_contains_input(ws):
    fam = ws.family()
    out = ws.root
    return Spec(transfer_argv(fam, out, "--overwrite"), list(fam.values()), out, 2, r"contains input", prev_output=False,
                check=lambda: None)


@case("output reached through a symlink into an input", "output safety")
def _out_symlink(ws):
    fam = ws.family()
    link = ws.root / "link"
    link.symlink_to(fam["target_base"])
    out = link / "out"
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 2, r"inside input")


# --------------------------------------------------------------------------------------------------
# paths and ids


@case("nonexistent model path", "bad path")
def _nonexistent(ws):
    fam = ws.family()
    fam["target_base"] = ws.root / "no-such-model"
    out = ws.out()
    return Spec(transfer_argv(fam, out), [fam["source_base"], fam["source_finetuned"]], out, 2, r"no local directory .*no-such-model; check the path")


@case("hub id not in the offline cache", "bad path")
def _hub_offline(ws):
    fam = ws.family()
    fam["target_base"] = "deltaport-test-org/definitely-not-cached-model"
    out = ws.out()
    return Spec(transfer_argv(fam, out), [fam["source_base"], fam["source_finetuned"]], out, 2,
                r"no local directory deltaport-test-org/definitely-not-cached-model, and the hub id .* is not in the local "
                r"cache while HF_HUB_OFFLINE is set .*`hf download deltaport-test-org/definitely-not-cached-model`")


@case("model path is a file", "bad path", "inspect")
def _path_is_file(ws):
    d = ws.copy("target_base")
    f = shards(d)[0]
    return Spec(["inspect", str(f)], [d], None, 2, r"is a file")


@case("invalid option value (--vocab-policy nope)", "bad usage")
def _bad_option(ws):
    fam = ws.family()
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--vocab-policy", "nope"), list(fam.values()), out, 2, r"vocab-policy")


@case("--dry-run writes nothing", "output safety")
def _dry_run(ws):
    fam = ws.family()
    out = ws.out()
    return Spec(transfer_argv(fam, out, "--dry-run"), list(fam.values()), out, 0, r"plan:",
                check=lambda: "dry run created the output" if out.exists() else None)


# --------------------------------------------------------------------------------------------------
# later commands (covered where they exist): nonexistent path, pickle-only model, output exists

def _jsonl(ws: Workspace) -> Path:
    p = ws.root / "text.jsonl"
    p.write_text("".join(json.dumps({"text": "the flag is red . what color is the flag ? red"}) + "\n" for _ in range(8)))
    return p


DATA = Path(__file__).resolve().parent / "data" / "tiny_qa"
TINY_QA = DATA / "tiny_qa.yaml"


def _later(command: str, argv_for: Callable[[Workspace, Path, Path], list[str]], out_kind: str = "file",
           remote_code: bool = True, pickle_fix: str = r"--allow-pickle"):
    """Cases for a later command that reads a model and writes ``-o OUT`` (a report file or a directory)."""

    def _out(ws):
        return ws.out("report.json" if out_kind == "file" else "out")

    @case(f"{command}: nonexistent model path", "later commands", command)
    def _missing(ws):
        out = _out(ws)
        return Spec(argv_for(ws, ws.root / "no-such-model", out), [], out, 2, r"no local directory .*no-such-model; check the path")

    @case(f"{command}: pickle-only model refused", "later commands", command)
    def _pickle(ws):
        marker = ws.root / "PWNED"
        d = make_pickle_model(ws, "target_base", "model_bin", marker)
        out = _out(ws)
        return Spec(argv_for(ws, d, out), [d], out, 2, r"pickled weights \(pytorch_model\.bin\).*" + pickle_fix,
                    marker=marker, check=_no_marker(marker))

    @case(f"{command}: output exists without --overwrite", "later commands", command)
    def _exists(ws):
        d = ws.copy("target_base")
        out = _out(ws)
        if out_kind == "file":
            out.write_text('{"previous": "report"}\n')
        else:
            out.mkdir()
            (out / "keep.txt").write_text("previous output\n")
        return Spec(argv_for(ws, d, out), [d], out, 2,
                    r"already exists.*--overwrite" if out_kind == "file" else r"exists|--overwrite", prev_output=True)

    @case(f"{command}: truncated shard", "later commands", command)
    def _truncated(ws):
        d = ws.copy("target_base")
        _truncate(d, ws)
        out = _out(ws)
        return Spec(argv_for(ws, d, out), [d], out, 2, r"truncated.*re-download this shard")

    if remote_code:
        @case(f"{command}: config.json with auto_map + custom code is not executed", "later commands", command)
        def _remote(ws):
            marker = ws.root / "PWNED"
            d = _remote_code_dir(ws, marker)
            out = _out(ws)
            return Spec(argv_for(ws, d, out), [d], out, (0, 2), r"", marker=marker, check=_no_marker(marker))


def _chain(ws: Workspace, m: Path) -> Path:
    p = ws.root / "chain.yaml"
    p.write_text(json.dumps({  # JSON is YAML
        "versions": [{"name": "M1", "path": str(m)}, {"name": "M2", "path": str(m)}],
        "data": str(DATA / "sft.jsonl"),
        "finetune": {"recipe": "quick", "steps": 1},
        "eval": {"tasks": [str(TINY_QA)], "limit": 2},
        "strategies": ["direct"],
    }))
    return p


_later("eval", lambda ws, m, o: ["eval", str(m), "--tasks", str(TINY_QA), "--limit", "2", "--device", "cpu", "--no-cache",
                                 "-o", str(o)], pickle_fix=r"safetensors only.*save_pretrained")


@case("eval: -o and --table name the same file (refused before any model is evaluated)", "later commands", "eval")
def _eval_same_file(ws):
    d = ws.copy("target_base")
    out = ws.out("results.json")
    return Spec(["eval", str(d), "--tasks", str(TINY_QA), "--limit", "2", "--device", "cpu", "--no-cache", "-o", str(out),
                 "--table", str(out)], [d], out, 2, r"both name .*results\.json")


# connectivity / similarity / check: pickled weights, report and plot files (beyond the _later cases)


def _no_leftovers(*paths: Path) -> Callable[[], str | None]:
    def check():
        left = [x for p in paths for x in leftovers(p)]
        return f"temporary files left: {left}" if left else None

    return check


def _both(*checks: Callable[[], str | None] | None) -> Callable[[], str | None]:
    return lambda: next((p for p in (c() for c in checks if c is not None) if p), None)


def _report_replaced(out: Path) -> Callable[[], str | None]:
    def check():
        try:
            rep = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            return f"the report is not readable JSON: {exc}"
        return "the previous report is still there" if "previous" in rep else None

    return check


def _diag_cases(command: str, argv_for: Callable[[Workspace, Path, Path], list[str]], plot: bool):
    def _report(ws):
        return ws.out("report.json")

    @case(f"{command}: pickle-only model with --allow-pickle is loaded (weights_only=True)", "later commands", command)
    def _pickle_ok(ws):
        d = make_pickle_model(ws, "target_base", "model_bin")
        out = _report(ws)
        return Spec(argv_for(ws, d, out) + ["--allow-pickle"], [d], out, 0, r"report")

    @case(f"{command}: booby-trapped pickle with --allow-pickle (weights_only=True refuses it)", "later commands",
          command)
    def _pickle_evil(ws):
        marker = ws.root / "PWNED"
        d = make_pickle_model(ws, "target_base", "model_bin", marker)
        out = _report(ws)
        return Spec(argv_for(ws, d, out) + ["--allow-pickle"], [d], out, 2, r"weights_only", marker=marker,
                    check=_no_marker(marker))

    @case(f"{command}: dir with .safetensors and a booby-trapped .bin whose index disagrees: .bin ignored, never "
          "unpickled",
          "later commands", command)
    def _st_and_bin(ws):
        import torch

        marker = ws.root / "PWNED"
        d = _stale_bin_beside(ws.copy("target_base"), marker)
        out = _report(ws)
        return Spec(argv_for(ws, d, out), [d], out, 0, IGNORED_BIN + r".*report", marker=marker,
                    check=_no_marker(marker))

    @case(f"{command}: --overwrite replaces an existing report", "later commands", command)
    def _overwrite(ws):
        d = ws.copy("target_base")
        out = _report(ws)
        out.write_text('{"previous": "report"}\n')
        return Spec(argv_for(ws, d, out) + ["--overwrite"], [d], out, 0, r"report",
                    check=_both(_report_replaced(out), _no_leftovers(out)))

    @case(f"{command}: report write fails (file size limit), --overwrite over a previous report", "later commands",
          command, real_cli_only=True)
    def _report_fsize(ws):
        import resource

        d = ws.copy("target_base")
        out = _report(ws)
        out.write_text('{"previous": "report"}\n')
        lim = 64  # the previous report fits, the new one does not

        def pre():
            resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))

        return Spec(argv_for(ws, d, out) + ["--overwrite"], [d], out, 1, r"file size limit", prev_output=True,
                    check=_no_leftovers(out), preexec=pre, real_cli_only=True)

    if plot:
        @case(f"{command}: --plot file exists without --overwrite (nothing computed, nothing written)",
              "later commands", command)
        def _plot_exists(ws):
            d = ws.copy("target_base")
            out = _report(ws)
            png = ws.out("plot.png")
            png.write_bytes(b"previous plot\n")
            return Spec(argv_for(ws, d, out) + ["--plot", str(png)], [d], png, 2,
                        r"plot\.png already exists.*--overwrite", prev_output=True,
                        check=lambda: "the report was written although the plot was refused" if out.exists() else None)


#: argv of the diagnostics on one model (every role) writing report ``o`` (also used by tests/test_hostile_diag.py)
DIAG_ARGV: dict[str, Callable[[Workspace, Path, Path], list[str]]] = {
    "connectivity": lambda ws, m, o: ["connectivity", str(m), str(m), "--data", str(_jsonl(ws)), "--points", "2",
                                      "--max-tokens", "32", "--no-progress", "-o", str(o)],
    "similarity": lambda ws, m, o: ["similarity", "--source-base", str(m), "--source-finetuned", str(m),
                                    "--target-base", str(m), "--no-progress", "-o", str(o)],
    "check": lambda ws, m, o: ["check", "--source-base", str(m), "--source-finetuned", str(m), "--target-base", str(m),
                               "--data", str(_jsonl(ws)), "--max-tokens", "32", "--no-progress", "-o", str(o)],
}
for _cmd, _argv in DIAG_ARGV.items():
    _later(_cmd, _argv)
    _diag_cases(_cmd, _argv, plot=_cmd != "check")


@case("check: only the source fine-tune is pickle-only (refused before any model is loaded)", "later commands", "check")
def _check_sf_pickle(ws):
    marker = ws.root / "PWNED"
    sb, tb = ws.copy("source_base"), ws.copy("target_base")
    sf = make_pickle_model(ws, "source_finetuned", "sf_bin", marker)
    out = ws.out("report.json")
    return Spec(["check", "--source-base", str(sb), "--source-finetuned", str(sf), "--target-base", str(tb), "--data",
                 str(_jsonl(ws)), "--max-tokens", "32", "--no-progress", "-o", str(out)], [sb, sf, tb], out, 2,
                r"sf_bin holds only pickled weights \(pytorch_model\.bin\).*--allow-pickle", marker=marker,
                check=_no_marker(marker))


_later("finetune", lambda ws, m, o: ["finetune", "--model", str(m), "--data", str(DATA / "sft.jsonl"), "--steps", "1",
                                     "--device", "cpu", "--no-progress", "-o", str(o)], out_kind="dir", pickle_fix=r"safetensors only.*save_pretrained")
_later("evolve", lambda ws, m, o: ["evolve", str(_chain(ws, m)), "--no-progress", "-o", str(o)], out_kind="dir",
       remote_code=False, pickle_fix=r"safetensors only.*save_pretrained")


@case("lab run: nonexistent config file", "later commands", "lab")
def _lab_missing(ws):
    out = ws.out()
    return Spec(["lab", "run", str(ws.root / "no-such-config.yaml"), "--no-progress", "-o", str(out)], [], out, 2,
                r"no-such-config|not found|does not exist|preset")


# --------------------------------------------------------------------------------------------------
# running a case


def first_message_line(err: str, out: str = "") -> str:
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    for pattern in (r"^(error|interrupted|aborted)\b", r"^(Error|Usage|Traceback|╭)", r"^(WARNING|warning|wrote|plan:)"):
        for ln in lines:
            if re.match(pattern, ln):
                return ln
    return lines[0] if lines else ""


@dataclass
class Outcome:
    name: str
    category: str
    command: str
    rc: int | None
    expect_rc: int | tuple[int, ...]
    message: str
    inputs_intact: bool
    output_state: str  # "none" | "previous intact" | "complete" | problem text
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stderr: str = ""
    argv: list[str] = field(default_factory=list)  # the command line that reproduces the case (after `deltaport`)

    @property
    def ok(self) -> bool:
        return not self.problems


def in_process_runner(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in this process (fast; for tests). deltaport's log warnings go to the captured stderr,
    as they do in the real executable (whose ``logging.basicConfig`` handler can bind only once per process)."""
    import logging
    import traceback

    from deltaport.cli.main import main

    o, e = io.StringIO(), io.StringIO()
    log = logging.StreamHandler(e)
    log.setLevel(logging.WARNING)
    log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("deltaport").addHandler(log)
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                rc = main(list(argv))
            except Exception:  # noqa: BLE001 - what the real CLI would print before exiting 1
                traceback.print_exc()
                rc = 1
    finally:
        logging.getLogger("deltaport").removeHandler(log)
    return rc, o.getvalue(), e.getvalue()


def deltaport_exe() -> list[str]:
    exe = shutil.which("deltaport")
    return [exe] if exe else [sys.executable, "-c", "import sys; from deltaport.cli.main import main; sys.exit(main())"]


def subprocess_runner(argv: list[str], *, spec: Spec | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """Run the real ``deltaport`` executable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    p = subprocess.Popen(deltaport_exe() + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=spec.preexec if spec is not None and spec.preexec else None)
    if spec is not None and spec.signal_after is not None:
        try:
            out, err = p.communicate(timeout=spec.signal_after)
            return p.returncode, out, err
        except subprocess.TimeoutExpired:
            p.send_signal(spec.signal)
    out, err = p.communicate(timeout=timeout)
    rc = p.returncode
    return (128 - rc if rc < 0 else rc), out, err  # killed by signal N: report 128+N like a shell


def run_case(c: Case, ws: Workspace, runner: Callable[..., tuple[int, str, str]] = in_process_runner) -> Outcome:
    spec = c.build(ws)
    inputs_before = {str(p): tree_hash(p) for p in spec.inputs}
    prev = tree_hash(spec.output) if spec.output is not None and spec.prev_output else None
    t0 = time.perf_counter()
    if runner is subprocess_runner:
        rc, out, err = runner(spec.argv, spec=spec)
    else:
        rc, out, err = runner(spec.argv)
    secs = time.perf_counter() - t0
    problems = []
    if spec.after_run is not None:
        p = spec.after_run()
        if p:
            problems.append(p)
    expect = spec.expect_rc if isinstance(spec.expect_rc, tuple) else (spec.expect_rc,)
    if rc not in expect:
        problems.append(f"exit code {rc}, expected {spec.expect_rc}")
    if "Traceback (most recent call last)" in err:
        problems.append("a Python traceback was printed")
    if not re.search(spec.expect, err + out, re.S | re.M):
        problems.append(f"message does not match /{spec.expect}/")
    inputs_after = {str(p): tree_hash(p) for p in spec.inputs}
    inputs_intact = inputs_after == inputs_before
    if not inputs_intact:
        changed = [p for p in inputs_before if inputs_before[p] != inputs_after[p]]
        problems.append(f"input(s) modified: {changed}")
    state = "n/a"
    if spec.output is not None:
        left = leftovers(spec.output)
        if rc != 0:
            if spec.prev_output:
                state = "previous intact" if tree_hash(spec.output) == prev else "PREVIOUS OUTPUT CHANGED"
            else:
                state = "none" if not spec.output.exists() or spec.output == ws.root else "PARTIAL OUTPUT LEFT"
        else:
            state = "complete" if spec.output.exists() else "none"
            if spec.output.exists() and (spec.output / "deltaport.json").exists():
                try:
                    from deltaport.io.checkpoint import open_checkpoint

                    open_checkpoint(spec.output)
                except Exception as exc:  # noqa: BLE001
                    state = f"OUTPUT UNREADABLE: {exc}"
        if left:
            state += f"; LEFTOVERS {left}"
        if state not in ("none", "previous intact", "complete", "n/a"):
            problems.append(f"output: {state}")
    if spec.check is not None:
        p = spec.check()
        if p:
            problems.append(p)
    return Outcome(c.name, c.category, c.command, rc, spec.expect_rc, first_message_line(err, out), inputs_intact, state,
                   problems, secs, err, list(spec.argv))


def check_case(c: Case, pristine: dict, ws_dir: Path) -> Outcome:
    """Run case ``c`` in process and assert what every hostile case must hold: the catalogue's expected
    outcome, inputs intact, a failure that says ``error (SomeError): ...``, the pristine fixtures untouched."""
    before = {k: tree_hash(v) for k, v in pristine.items()}
    o = run_case(c, Workspace(ws_dir, pristine))
    assert o.ok, f"{c.name}: {o.problems}\nstderr:\n{o.stderr}"
    assert o.inputs_intact
    if o.rc != 0:  # an error names what is wrong: a path or a tensor, and the message is a deltaport error
        assert re.match(r"error \((\w+)\): ", o.message), o.message
    assert {k: tree_hash(v) for k, v in pristine.items()} == before
    return o


def available_commands() -> set[str]:
    from deltaport.cli.main import app

    names = set()
    for cmd in app.registered_commands:
        names.add(cmd.name or cmd.callback.__name__)
    for grp in app.registered_groups:
        names.add(grp.name)
    return names


def cases_for(commands: set[str] | None = None) -> tuple[list[Case], list[Case]]:
    """(cases whose command exists, cases skipped because it does not)."""
    commands = available_commands() if commands is None else commands
    run, skip = [], []
    for c in CASES:
        (run if c.needs is None or c.needs in commands else skip).append(c)
    return run, skip


# --------------------------------------------------------------------------------------------------
# many tensors, many shards (load, kill and determinism tests)


def make_many_family(root: str | Path, n_tensors: int = 2000, n_shards: int = 40, elems: int = 64,
                     seed: int = 0) -> dict[str, Path]:
    """Three synthetic checkpoints of ``n_tensors`` 1-D bf16 tensors in ``n_shards`` shards each (+ index,
    a config.json no architecture matches). Built with safetensors directly: no model class needed."""
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 8}.block{i % 8}.weight" for i in range(n_tensors)]
    base = {n: torch.randn(elems, generator=g).to(torch.bfloat16) for n in names}
    out = {}
    for role, noise in (("source_base", 0.0), ("source_finetuned", 1e-2), ("target_base", 5e-2)):
        d = root / role
        d.mkdir(parents=True)
        sd = {n: (t.float() + noise * torch.randn(elems, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        per = -(-n_tensors // n_shards)
        wm = {}
        for s in range(n_shards):
            part = names[s * per:(s + 1) * per]
            fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file({n: sd[n] for n in part}, str(d / fname), metadata={"format": "pt"})
            wm.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * 2 for t in sd.values())}, "weight_map": wm}, indent=2))
        (d / "config.json").write_text(json.dumps({"model_type": "deltaport-synthetic", "architectures": ["Synthetic"]}))
        out[role] = d
    return out


# --------------------------------------------------------------------------------------------------
# issue 25: an output folder that cannot be written, --shard-size, concurrent writers, a stale lock


def _immutable(d: Path) -> Callable[[], str | None]:
    """``chattr +i`` on ``d`` (as root ``chmod`` does not stop writes); the returned check lifts it again so
    the workspace can be removed, and reports anything written into ``d`` by the run."""
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+i", str(d)], check=True)

    def lift() -> str | None:
        subprocess.run(["chattr", "-i", str(d)], check=False)
        left = sorted(p.name for p in d.iterdir())
        return f"written into the read-only folder: {left}" if left else None

    return lift


def _ro_argv(ws: Workspace, cmd: str, out: Path) -> tuple[list[str], list[Path]]:
    """(argv of ``cmd`` writing ``out``, its inputs)."""
    if cmd == "transfer":
        fam = ws.family()
        return transfer_argv(fam, out), list(fam.values())
    if cmd == "diff":
        b, f = ws.copy("source_base"), ws.copy("source_finetuned")
        return ["diff", "--base", str(b), "--finetuned", str(f), "-o", str(out), "-q"], [b, f]
    if cmd == "compress":
        d = ws.copy("delta")
        return ["compress", str(d), "-o", str(out), "--method", "sign", "-q"], [d]
    m = ws.copy("target_base")
    return DIAG_ARGV[cmd](ws, m, out), [m]


for _cmd in ("transfer", "diff", "compress", "connectivity"):
    def _ro_case(cmd=_cmd):
        @case(f"{cmd}: output's parent folder is read-only (chattr +i)", "output safety", cmd)
        def _ro(ws):
            ro = ws.root / "rodir"
            out = ro / ("report.json" if cmd == "connectivity" else "out")
            argv, inputs = _ro_argv(ws, cmd, out)
            lift = _immutable(ro)
            return Spec(argv, inputs, out, 2, r"cannot write output .*rodir.*(not permitted|permission denied).*"
                        r"Nothing was written", check=lift)
    _ro_case()


for _size in ("0", "-5MB", "5XB", "abc", "12 MB MB"):
    def _size_case(size=_size):
        @case(f"--shard-size {size!r} (not a positive size)", "bad option")
        def _bad_size(ws):
            fam = ws.family()
            out = ws.out()
            return Spec(transfer_argv(fam, out, f"--shard-size={size}"), list(fam.values()), out, 2,
                        r"--shard-size .* (is not a size|a shard needs at least one byte)")
    _size_case()


@case("deltaport --help shows no <bool> placeholder", "usage", "deltaport")
def _help_no_bool(ws):
    return Spec(["--help"], [], None, 0, r"\A(?!.*<bool>).*Usage: .*Carry fine-tuning over")


_HOLDER = ("import sys\nfrom deltaport.io.atomic import acquire_output_lock\nacquire_output_lock(sys.argv[1])\n"
           "print('locked', flush=True)\nsys.stdin.read()\n")  # holds the lock until its stdin closes


@case("a second writer to an output another deltaport process is writing (refused at the start, names its pid)",
      "output safety")
def _concurrent_writer(ws):
    fam = ws.family()
    out = ws.out()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    if holder.stdout.readline().strip() != "locked":
        holder.kill()
        raise RuntimeError("the lock-holding child did not start")

    def release() -> str | None:  # the holder ends normally, so its lock file goes with it
        alive = holder.poll() is None
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
            return "the process holding the lock did not end"
        return None if alive else "the process holding the lock ended during the run"

    return Spec(transfer_argv(fam, out), list(fam.values()), out, 2,
                rf"another deltaport process \(pid {holder.pid}\) is writing .*out.*Nothing was written", after_run=release)


@case("a stale writer lock (its pid is gone) is taken over with a warning", "output safety")
def _stale_lock(ws):
    fam = ws.family()
    out = ws.out()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (ws.root / f".{out.name}{LOCK_TAG}").write_text(f"{gone.pid}\n")
    return Spec(transfer_argv(fam, out), list(fam.values()), out, 0,
                rf"took over the lock of .*out left by pid {gone.pid}, which is no longer running")


#: argv of the model-development commands on one model writing ``o``
LOOP_ARGV: dict[str, Callable[[Workspace, Path, Path], list[str]]] = {
    "eval": lambda ws, m, o: ["eval", str(m), "--tasks", str(TINY_QA), "--limit", "2", "--device", "cpu", "--no-cache",
                              "-o", str(o)],
    "finetune": lambda ws, m, o: ["finetune", "--model", str(m), "--data", str(DATA / "sft.jsonl"), "--steps", "1",
                                  "--device", "cpu", "--no-progress", "-o", str(o)],
    "evolve": lambda ws, m, o: ["evolve", str(_chain(ws, m)), "--no-progress", "-o", str(o)],
}
for _cmd in ("eval", "finetune", "evolve"):
    def _bin_beside_case(cmd=_cmd):
        @case(f"{cmd}: dir with .safetensors and a booby-trapped .bin whose index disagrees: .bin ignored, never "
              "unpickled", "later commands", cmd)
        def _bin_beside(ws):
            marker = ws.root / "PWNED"
            d = _stale_bin_beside(ws.copy("target_base"), marker)
            out = ws.out("report.json" if cmd == "eval" else "out")
            return Spec(LOOP_ARGV[cmd](ws, d, out), [d], out, 0, IGNORED_BIN, marker=marker, check=_no_marker(marker))
    _bin_beside_case()

for _cmd in ("connectivity", "check", "eval", "finetune", "evolve"):
    def _incomplete_case(cmd=_cmd):
        @case(f"{cmd}: model lacks a tensor (transformers would fill it at random)", "later commands", cmd)
        def _incomplete(ws):
            d = ws.copy("target_base")
            _resave(d, _drop_one)
            out = ws.out("report.json" if cmd in DIAG_ARGV or cmd == "eval" else "out")
            argv = (DIAG_ARGV.get(cmd) or LOOP_ARGV[cmd])(ws, d, out)
            return Spec(argv, [d], out, 2, r"missing from the checkpoint.*at random")
    _incomplete_case()
