"""Eval / finetune / evolve costs on tiny models (CPU): where the seconds go, and what the cache saves.

    OMP_NUM_THREADS=1 python benchmarks/eval_finetune_bench.py --workdir /tmp/dpbench-eval

Measures (wall seconds inside this process, after imports; process CPU seconds beside it):
  * eval, in-memory model: first call (lm-eval/HFLM set-up + task build + scoring) and a repeat;
  * eval, model on disk, with a result cache: uncached, then cached (content hash + cache read only);
  * finetune: N steps of the quick recipe on the tiny chat data — tokens/s from the training log;
  * evolve: a 3-version chain, all four strategies, then a --resume over the finished run.
Tiny models only (a ~60 k-parameter Llama): the numbers show fixed costs, not throughput at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny_qa"


def timed(label, fn, rows):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    rows.append((label, time.perf_counter() - t0, time.process_time() - c0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/dpbench-eval")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from deltaport import evaluate
    from deltaport.evolve import run_chain
    from deltaport.finetune import finetune
    from deltaport.testing import make_model, make_tokenizer, perturbed, save

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    facts = json.loads((DATA / "facts.json").read_text())
    tok = make_tokenizer(extra_words=list(facts))
    m = make_model("llama", seed=0)
    tasks = [str(DATA / "tiny_qa.yaml"), str(DATA / "tiny_gen.yaml")]
    rows: list = []
    timed("eval in-memory, first call (2 tasks x 16 docs)", lambda: evaluate({"m": (m, tok)}, tasks), rows)
    timed("eval in-memory, repeat", lambda: evaluate({"m": (m, tok)}, tasks), rows)
    d = save(m, work / "m", tokenizer=tok)
    timed("eval from disk, uncached", lambda: evaluate([str(d)], tasks, cache_dir=work / "cache"), rows)
    timed("eval from disk, cached", lambda: evaluate([str(d)], tasks, cache_dir=work / "cache"), rows)
    r = timed(f"finetune {args.steps} steps (batch 8, quick recipe)",
              lambda: finetune(str(d), str(DATA / "sft.jsonl"), work / "ft", steps=args.steps, lr=3e-3), rows)
    vs = [d, save(perturbed(m, 1), work / "m2", tokenizer=tok), save(perturbed(m, 2), work / "m3", tokenizer=tok)]
    chain = {"versions": [str(v) for v in vs], "data": str(DATA / "sft.jsonl"), "device": "cpu",
             "finetune": {"steps": 10, "lr": 3e-3, "batch_size": 8, "eval_every": 5},
             "eval": {"tasks": tasks}, "strategies": ["iterative", "direct", "plain", "transfer-only"]}
    res = timed("evolve 3 versions x 4 strategies (10 steps each)", lambda: run_chain(chain, work / "run"), rows)
    timed("evolve --resume over the finished run", lambda: run_chain(chain, work / "run", resume=True), rows)
    print(f"threads={args.threads}  torch={torch.__version__}")
    print(f"{'what':58s} {'wall s':>8s} {'cpu s':>8s}")
    for label, wall, cpu in rows:
        print(f"{label:58s} {wall:8.2f} {cpu:8.2f}")
    tokens = r.log[-1]["tokens"] or 0
    ft_wall = next(w for lab, w, _ in rows if lab.startswith("finetune"))
    print(f"finetune: loss {r.log[0]['loss']:.3f} -> {r.log[-1]['loss']:.3f}, {tokens:.0f} tokens, "
          f"{tokens / ft_wall:.0f} tokens/s including set-up")
    print(f"evolve steps computed: {len(res['computed'])}")


if __name__ == "__main__":
    main()
