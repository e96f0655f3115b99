"""Disk full while writing: the real CLI under RLIMIT_FSIZE (EFBIG), and on a tiny tmpfs (when this
process may mount one), where the free-space check refuses the run first (exit 2). Exit 1 with a DiskError naming the file, the partial temp folder removed,
a previous output untouched, inputs byte-identical."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest

import hostile_cases as H


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.build_pristine(tmp_path_factory.mktemp("pristine"))


def _run(argv, limit: int | None = None):
    def pre():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(H.deltaport_exe() + argv, capture_output=True, text=True, env=env, preexec_fn=pre, timeout=300)


@pytest.mark.parametrize("limit,with_previous", [(300, False), (16_000, True)],
                         ids=["fails-copying-config-new-output", "fails-mid-shard-overwrite"])
def test_file_size_limit(pristine, tmp_path, limit, with_previous):
    ws = H.Workspace(tmp_path / "ws", pristine)
    fam = ws.family()
    before = {r: H.tree_hash(d) for r, d in fam.items()}
    out = ws.out()
    extra = []
    if with_previous:
        shutil.copytree(pristine["target_base"], out)
        extra = ["--overwrite"]
    prev = H.tree_hash(out)
    r = _run(H.transfer_argv(fam, out, *extra), limit=limit)
    assert r.returncode == 1, r.stderr
    line = H.first_message_line(r.stderr)
    assert line.startswith("error (DiskError): writing ") and "file size limit" in line, r.stderr
    assert "Traceback" not in r.stderr
    assert H.leftovers(out) == []
    assert H.tree_hash(out) == prev  # {} when there was none: nothing half-written at the output path
    assert {r_: H.tree_hash(d) for r_, d in fam.items()} == before


@pytest.fixture
def small_fs(tmp_path):
    """A 96 KiB tmpfs (needs CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_on_small_tmpfs(tmp_path, small_fs):
    """The free-space check refuses the run before the first byte (exit 2, with the numbers); the
    ENOSPC path while writing is covered by the RLIMIT_FSIZE cases above."""
    fam = H.make_many_family(tmp_path / "models", n_tensors=2000, n_shards=40)  # 256 KB of output > 96 KiB
    before = {r: H.tree_hash(d) for r, d in fam.items()}
    out = small_fs / "out"
    r = _run(H.transfer_argv(fam, out, "--shard-size", "16KB"))
    assert r.returncode == 2, r.stderr
    line = H.first_message_line(r.stderr)
    assert line.startswith(f"error (OutputError): not enough free space on the filesystem of {small_fs}: this run "
                           "needs 0.") and "MB are free" in line, r.stderr
    assert not out.exists()
    assert list(small_fs.iterdir()) == []  # the partial temp folder is gone, the space is free again
    assert {r_: H.tree_hash(d) for r_, d in fam.items()} == before
