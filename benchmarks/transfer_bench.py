"""Transfer benchmark: deltaport vs the I/O floor, a naive in-memory script and mergekit.

Builds three bf16 Llama checkpoints (source base, source finetuned, target base; default ~1.48 GB each),
then runs every method in a fresh subprocess on a warm page cache and prints a table: wall time, peak
RSS, ratio to the I/O floor, and how many output values differ from deltaport's output.

    python benchmarks/transfer_bench.py --workdir /tmp/dpbench --threads 1 --repeat 3
    python benchmarks/transfer_bench.py --sizes 1x,2x --skip-mergekit --skip-naive   # RSS growth check
    python benchmarks/transfer_bench.py --methods floor,deltaport,deltaport-f32,deltaport-w2 --repeat 5
    python benchmarks/transfer_bench.py --layers 5 --methods floor,deltaport,deltaport-f32,deltaport-torch,\
        deltaport-l07,deltaport-w2,apply1,apply2,apply2-ties --repeat 3          # issue #21's ratios

What is measured:
  * wall: seconds of the work inside the subprocess, after its imports (``time.perf_counter``); the
    whole process's wall time (imports included) is printed beside it.
  * process CPU: user + system seconds of the subprocess (``os.wait4``); on a shared machine it shows
    the work done when wall times are inflated by other jobs.
  * peak RSS: ``ru_maxrss`` of the subprocess from ``os.wait4`` - the largest resident set of the
    process (anonymous + file-backed/mmapped pages), children included.
  * warm cache: before every run the three inputs are read once (like ``cat > /dev/null``).
  * equality: every output tensor is compared with deltaport's bit for bit, one tensor at a time.

Methods:
  floor      read the 3 inputs (1 MB reused buffer) + write one output of the target's size, fsync per file
             (writeback started every 64 MB with sync_file_range, as deltaport's writer does)
  deltaport  ``deltaport.transfer(sb, sf, tb, out, threads=N)`` (exact: float64 arithmetic, one rounding)
  deltaport-f32  the same with ``compute_dtype="float32"`` (not exact; the speed reference: the table's
             "exact / float32" line is deltaport's wall over this one's, per round, median)
  deltaport-w2  the same with ``threads=2``: the fused kernel splits each chunk over 2 threads (the torch
             fallback, where it runs, uses 2 worker threads with one torch thread each)
  deltaport-torch  the exact arithmetic on the torch fallback (``DELTAPORT_KERNEL=torch``): deltaport before
             the fused kernel, same build
  deltaport-nomemo  the same with ``DELTAPORT_HASH_CACHE=off``: the card's content hashes computed from the
             bytes read (sha256 of every input byte), as on a first run; the other deltaport methods find them
             remembered (``io.hashmemo``: the bench's memo, ``WORKDIR/hash-memo``, filled before any timed run)
  deltaport-l07  ``scale=0.7`` (λ not a power of two: the kernel's exact decisions near bf16 midpoints)
  apply1     ``deltaport.apply(D1, target_base)``; D1 = diff(source_base, source_finetuned), built once
  apply2     ``deltaport.apply([D1, D2], target_base, scale=[0.7, 0.3])``; D2 = diff(source_base, target_base)
  apply2-ties  the same with ``ties=0.2`` (streamed thresholds and merge in numba: deltaport.kernel_ties)
  naive      three full state dicts in memory (safetensors ``load_file``), fp32 math per tensor, bf16
             result, ``save_file`` per shard - what the paper's official script does with ``from_pretrained``
  mergekit   ``task_arithmetic`` (base = source base, models = [source finetuned, target base] at weight 1,
             ``normalize: false``) once with ``dtype: float32, out_dtype: bfloat16`` (exact) and once with
             mergekit's default dtype. mergekit lives in its own venv (``--mergekit-python``) so it cannot
             change this project's packages; if it is missing the method is skipped and the table says so.

The models are built one shard at a time (never three whole models in memory): every tensor of the
source base comes from a generator seeded by its name; the finetuned and target models add small
seeded noise to it, rounded to bf16 once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
BUF = 1 << 20  # 1 MB: fastest of 128 KB, 1 MB, 16 MB for reading the inputs here
MODELS = ("source_base", "source_finetuned", "target_base")


# ---------------------------------------------------------------------------------------------------
# building the models
# ---------------------------------------------------------------------------------------------------
def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _seed(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def build_family(root: Path, hidden: int, layers: int, inter: int, vocab: int, shards: int) -> dict:
    """Write the three checkpoints under ``root`` (reused when already built with the same settings)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    spec = {"hidden": hidden, "layers": layers, "intermediate": inter, "vocab": vocab, "shards": shards, "v": 2}
    stamp = root / "built.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec:
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    shapes = llama_shapes(hidden, layers, inter, vocab)
    total = sum(_numel(s) for _, s in shapes) * 2
    groups: list[list] = [[]]
    acc = 0
    for name, shape in shapes:  # contiguous groups of ~total/shards bytes
        if acc >= (len(groups)) * total / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        acc += _numel(shape) * 2
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=4096)
    cfg.torch_dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    try:
        from deltaport.testing import make_tokenizer
        tok = make_tokenizer()
    except Exception:  # noqa: BLE001 - the tokenizer is a nicety for the benchmark
        tok = None
    for m in MODELS:
        (root / m).mkdir(parents=True)
        c = cfg.to_dict()
        if m == "target_base":
            c["rope_theta"] = 500000.0  # a target-only config value (mergekit copies the source base's)
        (root / m / "config.json").write_text(json.dumps(c, indent=2))
        if tok is not None:
            tok.save_pretrained(root / m)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    weight_map = {}
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        sds = {m: {} for m in MODELS}
        for name, shape in group:
            g = torch.Generator().manual_seed(_seed(name, "base"))
            if name.endswith("norm.weight"):
                base = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                base = 0.02 * torch.randn(shape, generator=g)
            sds["source_base"][name] = base.to(torch.bfloat16)
            for m, scale in (("source_finetuned", 0.002), ("target_base", 0.005)):
                g = torch.Generator().manual_seed(_seed(name, m))
                sds[m][name] = (base + scale * torch.randn(shape, generator=g)).to(torch.bfloat16)
            del base
            weight_map[name] = fname
        for m in MODELS:
            save_file(sds[m], str(root / m / fname), metadata={"format": "pt"})
        del sds
    for m in MODELS:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / m / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    info = {"spec": spec, "bytes_per_model": total, "params": total // 2, "build_seconds": time.perf_counter() - t0}
    stamp.write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess and prints one JSON line)
