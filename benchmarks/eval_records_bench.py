"""What always keeping per-item records costs ``deltaport eval``: lm-eval asked for its samples
(``log_samples=True``, what every run does now) against the same call without (the baseline), in the
same process, interleaved; and the size of a cache entry with and without its records.

    OMP_NUM_THREADS=1 python benchmarks/eval_records_bench.py [--repeats 7]

Tiny in-memory Llama (tests' ``make_model``), the tests' local tasks (tiny_qa: 16 multiple-choice
items; tiny_gen: 16 generations; general_qa: 50 multiple-choice items), one thread, warm (one untimed
call first). Prints a table: median wall seconds per call, and JSON bytes of one cache entry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TASKS = [ROOT / "tests/data/tiny_qa/tiny_qa.yaml", ROOT / "tests/data/tiny_qa/tiny_gen.yaml",
         ROOT / "tests/data/general_qa/general_qa.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from deltaport.evaluation.harness import progress_bars
    from deltaport.evaluation.items import records_from_samples
    from deltaport.evaluation.tasks import resolve_tasks, task_manager_for
    from deltaport.testing import make_model, make_tokenizer

    facts = json.loads((ROOT / "tests/data/tiny_qa/facts.json").read_text())
    tok = make_tokenizer(extra_words=list(facts))
    lm = HFLM(pretrained=make_model("llama", seed=0), tokenizer=tok, batch_size=8)
    specs = resolve_tasks([str(t) for t in TASKS])
    tm = task_manager_for(specs)

    def call(log_samples: bool) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=[s.spec for s in specs], task_manager=tm, device="cpu",
                                       batch_size=8, log_samples=log_samples, random_seed=0, numpy_random_seed=0,
                                       torch_random_seed=0, fewshot_random_seed=0)

    times: dict[bool, list[float]] = {False: [], True: []}
    with progress_bars(False):
        out = call(True)  # warm-up, untimed
        for _ in range(args.repeats):
            for flag in (False, True):
                t0 = time.perf_counter()
                call(flag)
                times[flag].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, lm-eval {lm_eval.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, {args.repeats} interleaved repeats, warm")
    print("| call | median s | min s |\n|---|---|---|")
    for flag, label in ((False, "log_samples=False (baseline)"), (True, "log_samples=True (deltaport now)")):
        print(f"| {label} | {statistics.median(times[flag]):.3f} | {min(times[flag]):.3f} |")
    print("\n| task | items | cache entry bytes without records | with records |\n|---|---|---|---|")
    for s in specs:
        base = {"metrics": out["results"][s.name]}
        recs = records_from_samples(out["samples"][s.name])
        print(f"| {s.name} | {len(recs)} | {len(json.dumps(base))} | {len(json.dumps(base | {'items': recs}))} |")


if __name__ == "__main__":
    main()
