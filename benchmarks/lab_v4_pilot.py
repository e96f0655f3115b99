"""The Design v4 pilot (docs/lab.md): plain fine-tuning ONLY, no transfer. Does the random draw of the input rows
that pretraining never trains decide whether plain fine-tuning learns the QA interface?

    python benchmarks/lab_v4_pilot.py --seeds 0,4 --versions M4,M5 --rows orig,zero,draw:13,from:0 --threads 1 -o OUT

For every seed it builds (or reuses, under OUT/family) the ``full`` preset's family **as design v3 built it**
(``unseen_rows: random``), then, for every version and every row variant, copies the version, replaces the
input-embedding rows of ``deltaport.lab.world.unseen_in_pretraining`` (chat markers, question words, pad/unk/eos)
and fine-tunes it with the lab's recipe (lr 4e-4, 150 steps, batch 8), scoring the held-out items every 10 steps.
Row variants: ``orig`` (the seed's own draw, v3), ``zero`` (design v4), ``draw:N`` (N(0, 0.02) from torch
generator N, the initialiser's distribution), ``from:S`` (the same version's rows at seed S, by token string).
Writes ``OUT/pilot-t<threads>.json`` and prints one curve per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path


def run(seeds: list[int], versions: list[str], variants: list[str], threads: int, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from deltaport.lab.config import load_config
    from deltaport.lab.env import environment
    from deltaport.lab.family import build_family, world_of
    from deltaport.lab.run import _quiet_libraries, prepare_data
    from deltaport.lab.steps import CachedLibrary
    from deltaport.lab.world import sft_records, unseen_in_pretraining

    _quiet_libraries(threads)
    full = load_config("full")
    v3 = dataclasses.replace(full, threads=threads, pretrain=dataclasses.replace(full.pretrain, unseen_rows="random"))
    emb = "model.embed_tokens.weight"
    families: dict[int, dict[str, Path]] = {}
    words: dict[int, list[str]] = {}
    vocabs: dict[int, dict[str, int]] = {}

    def family(seed: int) -> dict[str, Path]:
        if seed not in families:
            cfg = dataclasses.replace(v3, seed=seed)
            families[seed] = build_family(cfg, out / "family")
            world = world_of(cfg)
            words[seed] = unseen_in_pretraining(world)
            vocabs[seed] = json.loads((families[seed]["M1"] / "tokenizer.json").read_text())["model"]["vocab"]
        return families[seed]

    rows_out = []
    for seed in seeds:
        fam = family(seed)
        cfg = dataclasses.replace(v3, seed=seed)
        run_dir = out / f"t{threads}" / f"seed-{seed}"
        world, tok, tasks = prepare_data(cfg, run_dir)
        lib = CachedLibrary(run_dir, tok, tasks, seed=seed)
        ids = [vocabs[seed][w] for w in words[seed]]
        for v in versions:
            m1, m5 = (load_file(str(fam[n] / "model.safetensors"))[emb] for n in ("M1", "M5"))
            assert torch.equal(m1[ids], m5[ids]), "rows pretraining never reads changed between M1 and M5"
            for variant in variants:
                dst = run_dir / "inits" / f"{v}-{variant.replace(':', '')}"
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(fam[v], dst)
                sd = load_file(str(fam[v] / "model.safetensors"))
                w = sd[emb].clone()
                if variant == "zero":
                    w[ids] = 0.0
                elif variant.startswith("draw:"):
                    g = torch.Generator().manual_seed(int(variant[5:]))
                    for i in ids:
                        w[i] = torch.randn(w.shape[1], generator=g) * 0.02
                elif variant.startswith("from:"):
                    donor_seed = int(variant[5:])
                    donor = load_file(str(family(donor_seed)[v] / "model.safetensors"))[emb]
                    for word, i in zip(words[seed], ids):
                        w[i] = donor[vocabs[donor_seed][word]]
                elif variant != "orig":
                    raise SystemExit(f"unknown row variant {variant!r} (orig, zero, draw:N, from:SEED)")
                sd[emb] = w
                save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
                t0 = time.perf_counter()
                _, curve = lib.finetune(dst, sft_records(world), f"FT-{v}-{variant.replace(':', '')}", steps=150,
                                        lr=4e-4, batch_size=8, curve_task="lab_heldout", curve_every=10)
                rows_out.append({"seed": seed, "version": v, "rows": variant, "threads": threads, "curve": curve,
                                 "seconds": round(time.perf_counter() - t0, 1)})
                print(f"t{threads} seed {seed} FT({v}) rows {variant}: " + " ".join(f"{100 * s:.0f}" for _, s in curve),
                      flush=True)
    result = {"preset": "full (unseen_rows: random, as design v3)", "threads": threads, "unseen_words": words,
              "rows": rows_out, "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pilot-t{threads}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--versions", default="M4,M5")
    ap.add_argument("--rows", default="orig,zero")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", default="/tmp/lab-v4-pilot")
    a = ap.parse_args()
    run([int(x) for x in a.seeds.split(",")], a.versions.split(","), a.rows.split(","), a.threads, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