# ---------------------------------------------------------------------------------------------------
def _shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _sync_file_range():
    """libc sync_file_range or None; the floor starts writeback every 64 MB like deltaport's writer does,
    so that neither pays for the whole output in its final fsync."""
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


def worker_floor(fam: Path, out: Path, threads: int) -> dict:
    sfr = _sync_file_range()
    buf = bytearray(BUF)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    nread = 0
    for m in MODELS:
        for f in _shard_files(fam / m):
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(mv)
                    if not n:
                        break
                    nread += n
    out.mkdir(parents=True)
    nwritten = 0
    for f in _shard_files(fam / "target_base"):
        size = f.stat().st_size
        fd = os.open(out / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left, done, flushed = size, 0, 0
            while left:
                n = os.write(fd, mv[: min(left, BUF)])
                left -= n
                done += n
                if sfr is not None and done - flushed >= 64 << 20:
                    sfr(fd, flushed, done - flushed, 2)  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
                    flushed = done
            nwritten += done
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"seconds": time.perf_counter() - t0, "bytes_read": nread, "bytes_written": nwritten}


def worker_deltaport(fam: Path, out: Path, threads: int) -> dict:
    import deltaport  # (no torch here: the engine sets its threads, and the kernel's path never imports it)

    t0 = time.perf_counter()
    res = deltaport.transfer(fam / "source_base", fam / "source_finetuned", fam / "target_base", out, threads=threads)
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def worker_deltaport_f32(fam: Path, out: Path, threads: int) -> dict:
    import deltaport  # (no torch here: the engine sets its threads, and the kernel's path never imports it)

    t0 = time.perf_counter()
    res = deltaport.transfer(fam / "source_base", fam / "source_finetuned", fam / "target_base", out, threads=threads,
                             compute_dtype="float32")
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def worker_deltaport_w2(fam: Path, out: Path, threads: int) -> dict:
    import deltaport

    t0 = time.perf_counter()
    res = deltaport.transfer(fam / "source_base", fam / "source_finetuned", fam / "target_base", out, threads=2)
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def worker_deltaport_torch(fam: Path, out: Path, threads: int) -> dict:
    """The exact arithmetic on the torch fallback (``DELTAPORT_KERNEL=torch``), i.e. deltaport before the kernel."""
    os.environ["DELTAPORT_KERNEL"] = "torch"
    return worker_deltaport(fam, out, threads)


