"""Fingerprint every file the model-writing commands produce, to show that a refactor changed no byte.

Builds small seeded families (fp32, bf16, fp16; tied and untied embeddings; a grown vocabulary; a
PEFT LoRA adapter), runs each writing command of the CLI on them (transfer, diff, apply, composed
apply with and without TIES, compress with every method) and prints one line per case: the case,
then the sha256 of the output directory (every file's relative path and bytes, in sorted order).

    python benchmarks/output_hashes.py --workdir /tmp/dp-hashes > before.txt
    # ... change the code ...
    python benchmarks/output_hashes.py --workdir /tmp/dp-hashes --compare before.txt

With ``--compare`` the script exits 1 when any case's hash differs from the file's and names it.
Run both sides with the same ``--workdir``: provenance records the input paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def build_inputs(work: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from deltaport import testing

    m: dict[str, Path] = {}
    for tag, arch, dtype in (("f32", "llama", torch.float32), ("bf16", "qwen2", torch.bfloat16),
                             ("f16", "gemma", torch.float16)):
        fam = testing.make_family(work / tag, arch=arch, dtype=dtype, seed=3)
        m.update({f"{tag}_{k}": v for k, v in fam.items()})
    # a target whose vocabulary grew by 8 rows (pad) and whose tokenizer has 8 more words (align)
    base = testing.make_model("llama", seed=3, dtype=torch.bfloat16)
    ft = testing.perturbed(base, seed=4)
    grown = testing.make_model("llama", seed=5, dtype=torch.bfloat16, vocab_size=72)
    words = [f"w{i}" for i in range(8)]
    m["grow_source_base"] = testing.save(base, work / "grow" / "sb")
    m["grow_source_finetuned"] = testing.save(ft, work / "grow" / "sf")
    m["grow_target_base"] = testing.save(grown, work / "grow" / "tb", tokenizer=testing.make_tokenizer(words))
    # a LoRA adapter on the fp32 source base, with non-zero B
    torch.manual_seed(7)
    model = get_peft_model(testing.make_model("llama", seed=3), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.save_pretrained(work / "lora")
    m["lora"] = work / "lora"
    return m


def cases(m: dict[str, Path]) -> list[tuple[str, list[str]]]:
    def fam(tag: str) -> list[str]:
        return ["--source-base", str(m[f"{tag}_source_base"]), "--source-finetuned", str(m[f"{tag}_source_finetuned"]),
                "--target-base", str(m[f"{tag}_target_base"])]

    c: list[tuple[str, list[str]]] = []
    for tag in ("f32", "bf16", "f16"):
        for lam in ("1", "0.5", "0.7", "1.3"):
            c.append((f"transfer_{tag}_l{lam}", ["transfer", *fam(tag), "--scale", lam]))
        c.append((f"transfer_{tag}_f32compute", ["transfer", *fam(tag), "--compute-dtype", "float32"]))
        c.append((f"diff_{tag}", ["diff", "--base", str(m[f"{tag}_source_base"]),
                                  "--finetuned", str(m[f"{tag}_source_finetuned"])]))
        c.append((f"diff_{tag}_target", ["diff", "--base", str(m[f"{tag}_source_base"]),
                                         "--finetuned", str(m[f"{tag}_target_base"])]))
        for lam in ("1", "0.7"):
            c.append((f"apply_{tag}_l{lam}", ["apply", "{out:diff_%s}" % tag, "--to", str(m[f"{tag}_target_base"]),
                                              "--scale", lam]))
        for meth, arg in (("lowrank", ["--rank", "4"]), ("sparse", ["--density", "0.25"]), ("sign", [])):
            c.append((f"compress_{tag}_{meth}", ["compress", "{out:diff_%s}" % tag, "--method", meth, *arg]))
            c.append((f"apply_{tag}_{meth}", ["apply", "{out:compress_%s_%s}" % (tag, meth),
                                              "--to", str(m[f"{tag}_target_base"])]))
        c.append((f"compose_{tag}", ["apply", "{out:diff_%s}" % tag, "{out:compress_%s_lowrank}" % tag,
                                     "--to", str(m[f"{tag}_source_base"]), "--scale", "0.7", "--scale", "0.4"]))
        c.append((f"compose_{tag}_ties", ["apply", "{out:diff_%s}" % tag, "{out:diff_%s_target}" % tag,
                                          "--to", str(m[f"{tag}_source_base"]), "--ties", "0.5"]))
    c.append(("transfer_f32_include", ["transfer", *fam("f32"), "--include", "mlp", "--exclude", "up_proj"]))
    g = ["--source-base", str(m["grow_source_base"]), "--source-finetuned", str(m["grow_source_finetuned"]),
         "--target-base", str(m["grow_target_base"])]
    c.append(("transfer_grow_pad", ["transfer", *g, "--vocab-policy", "pad"]))
    c.append(("transfer_grow_align", ["transfer", *g, "--vocab-policy", "align"]))
    c.append(("transfer_grow_align_ft", ["transfer", *g, "--vocab-policy", "align", "--unmatched-rows", "finetuned"]))
    c.append(("transfer_lora", ["transfer", "--source-base", str(m["f32_source_base"]), "--source-finetuned",
                                str(m["lora"]), "--target-base", str(m["f32_target_base"])]))
    c.append(("transfer_lora_l0.7", ["transfer", "--source-base", str(m["f32_source_base"]), "--source-finetuned",
                                     str(m["lora"]), "--target-base", str(m["f32_target_base"]), "--scale", "0.7"]))
    c.append(("diff_lora", ["diff", "--base", str(m["f32_source_base"]), "--finetuned", str(m["lora"])]))
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/dp-output-hashes")
    ap.add_argument("--compare", help="a file this script printed before; exit 1 on any difference")
    ap.add_argument("--only", help="regex: run only the cases it matches (re.search), and the cases they read")
    a = ap.parse_args()
    work = Path(a.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    inputs = build_inputs(work / "in")
    outs: dict[str, Path] = {}
    lines = []
    todo = cases(inputs)
    if a.only:
        import re

        need = {n for n, _ in todo if re.search(a.only, n)}
        for n, argv in reversed(todo):  # a case's inputs come before it
            if n in need:
                need |= {x[5:-1] for x in argv if x.startswith("{out:")}
        todo = [(n, argv) for n, argv in todo if n in need]
    for name, argv in todo:
        argv = [outs[x[5:-1]].as_posix() if x.startswith("{out:") else x for x in argv]
        out = work / "out" / name
        r = subprocess.run([sys.executable, "-m", "deltaport.cli.main", *argv, "-o", str(out), "--quiet"],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            lines.append(f"{name} exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
        else:
            outs[name] = out
            lines.append(f"{name} {tree_hash(out)}")
        print(lines[-1], flush=True)
    if a.compare:
        before = dict(line.split(" ", 1) for line in Path(a.compare).read_text().splitlines() if line.strip())
        now = dict(line.split(" ", 1) for line in lines)
        if a.only:
            before = {k: v for k, v in before.items() if k in now}
        bad = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        print(f"{len(now) - len(bad)} of {len(set(before) | set(now))} cases identical" +
              (f"; differ: {', '.join(bad)}" if bad else ""))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
