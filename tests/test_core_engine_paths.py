"""The engine's performance paths give the same bytes and the same errors as the plain ones: the
reader prefetch thread, the sum-based finiteness check, and the default thread count."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import deltaport
from deltaport import engine as E
from deltaport.errors import CheckpointError, NumericalError
from conftest import tree_hash


def _no_prefetch(monkeypatch):
    monkeypatch.setitem(E.Engine.__init__.__kwdefaults__, "prefetch", False)


def _fail_read(monkeypatch, *, at_call: int) -> None:
    """Make the engine's ``at_call``-th file read raise a CheckpointError (an injected I/O failure)."""
    calls = {"n": 0}
    from deltaport.io import reader

    real = reader.pread_into

    def flaky(fd, buf, offset, nbytes, what):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise CheckpointError(f"{what}: injected read failure")
        return real(fd, buf, offset, nbytes, what)

    monkeypatch.setattr(reader, "pread_into", flaky)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefetch_gives_the_same_bytes(family, tmp_path, monkeypatch, dtype):
    p = family("llama", dtype)
    args = (p["source_base"], p["source_finetuned"], p["target_base"])
    deltaport.transfer(*args, tmp_path / "pre", chunk_elems=7)  # many chunks, rows split across chunks
    r = deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "dpre", chunk_elems=7)
    _no_prefetch(monkeypatch)
    deltaport.transfer(*args, tmp_path / "plain", chunk_elems=7)
    r2 = deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "dplain", chunk_elems=7)
    strip = lambda h: {k: v for k, v in h.items() if k != "deltaport.json"}  # noqa: E731 - paths differ
    assert strip(tree_hash(tmp_path / "pre")) == strip(tree_hash(tmp_path / "plain"))
    assert strip(tree_hash(tmp_path / "dpre")) == strip(tree_hash(tmp_path / "dplain"))
    # the diff round-trip check reads the raw bytes the reader thread fetched
    assert r.provenance["inexact_delta_elements"] == r2.provenance["inexact_delta_elements"]


def test_reader_error_surfaces_at_its_chunk(family, tmp_path, monkeypatch):
    """An I/O error inside the reader thread is raised in the caller, and no output is left behind."""
    p = family("llama", torch.bfloat16)
    _fail_read(monkeypatch, at_call=5)
    with pytest.raises(CheckpointError, match="injected read failure"):
        deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out", chunk_elems=64)
    assert not (tmp_path / "out").exists()


def test_all_finite_matches_isfinite():
    big = torch.finfo(torch.float32).max
    cases = [
        torch.zeros(10),
        torch.randn(1000),
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.tensor([1.0, float("inf")]),
        torch.tensor([float("-inf"), float("inf")]),  # sums to NaN
        torch.full((4,), big),  # finite values whose sum overflows: the fallback must say finite
        torch.tensor([big, -big, float("nan")]),
        torch.randn(100).to(torch.bfloat16),
        torch.tensor([3.0e38, 3.0e38], dtype=torch.bfloat16),
        torch.tensor([], dtype=torch.float64),
    ]
    from deltaport.engine.stats import all_finite

    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all()), x


def test_overflow_to_inf_still_raises(family, tmp_path):
    p = family("llama", torch.bfloat16)
    with pytest.raises(NumericalError):
        deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out",
                           scale=1e45)  # finite in float64, Inf in bf16
    assert not (tmp_path / "out").exists()


def test_default_thread_count_is_restored(family, tmp_path, monkeypatch):
    p = family("llama", torch.bfloat16)
    before = torch.get_num_threads()
    seen = []
    real = E.Engine._run_op

    def spy(self, op, wt):
        seen.append(torch.get_num_threads())
        return real(self, op, wt)

    monkeypatch.setattr(E.Engine, "_run_op", spy)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out")
    assert set(seen) == {E.DEFAULT_THREADS}
    assert torch.get_num_threads() == before


