"""What produced a lab run: python, platform, CPU and the versions of every library a number depends on.

:func:`environment` goes into ``results.json`` and ``report.md``; :func:`cache_salt` (the versions and
deltaport's release version, never its commit) goes into every cache key of a lab run, so a step
computed under other library versions is never reused.

The reproducibility promise (docs/lab.md): the same pinned versions (``constraints.txt``) on the same
CPU kind at the same torch thread count give the same bytes. Another CPU kind or thread count changes
the bytes; how far that moves the numbers is measured, not promised: the noise twin
(:mod:`deltaport.lab.noise`) reports it beside every claim.
"""

from __future__ import annotations

import functools
import platform
import sys

#: distributions whose version can change a lab number (import name differs for lm-eval)
PACKAGES = ("torch", "transformers", "tokenizers", "trl", "peft", "lm-eval", "datasets", "accelerate", "numpy",
            "safetensors")
#: CPU flags that select different training kernels
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict:
    """CPU model and the kernel-relevant flags (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = v.strip()
                elif k.strip() == "flags" and not flags:
                    flags = set(v.split())
    except OSError:
        pass
    import os

    return {"model": model, "kernel_flags": [f for f in KERNEL_FLAGS if f in flags], "logical_cpus": os.cpu_count()}


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    import deltaport

    out = {"deltaport": deltaport.__version__, "python": platform.python_version()}
    out.update({p: _version(p) for p in PACKAGES})
    return out


def environment() -> dict:
    """Everything a reader needs to say why two runs' numbers differ."""
    import torch

    return {"versions": versions(), "platform": platform.platform(), "python_implementation":
            platform.python_implementation(), "python_executable_version": sys.version.split()[0],
            "cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
            "torch_build": {"cuda": torch.version.cuda, "mkldnn": torch.backends.mkldnn.is_available()}}


def cache_salt() -> dict:
    """The part of every lab cache key that is not the step's own inputs: library versions,
    deltaport's release version (a commit that does not change a release does not invalidate a cache) and
    the torch thread count (another count sums in another order: other bytes, so never a cache hit)."""
    import torch

    return {**versions(), "torch_threads": torch.get_num_threads()}


def kind_of(env: dict) -> str:
    """Short CPU kind for reports: model + whether AVX-512 kernels are available."""
    cpu = env.get("cpu", {})
    avx512 = "avx512f" in cpu.get("kernel_flags", [])
    return f"{cpu.get('model', '?')} ({'AVX-512' if avx512 else 'no AVX-512'})"
