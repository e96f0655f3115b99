"""The non-weight files of an output model: config, generation config, tokenizer, chat template.

Their sources are explicit (``--config-from``, ``--tokenizer-from``, ``--chat-template-from``), and
eos/pad/bos ids plus ``generation_config.json`` follow the chat template's source so that stop
tokens stay right (an instruct model stops on its end-of-turn token, a base model does not).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaport.errors import InputError, PlanError

if TYPE_CHECKING:  # annotations only: these modules must not import torch (header-only paths)
    import torch

LOG = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
CHAT_FILES = ("chat_template.jinja", "chat_template.json")
SOURCES = ("target", "source-finetuned")


def _json(path: Path, flag: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; every model file read here (config, tokenizer config, chat
    template) is an object, so anything else is an :class:`InputError` naming the file (and ``flag``,
    the option that chooses where the file comes from)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(obj, dict):
        other = f", or take it from the other model with {flag}" if flag else ""
        raise InputError(f"{path} must be a JSON object ({{...}}) but holds a JSON {_json_kind(obj)}; "
                         f"fix or re-download it{other}")
    return obj


def _json_kind(obj: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def read_chat_template(d: Path) -> tuple[str | None, str | None]:
    """(template, where) of a model dir: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(), "chat_template.jinja"
    if (d / "chat_template.json").exists():
        ct = _json(d / "chat_template.json", "--chat-template-from").get("chat_template")
        if ct:
            return ct if isinstance(ct, str) else json.dumps(ct), "chat_template.json"
    if (d / "tokenizer_config.json").exists():
        ct = _json(d / "tokenizer_config.json", "--chat-template-from").get("chat_template")
        if ct:
            return ct if isinstance(ct, str) else json.dumps(ct), "tokenizer_config.json"
    return None, None


def output_config(*, config_src: Path, chat_src: Path, vocab_rows: int | None = None,
                  out_dtype: torch.dtype | None = None) -> tuple[dict[str, Any], list[str]]:
    """The output's config.json (as a dict) and what was patched in it: read from ``config_src``,
    ``vocab_size`` following a vocabulary policy, eos/pad/bos ids following the chat template's source."""
    patched: list[str] = []
    cfg_path = config_src / "config.json"
    if not cfg_path.exists():
        raise InputError(f"--config-from source {config_src} has no config.json; choose the other source")
    cfg = _json(cfg_path, "--config-from")
    chat_cfg = _json(chat_src / "config.json", "--chat-template-from") if (chat_src / "config.json").exists() else {}
    if vocab_rows is not None and cfg.get("vocab_size") not in (None, vocab_rows):
        patched.append(f"vocab_size {cfg.get('vocab_size')} -> {vocab_rows} (vocabulary policy)")
        cfg["vocab_size"] = vocab_rows
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if chat_src != config_src and key in chat_cfg and chat_cfg.get(key) != cfg.get(key):
            patched.append(f"{key} {cfg.get(key)} -> {chat_cfg[key]} (follows the chat template's source)")
            cfg[key] = chat_cfg[key]
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        for key in ("torch_dtype", "dtype"):
            if key in cfg and cfg[key] != name:
                patched.append(f"{key} {cfg[key]} -> {name}")
                cfg[key] = name
    return cfg, patched


def write_model_files(out: Path, *, config_src: Path, tokenizer_src: Path, chat_src: Path,
                      vocab_rows: int | None = None, out_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Copy config/tokenizer/chat-template files into ``out``; returns a record for provenance."""
    record: dict[str, Any] = {"config": str(config_src), "tokenizer": str(tokenizer_src), "chat_template": str(chat_src),
                              "patched": []}
    cfg, record["patched"] = output_config(config_src=config_src, chat_src=chat_src, vocab_rows=vocab_rows,
                                           out_dtype=out_dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen_src = chat_src if (chat_src / "generation_config.json").exists() else config_src
    if (gen_src / "generation_config.json").exists():
        shutil.copyfile(gen_src / "generation_config.json", out / "generation_config.json")
        record["generation_config"] = str(gen_src)

    copied = []
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copyfile(tokenizer_src / f, out / f)
            copied.append(f)
    if not copied:
        LOG.warning("tokenizer source %s has no tokenizer files; the output will have no tokenizer", tokenizer_src)
        record["tokenizer"] = None
    # chat template: drop whatever came with the tokenizer, write the chosen source's
    template, where = read_chat_template(chat_src)
    tc_path = out / "tokenizer_config.json"
    # read the copy's source, so that an error names the input file rather than the temporary output
    tc = _json(tokenizer_src / "tokenizer_config.json", "--tokenizer-from") if tc_path.exists() else None
    if tc is not None and "chat_template" in tc:
        del tc["chat_template"]
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
        record["chat_template_file"] = where
    else:
        record["chat_template"] = None
    if tc is not None and chat_src != tokenizer_src and (chat_src / "tokenizer_config.json").exists():
        ctc = _json(chat_src / "tokenizer_config.json", "--chat-template-from")
        for key in ("eos_token", "pad_token", "bos_token"):
            if key in ctc and ctc[key] != tc.get(key):
                record["patched"].append(f"tokenizer {key} {tc.get(key)!r} -> {ctc[key]!r} (follows the chat template's source)")
                tc[key] = ctc[key]
    if tc is not None:
        tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    return record


def meta_causal_lm(d: Path | dict) -> torch.nn.Module:
    """The causal LM ``d/config.json`` (or the config dict ``d``) describes, built on the meta device (no
    weights, no custom code). Raises whatever transformers raises for an unknown or custom architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(d, dict):
        from transformers import CONFIG_MAPPING

        if "model_type" not in d:
            raise ValueError("config.json has no model_type")
        cfg = CONFIG_MAPPING[d["model_type"]].from_dict(dict(d))
    else:
        cfg = AutoConfig.from_pretrained(str(d), trust_remote_code=False)
    import torch

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def check_config_against_plan(out: Path | dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Build the model from the output config (a directory with config.json, or the config dict) on the
    meta device and compare parameter shapes.

    Returns warnings; raises PlanError on a definite mismatch (a config from the wrong model)."""
    try:
        model = meta_causal_lm(out)
    except Exception as exc:  # noqa: BLE001 - unknown/custom architectures: cannot check, say so
        return [f"could not check config.json against the tensors ({type(exc).__name__}: {exc})"]
    bad = []
    for name, p in model.state_dict().items():
        if name in shapes and tuple(p.shape) != tuple(shapes[name]):
            bad.append(f"{name}: config implies {list(p.shape)}, output has {list(shapes[name])}")
    if bad:
        raise PlanError("the chosen config.json does not fit the output tensors:\n  " + "\n  ".join(bad[:10]) +
                        "\nChoose the config of the model whose shapes the output has (usually --config-from target).")
    return []


def missing_parameters(d: Path, tensors: dict) -> list[str]:
    """Parameters of the model ``d/config.json`` describes (tied ones counted once) that ``tensors``
    (name -> spec with ``.shape``) lacks or holds in another shape. ``[]`` when the architecture cannot
    be built without custom code (transformers will say more when loading)."""
    try:
        model = meta_causal_lm(d)
    except Exception:  # noqa: BLE001
        return []
    bad = []
    for name, p in model.named_parameters():  # de-duplicates tied parameters
        spec = tensors.get(name)
        if spec is None or tuple(spec.shape) != tuple(p.shape):
            bad.append(name if spec is None else f"{name} {list(spec.shape)} vs {list(p.shape)}")
    return bad
