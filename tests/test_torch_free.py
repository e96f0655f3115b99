"""Header-only work imports no torch: ``inspect``, ``--help`` of every command, and plans refused on
keys, shapes or dtypes, each run through the CLI in a fresh interpreter that then reports what it
imported. Dtypes are names until a plan is executed; read as ``.dtype`` they are still torch dtypes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import deltaport
from deltaport.io.checkpoint import open_checkpoint
from deltaport.plan import Plan, TensorOp, make_policies, plan_transfer

CHANGED = "model.layers.1.mlp.down_proj.weight"
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16,
          "tie_word_embeddings": False}


def _specs() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {"model.embed_tokens.weight": ((16, 8), torch.bfloat16), "lm_head.weight": ((16, 8), torch.bfloat16),
           "model.norm.weight": ((8,), torch.bfloat16)}
    for i in range(2):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": ((8,), torch.bfloat16),
                    p + "self_attn.q_proj.weight": ((8, 8), torch.bfloat16),
                    p + "mlp.up_proj.weight": ((12, 8), torch.bfloat16),
                    p + "mlp.down_proj.weight": ((8, 12), torch.bfloat16)})
    return out


def _save(d: Path, specs: dict, seed: int) -> Path:
    """A 3-shard safetensors checkpoint with an index and a config.json."""
    d.mkdir()
    g = torch.Generator().manual_seed(seed)
    names = sorted(specs)
    wm = {}
    for i in range(3):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        save_file({n: (torch.randn(specs[n][0], generator=g) * 8).to(specs[n][1]) for n in part}, str(d / fname),
                  metadata={"format": "pt"})
        wm.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base, a fine-tune, a delta made from them, and three targets a transfer must refuse."""
    root = tmp_path_factory.mktemp("torchfree")
    base = _specs()
    out = {"base": _save(root / "base", base, 0), "finetuned": _save(root / "finetuned", base, 1)}
    out["renamed"] = _save(root / "renamed", {(n.replace("down_proj", "down") if n == CHANGED else n): v
                                              for n, v in base.items()}, 2)
    out["reshaped"] = _save(root / "reshaped", {n: (((8, 16), v[1]) if n == CHANGED else v) for n, v in base.items()}, 3)
    out["integer"] = _save(root / "integer", {n: ((v[0], torch.int16) if n == CHANGED else v) for n, v in base.items()}, 4)
    out["delta"] = deltaport.diff(out["base"], out["finetuned"], root / "delta").output
    return out


RUNNER = r"""
import json, sys
from deltaport.cli.main import app, main
import typer.main

calls = json.loads(sys.argv[1])
if calls == "help":
    group = typer.main.get_command(app)
    calls = [["--help"]]
    for name, cmd in group.commands.items():
        calls.append([name, "--help"])
        calls += [[name, sub, "--help"] for sub in getattr(cmd, "commands", {})]
for argv in calls:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    print(json.dumps({"argv": argv, "rc": rc, "torch": "torch" in sys.modules, "numba": "numba" in sys.modules,
                      "transformers": "transformers" in sys.modules}), file=sys.stderr)
"""


def _run(calls) -> tuple[list[dict], str]:
    """Run CLI ``calls`` (lists of arguments, or ``"help"``: ``--help`` of every command) in one fresh
    interpreter; each call's exit code and whether torch / transformers were imported by then."""
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(calls)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stderr.splitlines() if line.startswith('{"argv"')]
    return recs, r.stdout + r.stderr


def test_inspect_and_every_help_import_neither_torch_nor_transformers(models):
    recs, out = _run([["inspect", str(models["base"])], ["inspect", str(models["delta"]), "--json", "--tensors"]])
    assert [r["rc"] for r in recs] == [0, 0], out
    assert "11 tensors" in out and '"kind": "delta"' in out and '"dtype": "float32"' in out
    assert not any(r["torch"] or r["transformers"] for r in recs), recs
    recs, out = _run("help")
    names = [" ".join(r["argv"][:-1]) for r in recs]
    assert {"", "transfer", "diff", "apply", "inspect", "eval", "check", "lab run"} <= set(names), names
    assert all(r["rc"] == 0 for r in recs), out
    assert [n for n, r in zip(names, recs) if r["torch"] or r["transformers"]] == []


