"""deltaport's public model-writing verbs: :func:`transfer` (m_t + λ·(m'_s − m_s), one shot), :func:`diff`
(Δ to disk) and :func:`apply` (m_t + λ·Δ from disk; several deltas: m_t + Σ λ_i·Δ_i). Each one: open
headers -> plan (every check, :mod:`deltaport.plan`) -> check the output and fetch only the planned files
-> :func:`_publish`: write into a temporary sibling (config/tokenizer first, then streamed shards,
:mod:`deltaport.engine`) -> verify -> provenance and card -> rename. The path of one transfer, file by
file: docs/architecture.md. Over ~500 lines because it holds four verbs (transfer, diff, apply, the composed
apply); each is a short sequence over the shared steps here (``_check_then_fetch``, ``_publish``,
``_model_files``, ``_write_card``), and what differs between them is their inputs and provenance.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deltaport
from deltaport.assets import SOURCES, check_config_against_plan, output_config, write_model_files
from deltaport.errors import CheckpointError, DeltaportError, InputError, OutputError, PlanError
from deltaport.io.atomic import atomic_output_dir, check_output_location, output_lock, write_json
from deltaport.io.checkpoint import PROVENANCE_NAME, Checkpoint, open_checkpoint
from deltaport.io.tensors import dtype_name
from deltaport.io.prepare import Fetch, check_free_space, plan_fetch, run_fetch
from deltaport.io.writer import OutEntry, ShardedWriter, parse_size
from deltaport.options import APPLY, DIFF, TRANSFER, ApplyOptions, DiffOptions, TransferOptions, declared, flag, option_fields
from deltaport.plan import Plan, is_vocab_tensor, make_policies, plan_apply, plan_diff, plan_transfer

if TYPE_CHECKING:  # the engine (and torch) are imported to execute a plan, not to make or refuse one
    from deltaport.engine import Stats

LOG = logging.getLogger(__name__)

@dataclass
class Result:
    """What an operation did: the output path (None for a dry run), its plan, provenance and timings."""

    output: Path | None
    plan: Plan
    provenance: dict[str, Any] = field(default_factory=dict)
    stats: Stats | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fetch: Fetch | None = None  # what the run downloads (hub inputs) and writes


def _input_record(ck: Checkpoint) -> dict[str, Any]:
    rec = {"source": ck.source, "path": str(ck.dir.absolute()), "revision": ck.revision, "kind": ck.kind,
           "fingerprint": ck.header_fingerprint()}
    if ck.hub is not None:
        rec["hub"] = {"repo_id": ck.hub.repo_id, "requested_revision": ck.hub.requested, "commit": ck.hub.sha}
    return rec


def _before_writing(plan: Plan, output, *, overwrite: bool, inputs: list[Path], dry_run: bool,
                    file_sources: tuple = ()) -> Fetch:
    """After the plan (and the config check), before any weight byte is fetched or written: refuse an
    output that cannot be written and a run that does not fit on disk, then download the weight files
    the plan reads from hub inputs (only those, at the pinned commits). ``file_sources``: the folders
    config, tokenizer and chat template are copied from."""
    from deltaport.assets import CHAT_FILES, TOKENIZER_FILES

    names = ("config.json", "generation_config.json", *TOKENIZER_FILES, *CHAT_FILES)
    copied = sorted({Path(d) / n for d in file_sources if d is not None for n in names})
    fetch = plan_fetch(plan, copied)
    if dry_run:
        return fetch
    out = check_output_location(output, inputs)
    # a second writer is refused now, before the downloads and the work; _publish takes the lock again for the
    # write itself (not held in between, so a refusal or an error on the way can never leave it held)
    with output_lock(out):
        if out.exists() and not overwrite:
            raise OutputError(f"output {out} already exists; pass --overwrite to replace it (the new output is "
                              "completed first, then swapped in) or choose another path")
        check_free_space(fetch, out)
        run_fetch(fetch)
    return fetch


def _precheck_files(plan: Plan, tb: Checkpoint, *, config_src: Path, tok_src: Path, chat_src: Path,
                    out_dtype) -> dict:
    """The output's config.json, built in memory, checked against the planned tensors before any weight
    byte is fetched or written (a wrong config is found at plan time, also for hub inputs and dry
    runs). Returns the config-check record."""
    cfg, _ = output_config(config_src=config_src, chat_src=chat_src, vocab_rows=plan.vocab_rows, out_dtype=out_dtype)
    return _config_check(cfg, plan, config_src, tb)


def _token_rows(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Rows of an output's vocabulary matrices (input embedding; output head when untied), by name: a
    2-D tensor named like one, outside the numbered layers."""
    return {n: s[0] for n, s in shapes.items() if is_vocab_tensor(n) and len(s) == 2 and not re.search(r"\.\d+\.", n)}


_VOCAB_FIX = ("Take the tokenizer whose ids fit (--tokenizer-from target), or give the fine-tune's added tokens rows "
              "(--vocab-policy pad{})")


