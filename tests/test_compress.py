"""``deltaport compress``: the compressed delta format (docs/FORMAT.md), its exact cases, and apply of it."""

from __future__ import annotations

import json

import pytest
import torch

import deltaport
from deltaport.cli.main import main
from deltaport.compression import decompress
from conftest import assert_bit_equal, bits, load_sd, tree_hash


@pytest.fixture(scope="module")
def fam(family, tmp_path_factory):
    p = family("llama", torch.bfloat16)
    root = tmp_path_factory.mktemp("compress")
    deltaport.diff(p["source_base"], p["source_finetuned"], root / "delta")
    deltaport.apply(root / "delta", p["target_base"], root / "exact", scale=0.7)
    return {**p, "delta": root / "delta", "exact": root / "exact", "root": root}


def _compress(fam, name, **kw):
    out = fam["root"] / name
    if not out.exists():
        deltaport.compress(fam["delta"], out, **kw)
    return out


@pytest.mark.parametrize("kw", [dict(method="lowrank", rank=3), dict(method="sparse", density=0.25),
                                dict(method="sign")], ids=["lowrank", "sparse", "sign"])
def test_apply_of_compressed_equals_apply_of_decompressed_dense(fam, tmp_path, kw):
    c = _compress(fam, f"c-{kw['method']}", **kw)
    decompress(c, tmp_path / "dense")
    deltaport.apply(c, fam["target_base"], tmp_path / "a", scale=0.7)
    deltaport.apply(tmp_path / "dense", fam["target_base"], tmp_path / "b", scale=0.7)
    assert_bit_equal(load_sd(tmp_path / "a"), load_sd(tmp_path / "b"))
    # and it is not the exact transfer (the compression did something)
    a, e = load_sd(tmp_path / "a"), load_sd(fam["exact"])
    assert any(not torch.equal(bits(a[k]), bits(e[k])) for k in a)


def test_sparse_at_density_one_is_exact(fam, tmp_path):
    c = _compress(fam, "c-sparse-1", method="sparse", density=1.0)
    deltaport.apply(c, fam["target_base"], tmp_path / "a", scale=0.7)
    assert_bit_equal(load_sd(tmp_path / "a"), load_sd(fam["exact"]))
    comp = json.loads((c / "deltaport.json").read_text())["compression"]
    errs = [r["rel_frobenius_error"] for r in comp["tensors"].values()]
    assert max(errs) == 0.0


def test_lowrank_at_full_rank_is_within_one_step_of_exact(fam, tmp_path):
    """Factors are float32: D = B·A reproduces Δ to ~1e-7 relative, so the output is the exact transfer's value
    or one of its neighbours (documented in docs/compression.md)."""
    c = _compress(fam, "c-lowrank-full", method="lowrank", rank=1000)
    comp = json.loads((c / "deltaport.json").read_text())["compression"]
    assert max(r["rel_frobenius_error"] for r in comp["tensors"].values()) < 1e-6
    deltaport.apply(c, fam["target_base"], tmp_path / "a", scale=0.7)
    a, e = load_sd(tmp_path / "a"), load_sd(fam["exact"])
    for k in a:
        steps = (bits(a[k]).to(torch.int32) - bits(e[k]).to(torch.int32)).abs()
        assert int(steps.max()) <= 1, k


def test_provenance_records_each_tensor(fam):
    c = _compress(fam, "c-sparse", method="sparse", density=0.25)
    comp = json.loads((c / "deltaport.json").read_text())["compression"]
    assert comp["format"] == "deltaport-compressed-delta" and comp["version"] == 1 and comp["seed"] == 0
    t = comp["tensors"]
    assert t["model.embed_tokens.weight"]["method"] == "exact" and "vocabulary" in t["model.embed_tokens.weight"]["reason"]
    assert t["model.norm.weight"]["method"] == "exact"
    q = t["model.layers.0.self_attn.q_proj.weight"]
    # DARE's error is sqrt((1 - p) / p) of ‖Δ‖ in expectation: sqrt(3) at p = 1/4
    assert q["method"] == "sparse" and q["density"] == 0.25 and abs(q["rel_frobenius_error"] - 3 ** 0.5) < 0.15
    n = 32 * 32
    assert q["bytes_before"] == 4 * n and q["bytes_after"] == n // 8 + 4 * q["kept"]
    sd = load_sd(c)
    assert sd["model.layers.0.self_attn.q_proj.weight@sparse.values"].numel() == q["kept"]
    assert "model.layers.0.self_attn.q_proj.weight" not in sd


