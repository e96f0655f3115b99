"""deltaport's use of lm-evaluation-harness: building lm-eval's model (HFLM / VLLM), one
``simple_evaluate`` call per few-shot count, and what is patched around that call (lm-eval's costly
environment report; progress bars when they are not wanted). Everything that knows lm-eval's
calling conventions lives here.
"""

from __future__ import annotations

import contextlib
import os
import time

from deltaport.errors import InputError, RuntimeFailure
from deltaport.evaluation.models import EvalModel
from deltaport.evaluation.results import parse_metrics
from deltaport.evaluation.tasks import TaskSpec


def build_lm(m: EvalModel, *, backend: str, device: str, batch_size, seed: int, model_args: dict):
    """lm-eval's model for ``m``: ``HFLM`` (from disk, or the in-memory pair as is) or ``VLLM`` (from disk)."""
    if backend == "vllm":
        import importlib.util

        if isinstance(m.source, tuple):
            raise InputError(f"model {m.name!r}: the vllm backend loads models from disk; save the model "
                             "first or use backend='hf' for in-memory models")
        if importlib.util.find_spec("vllm") is None:
            raise InputError("backend 'vllm' needs the vllm package (pip install vllm, on a CUDA machine); "
                             "use --backend hf otherwise")
        from lm_eval.models.vllm_causallms import VLLM

        args = {"pretrained": str(m.local_dir), "dtype": "auto", "seed": seed, "gpu_memory_utilization": 0.9,
                "batch_size": batch_size, **model_args}
        return VLLM(**args)
    from lm_eval.models.huggingface import HFLM

    if isinstance(m.source, tuple):
        model, tok = m.source
        if tok.pad_token is None:
            raise InputError(f"model {m.name!r}: the tokenizer has no pad token; set tok.pad_token "
                             "(e.g. to the eos token) before evaluating")
        return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **model_args)
    args = {"dtype": "auto", **model_args}
    if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate makes CPU processes one group (gloo) only when told they are CPU processes; HFLM's own
        # Accelerator() then joins this state instead of treating each process as alone
        from accelerate import PartialState

        from deltaport.devices import release_at_exit

        PartialState(cpu=True)
        release_at_exit()
    lm = HFLM(pretrained=str(m.local_dir), device=device, batch_size=batch_size, **args)
    _data_parallel_on_cpu(lm)
    return lm


def _data_parallel_on_cpu(lm) -> None:
    """Under ``torchrun`` / ``accelerate launch`` on CPU processes, turn on lm-eval's own data-parallel path.

    HFLM creates an ``Accelerator`` (one process group, gloo on CPU) but enables data parallelism only when
    it counts more than one CUDA device; on CPU every process would score every item. Here each process
    gets the rank and world size HFLM sets on GPUs (``accelerator.process_index`` / ``num_processes``), so
    lm-eval splits the items across the processes and gathers the per-item metrics on rank 0 (its
    ``gather_object``); the scores are computed from the same items as in one process."""
    acc = getattr(lm, "accelerator", None)
    if acc is None or acc.num_processes <= 1 or lm.world_size != 1 or acc.device.type != "cpu":
        return
    if not (hasattr(lm, "_rank") and hasattr(lm, "_world_size")):  # pragma: no cover - a future lm-eval
        raise RuntimeFailure("this lm-eval's HFLM keeps its rank elsewhere; evaluate on CPU in one process "
                             "(without torchrun/accelerate launch)")
    lm._rank, lm._world_size = acc.process_index, acc.num_processes


def by_fewshot(specs: list[TaskSpec]) -> list[list[TaskSpec]]:
    """``specs`` grouped by few-shot count (lm-eval takes one ``num_fewshot`` per call), in first-seen order."""
    groups: dict[int | None, list[TaskSpec]] = {}
    for ts in specs:
        groups.setdefault(ts.num_fewshot, []).append(ts)
    return list(groups.values())


@contextlib.contextmanager
def progress_bars(show: bool):
    """With ``show`` false, no tqdm bar is drawn inside the block (lm-eval's request and context bars,
    transformers' and datasets' loading bars: all are tqdm's). lm-eval passes ``disable=False`` itself,
    so ``TQDM_DISABLE`` is not enough; tqdm's constructor is wrapped for the block and restored after
    (process-wide while it lasts: a bar another thread starts meanwhile is not drawn either)."""
    if show:
        yield
        return
    import tqdm

    real = tqdm.tqdm.__init__

    def init(self, *args, **kwargs):
        kwargs["disable"] = True
        real(self, *args, **kwargs)

    tqdm.tqdm.__init__ = init
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = real


@contextlib.contextmanager
def _cheap_env_info(lm_eval):
    """lm-eval records ``torch.utils.collect_env`` output in every result (~0.8 s: it spawns pip and
    friends) and the git hash of the working directory; deltaport keeps neither, so for our calls they
    are replaced by versions only and no hash."""
    ev = getattr(lm_eval, "evaluator", None)
    real = getattr(ev, "add_env_info", None)
    if real is None:  # a future lm-eval without it: nothing to do
        yield
        return

    def cheap(storage: dict) -> None:
        import transformers

        storage.update({"pretty_env_info": "not collected (deltaport)", "transformers_version":
                        transformers.__version__, "lm_eval_version": getattr(lm_eval, "__version__", "?"),
                        "upper_git_hash": None})

    real_git = getattr(ev, "get_git_commit_hash", None)
    ev.add_env_info = cheap
    if real_git is not None:
        # it runs `git describe` in the working directory, which prints "fatal: not a git repository"
        # to the terminal outside a checkout; the hash is of the cwd, not of anything evaluated
        ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.add_env_info = real
        if real_git is not None:
            ev.get_git_commit_hash = real_git


