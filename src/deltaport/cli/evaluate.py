"""``deltaport eval``: a thin shell over :func:`deltaport.evaluate`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from deltaport.cli.flags import PROGRESS, QUIET, progress_mode, with_options
from deltaport.options import EvaluateOptions


def default_cache_dir() -> Path:
    """``$DELTAPORT_CACHE/eval`` or ``$XDG_CACHE_HOME/deltaport/eval`` (``~/.cache/deltaport/eval``)."""
    root = os.environ.get("DELTAPORT_CACHE")
    if root:
        return Path(root) / "eval"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltaport" / "eval"


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--batch-size must be an integer or 'auto', got {value!r}") from None


def _limit(value: str | None) -> int | float | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise typer.BadParameter(f"--limit must be a number, got {value!r}") from None


@with_options(EvaluateOptions, before="baseline")
def eval_command(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="model directories or hub ids"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated lm-eval task names or task YAML paths"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="a MODEL to show differences against"),
    output: Path = typer.Option(..., "-o", "--output", help="results JSON"),
    table: Optional[Path] = typer.Option(None, "--table", help="also write the Markdown comparison table here"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="result cache (default ~/.cache/deltaport/eval)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the result cache"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing -o / --table files"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
) -> None:
    """Evaluate models with lm-evaluation-harness (the paper's protocol) and compare them."""
    from deltaport.errors import OutputError
    from deltaport.evaluation import comparison_table, evaluate
    from deltaport.io.atomic import write_json

    if table is not None and table.resolve() == output.resolve():
        raise OutputError(f"-o and --table both name {output}; the table would replace the JSON results. "
                          "Give the table its own path (e.g. results.md)")
    for p in (output, table):  # refuse before any model is evaluated
        if p is not None and p.exists() and not overwrite:
            raise OutputError(f"output {p} already exists; pass --overwrite to replace it or choose another path")
        if p is not None and p.is_dir():
            raise OutputError(f"output {p} is a directory; -o and --table name files")

    margs = {}  # the flags below are strings; the function takes a dict, a number and a list
    for kv in (options["model_args"] or "").split(","):
        if kv.strip():
            k, sep, v = kv.partition("=")
            if not sep:
                raise typer.BadParameter(f"--model-args expects k=v pairs, got {kv!r}")
            margs[k.strip()] = _coerce(v.strip())
    languages = options["languages"]
    options.update(model_args=margs, limit=_limit(options["limit"]), batch_size=_batch_size(str(options["batch_size"])),
                   languages=[x.strip() for x in languages.split(",")] if languages else None)
    res = evaluate(models, tasks, **options, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
                   progress=progress_mode(quiet, progress), status=not quiet)
    from deltaport.devices import process_rank

    if process_rank()[0] != 0:  # a multi-process launch: rank 0 holds the gathered scores and writes them
        return
    if baseline is not None and baseline not in res["results"]:
        rows = [r for r in res["results"] if r.startswith(f"{baseline} [")]
        baseline = rows[0] if rows else baseline
    md = comparison_table(res, baseline=baseline)
    res["table"] = md
    write_json(output, res, overwrite=overwrite)
    if table is not None:
        from deltaport.io.atomic import atomic_write_file

        atomic_write_file(table, lambda tmp: tmp.write_text(md), overwrite=overwrite)
    typer.echo(md, nl=False)
    cached = sum(d.get("cached", False) for r in res["details"].values() for d in r.values())
    total = sum(len(r) for r in res["details"].values())
    typer.echo(f"wrote {output}" + (f" and {table}" if table else "") + f" ({cached}/{total} results from cache)")


def _coerce(v: str):
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
