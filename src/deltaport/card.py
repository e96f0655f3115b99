"""The model card (``README.md``) of every output: hub metadata for lineage, and a short body saying
how the output was made and how to make it again.

Metadata (parsed by ``huggingface_hub.ModelCard``): ``base_model`` lists the target and the source
fine-tune when they are hub ids (local paths are never written; the field is left out when no input
is a hub id), ``base_model_relation: merge``, tags ``deltaport`` and ``fine-tuning-transfer``, and the
target's license when known. The body names every input as ``org/name@commit`` or as a local
directory's name plus its content hash (never an absolute path), λ and the policies, where config,
tokenizer and chat template came from, and the command that reproduces the output. Nothing in it
depends on the time or on where the files live, so a rerun writes the same bytes.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
TAGS = ["deltaport", "fine-tuning-transfer"]
_WHO = {"target": "target base", "source-finetuned": "source fine-tune"}
_ROLES = {"source_base": "source base (m_s)", "source_finetuned": "source fine-tune (m'_s)",
          "target_base": "target base (m_t)", "base": "base", "finetuned": "fine-tune", "delta": "Δ (deltaport diff)"}


def input_ref(ck) -> dict[str, Any]:
    """How a card names an input: ``{"hub": "org/name", "commit": sha}`` for a hub id, or
    ``{"local": dir name, "content_sha256": hash}`` for a local directory."""
    from deltaport.io import hub

    if ck.hub is not None:
        return {"hub": ck.hub.repo_id, "commit": ck.hub.sha}
    src = str(ck.source)
    if not Path(src).expanduser().is_dir() and hub.looks_like_hub_id(src):  # a hub id read from the offline cache
        return {"hub": src.partition("@")[0], "commit": ck.revision}
    from deltaport.io.checkpoint import content_hash

    digest = ck.content_sha256 or content_hash(ck.dir, allow_pickle=ck.in_memory)  # set when a run streamed it
    return {"local": Path(src).expanduser().absolute().name, "content_sha256": digest}


def describe_ref(ref: dict[str, Any]) -> str:
    if "hub" in ref:
        return f"[`{ref['hub']}`](https://huggingface.co/{ref['hub']}) at commit `{ref['commit']}`"
    return f"local directory `{ref['local']}` (content sha256 `{ref['content_sha256']}`)"


def command_arg(ref: dict[str, Any]) -> str:
    return f"{ref['hub']}@{ref['commit']}" if "hub" in ref and ref.get("commit") else ref.get("hub") or ref["local"]


def target_license(ck) -> str | None:
    """The target's license: from the hub, else from a model card in its directory."""
    if ck.hub is not None and ck.hub.license:
        return ck.hub.license
    readme = Path(ck.dir) / CARD_NAME
    if readme.is_file():
        try:
            from huggingface_hub import ModelCard

            lic = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict().get("license")
            return lic if isinstance(lic, str) else None
        except Exception:  # noqa: BLE001 - a broken card in an input is not our problem
            return None
    return None


def _policies(policies: dict[str, Any], scale: float | None, compute: str) -> list[str]:
    lines = []
    if scale is not None:
        lam = ", ".join(f"{s:g}" for s in scale) if isinstance(scale, (list, tuple)) else f"{scale:g}"
        lines.append(f"- λ (scale): {lam}" + (f"; per-tensor scales: {policies['scale_map']}" if policies.get("scale_map") else ""))
    lines.append(f"- vocabulary policy: {policies['vocab_policy']}; shape policy: {policies['shape_policy']}; "
                 f"compute dtype: {compute}; output dtype: {policies['out_dtype']}")
    for key, what in (("include", "only tensors matching"), ("exclude", "no Δ for tensors matching"), ("key_map", "key map")):
        if policies.get(key):
            lines.append(f"- {what}: {policies[key]}")
    return lines


def _counts(plan) -> str:
    delta = sum(1 for op in plan.ops if op.kind == "delta")
    s = f"{delta} of {len(plan.ops)} tensors received Δ"
    if plan.operation != "diff" and delta < len(plan.ops):
        s += "; the others were copied from the target"
    if plan.skipped:
        s += f"; {len(plan.skipped)} skipped (see deltaport.json)"
    return s


