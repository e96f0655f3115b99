"""The layer-by-layer diagnostics (deltaport.layerwise) against the whole-model path computed in the test:
the same losses and signals for every architecture the tests build (tied and untied embeddings), each
checkpoint read once, layer by layer, and a plain fallback where streaming is not possible."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltaport import causal_lm, layerwise
from deltaport import testing as T
from deltaport.check import check
from deltaport.connectivity import connectivity
from deltaport.io.checkpoint import Checkpoint

IDS = [[(i * 7 + j * 3) % 60 + 3 for j in range(40)] for i in range(8)]  # 320 tokens, blocks of 32


def extra_config(arch: str):
    """Tiny configs of the families testing.ARCHS does not build (sliding windows, soft-capping, q/k norms)."""
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3)
    if arch == "gemma2":  # tied, final and attention logit soft-capping, sliding window on alternate layers
        return tf.Gemma2Config(**common, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=10.0)
    if arch == "gemma3_text":  # tied, local/global layers with their own rotary embeddings
        return tf.Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                            "sliding_attention"])
    if arch == "qwen3":
        return tf.Qwen3Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


def build(arch: str, seed: int = 0):
    if arch in T.ARCHS:
        return T.make_model(arch, seed=seed)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(extra_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


ALL = (*T.ARCHS, "gemma2", "gemma3_text", "qwen3")


@pytest.fixture(scope="module")
def trios(tmp_path_factory):
    """Per architecture, built on first use: saved source base, fine-tune and target (several shards each)."""
    root = tmp_path_factory.mktemp("layerwise")

    class Built(dict):
        def __missing__(self, arch):
            sb = build(arch)
            d = root / arch
            self[arch] = {"sb": T.save(sb, d / "sb", max_shard_size="40KB"),
                          "sf": T.save(T.perturbed(sb, 1, 0.05), d / "sf", max_shard_size="40KB"),
                          "tb": T.save(T.perturbed(sb, 2, 0.05), d / "tb", max_shard_size="40KB"),
                          "tied": sb.lm_head.weight is sb.get_input_embeddings().weight}
            return self[arch]

    return Built()


def close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


@pytest.mark.parametrize("arch", ALL)
def test_streamed_connectivity_and_check_equal_the_whole_model_path(trios, arch):
    m = trios[arch]
    assert m["tied"] == (arch in ("gemma", "gemma2", "gemma3_text", "qwen3"))
    kw = dict(points=4, max_tokens=320, block_len=32)
    new = connectivity(m["sb"], m["tb"], IDS, **kw)
    old = connectivity(m["sb"], m["tb"], IDS, **kw, layerwise=False)
    assert new["streamed"] and new["note"] is None and not old["streamed"] and "layerwise=False" in old["note"]
    assert new["num_parameters"] == old["num_parameters"] and new["endpoints_exact"]
    assert len(new["losses"]) == 4 and new["losses"] != old["losses"][::-1]
    for x, y in zip(new["losses"], old["losses"]):
        assert close(x, y, 1e-6), (new["losses"], old["losses"])
    assert new["peak_rss_mb"] > 0

    cn = check(m["sb"], m["sf"], m["tb"], IDS, max_tokens=320, calibration={})
    co = check(m["sb"], m["sf"], m["tb"], IDS, max_tokens=320, calibration={}, layerwise=False)
    assert cn["streamed"] and not co["streamed"] and cn["num_parameters"] == co["num_parameters"]
    sn, so = cn["signals"], co["signals"]
    for k in ("loss_source_base", "loss_source_finetuned", "loss_target_base", "loss_transfer"):
        assert close(sn[k], so[k], 1e-6), (k, sn[k], so[k])
    assert sn["rel_distance"] == so["rel_distance"] and sn["delta_rel"] == so["delta_rel"]  # same sums, same order
    assert sn["loss_transfer"] != sn["loss_target_base"]  # Δ is there


def test_bfloat16_and_an_untied_head_read_in_slices(trios, monkeypatch):
    """dtype bfloat16, and slices small enough that the embedding and the head are read in several row ranges
    and built in several pieces: still the whole-model numbers."""
    monkeypatch.setattr(layerwise, "BUILD_CHUNK", 200)  # 6 rows of 32 per slice: 11 slices of 64 rows
    monkeypatch.setattr(layerwise, "LOGITS_CHUNK", 5000)
    m = trios["llama"]
    kw = dict(max_tokens=320, calibration={}, dtype="bfloat16")
    sn = check(m["sb"], m["sf"], m["tb"], IDS, **kw)["signals"]
    so = check(m["sb"], m["sf"], m["tb"], IDS, **kw, layerwise=False)["signals"]
    for k in ("loss_source_base", "loss_source_finetuned", "loss_target_base", "loss_transfer"):
        assert close(sn[k], so[k], 1e-5), (k, sn[k], so[k])
    assert close(sn["rel_distance"], so["rel_distance"], 1e-12)


def test_each_tensor_is_read_once_and_one_layer_at_a_time(trios, monkeypatch):
    """No whole model is loaded; every tensor of every input is read once (the tied embedding twice: input
    rows, then head), the layers in order, each layer's tensors before the next layer's."""
    def no_load(*a, **k):
        raise AssertionError("a whole model was loaded")

    monkeypatch.setattr(causal_lm, "load_causal_lm", no_load)
    reads: list[tuple[str, str]] = []
    real_tensor = Checkpoint.tensor

    def spy_tensor(self, name):
        reads.append((self.source, name))
        return real_tensor(self, name)

    real_rows = layerwise.read_rows

    def spy_rows(ck, name, r0, r1):
        reads.append((ck.source, f"{name}[{r0}:{r1}]"))
        return real_rows(ck, name, r0, r1)

    monkeypatch.setattr(Checkpoint, "tensor", spy_tensor)
    monkeypatch.setattr(layerwise, "read_rows", spy_rows)
    for arch, tied in (("llama", False), ("gemma", True)):
        reads.clear()
        m = trios[arch]
        r = check(m["sb"], m["sf"], m["tb"], IDS, max_tokens=320, calibration={})
        assert r["streamed"]
        for src in (str(m["sb"]), str(m["sf"]), str(m["tb"])):
            mine = [n for s, n in reads if s == src]
            whole = [n for n in mine if "[" not in n]
            assert len(whole) == len(set(whole))  # once each
            emb_reads = [n for n in mine if n.startswith("model.embed_tokens.weight[")]
            assert emb_reads == ["model.embed_tokens.weight[0:64]"] * (2 if tied else 1)
            assert [n for n in mine if n.startswith("lm_head")] == ([] if tied else ["lm_head.weight[0:64]"])
            layer_of = [int(n.split(".")[2]) for n in whole if n.startswith("model.layers.")]
            assert layer_of == sorted(layer_of) and set(layer_of) == {0, 1}


def test_what_cannot_be_streamed_is_evaluated_whole_and_says_why(trios, tmp_path, monkeypatch):
    m = trios["llama"]
    monkeypatch.setattr(layerwise, "STREAMED", tuple(a for a in layerwise.STREAMED if a != "llama"))
    r = connectivity(m["sb"], m["tb"], IDS, points=3, max_tokens=256)
    assert not r["streamed"] and "architecture 'llama'" in r["note"] and "is not one" in r["note"]
    monkeypatch.undo()

    # a config that changes the forward (rms_norm_eps) is run with each model's own config
    a = T.make_model("llama", seed=0)
    b = T.perturbed(a, 1, 0.05)
    b.config.rms_norm_eps = 1e-2
    pa, pb = T.save(a, tmp_path / "a"), T.save(b, tmp_path / "b")
    c = check(pa, pb, pa, IDS, max_tokens=256, calibration={})
    assert not c["streamed"] and any("differs" in n and "rms_norm_eps" in n for n in c["notes"]), c["notes"]

    # models in memory, and a task metric, need whole models
    r = connectivity(a, a, IDS, points=2, max_tokens=256)
    assert not r["streamed"] and "in memory" in r["note"]
    r = connectivity(pa, pa, IDS, points=2, max_tokens=256, task=lambda model: 1.0)
    assert not r["streamed"] and "task" in r["note"] and r["metrics"] == [1.0, 1.0]


def test_a_checkpoint_missing_a_layer_tensor_is_refused_before_any_work(trios, tmp_path):
    """A config that promises a tensor the shards lack: exit-2 error naming it (not random weights)."""
    import json
    import shutil

    from deltaport.errors import CheckpointError

    d = tmp_path / "cut"
    shutil.copytree(trios["llama"]["tb"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the shards hold two layers
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        connectivity(trios["llama"]["sb"], d, IDS, points=2, max_tokens=256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_on_cuda_equals_the_cpu_whole_model_path(trios):
    m = trios["qwen2"]
    kw = dict(max_tokens=320, calibration={})
    sg = check(m["sb"], m["sf"], m["tb"], IDS, device="cuda", **kw)
    so = check(m["sb"], m["sf"], m["tb"], IDS, layerwise=False, **kw)
    assert sg["streamed"]
    for k in ("loss_source_base", "loss_source_finetuned", "loss_target_base", "loss_transfer"):
        assert close(sg["signals"][k], so["signals"][k], 1e-4), k
    r = connectivity(m["sb"], m["tb"], IDS, points=3, max_tokens=320, device="cuda")
    assert r["streamed"] and r["device"].startswith("cuda")
