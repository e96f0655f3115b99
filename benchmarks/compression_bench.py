"""What compressing Δ costs the transfer: Δ bytes vs the logit KL of m_t + compressed Δ from m_t + Δ.

For each method at several settings, plus the exact Δ and "no Δ" (the target alone), it compresses the
stored Δ, applies it to the target with `apply`, and measures on a named text the mean per-token
KL(p(m_t + Δ) || p(m_t + compressed Δ)) of the next-token distributions, with compress and apply times.

The models: by default a small Llama built here (hidden 256, 4 layers, vocabulary 512, bf16, seeded), whose
fine-tune is synthetic: Δ = a rank-16 part (the structured change a fine-tune makes) + dense noise of the
same norm, per matrix; the target is the base + noise. ``--base DIR`` uses a real checkpoint as the
source base and target (e.g. SmolLM2-135M converted as the real-model tier does) with the same synthetic Δ.
The text: the first 1,024 bytes of ``--text`` (default: this repository's README.md), as token ids
(byte value + 3, so ids stay below a 512-token vocabulary; a real tokenizer is used with ``--base``).

    OMP_NUM_THREADS=1 python benchmarks/compression_bench.py --out bench-compression.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import deltaport
from deltaport import testing as T

from deltaport.plan.names import EMBED_PATTERNS  # noqa: E402

# lowrank compresses vocabulary tensors by default: the rows "vocabulary exact" exclude them, as before
SETTINGS = [("lowrank", {"rank": r, "exclude": list(EMBED_PATTERNS)}) for r in (4, 16, 32, 64)] + \
           [("sparse", {"density": p}) for p in (0.05, 0.1, 0.3, 0.6)] + [("sign", {})] + \
           [("lowrank", {"rank": 16, "include": ["."]}), ("sign", {"include": ["."]})]  # embeddings compressed too


def _tiny_llama(seed: int):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _synthetic_finetune(model, seed: int, rel: float = 0.05, rank: int = 16):
    """A copy of ``model`` plus, per matrix, a rank-``rank`` change and dense noise of equal norm, together
    ``rel`` of the matrix's norm; 1-D tensors get small noise."""
    import copy

    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ft.named_parameters():
            w = p.float()
            if p.dim() == 2:
                m, n = p.shape
                low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
                noise = torch.randn(m, n, generator=g)
                d = low / low.norm() + noise / noise.norm()
                d *= rel * w.norm() / d.norm()
            else:
                d = torch.randn(p.shape, generator=g) * 1e-3
            p.copy_((w + d).to(p.dtype))
    return ft


def _logprobs(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(ids[None]).logits[0].double(), -1)


