"""``deltaport connectivity | similarity | check``: thin shells over the diagnostics library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deltaport import preflight
from deltaport.cli.flags import PROGRESS, QUIET, progress_mode, with_options
from deltaport.options import CheckOptions, ConnectivityOptions, SimilarityOptions


def _setup(progress: bool) -> None:
    """Threads from OMP_NUM_THREADS; transformers' own loading bars only when progress is on."""
    import os

    import torch
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))


def _check_outputs(output: Path, plot: Optional[Path], overwrite: bool, inputs: list, data: Optional[Path] = None) -> None:
    """Refuse unusable report/plot paths before any model is loaded: inside an input, a directory,
    an existing file without --overwrite, the --data file itself (even with --overwrite: an input is never
    replaced), the same file twice, a plot format matplotlib cannot write."""
    from deltaport.errors import InputError, OutputError
    from deltaport.io.atomic import check_output_file, check_output_location, check_writable

    for p in (output, plot):
        if p is not None and data is not None and p.absolute().resolve() == Path(data).absolute().resolve():
            raise OutputError(f"{p} is the --data file; deltaport never writes over an input. Choose another "
                              "output path.")
    for p in (output, plot):
        if p is not None:
            check_output_location(p, inputs)
            check_output_file(p, overwrite=overwrite)
            check_writable(p)
    if plot is not None:
        if plot.absolute().resolve() == output.absolute().resolve():
            raise OutputError(f"--plot and -o both name {output}; choose two different files")
        from matplotlib.backend_bases import FigureCanvasBase

        fmt = plot.suffix.lstrip(".").lower() or "png"
        kinds = FigureCanvasBase.get_supported_filetypes()
        if fmt not in kinds:
            raise InputError(f"--plot {plot}: matplotlib cannot write .{fmt} files; use one of "
                             f"{', '.join('.' + k for k in sorted(kinds))}")


_OVERWRITE_HELP = "replace existing -o / --plot files (the new file is written in full first, then renamed into place)"


def register(app: typer.Typer) -> None:
    @app.command("connectivity")
    @with_options(ConnectivityOptions, before="overwrite")
    def connectivity_cmd(
        a: str = typer.Argument(..., help="first model (θ(0)): local HF directory or hub id"),
        b: str = typer.Argument(..., help="second model (θ(1)), same architecture as A"),
        data: Path = typer.Option(..., "--data", help="JSONL with one {\"text\": ...} per line"),
        output: Path = typer.Option(..., "-o", "--output", help="report JSON (written atomically)"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="draw the curve to this PNG"),
        overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
    ) -> None:
        """Loss along θ(α) = (1−α)·A + α·B and the loss barrier (read layer by layer: one layer of each model in memory)."""
        _check_outputs(output, plot, overwrite, [a, b], data)
        preflight.diagnostics([a, b], data, allow_pickle=options.get("allow_pickle", False), device=options.get("device"),
                              dtype=options.get("dtype"), points=options.get("points"), max_tokens=options.get("max_tokens"))
        progress = progress_mode(quiet, progress)
        _setup(progress)
        from deltaport.io.atomic import write_json
        from deltaport.connectivity import connectivity, plot_curve

        rep = connectivity(a, b, data, **options, progress=progress)
        write_json(output, rep, overwrite=overwrite, record=True)
        if plot:
            plot_curve(rep, plot, overwrite=overwrite)
        typer.echo(f"loss A {rep['loss_a']:.4f}  loss B {rep['loss_b']:.4f}  barrier {rep['barrier']:.4f} nats "
                   f"at α={rep['barrier_alpha']:.2f} ({rep['relative_barrier']:.1%} of mean endpoint loss); "
                   f"{rep['n_tokens']} tokens; report {output}" + (f", plot {plot}" if plot else ""))

    @app.command("similarity")
    @with_options(SimilarityOptions)
    def similarity_cmd(
        source_base: str = typer.Option(..., "--source-base", help="m_s: the base the fine-tune started from"),
        source_finetuned: str = typer.Option(..., "--source-finetuned", help="m'_s: the fine-tuned source"),
        target_base: str = typer.Option(..., "--target-base", help="m_t: the new base"),
        target_finetuned: Optional[str] = typer.Option(None, "--target-finetuned",
                                                       help="m'_t, if it exists: adds cos(Δ_s, Δ_t)"),
        output: Path = typer.Option(..., "-o", "--output", help="report JSON (written atomically)"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="per-layer heat map PNG"),
        overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
    ) -> None:
        """Per-tensor and per-layer ‖m_t − m_s‖/‖m_s‖, ‖Δ_s‖ and cos(Δ_s, Δ_t) (streamed)."""
        _check_outputs(output, plot, overwrite, [source_base, source_finetuned, target_base, target_finetuned])
        preflight.diagnostics([source_base, source_finetuned, target_base, target_finetuned], None,
                              allow_pickle=options.get("allow_pickle", False))
        progress = progress_mode(quiet, progress)
        _setup(progress)
        from deltaport.io.atomic import write_json
        from deltaport.similarity import plot_layers, similarity

        rep = similarity(source_base, source_finetuned, target_base, target_finetuned, **options, progress=progress)
        write_json(output, rep, overwrite=overwrite, record=True)
        if plot:
            plot_layers(rep, plot, overwrite=overwrite)
        t = rep["total"]
        cos = f"  cos(Δ_s, Δ_t) {t['cos']:.4f}" if t.get("cos") is not None else ""
        typer.echo(f"‖m_t − m_s‖/‖m_s‖ {t['rel_distance']:.4g}  ‖Δ_s‖ {t['delta_norm']:.4g} "
                   f"(‖Δ_s‖/‖m_s‖ {t['delta_rel']:.4g}){cos}; {len(rep['tensors'])} tensors"
                   + (f", {len(rep['skipped'])} skipped (shape differs)" if rep["skipped"] else "")
                   + f"; report {output}" + (f", plot {plot}" if plot else ""))

    @app.command("check")
    @with_options(CheckOptions, before="overwrite")
    def check_cmd(
        source_base: str = typer.Option(..., "--source-base", help="m_s: the base the fine-tune started from"),
        source_finetuned: str = typer.Option(..., "--source-finetuned", help="m'_s: the fine-tuned source"),
        target_base: str = typer.Option(..., "--target-base", help="m_t: the new base"),
        data: Path = typer.Option(..., "--data", help="JSONL of general text, one {\"text\": ...} per line"),
        output: Path = typer.Option(..., "-o", "--output", help="report JSON (written atomically)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing -o file (the new file is "
                                       "written in full first, then renamed into place)"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, **options,
    ) -> None:
        """Will m_t + Δ_s work? Cheap signals and a verdict: likely | uncertain | unlikely | uncalibrated."""
        _check_outputs(output, None, overwrite, [source_base, source_finetuned, target_base], data)
        preflight.diagnostics([source_base, source_finetuned, target_base], data,
                              allow_pickle=options.get("allow_pickle", False), device=options.get("device"),
                              max_tokens=options.get("max_tokens"))
        progress = progress_mode(quiet, progress)
        _setup(progress)
        from deltaport.io.atomic import write_json
        from deltaport.check import check

        rep = check(source_base, source_finetuned, target_base, data, **options, progress=progress)
        write_json(output, rep, overwrite=overwrite, record=True)
        s = rep["signals"]
        typer.echo(f"verdict: {rep['verdict']}\n{rep['reason']}\n"
                   f"relative barrier {s['relative_barrier']:.4f}  rel. distance {s['rel_distance']:.4f}  "
                   f"excess loss (rel.) {s['excess_loss_rel']:+.4f}; report {output}")
