"""Per-chunk cost (512 K elements, 1 thread) of three ways to compute t + (f - b) from bf16 inputs into bf16:
float32 math (not exact), the engine's exact float64 path (convert, subtract, add, round once), and the
float32 TwoSum recipe (both error terms plus the reductions that would decide whether a chunk needs a
fix-up; the fix-up itself is not timed). Data like the transfer benchmark's: base ~ N(0, 0.02),
finetuned = base + N(0, 0.002), target = base + N(0, 0.005), each rounded to bf16.

    OMP_NUM_THREADS=1 python benchmarks/rounding_kernels.py
"""
import time, torch
from deltaport.numerics import round_into
torch.set_num_threads(1)
n = 1 << 19
g = torch.Generator().manual_seed(0)
base = torch.randn(n, generator=g) * 0.02
rb = base.bfloat16(); rf = (base + 0.002 * torch.randn(n, generator=g)).bfloat16(); rt = (base + 0.005 * torch.randn(n, generator=g)).bfloat16()
F, B, T, D, X, Y, E, BB = (torch.empty(n) for _ in range(8))
F64, B64, T64 = (torch.empty(n, dtype=torch.float64) for _ in range(3))
sc = torch.empty(n, dtype=torch.int64); i32 = torch.empty(n, dtype=torch.int32)
out = torch.empty(n, dtype=torch.bfloat16)

def f32():
    F.copy_(rf); B.copy_(rb); F.sub_(B); T.copy_(rt); T.add_(F); out.copy_(T); out.sum()

def f64():
    F64.copy_(rf); B64.copy_(rb); F64.sub_(B64); T64.copy_(rt); T64.add_(F64); round_into(out, T64, sc); out.sum()

def twosum():
    F.copy_(rf); B.copy_(rb); T.copy_(rt)
    torch.sub(F, B, out=D)                                   # d
    torch.sub(D, F, out=BB); torch.sub(D, BB, out=X); torch.sub(F, X, out=X)
    torch.add(B, BB, out=Y); torch.sub(X, Y, out=E)          # eps = TwoSum error of f - b
    eps_any = E.abs_().max()
    torch.add(T, D, out=X)                                   # s
    torch.sub(X, T, out=BB); torch.sub(X, BB, out=Y); torch.sub(T, Y, out=Y)
    torch.sub(D, BB, out=E); E.add_(Y)                       # e = TwoSum error of t + d
    out.copy_(X); out.sum()
    torch.bitwise_left_shift(X.view(torch.int32), 16, out=i32)   # low 16 bits of s on top: INT_MIN at a bf16 midpoint
    mid_any = i32.min()
    return eps_any, mid_any

def tm(fn, k=40):
    best = 1e9
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(k): fn()
        best = min(best, (time.perf_counter() - t0) / k)
    return best * 1e3

for _ in range(2):
    a, b, c = tm(f32), tm(f64), tm(twosum)
    print(f"ms per 512K-element chunk (best of 7x40): float32 math {a:.3f}, float64 exact {b:.3f} ({b/a:.2f}x), "
          f"TwoSum float32 {c:.3f} ({c/a:.2f}x)  load {open('/proc/loadavg').read().split()[0]}")

