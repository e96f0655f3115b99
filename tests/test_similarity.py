"""deltaport.similarity: identities, agreement with a direct computation, tied weights, errors, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from deltaport import testing as T
from deltaport.errors import PlanError
from deltaport.similarity import layer_of, similarity

from conftest import load_sd, tree_hash


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    base = T.make_model("llama", seed=0)
    paths = {
        "sb": T.save(base, root / "sb"),
        "sf": T.save(T.perturbed(base, seed=1, scale=0.01), root / "sf"),
        "tb": T.save(T.perturbed(base, seed=2, scale=0.05), root / "tb"),
        "tf": T.save(T.perturbed(T.perturbed(base, seed=2, scale=0.05), seed=3, scale=0.01), root / "tf"),
    }
    return paths


def test_identities(fam):
    same = similarity(fam["sb"], fam["sf"], fam["sb"], fam["sf"])
    assert same["total"]["rel_distance"] == 0.0
    assert same["total"]["cos"] == pytest.approx(1.0, abs=1e-12)
    assert all(t["distance"] == 0.0 for t in same["tensors"])
    flipped = similarity(fam["sf"], fam["sb"], fam["sb"], fam["sf"])  # Δ_t = −Δ_s
    assert flipped["total"]["cos"] == pytest.approx(-1.0, abs=1e-12)


def test_matches_a_direct_computation(fam):
    r = similarity(fam["sb"], fam["sf"], fam["tb"], fam["tf"])
    sb, sf, tb, tf = (load_sd(fam[k]) for k in ("sb", "sf", "tb", "tf"))
    assert sorted(t["name"] for t in r["tensors"]) == sorted(sb)
    for t in r["tensors"]:
        n = t["name"]
        a, d, dt = sb[n].double(), sf[n].double() - sb[n].double(), tf[n].double() - tb[n].double()
        assert t["rel_distance"] == pytest.approx(float((tb[n].double() - a).norm() / a.norm()), rel=1e-9)
        assert t["delta_norm"] == pytest.approx(float(d.norm()), rel=1e-9)
        assert t["cos"] == pytest.approx(float(torch.dot(d.flatten(), dt.flatten()) / (d.norm() * dt.norm())), rel=1e-9)
    flat = lambda sd: torch.cat([v.double().flatten() for _, v in sorted(sd.items())])  # noqa: E731
    ds, dtt = flat(sf) - flat(sb), flat(tf) - flat(tb)
    assert r["total"]["delta_norm"] == pytest.approx(float(ds.norm()), rel=1e-9)
    assert r["total"]["cos"] == pytest.approx(float(ds.dot(dtt) / (ds.norm() * dtt.norm())), rel=1e-9)
    assert r["num_parameters"] == sum(v.numel() for v in sb.values())
    # layers partition the tensors: squared norms add up
    assert sum(l["delta_norm"] ** 2 for l in r["layers"]) == pytest.approx(r["total"]["delta_norm"] ** 2, rel=1e-9)
    assert [l["layer"] for l in r["layers"]] == ["embed", "layer 0", "layer 1", "final norm", "head"]


def test_without_target_finetune_has_no_cos(fam):
    r = similarity(fam["sb"], fam["sf"], fam["tb"])
    assert "cos" not in r["total"] and r["target_finetuned"] is None


def test_tied_weights_counted_once(tmp_path):
    from safetensors.torch import save_file

    m = T.make_model("llama", seed=0)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # a checkpoint that stores both
    dirs = []
    for i, scale in enumerate((0.0, 0.01, 0.02)):
        d = tmp_path / f"m{i}"
        d.mkdir()
        g = torch.Generator().manual_seed(i)
        noisy = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        noisy["lm_head.weight"] = noisy["model.embed_tokens.weight"].clone()
        save_file(noisy, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = m.config.to_dict()
        cfg["tie_word_embeddings"] = True
        (d / "config.json").write_text(json.dumps(cfg))
        dirs.append(d)
    r = similarity(*dirs)
    assert r["tied"] == ["lm_head.weight"]
    assert "lm_head.weight" not in [t["name"] for t in r["tensors"]]
    assert r["num_parameters"] == sum(v.numel() for k, v in sd.items() if k != "lm_head.weight")


def test_shape_mismatch_is_skipped_and_missing_tensor_is_an_error(fam, tmp_path):
    big = T.save(T.make_model("llama", seed=0, vocab_size=72), tmp_path / "big")
    r = similarity(fam["sb"], fam["sf"], big)
    skipped = {s["name"] for s in r["skipped"]}
    assert skipped == {"model.embed_tokens.weight", "lm_head.weight"}
    gemma = T.save(T.make_model("gemma", seed=0), tmp_path / "gemma")
    with pytest.raises(PlanError, match="lacks"):
        similarity(fam["sb"], fam["sf"], gemma)


def test_layer_names():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "layer 3"
    assert layer_of("model.embed_tokens.weight") == "embed"
    assert layer_of("lm_head.weight") == "head"
    assert layer_of("model.norm.weight") == "final norm"


def test_cli_similarity(fam, tmp_path):
    from deltaport.cli.main import main

    before = {k: tree_hash(v) for k, v in fam.items()}
    out, png = tmp_path / "s.json", tmp_path / "l.png"
    rc = main(["similarity", "--source-base", str(fam["sb"]), "--source-finetuned", str(fam["sf"]),
               "--target-base", str(fam["tb"]), "--target-finetuned", str(fam["tf"]), "-o", str(out),
               "--plot", str(png), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["total"]["cos"] is not None and len(rep["layers"]) == 5
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert {k: tree_hash(v) for k, v in fam.items()} == before
    out2 = tmp_path / "s2.json"  # a fresh path: the exit code is the missing model's, not the existing report's
    rc = main(["similarity", "--source-base", str(fam["sb"]), "--source-finetuned", str(fam["sf"]),
               "--target-base", str(tmp_path / "nope"), "-o", str(out2)])
    assert rc == 2 and not out2.exists()
