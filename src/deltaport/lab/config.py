"""Typed lab configuration (``deltaport lab run CONFIG.yaml``), loaded from YAML with every error reported.

A config says *what* the lab builds and runs; the presets live in ``deltaport/lab/presets/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaport.errors import InputError

PRESETS_DIR = Path(__file__).parent / "presets"
VERSIONS = ("M1", "M2", "M3", "M4", "M5")
EXPERIMENTS = ("grid", "recovery", "transfer_then_finetune", "iterative", "backport", "language", "connectivity",
               "compression")
#: what each shipped preset costs on one 2-core CPU at 1 torch thread, as measured (docs/lab.md, "Measured"):
#: the one place ``deltaport demo --help`` and the presets' comments take it from
PRESET_COST = {
    "quick": "one seed; design v5 at 1 thread in a fresh directory: 231 s of CPU, 236 s wall beside one other "
             "CPU-bound job; --threads 2 (family reused): 152 s of CPU, 104 s wall; --noise-twin adds ~150 s of CPU",
    "full": "seeds 0-4, each with its noise twin; design v5: 9-16 min wall per seed at 1 thread, two seeds at a "
            "time, plus ~700 s of CPU per twin (2 threads, 7.5-8.5 min wall alone); 78 min wall for all of it",
    "ci": "structure only, ~1 min",
    "size-s": "a 49 k-parameter family, the grid and connectivity (for calibrating check): not measured",
    "size-m": "a 0.94 M-parameter family, the grid and connectivity: not measured",
    "size-l": "a 5.5 M-parameter family, the grid and connectivity: not measured",
}


class LabConfigError(InputError):
    """The lab config is not well-formed (every problem is listed)."""


@dataclass(frozen=True)
class WorldConfig:
    n_entities: int = 240
    """number of invented countries (one flag fact each)"""
    n_sft: int = 40
    """F1 facts used for fine-tuning; the other F1 facts are the held-out "known" set"""
    f1_fraction: float = 0.5
    """fraction of entities whose facts are in stage-1 text (F1); the rest (F2) arrive in stage 2"""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    seq_len: int = 48


@dataclass(frozen=True)
class PretrainConfig:
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    stage1_steps: list[int] = field(default_factory=lambda: [300, 600, 900])
    """steps at which M1, M2, M3 are saved (one stage-1 run)"""
    stage2_steps: list[int] = field(default_factory=lambda: [200, 400])
    """steps after M3 at which M4, M5 are saved (the run continues on the stage-2 mix, lr decays to 0)"""
    stage1_mix: dict[str, float] = field(default_factory=lambda: {"f1": 0.3, "f2": 0.0, "filler": 0.7, "lang_b": 0.2})
    stage2_mix: dict[str, float] = field(default_factory=lambda: {"f1": 0.3, "f2": 0.4, "filler": 0.3, "lang_b": 0.2})
    mx_like: str = "M5"
    """Mx follows the same data schedule as this version, from another random initialisation"""
    unseen_rows: str = "random"
    """input-embedding rows of the tokens the pretraining text never contains (chat markers, the question
    words; ``deltaport.lab.world.unseen_in_pretraining``): ``random`` keeps the seed's initialisation (v1-v3),
    ``zero`` sets them to 0 in every model of the family (design v4, docs/lab.md: their random draw decided
    whether plain fine-tuning found the interface)"""


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 8
    curve_every: int = 10
    """evaluation interval (steps) for convergence curves (experiment 3, 4)"""


@dataclass(frozen=True)
class LabConfig:
    name: str = "custom"
    seed: int = 0
    """seed of the world, of M1..M5 and of fine-tuning; Mx uses seed + 1000, M0 seed + 2000"""
    seeds: list[int] | None = None
    """seeds run by default (``deltaport demo --preset full``): one run per seed and a summary with intervals;
    ``--seed``/``--seeds`` override"""
    versions: list[str] = field(default_factory=lambda: list(VERSIONS))
    """versions included in the grid (M0 and Mx are always built)"""
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_limit: int | None = None
    """items per eval task (None = all)"""
    curve_pairs: list[list[str]] = field(default_factory=lambda: [["M3", "M2"], ["M5", "M4"]])
    """[target, source] pairs for transfer-then-finetune convergence curves"""
    ttf_all_pairs: bool = False
    """transfer-then-finetune from every M_t + Δ_s (Table 4), not only the curve pairs"""
    language_pair: list[str] | None = None
    """[source, target] for the second-language experiment (default: the last two versions)"""
    connectivity_points: int = 11
    connectivity_items: int = 64
    compression: list[dict] = field(default_factory=lambda: [{"method": "sign"}])
    """settings of the compression experiment, e.g. ``{method: lowrank, rank: 4}``, ``{method: sparse, density:
    0.3}``, ``{method: sign, include: ["."]}`` (deltaport.lab.compression)"""
    threads: int = 1
    """torch threads of every step (part of every cache key: another thread count rounds differently)"""
    init_ulp: int = 0
    """move every initial weight (the M1..M5 run, Mx, M0) up by this many ULPs: floating-point noise only, used
    by the noise twin (deltaport.lab.noise); 0 in every preset"""
    noise_twin: bool = False
    """also run the seed's noise twin (same config and seed, only floating-point noise changed:
    :func:`deltaport.lab.noise.twin_config`) into ``RUN_DIR/twin`` and record the noise spread of every
    claim and score"""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def family_key(self) -> dict[str, Any]:
        """The part of the config the model family depends on (its cache key)."""
        d = self.to_dict()
        key = {k: d[k] for k in ("seed", "world", "model", "pretrain")}
        if key["pretrain"].get("unseen_rows") == "random":  # the default: every family built before v4 keeps its hash
            key["pretrain"] = {k: v for k, v in key["pretrain"].items() if k != "unseen_rows"}
        if self.init_ulp:  # only when set, so that every family built before the noise twin keeps its hash
            key["init_ulp"] = self.init_ulp
        return key


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cls, data: Any, where: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            errors.append(f"{where}.{k}: unknown key (known: {', '.join(fields)})")
            continue
        sub = {"world": WorldConfig, "model": ModelConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig}
        if cls is LabConfig and k in sub:
            kwargs[k] = _build(sub[k], v, f"{where}.{k}", errors)
        else:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive
        errors.append(f"{where}: {exc}")
        return cls()


def validate(cfg: LabConfig) -> list[str]:
    errors = []
    for v in cfg.versions:
        if v not in VERSIONS:
            errors.append(f"versions: {v!r} is not one of {', '.join(VERSIONS)}")
    if len(cfg.versions) < 2:
        errors.append("versions: need at least two versions for a transfer grid")
    for e in cfg.experiments:
        if e not in EXPERIMENTS:
            errors.append(f"experiments: {e!r} is not one of {', '.join(EXPERIMENTS)}")
    if len(cfg.pretrain.stage1_steps) != 3 or sorted(cfg.pretrain.stage1_steps) != list(cfg.pretrain.stage1_steps):
        errors.append("pretrain.stage1_steps: need 3 increasing step counts (M1, M2, M3)")
    if len(cfg.pretrain.stage2_steps) != 2 or sorted(cfg.pretrain.stage2_steps) != list(cfg.pretrain.stage2_steps):
        errors.append("pretrain.stage2_steps: need 2 increasing step counts (M4, M5)")
    if cfg.pretrain.unseen_rows not in ("random", "zero"):
        errors.append(f"pretrain.unseen_rows: {cfg.pretrain.unseen_rows!r} is not one of random, zero")
    if cfg.pretrain.mx_like not in VERSIONS:
        errors.append(f"pretrain.mx_like: {cfg.pretrain.mx_like!r} is not one of {', '.join(VERSIONS)}")
    for mixname in ("stage1_mix", "stage2_mix"):
        mix = getattr(cfg.pretrain, mixname)
        if set(mix) != {"f1", "f2", "filler", "lang_b"}:
            errors.append(f"pretrain.{mixname}: keys must be f1, f2, filler, lang_b")
    for pair in cfg.curve_pairs:
        if len(pair) != 2 or any(p not in cfg.versions for p in pair) or pair[0] == pair[1]:
            errors.append(f"curve_pairs: {pair!r} must be [target, source], two different versions of `versions`")
    if cfg.language_pair is not None and (len(cfg.language_pair) != 2 or any(
            p not in cfg.versions for p in cfg.language_pair)):
        errors.append("language_pair: must be [source, target], two versions of `versions`")
    if cfg.model.hidden_size % cfg.model.num_attention_heads:
        errors.append("model.hidden_size must be divisible by model.num_attention_heads")
    if cfg.seeds is not None and (not isinstance(cfg.seeds, list) or len(cfg.seeds) < 2
                                  or not all(isinstance(x, int) for x in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds)):
        errors.append(f"seeds: need a list of at least two different integers, got {cfg.seeds!r}")
    if "compression" in cfg.experiments:
        from deltaport.lab.compression import setting_errors

        errors += setting_errors(cfg.compression)
    if not isinstance(cfg.init_ulp, int) or cfg.init_ulp < 0:
        errors.append(f"init_ulp: need a non-negative integer, got {cfg.init_ulp!r}")
    if not isinstance(cfg.threads, int) or cfg.threads < 1:
        errors.append(f"threads: need a positive integer, got {cfg.threads!r}")
    if cfg.finetune.curve_every <= 0 or cfg.finetune.steps <= 0:
        errors.append("finetune.steps and finetune.curve_every must be positive")
    return errors


def load_config(path_or_name: str | Path) -> LabConfig:
    """Load a lab config from a YAML file, or a preset by name (``ci``, ``quick``, ``full``)."""
    import yaml

    path = Path(path_or_name)
    # a preset name wins over a same-named directory: `lab run full -o full` leaves a run directory
    # called "full" in the working directory, and the next `lab run full` must still mean the preset
    if not path.is_file() and (PRESETS_DIR / f"{path_or_name}.yaml").exists():
        path = PRESETS_DIR / f"{path_or_name}.yaml"
    if path.is_dir():
        raise LabConfigError(f"lab config {str(path_or_name)!r} is a directory: give a YAML file or a preset "
                             f"name ({', '.join(sorted(p.stem for p in PRESETS_DIR.glob('*.yaml')))})")
    if not path.exists():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise LabConfigError(f"lab config {str(path_or_name)!r} not found: give a YAML file or a preset name "
                             f"({', '.join(presets)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LabConfigError(f"lab config {path}: not valid YAML: {exc}") from exc
    errors: list[str] = []
    cfg = _build(LabConfig, data, path.name, errors)
    errors += validate(cfg)  # report every problem at once
    if errors:
        raise LabConfigError(f"lab config {path} is not well-formed:\n  " + "\n  ".join(errors))
    return cfg
