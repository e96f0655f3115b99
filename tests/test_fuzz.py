"""Fuzzing: mutated safetensors headers and index files fed to ``inspect`` and ``transfer --dry-run``.

Properties, for every generated input: the command ends (each case under a hard time limit) with exit
code 0 or 2 - never a crash, a traceback or another exit code; the message of a refusal is a deltaport
error; nothing is written anywhere outside the case's own temporary folder (checked with a Python audit
hook on every open-for-write, mkdir, rename and remove); the mutated input itself is not modified.

hypothesis drives structured mutations (JSON-level: dtypes, shapes, offsets, names, types, header
length, truncation; index weight maps); atheris (libFuzzer, coverage-guided) drives raw bytes through
``tests/fuzz_atheris.py`` when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hostile_cases as H

HERE = Path(__file__).resolve().parent
CASE_SECONDS = 10  # hard limit per generated case

# ---------------------------------------------------------------------------------------------------
# an audit hook that records writes outside the allowed folder while armed

_ARMED: dict = {"root": None, "violations": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _outside(path) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    root = _ARMED["root"]
    return not (p == root or p.startswith(root + os.sep)) and p != os.devnull


def _audit(event, args):
    if _ARMED["root"] is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and _outside(path):
            _ARMED["violations"].append((event, path, mode, flags))
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.symlink", "os.link"):
        if args and _outside(args[0]):
            _ARMED["violations"].append((event, args[0]))
    elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
        if len(args) > 1 and (_outside(args[0]) or _outside(args[1])):
            _ARMED["violations"].append((event, args[0], args[1]))


sys.addaudithook(_audit)


class _Timeout(Exception):
    pass


@contextmanager
def _armed(root: Path):
    def on_alarm(signum, frame):
        raise _Timeout(f"case ran longer than {CASE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_SECONDS)
    _ARMED["root"], _ARMED["violations"] = os.path.realpath(root), []
    try:
        yield _ARMED["violations"]
    finally:
        _ARMED["root"] = None
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------
# seeds


@pytest.fixture(scope="module")
def seed_family(tmp_path_factory):
    """A small synthetic family: 12 tensors in 3 shards per model (no model class needed)."""
    return H.make_many_family(tmp_path_factory.mktemp("fuzzseed"), n_tensors=12, n_shards=3, elems=16)


def _check_run(argv: list[str], root: Path, mutated: Path) -> None:
    before = H.tree_hash(mutated)
    with _armed(root) as violations:
        rc, out, err = H.in_process_runner(argv)
    assert rc in (0, 2), f"exit code {rc} for {argv}\n{err}"
    assert "Traceback" not in err, err
    if rc == 2:
        assert H.first_message_line(err).startswith("error ("), err
    assert not violations, violations
    assert H.tree_hash(mutated) == before


def _run_both(fam: dict[str, Path], mutated_role: str, root: Path) -> None:
    _check_run(["inspect", str(fam[mutated_role]), "--json"], root, fam[mutated_role])
    _check_run(H.transfer_argv(fam, root / "out", "--dry-run"), root, fam[mutated_role])
    assert not (root / "out").exists()


@contextmanager
def _case_dir(fam: dict[str, Path]):
    root = Path(tempfile.mkdtemp(prefix="fuzzcase-"))
    try:
        yield root, {r: Path(shutil.copytree(d, root / r)) for r, d in fam.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# header mutations

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))
_json_value = st.recursive(_json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=8)
_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                           "U16", "U64", "C64", "Q4", "", "f32"])
_ints = st.one_of(st.integers(-5, 5000), st.sampled_from([0, 2**31, 2**32 - 1, 2**63 - 1, 2**64, -2**63]))

_header_mutation = st.one_of(
    st.tuples(st.just("dtype"), _dtypes),
    st.tuples(st.just("shape"), st.lists(_ints, max_size=4)),
    st.tuples(st.just("offsets"), st.lists(_ints, min_size=0, max_size=3)),
    st.tuples(st.just("drop_key"), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("value"), _json_value),
    st.tuples(st.just("rename"), st.text(max_size=20)),
    st.tuples(st.just("add_tensor"), st.tuples(st.text(max_size=10), _dtypes, st.lists(_ints, max_size=3),
                                               st.lists(_ints, max_size=2))),
    st.tuples(st.just("metadata"), _json_value),
    st.tuples(st.just("whole_header"), _json_value),
    st.tuples(st.just("header_len"), st.one_of(st.integers(0, 4096), st.sampled_from([2**63, 2**64 - 1, 100_000_001]))),
    st.tuples(st.just("truncate"), st.integers(0, 4096)),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 4096), st.integers(0, 255))),
    st.tuples(st.just("append"), st.binary(max_size=64)),
)


_EDITS = ("dtype", "shape", "offsets", "drop_key", "value", "rename", "add_tensor", "metadata")  # need an object


def mutate_shard(path: Path, muts: list, pick: int) -> None:
    raw = path.read_bytes()
    header, data = H.st_read(path)
    names = [k for k in header if k != "__metadata__"]
    tgt = names[pick % len(names)]
    header_len = None
    raw_mode: list = []
    for kind, arg in muts:
        if kind in _EDITS and not isinstance(header, dict):
            continue  # an earlier whole_header made the header a non-object: there is nothing left to edit
        if kind == "dtype" and isinstance(header.get(tgt), dict):
            header[tgt]["dtype"] = arg
        elif kind == "shape" and isinstance(header.get(tgt), dict):
            header[tgt]["shape"] = arg
        elif kind == "offsets" and isinstance(header.get(tgt), dict):
            header[tgt]["data_offsets"] = arg
        elif kind == "drop_key" and isinstance(header.get(tgt), dict):
            header[tgt].pop(arg, None)
        elif kind == "value" and tgt in header:
            header[tgt] = arg
        elif kind == "rename" and tgt in header:
            header[arg] = header.pop(tgt)
            tgt = arg
        elif kind == "add_tensor":
            n, dt, shape, offs = arg
            header[n] = {"dtype": dt, "shape": shape, "data_offsets": offs}
        elif kind == "metadata":
            header["__metadata__"] = arg
        elif kind == "whole_header":
            header = arg
        elif kind == "header_len":
            header_len = arg
        else:
            raw_mode.append((kind, arg))
    try:
        hb = json.dumps(header).encode()
    except (ValueError, TypeError):
        hb = b"{}"
    hb += b" " * (-len(hb) % 8)
    out = struct.pack("<Q", len(hb) if header_len is None else header_len % 2**64) + hb + data
    for kind, arg in raw_mode:
        if kind == "truncate":
            out = out[: arg % (len(out) + 1)]
        elif kind == "flip" and out:
            i, b = arg
            out = out[: i % len(out)] + bytes([b]) + out[i % len(out) + 1:]
        elif kind == "append":
            out = out + arg
    path.write_bytes(out)
    del raw


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(role=st.sampled_from(H.ROLES), shard=st.integers(0, 2), pick=st.integers(0, 11),
       muts=st.lists(_header_mutation, min_size=1, max_size=3))
def test_fuzz_safetensors_headers(seed_family, role, shard, pick, muts):
    with _case_dir(seed_family) as (root, fam):
        mutate_shard(H.shards(fam[role])[shard], muts, pick)
        _run_both(fam, role, root)


# ---------------------------------------------------------------------------------------------------
# index mutations

_fname = st.one_of(st.sampled_from(["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                    "model-00003-of-00003.safetensors", "model-00009-of-00003.safetensors",
                                    "../model-00001-of-00003.safetensors", "/etc/passwd", ".hidden.safetensors",
                                    "config.json", "model.safetensors.index.json", "", "sub/dir.safetensors"]),
                   st.text(max_size=16), st.integers(), st.none())

_index_mutation = st.one_of(
    st.tuples(st.just("remap"), st.tuples(st.integers(0, 11), _fname)),
    st.tuples(st.just("drop"), st.integers(0, 11)),
    st.tuples(st.just("add"), st.tuples(st.text(max_size=16), _fname)),
    st.tuples(st.just("weight_map"), _json_value),
    st.tuples(st.just("whole"), _json_value),
    st.tuples(st.just("metadata"), _json_value),
    st.tuples(st.just("raw"), st.binary(max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, 2000)),
)


def mutate_index(d: Path, muts: list) -> None:
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    raw_mode = []
    for kind, arg in muts:
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        names = sorted(wm) if isinstance(wm, dict) else []
        if kind == "remap" and names:
            wm[names[arg[0] % len(names)]] = arg[1]
        elif kind == "drop" and names:
            del wm[names[arg % len(names)]]
        elif kind == "add" and isinstance(wm, dict):
            wm[arg[0]] = arg[1]
        elif kind == "weight_map" and isinstance(idx, dict):
            idx["weight_map"] = arg
        elif kind == "whole":
            idx = arg
        elif kind == "metadata" and isinstance(idx, dict):
            idx["metadata"] = arg
        elif kind in ("raw", "truncate"):
            raw_mode.append((kind, arg))
    try:
        out = json.dumps(idx).encode()
    except (ValueError, TypeError):
        out = b"{}"
    for kind, arg in raw_mode:
        out = arg if kind == "raw" else out[: arg % (len(out) + 1)]
    p.write_bytes(out)


@settings(max_examples=80, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(role=st.sampled_from(H.ROLES), muts=st.lists(_index_mutation, min_size=1, max_size=3))
def test_fuzz_index_files(seed_family, role, muts):
    with _case_dir(seed_family) as (root, fam):
        mutate_index(fam[role], muts)
        _run_both(fam, role, root)


# ---------------------------------------------------------------------------------------------------
# a delta's deltaport.json (what apply trusts about the delta's base)

_prov_key = st.sampled_from(["kind", "base", "policies", "inputs", "delta_dtype", "lora", "formula"])
_prov_mutation = st.one_of(
    st.tuples(st.just("set"), st.tuples(_prov_key, _json_value)),
    st.tuples(st.just("set"), st.tuples(st.sampled_from(["base", "policies"]), _json_scalar)),
    st.tuples(st.just("del"), _prov_key),
    st.tuples(st.just("base_field"), st.tuples(st.sampled_from(["tensors", "structure", "source"]), _json_value)),
    st.tuples(st.just("base_tensor"), st.tuples(st.integers(0, 30), _json_value)),
    st.tuples(st.just("whole"), _json_value),
)


@pytest.fixture(scope="module")
def seed_delta(seed_family, tmp_path_factory):
    from deltaport.api import diff

    out = tmp_path_factory.mktemp("fuzzdelta") / "delta"
    diff(seed_family["source_base"], seed_family["source_finetuned"], out)
    return out


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(muts=st.lists(_prov_mutation, min_size=1, max_size=3))
@example(muts=[("set", ("base", None))])
def test_fuzz_delta_provenance(seed_family, seed_delta, muts):
    with _case_dir({"target_base": seed_family["target_base"], "delta": seed_delta}) as (root, dirs):
        p = dirs["delta"] / "deltaport.json"
        prov = json.loads(p.read_text())
        for kind, arg in muts:
            if kind == "set" and isinstance(prov, dict):
                prov[arg[0]] = arg[1]
            elif kind == "del" and isinstance(prov, dict):
                prov.pop(arg, None)
            elif kind == "base_field" and isinstance(prov, dict) and isinstance(prov.get("base"), dict):
                prov["base"][arg[0]] = arg[1]
            elif kind == "base_tensor" and isinstance(prov, dict) and isinstance(prov.get("base"), dict) \
                    and isinstance(prov["base"].get("tensors"), dict) and prov["base"]["tensors"]:
                names = sorted(prov["base"]["tensors"])
                prov["base"]["tensors"][names[arg[0] % len(names)]] = arg[1]
            elif kind == "whole":
                prov = arg
        try:
            p.write_text(json.dumps(prov))
        except (ValueError, TypeError):
            p.write_text("{}")
        _check_run(["inspect", str(dirs["delta"]), "--json"], root, dirs["delta"])
        _check_run(["apply", str(dirs["delta"]), "--to", str(dirs["target_base"]), "-o", str(root / "out"), "--dry-run"],
                   root, dirs["delta"])
        assert not (root / "out").exists()


def test_audit_hook_catches_a_write_outside(tmp_path):
    """The no-write property can fail: a write outside the armed folder is recorded."""
    outside = tmp_path / "outside.txt"
    with _armed(tmp_path / "inner") as violations:
        outside.write_text("x")
    assert violations and violations[0][0] == "open"


# ---------------------------------------------------------------------------------------------------
# atheris (coverage-guided, raw bytes), when it is installed


def test_atheris_raw_header_bytes(tmp_path):
    pytest.importorskip("atheris")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    (tmp_path / "corpus").mkdir()
    r = subprocess.run([sys.executable, str(HERE / "fuzz_atheris.py"), "corpus", "-runs=2000", "-max_total_time=30",
                        "-timeout=10", "-max_len=8192", "-seed=1"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert "Done" in tail, tail
