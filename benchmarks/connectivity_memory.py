"""Peak memory and time of ``deltaport connectivity`` against the size of one model.

    OMP_NUM_THREADS=1 python benchmarks/connectivity_memory.py [--hidden 512 --layers 8]

Builds two random Llamas of the given size (saved to a temp dir), then runs the connectivity curve
in a fresh subprocess and reports its peak RSS (``ru_maxrss``) in units of one model's float32 size.
The design bound is three models (A, B, one interpolated model) plus the Python/torch baseline and
activations; the baseline is measured separately (a process that only imports torch/transformers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    torch.set_num_threads(1)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    mode, a, b, data, points = sys.argv[1:6]
    t = time.perf_counter()
    out = {}
    if mode == "run":
        from deltaport.connectivity import connectivity
        r = connectivity(a, b, data, points=int(points), max_tokens=1024)
        out = {"barrier": r["barrier"], "endpoints_exact": r["endpoints_exact"]}
    else:
        import deltaport.connectivity  # noqa: F401  (same imports, no models)
    out["seconds"] = time.perf_counter() - t
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
""")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--points", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    from deltaport import testing as T

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        kw = dict(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
        a = T.make_model("llama", seed=0, **{k: v for k, v in kw.items() if k != "vocab_size"},
                         vocab_size=kw["vocab_size"])
        n = sum(p.numel() for p in a.parameters())
        T.save(a, Path(d) / "a", max_shard_size="200MB")
        T.save(T.perturbed(a, seed=1, scale=0.01), Path(d) / "b", max_shard_size="200MB")
        del a
        data = Path(d) / "ids.json"
        import random

        rng = random.Random(0)
        docs = [" ".join(rng.choice(["the", "a", "of", "is", "red", "green", "flag", "color"]) for _ in range(200))
                for _ in range(20)]
        data = Path(d) / "text.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        res = {}
        for mode in ("baseline", "run"):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD, mode, str(Path(d) / "a"), str(Path(d) / "b"), str(data),
                                str(args.points)], capture_output=True, text=True, check=True,
                               env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                    "PYTHONPATH": str(ROOT / "src")})
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            res[mode]["wall"] = time.perf_counter() - t0
    model_mb = n * 4 / 2**20
    extra = res["run"]["maxrss_mb"] - res["baseline"]["maxrss_mb"]
    print(f"model: {n / 1e6:.1f} M parameters = {model_mb:.0f} MB float32; {args.points} points, 1024 tokens, 1 thread")
    print(f"peak RSS: baseline (imports) {res['baseline']['maxrss_mb']:.0f} MB, connectivity run "
          f"{res['run']['maxrss_mb']:.0f} MB -> {extra:.0f} MB above baseline = {extra / model_mb:.2f} x one model")
    print(f"connectivity call {res['run']['seconds']:.1f} s; endpoints exact: {res['run']['endpoints_exact']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
