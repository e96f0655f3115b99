"""How often a single-Δ apply at λ ≠ 1 differs from the composed apply's exact rounding.

A single-Δ transfer/apply computes t + RN64(λ·Δ) in float64 and rounds that once; a composed apply
(``apply D1 D2 …``) decides elements near a 16-bit midpoint exactly for the float64 λ. Composing the Δ
with an all-zero Δ (λ = 1) gives the exact result of the same transfer, so the two outputs can be
compared element by element; a sample of the differing elements is checked against exact rationals.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with base/, finetuned/, release/")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dp-lambda"), help="scratch folder (deleted after)")
    ap.add_argument("--scales", default="0.7,1.3", help="comma-separated λ values (default 0.7,1.3)")
    ap.add_argument("--sample", type=int, default=300, help="differing elements checked with exact rationals per λ")
    a = ap.parse_args()
    m, w = a.models, a.workdir
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    try:
        deltaport.diff(m / "base", m / "finetuned", w / "d")
        deltaport.diff(m / "base", m / "base", w / "zero")
        B, F, T = _sd(m / "base"), _sd(m / "finetuned"), _sd(m / "release")
        print("| λ | elements | differ | share | sample: single right | sample: composed right | single s | composed s |")
        print("|---|---|---|---|---|---|---|---|")
        for lam in (float(x) for x in a.scales.split(",")):
            t0 = time.perf_counter()
            deltaport.apply(w / "d", m / "release", w / "single", scale=lam)
            t1 = time.perf_counter()
            deltaport.apply([w / "d", w / "zero"], m / "release", w / "exact", scale=[lam, 1.0])
            t2 = time.perf_counter()
            s, e = _sd(w / "single"), _sd(w / "exact")
            n = bad = right_s = right_e = checked = 0
            for k in s:
                x, y = s[k].reshape(-1), e[k].reshape(-1)
                n += x.numel()
                idx = torch.nonzero(x.view(torch.int16) != y.view(torch.int16)).flatten()
                bad += idx.numel()
                for j in idx[: max(0, a.sample - checked)].tolist():
                    ex = Fraction(float(T[k].reshape(-1)[j])) + Fraction(lam) * (
                        Fraction(float(F[k].reshape(-1)[j])) - Fraction(float(B[k].reshape(-1)[j])))
                    r = round_fraction(ex, s[k].dtype)
                    right_s += r == float(x[j])
                    right_e += r == float(y[j])
                    checked += 1
            print(f"| {lam:g} | {n} | {bad} | {bad / n:.2%} | {right_s}/{checked} | {right_e}/{checked} | "
                  f"{t1 - t0:.1f} | {t2 - t1:.1f} |")
            shutil.rmtree(w / "single")
            shutil.rmtree(w / "exact")
    finally:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
