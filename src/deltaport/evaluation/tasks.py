"""Which tasks an evaluation runs: lm-eval task/group names, local task YAML files and presets, each
turned into a :class:`TaskSpec` (what lm-eval receives, its shots, its table column, its content
identity for the cache), validated before any model is loaded.

A local YAML's relative ``dataset_kwargs.data_files`` are resolved against the YAML's own folder, so a
task works from any working directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import InputError


@dataclass
class TaskSpec:
    """A task as deltaport runs it: what goes to lm-eval, its shots, its table column."""

    name: str  # key in the results (the lm-eval task or group name)
    spec: str | dict  # what simple_evaluate receives
    num_fewshot: int | None = None
    metric: str | None = None  # the metric the comparison table shows (None: the first one)
    label: str | None = None  # column title
    derived: dict[str, list[str]] = field(default_factory=dict)
    fingerprint: str = ""  # content identity for the cache
    include_path: str | None = None  # folder lm-eval must index (group YAMLs)
    source: str | None = None  # the YAML path for local tasks


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_data_files(value: Any, base: Path, yaml_path: Path) -> Any:
    """Make data_files (str | list | dict of those) absolute against the YAML's folder; check they exist."""
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base, yaml_path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve_data_files(v, base, yaml_path) for v in value]
    if isinstance(value, str):
        if "://" in value:
            return value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (base / p)
        if not any(ch in value for ch in "*?[") and not p.exists():
            raise InputError(f"task {yaml_path}: data file {value!r} not found (looked for {p}); paths in "
                             "dataset_kwargs.data_files are relative to the YAML file's folder")
        return str(p)
    return value


def _local_task(path: Path) -> TaskSpec:
    from lm_eval.tasks._yaml_loader import load_yaml

    path = path.expanduser().resolve()
    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as exc:  # noqa: BLE001 - yaml/import errors of many kinds
        raise InputError(f"cannot read task YAML {path}: {type(exc).__name__}: {exc}") from None
    base = path.parent
    h = hashlib.sha256()
    h.update(path.read_bytes())
    for py in sorted(base.glob("*.py")):  # !function helpers live next to the YAML
        h.update(py.name.encode() + b"\0" + py.read_bytes())
    if "group" in cfg and isinstance(cfg.get("task"), list):
        for y in sorted(base.rglob("*.yaml")):
            h.update(str(y.relative_to(base)).encode() + b"\0" + y.read_bytes())
        return TaskSpec(name=cfg["group"], spec=cfg["group"], fingerprint=h.hexdigest(),
                        include_path=str(base), source=str(path))
    if not isinstance(cfg.get("task"), str):
        raise InputError(f"task YAML {path} defines neither a task (`task: NAME`) nor a group "
                         "(`group: NAME` with a `task:` list)")
    dk = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in dk:
        dk["data_files"] = _resolve_data_files(dk["data_files"], base, path)
        cfg["dataset_kwargs"] = dk
        files = dk["data_files"]
        flat = (list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files])
        for f in flat:
            for g in (f if isinstance(f, list) else [f]):
                if Path(g).is_file():
                    h.update(_file_sha(Path(g)).encode())
    dp = cfg.get("dataset_path")
    if isinstance(dp, str) and not Path(dp).is_absolute() and (base / dp).exists():
        cfg["dataset_path"] = str(base / dp)
        h.update(hashlib.sha256(str(base / dp).encode()).hexdigest().encode())
    return TaskSpec(name=cfg["task"], spec=cfg, num_fewshot=None, fingerprint=h.hexdigest(), source=str(path))


def _is_yaml_path(t: str) -> bool:
    return t.endswith((".yaml", ".yml")) or os.sep in t or Path(t).is_file()


