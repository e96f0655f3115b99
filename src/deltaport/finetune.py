"""Supervised fine-tuning for transfer-then-finetune (paper §5): TRL's SFTTrainer, loss on assistant tokens.

::

    from deltaport.finetune import finetune
    r = finetune("target+delta/", "sft.jsonl", "ft/", recipe="paper", steps=30000)
    r.output, r.log[-1]["loss"], r.evals

Data: a local ``.jsonl`` (or ``.json`` list) of ``{"messages": [...]}`` chats or ``{"prompt", "completion"}``
pairs, a hub dataset name (``org/name`` or ``org/name:split``), or an in-memory list of such dicts.

Loss masking: chats are trained with TRL's ``assistant_only_loss`` when the chat template marks assistant
turns with ``{% generation %}``; otherwise each chat becomes a conversational prompt/completion pair
(everything before the last assistant turn is the prompt) trained with ``completion_only_loss``. A
tokenizer without any chat template gets the Tülu template the paper trained with (saved with the output).
Plain-string prompt/completion pairs are trained as text, with loss on the completion only.

Output (written to a temporary sibling, renamed when complete): a Hugging Face model directory (weights
in the input's dtype, tokenizer), ``train_log.json`` (loss, lr, tokens per logged step), ``evals.json``
(``--eval-every``), ``checkpoints/step-N/`` every ``save_every`` steps (loadable model dirs; adapters with
LoRA), ``adapter/`` with LoRA, and ``deltaport.json`` (provenance).

Over ~500 lines because the steps above are one workflow that must agree with itself: data loading and
loss masking, the recipe, TRL/PEFT set-up, resume from checkpoints and the atomic publish of the output.
Its options are declared in :mod:`deltaport.options`, its model checks live in
:mod:`deltaport.io.model_check`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import InputError, OutputError, RuntimeFailure
from deltaport.options import FINETUNE, FinetuneOptions, declared

LOG = logging.getLogger(__name__)

#: The Tülu chat template (open-instruct's default, what the paper fine-tuned with), with
#: ``{% generation %}`` markers so that only assistant tokens carry loss.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings; ``batch_size`` is the effective batch (micro-batch × accumulation × GPUs)."""

    lr: float
    steps: int
    batch_size: int
    scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_seq_length: int = 1024
    save_every: int | None = None
    logging_steps: int = 1
    bf16_on_gpu: bool = True


RECIPES: dict[str, Recipe] = {
    # paper §4.1 / open-instruct finetune.py: lr 5e-6, linear, 3 % warm-up, wd 0, AdamW, effective batch 8,
    # bf16, 30K steps, checkpoints every 5K, ~2K tokens.
    "paper": Recipe(lr=5e-6, steps=30000, batch_size=8, max_seq_length=2048, save_every=5000, logging_steps=10),
    # small/fast runs (smoke tests, tiny models, demos)
    "quick": Recipe(lr=1e-4, steps=100, batch_size=8, max_seq_length=1024),
}


@dataclass
class FinetuneResult:
    """``output``: the model directory (None when ``output=None``); ``log``: one dict per logged step
    (step, loss, lr, tokens, ...); ``evals``: one dict per evaluation (step, results); ``model`` /
    ``tokenizer``: the trained model in memory (LoRA merged); ``rank``: this process's rank (0 when alone)."""

    output: Path | None
    log: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    rank: int = 0  #: this process's rank in a multi-process launch (only rank 0 writes the output)


# --------------------------------------------------------------------------------------------------
# data


def _check_record(rec: Any, where: str) -> str:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"{where}: messages[{j}] needs 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(f"{where}: the chat has no assistant turn, so nothing would carry loss")
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    raise InputError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}; "
                     f"got keys {sorted(rec)}")


