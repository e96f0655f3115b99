"""Issue 25's writer cases that no other hostile file runs (``compress`` into a read-only folder), and the file
modes of every directory output: 0666 & ~umask, whatever the umask (transformers saved finetune's weights 0600)."""

from __future__ import annotations

import os
import re
import stat

import pytest

import hostile_cases as H

WRITERS = [c for c in H.CASES if c.command == "compress"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("c", WRITERS, ids=[re.sub(r"\W+", "-", c.name).strip("-")[:60] for c in WRITERS])
def test_writer_case(c, pristine, tmp_path):
    H.check_case(c, pristine, tmp_path / "ws")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_files_have_mode_0666_minus_umask(pristine, tmp_path, umask):
    ws = H.Workspace(tmp_path / "ws", pristine)
    fam = ws.family()
    argvs = {
        "transfer": H.transfer_argv(fam, ws.out("t"), "--shard-size", "20KB"),
        "diff": ["diff", "--base", str(fam["source_base"]), "--finetuned", str(fam["source_finetuned"]), "-o",
                 str(ws.out("d")), "-q"],
        "apply": ["apply", str(pristine["delta"]), "--to", str(fam["target_base"]), "-o", str(ws.out("a")), "-q"],
    }
    old = os.umask(umask)
    try:
        for cmd, argv in argvs.items():
            rc, _, err = H.in_process_runner(argv)
            assert rc == 0, (cmd, err)
    finally:
        os.umask(old)
    for name in ("t", "d", "a"):
        files = [p for p in ws.out(name).rglob("*") if p.is_file()]
        assert files, name
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, (name, modes)
