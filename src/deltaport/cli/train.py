"""``deltaport finetune`` and ``deltaport evolve``: thin shells over :mod:`deltaport.finetune` / :mod:`deltaport.evolve`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from deltaport.cli._common import PROGRESS, QUIET, progress_mode


def finetune_command(
    model: str = typer.Option(..., "--model", help="initial model: directory or hub id (e.g. a transfer output)"),
    data: str = typer.Option(..., "--data", help="jsonl of {messages} or {prompt, completion}, or org/dataset[:split]"),
    output: Path = typer.Option(..., "-o", "--output", help="output model directory"),
    recipe: Literal["quick", "paper"] = typer.Option("quick", "--recipe", help="paper: lr 5e-6, linear, 3% warm-up, batch 8, 30K steps; quick: lr 1e-4, 100 steps"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (default: the recipe's)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default: the recipe's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="effective batch (micro × accumulation × GPUs)"),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="per-device batch"),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="truncate examples to this many tokens"),
    lora: bool = typer.Option(False, "--lora", help="train a PEFT LoRA adapter (merged into the saved model)"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="checkpoint every N steps (checkpoints/step-N)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="evaluate --eval-tasks every N steps"),
    eval_tasks: Optional[str] = typer.Option(None, "--eval-tasks", help="comma-separated lm-eval tasks or task YAMLs"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="documents per task for --eval-every"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="'tulu' or a file with a Jinja template"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output (swapped in when complete)"),
    resume: bool = typer.Option(False, "--resume", help="save the trainer state every --save-every steps (in "
                                ".OUT.deltaport-work) and continue from it if a previous run was killed"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
) -> None:
    """Fine-tune a model (transfer-then-finetune), loss on assistant tokens only."""
    from deltaport.finetune import finetune

    tmpl = chat_template
    if tmpl and tmpl != "tulu":
        p = Path(tmpl)
        if not p.is_file():
            raise typer.BadParameter(f"--chat-template: {tmpl} is neither 'tulu' nor a template file")
        tmpl = p.read_text()
    tasks = [t.strip() for t in eval_tasks.split(",") if t.strip()] if eval_tasks else None
    r = finetune(model, data, output, recipe=recipe, steps=steps, lr=lr, batch_size=batch_size, lora=lora,
                 eval_every=eval_every, eval_tasks=tasks, eval_limit=eval_limit, seed=seed, overwrite=overwrite,
                 progress=progress_mode(quiet, progress), max_seq_length=max_seq_length, save_every=save_every,
                 micro_batch_size=micro_batch_size, device=device, lora_r=lora_r, lora_alpha=lora_alpha,
                 chat_template=tmpl, resume=resume)
    first, last = (r.log[0], r.log[-1]) if r.log else ({}, {})
    parts = [f"{last.get('step') or 0} steps"]
    if isinstance(first.get("loss"), float) and isinstance(last.get("loss"), float):
        parts.append(f"loss {first['loss']:.4f} -> {last['loss']:.4f}")
    parts.append(f"{int(last.get('tokens') or 0)} tokens")
    if isinstance(r.provenance.get("time_s"), (int, float)):
        parts.append(f"{r.provenance['time_s']:.1f} s")
    typer.echo(f"wrote {r.output if r.output is not None else 'nothing (no output directory)'}: {', '.join(parts)}")


def evolve_command(
    chain: Path = typer.Argument(..., help="CHAIN.yaml: versions, data, finetune, eval, strategies"),
    output: Path = typer.Option(..., "-o", "--output", help="run directory"),
    resume: bool = typer.Option(False, "--resume", help="continue a run in this directory; never redo a finished step"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS,
) -> None:
    """Iterative recycling-then-finetuning (Algorithm 1) with direct / plain / transfer-only baselines."""
    from deltaport.evolve import run_chain

    res = run_chain(chain, output, resume=resume, progress=progress_mode(quiet, progress))
    typer.echo(res["table"], nl=False)
    typer.echo(f"{len(res['computed'])} step(s) computed in this call; results in {output}/results.json, "
               f"table.md, {', '.join(Path(p).name for p in res['curves'].values()) or 'no curves'}")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("evolve")(evolve_command)