def load_records(data) -> tuple[list[dict], dict]:
    """Read training records from a jsonl/json file, a hub dataset or a list; return (records, source info)."""
    if isinstance(data, (list, tuple)):
        recs, info = list(data), {"kind": "memory", "n": len(data)}
        where = lambda i: f"data[{i}]"  # noqa: E731
    else:
        s = str(data)
        p = Path(s).expanduser()
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            recs = []
            if p.suffix == ".json":
                try:
                    recs = json.loads(text)
                except ValueError as exc:
                    raise InputError(f"{p}: not valid JSON ({exc})") from None
                if not isinstance(recs, list):
                    raise InputError(f"{p}: a .json data file must hold a list of records")
                where = lambda i: f"{p} record {i}"  # noqa: E731
            else:
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            recs.append(json.loads(line))
                        except ValueError as exc:
                            raise InputError(f"{p}:{n}: not valid JSON ({exc}); one record per line") from None
                where = lambda i: f"{p} record {i + 1}"  # noqa: E731
            info = {"kind": "file", "path": str(p.absolute()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        elif not p.is_dir() and (p.suffix in (".jsonl", ".json") or
                                 os.sep in s and not re.match(r"^[\w.\-]+/[\w.\-]+(:\w+)?$", s)):
            raise InputError(f"data file {s} not found; pass a .jsonl of chats or prompt/completion pairs, "
                             "or a hub dataset name (org/name[:split])")
        else:
            name, _, split = (s, "", "") if p.is_dir() else s.partition(":")
            try:
                from datasets import load_dataset

                ds = load_dataset(name, split=split or "train")
            except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, 404, ...)
                raise InputError(f"cannot load hub dataset {s!r}: {type(exc).__name__}: {exc}") from None
            recs = [dict(r) for r in ds]
            info = {"kind": "hub", "name": name, "split": split or "train", "fingerprint": getattr(ds, "_fingerprint", None)}
            where = lambda i: f"{s} row {i}"  # noqa: E731
    if not recs:
        raise InputError(f"no training records in {info.get('path') or info.get('name') or 'data'}")
    kinds = {_check_record(r, where(i)) for i, r in enumerate(recs)}
    if len(kinds) > 1:
        raise InputError("the data mixes chat records and prompt/completion records; use one format per file")
    info["format"] = kinds.pop()
    info["n"] = len(recs)
    return recs, info


def _to_training_rows(recs: list[dict], fmt: str, has_generation: bool) -> tuple[list[dict], str]:
    """Rows for TRL and the loss mode: 'assistant_only' | 'completion_only'."""
    if fmt == "prompt_completion":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in recs], "completion_only"
    if has_generation:
        return [{"messages": r["messages"]} for r in recs], "assistant_only"
    rows, dropped = [], 0
    for r in recs:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        dropped += sum(m["role"] == "assistant" for m in msgs[:last])
        rows.append({"prompt": msgs[:last], "completion": [msgs[last]]})
    if dropped:
        LOG.warning("the chat template has no {%% generation %%} markers: only the last assistant turn of each "
                    "chat carries loss (%d earlier assistant turns are context only)", dropped)
    return rows, "completion_only"


# --------------------------------------------------------------------------------------------------
# model


def _load(model, device: str):
    """(model, tokenizer, source record, save dtype) for a path/hub id or a (model, tokenizer) pair."""
    import torch

    if isinstance(model, tuple):
        m, tok = model
        if tok is None:
            raise InputError("an in-memory model needs its tokenizer: pass (model, tokenizer)")
        dt = next(m.parameters()).dtype
        return copy.deepcopy(m).float(), copy.deepcopy(tok), {"kind": "memory", "class": type(m).__name__}, dt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltaport.io.checkpoint import resolve_dir

    d, rev = resolve_dir(model)
    from deltaport.io.model_check import check_model_dir

    check_model_dir(d, model)
    cfg = json.loads((d / "config.json").read_text())
    dt_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    save_dtype = getattr(torch, str(dt_name).replace("torch.", ""), torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)  # fp32 master weights
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {model} ({d}): {type(exc).__name__}: {exc}") from None
    return m, tok, {"kind": "dir", "source": str(model), "path": str(d.absolute()), "revision": rev}, save_dtype


def _resolve_device(device: str | None) -> str:
    from deltaport.devices import resolve_device as rd

    return rd(device)


# --------------------------------------------------------------------------------------------------
# several processes (torchrun / accelerate launch): rank 0 writes the output, every rank trains


def _world() -> tuple[int, int]:
    from deltaport.devices import process_rank

    return process_rank()


