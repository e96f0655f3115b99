"""Fine-tuning and evaluation in one process vs two CPU processes (torchrun, accelerate DDP / FSDP): the
launch lines of docs/finetune.md and docs/eval.md, timed, and how far each result is from one process.

    OMP_NUM_THREADS=1 python benchmarks/distributed_bench.py [--workdir /tmp/dpbench-dist] [--out FILE]

Each launch runs in its own wrapper process, so its CPU seconds and peak RSS (the largest single process
of the launch) are its own. Wall seconds include Python/torch/TRL start-up in every process, which
dominates on the tiny Llama: the numbers show launch overheads, not throughput at scale. The 1-minute
load average before and after each launch is recorded (other work on the machine slows the wall time).
Writes a JSON results file (default benchmarks/results/distributed_cpu.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "tiny_qa"
FLAGS = ["--data", str(DATA / "sft.jsonl"), "--recipe", "quick", "--steps", "8", "--batch-size", "8",
         "--micro-batch-size", "2", "--seed", "0", "--device", "cpu", "--no-progress"]
WRAP = ("import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps({'rc': rc, 'cpu_s': u.ru_utime + u.ru_stime, 'peak_rss_mb': u.ru_maxrss / 1024}))")


def launch(cmd: list[str], cwd: Path) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(r["cpu_s"], 2), "peak_rss_mb": round(r["peak_rss_mb"]),
            "load_1min_before": round(load0, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


def weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/dpbench-dist")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_cpu.json"))
    args = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_OFFLINE="1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(ROOT / "src"))
    import importlib.metadata as md

    from deltaport.testing import make_model, make_tokenizer, save

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    facts = json.loads((DATA / "facts.json").read_text())
    save(make_model("llama", seed=0), work / "base", tokenizer=make_tokenizer(extra_words=list(facts)))
    py = [sys.executable, "-m"]
    tr = [*py, "torch.distributed.run", "--nproc_per_node", "2"]
    acc = lambda cfg: [*py, "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / cfg),  # noqa: E731
                       "--num_processes", "2"]
    ft = lambda out: ["-m", "deltaport.cli.main", "finetune", "--model", str(work / "base"), "-o", out, *FLAGS]  # noqa: E731
    runs = {
        "finetune, 1 process": [*py, "deltaport.cli.main", *ft("one")[2:]],
        "finetune, torchrun --nproc_per_node 2": [*tr, *ft("torchrun")],
        "finetune, accelerate accelerate_cpu_ddp.yaml": [*acc("accelerate_cpu_ddp.yaml"), *ft("ddp")],
        "finetune, accelerate accelerate_cpu_fsdp.yaml": [*acc("accelerate_cpu_fsdp.yaml"), *ft("fsdp")],
    }
    ev = lambda out: ["-m", "deltaport.cli.main", "eval", str(work / "one"), "--tasks", str(DATA / "tiny_qa.yaml"),  # noqa: E731
                      "--device", "cpu", "--no-cache", "-q", "-o", out]
    rows = {}
    for name, cmd in runs.items():
        rows[name] = launch(cmd, work)
    rows["eval tiny_qa (16 items), 1 process"] = launch([*py, *ev("eval_one.json")[1:]], work)
    rows["eval tiny_qa (16 items), torchrun --nproc_per_node 2"] = launch([*tr, *ev("eval_two.json")], work)

    ref = weights(work / "one")
    for name, out in zip(runs, ("one", "torchrun", "ddp", "fsdp")):
        w = weights(work / out)
        rows[name]["world_size"] = json.loads((work / out / "deltaport.json").read_text())["settings"]["world_size"]
        rows[name]["max_abs_dw_vs_1_process"] = max((ref[k].double() - w[k].double()).abs().max().item() for k in ref)
    e1, e2 = (json.loads((work / f).read_text())["results"] for f in ("eval_one.json", "eval_two.json"))
    rows["eval tiny_qa (16 items), torchrun --nproc_per_node 2"]["scores_equal_1_process"] = e1 == e2
    result = {
        "what": "tiny Llama (deltaport.testing.make_model('llama')), quick recipe, 8 steps, batch 8, micro-batch 2, "
                "seed 0; eval: tests/data/tiny_qa/tiny_qa.yaml; one torch thread per process (OMP_NUM_THREADS=1); "
                "cold start of every process (imports included); page cache warm after the first launch",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {m: md.version(m) for m in ("torch", "transformers", "accelerate", "trl", "lm_eval")},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| launch | processes | wall s | CPU s | peak RSS MB | load before/after | max abs Δw vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        dw = r.get("max_abs_dw_vs_1_process")
        extra = f"{dw:.2g}" if dw is not None else ("scores equal" if r.get("scores_equal_1_process") else
                                                    ("scores DIFFER" if "scores_equal_1_process" in r else ""))
        n = r.get("world_size", 2 if "torchrun" in name else 1)
        print(f"| {name} | {n} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']} | "
              f"{r['load_1min_before']}/{r['load_1min_after']} | {extra} |")
    print(f"versions: {result['versions']}; wrote {args.out}")


if __name__ == "__main__":
    main()