def _check_vocab(plan: Plan, tok_src: Path, finetuned_files: Path | None, *, fix: str) -> None:
    """After planning: every id of the output's tokenizer has a row in every vocabulary matrix of the plan,
    or :class:`~deltaport.errors.PlanError` (exit 2) before a byte is written; the fine-tune's tokens the
    output's tokenizer lacks are named in ``plan.warnings`` and in provenance (``output_tokenizer``)."""
    from deltaport.plan.vocab import check_tokenizer_fits

    record = check_tokenizer_fits(tok_src, _token_rows({op.name: tuple(op.shape) for op in plan.ops}),
                                  finetuned_dir=finetuned_files, fix=fix)
    plan.warnings.extend(record.pop("warnings"))
    plan.info["output_tokenizer"] = record


def _check_written_vocab(tmp: Path) -> None:
    """The same check on the written output (its tokenizer files and shard headers), before it is published."""
    from deltaport.plan.vocab import check_tokenizer_fits

    written = open_checkpoint(tmp)
    try:
        check_tokenizer_fits(tmp, _token_rows({n: tuple(t.shape) for n, t in written.tensors.items()}))
    except InputError as exc:
        raise PlanError(f"{exc} (found in the written output, which was not published)") from None


def _check_then_fetch(plan: Plan, tb: Checkpoint, output, *, out_dtype, inputs: list[Path], sources: tuple,
                      overwrite: bool, dry_run: bool, finetuned_files: Path | None = None,
                      vocab_fix: str = "") -> tuple[Any, dict, Fetch]:
    """The steps between a model-writing plan and its first byte: the output's tokenizer checked against
    its vocabulary rows (:func:`_check_vocab`; ``finetuned_files``: the folder of the fine-tune's tokenizer,
    whose dropped tokens are named), the output config checked against the planned tensors
    (:func:`_precheck_files`), then :func:`_before_writing` (output location, free space, hub downloads).
    Returns the uniform output dtype (``--out-dtype``), the config-check record and the fetch."""
    out_dt = _uniform_dtype(plan) if out_dtype else None
    config_src, tok_src, chat_src = sources
    _check_vocab(plan, tok_src, finetuned_files, fix=vocab_fix or _VOCAB_FIX.format(""))
    config_check = _precheck_files(plan, tb, config_src=config_src, tok_src=tok_src, chat_src=chat_src, out_dtype=out_dt)
    fetch = _before_writing(plan, output, overwrite=overwrite, inputs=inputs, dry_run=dry_run, file_sources=sources)
    return out_dt, config_check, fetch


def _policy_record(policies) -> dict[str, Any]:
    return {
        "vocab_policy": policies.vocab_policy, "shape_policy": policies.shape_policy, "unmatched_rows": policies.unmatched_rows,
        "key_map": {p.pattern: r for p, r in policies.key_map}, "include": [p.pattern for p in policies.include],
        "exclude": [p.pattern for p in policies.exclude], "scale_map": {p.pattern: s for p, s in policies.scale_map},
        "compute_dtype": policies.compute_dtype, "out_dtype": policies.out_dtype or "target's dtype per tensor",
    }


def _provenance(kind: str, operation: str, formula: str, inputs: dict, plan: Plan, policies, **fields) -> dict[str, Any]:
    """``deltaport.json``'s record of one output: what every operation records, plus its own ``fields``
    (written with sorted keys, so the order here is free)."""
    return {"deltaport_version": deltaport.__version__, "kind": kind, "operation": operation, "formula": formula,
            "inputs": inputs, "policies": _policy_record(policies), "compute_dtype": plan.compute_dtype_name,
            "skipped": plan.skipped, "warnings": plan.warnings, "summary": plan.summary(),
            **({"output_tokenizer": plan.info["output_tokenizer"]} if "output_tokenizer" in plan.info else {}), **fields}


def _choices(config_from: str, tokenizer_from: str, chat_template_from: str, **more) -> dict[str, str]:
    return {"config_from": config_from, "tokenizer_from": tokenizer_from, "chat_template_from": chat_template_from, **more}


def _write_provenance(out: Path, prov: dict[str, Any]) -> None:
    (out / PROVENANCE_NAME).write_text(json.dumps(prov, indent=2, sort_keys=True, default=str) + "\n")


def _write_timings(output: Path, timings: dict[str, float], stats: Stats | None, **more) -> None:
    """Timings live beside the output (``OUT.timings.json``) so the output itself is byte-identical on rerun."""
    rec = {"output": str(output), "seconds": timings, **more}
    if stats is not None:
        rec.update(bytes_read=stats.bytes_read, bytes_written=stats.bytes_written, tensors=stats.tensors)
    path = output.parent / f"{output.name}.timings.json"
    try:
        write_json(path, rec)
    except (OSError, DeltaportError) as exc:  # timings are a nicety; never fail a finished run over them
        LOG.warning("could not write timings to %s: %s", path, exc)


def _streamed_hashes(cks) -> tuple[dict, list]:
    """A :class:`~deltaport.io.checkpoint.StreamedHash` per local input directory whose content hash the card
    names (one per directory, also when it is two inputs): ``({file: hasher}, [(hasher, [checkpoints])])``."""
    from deltaport.io.checkpoint import StreamedHash

    by_dir: dict[Path, tuple] = {}
    for ck in cks:
        if ck.hub is not None or ck.in_memory or not Path(str(ck.source)).expanduser().is_dir():
            continue  # hub ids are named by commit; pickles are hashed from memory (card.input_ref)
        key = Path(ck.dir).resolve()
        if key not in by_dir:
            by_dir[key] = (StreamedHash(ck), [])
        by_dir[key][1].append(ck)
    files = {spec.file: h for h, group in by_dir.values() for ck in group for spec in ck.tensors.values()}
    return files, list(by_dir.values())


