"""CLI habits people bring from Typer, huggingface_hub and lm-eval: flags look like flags, choices are
listed, --quiet everywhere, bars only on a terminal, summaries in words, no file locations in logs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from deltaport.cli.main import app, main

COMMANDS = [["transfer"], ["diff"], ["apply"], ["compress"], ["inspect"], ["eval"], ["finetune"], ["evolve"],
            ["connectivity"], ["similarity"], ["check"], ["lab", "run"], ["demo"]]


def _help(argv, capsys) -> str:
    capsys.readouterr()
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_shows_flags_as_flags_and_quiet_everywhere(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = _help(argv, capsys)
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", out), out  # Python types as metavars
    assert re.search(r"--quiet\s+-q\s+no progress bars", out), out
    assert re.search(r"--help\s+Show this message", out), out


def test_help_lists_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = _help(["transfer"], capsys)
    for choice in ("[error|pad|align]", "[error|skip]", "[auto|float32|float64]", "[target|source-finetuned]"):
        assert choice in out, choice
    assert re.search(r"--overwrite\s+replace an existing output", out)
    assert "[quick|paper]" in _help(["finetune"], capsys)
    assert "[hf|vllm]" in _help(["eval"], capsys) and "[base|chat|both|auto]" in _help(["eval"], capsys)
    assert "[quick|full|ci]" in _help(["demo"], capsys)


def test_redirected_run_draws_no_bars_and_summarises_in_words(family, tmp_path):
    """stderr is a file here (as in a redirected log): no progress bar, and the summary has no reprs."""
    fam = family("llama", torch.bfloat16)
    r = subprocess.run([sys.executable, "-m", "deltaport.cli.main", "transfer", "--source-base", str(fam["source_base"]),
                        "--source-finetuned", str(fam["source_finetuned"]), "--target-base", str(fam["target_base"]),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "━" not in r.stderr and "%|" not in r.stderr
    assert re.fullmatch(r"wrote \S+: 21 of 21 tensors received Δ, [\d.]+ MB, computed in float64, [\d.]+ s\n", r.stderr), r.stderr
    assert "{" not in r.stderr and "None" not in r.stderr


def test_inspect_prints_words_not_reprs(family, capsys):
    fam = family("llama", torch.bfloat16)
    capsys.readouterr()
    assert main(["inspect", str(fam["target_base"])]) == 0
    out = capsys.readouterr().out
    assert "revision=None" not in out and "kind=" not in out and "None" not in out
    assert out.startswith(f"{fam['target_base']}: model\n")
    assert "tie_word_embeddings no" in out


def test_progress_bars_follow_the_terminal(monkeypatch):
    from deltaport.cli import flags

    monkeypatch.setattr(flags, "_isatty", lambda: True)
    assert flags.progress_mode(quiet=False) is True
    assert flags.progress_mode(quiet=True) is False
    flags.restore_env()
    monkeypatch.setattr(flags, "_isatty", lambda: False)
    assert flags.progress_mode(quiet=False) is False
    assert flags.progress_mode(quiet=False, progress=True) is True  # --progress forces them
    import tqdm

    assert tqdm.tqdm(range(3), disable=False).disable  # third-party bars are off, whatever they ask for
    flags.restore_env()
    assert not tqdm.tqdm(range(3), disable=False).disable


def test_warnings_and_logs_carry_no_source_locations(family):
    """A library's warning (transformers' FutureWarnings, say) prints as one line without the file:line
    and code line Python adds; log lines have no locations either. In a subprocess: pytest records warnings."""
    fam = family("llama", torch.bfloat16)
    code = (
        "import logging, sys, warnings\n"
        "import deltaport.inspect as ins\n"
        "real = ins.inspect\n"
        "def noisy(*a, **k):\n"
        "    warnings.warn('this argument is deprecated', FutureWarning)\n"
        "    logging.getLogger('transformers.modeling_utils').warning('a library log line')\n"
        "    return real(*a, **k)\n"
        "ins.inspect = noisy\n"
        "from deltaport.cli.main import main\n"
        f"sys.exit(main(['inspect', {str(fam['target_base'])!r}, '--json']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("warning (FutureWarning): this argument is deprecated\n"
                        "WARNING transformers.modeling_utils: a library log line\n"), r.stderr