def worker_deltaport_nomemo(fam: Path, out: Path, threads: int) -> dict:
    """A transfer that hashes its inputs (``DELTAPORT_HASH_CACHE=off``): the first run on new inputs."""
    os.environ["DELTAPORT_HASH_CACHE"] = "off"
    return worker_deltaport(fam, out, threads)


def worker_hashes(fam: Path, out: Path, threads: int) -> dict:
    """The inputs' content hashes, remembered in the bench's memo before any measured run (io.hashmemo)."""
    from deltaport.io.checkpoint import content_hash

    dirs = [fam / m for m in MODELS] + sorted(fam.glob("delta_*"))
    return {d.name: content_hash(d) for d in dirs if d.is_dir()}


def worker_deltaport_l07(fam: Path, out: Path, threads: int) -> dict:
    import deltaport  # (no torch here: the engine sets its threads, and the kernel's path never imports it)

    t0 = time.perf_counter()
    res = deltaport.transfer(fam / "source_base", fam / "source_finetuned", fam / "target_base", out, threads=threads,
                             scale=0.7)
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def _deltas(fam: Path) -> list[Path]:
    """Two Δ directories of the family (built once, kept beside the models): D1 = SF − SB, D2 = TB − SB."""
    import deltaport

    out = []
    for name, ft in (("delta_1", "source_finetuned"), ("delta_2", "target_base")):
        d = fam / name
        if not (d / "deltaport.json").exists():
            deltaport.diff(fam / "source_base", fam / ft, d, overwrite=True)
        out.append(d)
    return out


def worker_apply1(fam: Path, out: Path, threads: int) -> dict:
    import deltaport  # (no torch here: the engine sets its threads, and the kernel's path never imports it)

    d1, _ = _deltas(fam)
    t0 = time.perf_counter()
    res = deltaport.apply(d1, fam / "target_base", out, threads=threads)
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def _apply2(fam: Path, out: Path, threads: int, **kw) -> dict:
    import deltaport  # (no torch here: the engine sets its threads, and the kernel's path never imports it)

    ds = _deltas(fam)
    t0 = time.perf_counter()
    res = deltaport.apply(ds, fam / "target_base", out, threads=threads, scale=[0.7, 0.3], **kw)
    return {"seconds": time.perf_counter() - t0, "engine": res.timings}


def worker_apply2(fam: Path, out: Path, threads: int) -> dict:
    return _apply2(fam, out, threads)


def worker_apply2_ties(fam: Path, out: Path, threads: int) -> dict:
    return _apply2(fam, out, threads, ties=0.2)