def _subtasks(group_subtasks: dict, name: str) -> list[str]:
    out, todo = [], list(group_subtasks.get(name, []))
    while todo:
        t = todo.pop(0)
        out.append(t)
        todo.extend(group_subtasks.get(t, []))
    return out


def parse_gen_kwargs(value) -> dict | None:
    """``--gen-kwargs`` as lm-eval's CLI reads it: a JSON object, or ``k=v,k=v`` (values through
    ``ast.literal_eval`` where they parse: ``stop=["\\n"]``, ``temperature=0``); a dict passes as is.
    A malformed string is an InputError that says the form."""
    if value is None or isinstance(value, dict):
        return dict(value) if value else None
    if not isinstance(value, str):
        raise InputError(f"gen_kwargs must be a dict or a 'k=v,k=v' string, got {type(value).__name__}")
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    form = "use k=v pairs separated by commas (temperature=0,max_gen_toks=64) or a JSON object"
    try:
        parsed = try_parse_json(value)
        parsed = parsed if isinstance(parsed, dict) else key_val_to_dict(value)
    except ValueError as exc:
        raise InputError(f"--gen-kwargs {value!r} is malformed ({exc}); {form}") from None
    bad = [k for k in parsed if not isinstance(k, str) or not k.strip().isidentifier()]
    if bad:
        raise InputError(f"--gen-kwargs {value!r}: {bad[0]!r} is not an argument name; {form}")
    return {k.strip(): v for k, v in parsed.items()} or None


def fewshot_as_multiturn_for(proto: str, requested: bool | None) -> bool:
    """lm-eval's rule: multi-turn few-shot needs a chat template; with one it is the default."""
    return proto == "chat" and requested is not False


def run_group(lm_eval, m: EvalModel, group: list[TaskSpec], proto: str, tm, *, limit, device, seed,
              batch_size, gen_kwargs: dict | None = None, system_instruction: str | None = None,
              fewshot_as_multiturn: bool | None = None) -> dict[str, dict]:
    """One simple_evaluate call for tasks sharing a few-shot count; a record per task, with its per-item
    records (``items``: :mod:`.items`) and lm-eval's own entries for its results file (``lm_eval``)."""
    import lm_eval.evaluator  # noqa: F401 - make sure the submodule is loaded for _cheap_env_info

    from deltaport.evaluation.items import lm_eval_parts, records_from_samples

    chat = proto == "chat"
    names = ", ".join(ts.name for ts in group)
    t0 = time.time()
    try:
        with _cheap_env_info(lm_eval):
            out = lm_eval.simple_evaluate(
                model=m.lm, tasks=[ts.spec for ts in group], num_fewshot=group[0].num_fewshot, limit=limit,
                device=device, batch_size=batch_size, task_manager=tm, apply_chat_template=chat,
                fewshot_as_multiturn=fewshot_as_multiturn_for(proto, fewshot_as_multiturn), log_samples=True,
                gen_kwargs=gen_kwargs, system_instruction=system_instruction,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                verbosity=None,
            )
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(f"lm-eval could not run task(s) {names} on model {m.name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - surface any harness failure as a deltaport error
        raise RuntimeFailure(f"lm-eval failed on task(s) {names}, model {m.name!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if out is None:  # non-zero rank in a distributed run: rank 0 holds the scores and the per-item records
        return {ts.name: {"metrics": {}, "subtasks": {}, "items": {}, "lm_eval": {}} for ts in group}
    res = out.get("results", {})
    gs = out.get("group_subtasks", {}) or {}
    elapsed = round(time.time() - t0, 3)
    recs = {}
    for ts in group:
        if ts.name not in res:
            raise RuntimeFailure(f"lm-eval returned no result for {ts.name!r} (got {sorted(res)}); a group needs "
                                 "an aggregate_metric_list to report one score")
        subs = _subtasks(gs, ts.name)
        mine = [ts.name, *subs]
        recs[ts.name] = {
            "metrics": parse_metrics(res[ts.name]),
            "subtasks": {k: parse_metrics(res[k]) for k in subs if k in res},
            "n_samples": {k: v for k, v in (out.get("n-samples") or {}).items() if k in mine},
            "n_shot": {k: v for k, v in (out.get("n-shot") or {}).items() if k in mine},
            "versions": {k: v for k, v in (out.get("versions") or {}).items() if k in mine},
            "protocol": proto,
            "apply_chat_template": chat,
            "output_types": sorted({str((out.get("configs") or {}).get(k, {}).get("output_type")) for k in mine
                                    if k in (out.get("configs") or {})}),
            "items": {k: records_from_samples(v) for k, v in (out.get("samples") or {}).items() if k in mine},
            "lm_eval": lm_eval_parts(out, mine),
            "time_s": elapsed,  # of the whole call (tasks sharing a few-shot count run together)
        }
    return recs
