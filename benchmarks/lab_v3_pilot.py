"""The Design v3 pilot (docs/lab.md): plain fine-tuning ONLY, no transfer, at several seeds and both torch
thread counts, to choose a fine-tuning recipe that reaches its plateau within the budget.

    python benchmarks/lab_v3_pilot.py --threads 1 --seeds 1,2 --lrs 5e-5,1e-4 -o /tmp/pilot

For every (seed, lr) it builds the preset's family M1..M5 (Mx left out: the pilot never transfers), fine-tunes
FT(M3), FT(M4), FT(M5) with the lab's recipe (deltaport.finetune, batch 8) and evaluates the held-out items
every ``curve_every`` steps. Writes ``OUT/pilot-t<threads>.json``: the curves, the per-item answers of the
final models, the config and the environment. Compare two thread counts with ``--compare A.json B.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def run(preset: str, seeds: list[int], lrs: list[float], steps: int, threads: int, out: Path, init_ulp: int = 0) -> dict:
    from deltaport.lab.config import load_config
    from deltaport.lab.env import environment
    from deltaport.lab.family import build_family
    from deltaport.lab.run import _quiet_libraries, prepare_data
    from deltaport.lab.steps import CachedLibrary
    from deltaport.lab.world import sft_records

    _quiet_libraries(threads)
    base = load_config(preset)
    rows = []
    for seed in seeds:
        # mx_like M1: the pilot never uses Mx, so its pretraining run stops at M1's step (cheap)
        cfg = dataclasses.replace(base, seed=seed, threads=threads, init_ulp=init_ulp,
                                  pretrain=dataclasses.replace(base.pretrain, mx_like="M1"))
        run_dir = out / f"t{threads}-ulp{init_ulp}" / f"seed-{seed}"
        t0 = time.perf_counter()
        world, tok, tasks = prepare_data(cfg, run_dir)
        family = build_family(cfg, run_dir / "family")
        lib = CachedLibrary(run_dir, tok, tasks, seed=seed)
        family_s = time.perf_counter() - t0
        for lr in lrs:
            for v in ("M3", "M4", "M5"):
                t1 = time.perf_counter()
                path, curve = lib.finetune(family[v], sft_records(world), f"FT-{v}-lr{lr:g}-s{steps}", steps=steps,
                                           lr=lr, batch_size=cfg.finetune.batch_size, curve_task="lab_heldout",
                                           curve_every=cfg.finetune.curve_every)
                items = lib.exact_match({"ft": path}, ["lab_heldout"])
                rows.append({"seed": seed, "lr": lr, "steps": steps, "version": v, "curve": curve,
                             "final": items["ft"]["lab_heldout"], "items": lib.items[("ft", "lab_heldout")],
                             "seconds": round(time.perf_counter() - t1, 1)})
                print(f"seed {seed} t{threads} ulp{init_ulp} lr {lr:g} {v}: " + " ".join(f"{100 * s:.0f}" for _, s in curve),
                      flush=True)
        rows.append({"seed": seed, "family_seconds": round(family_s, 1)})
    result = {"preset": preset, "threads": threads, "init_ulp": init_ulp, "rows": rows, "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pilot-t{threads}-ulp{init_ulp}.json").write_text(json.dumps(result, indent=1))
    return result


def compare(a: dict, b: dict) -> None:
    """Final held-out EM of every (seed, lr, version) at both thread counts, the gap, items that differ, and the
    rise over the last third of the curve (a plateau shows ~0)."""
    key = lambda r: (r["seed"], r["lr"], r["version"])  # noqa: E731
    rb = {key(r): r for r in b["rows"] if "version" in r}
    print(f"| seed | lr | version | EM A | EM B | gap | items differing | "
          "rise over last third (t1 / t2) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in a["rows"]:
        if "version" not in r or key(r) not in rb:
            continue
        s = rb[key(r)]
        diff = sum(x != y for x, y in zip(r["items"], s["items"]))

        def rise(c):
            third = [y for x, y in c if x >= 2 * c[-1][0] / 3]
            return 100 * (third[-1] - third[0])

        print(f"| {r['seed']} | {r['lr']:g} | {r['version']} | {100 * r['final']:.1f} | {100 * s['final']:.1f} | "
              f"{100 * (s['final'] - r['final']):+.1f} | {diff} | {rise(r['curve']):+.1f} / {rise(s['curve']):+.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--lrs", default="5e-5,1e-4")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-ulp", type=int, default=0, help="every initial weight this many ULPs up (the noise twin)")
    ap.add_argument("-o", "--out", default="/tmp/lab-v3-pilot")
    ap.add_argument("--compare", nargs=2)
    a = ap.parse_args()
    if a.compare:
        compare(*(json.loads(Path(p).read_text()) for p in a.compare))
        return 0
    run(a.preset, [int(x) for x in a.seeds.split(",")], [float(x) for x in a.lrs.split(",")], a.steps, a.threads,
        Path(a.out), a.init_ulp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
