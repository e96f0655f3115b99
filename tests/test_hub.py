"""Hub ids end to end: the real huggingface_hub client against a local hub server on 127.0.0.1.

The only tests where ``HF_HUB_OFFLINE`` is unset, and only in the ``deltaport`` subprocess they start
(huggingface_hub reads ``HF_ENDPOINT`` at import), with a fresh ``HF_HOME``. The server counts the
safetensors bytes it serves past each header: planning must fetch none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tree_hash
from hubserver import FakeHub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from deltaport import testing as T

    root = tmp_path_factory.mktemp("hubrepos")
    fam = T.make_family(root / "fam", dtype=torch.bfloat16)
    other = T.save(T.perturbed(T.make_model(vocab_size=80, dtype=torch.bfloat16), seed=5), root / "other_vocab")
    h = FakeHub().start()
    h.add("org-a/base", fam["source_base"], license="apache-2.0")
    h.add("org-a/tuned", fam["source_finetuned"])
    h.add("org-b/target", fam["target_base"], license="llama3.1")
    h.add("org-b/target-80", other, license="mit")
    bad_cfg = root / "bad_config"  # the target's tensors with a config.json that says 80 tokens
    shutil.copytree(fam["target_base"], bad_cfg)
    cfg = json.loads((bad_cfg / "config.json").read_text())
    cfg["vocab_size"] = 80
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    h.add("org-b/target-badcfg", bad_cfg)
    h.fam = fam
    yield h
    h.stop()


def run_cli(hub: FakeHub, args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "deltaport.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def weight_total(d: Path) -> int:
    """Bytes past the header in every safetensors file of ``d``."""
    total = 0
    for f in d.glob("*.safetensors"):
        data = f.read_bytes()
        total += len(data) - 8 - int.from_bytes(data[:8], "little")
    return total


def test_vocab_mismatch_across_three_hub_ids_fails_before_any_weight_byte(hub, tmp_path):
    hub.reset_counts()
    t0 = time.perf_counter()
    r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                      "--target-base", "org-b/target-80", "-o", "out"], tmp_path / "hf", tmp_path)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    assert "vocabulary sizes differ" in r.stderr and "before reading any weights" in r.stderr, r.stderr
    assert hub.weight_bytes == 0, hub.requests
    assert hub.header_bytes > 0  # the headers were read from the hub
    assert not (tmp_path / "out").exists()
    # nothing but small files in the cache
    cached = [p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert cached == []
    print(f"planted vocabulary mismatch: exit 2 in {elapsed:.2f} s, {hub.weight_bytes} weight bytes served")
    assert elapsed < 10


def test_config_check_runs_before_any_weight_byte(hub, tmp_path):
    """The config check (config.json against the planned tensors) is part of the plan: a target whose
    config contradicts its tensors fails with nothing downloaded, in a dry run as in a real one."""
    for extra in ([], ["--dry-run"]):
        hub.reset_counts()
        r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                          "--target-base", "org-b/target-badcfg", "-o", "out", *extra], tmp_path / "hf", tmp_path)
        assert r.returncode == 2, r.stderr
        assert "does not fit the output tensors" in r.stderr and "model.embed_tokens.weight" in r.stderr, r.stderr
        assert hub.weight_bytes == 0
        assert not (tmp_path / "out").exists()


def test_dry_run_on_hub_ids_downloads_no_weights_and_reports_bytes(hub, tmp_path):
    hub.reset_counts()
    r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                      "--target-base", "org-b/target", "-o", "out", "--dry-run", "--json"], tmp_path / "hf", tmp_path)
    assert r.returncode == 0, r.stderr
    assert hub.weight_bytes == 0
    res = json.loads(r.stdout)
    want = sum(f.stat().st_size for k in ("source_base", "source_finetuned", "target_base")
               for f in hub.fam[k].glob("*.safetensors"))
    assert res["fetch"]["download_bytes"] == want
    assert res["fetch"]["write_bytes"] >= res["plan"]["output_bytes"]
    assert set(res["fetch"]["download_files"]) == {f"{k}@{hub.repos[k][0]}" for k in ("org-a/base", "org-a/tuned", "org-b/target")}
    assert not (tmp_path / "out").exists()
    r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                      "--target-base", "org-b/target", "-o", "out", "--dry-run"], tmp_path / "hf", tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"org-b/target at commit {hub.repos['org-b/target'][0]}" in r.stdout
    assert f"a real run downloads {want / 1e6:.1f} MB" in r.stdout


def test_hub_transfer_equals_local_transfer_and_downloads_each_weight_once(hub, tmp_path):
    from deltaport import transfer

    local = transfer(hub.fam["source_base"], hub.fam["source_finetuned"], hub.fam["target_base"], tmp_path / "local")
    hub.reset_counts()
    r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                      "--target-base", "org-b/target", "-o", "out", "--quiet"], tmp_path / "hf", tmp_path)
    assert r.returncode == 0, r.stderr
    want = sum(weight_total(hub.fam[k]) for k in ("source_base", "source_finetuned", "target_base"))
    assert hub.weight_bytes == want
    a, b = tree_hash(local.output), tree_hash(tmp_path / "out")
    weights = [k for k in a if k.endswith(".safetensors")]
    assert weights and {k: a[k] for k in weights} == {k: b[k] for k in weights}
    for k in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert a.get(k) == b.get(k), k
    prov = json.loads((tmp_path / "out" / "deltaport.json").read_text())
    assert prov["inputs"]["target_base"]["hub"] == {"repo_id": "org-b/target", "requested_revision": None,
                                                    "commit": hub.repos["org-b/target"][0]}
    # the model card names the hub lineage at the pinned commits, and the target's license
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.to_dict() == {"base_model": ["org-b/target", "org-a/tuned"], "base_model_relation": "merge",
                                   "license": "llama3.1", "tags": ["deltaport", "fine-tuning-transfer"]}
    shas = {k: hub.repos[k][0] for k in ("org-a/base", "org-a/tuned", "org-b/target")}
    assert (f"deltaport transfer --source-base org-a/base@{shas['org-a/base']} --source-finetuned "
            f"org-a/tuned@{shas['org-a/tuned']} --target-base org-b/target@{shas['org-b/target']} -o OUTPUT") in card.text
    assert str(tmp_path) not in (tmp_path / "out" / "README.md").read_text()
    # a second run finds every weight file in the cache, and writes the same bytes
    hub.reset_counts()
    (tmp_path / "again").mkdir()
    r = run_cli(hub, ["transfer", "--source-base", "org-a/base", "--source-finetuned", "org-a/tuned",
                      "--target-base", "org-b/target", "-o", "out", "--quiet"], tmp_path / "hf", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    assert hub.weight_bytes == 0
    assert tree_hash(tmp_path / "again" / "out") == tree_hash(tmp_path / "out")


def test_unknown_hub_id_and_revision(hub, tmp_path):
    r = run_cli(hub, ["inspect", "org-a/nope"], tmp_path / "hf", tmp_path)
    assert r.returncode == 2
    assert "no local directory org-a/nope, and cannot resolve hub id 'org-a/nope': RepositoryNotFoundError" in r.stderr
    r = run_cli(hub, ["inspect", "org-a/base@v9"], tmp_path / "hf", tmp_path)
    assert r.returncode == 2
    assert "RevisionNotFoundError" in r.stderr and "check the revision" in r.stderr


def test_inspect_hub_id_reads_headers_only(hub, tmp_path):
    hub.reset_counts()
    r = run_cli(hub, ["inspect", "org-a/base", "--json"], tmp_path / "hf", tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["revision"] == hub.repos["org-a/base"][0]
    assert info["num_tensors"] > 0
    assert hub.weight_bytes == 0
