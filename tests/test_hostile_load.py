"""Determinism (byte-identical outputs across runs and --threads) and load (>= 2,000 tensors in >= 40
shards: no file-descriptor leak, memory that does not grow with the model)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

import hostile_cases as H


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return H.make_many_family(tmp_path_factory.mktemp("many"), n_tensors=2000, n_shards=40)


def _cli(argv):
    rc, out, err = H.in_process_runner(argv)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("which", ["llama", "many"])
def test_outputs_byte_identical_across_runs_and_threads(which, pristine, many, tmp_path):
    fam = {r: pristine[r] for r in H.ROLES} if which == "llama" else many
    hashes = []
    for i, threads in enumerate(("1", "2", "1")):
        out = tmp_path / f"t{i}"
        _cli(H.transfer_argv(fam, out, "--threads", threads, "--shard-size", "20KB"))
        hashes.append(H.tree_hash(out))
    assert len(hashes[0]) >= 4  # weights, index, config, provenance at least
    assert hashes[0] == hashes[1] == hashes[2]  # provenance included: it carries no timestamps
    # diff and apply too (apply reads the same delta: its provenance records the delta's path)
    deltas, applied = [], []
    for i, threads in enumerate(("1", "2")):
        delta = tmp_path / f"d{i}"
        _cli(["diff", "--base", str(fam["source_base"]), "--finetuned", str(fam["source_finetuned"]), "-o", str(delta),
              "-q", "--threads", threads])
        deltas.append(H.tree_hash(delta))
        out = tmp_path / f"a{i}"
        _cli(["apply", str(tmp_path / "d0"), "--to", str(fam["target_base"]), "-o", str(out), "-q", "--threads", threads])
        applied.append(H.tree_hash(out))
    assert deltas[0] == deltas[1]
    assert applied[0] == applied[1]


def test_many_tensors_many_shards_no_fd_leak(many, tmp_path):
    """2,000 tensors x 40 shards through diff, apply, transfer and inspect: every descriptor is closed."""
    before_inputs = {r: H.tree_hash(p) for r, p in many.items()}
    n0 = _fds()
    _cli(H.transfer_argv(many, tmp_path / "t", "--shard-size", "6KB"))
    _cli(["diff", "--base", str(many["source_base"]), "--finetuned", str(many["source_finetuned"]), "-o",
          str(tmp_path / "d"), "-q", "--shard-size", "16KB"])
    _cli(["apply", str(tmp_path / "d"), "--to", str(many["target_base"]), "-o", str(tmp_path / "a"), "-q"])
    _cli(["inspect", str(tmp_path / "d"), "--json"])
    assert _fds() == n0
    from deltaport.io.checkpoint import open_checkpoint

    ck = open_checkpoint(tmp_path / "t")
    assert len(ck.names) == 2000 and len(ck.files) >= 40
    assert {r: H.tree_hash(p) for r, p in many.items()} == before_inputs


def _peak(argv) -> tuple[int, int, float]:
    """(peak RSS in KiB, peak open descriptors, seconds) of one real CLI run.

    Peak RSS is the child's VmHWM, sampled every 10 ms until it exits (it only grows). Not ru_maxrss:
    that survives exec and so starts at the forking parent's RSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.Popen(H.deltaport_exe() + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"fds": 0, "hwm": 0}

    def sample():
        while p.poll() is None:
            try:
                peak["fds"] = max(peak["fds"], len(os.listdir(f"/proc/{p.pid}/fd")))
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak["hwm"] = max(peak["hwm"], int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    th.join()
    assert p.returncode == 0, err.decode()
    assert peak["hwm"] > 0
    return peak["hwm"], peak["fds"], time.perf_counter() - t0


@pytest.mark.slow
def test_memory_does_not_grow_with_model_size(tmp_path):
    """The same 2,000-tensor/40-shard layout with 1 KB and 64 KB tensors (0.25 MB vs 64 MB per model):
    the transfer's peak RSS grows by far less than one model, and descriptors stay bounded by the shards."""
    small = H.make_many_family(tmp_path / "small", n_tensors=2000, n_shards=40, elems=64)
    big = H.make_many_family(tmp_path / "big", n_tensors=2000, n_shards=40, elems=32768)
    rss_s, fds_s, _ = _peak(H.transfer_argv(small, tmp_path / "os", "--shard-size", "1GB"))
    rss_b, fds_b, _ = _peak(H.transfer_argv(big, tmp_path / "ob", "--shard-size", "1GB"))
    model_kib = 2000 * 32768 * 2 // 1024
    assert rss_b - rss_s < model_kib // 2, (rss_s, rss_b, model_kib)
    assert fds_b <= 3 * 40 + 32, fds_b  # one per input shard at most, plus the interpreter's own
