"""Header-only commands: wall time of ``deltaport --help``, ``inspect`` and plans that fail, per process.

Builds an 8-shard bf16 checkpoint of SmolLM2-135M's shapes (272 tensors, ~270 MB, zeros) and three
variants of it that a transfer must refuse (one tensor renamed, one with another shape, one stored as
an integer), each sharing 7 of its 8 shard files with the original (hard links). Then runs every
command in a fresh process, ``--repeat`` times, and prints the median wall time of the whole process
(Python start and imports included) and whether it imported torch.

    python benchmarks/header_only_bench.py --workdir /tmp/dp-header --repeat 5
    python benchmarks/header_only_bench.py --workdir /tmp/dp-header --src OTHER_CHECKOUT/src   # another version

``--src`` puts that source tree first on ``PYTHONPATH`` (compare two versions in one session, under
the same load). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: --size: SmolLM2-135M's shapes (270 MB in bf16) or SmolLM2-360M's (0.72 GB, the size of the issue's bar)
SIZES = {"135m": (30, 576, 1536, 49152, 192, 9), "360m": (32, 960, 2560, 49152, 320, 15)}
LAYERS, HIDDEN, INTER, VOCAB, KV, HEADS = SIZES["135m"]
SHARDS = 8
CONFIG: dict = {}


def set_size(size: str) -> None:
    global LAYERS, HIDDEN, INTER, VOCAB, KV, HEADS, CHANGED
    LAYERS, HIDDEN, INTER, VOCAB, KV, HEADS = SIZES[size]
    CHANGED = f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"
    CONFIG.clear()
    CONFIG.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
                   "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                   "num_key_value_heads": KV // (HIDDEN // HEADS), "vocab_size": VOCAB, "tie_word_embeddings": True,
                   "torch_dtype": "bfloat16"})


set_size("135m")
#: the tensor each refused variant changes (it lives in the last shard)
CHANGED = f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                    p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                    p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    out["model.norm.weight"] = (HIDDEN,)
    return out


def _split(names: list[str]) -> list[list[str]]:
    per = -(-len(names) // SHARDS)
    return [names[i:i + per] for i in range(0, len(names), per)]


def _write_shard(path: Path, specs: dict[str, tuple[tuple[int, ...], object]]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({n: torch.zeros(s, dtype=dt) for n, (s, dt) in specs.items()}, str(path), metadata={"format": "pt"})


def build(root: Path) -> dict[str, Path]:
    """The original and the three refused variants under ``root`` (built once, reused)."""
    import torch

    dirs = {k: root / k for k in ("model", "model2", "model3", "renamed", "reshaped", "integer")}
    if (root / "complete").exists():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = {n: (s, torch.bfloat16) for n, s in shapes().items()}
    groups = _split(sorted(base))
    variants = {
        "model": base,
        "renamed": {(n.replace("down_proj", "down_projection") if n == CHANGED else n): v for n, v in base.items()},
        "reshaped": {n: (((HIDDEN, INTER + 64), v[1]) if n == CHANGED else v) for n, v in base.items()},
        "integer": {n: ((v[0], torch.int16) if n == CHANGED else v) for n, v in base.items()},
    }
    for key, specs in variants.items():
        d = dirs[key]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
        wm = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            names = [CHANGED.replace("down_proj", "down_projection") if key == "renamed" and n == CHANGED else n
                     for n in group]
            wm.update({n: fname for n in names})
            if key != "model" and CHANGED not in group:
                os.link(dirs["model"] / fname, d / fname)  # the unchanged shards are shared
            else:
                _write_shard(d / fname, {n: specs[n] for n in names})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    for key in ("model2", "model3"):  # two more inputs for a successful transfer: the same files, hard-linked
        shutil.copytree(dirs["model"], dirs[key], copy_function=os.link)
    (root / "complete").write_text("ok\n")
    return dirs


def commands(d: dict[str, Path], out: Path) -> dict[str, list[str]]:
    m = str(d["model"])
    tr = ["transfer", "--source-base", m, "--source-finetuned", m, "-o", str(out)]
    cmds = {"--help": ["--help"], "transfer --help": ["transfer", "--help"], "inspect --help": ["inspect", "--help"],
            "inspect": ["inspect", m]}
    for key in ("renamed", "reshaped", "integer"):
        cmds[f"transfer onto {key} (refused)"] = tr + ["--target-base", str(d[key])]
    cmds["transfer --dry-run (plan succeeds)"] = tr + ["--target-base", m, "--dry-run"]
    three = ["transfer", "--source-base", m, "--source-finetuned", str(d["model2"]), "--target-base", str(d["model3"]),
             "-o", str(out)]
    cmds["transfer --dry-run --quiet (3 dirs)"] = three + ["--dry-run", "--quiet"]
    return cmds


RUNNER = ("import atexit, sys\n"
          "atexit.register(lambda: sys.stderr.write('\\ntorch-imported=%s numba-imported=%s\\n' % "
          "('torch' in sys.modules, 'numba' in sys.modules)))\n"
          "sys.argv[0] = 'deltaport'\n"
          "from deltaport.cli.main import entry\n"
          "entry()\n")


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, int, bool, bool]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, r.returncode, "torch-imported=True" in r.stderr, "numba-imported=True" in r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dp-header-bench"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", type=Path, default=None, help="source tree to import deltaport from (PYTHONPATH)")
    ap.add_argument("--size", choices=sorted(SIZES), default="135m", help="shapes of the checkpoints (360m: 0.72 GB)")
    a = ap.parse_args()
    set_size(a.size)
    dirs = build(a.workdir / a.size)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if a.src is not None:
        env["PYTHONPATH"] = str(a.src.resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    where = subprocess.run([sys.executable, "-c", "import deltaport; print(deltaport.__file__)"], env=env,
                           capture_output=True, text=True).stdout.strip()
    print(f"deltaport from {where}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    size = sum(f.stat().st_size for f in dirs["model"].glob("*.safetensors"))
    print(f"checkpoints: {a.size} shapes, {size / 1e9:.2f} GB each; python {sys.version.split()[0]}, warm cache "
          f"(headers read before), one process per run, median of {a.repeat}")
    print(f"{'command':40s} {'median s':>9s} {'min s':>7s} {'exit':>5s}  torch / numba imported")
    for label, args in commands(dirs, a.workdir / "out").items():
        runs = [run_once(args, env) for _ in range(a.repeat)]
        walls = [w for w, *_ in runs]
        print(f"{label:40s} {statistics.median(walls):9.2f} {min(walls):7.2f} {runs[-1][1]:5d}  "
              f"{'yes' if runs[-1][2] else 'no'} / {'yes' if runs[-1][3] else 'no'}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
