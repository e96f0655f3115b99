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
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw each model's difference to the baseline per task, "
                                        "with its 95 % interval, to this PNG"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="result cache (default ~/.cache/deltaport/eval)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the result cache"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing -o / --table / --plot files and "
                                   "the lm-eval folder beside -o"),
    quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
) -> None:
    """Evaluate models with lm-evaluation-harness (the paper's protocol) and compare them."""
    from deltaport.errors import OutputError
    from deltaport.evaluation import compare, comparison_table, comparisons_table, evaluate, plot_comparisons
    from deltaport.evaluation.items import lm_eval_dir_for, write_lm_eval_dir
    from deltaport.io.atomic import write_json

    lm_dir = lm_eval_dir_for(output)
    named = [(n, p) for n, p in (("-o", output), ("--table", table), ("--plot", plot)) if p is not None]
    for i, (n1, p1) in enumerate(named):
        for n2, p2 in named[i + 1:]:
            if p1.resolve() == p2.resolve():
                what = {"--table": "the table", "--plot": "the figure"}[n2]
                replaced = "the JSON results" if n1 == "-o" else "the table"
                raise OutputError(f"{n1} and {n2} both name {p1}; {what} would replace {replaced}. Give "
                                  f"{what} its own path (e.g. results.{'md' if n2 == '--table' else 'png'})")
    for _, p in named:  # refuse before any model is evaluated
        if p.exists() and not overwrite:
            raise OutputError(f"output {p} already exists; pass --overwrite to replace it or choose another path")
        if p.is_dir():
            raise OutputError(f"output {p} is a directory; -o, --table and --plot name files")
    if lm_dir.exists() and not overwrite:
        raise OutputError(f"{lm_dir} (lm-eval's results files beside -o) already exists; pass --overwrite to replace "
                          "it or choose another -o")
    if plot is not None:
        _check_plot_format(plot)
    if len(models) < 2 and plot is not None:
        raise typer.BadParameter("--plot draws the comparison between models; give two or more MODELs.")

    margs = {}  # the flags below are strings; the function takes a dict, a number and a list
    for kv in (options["model_args"] or "").split(","):
        if kv.strip():
            k, sep, v = kv.partition("=")
            if not sep:
                raise typer.BadParameter(f"--model-args expects k=v pairs, got {kv!r}")
            margs[k.strip()] = _coerce(v.strip())
    languages = options["languages"]
    from deltaport.evaluation.harness import parse_gen_kwargs

    options.update(gen_kwargs=parse_gen_kwargs(options["gen_kwargs"]), model_args=margs, limit=_limit(options["limit"]), batch_size=_batch_size(str(options["batch_size"])),
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
    comparisons = compare(res, baseline, seed=options["seed"], list_items=options["log_samples"])
    files = write_lm_eval_dir(lm_dir, res, log_samples=options["log_samples"], overwrite=overwrite)
    for key in ("items", "samples", "lm_eval"):  # in their own files (the per-item values: the samples files)
        res.pop(key, None)
    res["comparisons"] = comparisons
    res["files"] = {"lm_eval": str(lm_dir), "written": [str(lm_dir / f) for f in files]}
    write_json(output, res, overwrite=overwrite)
    if table is not None:
        from deltaport.io.atomic import atomic_write_file

        atomic_write_file(table, lambda tmp: tmp.write_text(md), overwrite=overwrite)
    if plot is not None and comparisons:
        plot_comparisons(comparisons, plot, overwrite=overwrite)
    typer.echo(md, nl=False)
    if comparisons:
        typer.echo("\n" + comparisons_table(comparisons), nl=False)
    cached = sum(d.get("cached", False) for r in res["details"].values() for d in r.values())
    total = sum(len(r) for r in res["details"].values())
    extra = [str(x) for x in (table, plot if comparisons else None) if x is not None]
    typer.echo(f"wrote {output}" + "".join(f" and {x}" for x in extra) + f", lm-eval files in {lm_dir}"
               + (" (with per-item samples)" if options["log_samples"] else "")
               + f" ({cached}/{total} results from cache)")
    if plot is not None and not comparisons:
        typer.echo(f"no comparison to plot (no metric is a mean over items); {plot} not written", err=True)


def _check_plot_format(plot: Path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    from deltaport.errors import InputError

    fmt = plot.suffix.lstrip(".").lower() or "png"
    kinds = FigureCanvasBase.get_supported_filetypes()
    if fmt not in kinds:
        raise InputError(f"--plot {plot}: matplotlib cannot write .{fmt} files; use one of "
                         f"{', '.join('.' + k for k in sorted(kinds))}")


def _coerce(v: str):
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
