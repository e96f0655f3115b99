"""Refusals before torch: every input the diagnostics (and compress, finetune) can refuse from files,
headers and options is refused in a fresh interpreter that has not imported torch or transformers by
then - so within the wall time of ``deltaport --help`` plus the headers' reading, whatever the size of
the models (the wall time itself is measured by ``benchmarks/refusal_bench.py``, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import test_torch_free as TF

models = TF.models  # the header-only family of test_torch_free (base, finetuned, reshaped, delta, ...)


def _calls(m: dict[str, str], root: Path) -> list[tuple[list[str], str]]:
    data = root / "text.jsonl"
    data.write_text('{"text": "a b c d"}\n' * 4)
    bad_json = root / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"txt": 1}\n')
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    out = str(root / "r.json")
    conn = ["connectivity", m["base"], m["finetuned"], "-o", out]
    check = ["check", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["finetuned"],
             "-o", out]
    return [
        (conn + ["--data", str(root / "missing.jsonl")], "does not exist"),
        (conn + ["--data", str(bad_json)], "bad.jsonl:2 has no string field"),
        (conn + ["--data", str(empty)], "has no documents"),
        (conn + ["--data", str(root)], "is a directory"),
        (conn + ["--data", str(data), "--dtype", "float8"], "unknown dtype 'float8'"),
        (conn + ["--data", str(data), "--device", "tpu"], "--device 'tpu' is not a torch device"),
        (conn + ["--data", str(data), "--points", "1"], "--points must be at least 2"),
        (conn + ["--data", str(data), "--max-tokens", "0"], "--max-tokens must be at least 2"),
        (["connectivity", m["base"], m["reshaped"], "-o", out, "--data", str(data)], "has shape (8, 12) in"),
        (check + ["--data", str(root / "missing.jsonl")], "does not exist"),
        (["check", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["reshaped"],
          "-o", out, "--data", str(data)], "has shape (8, 12) in"),
        (["similarity", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["reshaped"],
          "-o", out], "has shape (8, 12) in"),
        (["compress", m["delta"], "-o", str(root / "c"), "--method", "lowrank"], "needs --rank"),
        (["compress", m["delta"], "-o", str(root / "c"), "--method", "sparse", "--density", "0"], "density"),
        (["compress", m["delta"], "-o", str(root / "c"), "--method", "sign", "--shard-size", "5XB"], "is not a size"),
        (["finetune", "--model", m["base"], "--data", str(root / "missing.jsonl"), "-o", str(root / "ft")], "missing.jsonl"),
    ]


def test_refusals_import_neither_torch_nor_transformers(models, tmp_path):
    m = {k: str(v) for k, v in models.items()}
    cases = _calls(m, tmp_path)
    recs, text = TF._run([argv for argv, _ in cases])
    assert len(recs) == len(cases), text
    for (argv, why), rec in zip(cases, recs):
        assert rec["rc"] == 2, (argv, text)
        assert not rec["torch"] and not rec["transformers"], (argv, rec)
    for _, why in cases:
        assert why in text, (why, text[-3000:])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "c").exists()