def _publish(plan: Plan, output: Path, *, inputs: list[Path], overwrite: bool, shard_size, progress: bool, threads,
             strict: bool, provenance: dict[str, Any], write_files, chunk_elems: int | None, label: str,
             fetch: Fetch | None, hash_inputs: tuple = ()) -> Result:
    """Write the output: into a temporary sibling, the streamed shards, then ``write_files(tmp)`` (config,
    tokenizer, card) and the provenance; then rename it into place and write the timings beside it.

    The card names each local input by its content hash, computed from the bytes the engine reads anyway
    (``hash_inputs``: the input checkpoints; :class:`~deltaport.io.checkpoint.StreamedHash`): the files are
    read again only where the engine did not read them in the hash's order."""
    from deltaport.engine import default_chunk_elems, execute

    if chunk_elems is None:
        chunk_elems = default_chunk_elems(plan)
    t0 = time.perf_counter()
    entries = [OutEntry(op.name, op.out_dtype_name, op.shape) for op in plan.ops]
    hashers, hashes = _streamed_hashes(hash_inputs)
    with output_lock(output), atomic_output_dir(output, overwrite=overwrite, inputs=inputs) as tmp:
        writer = ShardedWriter(tmp, entries, parse_size(shard_size), metadata={"producer": f"deltaport {deltaport.__version__}"})
        t1 = time.perf_counter()
        stats = execute(plan, writer, progress=progress, threads=threads, chunk_elems=chunk_elems, strict=strict, label=label,
                        hashers=hashers)
        weight_map = writer.finalize()
        th = time.perf_counter()
        for hasher, group in hashes:
            digest = hasher.finish()
            for ck in group:
                ck.content_sha256 = digest
        tf = time.perf_counter()
        files_record = write_files(tmp)
        t_files = time.perf_counter() - tf
        if plan.operation != "diff":  # a model: its tokenizer must fit its embedding (checked after planning too)
            _check_written_vocab(tmp)
        provenance.update(files=files_record, nonfinite_inputs=stats.nonfinite_inputs, arithmetic=stats.arithmetic_record())
        if plan.operation == "diff":
            if any(op.residual for op in plan.ops):
                from deltaport.io.residual import RECORD, write_residuals

                record = write_residuals(tmp, stats.residuals, {op.name: op.numel for op in plan.ops}, weight_map,
                                         sum(s["data_bytes"] for s in writer.shards))
                if record:  # recorded only where there is one: a delta without residuals keeps its bytes
                    provenance[RECORD] = record
            provenance["inexact_delta_elements"] = stats.inexact_delta
            if stats.inexact_delta:
                LOG.warning("the stored Δ does not reproduce the finetuned model exactly for %d element(s) in %d tensor(s) "
                            "(values that nearly cancel their base, or a LoRA product stored narrower than computed); "
                            "use the default --delta-dtype auto for an exact delta",
                            sum(stats.inexact_delta.values()), len(stats.inexact_delta))
        _write_provenance(tmp, provenance)
        t2 = time.perf_counter()
    timings = {"plan_and_files": t1 - t0 + t_files, "stream": t2 - t1 - t_files, "total": time.perf_counter() - t0,
               "content_hash_finish": tf - th}
    _write_timings(output, timings, stats, content_hash_reread_bytes=sum(h.reread for h, _ in hashes))
    return Result(output, plan, provenance, stats, timings, fetch)


def _model_files(tmp: Path, plan: Plan, sources: tuple[Path, Path, Path], out_dtype, config_check: dict) -> dict:
    """Config, tokenizer and chat template of an output model (from ``sources``), with the config's check."""
    config_src, tok_src, chat_src = sources
    rec = write_model_files(tmp, config_src=config_src, tokenizer_src=tok_src, chat_src=chat_src,
                            vocab_rows=plan.vocab_rows, out_dtype=out_dtype)
    rec["config_check"] = config_check
    return rec


def _write_card(tmp: Path, output: Path, operation: str, refs: dict, plan: Plan, prov: dict, argv: list[str],
                lineage: tuple[str, ...] = (), target: Checkpoint | None = None, files_rec: dict | None = None) -> None:
    """README.md: the output's model card (see :mod:`deltaport.card`)."""
    from deltaport import card

    card.write_card(tmp, card.model_card(
        operation=operation, refs=refs, plan=plan, policies=prov["policies"],
        scale=prov.get("scale"), choices=prov.get("choices"), files=files_rec, argv=argv,
        lineage=[refs[r]["hub"] for r in lineage if "hub" in refs[r]],
        license=card.target_license(target) if target is not None else None))


def _file_opt(v):
    """A --key-map/--scale-map value as the card's command shows it (a file by name)."""
    if v is None or isinstance(v, (str, Path)):
        return None if v is None else Path(v).name
    return "MAPPING.yaml"


