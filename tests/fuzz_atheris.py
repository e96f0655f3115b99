"""Coverage-guided fuzzing of the safetensors/index readers with atheris (libFuzzer).

    mkdir corpus && python tests/fuzz_atheris.py corpus -runs=100000 -timeout=10 -max_len=8192

Each input is split into a shard's raw bytes and an index file's bytes; both are written into a fresh
temporary model directory, then ``deltaport.inspect`` and a ``transfer`` dry run read it. Anything but a
:class:`deltaport.errors.DeltaportError` (or success) is a crash; libFuzzer's -timeout catches hangs.
Run by ``tests/test_fuzz.py::test_atheris_raw_header_bytes`` when atheris is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atheris  # noqa: E402
import safetensors  # noqa: E402,F401 - imported un-instrumented: coverage is wanted for deltaport only
import torch  # noqa: E402,F401

with atheris.instrument_imports(include=["deltaport"]):
    import deltaport.io.checkpoint  # noqa: F401
    import deltaport.plan  # noqa: F401
    from deltaport.errors import DeltaportError
    from deltaport.inspect import inspect
    from deltaport.api import transfer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_cases as H  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="deltaport-atheris-"))
SEED = H.make_many_family(ROOT / "seed", n_tensors=6, n_shards=2, elems=8)
SHARD = "model-00001-of-00002.safetensors"
SEED_SHARD = (SEED["source_finetuned"] / SHARD).read_bytes()
SEED_INDEX = (SEED["source_finetuned"] / "model.safetensors.index.json").read_bytes()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    case = Path(tempfile.mkdtemp(dir=ROOT))
    try:
        d = Path(shutil.copytree(SEED["source_finetuned"], case / "m"))
        if mode == 0:  # raw shard bytes
            (d / SHARD).write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
        elif mode == 1:  # seed shard with a byte-level splice
            pos = fdp.ConsumeIntInRange(0, len(SEED_SHARD))
            (d / SHARD).write_bytes(SEED_SHARD[:pos] + fdp.ConsumeBytes(fdp.remaining_bytes()))
        elif mode == 2:  # raw index bytes
            (d / "model.safetensors.index.json").write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
        else:  # index JSON with one fuzzed weight-map entry
            idx = json.loads(SEED_INDEX)
            idx["weight_map"][fdp.ConsumeUnicodeNoSurrogates(16)] = fdp.ConsumeUnicodeNoSurrogates(40)
            (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        try:
            inspect(d)
        except DeltaportError:
            pass
        try:
            transfer(SEED["source_base"], d, SEED["target_base"], case / "out", dry_run=True)
        except DeltaportError:
            pass
        assert not (case / "out").exists(), "a dry run wrote its output"
    finally:
        shutil.rmtree(case, ignore_errors=True)


def _seed_corpus() -> None:
    """Fill an empty corpus directory given on the command line with valid inputs of every mode."""
    for a in sys.argv[1:]:
        d = Path(a)
        if a.startswith("-") or not d.is_dir() or any(d.iterdir()):
            continue
        for m, body in ((0, SEED_SHARD), (1, SEED_SHARD[8:]), (2, SEED_INDEX), (3, b"model.x\x00m.safetensors")):
            (d / f"seed-{m}-front").write_bytes(bytes([m]) + body)
            (d / f"seed-{m}-back").write_bytes(body + bytes([m]))


def main() -> None:
    _seed_corpus()
    try:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
