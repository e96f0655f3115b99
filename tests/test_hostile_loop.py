"""Every hostile case of ``hostile_cases.CASES`` for the model-development commands (eval, finetune,
evolve, lab), through the CLI entry point in-process: the exit code, the message, inputs byte-identical,
no partial output, no leftovers, no foreign code run. These are the rows ``docs/reliability.md`` reports
for those commands; running them here makes CI hold the report to them. Tiny models, a few seconds."""

from __future__ import annotations

import re

import pytest

import hostile_cases as H

LOOP_COMMANDS = ("eval", "finetune", "evolve", "lab")
LOOP = [c for c in H.CASES if c.command in LOOP_COMMANDS and not getattr(c.build, "real_cli_only", False)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("c", LOOP, ids=[re.sub(r"\W+", "-", c.name).strip("-")[:70] for c in LOOP])
def test_loop_case(c, pristine, tmp_path):
    H.check_case(c, pristine, tmp_path / "ws")


def test_every_catalogue_case_runs_in_the_test_suite():
    """Each case of the catalogue is run by one of the hostile test files (the report claims no more than
    CI checks); only the real-executable cases (signals, resource limits) are left to the report."""
    covered = {"deltaport", "transfer", "diff", "apply", "inspect", "compress", "connectivity", "similarity", "check", *LOOP_COMMANDS}
    left = [c.name for c in H.CASES if c.command not in covered and not getattr(c.build, "real_cli_only", False)]
    assert not left, left
    for cmd in ("eval", "finetune", "evolve"):
        names = [c.name for c in LOOP if c.command == cmd]
        for what in ("nonexistent model path", "pickle-only model refused", "output exists without --overwrite",
                     "truncated shard", ".bin whose index disagrees", "model lacks a tensor"):
            assert any(what in n for n in names), (cmd, what)