def _card_options(cls, args: dict, **first) -> dict[str, tuple]:
    """The options the output card's command repeats, flag -> (value, default): ``first`` as given, then
    every option of ``cls`` that shapes the output (:attr:`deltaport.options.Option.card`), with its
    value from ``args`` (the function's arguments); a --key-map/--scale-map is named by file name."""
    out = {flag(k): v for k, v in first.items()}
    for f, opt in option_fields(cls):
        if opt.card and flag(f.name) not in out:
            v = args[f.name]
            out[flag(f.name)] = (_file_opt(v) if f.name in ("key_map", "scale_map") else v, opt.default)
    return out


def _resolve_src(choice: str, flag: str, target: Path, source_ft: Path | None) -> Path:
    if choice not in SOURCES:
        raise InputError(f"{flag} must be one of {', '.join(SOURCES)}, not {choice!r}")
    if choice == "target":
        return target
    if source_ft is None:
        raise InputError(f"{flag} source-finetuned is not available here")
    return source_ft


@declared(TransferOptions)
def transfer(source_base, source_finetuned, target_base, output, *, scale: float = TRANSFER.scale,
             vocab_policy: str = TRANSFER.vocab_policy, unmatched_rows: str = TRANSFER.unmatched_rows,
             shape_policy: str = TRANSFER.shape_policy, key_map=TRANSFER.key_map, include=TRANSFER.include,
             exclude=TRANSFER.exclude, scale_map=TRANSFER.scale_map, compute_dtype: str = TRANSFER.compute_dtype,
             out_dtype: str | None = TRANSFER.out_dtype, config_from: str = TRANSFER.config_from,
             tokenizer_from: str = TRANSFER.tokenizer_from, chat_template_from: str = TRANSFER.chat_template_from,
             shard_size: str | int = TRANSFER.shard_size, overwrite: bool = TRANSFER.overwrite,
             dry_run: bool = TRANSFER.dry_run, allow_pickle: bool = TRANSFER.allow_pickle,
             strict: bool = TRANSFER.strict, threads: int | None = TRANSFER.threads, progress: bool = False,
             chunk_elems: int | None = None) -> Result:
    """Fine-tuning transfer: write ``target_base + scale·(source_finetuned − source_base)`` to ``output``.

    Args:
        source_base, source_finetuned, target_base: local HF model dirs or hub ids (``org/name[@rev]``).
            ``source_finetuned`` may be a PEFT LoRA adapter dir (Δ = scaling·B@A); ``source_base`` may then
            be None (the adapter's ``base_model_name_or_path``).
        output: output directory (written to a temporary sibling, renamed when complete).
        progress: draw progress bars. chunk_elems: elements per streamed chunk (default: the engine's).

    A transfer in which no tensor would receive Δ is refused (:class:`~deltaport.errors.PlanError`).

    Returns:
        :class:`Result`. Raises :class:`~deltaport.errors.InputError` subclasses for bad input (before any
        tensor byte is read where possible) and :class:`~deltaport.errors.RuntimeFailure` subclasses.

    Example:
        >>> deltaport.transfer("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
        ...                    "meta-llama/Llama-3.1-8B", "llama3.1-plus-delta3.0")  # doctest: +SKIP
    """
    args = dict(locals())  # the arguments as given: the card's command repeats them
    parse_size(shard_size)  # a bad --shard-size is refused before any input is opened
    policies = make_policies(scale=scale, vocab_policy=vocab_policy, shape_policy=shape_policy, unmatched_rows=unmatched_rows,
                        key_map=key_map, include=include, exclude=exclude, scale_map=scale_map, compute_dtype=compute_dtype,
                        out_dtype=out_dtype)
    sf = open_checkpoint(source_finetuned, allow_pickle=allow_pickle, remote=True)
    sb = _open_base(source_base, sf, "--source-base", allow_pickle=allow_pickle)
    tb = open_checkpoint(target_base, allow_pickle=allow_pickle, require_config=True, remote=True)
    for who, ck in (("source base", sb), ("target base", tb)):
        if ck.kind in ("lora", "delta"):
            raise InputError(f"the {who} {ck.source} is a {ck.kind} directory, not a model; pass a full model")
    if sf.kind == "delta":
        raise InputError(f"{sf.source} is a deltaport delta; use `deltaport apply {sf.source} --to TARGET`")
    sf_files_dir = sf.dir
    if sf.kind == "lora" and not (sf.dir / "config.json").exists():
        sf_files_dir = sb.dir  # an adapter ships no config; its base's files stand in for it
    config_src = _resolve_src(config_from, "--config-from", tb.dir, sf_files_dir)
    tok_src = _resolve_src(tokenizer_from, "--tokenizer-from", tb.dir, sf.dir if sf.kind != "lora" else sf_files_dir)
    chat_src = _resolve_src(chat_template_from, "--chat-template-from", tb.dir, sf.dir)
    plan = plan_transfer(sb, sf, tb, policies, tokenizer_from=tokenizer_from)
    out_dt, config_check, fetch = _check_then_fetch(plan, tb, output, out_dtype=out_dtype, inputs=[sb.dir, sf.dir, tb.dir],
                                                    sources=(config_src, tok_src, chat_src), overwrite=overwrite,
                                                    dry_run=dry_run, finetuned_files=sf.dir,
                                                    vocab_fix=_VOCAB_FIX.format(", or --vocab-policy align with "
                                                                                "--tokenizer-from source-finetuned"))
    if dry_run:
        return Result(None, plan, fetch=fetch)
    output = Path(output)
    prov = _provenance("model", "transfer", "target_base + scale * (source_finetuned - source_base)",
                       {"source_base": _input_record(sb), "source_finetuned": _input_record(sf),
                        "target_base": _input_record(tb)}, plan, policies,
                       scale=policies.scale, choices=_choices(config_from, tokenizer_from, chat_template_from),
                       lora=plan.info.get("lora"))
    if "vocab_align" in plan.info:
        prov["vocab_align"] = plan.info["vocab_align"]

    def files(tmp: Path):
        from deltaport.card import command, command_arg as card_arg, input_ref

        rec = _model_files(tmp, plan, (config_src, tok_src, chat_src), out_dt, config_check)
        refs = {"target_base": input_ref(tb), "source_finetuned": input_ref(sf), "source_base": input_ref(sb)}
        argv = command("transfer", [("--source-base", card_arg(refs["source_base"])),
                                    ("--source-finetuned", card_arg(refs["source_finetuned"])),
                                    ("--target-base", card_arg(refs["target_base"])), ("-o", "OUTPUT")],
                       _card_options(TransferOptions, args))
        _write_card(tmp, output, "transfer", refs, plan, prov, argv, ("target_base", "source_finetuned"), tb, rec)
        return rec

    return _publish(plan, output, inputs=[sb.dir, sf.dir, tb.dir], overwrite=overwrite, shard_size=shard_size,
                    progress=progress, threads=threads, strict=strict, provenance=prov, write_files=files,
                    chunk_elems=chunk_elems, label="transfer", fetch=fetch, hash_inputs=(sb, sf, tb))