def worker_naive(fam: Path, out: Path, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    sds = {}
    for m in MODELS:  # three full state dicts, as the official script holds three models
        sd = {}
        for f in _shard_files(fam / m):
            sd.update(load_file(str(f)))
        sds[m] = sd
    out.mkdir(parents=True)
    shutil.copyfile(fam / "target_base" / "config.json", out / "config.json")
    for f in _shard_files(fam / "target_base"):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            names = list(h.keys())
        res = {}
        for k in names:
            t = sds["target_base"][k]
            res[k] = (t.float() + (sds["source_finetuned"][k].float() - sds["source_base"][k].float())).to(t.dtype)
        save_file(res, str(out / f.name), metadata={"format": "pt"})
        del res
    return {"seconds": time.perf_counter() - t0}


MERGEKIT_WRAPPER = r"""
import json, sys, time
t_import = time.perf_counter()
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg_path, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
src = open(cfg_path).read()
opts = MergeOptions(quiet=True, num_threads=threads, write_model_card=False)
opts.apply_global_options()
t0 = time.perf_counter()
run_merge(MergeConfiguration.model_validate(yaml.safe_load(src)), out, options=opts, config_source=src)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def mergekit_config(fam: Path, exact: bool) -> str:
    lines = [
        "merge_method: task_arithmetic",
        f"base_model: {fam / 'source_base'}",
        "models:",
        f"  - model: {fam / 'source_finetuned'}",
        "    parameters: {weight: 1.0}",
        f"  - model: {fam / 'target_base'}",
        "    parameters: {weight: 1.0}",
        "parameters: {normalize: false}",
    ]
    if exact:
        lines += ["dtype: float32", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def worker_compare(ref: Path, other: Path, threads: int) -> dict:
    d, t, probs = compare(ref, other)
    return {"differ": d, "total": t, "problems": probs}


WORKERS = {"floor": worker_floor, "deltaport": worker_deltaport, "deltaport-f32": worker_deltaport_f32,
           "deltaport-w2": worker_deltaport_w2, "deltaport-torch": worker_deltaport_torch,
           "deltaport-l07": worker_deltaport_l07, "deltaport-nomemo": worker_deltaport_nomemo, "hashes": worker_hashes,
           "apply1": worker_apply1, "apply2": worker_apply2,
           "apply2-ties": worker_apply2_ties, "naive": worker_naive, "compare": worker_compare,
           "deltas": lambda fam, out, threads: {"deltas": [str(d) for d in _deltas(fam)]}}
# (numerator, denominator, the target): the ratios the benchmark prints when both methods ran
RATIOS = [("deltaport", "deltaport-f32", "≤ 1.15"), ("deltaport", "floor", "≤ 1.3"),
          ("deltaport-nomemo", "floor", "≤ 1.3 (inputs hashed: first run)"), ("deltaport-nomemo", "deltaport", "(hashing)"),
          ("deltaport", "deltaport-torch", "(kernel vs fallback)"), ("deltaport-l07", "deltaport", "≤ 1.15"),
          ("deltaport", "deltaport-w2", "≥ 1.6"), ("apply2", "apply1", "≤ 1.3"), ("apply2-ties", "apply2", "≤ 2")]
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "amx")  # prefixes shown from /proc/cpuinfo


def cpu_info(env: dict) -> str:
    """CPU model, its vector flags, and the instruction set torch dispatches to (a subprocess: the parent
    never imports torch)."""
    model, flags = "unknown CPU", []
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name") and model == "unknown CPU":
                model = ln.split(":", 1)[1].strip()
            elif ln.startswith("flags") and not flags:
                flags = sorted(f for f in ln.split(":", 1)[1].split()
                               if f in VECTOR_FLAGS or f.startswith(("avx512", "amx")))
    except OSError:
        pass
    cap = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, "
                          "torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"],
                         env=env, capture_output=True, text=True).stdout.strip()
    return f"{model}; vector flags: {' '.join(flags) or 'none found'}; torch {cap or '?'} (version, dispatch, threads)"


# ---------------------------------------------------------------------------------------------------
# the parent: run, measure, compare
# ---------------------------------------------------------------------------------------------------
def warm(fam: Path) -> None:
    buf = bytearray(BUF)
    for m in MODELS + ("delta_1", "delta_2"):
        for f in (_shard_files(fam / m) if (fam / m).is_dir() else []):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; return its JSON line plus process wall time and peak RSS (ru_maxrss, incl. children)."""
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, env=env)
        stdout = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    rec.update(process_wall=wall, peak_rss_mb=ru.ru_maxrss / 1024, cpu=ru.ru_utime + ru.ru_stime)
    return rec


