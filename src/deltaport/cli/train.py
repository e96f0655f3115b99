"""``deltaport finetune`` and ``deltaport evolve``: thin shells over :mod:`deltaport.finetune` / :mod:`deltaport.evolve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltaport.cli.flags import PROGRESS, QUIET, progress_mode, with_options
from deltaport.options import EvolveOptions, FinetuneOptions


@with_options(FinetuneOptions)
def finetune_command(
    model: str = typer.Option(..., "--model", help="initial model: directory or hub id (e.g. a transfer output)"),
    data: str = typer.Option(..., "--data", help="jsonl of {messages} or {prompt, completion}, or org/dataset[:split]"),
    output: Path = typer.Option(..., "-o", "--output", help="output model directory"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
) -> None:
    """Fine-tune a model (transfer-then-finetune), loss on assistant tokens only."""
    from deltaport.finetune import finetune

    tmpl = options["chat_template"]
    if tmpl and tmpl != "tulu":  # the flag names a file; the function takes the template's text
        p = Path(tmpl)
        if not p.is_file():
            raise typer.BadParameter(f"--chat-template: {tmpl} is neither 'tulu' nor a template file")
        options["chat_template"] = p.read_text()
    tasks = options["eval_tasks"]  # the flag is comma-separated; the function takes a list
    options["eval_tasks"] = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    r = finetune(model, data, output, **options, progress=progress_mode(quiet, progress))
    if r.rank != 0:  # a multi-process launch: rank 0 wrote the output and says so, once
        return
    first, last = (r.log[0], r.log[-1]) if r.log else ({}, {})
    parts = [f"{last.get('step') or 0} steps"]
    if isinstance(first.get("loss"), float) and isinstance(last.get("loss"), float):
        parts.append(f"loss {first['loss']:.4f} -> {last['loss']:.4f}")
    parts.append(f"{int(last.get('tokens') or 0)} tokens")
    if isinstance(r.provenance.get("time_s"), (int, float)):
        parts.append(f"{r.provenance['time_s']:.1f} s")
    typer.echo(f"wrote {r.output if r.output is not None else 'nothing (no output directory)'}: {', '.join(parts)}")


@with_options(EvolveOptions)
def evolve_command(
    chain: Path = typer.Argument(..., help="CHAIN.yaml: versions, data, finetune, eval, strategies"),
    output: Path = typer.Option(..., "-o", "--output", help="run directory"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
) -> None:
    """Iterative recycling-then-finetuning (Algorithm 1) with direct / plain / transfer-only baselines."""
    from deltaport.evolve import run_chain

    res = run_chain(chain, output, **options, progress=progress_mode(quiet, progress))
    if res.get("rank", 0) != 0:  # a multi-process launch: rank 0 prints the results
        return
    typer.echo(res["table"], nl=False)
    typer.echo(f"{len(res['computed'])} step(s) computed in this call; results in {output}/results.json, "
               f"table.md, {', '.join(Path(p).name for p in res['curves'].values()) or 'no curves'}")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("evolve")(evolve_command)