def _config_check(cfg: dict, plan: Plan, config_src: Path, tb: Checkpoint) -> dict:
    """Check the output's config.json against the output tensors (before any tensor byte is read).

    Skipped when it could only compare the target with itself: the config comes from the target with
    no shape-relevant change (no vocabulary resize), the output has exactly the target's tensor names
    and shapes, and the config's ``vocab_size`` matches every embedding matrix. The full check imports
    transformers and builds the model on the meta device (~2.3 s, ~165 MB, whatever the model size)."""
    shapes = {op.name: tuple(op.shape) for op in plan.ops}
    same = (Path(config_src) == Path(tb.dir) and plan.vocab_rows is None and set(shapes) == set(tb.tensors)
            and all(tuple(tb.tensors[n].shape) == s for n, s in shapes.items()))
    if same:
        vocab = cfg.get("vocab_size") if "vocab_size" in cfg else (cfg.get("text_config") or {}).get("vocab_size")
        rows = {s[0] for n, s in shapes.items() if is_vocab_tensor(n) and len(s) == 2}
        if vocab is None or rows <= {vocab}:
            return {"checked": False, "reason": "config from the target, output tensors and shapes equal the target's", "warnings": []}
    return {"checked": True, "warnings": check_config_against_plan(cfg, shapes)}


def _open_base(base, finetuned: Checkpoint, flag: str, *, allow_pickle: bool) -> Checkpoint:
    """The source base: given explicitly, or a LoRA adapter's ``base_model_name_or_path`` (a relative
    path there is relative to the current directory, as PEFT and transformers read it)."""
    if base is not None:
        return open_checkpoint(base, allow_pickle=allow_pickle, remote=True)
    named = (finetuned.lora or {}).get("base_model_name_or_path") if finetuned.kind == "lora" else None
    if not named:
        raise InputError(f"{flag} is required (only a PEFT LoRA adapter names its own base model)")
    try:
        return open_checkpoint(named, allow_pickle=allow_pickle, remote=True)
    except CheckpointError as exc:
        raise CheckpointError(f"the base model {named!r} named by base_model_name_or_path in "
                              f"{finetuned.source}/adapter_config.json cannot be opened: {exc}. Pass {flag} to "
                              "override it") from None


def _uniform_dtype(plan: Plan):
    dts = {op.out_dtype for op in plan.ops}
    return dts.pop() if len(dts) == 1 else None


