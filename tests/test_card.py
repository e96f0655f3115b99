"""Every transfer/apply/diff output carries a model card (README.md) that huggingface_hub parses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

import deltaport
from conftest import assert_bit_equal, load_sd, tree_hash
from deltaport.io.checkpoint import content_hash


def _card(d):
    card = ModelCard.load(d / "README.md")
    return card.data.to_dict(), card.text


def test_local_transfer_card_has_no_paths_and_no_base_model(family, tmp_path):
    p = family("llama", torch.bfloat16)
    tb = tmp_path / "new-base"
    shutil.copytree(p["target_base"], tb)
    (tb / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n")
    out = tmp_path / "out"
    deltaport.transfer(p["source_base"], p["source_finetuned"], tb, out, scale=0.5, include=["mlp"])
    meta, text = _card(out)
    assert meta == {"license": "apache-2.0", "tags": ["deltaport", "fine-tuning-transfer"]}  # no hub id: no base_model
    body = (out / "README.md").read_text()
    assert str(tmp_path) not in body and "/tmp" not in body
    assert f"local directory `new-base` (content sha256 `{content_hash(tb)}`)" in text
    assert "λ (scale): 0.5" in text and "only tensors matching: ['mlp']" in text
    assert "deltaport transfer --source-base source_base --source-finetuned source_finetuned --target-base new-base " \
           "-o OUTPUT --scale 0.5 --include mlp" in text
    delta = sum(1 for n in load_sd(out) if "mlp" in n)
    assert f"{delta} of {len(load_sd(out))} tensors received Δ" in text
    # the output is byte-identical on rerun, card included
    deltaport.transfer(p["source_base"], p["source_finetuned"], tb, tmp_path / "again" / "out", scale=0.5, include=["mlp"])
    assert tree_hash(out)["README.md"] == tree_hash(tmp_path / "again" / "out")["README.md"]
    a, b = tree_hash(out), tree_hash(tmp_path / "again" / "out")
    a.pop("deltaport.json"), b.pop("deltaport.json")  # records absolute input paths
    assert a == b


def test_diff_card_and_apply_ignores_it(family, tmp_path):
    p = family("llama", torch.bfloat16)
    d = tmp_path / "delta"
    deltaport.diff(p["source_base"], p["source_finetuned"], d)
    meta, text = _card(d)
    assert meta == {"tags": ["deltaport", "fine-tuning-transfer", "delta"], "library_name": "deltaport"}
    assert "deltaport apply THIS_DELTA --to TARGET_BASE -o OUTPUT" in text and "not a model" in text
    from deltaport.inspect import inspect

    info = inspect(d)
    assert "README.md" not in info["files"] and info["kind"] == "delta"
    # a hand-edited card changes nothing in apply
    (d / "README.md").write_text("---\nlicense: [not, a, string]\nbase_model: 7\n---\nedited\n")
    deltaport.apply(d, p["target_base"], tmp_path / "out")
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "ref")
    assert_bit_equal(load_sd(tmp_path / "out"), load_sd(tmp_path / "ref"))
    meta, text = _card(tmp_path / "out")
    assert "base_model" not in meta and meta["tags"] == ["deltaport", "fine-tuning-transfer"]
    assert "local directory `delta`" in text and "deltaport apply delta --to target_base -o OUTPUT" in text
    prov = json.loads((tmp_path / "out" / "deltaport.json").read_text())
    assert prov["operation"] == "apply"


def _mixed_dirs(root):
    """Three tiny checkpoints of mixed dtypes (bf16 'a', 'c'; fp32 'b', written first: shards hold tensors by
    item size), so the engine reads 'b' before 'a' while the content hash takes them in name order."""
    import json as _json

    import torch as _torch
    from safetensors.torch import save_file as _save

    dirs = []
    for i, name in enumerate(("sb", "sf", "tb")):
        d = root / name
        d.mkdir()
        g = _torch.Generator().manual_seed(i)
        _save({"a": _torch.randn(300, generator=g).to(_torch.bfloat16), "b": _torch.randn(200, generator=g),
               "c": _torch.randn(100, generator=g).to(_torch.bfloat16)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(_json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("threads", [1, 2])
def test_card_content_hash_comes_from_the_engine_reads(family, tmp_path, threads, monkeypatch):
    """The card's content sha256 of each local input is content_hash(dir), now computed from the bytes the
    transfer reads: a uniform-dtype model is hashed without reading it again (0 bytes re-read); where the
    engine reads out of the hash's order (mixed dtypes) the rest is read at the end, with the same value."""
    import json as _json

    from deltaport.io.checkpoint import content_hash

    monkeypatch.setenv("DELTAPORT_HASH_CACHE", "off")  # every hash computed (none remembered: test_hashmemo.py)
    p = family("llama", torch.bfloat16)
    out = tmp_path / "out"
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], out, threads=threads, chunk_elems=1000)
    card = (out / "README.md").read_text()
    for k in ("source_base", "source_finetuned", "target_base"):
        assert f"content sha256 `{content_hash(p[k])}`" in card, k
    assert _json.loads((tmp_path / "out.timings.json").read_text())["content_hash_reread_bytes"] == 0
    sb, sf, tb = _mixed_dirs(tmp_path)
    deltaport.transfer(sb, sf, tb, tmp_path / "mixed", threads=threads, chunk_elems=64)
    card = (tmp_path / "mixed" / "README.md").read_text()
    assert all(f"content sha256 `{content_hash(d)}`" in card for d in (sb, sf, tb))
    assert _json.loads((tmp_path / "mixed.timings.json").read_text())["content_hash_reread_bytes"] > 0


