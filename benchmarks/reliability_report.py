"""Generate ``docs/reliability.md``: every hostile case run through the real ``deltaport`` executable.

    python benchmarks/reliability_report.py                 # writes docs/reliability.md (~10 min on 2 cores)
    python benchmarks/reliability_report.py --quick         # 5 kill trials, no fuzz/load runs
    python benchmarks/reliability_report.py -o /tmp/r.md

For each case (catalogue: ``tests/hostile_cases.py``) it records the exit code, the first line of the
message, whether every input is byte-identical afterwards (sha256 of every file) and what is at the output
path (nothing / the previous output intact / a complete new output), plus: kill trials (SIGKILL/SIGTERM/
SIGINT at random moments, ``tests/test_kill.py``), disk full (RLIMIT_FSIZE and a tiny tmpfs), the fuzz
tests' result, the CLI fuzzer's argument vectors per command and exit code (``tests/test_cli_fuzz.py``,
:data:`CLI_FUZZ_EXAMPLES` per command), determinism across ``--threads`` and a 2,000-tensor/40-shard load run (peak RSS, descriptors).
Nothing in the Markdown is written by hand.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hostile_cases as H  # noqa: E402

LATER_COMMANDS = ("eval", "finetune", "evolve", "connectivity", "similarity", "check", "lab")


def _md(s: str, n: int = 170) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _shorten(s: str, roots: list[tuple[str, str]]) -> str:
    for path, name in roots:
        s = s.replace(path, name)
    return s


def run_catalogue(work: Path, pristine: dict, runner, log) -> tuple[list, list]:
    run, skipped = H.cases_for()
    outcomes = []
    for i, c in enumerate(run):
        ws = H.Workspace(work / f"case{i:03d}", pristine)
        try:
            o = H.run_case(c, ws, runner)
        except Exception as exc:  # noqa: BLE001 - a broken case is reported, not fatal
            o = H.Outcome(c.name, c.category, c.command, None, "?", f"case setup failed: {type(exc).__name__}: {exc}",
                          False, "n/a", [f"setup failed: {exc}"])
        o.message = _shorten(o.message, [(str(ws.root), "<ws>"), (str(work), "<work>")])
        o.argv = [_shorten(a, [(str(ws.root), "<ws>"), (str(work), "<work>"), (str(REPO), ".")]) for a in o.argv]
        outcomes.append(o)
        log(f"[{i + 1}/{len(run)}] {'ok  ' if o.ok else 'FAIL'} rc={o.rc} {o.seconds:5.1f}s {c.name}")
        shutil.rmtree(ws.root, ignore_errors=True)
    return outcomes, skipped


def disk_full_cases(work: Path, pristine: dict, log) -> list[dict]:
    rows = []

    def run(argv, limit=None):
        def pre():
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        return subprocess.run(H.deltaport_exe() + argv, capture_output=True, text=True, env=env, preexec_fn=pre)

    for limit, prev in ((300, False), (16_000, False), (16_000, True)):
        ws = H.Workspace(work / f"fsize{limit}{prev}", pristine)
        fam = ws.family()
        before = {r: H.tree_hash(d) for r, d in fam.items()}
        out = ws.out()
        extra = []
        if prev:
            shutil.copytree(pristine["target_base"], out)
            extra = ["--overwrite"]
        prev_hash = H.tree_hash(out)
        r = run(H.transfer_argv(fam, out, *extra), limit)
        rows.append({"case": f"RLIMIT_FSIZE={limit} B{' (--overwrite over a previous output)' if prev else ''}",
                     "rc": r.returncode, "message": _shorten(H.first_message_line(r.stderr), [(str(ws.root), "<ws>")]),
                     "inputs": {r_: H.tree_hash(d) for r_, d in fam.items()} == before,
                     "output": ("previous intact" if prev and H.tree_hash(out) == prev_hash else
                                "none" if not out.exists() else "CHANGED"),
                     "leftovers": H.leftovers(out), "ok": r.returncode == 1 and not H.leftovers(out)
                     and H.tree_hash(out) == prev_hash})
        log(f"disk: {rows[-1]['case']} rc={r.returncode}")
    mnt = work / "tmpfs"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode != 0:
        rows.append({"case": "96 KiB tmpfs (ENOSPC)", "rc": None, "message": f"not run: cannot mount ({m.stderr.strip()})",
                     "inputs": True, "output": "n/a", "leftovers": [], "ok": None})
        return rows
    try:
        fam = H.make_many_family(work / "tmpfs-models", n_tensors=2000, n_shards=40)
        before = {r: H.tree_hash(d) for r, d in fam.items()}
        out = mnt / "out"
        r = run(H.transfer_argv(fam, out, "--shard-size", "16KB"))
        rows.append({"case": "96 KiB tmpfs, 256 KB of output (ENOSPC)", "rc": r.returncode,
                     "message": _shorten(H.first_message_line(r.stderr), [(str(work), "<work>")]),
                     "inputs": {r_: H.tree_hash(d) for r_, d in fam.items()} == before,
                     "output": "none" if not out.exists() else "PARTIAL", "leftovers": [p.name for p in mnt.iterdir()],
                     "ok": r.returncode == 1 and not any(mnt.iterdir())})
        log(f"disk: tmpfs rc={r.returncode}")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return rows


def signal_cases(work: Path, log) -> list[dict]:
    """SIGTERM/SIGINT/SIGKILL once the temp folder exists (deterministic moment), with a previous output."""
    fam = H.make_many_family(work / "sig-models", n_tensors=2000, n_shards=40)
    rows = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL):
        out = work / f"sig-{sig.name}"
        subprocess.run(H.deltaport_exe() + H.transfer_argv(fam, out, "--scale", "0.5"), check=True, capture_output=True)
        prev = H.tree_hash(out)
        before = {r: H.tree_hash(d) for r, d in fam.items()}
        p = subprocess.Popen(H.deltaport_exe() + H.transfer_argv(fam, out, "--overwrite", "--shard-size", "4KB"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t_end = time.time() + 120
        while not H.leftovers(out) and p.poll() is None and time.time() < t_end:
            time.sleep(0.005)
        seen = bool(H.leftovers(out))
        if p.poll() is None:
            p.send_signal(sig)
        _, err = p.communicate()
        rc = p.returncode if p.returncode >= 0 else 128 - p.returncode
        left = H.leftovers(out)
        msg = "(killed: no message possible)" if sig == signal.SIGKILL else H.first_message_line(err)
        row = {"case": f"{sig.name} while writing (temp folder seen: {seen}), --overwrite over a previous output",
               "rc": rc, "message": _shorten(msg, [(str(work), "<work>")]),
               "inputs": {r: H.tree_hash(d) for r, d in fam.items()} == before,
               "output": "previous intact" if H.tree_hash(out) == prev else "CHANGED", "leftovers": left}
        if sig == signal.SIGKILL:
            r = subprocess.run(H.deltaport_exe() + H.transfer_argv(fam, out, "--overwrite", "--shard-size", "4KB"),
                               capture_output=True, text=True)
            row["case"] += f"; then the next run: rc={r.returncode}, leftovers after it: {H.leftovers(out)}"
            row["ok"] = row["output"] == "previous intact" and r.returncode == 0 and not H.leftovers(out)
        else:
            row["ok"] = row["output"] == "previous intact" and not left and rc == 128 + sig.value
        rows.append(row)
        log(f"signal: {sig.name} rc={rc} leftovers={left}")
    from test_kill import race_once

    (work / "race").mkdir()
    r = race_once(work / "race")
    rows.append({"case": "two transfers started together on one output (no --overwrite); exits of both: "
                         f"{r['codes']}, the output is the winner's, complete: {r['output_is_winner']}",
                 "rc": r["codes"][-1], "message": _shorten(r["loser_message"], [(str(work), "<work>")]), "inputs": r["inputs_intact"],
                 "output": "complete (winner)" if r["output_is_winner"] else "WRONG", "leftovers": r["leftovers"],
                 "ok": r["codes"] == [0, 2] and r["output_is_winner"] and not r["leftovers"]})
    log(f"race: {r}")
    return rows


def fuzz_summary(log) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                        str(REPO / "tests" / "test_fuzz.py"), "-rs"], capture_output=True, text=True, cwd=REPO)
    tail = [ln for ln in r.stdout.splitlines() if re.search(r"passed|failed|skipped|error", ln)]
    log(f"fuzz: {tail[-1] if tail else r.returncode}")
    return {"rc": r.returncode, "summary": tail[-1] if tail else "(no summary)", "seconds": time.perf_counter() - t0}


#: the CLI fuzzer's budget in this report (vectors per command, derandomized: the same vectors every run)
CLI_FUZZ_EXAMPLES = 40
#: its budget in CI: tests/test_cli_fuzz.py's default of DELTAPORT_FUZZ_EXAMPLES
CLI_FUZZ_CI_EXAMPLES = 15


def cli_fuzz_summary(log, examples: int = CLI_FUZZ_EXAMPLES) -> dict:
    """Run tests/test_cli_fuzz.py with ``examples`` vectors per command; read the per-command exit-code counts
    from the line it prints at teardown ("CLI fuzzer: N argument vectors, none crashed; exit codes per command
    {...}") -- printed only when every vector held the property (exit 0/1/2, no traceback, inputs unchanged,
    nothing left behind), so a failed run has no counts. ``--capture=sys``: with pytest's default fd capture
    that line, written to the real stderr at teardown, would be swallowed."""
    t0 = time.perf_counter()
    env = {**os.environ, "DELTAPORT_FUZZ_EXAMPLES": str(examples)}
    env.pop("DELTAPORT_FUZZ_RANDOM", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                        "--capture=sys", str(REPO / "tests" / "test_cli_fuzz.py")], capture_output=True, text=True, cwd=REPO, env=env)
    tail = [ln for ln in r.stdout.splitlines() if re.search(r"passed|failed|skipped|error", ln)]
    m = re.search(r"CLI fuzzer: (\d+) argument vectors, none crashed; exit codes per command (\{.*\})", r.stderr)
    counts = ast.literal_eval(m.group(2)) if m else None
    res = {"rc": r.returncode, "summary": tail[-1] if tail else "(no summary)", "seconds": time.perf_counter() - t0,
           "examples": examples, "total": int(m.group(1)) if m else None, "counts": counts}
    log(f"cli fuzz: {res['summary']}; {res['total']} vectors")
    return res


def load_and_determinism(work: Path, log) -> dict:
    from test_hostile_load import _peak

    small = H.make_many_family(work / "load-small", n_tensors=2000, n_shards=40, elems=64)
    big = H.make_many_family(work / "load-big", n_tensors=2000, n_shards=40, elems=32768)
    rss_s, fds_s, t_s = _peak(H.transfer_argv(small, work / "ls", "--shard-size", "6KB"))
    rss_b, fds_b, t_b = _peak(H.transfer_argv(big, work / "lb", "--shard-size", "50MB"))
    from deltaport.io.checkpoint import open_checkpoint

    ck = open_checkpoint(work / "ls")
    hashes = {}
    for threads in ("1", "2"):
        out = work / f"det{threads}"
        subprocess.run(H.deltaport_exe() + H.transfer_argv(big, out, "--threads", threads, "--shard-size", "50MB"),
                       check=True, capture_output=True)
        hashes[threads] = H.tree_hash(out)
    res = {"small": {"rss_mib": rss_s / 1024, "peak_fds": fds_s, "seconds": t_s, "out_tensors": len(ck.names),
                     "out_shards": len(ck.files)},
           "big": {"rss_mib": rss_b / 1024, "peak_fds": fds_b, "seconds": t_b, "model_mib": 2000 * 32768 * 2 / 2**20},
           "deterministic": hashes["1"] == hashes["2"], "files_compared": len(hashes["1"])}
    log(f"load: {res}")
    return res


def write_markdown(path: Path, outcomes, skipped, disk, sig, kills, fuzz, load, args, started, seconds,
                   cli_fuzz=None) -> None:
    L = []
    L.append("# deltaport reliability under hostile input and faults")
    L.append("")
    L.append(f"Generated by `python benchmarks/reliability_report.py{' --quick' if args.quick else ''}` on {started} "
             f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}), in {seconds / 60:.1f} min. "
             "Do not edit by hand; rerun the script. Every case runs the real `deltaport` executable on tiny "
             "checkpoints built for it (`tests/hostile_cases.py`); inputs are hashed (sha256 of every file) before "
             "and after. *Output* is what is at the output path afterwards: `none` (nothing was created), "
             "`previous intact` (an output that existed before is byte-identical), `complete` (the run succeeded and "
             "the output opens), `n/a` (the command writes no output). In the test suite the same cases run in-process: "
             "transfer/diff/apply/inspect in `tests/test_hostile_cli.py`, connectivity/similarity/check in "
             "`tests/test_hostile_diag.py`, eval/finetune/evolve/lab in `tests/test_hostile_loop.py`; only the cases "
             "that need the real executable (resource limits, signals) run here alone.")
    L.append("")
    bad = [o for o in outcomes if not o.ok]
    L.append(f"**{len(outcomes) - len(bad)} of {len(outcomes)} catalogue cases behaved as required**"
             + (f"; not as required: {', '.join(o.name for o in bad)}." if bad else "."))
    L.append("")
    L.append("| # | category | case | command line (`deltaport …`; `<ws>`: the case's folder) | exit (expected) | first line of the message | inputs intact | output | ok |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for i, o in enumerate(outcomes, 1):
        known = next((c.known_issue for c in H.CASES if c.name == o.name and c.known_issue), None)
        if known and not o.ok:
            o.problems.append(f"known issue: {known}")
        L.append(f"| {i} | {o.category} | {_md(o.name, 90)} | `{_md(shlex.join(o.argv) if o.argv else o.command, 260)}` | {o.rc} ({o.expect_rc}) | `{_md(o.message)}` | "
                 f"{'yes' if o.inputs_intact else '**NO**'} | {o.output_state} | "
                 f"{'yes' if o.ok else '**NO**: ' + _md('; '.join(o.problems), 200)} |")
    L.append("")
    if skipped:
        L.append("Not covered because the command does not exist in this checkout: "
                 + ", ".join(sorted({c.command for c in skipped})) + ".")
    missing = [c for c in LATER_COMMANDS if c not in H.available_commands()]
    if missing:
        L.append(f"Later commands absent when this report was generated (not covered): {', '.join(missing)}.")
    L.append("")
    L.append("## Signals while writing, and a race")
    L.append("")
    L.append("| case | exit | first line of the message | inputs intact | output | leftovers | ok |")
    L.append("|---|---|---|---|---|---|---|")
    for r in sig:
        L.append(f"| {_md(r['case'], 200)} | {r['rc']} | `{_md(r['message'])}` | {'yes' if r['inputs'] else '**NO**'} | "
                 f"{r['output']} | {r['leftovers'] or '-'} | {'yes' if r['ok'] else '**NO**'} |")
    L.append("")
    if kills:
        recs = kills["records"]
        okk = sum(r["output"] in ({"none", "complete", "previous"} if r["with_previous"] else {"none", "complete"})
                  and not r["leftovers_after_cleanup"] for r in recs)
        L.append(f"## Killed at random moments ({len(recs)} trials)")
        L.append("")
        L.append(f"`transfer` of a 2,000-tensor, 40-shard model into 8 KB output shards (an uninterrupted run takes "
                 f"{kills['full_run_s']:.1f} s, start-up included; its temp folder appears after "
                 f"{kills['tmp_appears_s']:.1f} s); signal sent after a uniform random delay in [0, 1.05 × the run] "
                 "(trials 0, 1, 4, 5, ...) or inside the writing window (trials 2, 3, 6, 7, ...); odd trials run with "
                 "`--overwrite` over a previous output. A negative exit code means the process died of the signal "
                 "before deltaport's handler was installed (interpreter start-up). After each trial the "
                 "output must be absent, the previous output byte-identical, or the new output byte-identical to an "
                 "uninterrupted run; SIGTERM/SIGINT must leave no temp folder; SIGKILL's temp folder must be removed "
                 "by the next run's start-up clean-up.")
        L.append("")
        L.append(f"**{okk} of {len(recs)} trials left a valid state**; inputs intact: "
                 f"{'yes' if kills['inputs_intact'] else '**NO**'}; a real next run after a SIGKILL mid-write: "
                 f"{kills['next_run']}.")
        L.append("")
        L.append("| trial | signal | delay s | previous output | temp folder at signal | exit | output after | leftovers after exit | after clean-up |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in recs:
            L.append(f"| {r['trial']} | {r['signal']} | {r['delay_s']} | {'yes' if r['with_previous'] else 'no'} | "
                     f"{'yes' if r['temp_dir_at_signal'] else 'no'} | {r['rc']} | {r['output']} | "
                     f"{len(r['leftovers_after_exit'])} | {r['output_after_cleanup']}, {len(r['leftovers_after_cleanup'])} left |")
        L.append("")
    L.append("## Disk full")
    L.append("")
    L.append("| case | exit | first line of the message | inputs intact | output | leftovers | ok |")
    L.append("|---|---|---|---|---|---|---|")
    for r in disk:
        L.append(f"| {_md(r['case'])} | {r['rc']} | `{_md(r['message'])}` | {'yes' if r['inputs'] else '**NO**'} | "
                 f"{r['output']} | {r['leftovers'] or '-'} | {'yes' if r['ok'] else ('not run' if r['ok'] is None else '**NO**')} |")
    L.append("")
    if fuzz:
        L.append("## Fuzzing")
        L.append("")
        L.append("`pytest tests/test_fuzz.py`: hypothesis (120 mutated safetensors headers + 80 mutated index files "
                 "through `inspect` and `transfer --dry-run`, 60 mutated delta `deltaport.json` files through `inspect` "
                 "and `apply --dry-run`; 10 s alarm per case, an audit hook failing any "
                 "write outside the case's temp folder) and atheris (libFuzzer, 2,000 coverage-guided raw-byte "
                 f"inputs, `tests/fuzz_atheris.py`). Result: `{fuzz['summary']}` (exit {fuzz['rc']}, "
                 f"{fuzz['seconds']:.0f} s).")
        L.append("")
    if cli_fuzz:
        c = cli_fuzz
        L.append("## Fuzzing every option of every command (`tests/test_cli_fuzz.py`)")
        L.append("")
        L.append(f"Hypothesis draws argument vectors for every command from its declared options: valid, boundary, "
                 "wrong-typed, missing and duplicated values, and hostile paths (missing, a file, `chattr +i`, inside an "
                 "input, a symlink to one); `finetune`, `eval`, `evolve` and `demo` only with vectors they must refuse. "
                 "Each vector must exit 0, 1 or 2 with no traceback, one error paragraph, inputs byte-identical and "
                 f"nothing left behind. Budget here: `DELTAPORT_FUZZ_EXAMPLES={c['examples']}` vectors per command, "
                 f"derandomized (the same vectors every run); in CI {CLI_FUZZ_CI_EXAMPLES} per command (the default). "
                 f"Command: `DELTAPORT_FUZZ_EXAMPLES={c['examples']} pytest tests/test_cli_fuzz.py` "
                 f"(`DELTAPORT_FUZZ_RANDOM=1` for a fresh search). Result: `{c['summary']}` (exit {c['rc']}, "
                 f"{c['seconds']:.0f} s).")
        L.append("")
        if c["counts"]:
            L.append(f"**{c['total']} argument vectors tried, 0 tracebacks.**")
            L.append("")
            L.append("| command | vectors | exit 0 | exit 1 | exit 2 |")
            L.append("|---|---|---|---|---|")
            for cmd, per in sorted(c["counts"].items()):
                L.append(f"| {cmd} | {sum(per.values())} | {per.get(0, 0)} | {per.get(1, 0)} | {per.get(2, 0)} |")
            L.append("")
        else:
            L.append("**The fuzzer failed** (its count line is printed only when every vector held the property).")
            L.append("")
    if load:
        s, b = load["small"], load["big"]
        L.append("## Load and determinism")
        L.append("")
        L.append(f"- 2,000 tensors in 40 shards per input, `transfer` to {s['out_tensors']} tensors in "
                 f"{s['out_shards']} output shards: peak RSS {s['rss_mib']:.0f} MiB, at most {s['peak_fds']} open "
                 f"descriptors, {s['seconds']:.1f} s (start-up included).")
        L.append(f"- Same layout with 64 KB tensors ({b['model_mib']:.0f} MiB per model, 3 inputs): peak RSS "
                 f"{b['rss_mib']:.0f} MiB (+{b['rss_mib'] - s['rss_mib']:.0f} MiB), at most {b['peak_fds']} descriptors, "
                 f"{b['seconds']:.1f} s. Memory does not follow model size; descriptors are one per input shard.")
        L.append(f"- `--threads 1` vs `--threads 2` on the 64 KB model: all {load['files_compared']} output files "
                 f"byte-identical: {'yes' if load['deterministic'] else '**NO**'} (provenance carries no timestamps).")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "reliability.md")
    ap.add_argument("--quick", action="store_true", help="5 kill trials; skip fuzz and load runs")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="deltaport-reliability-"))
    try:
        pristine = H.build_pristine(work / "pristine")
        outcomes, skipped = run_catalogue(work, pristine, H.subprocess_runner, log)
        sig = signal_cases(work, log)
        disk = disk_full_cases(work, pristine, log)
        from test_kill import kill_trials

        (work / "kills").mkdir()
        kills = kill_trials(work / "kills", n_trials=5 if args.quick else args.trials)
        log(f"kills: {sum(1 for r in kills['records'] if r['output'] != 'CORRUPT')} valid")
        fuzz = None if args.quick else fuzz_summary(log)
        cli_fuzz = None if args.quick else cli_fuzz_summary(log)
        load = None if args.quick else load_and_determinism(work, log)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(args.output, outcomes, skipped, disk, sig, kills, fuzz, load, args, started,
                       time.perf_counter() - t0, cli_fuzz)
        log(f"wrote {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
