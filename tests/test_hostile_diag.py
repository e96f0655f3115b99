"""Hostile input for the diagnostics (``connectivity``, ``similarity``, ``check``) and the files they write.

* every diagnostics case of ``hostile_cases.CASES`` (except the ones that need the real executable),
  in-process: exit code, message, inputs byte-identical, no partial output, no leftovers;
* pickle-only model directories: refused (exit 2, naming the file and ``--allow-pickle``) before any
  model is loaded; with ``--allow-pickle`` they give the same numbers as the safetensors copy;
* report / plot files: an existing file is refused before any model is loaded unless ``--overwrite``;
  a failed or killed write leaves the previous file; a file that appears meanwhile is kept;
* non-object JSON in the model files the core copies (``deltaport.assets``).
"""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import hostile_cases as H
from deltaport.errors import CheckpointError, DiskError, InputError, OutputError

DIAG_COMMANDS = ("connectivity", "similarity", "check")
DIAG = [c for c in H.CASES if c.command in DIAG_COMMANDS and not getattr(c.build, "real_cli_only", False)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def ws(pristine, tmp_path):
    return H.Workspace(tmp_path / "ws", pristine)


def _run(argv):
    return H.in_process_runner(argv)


@pytest.mark.parametrize("c", DIAG, ids=[re.sub(r"\W+", "-", c.name).strip("-")[:70] for c in DIAG])
def test_diag_case(c, pristine, tmp_path):
    H.check_case(c, pristine, tmp_path / "ws")


def test_catalogue_has_the_issue_cases_for_every_diagnostic():
    names = {c.name for c in H.CASES}
    for cmd in DIAG_COMMANDS:
        for what in ("pickle-only model refused", "pickle-only model with --allow-pickle is loaded",
                     "output exists without --overwrite", "--overwrite replaces an existing report"):
            assert f"{cmd}: {what}" in " | ".join(names), (cmd, what)
    assert any("tokenizer_config.json is a JSON list" in n for n in names)
    assert not [c.name for c in H.CASES if c.known_issue], "a known issue is left in the catalogue"


# ------------------------------------------------------------------------------------------ pickled weights


@pytest.mark.parametrize("cmd", DIAG_COMMANDS)
def test_pickle_only_is_refused_naming_the_file_and_the_flag(cmd, ws, monkeypatch):
    from deltaport import causal_lm

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the pickle-only directory was refused")

    monkeypatch.setattr(causal_lm, "load_causal_lm", no_load)
    marker = ws.root / "PWNED"
    d = H.make_pickle_model(ws, "target_base", "model_bin", marker)
    before = H.tree_hash(d)
    out = ws.out("report.json")
    rc, _, err = _run(H.DIAG_ARGV[cmd](ws, d, out))
    assert rc == 2, err
    line = H.first_message_line(err)
    assert line.startswith("error (CheckpointError): ") and str(d) in line, line
    assert "pytorch_model.bin" in line and "--allow-pickle" in line and "weights_only=True" in line, line
    assert "Traceback" not in err
    assert not out.exists() and H.leftovers(out) == [] and not marker.exists()
    assert H.tree_hash(d) == before


def test_allow_pickle_gives_the_numbers_of_the_safetensors_copy(ws):
    """The pickled copies load the very same weights (weights_only=True), not a random initialisation."""
    from deltaport.check import check
    from deltaport.connectivity import connectivity
    from deltaport.similarity import similarity

    sb, sf, tb = (ws.copy(r) for r in H.ROLES)
    pb, pf, pt = (H.make_pickle_model(ws, r, f"{r}_bin") for r in H.ROLES)
    before = {p: H.tree_hash(p) for p in (pb, pf, pt)}
    data = H._jsonl(ws)
    kw = dict(points=3, max_tokens=48)
    r_st = connectivity(sb, tb, data, **kw)
    with pytest.raises(CheckpointError, match=r"--allow-pickle"):
        connectivity(pb, tb, data, **kw)
    r_pk = connectivity(pb, pt, data, allow_pickle=True, **kw)
    assert r_pk["losses"] == r_st["losses"] and r_pk["num_parameters"] == r_st["num_parameters"]

    s_st = similarity(sb, sf, tb)
    s_pk = similarity(pb, pf, pt, allow_pickle=True)
    assert s_pk["total"] == s_st["total"]

    c_st = check(sb, sf, tb, data, max_tokens=48, calibration={})
    c_pk = check(pb, pf, pt, data, max_tokens=48, calibration={}, allow_pickle=True)
    assert c_pk["signals"] == c_st["signals"]
    assert {p: H.tree_hash(p) for p in (pb, pf, pt)} == before


def test_check_refuses_a_pickle_only_source_finetune_before_any_work(ws, monkeypatch):
    """m'_s is loaded last (after the barrier curve); its refusal must not wait for that work."""
    from deltaport import causal_lm
    from deltaport.check import check

    def no_work(*a, **k):
        raise AssertionError("work started before the pickle-only source fine-tune was refused")

    monkeypatch.setattr(causal_lm, "load_causal_lm", no_work)
    sf = H.make_pickle_model(ws, "source_finetuned", "sf_bin")
    with pytest.raises(CheckpointError, match=r"sf_bin holds only pickled weights \(pytorch_model\.bin\)"):
        check(ws.copy("source_base"), sf, ws.copy("target_base"), H._jsonl(ws))


def test_dot_pt_only_dir_is_refused_and_loaded_with_allow_pickle(ws):
    from deltaport.connectivity import connectivity

    d = H.make_pickle_model(ws, "target_base", "model_pt", ext=".pt")
    data = H._jsonl(ws)
    with pytest.raises(CheckpointError, match=r"model\.pt.*--allow-pickle"):
        connectivity(d, d, data, points=2, max_tokens=32)
    r = connectivity(d, d, data, points=2, max_tokens=32, allow_pickle=True)
    assert r["barrier"] == 0.0


# ------------------------------------------------------------------------------------------ report / plot files


@pytest.mark.parametrize("cmd", DIAG_COMMANDS)
def test_existing_report_is_refused_before_any_model_is_loaded(cmd, ws, monkeypatch):
    from deltaport import causal_lm, similarity

    def no_load(*a, **k):
        raise AssertionError("a model was loaded although the output cannot be written")

    monkeypatch.setattr(causal_lm, "load_causal_lm", no_load)
    monkeypatch.setattr(similarity, "_open", no_load)
    d = ws.copy("target_base")
    out = ws.out("report.json")
    out.write_text('{"previous": "report"}\n')
    before = H.tree_hash(out), H.tree_hash(d)
    rc, _, err = _run(H.DIAG_ARGV[cmd](ws, d, out))
    assert rc == 2, err
    line = H.first_message_line(err)
    assert line.startswith("error (OutputError): ") and str(out) in line and "--overwrite" in line, line
    assert (H.tree_hash(out), H.tree_hash(d)) == before and H.leftovers(out) == []


@pytest.mark.parametrize("cmd", ("connectivity", "similarity"))
def test_plot_paths_are_checked_before_the_work(cmd, ws):
    d = ws.copy("target_base")
    out = ws.out("report.json")
    argv = H.DIAG_ARGV[cmd](ws, d, out)
    png = ws.out("plot.png")
    png.write_bytes(b"previous plot\n")
    for extra, pattern in ((["--plot", str(png)], r"plot\.png already exists; pass --overwrite"),
                           (["--plot", str(out)], r"--plot and -o both name"),
                           (["--plot", str(ws.out("plot.xyz"))], r"cannot write \.xyz files")):
        rc, _, err = _run(argv + extra)
        assert rc == 2, err
        assert re.search(pattern, H.first_message_line(err)), err
        assert not out.exists() and not ws.out("plot.xyz").exists()
    assert png.read_bytes() == b"previous plot\n"
    rc, _, err = _run(argv + ["--plot", str(png), "--overwrite"])
    assert rc == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(out.read_text())
    assert H.leftovers(out) == [] and H.leftovers(png) == []


def test_disk_full_while_writing_the_plot_keeps_the_previous_plot(ws, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, fname, *a, **k):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", full)
    d = ws.copy("target_base")
    out, png = ws.out("report.json"), ws.out("plot.png")
    png.write_bytes(b"previous plot\n")
    rc, _, err = _run(H.DIAG_ARGV["connectivity"](ws, d, out) + ["--plot", str(png), "--overwrite"])
    assert rc == 1, err
    line = H.first_message_line(err)
    assert line.startswith("error (DiskError): writing ") and "disk full" in line and "unchanged" in line, line
    assert png.read_bytes() == b"previous plot\n" and H.leftovers(png) == []


def test_atomic_write_file_failure_race_and_leftovers(tmp_path):
    from deltaport.io.atomic import TMP_TAG, atomic_write_file

    p = tmp_path / "report.json"
    p.write_text("old\n")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_file(p, fails, overwrite=True)
    assert p.read_text() == "old\n" and H.leftovers(p) == []

    def disk_full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskError, match=r"disk full.*previous file is unchanged"):
        atomic_write_file(p, disk_full, overwrite=True)
    assert p.read_text() == "old\n" and H.leftovers(p) == []

    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        atomic_write_file(p, lambda tmp: tmp.write_text("new\n"))
    assert p.read_text() == "old\n"

    q = tmp_path / "new.json"

    def raced(tmp):  # another process creates the output while this one writes
        tmp.write_text("mine\n")
        q.write_text("theirs\n")

    with pytest.raises(OutputError, match="appeared while deltaport was writing"):
        atomic_write_file(q, raced)
    assert q.read_text() == "theirs\n" and H.leftovers(q) == []

    stale = tmp_path / f".report.json{TMP_TAG}999999999-dead"  # left by a killed run (no such pid)
    stale.write_text("half")
    atomic_write_file(p, lambda tmp: tmp.write_text("new\n"), overwrite=True)
    assert p.read_text() == "new\n" and not stale.exists() and H.leftovers(p) == []


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from deltaport.cli.main import _install_signal_handlers
from deltaport.io.atomic import atomic_write_file
_install_signal_handlers()  # what `deltaport` does: SIGTERM/SIGINT/SIGHUP raise, so cleanups run
def slow(tmp):
    tmp.write_text('{"half')
    print("writing", flush=True)
    time.sleep(60)