@pytest.mark.parametrize("target,why", [
    ("renamed", "model.layers.1.mlp.down.weight is in the target but not in source-finetuned and source-base"),
    ("reshaped", "model.layers.1.mlp.down_proj.weight: shapes differ (source-base [8, 12], source-finetuned [8, 12], "
                 "target [8, 16])"),
    ("integer", "model.layers.1.mlp.down_proj.weight: dtypes cannot be combined (source-base bfloat16, "
                "source-finetuned bfloat16, target int16)"),
], ids=["keys", "shapes", "dtypes"])
def test_refused_plans_import_no_torch(models, target, why, tmp_path):
    """A transfer, a diff and an apply refused at plan time (dry run or real) import no torch."""
    m = {k: str(v) for k, v in models.items()}
    out = str(tmp_path / "out")
    transfer = ["transfer", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m[target],
                "-o", out]
    calls = [transfer + ["--dry-run"], transfer, ["diff", "--base", m["base"], "--finetuned", m[target], "-o", out],
             ["apply", m["delta"], "--to", m[target], "-o", out, "--dry-run"]]
    recs, text = _run(calls)
    assert [r["rc"] for r in recs] == [2, 2, 2, 2], text
    assert text.count(why) == 2, text
    assert "cannot plan the diff" in text and "does not match the structure the delta was made on" in text
    assert [r["argv"][0] for r in recs if r["torch"] or r["transformers"]] == []
    assert not (tmp_path / "out").exists()


def test_dtypes_are_names_until_read(models):
    """Planning keeps dtypes as names; ``.dtype``, ``.out_dtype`` and ``.compute_dtype`` read as torch dtypes."""
    ck = open_checkpoint(models["base"])
    spec = ck.tensors[CHANGED]
    assert spec.dtype_name == "bfloat16" and spec.dtype is torch.bfloat16
    assert spec == open_checkpoint(models["base"]).tensors[CHANGED] and "dtype=bfloat16" in repr(spec)
    op = TensorOp("x", (2, 3), "float16", "copy")
    assert op.out_dtype is torch.float16 and op.nbytes == 12
    op.out_dtype = torch.float32
    assert op.out_dtype_name == "float32" and op.nbytes == 24
    with pytest.raises(TypeError):
        TensorOp("x", (2,))  # the dtype stays a required argument
    plan = plan_transfer(ck, open_checkpoint(models["finetuned"]), open_checkpoint(models["base"]),
                         make_policies(out_dtype="fp16"))
    assert {op.out_dtype_name for op in plan.ops} == {"float16"} and plan.ops[0].out_dtype is torch.float16
    assert plan.compute_dtype is torch.float64 and plan.summary()["compute_dtype"] == "float64"
    assert Plan("diff", [], torch.float32).compute_dtype_name == "float32"


def test_successful_dry_runs_import_neither_torch_nor_the_jit(models, tmp_path):
    """A dry run that plans successfully (transfer from three directories, diff, apply of one delta and a
    composed TIES apply) prints its plan and exits 0 without importing torch, numba or transformers: a
    plan is names, shapes and dtype names (the timing is benchmarks/header_only_bench.py's)."""
    import shutil

    m = {k: str(v) for k, v in models.items()}
    out = str(tmp_path / "out")
    second = shutil.copytree(models["delta"], tmp_path / "delta2")
    calls = [["transfer", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["renamed"],
              "-o", out, "--dry-run", "--quiet", "--shape-policy", "skip"],
             ["transfer", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["finetuned"],
              "-o", out, "--dry-run", "--quiet", "--scale", "0.7"],
             ["diff", "--base", m["base"], "--finetuned", m["finetuned"], "-o", out, "--dry-run", "--quiet"],
             ["apply", m["delta"], "--to", m["finetuned"], "-o", out, "--dry-run", "--quiet"],
             ["apply", m["delta"], str(second), "--to", m["base"], "-o", out, "--dry-run", "--ties", "0.2"]]
    recs, text = _run(calls)
    assert [r["rc"] for r in recs] == [0, 0, 0, 0, 0], text
    assert "x(1, 1) TIES" in text, text
    assert text.count("plan: transfer, ") == 2 and "plan: diff, Δ stored for 11 tensors" in text, text
    assert [r["argv"][0] for r in recs if r["torch"] or r["numba"] or r["transformers"]] == []
    assert not (tmp_path / "out").exists()