@declared(DiffOptions)
def diff(base, finetuned, output, *, delta_dtype: str | None = DIFF.delta_dtype, vocab_policy: str = DIFF.vocab_policy,
         shape_policy: str = DIFF.shape_policy, key_map=DIFF.key_map, include=DIFF.include, exclude=DIFF.exclude,
         compute_dtype: str = DIFF.compute_dtype, shard_size: str | int = DIFF.shard_size,
         overwrite: bool = DIFF.overwrite, dry_run: bool = DIFF.dry_run, allow_pickle: bool = DIFF.allow_pickle,
         strict: bool = DIFF.strict, threads: int | None = DIFF.threads, progress: bool = False,
         chunk_elems: int | None = None) -> Result:
    """Store ``Δ = finetuned − base`` as a delta directory (safetensors + ``deltaport.json``).

    ``base`` and ``finetuned`` are local HF model dirs or hub ids; ``finetuned`` may be a PEFT LoRA adapter
    dir (``base`` may then be None: the adapter's ``base_model_name_or_path``). The default Δ is lossless:
    float32 for bf16/fp16 models (2× the size of the model), float64 for float32 models (2×), plus the
    exact residual (sparse, ``delta-residual.safetensors``) where they cannot hold f − b, so
    ``apply(diff(F, B), to=B) == F`` bit for bit (docs/FORMAT.md, "Δ dtype"). The finetuned model's config, tokenizer and chat template
    are kept in ``source_finetuned/`` so ``apply`` can offer the same ``*_from`` choices.
    """
    args = dict(locals())  # the arguments as given: the card's command repeats them
    parse_size(shard_size)  # a bad --shard-size is refused before any input is opened
    policies = make_policies(vocab_policy=vocab_policy, shape_policy=shape_policy, key_map=key_map, include=include,
                        exclude=exclude, compute_dtype=compute_dtype)
    sf = open_checkpoint(finetuned, allow_pickle=allow_pickle, remote=True)
    sb = _open_base(base, sf, "--base", allow_pickle=allow_pickle)
    if sb.kind in ("lora", "delta"):
        raise InputError(f"--base {sb.source} is a {sb.kind} directory, not a model")
    if sf.kind == "delta":
        raise InputError(f"--finetuned {sf.source} is already a deltaport delta")
    plan = plan_diff(sb, sf, policies, delta_dtype=delta_dtype)
    fetch = _before_writing(plan, output, overwrite=overwrite, inputs=[sb.dir, sf.dir], dry_run=dry_run,
                            file_sources=(sf.dir, sb.dir))
    if dry_run:
        return Result(None, plan, fetch=fetch)
    output = Path(output)
    base_tensors = {n: [dtype_name(s.dtype), list(s.shape)] for n, s in sb.tensors.items()}
    prov = _provenance("delta", "diff", "finetuned - base",
                       {"base": _input_record(sb), "finetuned": _input_record(sf)}, plan, policies,
                       base={"source": sb.source, "structure": sb.structure_signature(), "tensors": base_tensors,
                             "tied_word_embeddings": bool((sb.config or {}).get("tie_word_embeddings"))},
                       delta_dtype={"requested": delta_dtype or "auto (exact)",
                                    "chosen": sorted({dtype_name(op.out_dtype) for op in plan.ops})},
                       lora=plan.info.get("lora"))
    files_src = sf.dir if (sf.dir / "config.json").exists() else sb.dir

    def files(tmp: Path):
        from deltaport.card import command, command_arg as card_arg, input_ref

        sub = tmp / "source_finetuned"
        sub.mkdir()
        rec = write_model_files(sub, config_src=files_src, tokenizer_src=sf.dir if sf.kind != "lora" else files_src, chat_src=sf.dir)
        refs = {"base": input_ref(sb), "finetuned": input_ref(sf)}
        argv = command("diff", [("--base", card_arg(refs["base"])), ("--finetuned", card_arg(refs["finetuned"])),
                                ("-o", "OUTPUT")],
                       _card_options(DiffOptions, args))
        _write_card(tmp, output, "diff", refs, plan, prov, argv)
        return {"source_finetuned_files": rec}

    return _publish(plan, output, inputs=[sb.dir, sf.dir], overwrite=overwrite, shard_size=shard_size,
                    progress=progress, threads=threads, strict=strict, provenance=prov, write_files=files,
                    chunk_elems=chunk_elems, label="diff", fetch=fetch, hash_inputs=(sb, sf))


def _open_target(to, *, allow_pickle: bool) -> Checkpoint:
    """apply's ``--to``: a model (not a LoRA adapter or a delta), planned from headers (hub ids too)."""
    tb = open_checkpoint(to, allow_pickle=allow_pickle, require_config=True, remote=True)
    if tb.kind in ("lora", "delta"):
        raise InputError(f"--to {tb.source} is a {tb.kind} directory, not a model")
    return tb


def _delta_file_sources(dk: Checkpoint, tb: Checkpoint, config_from: str, tokenizer_from: str,
                        chat_template_from: str) -> tuple[Path, Path, Path]:
    """Where an apply's config, tokenizer and chat template come from: the target, or the fine-tune's
    files a delta carries in ``source_finetuned/`` (the chat template falls back to the target's)."""
    src_files = dk.dir / "source_finetuned"
    src_files = src_files if src_files.is_dir() else None
    return (_resolve_src(config_from, "--config-from", tb.dir, src_files),
            _resolve_src(tokenizer_from, "--tokenizer-from", tb.dir, src_files),
            _resolve_src(chat_template_from, "--chat-template-from", tb.dir, src_files or tb.dir))


