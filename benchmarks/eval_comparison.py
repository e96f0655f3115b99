"""docs/eval.md's paired comparison: SmolLM2-135M checkpoints and a transfer, scored item by item.

    OMP_NUM_THREADS=1 python benchmarks/eval_comparison.py run      # evaluate; writes docs/results/eval/
    python benchmarks/eval_comparison.py render                     # docs/eval.md's table from the result file
    python benchmarks/eval_comparison.py render --check             # exit 1 if docs/eval.md disagrees

``run`` builds (or finds, cached) the real-model tier's checkpoints (tests/smollm2.py: SmolLM2-135M-
Instruct as ``base``; ``finetuned`` = base + N(0, 1e-3); ``release`` = base + N(0, 3e-3), made to look
like a base model), transfers the fine-tune onto the release (``release+delta`` = release + (finetuned −
base), λ = 1), and runs, from a work folder where the models are named by those short paths::

    deltaport eval release release+delta finetuned base --tasks tests/data/general_qa/general_qa.yaml \\
        --baseline release --device cpu --batch-size 8 --seed 0 --no-cache --log-samples \\
        -o out/comparison.json --table out/comparison.md --plot out/comparison.png

(``out`` is docs/results/eval/). The task is 50 items of common knowledge written for deltaport's
tests, not a benchmark; the checkpoints' differences are Gaussian noise, so the point of the
comparison is its intervals: how large a difference 50 items can resolve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "eval"
TASK = ROOT / "tests" / "data" / "general_qa" / "general_qa.yaml"
DOC = ROOT / "docs" / "eval.md"
MODELS = ["release", "release+delta", "finetuned", "base"]


def run(workdir: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "src"))
    import smollm2

    import deltaport

    ckpt = smollm2.ensure(workdir / "build")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("release", "finetuned", "base"):
        link = workdir / name
        if not link.is_symlink():
            link.symlink_to(ckpt[name])
    if not (workdir / "release+delta").exists():
        deltaport.transfer(ckpt["base"], ckpt["finetuned"], ckpt["release"], workdir / "release+delta")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    out = workdir / "out"
    if out.is_symlink():
        out.unlink()
    out.symlink_to(OUT)
    cmd = ["deltaport", "eval", *MODELS, "--tasks", str(TASK.relative_to(ROOT)), "--baseline", "release",
           "--device", "cpu", "--batch-size", "8", "--seed", "0", "--no-cache", "--log-samples", "-o",
           "out/comparison.json", "--table", "out/comparison.md", "--plot", "out/comparison.png"]
    (workdir / "tests").unlink() if (workdir / "tests").is_symlink() else None
    (workdir / "tests").symlink_to(ROOT / "tests")  # the task path as written in the command
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=workdir, env=env, check=True)


def render_block() -> str:
    from deltaport.evaluation.compare import comparisons_table

    res = json.loads((OUT / "comparison.json").read_text())
    s = res["settings"]
    v = s["versions"]
    lines = [res["table"].rstrip("\n"), "", comparisons_table(res["comparisons"]).rstrip("\n"), "",
             f"From `docs/results/eval/comparison.json` (deltaport {v['deltaport']}, lm-eval {v['lm_eval']}, torch "
             f"{v['torch']}, transformers {v['transformers']}; {s['device']}, batch size {s['batch_size']}, seed "
             f"{s['seed']}, no cache), made by `OMP_NUM_THREADS=1 python benchmarks/eval_comparison.py run`; the "
             "per-item records are in `docs/results/eval/comparison.lm_eval/`."]
    return "\n".join(lines)


def render(check: bool) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from deltaport.lab.readme import replace_blocks

    text = DOC.read_text()
    new = replace_blocks(text, {"eval-comparison": render_block()})
    if check:
        if new != text:
            print("docs/eval.md's comparison block differs from docs/results/eval/comparison.json; run "
                  "python benchmarks/eval_comparison.py render", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "render"])
    ap.add_argument("--workdir", default="/tmp/deltaport-eval-comparison")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.action == "run":
        run(Path(a.workdir))
        return render(False)
    return render(a.check)


if __name__ == "__main__":
    sys.exit(main())
