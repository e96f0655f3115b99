"""``deltaport diff | apply | transfer | inspect``: parse options, call one library function, print a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from deltaport.cli.flags import PROGRESS, QUIET, progress_mode, with_options
from deltaport.options import ApplyOptions, CompressOptions, DiffOptions, InspectOptions, TransferOptions

Opt = typer.Option

# options of the library functions are declared in deltaport.options; these are the command line's own
_JSON = Opt(False, "--json", help="print the result as JSON on stdout")


_KIND_WORDS = {"delta": "with Δ", "copy": "copied unchanged"}


def _summary(res, as_json: bool, dry_run: bool) -> None:
    if dry_run:
        fetch = res.fetch.record() if res.fetch is not None else None
        if as_json:
            print(json.dumps({"plan": res.plan.summary(), "skipped": res.plan.skipped, "warnings": res.plan.warnings,
                              "fetch": fetch}, indent=2))
        else:
            print(res.plan.describe())
            if res.fetch is not None:
                print(res.fetch.describe())
        return
    if as_json:
        print(json.dumps({"output": str(res.output), "summary": res.plan.summary(), "skipped": res.plan.skipped,
                          "timings": res.timings}, indent=2))
        return
    s = res.plan.summary()
    err = sys.stderr
    rest = "".join(f", {n} {_KIND_WORDS.get(k, k)}" for k, n in sorted(s["by_kind"].items()) if k != "delta")
    err.write(f"wrote {res.output}: {s['coverage']}{rest}, {s['output_bytes'] / 1e6:.1f} MB, "
              f"computed in {s['compute_dtype']}, {res.timings.get('total', 0):.2f} s\n")
    if res.fetch is not None and res.fetch.downloads:
        err.write(f"  downloaded {res.fetch.download_bytes / 1e6:.1f} MB from the hub\n")
    for sk in res.plan.skipped:
        err.write(f"  skipped {sk['name']}: {sk['reason']}\n")
    for w in res.plan.warnings:
        err.write(f"  warning: {w}\n")
    if res.stats and res.stats.nonfinite_inputs:
        names = res.stats.nonfinite_inputs
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        err.write(f"  warning: NaN/Inf in inputs of {len(names)} tensor(s): {', '.join(names[:5])}{more}\n")


def register(app: typer.Typer) -> None:
    @app.command("transfer")
    @with_options(TransferOptions)
    def transfer_cmd(
        source_base: Optional[str] = Opt(None, "--source-base", metavar="MODEL", help="m_s: the source base model (dir or hub id); defaults to a LoRA adapter's base_model_name_or_path"),
        source_finetuned: str = Opt(..., "--source-finetuned", metavar="MODEL", help="m'_s: the source fine-tuned model (or a PEFT LoRA adapter dir)"),
        target_base: str = Opt(..., "--target-base", metavar="MODEL", help="m_t: the new base model"),
        output: Path = Opt(..., "-o", "--output", help="output model directory"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, as_json: bool = _JSON, **options,
    ):
        """Fine-tuning transfer in one pass: OUT = target_base + λ·(source_finetuned − source_base)."""
        from deltaport.api import transfer

        res = transfer(source_base, source_finetuned, target_base, output, **options,
                       progress=progress_mode(quiet or as_json, progress))
        _summary(res, as_json, options["dry_run"])

    @app.command("diff")
    @with_options(DiffOptions)
    def diff_cmd(
        base: Optional[str] = Opt(None, "--base", metavar="MODEL", help="the base model (dir or hub id); defaults to a LoRA adapter's base_model_name_or_path"),
        finetuned: str = Opt(..., "--finetuned", metavar="MODEL", help="the fine-tuned model (or a PEFT LoRA adapter dir)"),
        output: Path = Opt(..., "-o", "--output", help="output delta directory"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, as_json: bool = _JSON, **options,
    ):
        """Store Δ = finetuned − base as a delta directory."""
        from deltaport.api import diff

        res = diff(base, finetuned, output, **options, progress=progress_mode(quiet or as_json, progress))
        _summary(res, as_json, options["dry_run"])

    @app.command("apply")
    @with_options(ApplyOptions)
    def apply_cmd(
        delta: list[str] = typer.Argument(..., help="delta directory made by `deltaport diff` or `deltaport compress`; several: OUT = to + Σ λ_i·Δ_i"),
        to: str = Opt(..., "--to", metavar="MODEL", help="the target base model"),
        output: Path = Opt(..., "-o", "--output", help="output model directory"),
        quiet: bool = QUIET, progress: Optional[bool] = PROGRESS, as_json: bool = _JSON, **options,
    ):
        """Apply a stored delta: OUT = to + λ·Δ; several deltas: OUT = to + Σ λ_i·Δ_i, rounded once from the exact sum."""
        from deltaport.api import apply

        res = apply(delta, to, output, **options, progress=progress_mode(quiet or as_json, progress))
        _summary(res, as_json, options["dry_run"])

    @app.command("compress")
    @with_options(CompressOptions)
    def compress_cmd(
        delta: str = typer.Argument(..., help="delta directory made by `deltaport diff`"),
        output: Path = Opt(..., "-o", "--output", help="output (compressed) delta directory"),
        quiet: bool = QUIET, as_json: bool = _JSON,
        peft: Optional[Path] = Opt(None, "--peft", help="lowrank: also write the low-rank matrices as a PEFT LoRA adapter directory (scaling 1; tensors kept exact are not in it)"),
        **options,
    ):
        """Compress a delta: low rank, sparse or sign, one tensor at a time (1-D tensors stay exact; vocabulary tensors too, except with lowrank)."""
        from deltaport.preflight import compress_options

        compress_options(options["method"], options.get("rank"), options.get("density"), options.get("seed", 0),
                         options.get("shard_size", "5GB"))  # refused before torch is imported
        if peft is not None and options["method"] != "lowrank":
            from deltaport.errors import InputError

            raise InputError("--peft exports low-rank factors; use it with --method lowrank")
        from deltaport.compression import compress

        comp = compress(delta, output, **options)
        if peft is not None:
            from deltaport.compression import export_peft

            rec = export_peft(output, peft, overwrite=options["overwrite"])
            sys.stderr.write(f"wrote PEFT adapter {peft}: r={rec['rank']}, {len(rec['tensors'])} matrices; "
                             f"{len(rec['not_in_adapter'])} tensors kept exact are not in it\n")
        tot = comp["totals"]
        if as_json:
            print(json.dumps({"output": str(output), "compression": {k: v for k, v in comp.items() if k != "tensors"}}, indent=2))
            return
        if quiet:
            return
        errs = [r["rel_frobenius_error"] for r in comp["tensors"].values() if r["method"] != "exact" and r["rel_frobenius_error"] is not None]
        params = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}" for k, v in comp["params"].items())
        sys.stderr.write(f"wrote {output}: {comp['method']}{params}, {tot['compressed_tensors']} tensors compressed, "
                         f"{tot['bytes_after'] / 1e6:.2f} MB of {tot['bytes_before'] / 1e6:.2f} MB ({tot['ratio']:.3f}; compressed "
                         f"tensors {tot['compressed_ratio']:.3f}), relative Frobenius error mean {sum(errs) / max(len(errs), 1):.3g}, "
                         f"max {max(errs, default=0):.3g}\n")
        from deltaport.plan import is_vocab_tensor

        vocab = {n: r for n, r in comp["tensors"].items() if is_vocab_tensor(n)}
        if vocab:
            exact = [n for n, r in vocab.items() if r["method"] == "exact"]
            if exact:  # say why, and what naming them would do
                sys.stderr.write(f"vocabulary tensors kept exact ({', '.join(sorted(exact))}): "
                                 f"{sum(vocab[n]['bytes_after'] for n in exact) / max(tot['bytes_after'], 1):.0%} of the output's "
                                 f"bytes; {vocab[exact[0]]['reason'].split(': ', 1)[-1]}\n")
            else:
                sys.stderr.write(f"vocabulary tensors compressed too ({', '.join(sorted(vocab))}): named by --include "
                                 "(the lab frontier keeps them exact: docs/compression.md)\n")

    @app.command("inspect")
    @with_options(InspectOptions, before="tensors")
    def inspect_cmd(
        path: str = typer.Argument(..., help="model or delta directory, or hub id"),
        as_json: bool = _JSON,
        tensors: bool = Opt(False, "--tensors", help="list every tensor (always included with --json)"),
        quiet: bool = QUIET, **options,
    ):
        """Show a model or delta: tensors, dtypes, sizes, config, provenance (headers only)."""
        from deltaport.inspect import inspect

        info = inspect(path, **options, tensors=True)
        if as_json:
            print(json.dumps(info, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        con = Console()
        kind = {"safetensors": "model", "pickle": "model (pickled weights)", "lora": "PEFT LoRA adapter",
                "delta": "deltaport Δ"}.get(info["kind"], info["kind"])
        rev = f" at commit {info['revision']}" if info["revision"] else ""
        con.print(f"[bold]{info['source']}[/bold]: {kind}{rev}")
        con.print(f"{info['num_tensors']} tensors, {info['num_parameters']:,} parameters, {info['total_bytes'] / 1e6:.1f} MB in "
                  f"{len(info['files'])} file(s); structure {info['structure_signature'][:16]}")
        for dt, v in info["dtypes"].items():
            con.print(f"  {dt}: {v['tensors']} tensors, {v['bytes'] / 1e6:.1f} MB")
        if info["config"]:
            con.print("config: " + ", ".join(f"{k} {_words(v)}" for k, v in info["config"].items()))
        if info["provenance"]:
            p = info["provenance"]
            scale = f", λ = {p['scale']:g}" if isinstance(p.get("scale"), (int, float)) else ""
            con.print(f"provenance: {p.get('operation')} ({p.get('formula')}), deltaport {p.get('deltaport_version')}"
                      f"{scale}, {len(p.get('skipped') or [])} tensor(s) skipped")
            for role, rec in (p.get("inputs") or {}).items():
                rev = f" at commit {rec['revision']}" if rec.get("revision") else ""
                con.print(f"  {role.replace('_', ' ')}: {rec.get('source')}{rev}")
            comp = p.get("compression")
            if isinstance(comp, dict):
                tot = comp.get("totals") or {}
                params = "".join(f", {k} {v}" for k, v in (comp.get("params") or {}).items())
                con.print(f"compressed delta (format {comp.get('format')} v{comp.get('version')}): {comp.get('method')}"
                          f"{params}, seed {comp.get('seed')}, {tot.get('compressed_tensors')} tensors compressed, "
                          f"{tot.get('bytes_after', 0) / 1e6:.2f} MB of {tot.get('bytes_before', 0) / 1e6:.2f} MB exact")
        if tensors:
            t = Table("name", "dtype", "shape", "file")
            for row in info["tensors"]:
                t.add_row(row["name"], row["dtype"], str(row["shape"]), row["file"])
            con.print(t)


def _words(v) -> str:
    """A config value for people: lists joined, booleans and missing values as words."""
    if v is None:
        return "not set"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_words(x)}" for k, x in v.items())
    return str(v)
