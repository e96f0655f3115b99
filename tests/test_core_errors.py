"""Every error path of diff/apply/transfer/inspect through the CLI: exit code, message, nothing written,
inputs unchanged."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from deltaport import testing as T
from deltaport.cli.main import main
from conftest import load_sd, tree_hash


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def transfer_argv(sb, sf, tb, out, *extra):
    return ["transfer", "--source-base", sb, "--source-finetuned", sf, "--target-base", tb, "-o", out, "-q", *extra]


@pytest.fixture
def fam(family, tmp_path):
    """A private copy of a family (tests corrupt it)."""
    p = family("llama", torch.float16)
    out = {}
    for k, v in p.items():
        out[k] = tmp_path / k
        shutil.copytree(v, out[k])
    return out


def _assert_clean(tmp_path, out, hashes, fam):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".deltaport-tmp-" in p.name]
    assert {k: tree_hash(v) for k, v in fam.items()} == hashes


def test_key_sets_differ(fam, tmp_path, capsys):
    sd = load_sd(fam["target_base"])
    sd["model.extra.weight"] = torch.zeros(3, dtype=torch.float16)
    for f in fam["target_base"].glob("model*.safetensors*"):
        f.unlink()
    save_file(sd, str(fam["target_base"] / "model.safetensors"), metadata={"format": "pt"})
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o"), capsys)
    assert code == 2 and "model.extra.weight" in err and "--shape-policy skip" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)


def test_shapes_differ(fam, tmp_path, capsys):
    wide = T.make_model("llama", seed=9, dtype=torch.float16, intermediate_size=40)
    shutil.rmtree(fam["target_base"])
    T.save(wide, fam["target_base"])
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o"), capsys)
    assert code == 2 and "shapes differ" in err and "[48, 32]" in err and "[40, 32]" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)


def test_dtypes_that_cannot_be_combined(fam, tmp_path, capsys):
    sd = load_sd(fam["source_finetuned"])
    sd["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    for f in fam["source_finetuned"].glob("model*.safetensors*"):
        f.unlink()
    save_file(sd, str(fam["source_finetuned"] / "model.safetensors"), metadata={"format": "pt"})
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o"), capsys)
    assert code == 2 and "model.norm.weight" in err and "dtypes cannot be combined" in err and "int32" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)


def test_nan_inf_produced_fails_with_exit_1(fam, tmp_path, capsys):
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o",
                                     "--scale", "1e9"), capsys)
    assert code == 1 and "NaN/Inf" in err and "from finite inputs" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)


def test_nan_in_input_warns_or_fails_with_strict(fam, tmp_path, capsys):
    sd = load_sd(fam["target_base"])
    sd["model.norm.weight"][3] = float("nan")
    for f in fam["target_base"].glob("model*.safetensors*"):
        f.unlink()
    save_file(sd, str(fam["target_base"] / "model.safetensors"), metadata={"format": "pt"})
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    argv = transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "s", "--strict")
    code, _, err = run(argv, capsys)
    assert code == 2 and "model.norm.weight" in err and "--strict" in err
    _assert_clean(tmp_path, tmp_path / "s", hashes, fam)
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "w"), capsys)
    assert code == 0 and "NaN/Inf in inputs" in err
    assert json.loads((tmp_path / "w" / "deltaport.json").read_text())["nonfinite_inputs"] == ["model.norm.weight"]


def test_missing_shard(fam, tmp_path, capsys):
    shard = sorted(fam["source_base"].glob("model-*.safetensors"))[1]
    shard.unlink()
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o"), capsys)
    assert code == 2 and shard.name in err and "missing" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)


def test_corrupt_header(fam, tmp_path, capsys):
    shard = sorted(fam["target_base"].glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    shard.write_bytes(bytes(data))
    hashes = {k: tree_hash(v) for k, v in fam.items()}
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o"), capsys)
    assert code == 2 and shard.name in err and "header length" in err
    _assert_clean(tmp_path, tmp_path / "o", hashes, fam)
    code, _, err = run(["inspect", fam["target_base"]], capsys)
    assert code == 2 and shard.name in err


def test_invalid_header_json(fam, tmp_path, capsys):
    shard = sorted(fam["source_finetuned"].glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"XXXX"
    shard.write_bytes(bytes(data))
    code, _, err = run(["inspect", fam["source_finetuned"]], capsys)
    assert code == 2 and shard.name in err


def test_apply_to_mismatched_target_needs_force(fam, tmp_path, capsys):
    code, _, err = run(["diff", "--base", fam["source_base"], "--finetuned", fam["source_finetuned"], "-o", tmp_path / "d", "-q"], capsys)
    assert code == 0, err
    other = T.make_model("llama", seed=4, dtype=torch.float16, num_hidden_layers=3)
    T.save(other, tmp_path / "other")
    code, _, err = run(["apply", tmp_path / "d", "--to", tmp_path / "other", "-o", tmp_path / "o", "-q"], capsys)
    assert code == 2 and "model.layers.2" in err and "--force" in err and not (tmp_path / "o").exists()
    code, _, err = run(["apply", tmp_path / "d", "--to", tmp_path / "other", "-o", tmp_path / "o", "-q", "--force"], capsys)
    assert code == 0, err
    prov = json.loads((tmp_path / "o" / "deltaport.json").read_text())
    assert prov["forced"] and any("model.layers.2" in m for m in prov["forced"])


def test_output_exists_and_overwrite_swaps(fam, tmp_path, capsys):
    out = tmp_path / "o"
    argv = transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], out)
    assert run(argv, capsys)[0] == 0
    first = tree_hash(out)
    code, _, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err and tree_hash(out) == first
    code, _, err = run(argv[:-1] + ["--scale", "0.5", "-q", "--overwrite"], capsys)
    assert code == 0 and tree_hash(out) != first
    assert not [p for p in tmp_path.iterdir() if ".deltaport-" in p.name]


def test_output_inside_an_input_refused(fam, capsys):
    argv = transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], fam["target_base"] / "out")
    code, _, err = run(argv, capsys)
    assert code == 2 and "inside input" in err and not (fam["target_base"] / "out").exists()
    argv = transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], fam["target_base"].parent, "--overwrite")
    code, _, err = run(argv, capsys)
    assert code == 2 and "contains input" in err


def test_usage_errors_exit_2(fam, tmp_path, capsys):
    code, _, err = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o",
                                     "--vocab-policy", "nope"), capsys)
    assert code == 2 and "--vocab-policy" in err
    code, _, _ = run(["transfer", "--source-base", fam["source_base"]], capsys)
    assert code == 2
    code, _, err = run(["inspect", tmp_path / "does-not-exist"], capsys)
    assert code == 2 and "does-not-exist" in err


def test_inspect_json_and_dry_run_cli(fam, tmp_path, capsys):
    code, out, _ = run(["inspect", fam["source_base"], "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["num_tensors"] == 21 and info["config"]["model_type"] == "llama"
    code, out, _ = run(transfer_argv(fam["source_base"], fam["source_finetuned"], fam["target_base"], tmp_path / "o", "--dry-run"), capsys)
    assert code == 0 and "plan: transfer" in out and not (tmp_path / "o").exists()
