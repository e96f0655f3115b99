"""The command-line fuzzer: argument vectors for every command, generated from its declared options.

Every command of the ``deltaport`` app (read from the Typer app itself, so a new command or flag is
fuzzed without a change here; :mod:`deltaport.options` declares most of them) gets argument vectors
drawn by hypothesis from its flags' declared types: valid values, boundary values (0, negative, huge,
NaN, empty, unicode, unit typos), wrong types, choices that do not exist, missing and duplicated
options, and paths that do not exist, are files, are read-only folders (``chattr +i``: as root,
``chmod`` does not stop writes), lie inside an input, or are symlinks to an input.

Properties, for every vector:

- the exit code is 0, 1 or 2 (never an uncaught exception: ``main`` re-raises anything that is not a
  deltaport error, which is what a user would see as a traceback);
- nothing printed (stdout, stderr, log records) contains a Python traceback;
- the inputs are byte-identical afterwards;
- no temporary folder, stranded previous output or writer lock is left anywhere in the workspace.

``finetune``, ``eval``, ``evolve``, ``demo`` and ``lab run`` would start real jobs on a valid vector,
so their vectors always carry at least one invalid element and must be refused (exit 2) within
:data:`REFUSAL_SECONDS`. ``transfer``, ``diff`` and ``apply`` also get ``--dry-run`` vectors.

Budget: :data:`EXAMPLES` vectors per command (``DELTAPORT_FUZZ_EXAMPLES``; 15 in CI). CI runs derandomized (the same vectors every run); set
``DELTAPORT_FUZZ_RANDOM=1`` and a larger ``DELTAPORT_FUZZ_EXAMPLES`` for a longer search. A failing
vector is kept in hypothesis's example database (``.hypothesis/``) and replayed first on the next run;
the vectors that found bugs are pinned below with ``@example``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hostile_cases as H

EXAMPLES = int(os.environ.get("DELTAPORT_FUZZ_EXAMPLES", "15"))
RANDOM = os.environ.get("DELTAPORT_FUZZ_RANDOM") == "1"
REFUSAL_SECONDS = 120  # a vector of a heavy command not refused by then has started a real job (generous: CI may be loaded)
CASE_SECONDS = 300  # any vector (a hang, not a slow machine)
HEAVY = {"finetune", "eval", "evolve", "demo", "lab run"}
DRY_RUN = {"transfer", "diff", "apply"}


# --------------------------------------------------------------------------------------------------
# the commands and their flags, read from the app


def _commands() -> dict[str, typing.Any]:
    import typer.main

    from deltaport.cli.main import app

    found = {}

    def walk(cmd, prefix):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, prefix + [name])
        else:
            found[" ".join(prefix)] = cmd

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()


def _annotation(param):
    desc = getattr(param, "type_descriptor", None)
    return getattr(desc, "annotation", None)


def _kind(param) -> tuple[str, tuple]:
    """What a flag takes: ('flag'|'choice'|'int'|'float'|'path'|'str', choices)."""
    if getattr(param, "is_flag", False):
        return "flag", ()
    ann = _annotation(param)
    args = typing.get_args(ann)
    while typing.get_origin(ann) in (typing.Union, list) or type(ann).__name__ == "UnionType":
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        if not inner:
            break
        ann = inner[0]
        args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return "choice", args
    if ann is int:
        return "int", ()
    if ann is float:
        return "float", ()
    if ann is Path:
        return "path", ()
    return "str", ()


def test_every_declared_option_is_fuzzed():
    """The fuzzer reaches every option :mod:`deltaport.options` declares: each is a flag of its command."""
    import dataclasses

    from deltaport import options as O

    for cls in [v for v in vars(O).values() if isinstance(v, type) and dataclasses.is_dataclass(v) and hasattr(v, "verb")]:
        cmd = COMMANDS[cls.verb]
        flags = {o for p in cmd.params for o in getattr(p, "opts", [])}
        for f in dataclasses.fields(cls):
            assert O.flag(f.name) in flags, (cls.verb, f.name)


# --------------------------------------------------------------------------------------------------
# the workspace: pristine inputs, hostile paths


class Space:
    def __init__(self, root: Path):
        self.root = root
        fam = H.build_pristine(root / "in")
        self.models = {k: Path(v) for k, v in fam.items()}
        d = root / "in"
        from deltaport.api import diff

        self.delta2 = d / "delta2"
        diff(self.models["source_base"], self.models["target_base"], self.delta2)
        self.data = d / "text.jsonl"
        self.data.write_text("".join('{"text": "the flag is red . what color is the flag ? red"}\n' for _ in range(8)))
        self.sft = d / "sft.jsonl"
        self.sft.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}\n')
        self.empty = d / "empty.jsonl"
        self.empty.write_text("")
        self.garbage = d / "garbage.bin"
        self.garbage.write_bytes(bytes(range(256)) * 4)
        self.chain = d / "chain.yaml"
        self.chain.write_text("versions: []\n")
        self.scale_map = d / "scale_map.yaml"
        self.scale_map.write_text("mlp: 0.5\n")
        self.existing = root / "existing.json"  # an existing file that is no input (--overwrite may replace it)
        self.existing.write_text("{}\n")
        self.ro = root / "readonly"
        self.ro.mkdir()
        (self.ro / "existing").mkdir()
        self.chattr = subprocess.run(["chattr", "+i", str(self.ro)], capture_output=True).returncode == 0
        self.link = root / "link-to-input"
        self.link.symlink_to(self.models["source_base"])
        self.outs = root / "outs"
        self.outs.mkdir()
        self.inputs_hash = H.tree_hash(d)

    def close(self):
        if self.chattr:
            subprocess.run(["chattr", "-i", str(self.ro)], check=False)

    # value pools (strings, as a user types them)
    def model_paths(self, role: str) -> list[str]:
        m = self.models
        return [str(m.get(role, m["source_base"])), str(m["source_finetuned"]), str(m["delta"]), str(self.root / "missing"),
                str(self.data), "", "ünïcode-model", str(self.link), str(self.ro), "org/does-not-exist@main"]

    def out_paths(self) -> list[str]:
        return [str(self.outs / "new"), str(self.outs / "new.json"), str(self.existing), str(self.models["source_base"] / "sub"),
                str(self.link), str(self.ro / "out"), str(self.ro / "existing"), str(self.ro), "", str(self.outs / "ü ñ")]

    def data_paths(self) -> list[str]:
        return [str(self.data), str(self.sft), str(self.empty), str(self.garbage), str(self.root / "missing.jsonl"),
                str(self.models["source_base"]), "", str(self.chain)]


_INTS = ["0", "-1", "99999999999999999999", "nan", "abc", "1.5", "", "٣", "1e3"]
_FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e309", "abc", "", "1,5"]
_STRS = ["", "abc", "ü", "5XB", "12 MB MB", "0", "-5MB", "float8", "x" * 300, "a,b", "=", "cuda:99"]
_MODEL_FLAGS = {"source_base", "source_finetuned", "target_base", "target_finetuned", "base", "finetuned", "to",
                "model", "a", "b", "path", "delta", "models"}
_ROLE = {"base": "source_base", "finetuned": "source_finetuned", "to": "target_base", "a": "source_base",
         "b": "target_base", "model": "source_finetuned", "path": "source_finetuned", "models": "source_finetuned"}
_VALID_STR = {"shard_size": ["500MB", "12KB", "4096"], "device": ["cpu"], "dtype": ["float32", "bfloat16"],
              "out_dtype": ["bfloat16", "float32"], "delta_dtype": ["float32", "float64"], "include": ["layers", "."],
              "exclude": ["lm_head", "norm"], "tasks": ["lab_heldout"], "batch_size": ["2"], "seeds": ["0,1"]}


def _values(space: Space, name: str, kind: str, choices: tuple) -> tuple[list[str], list[str]]:
    """(valid values, invalid or boundary values) of a flag, as a user types them."""
    if name == "output":
        outs = space.out_paths()
        return outs[:2], outs[2:]
    if name == "delta":
        paths = space.model_paths("delta")
        return [str(space.models["delta"]), str(space.delta2)], paths[1:]
    if name in _MODEL_FLAGS:
        paths = space.model_paths(_ROLE.get(name, name))
        return paths[:1], paths[1:]
    if name == "data":
        return [str(space.data)], space.data_paths()[1:]
    if name == "scale_map":
        return [str(space.scale_map)], [str(space.chain), str(space.garbage), str(space.root / "missing.yaml"), ""]
    if name in ("chain", "config", "key_map", "cache_dir", "plot", "table", "chat_template"):
        return [str(space.outs / "p.png")], [str(space.chain), str(space.data), str(space.root / "missing.yaml"),
                                              str(space.ro / "x"), "", "full", "tulu"]
    if kind == "choice":
        return [str(c) for c in choices], ["bogus", "", str(choices[0]).upper() if choices else "X"]
    if kind == "int":
        return ["1", "2"], _INTS
    if kind == "float":
        return ["1", "0.7", "0.5"], _FLOATS
    return _VALID_STR.get(name, ["abc"]), _STRS


@st.composite
def vectors(draw, space: Space, command: str) -> list[str]:
    cmd = COMMANDS[command]
    argv = command.split()
    invalid = False
    for p in cmd.params:
        if getattr(p, "hidden", False) or p.name in ("help",):
            continue
        kind, choices = _kind(p)
        is_arg = "Argument" in type(p).__name__
        present = draw(st.floats(0, 1)) < (0.95 if p.required else 0.3)
        if not present:
            invalid |= bool(p.required)
            continue
        if kind == "flag":
            argv.append(p.opts[0])
            if draw(st.booleans()) and draw(st.booleans()):
                argv.append(p.opts[0])  # duplicated
            continue
        good, bad = _values(space, p.name, kind, choices)
        multi = (is_arg and p.nargs == -1) or p.multiple
        n = 1 + (1 if multi and draw(st.booleans()) else 0) + (1 if draw(st.integers(0, 14)) == 0 else 0)  # or duplicated
        for _ in range(n):
            wrong = draw(st.integers(0, 14)) == 0  # one value in fifteen invalid or at a boundary
            invalid |= wrong
            v = draw(st.sampled_from(bad if wrong else good))
            argv.extend([v] if is_arg else [p.opts[0], v])
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-flag", "--scale", "-o"])))  # unknown / value missing
        invalid = True
    if command in DRY_RUN and draw(st.booleans()):
        argv.append("--dry-run")
    if command in HEAVY:
        # a valid vector would start a real job: one element is certainly invalid (what is invalid for one
        # command may be valid for another, so the draws above do not count)
        bad = draw(st.sampled_from(["unwritable_output", "missing_input", "unknown_flag", "missing_required"]))
        if bad == "unknown_flag":
            argv.append("--definitely-not-a-flag")
        elif bad == "unwritable_output" or (bad == "missing_required" and command == "demo"):
            argv.extend(["-o", str(space.ro / "out")])  # the last -o wins
        elif bad == "missing_input":
            argv.extend({"finetune": ["--data", str(space.root / "missing.jsonl")], "eval": [str(space.root / "missing")],
                         "evolve": [], "demo": ["--preset", "bogus"], "lab run": []}[command])
            if command in ("evolve", "lab run"):
                argv = argv[:len(command.split())] + [str(space.root / "missing.yaml"), "-o", str(space.outs / "r")]
        else:
            argv = argv[:len(command.split())]
    return argv


# --------------------------------------------------------------------------------------------------
# running one vector


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


class _Late(Exception):
    pass


def run_vector(space: Space, argv: list[str], limit: float) -> dict:
    from deltaport.cli.main import main

    for p in space.outs.iterdir():  # each vector starts from an empty output area
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out, err, rec = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    root.addHandler(rec)

    def late(signum, frame):
        raise _Late(f"{' '.join(argv)} ran longer than {limit} s")

    old = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, limit)
    crash = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    except _Late:
        raise
    except BaseException as exc:  # what a user would see as a traceback
        code, crash = None, f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        root.removeHandler(rec)
    text = out.getvalue() + err.getvalue() + "\n".join(rec.lines)
    return {"code": code, "crash": crash, "text": text}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if H.TMP_TAG in p.name or H.OLD_TAG in p.name or p.name.endswith(H.LOCK_TAG)]


def check_vector(space: Space, argv: list[str]) -> None:
    heavy = " ".join(argv[:2]) if argv[:2] == ["lab", "run"] else argv[0]
    r = run_vector(space, argv, REFUSAL_SECONDS if heavy in HEAVY else CASE_SECONDS)
    shown = f"argv={argv!r}\n--- output ---\n{r['text'][-3000:]}"
    assert r["crash"] is None, f"uncaught {r['crash']}\n{shown}"
    assert r["code"] in (0, 1, 2), f"exit {r['code']}\n{shown}"
    assert "Traceback (most recent call last)" not in r["text"], shown
    if r["code"] in (1, 2):  # one paragraph: a single "error (Kind): ..." line, and nothing after it
        lines = r["text"].rstrip().splitlines()
        errs = [i for i, ln in enumerate(lines) if ln.startswith("error (")]
        assert len(errs) == 1 and errs[0] == len(lines) - 1 or not r["text"].strip(), f"not one paragraph\n{shown}"
    if heavy in HEAVY:
        assert r["code"] == 2, f"a heavy command's invalid vector was not refused\n{shown}"
    assert H.tree_hash(space.root / "in") == space.inputs_hash, f"an input changed\n{shown}"
    left = _leftovers(space.root)
    assert not left, f"left behind: {left}\n{shown}"
    from deltaport.io import atomic

    assert not atomic._HELD, f"a writer lock is still held after the command returned: {list(atomic._HELD)}\n{shown}"
    COUNTS.setdefault(heavy, {0: 0, 1: 0, 2: 0})[r["code"]] += 1
    show = os.environ.get("DELTAPORT_FUZZ_SHOW")
    if show and (r["code"] != 2 or show == "all"):
        last = r["text"].strip()[-400:].replace("\n", " // ")
        sys.__stderr__.write(f"exit {r['code']}: {argv}\n    {last}\n")


COUNTS: dict[str, dict[int, int]] = {}  # command -> exit code -> vectors


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    s = Space(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.close()
    total = sum(sum(c.values()) for c in COUNTS.values())
    sys.__stderr__.write(f"\nCLI fuzzer: {total} argument vectors, none crashed; exit codes per command {COUNTS}\n")


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_fuzz_command(space, command):
    @_settings()
    @given(st.data())
    def run(data):
        check_vector(space, data.draw(vectors(space, command)))

    run()


# the vectors that found bugs (issue 25), replayed every run
PINNED = [
    ["connectivity", "-o", "{data}", "--overwrite"], ["check", "-o", "{data}", "--overwrite"],
    ["check", "--target-base", "{delta}"],
    ["transfer", "--shard-size", "5XB"], ["transfer", "--shard-size", "abc"], ["transfer", "--shard-size", "0"],
    ["transfer", "--shard-size", "-5MB"], ["transfer", "--shard-size", "12 MB MB"],
    ["transfer", "-o", "{ro}/out"], ["diff", "-o", "{ro}/out"], ["compress", "-o", "{ro}/out"],
    ["connectivity", "-o", "{ro}/out.json"], ["transfer", "-o", "{ro}/existing", "--overwrite"],
    ["transfer", "-o", "{ro}"], ["diff", "-o", "{link}/x"], ["transfer", "--scale", "abc"],
]


@pytest.mark.parametrize("extra", PINNED, ids=lambda v: " ".join(v))
def test_pinned_vectors(space, extra):
    m, d = space.models, space.models["delta"]
    fill = {"ro": str(space.ro), "link": str(space.link), "data": str(space.data), "delta": str(d)}
    extra = [e.format(**fill) for e in extra]
    base = {
        "transfer": ["transfer", "--source-base", str(m["source_base"]), "--source-finetuned", str(m["source_finetuned"]),
                     "--target-base", str(m["target_base"])],
        "diff": ["diff", "--base", str(m["source_base"]), "--finetuned", str(m["source_finetuned"])],
        "compress": ["compress", str(d), "--method", "lowrank", "--rank", "2"],
        "connectivity": ["connectivity", str(m["source_base"]), str(m["target_base"]), "--data", str(space.data),
                         "--max-tokens", "32", "--points", "2"],
        "check": ["check", "--source-base", str(m["source_base"]), "--source-finetuned", str(m["source_finetuned"]),
                  "--target-base", str(m["target_base"]), "--data", str(space.data), "--max-tokens", "32"],
    }[extra[0]]
    argv = base + extra[1:]
    if "-o" not in argv:
        argv += ["-o", str(space.outs / "out")]
    r = run_vector(space, argv, CASE_SECONDS)
    assert r["crash"] is None and r["code"] == 2, (argv, r)
    assert "Traceback" not in r["text"]
    assert len([ln for ln in r["text"].splitlines() if ln.startswith("error")]) == 1, r["text"]
    assert not _leftovers(space.root)
    assert H.tree_hash(space.root / "in") == space.inputs_hash