def resolve_tasks(tasks: str | list[str] | None, *, preset: str | None = None, num_fewshot: int | None = None,
                  languages: list[str] | None = None, task_manager=None,
                  include_path: str | Path | None = None) -> list[TaskSpec]:
    """Turn task names / YAML paths / a preset into :class:`TaskSpec` s (validated, no model needed).

    ``include_path``: a folder of task YAMLs (lm-eval's ``include_path``); a name found there is taken as
    that YAML file (its data paths relative to its folder, its bytes in the cache key), a group found
    there is run from the folder, and other names are lm-eval's own tasks."""
    from deltaport.evaluation.presets import get_preset

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or [])
    included = _index_include_path(include_path) if include_path is not None else {}
    out: list[TaskSpec] = []
    if preset:
        p = get_preset(preset, languages=languages)
        for pt in p.tasks:
            out.append(TaskSpec(name=pt.task, spec=pt.task, num_fewshot=pt.num_fewshot, metric=pt.metric,
                                label=pt.label, derived=dict(pt.derived), fingerprint=f"lm_eval:{pt.task}"))
    for t in tasks:
        if _is_yaml_path(t):
            p = Path(t)
            if not p.is_file():
                raise InputError(f"task file {t} not found; pass an lm-eval task name or a path to a task YAML")
            out.append(_local_task(p))
        elif t in included:
            kind, yaml_path = included[t]
            if kind == "task":
                out.append(_local_task(yaml_path))
            else:  # a group: lm-eval indexes the folder; its content is the identity
                out.append(TaskSpec(name=t, spec=t, fingerprint=f"include:{t}:{_folder_sha(Path(include_path))}",
                                    include_path=str(Path(include_path).resolve()),
                                    source=str(yaml_path) if yaml_path else None))
        else:
            out.append(TaskSpec(name=t, spec=t, fingerprint=f"lm_eval:{t}"))
    if not out:
        raise InputError("no tasks given; pass --tasks NAME[,NAME...] (lm-eval names or task YAML paths) "
                         "or --preset NAME")
    seen: set[str] = set()
    for ts in out:
        if ts.name in seen:
            raise InputError(f"task {ts.name!r} is listed twice (check --tasks and --preset)")
        seen.add(ts.name)
        if num_fewshot is not None:
            ts.num_fewshot = num_fewshot
    if task_manager is not None:
        check_known_tasks(out, task_manager)
    return out


def _index_include_path(include_path: str | Path) -> dict[str, tuple[str, Path | None]]:
    """``{name: ("task" | "group", yaml path)}`` of the task YAMLs under ``include_path`` (lm-eval's index of
    that folder only: no built-in task is read)."""
    p = Path(include_path).expanduser()
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "not found"
        raise InputError(f"include path {include_path} {what}; --include-path takes a folder of task YAML files "
                         "(to run one YAML file, pass its path to --tasks)")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(p.resolve()), include_defaults=False)
    out: dict[str, tuple[str, Path | None]] = {}
    for name, entry in tm.task_index.items():
        kind = getattr(getattr(entry, "kind", None), "name", "")
        yaml_path = getattr(entry, "yaml_path", None)
        if kind == "TASK" and yaml_path is not None:
            out[name] = ("task", Path(yaml_path).resolve())
        else:  # a group, a tag or a Python task: lm-eval runs it from the folder by name
            out[name] = ("group", Path(yaml_path).resolve() if yaml_path is not None else None)
    if not out:
        raise InputError(f"include path {include_path} holds no task YAML files (lm-eval found no `task:` or "
                         "`group:` in its *.yaml files)")
    return out


def _folder_sha(folder: Path) -> str:
    """The bytes of every file under ``folder`` (a group's YAMLs, helpers and data), with their names."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + _file_sha(f).encode())
    return h.hexdigest()


def check_known_tasks(specs: list[TaskSpec], task_manager) -> None:
    """Raise InputError naming close matches for task names lm-eval does not know."""
    known = set(task_manager.all_tasks)
    for ts in specs:
        if isinstance(ts.spec, str) and ts.spec not in known:
            import difflib

            close = difflib.get_close_matches(ts.spec, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"unknown lm-eval task {ts.spec!r}{hint} (a local task must be a path to its "
                             "YAML file)")


def task_manager_for(specs: list[TaskSpec]):
    """A TaskManager; lm-eval's own ~10k task YAMLs are indexed (~7 s) only when a named task needs them."""
    from lm_eval.tasks import TaskManager

    include = sorted({s.include_path for s in specs if s.include_path})
    needs_defaults = any(isinstance(s.spec, str) and s.include_path is None for s in specs)
    return TaskManager(include_path=include or None, include_defaults=needs_defaults)
