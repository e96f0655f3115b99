"""``deltaport lab run`` and ``deltaport demo``: the paper's controlled study on a laptop CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from deltaport.cli._common import PROGRESS, QUIET, progress_mode

lab_app = typer.Typer(help="Reproduce the paper's controlled study on a tiny model family (CPU).",
                      no_args_is_help=True)


def _run(config: str, output: Path, resume: bool, progress: bool, threads: int | None) -> None:
    import dataclasses
    import logging
    import os

    # the lab's own rich bars replace the per-call tqdm bars and lm-eval's per-call chatter
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from deltaport.lab.config import load_config
    from deltaport.lab.run import run_lab

    cfg = load_config(config)
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
    results = run_lab(cfg, output, progress=progress, resume=resume)
    typer.echo(f"report: {output / 'report.md'}")
    for c in results["claims"]:
        mark = "yes" if c["reproduced"] else "no "
        typer.echo(f"  [{mark}] {c['claim']}: {c['ours']}")
    typer.echo(f"total {results['timings_s']['total']:.0f} s")


@lab_app.command("run")
def lab_run(
    config: str = typer.Argument(..., help="lab config YAML, or a preset name: ci, quick, full"),
    output: Path = typer.Option(..., "-o", "--output", help="run directory (artifacts are cached there)"),
    resume: bool = typer.Option(False, "--resume", help="reuse a run directory made by another config"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: the config's, 1)"),
) -> None:
    """Build the model family and run the config's experiments; writes report.md, figures, results.json."""
    _run(config, output, resume, progress_mode(quiet, progress), threads)


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")

    @app.command("demo")
    def demo(
        output: Path = typer.Option(Path("deltaport-demo"), "-o", "--output", help="run directory"),
        preset: Literal["quick", "full", "ci"] = typer.Option("quick", "--preset", help="quick (~5 min), full (~45 min) or ci (~1 min)"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default 1)"),
    ) -> None:
        """Run the shipped lab preset: what fine-tuning transfer does and when it fails, on a laptop CPU."""
        _run(preset, output, True, progress_mode(quiet, progress), threads)
