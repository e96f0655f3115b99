#!/usr/bin/env bash
# scripts/gpu_check.sh: the GPU run log that docs/finetune.md and docs/eval.md ask for.
#
#   bash scripts/gpu_check.sh [LOG]          (from the repository root; LOG defaults to gpu_check.log)
#   MODEL=path/or/hub-id bash scripts/gpu_check.sh   (the vLLM check's model; default: a tiny Llama built here)
#
# Where CUDA is present it runs, and logs with times:
#   1. the multi-process tests of tests/test_distributed.py on GPUs (DELTAPORT_TEST_DEVICE=cuda: torchrun,
#      accelerate DDP and FSDP with `use_cpu: false`, resume, a crashing rank, eval, evolve); they need two
#      GPUs and report "skipped" with one;
#   2. one-process fine-tuning on the GPU and on the CPU with the same flags; the recipes use bf16 autocast
#      on a GPU that supports it (fp32 on CPU), so the max |Δw| between the two is printed, not judged;
#   3. `deltaport eval` with the vLLM backend and with the HF backend on the same model and task, the two
#      score tables one after the other (vLLM computes its own log-probabilities; the scores may differ
#      slightly). The default tiny Llama (hidden size 32) may be below what vLLM's kernels accept: set MODEL
#      to a small real model (e.g. a local copy of HuggingFaceTB/SmolLM2-135M) for a meaningful check.
# Exit 0 when every step passed, 1 otherwise, 2 without CUDA. Nothing outside the temporary folder is written
# except LOG.
set -uo pipefail
LOG=${1:-gpu_check.log}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} OMP_NUM_THREADS=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }
failed=0
step() {  # step NAME CMD...: run, keep its output in the log's tail, record pass/fail and time
    local name=$1; shift
    local t0=$SECONDS
    if "$@" > "$WORK/out.txt" 2>&1; then log "PASS  $name  ($((SECONDS - t0)) s)"
    else log "FAIL  $name  ($((SECONDS - t0)) s)"; failed=1; fi
    tail -n 15 "$WORK/out.txt" | sed 's/^/      /' | tee -a "$LOG" > /dev/null
}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: this torch sees no CUDA GPU; run it on a machine with one (nothing was run)" >&2
    exit 2
fi
log "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
log "$(nvidia-smi -L 2>/dev/null)"
log "$(python - <<'PY'
import importlib, torch
v = {m: getattr(importlib.import_module(m), "__version__", "?") if importlib.util.find_spec(m) else "not installed"
     for m in ("deltaport", "torch", "transformers", "accelerate", "trl", "lm_eval", "vllm")}
print("versions:", ", ".join(f"{k} {x}" for k, x in v.items()), f"| CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
PY
)"

# 1. the multi-process tests on GPUs
step "tests/test_distributed.py on GPUs" env DELTAPORT_TEST_DEVICE=cuda \
    python -m pytest -q -p no:cacheprovider "$ROOT/tests/test_distributed.py" -rs --durations=0

# 2. one process on the GPU against the CPU, same flags
python - "$WORK" "$ROOT" <<'PY'
import json, sys
from pathlib import Path
from deltaport.testing import make_model, make_tokenizer, save
d = Path(sys.argv[1]); facts = json.loads((Path(sys.argv[2]) / "tests/data/tiny_qa/facts.json").read_text())
save(make_model("llama", seed=0), d / "base", tokenizer=make_tokenizer(extra_words=list(facts)))
PY
FLAGS="--data $ROOT/tests/data/tiny_qa/sft.jsonl --recipe quick --steps 8 --batch-size 8 --micro-batch-size 2 --seed 0 --no-progress"
step "finetune, one process, cpu" python -m deltaport.cli.main finetune --model "$WORK/base" -o "$WORK/ft_cpu" $FLAGS --device cpu
step "finetune, one process, cuda" python -m deltaport.cli.main finetune --model "$WORK/base" -o "$WORK/ft_cuda" $FLAGS --device cuda
step "max |w_cuda - w_cpu| (printed, not judged)" python - "$WORK" <<'PY'
import sys, json
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1])
a = {k: v for f in sorted((d / "ft_cpu").glob("*.safetensors")) for k, v in load_file(f).items()}
b = {k: v for f in sorted((d / "ft_cuda").glob("*.safetensors")) for k, v in load_file(f).items()}
assert sorted(a) == sorted(b)
bf16 = json.loads((d / "ft_cuda" / "deltaport.json").read_text())["settings"]["bf16"]
print(f"max |dw| = {max((a[k].double() - b[k].double()).abs().max().item() for k in a):.3g} (bf16 autocast on GPU: {bf16})")
PY

# 3. vLLM and HF backends on the same model and task
MODEL=${MODEL:-$WORK/base}
TASK="$ROOT/tests/data/tiny_qa/tiny_qa.yaml"
step "eval --backend hf" python -m deltaport.cli.main eval "$MODEL" --tasks "$TASK" --device cuda --backend hf \
    --no-cache -o "$WORK/hf.json" --table "$WORK/hf.md"
step "eval --backend vllm" python -m deltaport.cli.main eval "$MODEL" --tasks "$TASK" --device cuda --backend vllm \
    --no-cache -o "$WORK/vllm.json" --table "$WORK/vllm.md"
for b in hf vllm; do [ -f "$WORK/$b.md" ] && { log "--- $b"; tee -a "$LOG" < "$WORK/$b.md"; }; done

log "gpu_check: $([ $failed = 0 ] && echo 'every step passed' || echo 'some steps FAILED (see above)'); log in $LOG"
exit $failed