atomic_write_file(Path(sys.argv[1]), slow, overwrite=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_report_write_leaves_the_previous_report(ws, sig):
    """A process stopped while its report is being written leaves the old report byte-identical. SIGTERM /
    SIGINT remove the temporary file at once; after SIGKILL the next run on the same path removes it."""
    out = ws.out("report.json")
    out.write_text('{"previous": "report"}\n')
    prev = H.tree_hash(out)
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert H.leftovers(out), "the temporary file should exist while writing"
    finally:
        p.send_signal(sig)
        p.wait(timeout=30)
    assert p.returncode != 0
    assert H.tree_hash(out) == prev
    if sig != signal.SIGKILL:
        assert H.leftovers(out) == []
        return
    assert len(H.leftovers(out)) == 1
    d = ws.copy("target_base")
    rc, _, err = _run(H.DIAG_ARGV["similarity"](ws, d, out) + ["--overwrite"])
    assert rc == 0, err
    assert "previous" not in json.loads(out.read_text()) and H.leftovers(out) == []


# ------------------------------------------------------------------------------------------ deltaport.assets


@pytest.mark.parametrize("fname,content,kind", [("tokenizer_config.json", "[1, 2]", "array"),
                                                ("chat_template.json", '"{{ messages }}"', "string"),
                                                ("tokenizer_config.json", "null", "null")])
def test_read_chat_template_refuses_non_object_json(tmp_path, fname, content, kind):
    from deltaport.assets import read_chat_template

    (tmp_path / fname).write_text(content)
    with pytest.raises(InputError, match=rf"{re.escape(str(tmp_path / fname))} must be a JSON object .* JSON {kind}"):
        read_chat_template(tmp_path)
    assert (tmp_path / fname).read_text() == content


@pytest.mark.parametrize("where,fname,flag", [("cfg", "config.json", "--config-from"),
                                              ("chat", "config.json", "--chat-template-from"),
                                              ("tok", "tokenizer_config.json", "--tokenizer-from"),
                                              ("chat", "tokenizer_config.json", "--chat-template-from")])
def test_write_model_files_refuses_non_object_json(pristine, tmp_path, where, fname, flag):
    import shutil

    from deltaport.assets import write_model_files

    srcs = {}
    for role in ("cfg", "tok", "chat"):
        srcs[role] = tmp_path / role
        shutil.copytree(pristine["target_base" if role != "chat" else "source_finetuned"], srcs[role])
    (srcs["chat"] / "chat_template.jinja").unlink()  # the chat template is read from tokenizer_config.json
    (srcs[where] / fname).write_text("[1, 2, 3]")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as ei:
        write_model_files(out, config_src=srcs["cfg"], tokenizer_src=srcs["tok"], chat_src=srcs["chat"])
    msg = str(ei.value)
    assert msg.startswith(f"{srcs[where] / fname} must be a JSON object") and "JSON array" in msg and flag in msg, msg