def test_transfers_and_applies_the_kernel_computes_import_no_torch(models, tmp_path, monkeypatch):
    """A transfer (λ = 1 and 0.7), an apply of one Δ and a composed apply of two (plain and TIES), every tensor
    computed by the fused kernel from plain file reads, never import torch (~220 MB of the process: the fused path's peak RSS
    target) and write the bytes the torch fallback writes in this process (DELTAPORT_KERNEL=torch)."""
    import hashlib
    import shutil

    m = {k: str(v) for k, v in models.items()}
    second = shutil.copytree(models["delta"], tmp_path / "delta2")
    tr = ["transfer", "--source-base", m["base"], "--source-finetuned", m["finetuned"], "--target-base", m["renamed"],
          "--shape-policy", "skip", "--quiet"]
    calls = {"t1": tr + ["-o", str(tmp_path / "t1")], "t07": tr + ["--scale", "0.7", "-o", str(tmp_path / "t07")],
             "a1": ["apply", m["delta"], "--to", m["finetuned"], "-o", str(tmp_path / "a1"), "--quiet"],
             "a2": ["apply", m["delta"], str(second), "--to", m["base"], "--scale", "0.7", "--scale", "0.3", "-o",
                    str(tmp_path / "a2"), "--quiet"],
             "a2t": ["apply", m["delta"], str(second), "--to", m["base"], "--scale", "0.7", "--scale", "0.3",
                     "--ties", "0.2", "-o", str(tmp_path / "a2t"), "--quiet"]}
    recs, text = _run(list(calls.values()))
    assert [r["rc"] for r in recs] == [0, 0, 0, 0, 0], text
    assert [r["argv"][0] for r in recs if r["torch"] or r["transformers"]] == [], recs
    assert all(r["numba"] for r in recs), recs  # (the kernel ran: it is what imports numba)

    def digests(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}

    monkeypatch.setenv("DELTAPORT_KERNEL", "torch")
    from deltaport.cli.main import main

    for name, argv in calls.items():
        ref = tmp_path / f"{name}-torch"
        assert main([*argv[:argv.index("-o")], "-o", str(ref), *argv[argv.index("-o") + 2:]]) == 0
        assert json.loads((tmp_path / name / "deltaport.json").read_text())["arithmetic"]["torch_fallback"] == 0
        assert json.loads((ref / "deltaport.json").read_text())["arithmetic"]["numba_kernel"] == 0
        assert digests(tmp_path / name) == digests(ref) != {}, name


def test_apply_of_a_delta_with_an_exact_residual_imports_no_torch(models, tmp_path, monkeypatch):
    """diff's default Δ carries an exact residual where float32 cannot hold f − b: its apply reads the residual
    with numpy (engine.fused._sparse_values) and imports no torch, with the fallback's bytes."""
    import hashlib
    import shutil

    from safetensors.torch import load_file

    b, f = (shutil.copytree(models[k], tmp_path / k) for k in ("base", "finetuned"))
    shard = next(p for p in sorted(f.glob("*.safetensors")) if CHANGED in load_file(str(p)))
    for d, v in ((b, -0.0024871826171875), (f, 1.8975697457790375e-08)):  # f − b not a float32: a residual
        sd = load_file(str(d / shard.name))
        sd[CHANGED].view(-1)[5] = v
        save_file(sd, str(d / shard.name), metadata={"format": "pt"})
    delta = deltaport.diff(b, f, tmp_path / "delta").output
    assert any("@residual" in n for n in open_checkpoint(delta).tensors)
    argv = ["apply", str(delta), "--to", str(models["base"]), "--scale", "0.7", "--quiet"]
    # and TIES of that Δ (Δ + residual, trimmed and elected) with a second one: kernel_ties, no torch either
    ties = ["apply", str(delta), str(models["delta"]), "--to", str(models["base"]), "--ties", "0.3", "--quiet"]
    recs, text = _run([argv + ["-o", str(tmp_path / "a")], ties + ["-o", str(tmp_path / "t")]])
    assert [(r["rc"], r["torch"], bool(r["numba"])) for r in recs] == [(0, False, True)] * 2, text
    from deltaport.cli.main import main

    monkeypatch.setenv("DELTAPORT_KERNEL", "torch")
    assert main(argv + ["-o", str(tmp_path / "fb")]) == 0
    assert main(ties + ["-o", str(tmp_path / "tfb")]) == 0
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}  # noqa: E731
    assert digest(tmp_path / "a") == digest(tmp_path / "fb") != {}
    assert digest(tmp_path / "t") == digest(tmp_path / "tfb") != {}
    assert json.loads((tmp_path / "t" / "deltaport.json").read_text())["arithmetic"]["torch_fallback"] == 0