def _yaml_block(meta: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    return "---\n" + ModelCardData(**meta).to_yaml() + "\n---\n"


def model_card(*, operation: str, refs: dict[str, dict], plan, policies: dict[str, Any],
               scale: float | None, choices: dict[str, str] | None, files: dict[str, Any] | None,
               argv: list[str], lineage: list[str], license: str | None) -> str:
    """The README.md text of a transfer/apply (model) or diff (Δ) output."""
    meta: dict[str, Any] = {}
    if operation != "diff":
        if lineage:
            meta["base_model"] = lineage
            meta["base_model_relation"] = "merge"
    if license:
        meta["license"] = license
    meta["tags"] = TAGS + (["delta"] if operation == "diff" else [])
    if operation == "diff":
        meta["library_name"] = "deltaport"
    formula = {"transfer": "target_base + λ · (source_finetuned − source_base)",
               "apply": "target_base + λ · Δ,  where Δ = source_finetuned − source_base (a `deltaport diff`)",
               "compose": "target_base + Σ_i λ_i · Δ_i,  each Δ_i = a fine-tune − its base (a `deltaport diff`)",
               "diff": "Δ = finetuned − base"}[operation]
    def short(role: str) -> str:
        ref = refs.get(role) or {}
        return ref.get("hub") or ref.get("local") or role

    title = {"transfer": f"{short('target_base')} + the fine-tuning of {short('source_finetuned')}",
             "apply": f"{short('target_base')} + Δ {short('delta')}",
             "compose": f"{short('target_base')} + " + " + ".join(f"Δ {short(r)}" for r in refs if r.startswith("delta_")),
             "diff": f"Δ: {short('finetuned')} − {short('base')}"}[operation]
    # the output's own name is not in the card: the directory's bytes do not depend on where it is written
    out = [_yaml_block(meta), f"# {title}", ""]
    if operation == "diff":
        out += ["This is a **fine-tuning Δ** made with deltaport, not a model:",
                "the element-wise difference between a fine-tuned model and its base, stored in safetensors.", ""]
    else:
        out += ["Made with deltaport by fine-tuning transfer: the change a "
                "fine-tune made to its base model, added to a newer base model.", ""]
    out += ["```", formula, "```", "", "## Inputs", "", "| role | model |", "| --- | --- |"]
    for role, ref in refs.items():
        out.append(f"| {_ROLES.get(role, role)} | {describe_ref(ref)} |")
    out += ["", "## Settings", ""] + _policies(policies, scale, plan.compute_dtype_name) + [f"- {_counts(plan)}", ""]
    if operation != "diff" and choices:
        out += ["## Files", "",
                f"- config.json from the {_WHO[choices['config_from']]}",
                f"- tokenizer from the {_WHO[choices['tokenizer_from']]}",
                f"- chat template from the {_WHO[choices['chat_template_from']]} "
                "(eos/pad/bos ids and generation_config.json follow it)"]
        for p in (files or {}).get("patched") or []:
            out.append(f"- config patched: {p}")
        out.append("")
    elif operation == "diff":
        out += ["## Use it", "", "Add it to a base model of the same architecture (the Δ records the structure it "
                "was made on; `deltaport apply` checks it):", "", "```",
                "deltaport apply THIS_DELTA --to TARGET_BASE -o OUTPUT --scale 1.0", "```", "",
                "`source_finetuned/` holds the fine-tune's config, tokenizer and chat template, for "
                "`apply --config-from/--tokenizer-from/--chat-template-from source-finetuned`.", ""]
    out += ["## Reproduce", "", "```", " ".join(shlex.quote(a) for a in argv), "```", "",
            "OUTPUT is the output directory. Local directories are named by their folder name; their content hash (sha256 over every tensor's name, "
            "dtype, shape and bytes) identifies them. `deltaport.json` beside this card records the full provenance.", ""]
    return "\n".join(out)


def write_card(directory: Path, text: str) -> None:
    (Path(directory) / CARD_NAME).write_text(text, encoding="utf-8")


def command(op: str, required: list[tuple[str, str]], options: dict[str, tuple[Any, Any]]) -> list[str]:
    """``deltaport OP`` with the ``required`` (flag, value) pairs and every option whose value differs
    from its default (``options``: flag -> (value, default)); file options are named by file name."""
    argv = ["deltaport", op]
    for flag, value in required:
        argv += [flag, value] if flag else [value]
    for flag, (value, default) in options.items():
        if value is None or value == default or value == [] or value is False:
            continue
        if value is True:
            argv.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            v = Path(v).name if isinstance(v, Path) else v
            argv += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
    return argv
