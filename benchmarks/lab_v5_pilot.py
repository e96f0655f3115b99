"""The Design v5 pilot (docs/lab.md): plain fine-tuning ONLY, no transfer, on the families of a committed v4 run.
Does plain fine-tuning reach its plateau at every seed AND in every noise twin, for a given SFT set size and budget?

    python benchmarks/lab_v5_pilot.py --run /work/runs/v4/full --seeds 0,1,2,3,4 --twin --threads 2 \\
        --designs n40s150,n80s150,n40s300 --versions M2,M4,M5 -o OUT

``--run`` is a ``lab run full`` directory (``seed-S/family``, with ``--twin``: ``seed-S/twin/family``, the noise
twin's family: 1 ULP at initialisation). Each design ``nNsS`` fine-tunes with ``world.n_sft = N`` facts for ``S``
steps, everything else the ``full`` preset's recipe (lr 4e-4, batch 8, the seed as the fine-tune's seed), and scores
the held-out items (those of N: more SFT facts leave fewer held-out F1 facts) every ``S/15`` steps. The design
``n40s150`` at 1 thread on the main family (2 threads on the twin's) repeats the v4 run's own plain fine-tunes.
Writes ``OUT/pilot-<main|twin>-t<threads>[-o<offsets>].json`` and prints one curve per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path


def _design(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"n(\d+)s(\d+)", text)
    if not m:
        raise SystemExit(f"design {text!r}: write nNsS (N SFT facts, S steps), e.g. n80s150")
    return int(m[1]), int(m[2])


def run(run: Path, seeds: list[int], twin: bool, designs: list[str], versions: list[str], threads: int,
        out: Path, offsets: tuple[int, ...] = (0,)) -> list[dict]:
    from deltaport.lab.config import load_config
    from deltaport.lab.run import _quiet_libraries, prepare_data
    from deltaport.lab.steps import CachedLibrary
    from deltaport.lab.world import sft_records

    _quiet_libraries(threads)
    full = load_config("full")
    kind = "twin" if twin else "main"
    rows: list[dict] = []
    tag = "" if offsets == (0,) else "-o" + "_".join(map(str, offsets))
    for seed in seeds:
        fam_root = run / f"seed-{seed}" / ("twin" if twin else "") / "family"
        fam = next(fam_root.glob("*/M1")).parent
        for design, offset in [(d, o) for o in offsets for d in designs]:
            n_sft, steps = _design(design)
            cfg = dataclasses.replace(full, seed=seed, threads=threads,
                                      world=dataclasses.replace(full.world, n_sft=n_sft))
            run_dir = out / f"{kind}-t{threads}" / f"seed-{seed}" / f"n{n_sft}"
            world, tok, tasks = prepare_data(cfg, run_dir)
            lib = CachedLibrary(run_dir, tok, tasks, seed=seed + offset)
            for v in versions:
                t0 = time.perf_counter()
                _, curve = lib.finetune(fam / v, sft_records(world), f"FT-{v}-s{steps}", steps=steps,
                                        lr=full.finetune.lr, batch_size=full.finetune.batch_size,
                                        curve_task="lab_heldout", curve_every=max(10, steps // 15))
                rows.append({"family": kind, "seed": seed, "ft_seed": seed + offset, "design": design, "n_sft": n_sft,
                             "steps": steps,
                             "version": v, "threads": threads, "n_heldout": len(world.known) + len(world.new),
                             "curve": curve, "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{kind} t{threads} seed {seed} ft-seed {seed + offset} {design} FT({v}) "
                      f"({rows[-1]['seconds']} s): "
                      + " ".join(f"{100 * s:.0f}" for _, s in curve), flush=True)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"pilot-{kind}-t{threads}{tag}.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a `deltaport lab run full` directory (its seed-S folders)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--twin", action="store_true", help="fine-tune the noise twins' families (seed-S/twin/family)")
    ap.add_argument("--designs", default="n40s150,n80s150")
    ap.add_argument("--versions", default="M2,M4,M5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ft-seed-offsets", default="0",
                    help="fine-tune each family with seeds S+offset (data order, dropout): more draws per family")
    ap.add_argument("-o", "--out", type=Path, default=Path("/tmp/lab-v5-pilot"))
    a = ap.parse_args()
    run(a.run, [int(x) for x in a.seeds.split(",")], a.twin, a.designs.split(","), a.versions.split(","),
        a.threads, a.out, tuple(int(x) for x in a.ft_seed_offsets.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