def test_reruns_are_byte_identical_and_seed_changes_the_mask(fam, tmp_path, monkeypatch):
    import deltaport.compression as C

    monkeypatch.setattr(C, "EXACT_SVD_MAX", 0)  # the randomised SVD too
    for name, kw in (("s", dict(method="sparse", density=0.3)), ("l", dict(method="lowrank", rank=2))):
        deltaport.compress(fam["delta"], tmp_path / f"{name}1", **kw)
        deltaport.compress(fam["delta"], tmp_path / f"{name}2", **kw)
        assert tree_hash(tmp_path / f"{name}1") == tree_hash(tmp_path / f"{name}2")
    prov = json.loads((tmp_path / "l1" / "deltaport.json").read_text())["compression"]
    assert prov["tensors"]["model.layers.0.mlp.up_proj.weight"]["solver"].startswith("randomized")
    deltaport.compress(fam["delta"], tmp_path / "s3", method="sparse", density=0.3, seed=1)
    assert tree_hash(tmp_path / "s1") != tree_hash(tmp_path / "s3")


def test_lowrank_and_sign_at_most_an_eighth_of_the_exact_bytes(fam, tmp_path):
    exact = sum(f.stat().st_size for f in fam["delta"].glob("*.safetensors"))
    for name, kw in (("sign", dict(method="sign")), ("lr", dict(method="lowrank", rank=1))):  # k/v_proj are 16x32
        deltaport.compress(fam["delta"], tmp_path / name, include=["."], **kw)
        got = sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
        assert got <= exact / 8, (name, got, exact)
        assert main(["apply", str(tmp_path / name), "--to", str(fam["target_base"]), "-o", str(tmp_path / f"{name}-out")]) == 0
    comp = json.loads((tmp_path / "sign" / "deltaport.json").read_text())["compression"]
    assert comp["tensors"]["model.embed_tokens.weight"]["method"] == "sign"  # --include names vocabulary tensors


def test_inspect_shows_the_format(fam, capsys):
    c = _compress(fam, "c-sign", method="sign")
    from deltaport.inspect import inspect  # (deltaport.inspect is the module once imported)

    info = inspect(c)
    assert info["compression"]["version"] == 1 and info["compression"]["method"] == "sign"
    assert main(["inspect", str(c)]) == 0
    assert "compressed delta (format deltaport-compressed-delta v1): sign" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--method", "lowrank", "--rank", "0"], "--rank must be a positive integer"),
    (["--method", "lowrank"], "needs --rank"),
    (["--method", "sparse", "--density", "0"], "--density must be in (0, 1]"),
    (["--method", "sparse", "--density", "1.5"], "--density must be in (0, 1]"),
    (["--method", "svd", "--rank", "2"], "'--method': 'svd' is not one of 'lowrank', 'sparse', 'sign'"),
    (["--method", "sign", "--include", "nothing-matches"], "no tensor of"),
])
def test_bad_options_exit_2(fam, tmp_path, capsys, args, msg):
    assert main(["compress", str(fam["delta"]), "-o", str(tmp_path / "out")] + args) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_not_a_delta_and_already_compressed_exit_2(fam, tmp_path, capsys):
    assert main(["compress", str(fam["target_base"]), "-o", str(tmp_path / "o"), "--method", "sign"]) == 2
    assert "is not a deltaport delta" in capsys.readouterr().err
    c = _compress(fam, "c-sign", method="sign")
    assert main(["compress", str(c), "-o", str(tmp_path / "o"), "--method", "sign"]) == 2
    assert "already compressed" in capsys.readouterr().err


def test_unknown_format_version_refused(fam, tmp_path, capsys):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(_compress(fam, "c-sign", method="sign"), c)
    prov = json.loads((c / "deltaport.json").read_text())
    prov["compression"]["version"] = 2
    (c / "deltaport.json").write_text(json.dumps(prov))
    assert main(["apply", str(c), "--to", str(fam["target_base"]), "-o", str(tmp_path / "o")]) == 2
    assert "format version 2" in capsys.readouterr().err


