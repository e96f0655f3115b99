"""The engine's performance paths give the same bytes and the same errors as the plain ones: the
reader prefetch thread, the sum-based finiteness check, and the default thread count."""

from __future__ import annotations

import pytest
import torch

import deltaport
from deltaport import engine as E
from deltaport.errors import CheckpointError, NumericalError
from conftest import tree_hash


def _no_prefetch(monkeypatch):
    monkeypatch.setitem(E.Engine.__init__.__kwdefaults__, "prefetch", False)


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
    calls = {"n": 0}
    real = E.pread_into

    def flaky(fd, buf, offset, nbytes, what):
        calls["n"] += 1
        if calls["n"] == 5:
            raise CheckpointError(f"{what}: injected read failure")
        return real(fd, buf, offset, nbytes, what)

    monkeypatch.setattr(E, "pread_into", flaky)
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
    for x in cases:
        assert E._all_finite(x) == bool(torch.isfinite(x).all()), x


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
