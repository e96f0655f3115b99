"""Free space is checked before the first byte is downloaded or written (the probe, shutil.disk_usage,
is replaced in-process)."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import tree_hash
from deltaport.cli.main import main
from deltaport.errors import OutputError
from deltaport.io import prepare
from deltaport.io.prepare import Fetch, check_free_space

Usage = namedtuple("Usage", "total used free")


def fake_free(monkeypatch, free_by_dev: dict[int, int] | int):
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        dev = os.stat(path).st_dev
        free = free_by_dev if isinstance(free_by_dev, int) else free_by_dev[dev]
        return Usage(10**15, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return seen


def test_downloads_and_output_on_one_filesystem_are_summed(tmp_path, monkeypatch):
    fetch = Fetch(download_bytes=3_000_000, write_bytes=5_000_000)
    cache = tmp_path / "hf" / "hub"  # need not exist yet
    fake_free(monkeypatch, 7_999_999)
    with pytest.raises(OutputError, match=r"needs 8\.0 MB \(output 5\.0 MB \+ downloads 3\.0 MB\), 8\.0 MB are free"):
        check_free_space(fetch, tmp_path / "out", cache)
    fake_free(monkeypatch, 8_000_000)
    got = check_free_space(fetch, tmp_path / "out", cache)
    assert list(got.values()) == [{"need": 8_000_000, "free": 8_000_000}]


def test_downloads_and_output_on_two_filesystems_are_checked_apart(tmp_path, monkeypatch):
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    fetch = Fetch(download_bytes=3_000_000, write_bytes=5_000_000)
    out_dev, cache_dev = os.stat(tmp_path).st_dev, os.stat(other).st_dev
    fake_free(monkeypatch, {out_dev: 5_000_000, cache_dev: 3_000_000})
    got = check_free_space(fetch, tmp_path / "out", other / "no-such-cache")
    assert sorted(v["need"] for v in got.values()) == [3_000_000, 5_000_000]
    fake_free(monkeypatch, {out_dev: 5_000_000, cache_dev: 2_999_999})
    with pytest.raises(OutputError, match=r"/dev/shm: this run needs 3\.0 MB \(downloads 3\.0 MB\)"):
        check_free_space(fetch, tmp_path / "out", other / "no-such-cache")


def _argv(fam, out, *extra):
    return ["transfer", "--source-base", str(fam["source_base"]), "--source-finetuned", str(fam["source_finetuned"]),
            "--target-base", str(fam["target_base"]), "-o", str(out), "--quiet", *extra]


def test_too_little_space_is_exit_2_with_numbers_and_nothing_written(family, tmp_path, monkeypatch, capsys):
    fam = family("llama", torch.bfloat16)
    out = tmp_path / "out"
    fake_free(monkeypatch, 1000)
    assert main(_argv(fam, out)) == 2
    err = capsys.readouterr().err
    assert "not enough free space on the filesystem of" in err and "1000 bytes" not in err
    assert ", 0.0 MB are free" in err and "(output " in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_overwrite_counts_the_new_output_whole(family, tmp_path, monkeypatch, capsys):
    fam = family("llama", torch.bfloat16)
    out = tmp_path / "out"
    assert main(_argv(fam, out)) == 0
    before = tree_hash(out)
    need = []
    real = prepare.check_free_space

    def spy(fetch, output, cache=None):
        need.append(fetch.write_bytes)
        return real(fetch, output, cache)

    monkeypatch.setattr(prepare, "check_free_space", spy)
    import deltaport.api as ops

    monkeypatch.setattr(ops, "check_free_space", spy)
    fake_free(monkeypatch, 0)  # measure the need first
    assert main(_argv(fam, out, "--overwrite")) == 2
    # the old output (same size) would be freed only after the swap: free space must hold the new one whole
    fake_free(monkeypatch, need[0] - 1)
    assert main(_argv(fam, out, "--overwrite")) == 2
    assert tree_hash(out) == before
    fake_free(monkeypatch, need[0])
    assert main(_argv(fam, out, "--overwrite")) == 0
    assert tree_hash(out) == before