def test_compress_reads_one_tensor_at_a_time(fam, tmp_path, monkeypatch):
    """Memory by design: compress reads whole tensors one by one (Checkpoint.tensor), never the model."""
    from deltaport.io.checkpoint import Checkpoint

    calls = []
    orig = Checkpoint.tensor

    def spy(self, name):
        calls.append(name)
        return orig(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", spy)
    deltaport.compress(fam["delta"], tmp_path / "c", method="lowrank", rank=2)
    delta_names = set(load_sd(fam["delta"]))
    assert set(calls) == delta_names
    assert len(calls) == len(delta_names)  # lowrank's two parts are adjacent: each tensor read once


def test_nonfinite_delta_tensor_is_an_input_error(fam, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "d"
    shutil.copytree(fam["delta"], d)
    w = "model.layers.0.mlp.up_proj.weight"
    for f in d.glob("*.safetensors"):
        sd = load_file(str(f))
        if w in sd:
            sd[w].view(-1)[3] = float("nan")
            save_file(sd, str(f), metadata={"format": "pt"})
    assert main(["compress", str(d), "-o", str(tmp_path / "o"), "--method", "lowrank", "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert f"Δ tensor {w} holds NaN/Inf" in err and "--exclude" in err
    assert not (tmp_path / "o").exists()


def test_dry_run_counts_the_compressed_parts_read(fam):
    c = _compress(fam, "c-sign", method="sign")
    plan = deltaport.apply(c, fam["target_base"], "unused", dry_run=True).plan
    from deltaport.io.checkpoint import open_checkpoint

    # every stored byte of the compressed delta (parts and exact tensors) and of the target is read once
    assert plan.total_in_bytes == open_checkpoint(c).total_bytes() + open_checkpoint(fam["target_base"]).total_bytes()


def test_lowrank_exported_as_peft_adapter(fam, tmp_path, capsys):
    """The adapter adds B·A (scaling 1): a LoRA transfer with it writes the bytes apply of the compressed delta
    writes for the low-rank tensors; PEFT loads and merges it to within one bf16 step."""
    c, a = tmp_path / "c", tmp_path / "adapter"
    assert main(["compress", str(fam["delta"]), "-o", str(c), "--method", "lowrank", "--rank", "4", "--peft", str(a)]) == 0
    assert "wrote PEFT adapter" in capsys.readouterr().err
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4
    rec = json.loads((a / "export.json").read_text())
    assert "model.norm.weight" in rec["not_in_adapter"]
    proj = r"_proj\.weight$"
    deltaport.transfer(fam["source_base"], a, fam["target_base"], tmp_path / "via-lora", scale=0.7)
    deltaport.apply(c, fam["target_base"], tmp_path / "via-apply", scale=0.7, include=[proj])
    assert_bit_equal(load_sd(tmp_path / "via-lora"), load_sd(tmp_path / "via-apply"))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(fam["target_base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(m, a).merge_and_unload().state_dict()
    deltaport.apply(c, fam["target_base"], tmp_path / "full", include=[proj], out_dtype="float32")
    want = load_sd(tmp_path / "full")
    for k in want:
        assert torch.allclose(merged[k], want[k], rtol=0, atol=1e-6), k


def test_peft_export_needs_lowrank(fam, tmp_path, capsys):
    assert main(["compress", str(fam["delta"]), "-o", str(tmp_path / "o"), "--method", "sign", "--peft", str(tmp_path / "a")]) == 2
    assert "use it with --method lowrank" in capsys.readouterr().err


def test_every_method_keeps_the_vocabulary_exact_by_default_and_the_summary_says_why(fam, tmp_path, capsys):
    """The default is the lab frontier's recommendation since design v4 (vocabulary exact: docs/compression.md);
    --include compresses vocabulary tensors, and the summary says what it did and why, with their share."""
    assert main(["compress", str(fam["delta"]), "-o", str(tmp_path / "lr"), "--method", "lowrank", "--rank", "2",
                 "--include", "."]) == 0
    err = capsys.readouterr().err
    comp = json.loads((tmp_path / "lr" / "deltaport.json").read_text())["compression"]
    vocab = [n for n in comp["tensors"] if "embed_tokens" in n or "lm_head" in n]
    assert vocab and all(comp["tensors"][n]["method"] == "lowrank" for n in vocab)
    assert "vocabulary tensors compressed too" in err and "named by --include" in err
    assert main(["compress", str(fam["delta"]), "-o", str(tmp_path / "lr-default"), "--method", "lowrank", "--rank", "2"]) == 0
    err = capsys.readouterr().err
    comp = json.loads((tmp_path / "lr-default" / "deltaport.json").read_text())["compression"]
    assert all(comp["tensors"][n]["method"] == "exact" for n in vocab)
    assert "kept exact" in err and "the lab frontier's recommendation since design v4" in err
    assert main(["compress", str(fam["delta"]), "-o", str(tmp_path / "sg"), "--method", "sign"]) == 0
    err = capsys.readouterr().err
    comp = json.loads((tmp_path / "sg" / "deltaport.json").read_text())["compression"]
    assert all(comp["tensors"][n]["method"] == "exact" for n in vocab)
    share = sum(comp["tensors"][n]["bytes_after"] for n in vocab) / comp["totals"]["bytes_after"]
    assert f"vocabulary tensors kept exact ({', '.join(sorted(vocab))}): {share:.0%} of the output's bytes" in err
    assert "lost 63 % of the gain" in err
    # a vocabulary tensor low rank in the delta is not in a PEFT adapter (PEFT's embedding layout differs): listed
    rec = deltaport.compression.export_peft(tmp_path / "lr", tmp_path / "peft")
    assert set(vocab) <= set(rec["not_in_adapter"]) and not set(vocab) & set(rec["tensors"])