def _bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _load(d: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


_RSS_CHILD = """
import json, resource, sys, time
import torch
import deltaport
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
comp = deltaport.compress(args["delta"], args["out"], method=args["method"], overwrite=True, threads=1, **args["kw"]) \
    if args["method"] else None
secs = time.perf_counter() - t0
try:  # VmHWM: this process image's peak; ru_maxrss on Linux also keeps the parent's peak from before exec
    peak = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "seconds": secs,
                  "threads": torch.get_num_threads(), "comp": comp}))
"""


def _compress_in_child(delta: Path, out: Path | None, method: str | None, kw: dict) -> dict:
    """``deltaport.compress`` in a fresh python process (one torch thread): its peak total RSS (the whole
    process: interpreter, torch and deltaport imports, and compress), compress's wall time and record.
    ``method=None`` only imports (the baseline RSS of the process before compress runs)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    arg = json.dumps({"delta": str(delta), "out": str(out), "method": method, "kw": kw})
    res = subprocess.run([sys.executable, "-c", _RSS_CHILD, arg], check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _compose_check(work: Path, delta: Path) -> dict:
    """apply D1 D2 --to T at λ = (0.7, 0.3) against the float64 evaluation t + 0.7·Δ1 + 0.3·Δ2 rounded once
    (numerics.round_into): how many elements were decided exactly, how many differ from the float64 rounding,
    and whether the differing ones (up to 200 per tensor) are the exact rational sum's nearest value."""
    from deltaport.numerics import round_into

    d2 = work / "delta2"
    if not d2.exists():
        deltaport.diff(work / "base", work / "target", d2)  # a second Δ with the same base
    out = work / "composed"
    t0 = time.perf_counter()
    res = deltaport.apply([delta, d2], work / "target", out, scale=[0.7, 0.3], overwrite=True)
    secs = time.perf_counter() - t0
    got, t, a, b = _load(out), _load(work / "target"), _load(delta), _load(d2)
    from fractions import Fraction

    from deltaport.numerics import round_fraction

    differ = elements = checked = wrong = 0
    for k, v in got.items():
        s = t[k].double() + (a[k].double() * 0.7 if k in a else 0) + (b[k].double() * 0.3 if k in b else 0)
        ref = torch.empty_like(v)
        round_into(ref, s)
        bad = torch.nonzero(ref.view(-1) != v.view(-1)).flatten()
        differ += len(bad)
        elements += v.numel()
        for j in bad[:200].tolist():  # the elements that differ from float64: check them against exact rationals
            x = Fraction(float(t[k].view(-1)[j]))
            x += Fraction(0.7) * Fraction(float(a[k].view(-1)[j])) if k in a else 0
            x += Fraction(0.3) * Fraction(float(b[k].view(-1)[j])) if k in b else 0
            checked += 1
            wrong += round_fraction(x, v.dtype) != float(v.view(-1)[j])
    shutil.rmtree(out)
    print(f"compose: {elements:,} elements, {res.stats.exact_fixups:,} decided exactly, {differ:,} differ from the float64 "
          f"evaluation rounded once; of those, {checked} checked against exact rationals: {wrong} wrong; apply of 2 deltas "
          f"{secs:.2f} s")
    return {"elements": elements, "exact_fixups": res.stats.exact_fixups, "differ_from_float64": differ,
            "checked_rational": checked, "wrong": wrong, "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="a real model directory as source base and target (default: tiny Llama)")
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--compose", action="store_true", help="also compose two deltas and compare with float64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deltaport-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = args.text.read_bytes()[:1024]
    if args.base:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(args.base)
        ids = torch.tensor(tok(raw.decode("utf-8", "replace"))["input_ids"][:512])
        save = lambda m, p: (m.save_pretrained(p), tok.save_pretrained(p))  # noqa: E731
        model_desc = f"{args.base} (bf16) with a synthetic Δ"
    else:
        base = _tiny_llama(0)
        ids = torch.tensor([b + 3 for b in raw])
        save = lambda m, p: T.save(m, p, max_shard_size="5GB")  # noqa: E731
        model_desc = "tiny Llama built in this script (hidden 256, 4 layers, vocab 512, bf16), synthetic Δ"
    ft = _synthetic_finetune(base, seed=1)
    tgt = _synthetic_finetune(base, seed=2, rel=0.02)
    for name, m in (("base", base), ("ft", ft), ("target", tgt)):
        if not (work / name).exists():
            save(m, work / name)
    delta = work / "delta"
    if not delta.exists():
        deltaport.diff(work / "base", work / "ft", delta)
    exact_out = work / "apply-exact"
    t0 = time.perf_counter()
    deltaport.apply(delta, work / "target", exact_out, overwrite=True)
    exact_apply_s = time.perf_counter() - t0
    ref = _logprobs(exact_out, ids)

    def kl(model_dir: Path) -> float:
        lp = _logprobs(model_dir, ids)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    exact_bytes = _bytes(delta)
    from deltaport.io.checkpoint import open_checkpoint

    largest = max(spec.nbytes for spec in open_checkpoint(delta).tensors.values())
    rss_base = _compress_in_child(delta, None, None, {})["peak_rss"]
    rows = [{"method": "exact Δ", "setting": "", "bytes": exact_bytes, "ratio": 1.0, "kl": 0.0,
             "compress_s": None, "apply_s": exact_apply_s, "rel_err_mean": 0.0},
            {"method": "no Δ", "setting": "", "bytes": 0, "ratio": 0.0, "kl": kl(work / "target"),
             "compress_s": None, "apply_s": None, "rel_err_mean": 1.0}]
    for method, kw in SETTINGS:
        c = work / f"c-{method}-{'-'.join(str(v) for k, v in kw.items() if k not in ('include', 'exclude'))}{'-all' if 'include' in kw else ''}"
        child = _compress_in_child(delta, c, method, kw)  # the Δ files are in the OS page cache (just read/written)
        comp, cs = child["comp"], child["seconds"]
        out = work / (c.name + "-applied")
        t0 = time.perf_counter()
        deltaport.apply(c, work / "target", out, overwrite=True)
        aps = time.perf_counter() - t0
        errs = [r["rel_frobenius_error"] for r in comp["tensors"].values() if r["method"] != "exact"]
        setting = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("include", "exclude"))
        setting += (", " if setting else "") + "embeddings too" if "include" in kw else ""
        rows.append({"method": method, "setting": setting, "bytes": _bytes(c),
                     "ratio": _bytes(c) / exact_bytes, "compressed_ratio": comp["totals"]["compressed_ratio"],
                     "kl": kl(out), "compress_s": cs, "apply_s": aps, "rel_err_mean": sum(errs) / len(errs),
                     "compress_peak_rss": child["peak_rss"], "compress_threads": child["threads"]})
        shutil.rmtree(out)
    print(f"model: {model_desc}; text: first {len(raw)} bytes of {args.text.name}, {len(ids)} tokens")
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    print("| method | setting | Δ bytes | of exact | of exact (compressed tensors) | rel. Frobenius err (mean) | KL from m_t+Δ (nats/token) | compress s | apply s | compress peak total RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        print(f"| {r['method']} | {r['setting']} | {r['bytes']:,} | {r['ratio']:.3f} | {f(r.get('compressed_ratio'), '.3f')} | "
              f"{r['rel_err_mean']:.3f} | {r['kl']:.2e} | {f(r['compress_s'], '.2f')} | {f(r['apply_s'], '.2f')} | "
              f"{f(mib(r.get('compress_peak_rss')), ',.0f')} |")
    print(f"compress peak total RSS: the whole fresh python process (interpreter, torch and deltaport imports, compress), "
          f"1 torch thread, Δ files in the OS page cache; the same process only importing: {mib(rss_base):,.0f} MiB; "
          f"largest Δ tensor: {mib(largest):,.1f} MiB")
    compose = _compose_check(work, delta) if args.compose else None
    if args.out:
        args.out.write_text(json.dumps({"model": model_desc, "text": args.text.name, "tokens": len(ids), "rows": rows,
                                        "compose": compose, "import_only_peak_rss": rss_base,
                                        "largest_delta_tensor_bytes": largest,
                                        "rss": "peak total RSS of a fresh process running compress, 1 torch thread, "
                                               "Δ files in the OS page cache"}, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