def test_applies_of_deltas_with_an_exact_residual_hash_them_from_the_engine_reads(tmp_path, monkeypatch):
    """A Δ whose stored values need an exact residual (diff's default) and a composed apply of two Δs: the card's
    content hashes equal content_hash, and only the residual's parts (read whole by the engine, named X@…) are
    read again for them — before, the Δ's reads outside the prefetcher left the whole Δ to be read again."""
    import json as _json

    from safetensors.torch import save_file

    from deltaport.io.checkpoint import content_hash, open_checkpoint

    monkeypatch.setenv("DELTAPORT_HASH_CACHE", "off")  # every hash computed (none remembered: test_hashmemo.py)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.w.weight" for i in range(4)]
    base = {n: (torch.randn(64, 32, generator=g) * 0.02).to(torch.bfloat16) for n in names}
    ft = {n: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(torch.bfloat16) for n, v in base.items()}
    base[names[1]][0, 0], ft[names[1]][0, 0] = -0.0024871826171875, 1.8975697457790375e-08  # float32 Δ inexact
    tgt = {n: (v.float() + torch.randn(v.shape, generator=g) * 3e-3).to(torch.bfloat16) for n, v in base.items()}
    for d, sd in (("b", base), ("f", ft), ("t", tgt)):
        (tmp_path / d).mkdir()
        save_file(sd, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / d / "config.json").write_text(_json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    delta = deltaport.diff(tmp_path / "b", tmp_path / "f", tmp_path / "d").output
    parts = [s for n, s in open_checkpoint(delta).tensors.items() if "@" in n]
    assert parts, "the planted element must need a residual"
    import shutil

    second = shutil.copytree(delta, tmp_path / "d2")
    for name, deltas in (("one", [delta]), ("two", [delta, second])):
        deltaport.apply(deltas if len(deltas) > 1 else deltas[0], tmp_path / "t", tmp_path / name, chunk_elems=500)
        card = (tmp_path / name / "README.md").read_text()
        assert f"content sha256 `{content_hash(delta)}`" in card and f"content sha256 `{content_hash(tmp_path / 't')}`" in card
        reread = _json.loads((tmp_path / f"{name}.timings.json").read_text())["content_hash_reread_bytes"]
        assert reread == len(deltas) * sum(s.nbytes for s in parts), (name, reread)