# -- workers (threads=N: N worker threads over chunks, each running torch on one thread) ----------------
def _strip(h):
    return {k: v for k, v in h.items() if k != "deltaport.json"}  # paths differ


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "plain"])
def test_worker_counts_give_identical_bytes(family, tmp_path, monkeypatch, prefetch):
    """1, 2 and 3 workers, chunks of 7 and 64 elements (rows split across chunks, many chunks in flight):
    transfer (bf16 and fp32, λ = 0.7 too), diff (with its round-trip count) and apply write the same bytes."""
    if not prefetch:
        _no_prefetch(monkeypatch)
    hashes: dict = {}
    for workers in (1, 2, 3):
        for chunk in (7, 64):
            d = tmp_path / f"w{workers}-c{chunk}"
            got = []
            for dtype in (torch.bfloat16, torch.float32):
                p = family("llama", dtype)
                args = (p["source_base"], p["source_finetuned"], p["target_base"])
                name = str(dtype)[6:]
                deltaport.transfer(*args, d / name, threads=workers, chunk_elems=chunk)
                deltaport.transfer(*args, d / f"{name}-07", threads=workers, chunk_elems=chunk, scale=0.7)
                r = deltaport.diff(p["source_base"], p["source_finetuned"], d / f"{name}-diff", threads=workers,
                                   chunk_elems=chunk)
                deltaport.apply(d / f"{name}-diff", p["target_base"], d / f"{name}-apply", threads=workers,
                                chunk_elems=chunk)
                got.append(r.provenance["inexact_delta_elements"])
            hashes[workers, chunk] = ({k: v for k, v in tree_hash(d).items() if not k.endswith(("deltaport.json", "timings.json"))}, got)
    first = hashes[1, 7]
    for key, value in hashes.items():
        assert value == first, key


def test_lora_worker_counts_give_identical_bytes(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = family("llama", torch.bfloat16)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(p["source_base"]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    for workers in (1, 2, 3):
        deltaport.transfer(p["source_base"], tmp_path / "adapter", p["target_base"], tmp_path / f"o{workers}",
                           threads=workers)  # one chunk per tensor: workers run different tensors side by side
    assert _strip(tree_hash(tmp_path / "o1")) == _strip(tree_hash(tmp_path / "o2")) == _strip(tree_hash(tmp_path / "o3"))


def test_workers_run_chunks_side_by_side_on_one_torch_thread_each(family, tmp_path, monkeypatch):
    """threads=3 computes chunks on 3 worker threads (not on OpenMP threads inside one chunk), with at
    most 3 chunks in flight, 3 + 3 output buffers and 2 + 2 + 2 prefetched input sets. This is the torch
    fallback's parallelism (the fused kernel splits one chunk over threads instead: test_kernel.py)."""
    monkeypatch.setenv("DELTAPORT_KERNEL", "torch")
    p = family("llama", torch.bfloat16)
    seen_threads, seen_torch, in_flight, peak = set(), set(), [0], [0]
    lock = threading.Lock()
    real = E.Engine._chunk

    def spy(self, *a):
        with lock:
            seen_threads.add(threading.get_ident())
            seen_torch.add(torch.get_num_threads())
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.001)  # let the others start
        try:
            return real(self, *a)
        finally:
            with lock:
                in_flight[0] -= 1

    engines = []
    real_run = E.Engine.run

    def run_spy(self, *a, **k):
        engines.append(self)
        return real_run(self, *a, **k)

    monkeypatch.setattr(E.Engine, "_chunk", spy)
    monkeypatch.setattr(E.Engine, "run", run_spy)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out", threads=3,
                       chunk_elems=64)
    assert len(seen_threads) == 3 and threading.get_ident() not in seen_threads
    assert seen_torch == {1} and 2 <= peak[0] <= 3
    eng = engines[0]
    assert eng._nout <= 3 + 3


def test_worker_errors_surface_and_leave_no_output(family, tmp_path, monkeypatch):
    p = family("llama", torch.bfloat16)
    with pytest.raises(NumericalError):
        deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out",
                           scale=1e45, threads=2, chunk_elems=64)
    assert not (tmp_path / "out").exists()
    _fail_read(monkeypatch, at_call=9)
    with pytest.raises(CheckpointError, match="injected read failure"):
        deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out2",
                           threads=2, chunk_elems=64)
    assert not (tmp_path / "out2").exists()
