"""Between the plan and the first byte written: what to download, whether it fits, then the download.

:func:`plan_fetch` lists the weight files a plan reads from hub checkpoints (only those) and the
bytes a run downloads (files not already in the cache) and writes (the output's tensors and small
files). :func:`check_free_space` refuses a run whose bytes do not fit, before anything is
downloaded or written. :func:`run_fetch` downloads the files at the pinned commits and checks that
each header is the one the plan was made from.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import OutputError

#: an output's safetensors headers, index, provenance and card: this much plus PER_TENSOR per tensor
SMALL_FILES_ALLOWANCE = 64 << 10
PER_TENSOR = 256


@dataclass
class Fetch:
    """What a run downloads and writes."""

    downloads: list[tuple[Any, list[Path]]] = field(default_factory=list)  # (hub Checkpoint, files not cached)
    needed: list[tuple[Any, list[Path]]] = field(default_factory=list)  # (hub Checkpoint, every weight file the plan reads)
    download_bytes: int = 0
    write_bytes: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "download_bytes": self.download_bytes,
            "write_bytes": self.write_bytes,
            "download_files": {f"{ck.hub.repo_id}@{ck.hub.sha}": [f.name for f in files] for ck, files in self.downloads},
        }

    def describe(self) -> str:
        lines = []
        for ck, files in self.needed:
            todo = {f.name for c, fs in self.downloads if c is ck for f in fs}
            size = sum(max(ck.hub.sizes.get(f.name, 0), 0) for f in files if f.name in todo)
            lines.append(f"{ck.hub.repo_id} at commit {ck.hub.sha}: {len(files)} weight file(s) read, "
                         f"{len(todo)} to download ({size / 1e6:.1f} MB)")
        if self.needed:
            lines.append(f"a real run downloads {self.download_bytes / 1e6:.1f} MB and writes about "
                         f"{self.write_bytes / 1e6:.1f} MB (tensors, config, tokenizer and card)")
        else:
            lines.append(f"a real run writes about {self.write_bytes / 1e6:.1f} MB (tensors, config, tokenizer and card)")
        return "\n".join(lines)


def _files_read(plan) -> dict[int, tuple[Any, set[Path]]]:
    out: dict[int, tuple[Any, set[Path]]] = {}
    for op in plan.ops:
        terms = [(t.ck, t.spec) for t in op.inputs()]
        if op.lora is not None:
            terms += [(op.lora.ck, op.lora.a), (op.lora.ck, op.lora.b)]
        for ck, spec in terms:
            out.setdefault(id(ck), (ck, set()))[1].add(spec.file)
    return out


def plan_fetch(plan, copied: list[Path] = ()) -> Fetch:
    """The weight files ``plan`` reads from hub checkpoints, and the bytes a run downloads and writes
    (the output tensors, their headers, and the ``copied`` files: config, tokenizer, chat template)."""
    small = sum(f.stat().st_size for f in copied if f.is_file())
    fetch = Fetch(write_bytes=plan.total_out_bytes + small + SMALL_FILES_ALLOWANCE + PER_TENSOR * len(plan.ops))
    for ck, files in _files_read(plan).values():
        if getattr(ck, "hub", None) is None:
            continue
        files = sorted(files)
        fetch.needed.append((ck, files))
        todo = [f for f in files if not f.is_file()]
        if todo:
            fetch.downloads.append((ck, todo))
            fetch.download_bytes += sum(max(ck.hub.sizes.get(f.name, 0), 0) for f in todo)
    return fetch


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(fetch: Fetch, output: str | Path, cache: str | Path | None = None) -> dict[str, Any]:
    """Refuse (:class:`OutputError`, exit 2) when the downloads (on the cache's filesystem) and the
    output (on the output's filesystem; summed when they share one) do not fit. With ``--overwrite``
    the old output stays until the swap, so the new one counts whole either way."""
    out_at = _existing(Path(output).parent)
    needs: dict[int, list] = {}
    needs.setdefault(os.stat(out_at).st_dev, [out_at, 0, []])
    needs[os.stat(out_at).st_dev][1] += fetch.write_bytes
    needs[os.stat(out_at).st_dev][2].append(f"output {fetch.write_bytes / 1e6:.1f} MB")
    if fetch.download_bytes:
        if cache is None:
            from deltaport.io.hub import cache_dir

            cache = cache_dir()
        cache_at = _existing(Path(cache))
        rec = needs.setdefault(os.stat(cache_at).st_dev, [cache_at, 0, []])
        rec[1] += fetch.download_bytes
        rec[2].append(f"downloads {fetch.download_bytes / 1e6:.1f} MB")
    checked = {}
    for at, need, what in needs.values():
        free = shutil.disk_usage(at).free
        checked[str(at)] = {"need": need, "free": free}
        if need > free:
            raise OutputError(f"not enough free space on the filesystem of {at}: this run needs {need / 1e6:.1f} MB "
                              f"({' + '.join(what)}), {free / 1e6:.1f} MB are free. Free space or choose another "
                              "output (or HF_HOME for the downloads)")
    return checked


def run_fetch(fetch: Fetch) -> None:
    """Download the files not yet cached, at the pinned commits, and check their headers against the plan."""
    from deltaport.io import hub
    from deltaport.io.checkpoint import verify_downloaded

    for ck, files in fetch.downloads:
        hub.download(ck.hub, [f.name for f in files])
    for ck, files in fetch.needed:
        verify_downloaded(ck, files)
