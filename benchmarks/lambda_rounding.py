"""A single-Δ apply at λ ≠ 1 against the composed apply's exact rounding, and what the exactness costs.

Both round every element to the nearest value of the exact t + λ·(f − b), λ taken as its float64 value:
a single-Δ transfer/apply decides the elements whose float64 result lies too near a 16-bit rounding
boundary from the exact value (numerics.transfer_into), a composed apply (``apply D1 D2 …``) does the same
for its sum. Composing the Δ with an all-zero Δ (λ = 1) gives the composed path's result of the same
transfer, so the two outputs are compared element by element; the differing elements (up to ``--sample``)
and as many random elements are checked against exact rationals. The single apply is also timed at λ = 1
(the fast path: no element needs a decision): wall and process CPU seconds, the best of ``--repeat``.

    python benchmarks/lambda_rounding.py --models ~/.cache/deltaport-tests/smollm2-*/ --workdir /tmp/lam

``--models`` is a folder holding ``base``, ``finetuned`` and ``release`` checkpoints (the real-model test
tier's cache has them after one run of ``pytest -m realmodel``).
"""

from __future__ import annotations

import argparse
import glob
import shutil
import time
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import load_file

import deltaport
from deltaport.numerics import round_fraction


def _sd(p: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(p / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _timed(fn, repeat: int) -> tuple[float, float, object]:
    best = None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        r = fn()
        t = (time.perf_counter() - t0, time.process_time() - c0)
        best = t if best is None or t[1] < best[1] else best
    return best[0], best[1], r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with base/, finetuned/, release/")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dp-lambda"), help="scratch folder (deleted after)")
    ap.add_argument("--scales", default="0.7,1.3", help="comma-separated λ values (default 0.7,1.3)")
    ap.add_argument("--sample", type=int, default=300, help="elements checked with exact rationals per λ")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each single apply; the best CPU time")
    a = ap.parse_args()
    m, w = a.models, a.workdir
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    try:
        deltaport.diff(m / "base", m / "finetuned", w / "d")
        deltaport.diff(m / "base", m / "base", w / "zero")
        B, F, T = _sd(m / "base"), _sd(m / "finetuned"), _sd(m / "release")

        def single(lam):
            return lambda: deltaport.apply(w / "d", m / "release", w / "single", scale=lam, overwrite=True)

        wall1, cpu1, _ = _timed(single(1.0), a.repeat)
        print(f"single apply at λ = 1: {wall1:.1f} s wall, {cpu1:.1f} s CPU (best of {a.repeat})\n")
        print("| λ | elements | decided exactly | composed differs | sample: single right | single wall s | "
              "single CPU s | CPU vs λ = 1 | composed wall s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for lam in (float(x) for x in a.scales.split(",")):
            wall, cpu, res = _timed(single(lam), a.repeat)
            t0 = time.perf_counter()
            deltaport.apply([w / "d", w / "zero"], m / "release", w / "exact", scale=[lam, 1.0], overwrite=True)
            t_comp = time.perf_counter() - t0
            s, e = _sd(w / "single"), _sd(w / "exact")
            n = bad = right = checked = 0
            gen = torch.Generator().manual_seed(0)
            for k in sorted(s):
                x, y = s[k].reshape(-1), e[k].reshape(-1)
                n += x.numel()
                idx = torch.nonzero(x.view(torch.int16) != y.view(torch.int16)).flatten()
                bad += idx.numel()
                per = max(1, a.sample // len(s))
                pick = torch.cat([idx[:per], torch.randint(0, x.numel(), (per,), generator=gen)]).tolist()
                for j in pick:
                    ex = Fraction(float(T[k].reshape(-1)[j])) + Fraction(lam) * (
                        Fraction(float(F[k].reshape(-1)[j])) - Fraction(float(B[k].reshape(-1)[j])))
                    right += round_fraction(ex, s[k].dtype) == float(x[j])
                    checked += 1
            print(f"| {lam:g} | {n} | {res.stats.exact_fixups} | {bad} | {right}/{checked} | {wall:.1f} | {cpu:.1f} | "
                  f"{cpu / cpu1:.2f}× | {t_comp:.1f} |")
    finally:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
