"""How fast a bad input is refused, against the wall time of ``deltaport --help`` measured in the same run.

Issue 25's bar: every input the plan can refuse is refused within ``deltaport --help`` + 1 s, with three
0.74 GB bf16 checkpoints as inputs. The checkpoints are real safetensors files of that size (a Llama
of ~370 M parameters, 3 shards each) whose tensor bytes are a sparse hole of zeros: a refusal reads
headers and config only, so their values do not matter and the benchmark needs no 2.2 GB of writes.

    python benchmarks/refusal_bench.py [--workdir DIR] [--repeat 3]

Prints one row per refusal: median wall seconds over ``--repeat`` fresh processes, the limit (median
``--help`` + 1 s) and whether it is met, the exit code and the first words of the message; with the
load average, CPU and thread settings. Page cache warm (the headers were read by the previous repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 2816,
          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 2048}


def _specs(cfg: dict) -> dict[str, list[int]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                    p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [h, h],
                    p + "self_attn.v_proj.weight": [h, h], p + "self_attn.o_proj.weight": [h, h],
                    p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i]})
    return out


def sparse_model(d: Path, cfg: dict, shards: int = 3) -> Path:
    """A safetensors model directory whose tensor data are sparse zeros (headers and config are real)."""
    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True)
    specs = _specs(cfg)
    names = sorted(specs)
    wm = {}
    for k in range(shards):
        part = names[k::shards]
        header, off = {}, 0
        for n in part:
            nbytes = 2
            for s in specs[n]:
                nbytes *= s
            header[n] = {"dtype": "BF16", "shape": specs[n], "data_offsets": [off, off + nbytes]}
            off += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)
        wm.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _wall(argv: list[str], env: dict) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deltaport.cli.main", *argv], capture_output=True, text=True, env=env)
    return time.perf_counter() - t, r.returncode, (r.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/deltaport-refusal-bench")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    w = Path(a.workdir)
    base = sparse_model(w / "base", CONFIG)
    ft = sparse_model(w / "finetuned", CONFIG)
    other = sparse_model(w / "other-vocab", {**CONFIG, "vocab_size": 32064})
    data = w / "text.jsonl"
    data.write_text('{"text": "a b c"}\n' * 16)
    bad = w / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": 1}\n')
    out = str(w / "out.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    b, f, o = str(base), str(ft), str(other)
    cases = {
        "connectivity: missing --data": ["connectivity", b, f, "--data", str(w / "missing.jsonl"), "-o", out],
        "connectivity: --data line without text": ["connectivity", b, f, "--data", str(bad), "-o", out],
        "connectivity: --dtype float8": ["connectivity", b, f, "--data", str(data), "--dtype", "float8", "-o", out],
        "connectivity: shapes differ": ["connectivity", b, o, "--data", str(data), "-o", out],
        "check: missing --data": ["check", "--source-base", b, "--source-finetuned", f, "--target-base", f,
                                  "--data", str(w / "missing.jsonl"), "-o", out],
        "check: shapes differ": ["check", "--source-base", b, "--source-finetuned", f, "--target-base", o,
                                 "--data", str(data), "-o", out],
        "similarity: shapes differ": ["similarity", "--source-base", b, "--source-finetuned", f, "--target-base", o,
                                      "-o", out],
        "compress: lowrank without --rank": ["compress", b, "--method", "lowrank", "-o", str(w / "c")],
        "transfer: --shard-size 5XB": ["transfer", "--source-base", b, "--source-finetuned", f, "--target-base", f,
                                       "--shard-size", "5XB", "-o", str(w / "t")],
        "transfer: shapes differ": ["transfer", "--source-base", b, "--source-finetuned", f, "--target-base", o,
                                    "-o", str(w / "t")],
        "finetune: missing --data": ["finetune", "--model", b, "--data", str(w / "missing.jsonl"), "-o", str(w / "ft")],
        "eval: unknown task": ["eval", b, "--tasks", "no_such_task_xyz", "-o", out],
    }
    helps = [_wall(["--help"], env)[0] for _ in range(a.repeat)]
    limit = statistics.median(helps) + 1.0
    print(f"inputs: 3 sparse bf16 checkpoints of {_size(base) / 1e9:.2f} GB (3 shards each); page cache warm")
    print(f"cpu: {os.cpu_count()} cores, OMP_NUM_THREADS=1, load average {os.getloadavg()[0]:.1f} at start")
    print(f"deltaport --help: median {statistics.median(helps):.2f} s -> limit {limit:.2f} s\n")
    print(f"| refusal | median s | limit met | exit | message |\n|---|---|---|---|---|")
    for name, argv in cases.items():
        runs = [_wall(argv, env) for _ in range(a.repeat)]
        s = statistics.median(r[0] for r in runs)
        code, msg = runs[-1][1], runs[-1][2]
        print(f"| {name} | {s:.2f} | {'yes' if s <= limit else '**no**'} | {code} | {msg[:70]} |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