@declared(ApplyOptions)
def apply(delta, to, output, *, scale: float | list[float] = APPLY.scale, vocab_policy: str = APPLY.vocab_policy,
          shape_policy: str = APPLY.shape_policy, key_map=APPLY.key_map, include=APPLY.include, exclude=APPLY.exclude,
          scale_map=APPLY.scale_map, compute_dtype: str = APPLY.compute_dtype, out_dtype: str | None = APPLY.out_dtype,
          config_from: str = APPLY.config_from, tokenizer_from: str = APPLY.tokenizer_from,
          chat_template_from: str = APPLY.chat_template_from, shard_size: str | int = APPLY.shard_size,
          overwrite: bool = APPLY.overwrite, dry_run: bool = APPLY.dry_run, force: bool = APPLY.force,
          allow_pickle: bool = APPLY.allow_pickle, strict: bool = APPLY.strict, threads: int | None = APPLY.threads,
          progress: bool = False, chunk_elems: int | None = None, ties: float | None = APPLY.ties) -> Result:
    """Write ``to + scale·Δ`` where Δ is a ``deltaport diff`` (or ``deltaport compress``) directory.

    ``delta`` may be a list of delta directories: ``to + Σ_i scale_i·Δ_i``, each element the output-dtype
    value nearest the exact sum. ``ties`` (several deltas): TIES-Merging's sign consensus (Yadav et al.
    2023): each λ_i·Δ_i is trimmed to its ``ties`` fraction of largest-magnitude entries per tensor, each
    element's sign is elected from the trimmed sum, and the entries that agree with it are averaged:
    ``to + mean_{i agrees}(λ_i·trim(Δ_i))``.

    The target must have the structure (tensor names, shapes, dtypes) of the base the delta was made
    on; ``force=True`` applies to matching tensors anyway and records that in provenance.
    """
    args = dict(locals())  # the arguments as given: the card's command repeats them
    parse_size(shard_size)  # a bad --shard-size is refused before any input is opened
    if isinstance(delta, (list, tuple)) and len(delta) > 1:
        return _apply_many(list(delta), to, output, scale=scale, vocab_policy=vocab_policy, shape_policy=shape_policy,
                           key_map=key_map, include=include, exclude=exclude, scale_map=scale_map,
                           compute_dtype=compute_dtype, out_dtype=out_dtype, config_from=config_from,
                           tokenizer_from=tokenizer_from, chat_template_from=chat_template_from, shard_size=shard_size,
                           overwrite=overwrite, dry_run=dry_run, force=force, allow_pickle=allow_pickle, strict=strict,
                           threads=threads, progress=progress, chunk_elems=chunk_elems, ties=ties)
    if ties is not None:
        raise InputError("--ties merges several deltas (TIES sign consensus); pass two or more delta directories")
    if isinstance(delta, (list, tuple)):
        if not delta:
            raise InputError("apply needs at least one delta directory")
        delta = delta[0]
    if isinstance(scale, (list, tuple)):
        if len(scale) > 1:
            raise InputError(f"{len(scale)} --scale values for one delta; pass one λ per delta")
        scale = scale[0] if scale else 1.0
    policies = make_policies(scale=scale, vocab_policy=vocab_policy, shape_policy=shape_policy, key_map=key_map,
                        include=include, exclude=exclude, scale_map=scale_map, compute_dtype=compute_dtype, out_dtype=out_dtype)
    dk = open_checkpoint(delta, remote=True)
    tb = _open_target(to, allow_pickle=allow_pickle)
    plan = plan_apply(dk, tb, policies, force=force)
    config_src, tok_src, chat_src = _delta_file_sources(dk, tb, config_from, tokenizer_from, chat_template_from)
    out_dt, config_check, fetch = _check_then_fetch(plan, tb, output, out_dtype=out_dtype, inputs=[dk.dir, tb.dir],
                                                    sources=(config_src, tok_src, chat_src), overwrite=overwrite,
                                                    dry_run=dry_run, finetuned_files=dk.dir / "source_finetuned")
    if dry_run:
        return Result(None, plan, fetch=fetch)
    output = Path(output)
    prov = _provenance("model", "apply", "target_base + scale * delta",
                       {"delta": _input_record(dk), "target_base": _input_record(tb)}, plan, policies,
                       delta_provenance={k: dk.provenance.get(k) for k in ("inputs", "delta_dtype", "policies")},
                       scale=policies.scale, choices=_choices(config_from, tokenizer_from, chat_template_from),
                       forced=plan.info.get("forced"))

    def files(tmp: Path):
        from deltaport.card import command, command_arg as card_arg, input_ref

        rec = _model_files(tmp, plan, (config_src, tok_src, chat_src), out_dt, config_check)
        refs = {"target_base": input_ref(tb), "delta": input_ref(dk)}
        made = (dk.provenance or {}).get("inputs", {}).get("finetuned") or {}
        lineage = ("target_base",)
        if (made.get("hub") or {}).get("repo_id"):  # the Δ was made from a hub fine-tune: it is part of the lineage
            refs["source_finetuned"] = {"hub": made["hub"]["repo_id"], "commit": made["hub"]["commit"]}
            lineage = ("target_base", "source_finetuned")
        argv = command("apply", [("", card_arg(refs["delta"])), ("--to", card_arg(refs["target_base"])), ("-o", "OUTPUT")],
                       _card_options(ApplyOptions, args, scale=(scale, APPLY.scale)))
        _write_card(tmp, output, "apply", refs, plan, prov, argv, lineage, tb, rec)
        return rec

    return _publish(plan, output, inputs=[dk.dir, tb.dir], overwrite=overwrite, shard_size=shard_size,
                    progress=progress, threads=threads, strict=strict, provenance=prov, write_files=files,
                    chunk_elems=chunk_elems, label="apply", fetch=fetch, hash_inputs=(dk, tb))


