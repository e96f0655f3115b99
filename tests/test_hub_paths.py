"""Local paths versus hub ids: a mistyped path is named as a path before any hub look-up; offline
hints name the ``hf`` command; an adapter's unresolvable base says where it came from."""

from __future__ import annotations

import json

import pytest
import torch

import deltaport
from deltaport.errors import CheckpointError
from deltaport.io.checkpoint import open_checkpoint, resolve_dir


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub (or its offline cache)."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the hub was consulted for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)


@pytest.mark.parametrize("name", ["./mdl", "../no-such-dir/mdl", "mdl-typo", "models/llama/v2"])
def test_relative_looking_missing_path_says_no_local_directory(name, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    for remote in (False, True):
        with pytest.raises(CheckpointError, match=rf"^no local directory {name}\b.*check the path"):
            open_checkpoint(name, remote=remote)


def test_missing_dir_under_an_existing_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch, no_hub):
    """``models/llama`` has the hub's org/name shape, but ``models/`` exists here: a mistyped path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError, match=r"^no local directory models/llama; check the path"):
        resolve_dir("models/llama")
    with pytest.raises(CheckpointError, match=r"^no local directory models/llama; check the path"):
        deltaport.transfer("models/llama", "models/llama", "models/llama", tmp_path / "o")


def test_hub_shaped_ids_are_not_paths(tmp_path, monkeypatch):
    from deltaport.io.hub import looks_like_hub_id, looks_like_path

    monkeypatch.chdir(tmp_path)
    for s in ("org/name", "org/name@main", "org/name@refs/pr/1", "org/name@0123abcd"):
        assert looks_like_hub_id(s) and not looks_like_path(s), s
    for s in ("./org/name", "org/name/sub", "/abs/x", "~/x", "x\\y"):
        assert looks_like_path(s), s


def test_offline_hint_uses_hf_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint("some-org/not-cached@v2", remote=True)
    msg = str(ei.value)
    assert msg.startswith("no local directory some-org/not-cached@v2, and the hub id")
    assert "`hf download some-org/not-cached --revision v2`" in msg
    assert "huggingface-cli" not in msg


def test_adapter_with_unresolvable_relative_base_names_adapter_config(family, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = family("llama", torch.float32)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(p["source_base"]),
                        LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../checkpoints/base"  # relative to wherever it was trained
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        deltaport.transfer(None, "adapter", p["target_base"], tmp_path / "o")
    msg = str(ei.value)
    assert "'../checkpoints/base' named by base_model_name_or_path in adapter/adapter_config.json" in msg
    assert "no local directory ../checkpoints/base" in msg
    assert "Pass --source-base to override it" in msg
    with pytest.raises(CheckpointError, match="Pass --base to override it"):
        deltaport.diff(None, "adapter", tmp_path / "d")
    # the override works
    deltaport.transfer(p["source_base"], "adapter", p["target_base"], tmp_path / "o")
    assert any((tmp_path / "o").glob("*.safetensors"))
