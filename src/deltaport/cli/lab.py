"""``deltaport lab run`` and ``deltaport demo``: the paper's controlled study on a laptop CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from deltaport.cli.flags import PROGRESS, QUIET, progress_mode
from deltaport.lab.config import PRESET_COST

#: shared by ``lab run`` and ``demo`` (declared once)
NOISE_TWIN = typer.Option(None, "--noise-twin/--no-noise-twin",
                          help="also run each seed's noise twin (same config and seed, torch threads 1 <-> 2 and every "
                               "initial weight one ULP up) into RUN_DIR/twin and report every claim's noise spread "
                               "(default: the preset's noise_twin; docs/lab.md)")

lab_app = typer.Typer(help="Reproduce the paper's controlled study on a tiny model family (CPU).",
                      no_args_is_help=True)


def _seeds(seed: int | None, seeds: str | None) -> list[int] | None:
    from deltaport.errors import InputError

    if seed is not None and seeds:
        raise InputError("give --seed or --seeds, not both")
    if seeds is not None and not seeds.strip(", "):
        raise InputError(f"--seeds {seeds!r} names no seed; give comma-separated integers like 0,1,2 (or leave it out)")
    if seeds:
        try:
            out = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--seeds: expected comma-separated integers like 0,1,2, got {seeds!r}") from None
        if len(out) < 2 or len(set(out)) != len(out):
            raise InputError(f"--seeds: need at least two different seeds, got {seeds!r}")
        return out
    return None


def _lab_progress(quiet: bool, progress: bool | None) -> bool | str:
    """Bars on a terminal (or with --progress); in a redirected log, status lines; nothing with --quiet."""
    bars = progress_mode(quiet, progress)
    return bars or (False if quiet or progress is False else "lines")


def _run(config: str, output: Path, resume: bool, progress: bool | str, threads: int | None, seed: int | None = None,
         seeds: str | None = None, noise_twin: bool | None = None) -> None:
    import dataclasses
    import logging
    import os

    # the lab's own rich bars replace the per-call tqdm bars and lm-eval's per-call chatter
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from deltaport.errors import InputError
    from deltaport.io.atomic import check_writable
    from deltaport.lab.config import load_config
    from deltaport.lab.run import run_lab

    cfg = load_config(config)
    many = _seeds(seed, seeds)
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: give a positive number of torch threads (default 1)")
    check_writable(output)  # an output folder that cannot be written is refused now, not after the family is built
    if many is None and seed is None and cfg.seeds:
        many = list(cfg.seeds)
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
    if noise_twin is not None:
        cfg = dataclasses.replace(cfg, noise_twin=noise_twin)
    if many:
        from deltaport.lab.multiseed import run_seeds

        summary = run_seeds(cfg, output, many, progress=progress, resume=resume)
        typer.echo(f"summary: {output / 'summary.md'} (seeds {', '.join(map(str, many))})")
        for f in summary["findings"]:
            typer.echo(f"  [{f['verdict']}] ({f['id']}) {f['claim']}: {f['ours']}")
        typer.echo(f"total {summary['timings_s']['total']:.0f} s")
        return
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    results = run_lab(cfg, output, progress=progress, resume=resume)
    typer.echo(f"report: {output / 'report.md'} (one seed: {cfg.seed}; intervals across seeds come from "
               "--seeds, e.g. the committed docs/results/full/summary.md)")
    cache = results.get("cache", {})
    earlier = {k: v for k, v in cache.items() if v and not k.startswith(("computed_", "repeated_"))}
    if earlier:  # a step asked for twice within this run (repeated_*) is not reuse from an earlier run
        typer.echo("reused from an earlier run in this directory: "
                   + ", ".join(f"{v} {k.replace('_', ' ')}" if k != "family" else "the family"
                               for k, v in earlier.items()))
    for c in results["claims"]:
        spread = c.get("noise_spread")
        twin = "" if c.get("twin_verdict") is None else (
            f" (noise twin: {c['twin_verdict']}, spread {'–' if spread is None else format(spread, '.3g')})")
        typer.echo(f"  [{c['reproduced']}] ({c['id']}) {c['claim']}: {c['ours']}{twin}")
    typer.echo(f"total {results['timings_s']['total']:.0f} s")


@lab_app.command("summarize")
def lab_summarize(
    output: Path = typer.Argument(..., help="run directory holding finished seed runs in OUTPUT/seed-N"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="the seeds to summarise, e.g. 0,1,2 (default: every "
                                        "OUTPUT/seed-N)"),
) -> None:
    """Write OUTPUT/summary.{md,json} from seed runs already finished (by one process or several), rerunning nothing."""
    from deltaport.lab.multiseed import summarize_dir

    summary = summarize_dir(output, _seeds(None, seeds))
    typer.echo(f"summary: {output / 'summary.md'} (seeds {', '.join(map(str, summary['seeds']))})")
    for f in summary["findings"]:
        typer.echo(f"  [{f['verdict']}] ({f['id']}) {f['claim']}: {f['ours']}")


@lab_app.command("run")
def lab_run(
    config: str = typer.Argument(..., help="lab config YAML, or a preset name: ci, quick, full"),
    output: Path = typer.Option(..., "-o", "--output", help="run directory (artifacts are cached there)"),
    resume: bool = typer.Option(False, "--resume", help="reuse a run directory made by another config"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: the config's, 1)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="one seed for world, family and fine-tunes (default: the config's)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="several seeds, e.g. 0,1,2: one run per seed in OUTPUT/seed-N "
                                        "and OUTPUT/summary.{md,json} with intervals across seeds"),
    noise_twin: Optional[bool] = NOISE_TWIN,
) -> None:
    """Build the model family and run the config's experiments; writes report.md, figures, results.json."""
    _run(config, output, resume, _lab_progress(quiet, progress), threads, seed, seeds, noise_twin)


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")

    @app.command("demo")
    def demo(
        output: Path = typer.Option(Path("deltaport-demo"), "-o", "--output", help="run directory"),
        preset: Literal["quick", "full", "ci"] = typer.Option("quick", "--preset", help="; ".join(f"{name}: {cost}" for name, cost in PRESET_COST.items())
                                                  + " (2-core CPU, 1 thread; docs/lab.md)"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default 1)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="one seed for world, family and fine-tunes (default: the "
                                           "preset's)"),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="several seeds, e.g. 0,1,2 (intervals across seeds)"),
        noise_twin: Optional[bool] = NOISE_TWIN,
    ) -> None:
        """Run the shipped lab preset: what fine-tuning transfer does and when it fails, on a laptop CPU."""
        _run(preset, output, True, _lab_progress(quiet, progress), threads, seed, seeds, noise_twin)