def _apply_many(deltas, to, output, *, scale, vocab_policy, shape_policy, key_map, include, exclude, scale_map,
                compute_dtype, out_dtype, config_from, tokenizer_from, chat_template_from, shard_size, overwrite,
                dry_run, force, allow_pickle, strict, threads, progress, chunk_elems, ties=None) -> Result:
    """``to + Σ_i λ_i·Δ_i`` (see :func:`apply`)."""
    args = dict(locals())  # the arguments as given: the card's command repeats them
    parse_size(shard_size)  # a bad --shard-size is refused before any input is opened
    from deltaport.plan import plan_apply_many

    if ties is not None and not (isinstance(ties, (int, float)) and 0.0 < ties <= 1.0):
        raise InputError(f"--ties must be the fraction of each delta's entries kept, in (0, 1], not {ties}")
    lams = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(deltas)
    if not lams:
        lams = [1.0] * len(deltas)
    if len(lams) != len(deltas):
        raise InputError(f"{len(deltas)} deltas but {len(lams)} --scale values; pass one --scale per delta, in the "
                         "order of the deltas (or none: λ = 1 for each)")
    base_policies = make_policies(vocab_policy=vocab_policy, shape_policy=shape_policy, key_map=key_map, include=include,
                             exclude=exclude, scale_map=scale_map, compute_dtype=compute_dtype, out_dtype=out_dtype)
    policies_per_delta = []
    for lam in lams:
        # λ_i × (the scale map's value where a pattern matches, else 1): the first match wins, as for one delta
        policies = make_policies(scale=lam, vocab_policy=vocab_policy, shape_policy=shape_policy, key_map=key_map,
                            include=include, exclude=exclude, compute_dtype=compute_dtype, out_dtype=out_dtype)
        policies.scale_map = [(p, float(lam) * m) for p, m in base_policies.scale_map]
        policies_per_delta.append(policies)
    dks = [open_checkpoint(d, remote=True) for d in deltas]
    seen: dict[Path, str] = {}
    for dk in dks:
        key = dk.dir.resolve()
        if key in seen:
            raise InputError(f"delta {dk.source} is given twice (also as {seen[key]}); pass it once with the summed λ")
        seen[key] = dk.source
    tb = _open_target(to, allow_pickle=allow_pickle)
    plan = plan_apply_many(dks, tb, policies_per_delta, force=force, ties=None if ties is None else float(ties))
    config_src, tok_src, chat_src = _delta_file_sources(dks[0], tb, config_from, tokenizer_from, chat_template_from)
    out_dt, config_check, fetch = _check_then_fetch(plan, tb, output, out_dtype=out_dtype, inputs=[dk.dir for dk in dks] + [tb.dir],
                                                    sources=(config_src, tok_src, chat_src), overwrite=overwrite,
                                                    dry_run=dry_run, finetuned_files=dks[0].dir / "source_finetuned")
    if dry_run:
        return Result(None, plan, fetch=fetch)
    output = Path(output)
    prov = _provenance("model", "apply",
                       ("target_base + sum_i scale_i * delta_i" if ties is None else
                        "target_base + TIES(scale_i * delta_i): trim to density, elect sign, disjoint mean"),
                       {**{f"delta_{i + 1}": _input_record(dk) for i, dk in enumerate(dks)},
                        "target_base": _input_record(tb)}, plan, base_policies,
                       ties=None if ties is None else {"density": float(ties), "paper": "Yadav et al. 2023, TIES-Merging"},
                       delta_provenance=[{k: dk.provenance.get(k) for k in ("inputs", "delta_dtype", "policies",
                                                                              "compression")} for dk in dks],
                       scale=lams, scale_rule="scale_i times the --scale-map value where a pattern matches (first "
                                              "match), else scale_i",
                       choices=_choices(config_from, tokenizer_from, chat_template_from,
                                        source_finetuned_files="from the first delta"),
                       forced=plan.info.get("forced"))

    def files(tmp: Path):
        from deltaport.card import command, command_arg as card_arg, input_ref

        rec = _model_files(tmp, plan, (config_src, tok_src, chat_src), out_dt, config_check)
        refs = {"target_base": input_ref(tb), **{f"delta_{i + 1}": input_ref(dk) for i, dk in enumerate(dks)}}
        argv = command("apply", [*(("", card_arg(refs[f"delta_{i + 1}"])) for i in range(len(dks))),
                                 ("--to", card_arg(refs["target_base"])), ("-o", "OUTPUT")],
                       _card_options(ApplyOptions, args, scale=(lams, [APPLY.scale] * len(dks)), ties=(ties, APPLY.ties)))
        _write_card(tmp, output, "compose", refs, plan, prov, argv, ("target_base",), tb, rec)
        return rec

    return _publish(plan, output, inputs=[dk.dir for dk in dks] + [tb.dir], overwrite=overwrite,
                    shard_size=shard_size, progress=progress, threads=threads, strict=strict, provenance=prov,
                    write_files=files, chunk_elems=chunk_elems, label="apply", fetch=fetch, hash_inputs=(*dks, tb))
