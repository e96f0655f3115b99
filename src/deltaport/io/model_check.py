"""Checks of a model directory before transformers is asked to load it: :func:`check_model_dir` for
eval and finetune, :func:`check_weights` for evolve and (through :func:`deltaport.causal_lm.preflight`)
for the diagnostics, which also take hub ids and ``--allow-pickle``.

Headers only: nothing here reads tensor bytes or unpickles anything. Each check names the directory
and says what to do, instead of letting transformers fail late or, worse, fill missing parameters at
random and only warn.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltaport.errors import CheckpointError, InputError


def refuse_delta_dir(d: Path, source) -> None:
    """A `deltaport diff` output holds Δ, not a model: say so instead of letting transformers fail."""
    prov = d / "deltaport.json"
    if prov.is_file():
        try:
            kind = json.loads(prov.read_text()).get("kind")
        except ValueError:
            return
        if kind == "delta":
            raise InputError(f"{source} is a delta directory (deltaport diff output), not a model; apply it first: "
                             f"deltaport apply {source} --to BASE -o MODEL")


def check_model_dir(d: Path, source) -> None:
    """Every check before a model directory ``d`` (resolved from ``source``, a path or hub id) is loaded:
    not a Δ directory, a config.json, complete safetensors weights (:func:`check_weights`)."""
    refuse_delta_dir(d, source)
    if not (d / "config.json").is_file():
        raise InputError(f"model {source}: no config.json in {d}; pass a Hugging Face model directory or hub id")
    check_weights(d)


def check_weights(d: Path, *, allow_pickle: bool = False, pickle_option: bool = False) -> None:
    """Before transformers is asked to load anything: safetensors weights present and readable (headers
    only; ``.bin`` files beside safetensors are ignored, never unpickled), and every parameter config.json
    implies present in its shape (the model built on the meta device).

    A directory of pickled weights only is refused unless ``allow_pickle``; the refusal offers
    ``--allow-pickle`` when the command has it (``pickle_option``), and says how to convert otherwise.
    With ``allow_pickle`` such a directory is not read here: its loader reads the pickles once and checks
    what transformers reports as missing."""
    from deltaport.assets import missing_parameters
    from deltaport.io.checkpoint import open_checkpoint, pickle_only, refuse_pickle

    if allow_pickle and pickle_only(d):
        return
    try:
        ck = open_checkpoint(d, allow_pickle=allow_pickle)
    except CheckpointError as exc:
        if pickle_option or not hasattr(exc, "pickle_only"):
            raise
        raise refuse_pickle(*exc.pickle_only, fix=(
            "The eval, finetune and evolve commands read safetensors only. Convert once, e.g. `python -c \"from transformers "
            f"import AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('{d}-safetensors')\"` "
            "(transformers loads .bin with torch.load(weights_only=True)), and pass the converted directory.")) from None
    missing = missing_parameters(d, ck.tensors)
    if missing:
        raise CheckpointError(
            f"{d}: {len(missing)} parameter(s) that config.json implies are missing from the checkpoint or have "
            f"another shape ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); transformers would "
            "initialise them at random. Check that the weights are complete and match config.json.")
