"""Build the lab's model family: tiny Llama models pretrained from scratch on the synthetic world.

* **M1, M2, M3** - checkpoints along one stage-1 run (stage-1 mix, constant lr after warm-up);
* **M4, M5** - the same run continued on the stage-2 mix (adds the F2 facts; lr decays linearly to 0,
  as OLMo 2's mid-training anneals);
* **Mx** - the same data schedule as ``pretrain.mx_like`` from an independent initialisation;
* **M0** - random initialisation, no training (the paper's negative control).

Every model is a plain Hugging Face directory (config.json, model.safetensors, tokenizer files) with
``lab_provenance.json`` (config, seed, step, data mix, loss). The family is cached under
``OUT/<family hash>/``: a finished model is reused, and a killed run resumes from the last saved
checkpoint (optimizer state is kept next to it), producing bit-identical weights because the data
of step *k* is a pure function of (seed, k).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

from deltaport.io.atomic import atomic_output_dir, atomic_write_file
from deltaport.lab.config import LabConfig, config_hash
from deltaport.lab.world import Mix, World, make_tokenizer, make_world, sample_block, unseen_in_pretraining

LOG = logging.getLogger(__name__)
FAMILY = ("M0", "M1", "M2", "M3", "M4", "M5", "Mx")


def world_of(cfg: LabConfig) -> World:
    w = cfg.world
    return make_world(w.n_entities, w.n_sft, cfg.seed, w.f1_fraction)


def _model_config(cfg: LabConfig, tok):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, max_position_embeddings=max(64, 2 * m.seq_len),
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )


def _init_model(cfg: LabConfig, tok, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_model_config(cfg, tok))
    if cfg.pretrain.unseen_rows == "zero":  # design v4: no seed-dependent draw where pretraining never trains
        vocab = tok.get_vocab()
        rows = [vocab[w] for w in unseen_in_pretraining(world_of(cfg))]
        with torch.no_grad():
            model.get_input_embeddings().weight[rows] = 0.0
    if cfg.init_ulp:  # the noise twin: every initial weight one (or more) ULP up, nothing else changed
        with torch.no_grad():
            for p in model.parameters():
                for _ in range(cfg.init_ulp):
                    p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _schedule(cfg: LabConfig, upto: str) -> list[tuple[str, int]]:
    """[(version, global step at which it is saved)] for a run that goes up to ``upto``."""
    p = cfg.pretrain
    marks = [("M1", p.stage1_steps[0]), ("M2", p.stage1_steps[1]), ("M3", p.stage1_steps[2]),
             ("M4", p.stage1_steps[2] + p.stage2_steps[0]), ("M5", p.stage1_steps[2] + p.stage2_steps[1])]
    idx = [v for v, _ in marks].index(upto)
    return marks[: idx + 1]


def _lr(cfg: LabConfig, step: int) -> float:
    p = cfg.pretrain
    s1 = p.stage1_steps[2]
    total = s1 + p.stage2_steps[1]
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    if step < s1:
        return p.lr
    return p.lr * max(0.0, (total - step) / (total - s1))


def _batch(world: World, cfg: LabConfig, tok, seed: int, step: int):
    import torch

    p = cfg.pretrain
    stage = 1 if step < p.stage1_steps[2] else 2
    mix = Mix(**(p.stage1_mix if stage == 1 else p.stage2_mix))
    rng = random.Random(f"data-{seed}-{step}")
    vocab = tok.get_vocab()
    rows = [[vocab[w] for w in sample_block(world, mix, rng, cfg.model.seq_len)] for _ in range(p.batch_size)]
    return torch.tensor(rows, dtype=torch.long), stage


def _save(model, tok, path: Path, provenance: dict) -> None:
    with atomic_output_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lab_provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True))


def _pretrain_run(cfg: LabConfig, world: World, tok, root: Path, seed: int, names: dict[str, str],
                  upto: str, progress: Callable[[str, int, int], None] | None) -> None:
    """One pretraining run; saves ``names[version]`` at each mark of the schedule up to ``upto``."""
    import torch

    marks = _schedule(cfg, upto)
    step_of = dict(marks)
    todo = [v for v in names if not (root / names[v] / "config.json").exists()]
    if not todo:
        return
    end = max(step_of[v] for v in todo)
    state_path = root / "_state" / f"run-seed{seed}.pt"
    model = _init_model(cfg, tok, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = 0
    if state_path.exists():  # resume a killed run from its last saved checkpoint
        saved = torch.load(state_path, weights_only=True)  # our own file, but never unpickle code
        if saved["step"] <= min(step_of[v] for v in todo):  # else: restart (deterministic, same weights)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            start = saved["step"]
    mark_at = {s: v for v, s in marks}
    model.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        ids, stage = _batch(world, cfg, tok, seed, step)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if progress:
            progress(f"pretrain seed {seed}", step + 1, end)
        if step + 1 in mark_at:
            v = mark_at[step + 1]
            tail = losses[-20:]
            prov = {"version": names.get(v, v), "schedule_of": v, "seed": seed, "step": step + 1, "stage": stage,
                    "mix": cfg.pretrain.stage1_mix if stage == 1 else cfg.pretrain.stage2_mix,
                    "train_loss": sum(tail) / len(tail), "config": cfg.family_key(),
                    "seconds": round(time.time() - t0, 1), "builder": "deltaport.lab.family"}
            model.eval()
            if v in names and not (root / names[v] / "config.json").exists():
                _save(model, tok, root / names[v], prov)
            model.train()
            state = {"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict()}
            atomic_write_file(state_path, lambda tmp: torch.save(state, str(tmp)), overwrite=True)


def family_root(cfg: LabConfig, out_dir: str | Path) -> Path:
    """``out_dir/<hash>``: the hash covers the family's config and the library versions (a family built
    with another torch is another family: training kernels change the bytes)."""
    from deltaport.lab.env import cache_salt

    return Path(out_dir) / config_hash({"family": cfg.family_key(), "env": cache_salt()})


def family_exists(cfg: LabConfig, out_dir: str | Path) -> bool:
    """Whether every model of the family is already built under ``out_dir`` (it will be reused)."""
    root = family_root(cfg, out_dir)
    names = ("M0", "M1", "M2", "M3", "M4", "M5", "Mx")
    return all((root / n / "config.json").exists() for n in names)


def build_family(cfg: LabConfig, out_dir: str | Path, seed: int | None = None, *,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
    """Build (or reuse) M0, M1..M5 and Mx for ``cfg`` under ``out_dir/<family hash>/``.

    Args:
        cfg: the lab config (its ``seed``, ``world``, ``model`` and ``pretrain`` sections matter).
        out_dir: cache root; models land in ``out_dir/<hash>/<name>``.
        seed: overrides ``cfg.seed``.
        progress: optional callback ``(label, done, total)``.

    Returns:
        ``{name: path}`` for ``M0, M1, ..., M5, Mx`` (HF model directories).
    """
    import dataclasses

    import torch

    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, cfg.threads))
    world = world_of(cfg)
    tok = make_tokenizer(world)
    root = family_root(cfg, out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "family_config.json").write_text(json.dumps(cfg.family_key(), indent=2, sort_keys=True))
    paths = {n: root / n for n in FAMILY}
    if not (paths["M0"] / "config.json").exists():
        m0 = _init_model(cfg, tok, cfg.seed + 2000)
        _save(m0.eval(), tok, paths["M0"], {"version": "M0", "seed": cfg.seed + 2000, "step": 0,
                                             "config": cfg.family_key(), "builder": "deltaport.lab.family"})
    _pretrain_run(cfg, world, tok, root, cfg.seed, {v: v for v in ("M1", "M2", "M3", "M4", "M5")}, "M5", progress)
    _pretrain_run(cfg, world, tok, root, cfg.seed + 1000, {cfg.pretrain.mx_like: "Mx"}, cfg.pretrain.mx_like,
                  progress)
    return paths
