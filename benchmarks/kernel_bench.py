"""The arithmetic of one chunk, per path: the fused kernel, the torch fallback, and torch float32 math.

Times one 512 K-element chunk (the engine's default) of bf16 inputs (N(0, 0.02) weights, seeded), on one
thread, as **thread CPU time** (``time.thread_time``; the minimum of ``--repeat`` calls after a warm-up
call), so that other jobs on a shared machine inflate it far less than wall time. No file I/O: this is
the compute share of a transfer; ``transfer_bench.py`` measures whole runs.

    python benchmarks/kernel_bench.py --repeat 40

Rows: a transfer t + λ·(f − b) at λ = 1 and λ = 0.7, and a composed apply t + 0.7·Δ1 + 0.3·Δ2 (Δ float32:
N(0, 10⁻³), and diffs of bf16 weights as ``diff`` stores them, ~3 % of whose sums need an exact decision),
each by the kernel (``deltaport.kernel.fused_into``), the fallback (``torch_into``: deltaport.numerics,
float64 torch ops), and float32 math (convert, subtract, [scale], add, convert to bf16, finiteness sum:
what ``--compute-dtype float32`` does; not exact). The kernel's and the fallback's bytes are compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from deltaport import kernel as K


def best(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return min(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--elems", type=int, default=1 << 19)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.elems
    g = torch.Generator().manual_seed(0)
    t, f, b = ((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16) for _ in range(3))
    d1, d2 = (torch.randn(n, generator=g) * 1e-3 for _ in range(2))
    # diffs of bf16 weights stored as float32 (what diff writes): at λ ≠ 1 ~3 % of sums lie near a bf16 midpoint
    e1, e2 = (((b.double() + torch.randn(n, generator=g, dtype=torch.float64) * 5e-4).to(torch.bfloat16).double()
               - b.double()).float() for _ in range(2))
    bits = lambda x: x.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    tv, fv, bv = bits(t), bits(f), bits(b)
    out_k, out_t = np.empty(n, np.uint16), np.empty(n, np.uint16)
    out = torch.empty(n, dtype=torch.bfloat16)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {open('/proc/loadavg').read().split()[:3]}, torch {torch.__version__}, "
          f"numba {K.numba.__version__}, 1 thread, {n} elements per chunk, thread CPU ms (min of {args.repeat})")
    print("| chunk | kernel (ms) | fallback (ms) | float32 math (ms) | kernel / float32 | fallback / kernel | bytes |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for label, target, terms, scales in (
            ("transfer λ = 1", tv, [(fv, bv)], [1.0]),
            ("transfer λ = 0.7", tv, [(fv, bv)], [0.7]),
            ("composed 0.7·Δ1 + 0.3·Δ2", tv, [(d1.numpy(), None), (d2.numpy(), None)], [0.7, 0.3]),
            ("composed, diffs of bf16", tv, [(e1.numpy(), None), (e2.numpy(), None)], [0.7, 0.3])):
        k = best(lambda: K.fused_into(out_k, "bfloat16", target, terms, scales), args.repeat)
        fb = best(lambda: K.torch_into(out_t, "bfloat16", target, terms, scales), max(5, args.repeat // 4))
        if len(terms) == 1:
            def f32():
                d = f.float()
                d.sub_(b.float())
                if scales[0] != 1.0:
                    d.mul_(scales[0])
                d.add_(t.float())
                out.copy_(d)
                torch.isfinite(out.sum())
        else:
            x1, x2 = (d1, d2) if label.startswith("composed 0.7") else (e1, e2)

            def f32():
                d = x1 * 0.7
                d.add_(x2 * 0.3)
                d.add_(t.float())
                out.copy_(d)
                torch.isfinite(out.sum())
        f3 = best(f32, args.repeat)
        same = "identical" if np.array_equal(out_k, out_t) else f"{int((out_k != out_t).sum())} differ"
        rows[label] = k
        print(f"| {label} | {k:.3f} | {fb:.3f} | {f3:.3f} | {k / f3:.2f}× | {fb / k:.1f}× | {same} |")
    print(f"\nkernel λ = 0.7 / λ = 1: {rows['transfer λ = 0.7'] / rows['transfer λ = 1']:.2f}×; composed (2 Δ) / "
          f"transfer λ = 1: {rows['composed 0.7·Δ1 + 0.3·Δ2'] / rows['transfer λ = 1']:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