def _check_launch() -> None:
    """Warn when a launcher started fewer processes than it was asked for. ``accelerate launch --cpu
    --num_processes N`` starts several processes only through mpirun (``--mpirun_hostfile``); without it,
    it starts ONE ordinary process and says nothing (accelerate 1.x). The request is read from the
    launcher's own command line (the parent process; Linux ``/proc``), its ``--config_file`` included."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return
    asked = _asked_processes(os.getppid())
    if asked and asked > 1:
        LOG.warning("accelerate launch was asked for %d processes but started 1: with --cpu (or a config with "
                    "distributed_type MULTI_CPU) accelerate starts several processes only through mpirun. Launch "
                    "with --config_file configs/accelerate_cpu_ddp.yaml (torchrun's launcher on CPU, gloo) or "
                    "torchrun --nproc_per_node %d instead; this run trains in one process", asked, asked)


def _asked_processes(pid: int) -> int | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in a for a in argv[:3]):  # `accelerate launch …`, `python -m accelerate.commands.launch …`
        return None
    value = lambda name: next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")  # noqa: E731
                               for i, a in enumerate(argv) if a == name or a.startswith(name + "=")), None)
    n = value("--num_processes") or value("--num-processes")
    if n is None and (cfg := value("--config_file") or value("--config-file")):
        try:
            import yaml

            cfg_path = Path(cfg) if Path(cfg).is_absolute() else Path(f"/proc/{pid}/cwd") / cfg
            n = (yaml.safe_load(cfg_path.read_text()) or {}).get("num_processes")
        except (OSError, ValueError, AttributeError, ImportError):
            return None
    try:
        return int(n) if n is not None else None
    except ValueError:
        return None


@contextlib.contextmanager
def _output_dir(output: Path | None, overwrite: bool, inputs: list):
    """The folder this rank writes into. Rank 0 (the only rank of a one-process run) writes the output
    through :func:`deltaport.io.atomic.atomic_output_dir`: a temporary sibling of ``output``, renamed in
    when complete, so a launch takes one writer lock and publishes once. The other ranks check the
    output location the same way (so a bad output fails every rank alike, before any work) and get a
    private scratch folder: they write nothing next to the output."""
    import tempfile

    if output is None:
        with tempfile.TemporaryDirectory(prefix="deltaport-ft-") as tmp:
            yield Path(tmp)
        return
    rank, _ = _world()
    if rank == 0:
        from deltaport.io.atomic import atomic_output_dir

        with atomic_output_dir(output, overwrite=overwrite, inputs=inputs) as tmp:
            yield tmp
        return
    from deltaport.io.atomic import check_output_location

    out = check_output_location(output, inputs)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it (the new output is "
                          "completed first, then swapped in) or choose another path")
    with tempfile.TemporaryDirectory(prefix=f"deltaport-ft-rank{rank}-") as tmp:
        yield Path(tmp)


def _save_model(trainer, model, path: Path, save_dtype) -> None:
    """Save the full model in ``save_dtype`` as safetensors. Called by every rank: with FSDP or DeepSpeed
    the full weights are gathered collectively; rank 0 writes them. No pickled ``training_args.bin``."""
    import torch

    rank, _ = _world()
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        sd = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # full weights on rank 0
        if rank == 0:
            sd = {k: v.to(save_dtype) for k, v in sd.items()}
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                str(path), state_dict=sd, safe_serialization=True, max_shard_size="5GB")
        return
    if rank == 0:
        saved = copy.deepcopy(model).to(save_dtype) if save_dtype != torch.float32 else model
        saved.save_pretrained(str(path), safe_serialization=True, max_shard_size="5GB")


# --------------------------------------------------------------------------------------------------
# the API


@declared(FinetuneOptions)
def finetune(model, data, output, *, recipe: str = FINETUNE.recipe, steps: int | None = FINETUNE.steps,
             lr: float | None = FINETUNE.lr, batch_size: int | None = FINETUNE.batch_size,
             micro_batch_size: int | None = FINETUNE.micro_batch_size,
             max_seq_length: int | None = FINETUNE.max_seq_length, lora: bool = FINETUNE.lora,
             lora_r: int = FINETUNE.lora_r, lora_alpha: int = FINETUNE.lora_alpha,
             save_every: int | None = FINETUNE.save_every, eval_every: int | None = FINETUNE.eval_every,
             eval_tasks: list[str] | None = FINETUNE.eval_tasks, eval_limit: int | None = FINETUNE.eval_limit,
             chat_template: str | None = FINETUNE.chat_template, device: str | None = FINETUNE.device,
             seed: int = FINETUNE.seed, overwrite: bool = FINETUNE.overwrite, resume: bool = FINETUNE.resume,
             progress: bool = False, callbacks=None, eval_protocol: str = "base", logging_steps: int | None = None,
             work_dir=None) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` (loss on assistant/completion tokens only) and save it to ``output``.

    Args:
        model: model directory, hub id, or an in-memory ``(model, tokenizer)`` pair (copied, never modified).
        data: jsonl/json path, hub dataset ``org/name[:split]``, or a list of records (see module docstring).
        output: output model directory; ``None`` keeps the result in memory only (``FinetuneResult.model``).
        progress: draw progress bars.
        callbacks: ``transformers.TrainerCallback`` instances, or callables ``fn(step, model)`` called at
            step 0 and every ``eval_every`` steps (or every step when ``eval_every`` is None).
        eval_protocol: the lm-eval prompting protocol of the ``eval_every`` evaluations (``base``/``chat``).
        logging_steps: log every N steps (default: the recipe's).
        work_dir: where ``resume`` keeps the trainer state (default ``.OUTPUT.deltaport-work``); given
            without ``resume``, the state is saved there but a run starts afresh.
    """
    t0 = time.time()
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    steps = r.steps if steps is None else steps
    lr = r.lr if lr is None else lr
    batch_size = r.batch_size if batch_size is None else batch_size
    max_seq_length = r.max_seq_length if max_seq_length is None else max_seq_length
    save_every = r.save_every if save_every is None else save_every
    logging_steps = logging_steps or r.logging_steps
    for name, v in (("steps", steps), ("batch_size", batch_size), ("max_seq_length", max_seq_length)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise InputError(f"lr must be positive, got {lr}")
    if eval_every is not None and (eval_every <= 0 or not eval_tasks):
        raise InputError("eval_every needs a positive step count and eval_tasks (lm-eval names or task YAMLs)")
    if save_every is not None and save_every <= 0:
        raise InputError(f"save_every must be positive, got {save_every}")
    recs, data_info = load_records(data)  # a bad data file is refused before torch is imported
    if output is not None:
        from deltaport.io.atomic import check_writable

        check_writable(output)
    rank, world = _world()
    if world == 1:
        _check_launch()
    else:  # the Trainer opens the launch's process group: close it before this process exits
        from deltaport.devices import release_at_exit

        release_at_exit()
    if world > 1 and eval_every is not None:
        raise InputError("--eval-every evaluates the in-memory model in one process; in a multi-GPU run save "
                         "checkpoints (--save-every) and evaluate them with `deltaport eval` instead")
    micro = micro_batch_size or max(1, min(batch_size // world, 8))
    if batch_size % (micro * world):
        raise InputError(f"effective batch {batch_size} is not a multiple of micro-batch {micro} × {world} "
                         "process(es); change --batch-size or --micro-batch-size")
    accum = batch_size // (micro * world)
    device = _resolve_device(device)

    work: Path | None = None
    if resume or work_dir is not None:
        if output is None:
            raise InputError("resumable training (resume/work_dir) needs an output directory")
        if not save_every:
            raise InputError("resumable training needs save_every: the trainer state is saved every N steps")
        work = Path(work_dir) if work_dir is not None else \
            Path(output).absolute().parent / f".{Path(output).name}.deltaport-work"
        if not resume and work.exists() and rank == 0:
            LOG.warning("starting afresh: removing the previous run's trainer state in %s", work)
            shutil.rmtree(work)

    if eval_tasks:  # fail on a bad task before any training
        from deltaport.evaluation import resolve_tasks

        resolve_tasks(eval_tasks)
    out_path = Path(output) if output is not None else None
    # the model directory is protected (output never inside it); a data FILE only has to survive, and does
    inputs = [p for p in (model,) if isinstance(p, (str, Path)) and Path(str(p)).is_dir()]

    import torch
    from transformers import TrainerCallback, set_seed

    set_seed(seed)
    m, tok, src_info, save_dtype = _load(model, device)
    if chat_template is not None:
        tok.chat_template = TULU_CHAT_TEMPLATE if chat_template == "tulu" else chat_template
    if data_info["format"] == "messages" and not getattr(tok, "chat_template", None):
        LOG.warning("tokenizer has no chat template: using the Tülu template the paper trained with")
        tok.chat_template = TULU_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    has_gen = bool(tok.chat_template) and bool(_GENERATION.search(tok.chat_template))
    rows, loss_mode = _to_training_rows(recs, data_info["format"], has_gen)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    use_bf16 = r.bf16_on_gpu and device.startswith("cuda") and torch.cuda.is_bf16_supported()
    log: list[dict] = []
    evals: list[dict] = []
    fn_callbacks = [c for c in (callbacks or []) if not isinstance(c, TrainerCallback)]
    tr_callbacks = [c for c in (callbacks or []) if isinstance(c, TrainerCallback)]

    with _output_dir(out_path, overwrite, inputs) as tmp:
        trainer_dir = (work / "trainer") if work is not None else (tmp / "_trainer")
        ck_root = (work / "checkpoints") if work is not None else (tmp / "checkpoints")
        last_ck = None
        if work is not None and resume and trainer_dir.is_dir():
            from transformers.trainer_utils import get_last_checkpoint

            last_ck = get_last_checkpoint(str(trainer_dir))
        resumed_at = int(last_ck.rsplit("-", 1)[-1]) if last_ck else 0
        if work is not None and resumed_at and (work / "evals.json").is_file():
            evals.extend(e for e in json.loads((work / "evals.json").read_text()) if e["step"] <= resumed_at)
        cfg = SFTConfig(
            output_dir=str(trainer_dir), max_steps=steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum, learning_rate=lr, lr_scheduler_type=r.scheduler,
            warmup_steps=r.warmup_ratio, weight_decay=r.weight_decay, optim="adamw_torch", seed=seed, data_seed=seed,
            logging_steps=logging_steps, report_to=[],
            save_strategy="steps" if work is not None else "no", save_steps=save_every if work is not None else None,
            save_total_limit=1 if work is not None else None, use_cpu=device == "cpu",
            bf16=use_bf16, max_length=max_seq_length, assistant_only_loss=loss_mode == "assistant_only",
            completion_only_loss=True if loss_mode == "completion_only" else None,
            disable_tqdm=not progress, dataset_num_proc=None, packing=False,
        )
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.05, target_modules="all-linear",
                                     task_type="CAUSAL_LM")
        state: dict[str, Any] = {}

        def run_evals(step: int, mdl) -> None:
            last = step == steps
            eval_due = eval_every is not None and (step == 0 or step % eval_every == 0 or last)
            fn_due = bool(fn_callbacks) and (step == 0 or step % (eval_every or 1) == 0 or last)
            if eval_due and any(e["step"] == step for e in evals):  # already done before a resume
                eval_due = False
            if not (eval_due or fn_due):
                return
            was_training = mdl.training
            mdl.eval()
            try:
                if eval_due:
                    from deltaport.evaluation import evaluate

                    res = evaluate({f"step-{step}": (mdl, tok)}, eval_tasks, limit=eval_limit, device=device,
                                   protocol=eval_protocol, seed=seed, progress=progress)
                    evals.append({"step": step, "results": res["results"][f"step-{step}"]})
                    if work is not None:  # whole or not at all: a resume reads it back
                        from deltaport.io.atomic import atomic_write_file

                        text = json.dumps(evals, default=str)
                        atomic_write_file(work / "evals.json", lambda tmp: tmp.write_text(text), overwrite=True)
                if fn_due:
                    with torch.no_grad():
                        for fn in fn_callbacks:
                            fn(step, mdl)
            finally:
                mdl.train(was_training)

        class _Hooks(TrainerCallback):
            def on_train_begin(self, args, st, control, model=None, **kw):
                run_evals(0, model)

            def on_step_end(self, args, st, control, model=None, **kw):
                step = st.global_step
                if save_every and step % save_every == 0 and step != steps:
                    _save_checkpoint(state["trainer"], tok, ck_root / f"step-{step}")
                run_evals(step, model)

        trainer = SFTTrainer(model=m, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_config, callbacks=[_Hooks(), *tr_callbacks])
        if lora and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
            raise InputError("--lora with FSDP or DeepSpeed is not supported (its adapter is not gathered for "
                             "saving); launch LoRA with plain data parallelism (configs/accelerate_cpu_ddp.yaml "
                             "or torchrun) or train without --lora")
        state["trainer"] = trainer
        if not progress:  # Trainer prints every log dict to stdout when tqdm is off; the library stays quiet
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        try:
            if last_ck:
                LOG.warning("resuming training from %s (step %d of %d)", last_ck, resumed_at, steps)
            out = trainer.train(resume_from_checkpoint=last_ck)
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            raise RuntimeFailure(f"{_where()}out of GPU memory while training: {exc}; lower --micro-batch-size or "
                                 "--max-seq-length, use --lora, or launch multi-GPU with FSDP/DeepSpeed") from None
        except Exception as exc:
            if world == 1:
                raise
            # one rank failing makes the others fail in their next collective (or be stopped by the launcher):
            # each says which rank it is, so the first failure can be told from the ones it caused
            raise RuntimeFailure(f"{_where()}training failed: {type(exc).__name__}: {exc}. Nothing was published "
                                 "to the output. In a multi-process run, the first rank that failed is the cause; "
                                 "the others fail in their next collective") from exc
        for e in trainer.state.log_history:
            if "loss" in e:
                log.append({"step": e.get("step"), "loss": e["loss"], "lr": e.get("learning_rate"),
                            "tokens": e.get("num_tokens"), "grad_norm": _f(e.get("grad_norm")),
                            "epoch": e.get("epoch"), "mean_token_accuracy": e.get("mean_token_accuracy")})
        bad = [e for e in log if e["loss"] is None or e["loss"] != e["loss"] or abs(e["loss"]) == float("inf")]
        if bad:
            raise RuntimeFailure(f"training diverged: loss {bad[0]['loss']} at step {bad[0]['step']}; lower --lr")

        final = trainer.model
        if lora:
            if rank == 0:
                (tmp / "adapter").mkdir(exist_ok=True)
                final.save_pretrained(str(tmp / "adapter"))
            final = final.merge_and_unload()
        final.eval()
        _save_model(trainer, final, tmp, save_dtype)
        if rank == 0:
            tok.save_pretrained(str(tmp))
        if work is None:
            shutil.rmtree(trainer_dir, ignore_errors=True)
        elif ck_root.is_dir() and rank == 0:
            shutil.copytree(ck_root, tmp / "checkpoints", dirs_exist_ok=True)
        prov = {
            "tool": "deltaport finetune",
            "deltaport_version": _version(),
            "model": src_info,
            "data": data_info,
            "recipe": recipe,
            "settings": {"steps": steps, "lr": lr, "batch_size": batch_size, "micro_batch_size": micro,
                         "gradient_accumulation_steps": accum, "world_size": world, "scheduler": r.scheduler,
                         "warmup_ratio": r.warmup_ratio, "weight_decay": r.weight_decay, "optimizer": "adamw_torch",
                         "bf16": use_bf16, "max_seq_length": max_seq_length, "seed": seed, "lora": bool(lora),
                         "lora_r": lora_r if lora else None, "lora_alpha": lora_alpha if lora else None,
                         "loss": f"{loss_mode} (token mean per batch)", "device": device,
                         "saved_dtype": str(save_dtype).replace("torch.", ""), "save_every": save_every,
                         "eval_every": eval_every, "eval_tasks": eval_tasks, "eval_limit": eval_limit},
            "train_loss": getattr(out, "training_loss", None),
            "resumed_from_step": resumed_at or None,
            "time_s": round(time.time() - t0, 3),
        }
        if rank == 0:
            (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
            if evals:
                (tmp / "evals.json").write_text(json.dumps(evals, indent=1, default=str) + "\n")
            (tmp / "deltaport.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    if work is not None and rank == 0:  # the output is complete and in place
        shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(output=out_path.absolute() if out_path is not None else None, log=log, evals=evals,
                          provenance=prov, model=final, tokenizer=tok, rank=rank)


def _save_checkpoint(trainer, tok, path: Path) -> None:
    """``checkpoints/step-N/``: a loadable model dir (fp32 master weights; LoRA: the adapter)."""
    import torch

    if _world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    _save_model(trainer, trainer.model, path, torch.float32)
    if _world()[0] == 0:
        tok.save_pretrained(str(path))


def _where() -> str:
    """``rank R of W: `` in a multi-process run (messages say which process failed), else nothing."""
    rank, world = _world()
    return f"rank {rank} of {world}: " if world > 1 else ""


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _version() -> str:
    import deltaport

    return deltaport.__version__