def compare(ref: Path, other: Path) -> tuple[int, int, list[str]]:
    """(differing values, total values, problems) between two checkpoint dirs, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        idx = {}
        for f in _shard_files(d):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    idx[k] = f
        return idx

    a, b = index(ref), index(other)
    problems = []
    if set(a) != set(b):
        problems.append(f"tensor names differ: only in deltaport {sorted(set(a) - set(b))[:3]}, "
                        f"only in other {sorted(set(b) - set(a))[:3]}")
    diff = total = 0
    for k in sorted(set(a) & set(b)):
        with safe_open(str(a[k]), "pt") as ha, safe_open(str(b[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            continue
        iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        bad = x.view(iv) != y.view(iv)
        if x.is_floating_point():
            bad &= ~(x.isnan() & y.isnan())
        diff += int(bad.sum())
        total += x.numel()
    return diff, total, problems


def load_avg() -> str:
    return open("/proc/loadavg").read().split()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (default: 2048)")
    ap.add_argument("--layers", type=int, default=12, help="layers at size 1x (default: 12; 1.48 GB per model)")
    ap.add_argument("--intermediate", type=int, default=5504, help="MLP size (default: 5504)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary rows (default: 32000)")
    ap.add_argument("--shards", type=int, default=4, help="safetensors shards per input model (default: 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every method (default: 1)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deltaport-bench",
                    help="models (reused across runs), outputs and logs (default: /tmp/deltaport-bench)")
    ap.add_argument("--sizes", default="1x", help="comma list of layer multipliers, e.g. 1x,2x (default: 1x)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the median is reported (default: 1)")
    ap.add_argument("--methods", default="floor,deltaport,deltaport-f32,naive,mergekit",
                    help="comma list of floor,deltaport,deltaport-f32,deltaport-w2,deltaport-torch,deltaport-l07,deltaport-nomemo,"
                         "apply1,apply2,apply2-ties,naive,mergekit (default: floor,deltaport,deltaport-f32,naive,mergekit)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--baselines-all-sizes", action="store_true",
                    help="run naive/mergekit on every size, not only the first (they need several GB of RAM)")
    ap.add_argument("--mergekit-python", default="/tmp/mkvenv/bin/python",
                    help="python of a separate venv with mergekit installed (default: /tmp/mkvenv/bin/python)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: delete after comparing)")
    ap.add_argument("--json", type=Path, help="also write all measurements to this file")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_fam", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker == "build":
        print(json.dumps(build_family(args._fam, args.hidden, args.layers, args.intermediate, args.vocab, args.shards)))
        return 0
    if args._worker:
        print(json.dumps(WORKERS[args._worker](args._fam, args._out, args.threads)))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.skip_mergekit and "mergekit" in methods:
        methods.remove("mergekit")
    if args.skip_naive and "naive" in methods:
        methods.remove("naive")
    notes = []
    if "mergekit" in methods:
        ok = subprocess.run([args.mergekit_python, "-c", "import mergekit"], capture_output=True).returncode == 0 \
            if Path(args.mergekit_python).exists() else False
        if not ok:
            methods.remove("mergekit")
            notes.append(f"mergekit skipped: not importable with {args.mergekit_python} (install: python -m venv "
                         "/tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit)")
    work = args.workdir
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DELTAPORT_HASH_CACHE=str(work / "hash-memo"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    print(f"# deltaport transfer benchmark  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# machine: {os.cpu_count()} CPUs, {_mem_gb():.0f} GiB RAM; threads={args.threads} (torch threads per "
          f"method; deltaport: workers, each with 1 torch thread; deltaport-w2: 2 workers); cache: warm "
          f"(inputs read once before every run); repeat={args.repeat} (median); peak RSS = ru_maxrss of the "
          "method's subprocess (incl. children; anonymous + file-backed pages)")
    print(f"# cpu: {cpu_info(env)}")
    print(f"# load average at start: {open('/proc/loadavg').read().strip()}")
    results = []
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for si, size in enumerate(sizes):
        mult = float(size.rstrip("x"))
        layers = max(1, round(args.layers * mult))
        fam = work / f"models-h{args.hidden}-l{layers}-i{args.intermediate}-v{args.vocab}-s{args.shards}"
        print(f"# building/reusing models in {fam} ...", flush=True)
        # the parent never imports torch: a forked child starts with the parent's resident pages, which
        # would inflate its ru_maxrss; building and comparing run in subprocesses too
        info = json.loads(subprocess.run(
            [sys.executable, str(HERE), "--_worker", "build", "--_fam", str(fam), "--hidden", str(args.hidden),
             "--layers", str(layers), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
             "--shards", str(args.shards)], env=env, check=True, stdout=subprocess.PIPE).stdout.decode().splitlines()[-1])
        gb = info["bytes_per_model"] / 1e9
        print(f"# size {size}: {layers} layers, {info['params'] / 1e6:.0f} M params, {gb:.2f} GB per model (bf16)",
              flush=True)
        if any(m.startswith("apply") for m in methods):  # the deltas, once, outside every measured run
            subprocess.run([sys.executable, str(HERE), "--_worker", "deltas", "--_fam", str(fam), "--_out", str(fam)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        # the inputs' content hashes, remembered before any measured run (a user's second run on these inputs;
        # deltaport-nomemo measures the first: every input byte hashed)
        subprocess.run([sys.executable, str(HERE), "--_worker", "hashes", "--_fam", str(fam), "--_out", str(fam)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        ref = work / f"out-deltaport-{size}"
        size_methods = [m for m in methods if m == "floor" or m.startswith("deltaport") or si == 0 or args.baselines_all_sizes]
        if "deltaport" not in size_methods and any(m in size_methods for m in ("naive", "mergekit")):
            size_methods.insert(0, "deltaport")  # the reference output
        variants = []
        for m in size_methods:
            if m == "mergekit":
                variants += [(m, "mergekit (fp32 math)", True), (m, "mergekit (default dtype)", False)]
            else:
                variants.append((m, m, None))
        outs = {label: ref if m == "deltaport" else work / f"out-{label.split()[0]}-{label.split()[-1].strip('()')}-{size}"
                for m, label, _ in variants}
        recs: dict[str, list] = {label: [] for _, label, _ in variants}
        # round robin (floor, deltaport, naive, ... then again): a burst of load from other jobs then hits
        # every method instead of all repeats of one
        for r in range(args.repeat):
            for m, label, exact in variants:
                out = outs[label]
                for d in (out, out.parent / (out.name + ".timings.json")):
                    if d.is_dir():
                        shutil.rmtree(d)
                    elif d.exists():
                        d.unlink()
                warm(fam)
                load = load_avg()
                log = logs / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}-{size}-{r}.log"
                if m == "mergekit":
                    cfg = work / f"mergekit-{'fp32' if exact else 'default'}.yaml"
                    cfg.write_text(mergekit_config(fam, exact))
                    cmd = [args.mergekit_python, "-c", MERGEKIT_WRAPPER, str(cfg), str(out), str(args.threads)]
                else:
                    cmd = [sys.executable, str(HERE), "--_worker", m, "--_fam", str(fam), "--_out", str(out),
                           "--threads", str(args.threads)]
                rec = run_measured(cmd, env, log)
                rec["load_before"] = load
                recs[label].append(rec)
                print(f"#   {label:26s} run {r + 1}: {rec['seconds']:.2f} s (process {rec['process_wall']:.2f} s), "
                      f"CPU {rec['cpu']:.2f} s, peak RSS {rec['peak_rss_mb']:.0f} MB, load {load}"
                      + (f", engine {_fmt_timings(rec['engine'])}" if "engine" in rec else ""), flush=True)
                if m != "deltaport" and r < args.repeat - 1 and out.exists():
                    shutil.rmtree(out)  # free the page cache it holds before the next method runs
        runs = []
        for m, label, _ in variants:
            rs = recs[label]
            row = {"size": size, "gb": gb, "method": label,
                   "seconds": statistics.median(x["seconds"] for x in rs),
                   "process_wall": statistics.median(x["process_wall"] for x in rs),
                   "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                   "cpu": statistics.median(x["cpu"] for x in rs),
                   "runs": rs}
            if "engine" in rs[0]:
                row["engine"] = {k: statistics.median(x["engine"][k] for x in rs) for k in rs[0]["engine"]}
            out = outs[label]
            if m not in ("floor", "deltaport", "deltaport-l07", "apply2", "apply2-ties"):  # others: other models
                c = json.loads(subprocess.run([sys.executable, str(HERE), "--_worker", "compare", "--_fam", str(ref),
                                               "--_out", str(out)], env=env, check=True,
                                              stdout=subprocess.PIPE).stdout.decode().splitlines()[-1])
                row["differ"] = (c["differ"], c["total"], c["problems"])
            if m != "deltaport" and not args.keep and out.exists():
                shutil.rmtree(out)
            runs.append(row)
        if ref.exists() and not args.keep:
            shutil.rmtree(ref)
        floor = next((x["seconds"] for x in runs if x["method"] == "floor"), None)
        for x in runs:
            x["ratio"] = x["seconds"] / floor if floor else None
        results += runs

    print()
    print(f"load average at end: {open('/proc/loadavg').read().strip()}")
    print()
    print("| size | method | wall (s) | × floor | process wall (s) | process CPU (s) | peak RSS (MB) | output vs deltaport |")
    print("|---|---|---|---|---|---|---|---|")
    for x in results:
        if "differ" in x:
            d, t, probs = x["differ"]
            eq = "identical" if d == 0 and not probs else f"{d:,} of {t:,} values differ ({100 * d / max(t, 1):.2f} %)"
            if probs:
                eq += "; " + "; ".join(probs[:2])
        else:
            eq = "(reference)" if x["method"] == "deltaport" else "–"
        ratio = f"{x['ratio']:.2f}" if x["ratio"] is not None else "–"
        print(f"| {x['size']} ({x['gb']:.2f} GB) | {x['method']} | {x['seconds']:.2f} | {ratio} | {x['process_wall']:.2f} | "
              f"{x['cpu']:.2f} | {x['peak_rss_mb']:.0f} | {eq} |")
    print("\nRatios of methods run in the same rounds (median of per-round ratios; wall, then process CPU):\n")
    print("| size | ratio | target | wall | process CPU | per-round walls |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        rows = {x["method"]: x for x in results if x["size"] == size}
        for num, den, target in RATIOS:
            if num in rows and den in rows:
                a, b = rows[num], rows[den]
                per_round = [ra["seconds"] / rb["seconds"] for ra, rb in zip(a["runs"], b["runs"])]
                cpu = [ra["cpu"] / rb["cpu"] for ra, rb in zip(a["runs"], b["runs"])]
                print(f"| {size} | {num} / {den} | {target} | {statistics.median(per_round):.2f}× | "
                      f"{statistics.median(cpu):.2f}× | {', '.join(f'{r:.2f}' for r in per_round)} |")
    for size in sizes:
        rows = {x["method"]: x for x in results if x["size"] == size}
        for other in ("deltaport-f32", "deltaport-w2"):
            if "deltaport" in rows and other in rows:
                a, b = rows["deltaport"], rows[other]
                per_round = [ra["seconds"] / rb["seconds"] for ra, rb in zip(a["runs"], b["runs"])]
                cpu = [ra["cpu"] / rb["cpu"] for ra, rb in zip(a["runs"], b["runs"])]
                print(f"\n{size}: deltaport (exact) / {other}: wall {statistics.median(per_round):.2f}× (median of "
                      f"per-round ratios {', '.join(f'{r:.2f}' for r in per_round)}), process CPU "
                      f"{statistics.median(cpu):.2f}×")
    for x in results:
        if "engine" in x:
            print(f"\n{x['size']} {x['method']}, median of its own timings: {_fmt_timings(x['engine'])} (plan_and_files = "
                  "headers, plan, config/tokenizer copy and the config check; stream = the engine)")
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "notes": notes}, indent=2, default=str))
    return 0


def _fmt_timings(t: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in t.items())


def _mem_gb() -> float:
    for ln in open("/proc/meminfo"):
        if ln.startswith("MemTotal:"):
            return int(ln.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
