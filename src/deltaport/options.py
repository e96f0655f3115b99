"""Every option of every verb, declared once: name, type, default and help.

One class per verb (``TransferOptions`` for ``deltaport transfer`` and :func:`deltaport.transfer`, ...).
Both sides read it:

- the library function takes each option as a keyword argument whose default is the declared one
  (``scale: float = TRANSFER.scale``), and :func:`declared` appends the options' help to its docstring
  (and refuses, at import, a function whose keyword arguments and declaration disagree);
- the command line (:func:`deltaport.cli.flags.with_options`) turns each field into the flag
  ``--field-name`` with the declared type, default and help text.

A field's annotation is the type the command line parses; the functions may accept more (a dict for
``key_map``, an int for ``shard_size``). This module imports neither torch nor typer: ``--help`` stays
torch-free and the library never imports the CLI. Options only the command line has (``-o`` of the
diagnostics, ``--quiet``, ``--json``, ``--plot``) are declared in its command modules.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

VocabPolicy = Literal["error", "pad", "align"]
ShapePolicy = Literal["error", "skip"]
UnmatchedRows = Literal["target", "finetuned"]
ComputeDtype = Literal["auto", "float32", "float64"]
FileSource = Literal["target", "source-finetuned"]
CompressMethod = Literal["lowrank", "sparse", "sign"]
Recipe = Literal["quick", "paper"]
EvalPreset = Literal["llama3-instruct", "olmo2-tulu3", "global-mmlu"]
EvalBackend = Literal["hf", "vllm"]
EvalProtocol = Literal["base", "chat", "both", "auto"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # the default of an option that has none (the command line marks it [required])


@dataclass(frozen=True)
class Option:
    """One option: its default, the help ``--help`` shows, and, where the function's meaning differs
    from the flag's (a list where the flag takes a comma-separated string), ``doc`` for the docstring
    and ``cli_type`` for the type the flag parses. ``card``: the output's model card repeats it in the
    command that made the output (False for options that do not change the output's bytes)."""

    default: Any
    help: str
    doc: str | None = None
    cli_type: Any = None
    card: bool = True


def options(cls):
    """Make ``cls`` a frozen dataclass whose :class:`Option` attributes are its fields (in order)."""
    for name, value in list(vars(cls).items()):
        if isinstance(value, Option):
            setattr(cls, name, dataclasses.field(default=value.default, metadata={"option": value}))
    return dataclass(frozen=True)(cls)


def option_fields(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of a verb's options class with their :class:`Option`, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls)]


def flag(name: str) -> str:
    """The command-line flag of the option ``name``: ``shard_size`` -> ``--shard-size``."""
    return "--" + name.replace("_", "-")


def declared(cls):
    """Decorator for the library function of a verb: check that its keyword-only arguments include
    every field of ``cls`` with the declared default, and append the options' help to its docstring."""

    def wrap(fn):
        params = inspect.signature(fn).parameters
        for f, opt in option_fields(cls):
            p = params.get(f.name)
            want = inspect.Parameter.empty if opt.default is REQUIRED else opt.default
            if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default != want:
                raise TypeError(f"{fn.__qualname__}: keyword argument {f.name} must default to {cls.__name__}."
                                f"{f.name} ({want!r})")
        lines = [f"Options (flags of ``deltaport {cls.verb}``, declared in :class:`deltaport.options.{cls.__name__}`):"]
        types = typing.get_type_hints(cls)
        for f, opt in option_fields(cls):
            default = "required" if opt.default is REQUIRED else f"default {opt.default!r}"
            choices = _choices(types[f.name])
            kind = " | ".join(repr(c) for c in choices) + ", " if choices else ""
            lines.append(f"    {f.name} ({kind}{default}): {opt.doc or opt.help}")
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + "\n".join(lines) + "\n"
        return fn

    return wrap


def _choices(typ) -> list[str]:
    """The values of a ``Literal`` (also inside ``Optional``)."""
    if typing.get_origin(typ) is Literal:
        return list(typing.get_args(typ))
    return [c for a in typing.get_args(typ) for c in _choices(a)]


# ----------------------------------------------------------------------------------------------------
# options several verbs share (each verb lists the ones it takes, in its --help order)

VOCAB_POLICY = Option("error", "embedding/lm_head row-count mismatch: error; pad (official script: zero rows); "
                      "align (match rows by token string)",
                      doc="embedding/lm_head row-count mismatch: error; pad (official script: zero rows); align "
                          "(rows matched by token string, each model's rows found through its own tokenizer)")
SHAPE_POLICY = Option("error", "other shape/key mismatches: error; skip (transfer only matching tensors, paper App. B.3)")
KEY_MAP = Option(None, "YAML {target_name_regex: source_name_replacement} for renamed modules",
                 doc="YAML file (or a dict) {target_name_regex: source_name_replacement} for renamed modules")
INCLUDE = Option(None, "regex; only matching tensors get Δ (repeatable)", doc="regexes; only matching tensors get Δ")
EXCLUDE = Option(None, "regex; matching tensors get no Δ (repeatable)", doc="regexes; matching tensors get no Δ")
SCALE_MAP = Option(None, "YAML {tensor_name_regex: λ}, first match wins",
                   doc="YAML file (or a dict) {tensor_name_regex: λ}, first match wins")
COMPUTE_DTYPE = Option("auto", "auto (= float64: exact identities); float32 (faster, may differ by one ulp where a "
                       "fine-tuned value cancels its base); float64")
OUT_DTYPE = Option(None, "output dtype (default: the target's dtype per tensor)")
CONFIG_FROM = Option("target", "where config.json comes from (target keeps the target's RoPE/context settings)")
TOKENIZER_FROM = Option("target", "where the tokenizer comes from")
CHAT_TEMPLATE_FROM = Option("source-finetuned", "where the chat template comes from (eos/pad ids and "
                            "generation_config follow it)")
SHARD_SIZE = Option("5GB", "maximum shard size, e.g. 5GB, 500MB", doc="maximum shard size, e.g. 5GB, 500MB, or bytes")
OVERWRITE = Option(False, "replace an existing output (the new one is completed first, then swapped in)", card=False)
DRY_RUN = Option(False, "print the plan (from headers only) and write nothing",
                 doc="plan (from headers only) and write nothing; the result's plan and fetch say what a run would do",
                 card=False)
ALLOW_PICKLE = Option(False, "accept pickled .bin/.pt weights (loaded with torch.load(weights_only=True))")
STRICT = Option(False, "fail on NaN/Inf in inputs (default: warn)", card=False)
THREADS = Option(None, "worker threads for the arithmetic, each computing whole chunks with one torch thread "
                 "(default 1: on 2 cores a reader and a writer thread already use the second; output bytes do "
                 "not depend on it)", card=False)
DIAG_ALLOW_PICKLE = Option(False, "accept models with only pickled .bin/.pt weights (loaded with "
                           "torch.load(weights_only=True))")
DIAG_DEVICE = Option("cpu", "torch device, e.g. cpu or cuda")


# ----------------------------------------------------------------------------------------------------
# the model/delta verbs (deltaport.api, deltaport.compression, deltaport.inspect). Each class lists its
# options in its --help order; transfer, diff and apply share most lines because they share the options
# (the constants above): a table, not repeated logic.

@options
class TransferOptions:
    """``deltaport transfer`` / :func:`deltaport.transfer`: out = target_base + λ·(source_finetuned − source_base)."""

    verb = "transfer"
    scale: float = Option(1.0, "λ: out = target + λ·Δ (paper: 1.0)",
                          doc="λ (paper: 1.0); ``scale_map`` overrides it per tensor-name regex")
    vocab_policy: VocabPolicy = VOCAB_POLICY
    unmatched_rows: UnmatchedRows = Option(
        "target", "with --vocab-policy align, target tokens without a row in both source models get no Δ: target "
        "(keep the target's row); finetuned (copy the fine-tune's row where it has the token)",
        doc="with vocab_policy align, a target token that lacks a row in either source model has no Δ: target "
            "keeps the target's row, finetuned copies the fine-tune's row when it has the token (provenance "
            "``vocab_align`` lists them)")
    shape_policy: ShapePolicy = SHAPE_POLICY
    key_map: Optional[Path] = KEY_MAP
    include: Optional[list[str]] = INCLUDE
    exclude: Optional[list[str]] = EXCLUDE
    scale_map: Optional[Path] = SCALE_MAP
    compute_dtype: ComputeDtype = COMPUTE_DTYPE
    out_dtype: Optional[str] = OUT_DTYPE
    config_from: FileSource = CONFIG_FROM
    tokenizer_from: FileSource = TOKENIZER_FROM
    chat_template_from: FileSource = CHAT_TEMPLATE_FROM
    shard_size: str = SHARD_SIZE
    overwrite: bool = OVERWRITE
    dry_run: bool = DRY_RUN
    allow_pickle: bool = ALLOW_PICKLE
    strict: bool = STRICT
    threads: Optional[int] = THREADS


@options
class DiffOptions:
    """``deltaport diff`` / :func:`deltaport.diff`: Δ = finetuned − base, stored."""

    verb = "diff"
    delta_dtype: Optional[str] = Option(None, "stored Δ dtype (default lossless: float32 for 16-bit models, float64 "
                                        "for float32 models, plus the exact residual where they cannot hold f − b); "
                                        "an explicit dtype stores no residual: bfloat16/float16 are smaller but lossy")
    vocab_policy: VocabPolicy = VOCAB_POLICY
    shape_policy: ShapePolicy = SHAPE_POLICY
    key_map: Optional[Path] = KEY_MAP
    include: Optional[list[str]] = INCLUDE
    exclude: Optional[list[str]] = EXCLUDE
    compute_dtype: ComputeDtype = COMPUTE_DTYPE
    shard_size: str = SHARD_SIZE
    overwrite: bool = OVERWRITE
    dry_run: bool = DRY_RUN
    allow_pickle: bool = ALLOW_PICKLE
    strict: bool = STRICT
    threads: Optional[int] = THREADS


@options
class ApplyOptions:
    """``deltaport apply`` / :func:`deltaport.apply`: out = to + λ·Δ, or to + Σ λ_i·Δ_i for several deltas."""

    verb = "apply"
    scale: float = Option(1.0, "λ: out = target + λ·Δ (paper: 1.0); with several deltas, once per delta in their "
                          "order (--scale-map values multiply each λ)",
                          doc="λ (paper: 1.0); with several deltas a list of one λ per delta (or one number for "
                              "all); ``scale_map`` values then multiply each λ_i (with one delta they replace λ)",
                          cli_type=Optional[list[float]])
    vocab_policy: VocabPolicy = VOCAB_POLICY
    shape_policy: ShapePolicy = SHAPE_POLICY
    key_map: Optional[Path] = KEY_MAP
    include: Optional[list[str]] = INCLUDE
    exclude: Optional[list[str]] = EXCLUDE
    scale_map: Optional[Path] = SCALE_MAP
    compute_dtype: ComputeDtype = COMPUTE_DTYPE
    out_dtype: Optional[str] = OUT_DTYPE
    config_from: FileSource = CONFIG_FROM
    tokenizer_from: FileSource = TOKENIZER_FROM
    chat_template_from: FileSource = CHAT_TEMPLATE_FROM
    shard_size: str = SHARD_SIZE
    overwrite: bool = OVERWRITE
    dry_run: bool = DRY_RUN
    force: bool = Option(False, "apply even if the target's structure differs from the delta's base (recorded in "
                         "provenance)")
    allow_pickle: bool = ALLOW_PICKLE
    strict: bool = STRICT
    threads: Optional[int] = THREADS
    ties: Optional[float] = Option(None, "several deltas: TIES-Merging sign consensus (Yadav et al. 2023): keep this "
                                   "fraction of each λ_i·Δ_i's largest entries per tensor, elect each element's "
                                   "sign, average the agreeing entries")


@options
class CompressOptions:
    """``deltaport compress`` / :func:`deltaport.compression.compress`: a smaller, lossy copy of a delta."""

    verb = "compress"
    method: CompressMethod = Option(REQUIRED, "lowrank (factors per matrix, --rank) | sparse (DARE: bitmask + kept "
                                    "values, --density) | sign (BitDelta: sign bits + one scale per matrix)")
    rank: Optional[int] = Option(None, "lowrank: rank R of each matrix's factors")
    density: Optional[float] = Option(None, "sparse: fraction p of entries kept, in (0, 1]; kept values are "
                                      "rescaled by 1/p")
    include: Optional[list[str]] = Option(None, "regex; compress only matching tensors (repeatable; may name "
                                          "vocabulary tensors)")
    exclude: Optional[list[str]] = Option(None, "regex; matching tensors stay exact (repeatable)")
    seed: int = Option(0, "seed of DARE's mask and the randomised SVD (recorded; reruns are byte-identical)")
    shard_size: str = SHARD_SIZE
    overwrite: bool = OVERWRITE
    threads: Optional[int] = THREADS


@options
class InspectOptions:
    """``deltaport inspect`` / :func:`deltaport.inspect.inspect`: a checkpoint described from its headers."""

    verb = "inspect"
    allow_pickle: bool = ALLOW_PICKLE


# ----------------------------------------------------------------------------------------------------
# training (deltaport.finetune, deltaport.evolve)

@options
class FinetuneOptions:
    """``deltaport finetune`` / :func:`deltaport.finetune.finetune`: loss on assistant tokens only."""

    verb = "finetune"
    recipe: Recipe = Option("quick", "paper: lr 5e-6, linear, 3% warm-up, batch 8, 30K steps; quick: lr 1e-4, 100 steps",
                            doc="paper (lr 5e-6, linear, 3 % warm-up, wd 0, AdamW, effective batch 8, bf16 on GPU, "
                                "30K steps, checkpoints every 5K) or quick (lr 1e-4, 100 steps); steps, lr, "
                                "batch_size, max_seq_length and save_every override it")
    steps: Optional[int] = Option(None, "optimizer steps (default: the recipe's)")
    lr: Optional[float] = Option(None, "peak learning rate (default: the recipe's)")
    batch_size: Optional[int] = Option(None, "effective batch (micro × accumulation × GPUs)")
    micro_batch_size: Optional[int] = Option(None, "per-device batch",
                                             doc="per-device batch; gradient accumulation makes up the effective batch_size")
    max_seq_length: Optional[int] = Option(None, "truncate examples to this many tokens")
    lora: bool = Option(False, "train a PEFT LoRA adapter (merged into the saved model)",
                        doc="train a PEFT LoRA adapter (r=lora_r, alpha=lora_alpha, all linear layers); the saved "
                            "model has it merged in (so diff/transfer work on it) and ``adapter/`` holds the adapter")
    lora_r: int = Option(16, "LoRA rank r (with --lora)")
    lora_alpha: int = Option(32, "LoRA alpha (with --lora; scaling alpha/r)")
    save_every: Optional[int] = Option(None, "checkpoint every N steps (checkpoints/step-N)")
    eval_every: Optional[int] = Option(None, "evaluate --eval-tasks every N steps",
                                       doc="evaluate eval_tasks at step 0 and every N steps (convergence curves, "
                                           "paper Fig. 2)")
    eval_tasks: Optional[list[str]] = Option(None, "comma-separated lm-eval tasks or task YAMLs",
                                             doc="lm-eval task names or task YAMLs (a list)", cli_type=Optional[str])
    eval_limit: Optional[int] = Option(None, "documents per task for --eval-every")
    chat_template: Optional[str] = Option(None, "'tulu' or a file with a Jinja template",
                                          doc="a Jinja chat template (the text) or 'tulu', used instead of the "
                                              "tokenizer's")
    device: str = Option("auto", "cpu, cuda, cuda:N or auto", doc="cpu, cuda, cuda:N or auto (cuda when available)")
    seed: int = Option(0, "random seed (python, numpy, torch; the data order; --eval-every evaluations)")
    overwrite: bool = Option(False, "replace an existing output (swapped in when complete)")
    resume: bool = Option(False, "save the trainer state every --save-every steps (in .OUT.deltaport-work) and "
                          "continue from it if a previous run was killed",
                          doc="resumable training: the full trainer state (weights, optimizer, scheduler, RNG) is "
                              "saved every save_every steps in work_dir (default ``.OUTPUT.deltaport-work`` next to "
                              "the output) and a killed run continues from the latest one (same settings required); "
                              "the work dir is removed once the output is complete")


@options
class EvolveOptions:
    """``deltaport evolve`` / :func:`deltaport.evolve.run_chain`: Algorithm 1 and its baselines."""

    verb = "evolve"
    resume: bool = Option(False, "continue a run in this directory; never redo a finished step")


# ----------------------------------------------------------------------------------------------------
# diagnostics (deltaport.connectivity, deltaport.similarity, deltaport.check); their -o, --plot and
# --overwrite are the command line's (the functions return the report)

@options
class ConnectivityOptions:
    """``deltaport connectivity`` / :func:`deltaport.connectivity.connectivity`: loss along θ(α) and its barrier."""

    verb = "connectivity"
    points: int = Option(11, "number of α values in [0, 1], endpoints included")
    max_tokens: int = Option(4096, "size of the fixed token sample")
    seed: int = Option(0, "shuffle seed of the sample")
    device: str = DIAG_DEVICE
    dtype: str = Option("float32", "dtype models are loaded in", doc="dtype models are loaded in (paths only)")
    allow_pickle: bool = DIAG_ALLOW_PICKLE


@options
class SimilarityOptions:
    """``deltaport similarity`` / :func:`deltaport.similarity.similarity`: distances and cosines per tensor and layer."""

    verb = "similarity"
    allow_pickle: bool = DIAG_ALLOW_PICKLE


@options
class CheckOptions:
    """``deltaport check`` / :func:`deltaport.check.check`: will m_t + Δ_s work?"""

    verb = "check"
    max_tokens: int = Option(2048, "size of the fixed token sample")
    seed: int = Option(0, "shuffle seed of the sample")
    device: str = DIAG_DEVICE
    allow_pickle: bool = DIAG_ALLOW_PICKLE


# ----------------------------------------------------------------------------------------------------
# evaluation (deltaport.evaluation); tasks, -o, --baseline, --table, --cache-dir, --no-cache and
# --overwrite are the command line's (the function takes tasks positionally and returns the results)

@options
class EvaluateOptions:
    """``deltaport eval`` / :func:`deltaport.evaluate`: lm-eval runs, compared."""

    verb = "eval"
    preset: Optional[EvalPreset] = Option(None, "the paper's task sets",
                                          doc="the paper's task sets (:mod:`deltaport.evaluation.presets`); its tasks come "
                                              "before ``tasks``")
    languages: Optional[list[str]] = Option(None, "Global MMLU languages, e.g. mg,si,tr",
                                            doc="Global MMLU languages for preset global-mmlu (a list)",
                                            cli_type=Optional[str])
    limit: Optional[float] = Option(None, "documents per task (N, or a fraction < 1)", cli_type=Optional[str])
    device: str = Option("auto", "cpu, cuda, cuda:N or auto (cuda when available)",
                         doc="cpu, cuda[:N] or auto (cuda when available); passed to lm-eval explicitly, so a "
                             "CPU-only torch works")
    backend: EvalBackend = Option("hf", "transformers, or vllm (GPU only)",
                                  doc="hf (transformers) or vllm (needs vllm and a GPU; models from disk only)")
    batch_size: str = Option(8, "an integer or 'auto'", doc="an int or 'auto'")
    protocol: Optional[EvalProtocol] = Option(None, "prompting protocol (default: auto with --preset, else base)",
                                              doc="prompting protocol (see :mod:`deltaport.evaluation`); None: auto "
                                                  "with a preset, else base")
    num_fewshot: Optional[int] = Option(None, "override every task's few-shot count")
    seed: int = Option(0, "lm-eval seeds (python, numpy, torch, few-shot sampling)")
    model_args: Optional[dict] = Option(None, "extra lm-eval model args, k=v,k=v (e.g. max_length=4096,"
                                        "tensor_parallel_size=2)",
                                        doc="extra keyword arguments for the lm-eval model (HFLM / VLLM), e.g. "
                                            "max_length, tensor_parallel_size", cli_type=Optional[str])
    # lm-eval's own flags, with lm-eval's meaning (docs/eval.md says how they combine with the above)
    gen_kwargs: Optional[dict] = Option(None, "generation arguments for generation tasks, k=v,k=v or a JSON object "
                                        "(e.g. temperature=0,max_gen_toks=64), as lm-eval's --gen_kwargs",
                                        doc="generation arguments (a dict, or lm-eval's ``k=v,k=v`` / JSON string) "
                                            "that update every generation task's ``generation_kwargs``; ignored by "
                                            "log-likelihood tasks", cli_type=Optional[str])
    include_path: Optional[str] = Option(None, "a folder of task YAMLs whose task names --tasks may use, as lm-eval's "
                                         "--include_path",
                                         doc="a folder of task YAML files whose task and group names ``tasks`` may "
                                             "name (lm-eval's ``include_path``)")
    system_instruction: Optional[str] = Option(None, "a system instruction put before every prompt, as lm-eval's "
                                               "--system_instruction",
                                               doc="a system instruction for every prompt (a system turn under the "
                                                   "chat protocol, prepended text otherwise), as lm-eval's")
    fewshot_as_multiturn: Optional[bool] = Option(None, "few-shot examples as a multi-turn conversation (chat "
                                                  "protocol only; default: on with chat, as lm-eval)",
                                                  doc="few-shot examples as a multi-turn conversation; needs the chat "
                                                      "protocol. None: on for chat rows (lm-eval's default with a "
                                                      "chat template); False: the chat rows get the examples in one "
                                                      "user turn")
    log_samples: bool = Option(False, "write per-item records (one JSONL per model and task) beside -o, as lm-eval's "
                               "--log_samples",
                               doc="return the per-item records (``samples``: prompt, target, response or choice "
                                   "log-likelihoods, per-item metrics) with the results")
    no_prompts: bool = Option(False, "per-item records carry the prompt's sha256 instead of its text (and no "
                              "choices)",
                              doc="per-item records carry ``prompt_hash`` but not the prompt text or the choices")


# the defaults, for the functions' signatures (``scale: float = TRANSFER.scale``)
TRANSFER, DIFF, APPLY, INSPECT = TransferOptions(), DiffOptions(), ApplyOptions(), InspectOptions()
COMPRESS = CompressOptions()  # its method is REQUIRED
FINETUNE, EVOLVE = FinetuneOptions(), EvolveOptions()
CONNECTIVITY, SIMILARITY, CHECK = ConnectivityOptions(), SimilarityOptions(), CheckOptions()
EVALUATE = EvaluateOptions()
