"""Time the lab presets end to end from an empty run directory (the demo budget: quick ≤ 5 min with one other
CPU-bound process running, full (3 seeds) ≤ 45 min quiet, ci ≤ 2 min on the project's 2-core machine).

    python benchmarks/lab_presets.py ci quick [--threads 1] [--out /tmp/lab-bench]

Prints wall time, CPU time (user+sys of the child), the load average before/after (other processes on the
machine change the wall time a lot: compare CPU time when the machine is shared) and the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/lab-bench")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for preset in a.presets:
        out = Path(a.out) / preset
        shutil.rmtree(out, ignore_errors=True)
        load0 = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "deltaport.cli.main", "lab", "run", preset, "-o", str(out),
                              "--no-progress", "--threads", str(a.threads)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"{preset}: rc {rc}, wall {wall:.0f} s, cpu {cpu:.0f} s, threads {a.threads}, "
              f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
        if rc == 0 and (out / "summary.json").exists():  # a preset with several seeds
            sm = json.loads((out / "summary.json").read_text())
            for f in sm["findings"]:
                print(f"   [{f['verdict']}] ({f['id']}) {f['claim']}: {f['ours']}")
            print("   timings:", sm["timings_s"])
        elif rc == 0:
            r = json.loads((out / "results.json").read_text())
            for c in r["claims"]:
                print(f"   [{c['reproduced']}] ({c['id']}) {c['claim']}: {c['ours']}")
            print("   timings:", r["timings_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
