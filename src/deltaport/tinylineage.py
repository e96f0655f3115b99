"""A tiny, fast "model lineage" for the diagnostics' tests and the calibration of ``deltaport check``.

A synthetic language (first-order Markov chains over the word tokens of
:func:`deltaport.testing.make_tokenizer`, 64 tokens), a stage-2 data shift (a second chain mixed in),
and a fine-tuning task ("Q x A y ." with a fixed mapping x → y that pretraining never shows).
Models are :func:`deltaport.testing.make_model` tiny Llamas; 1-thread training of a few hundred
steps takes seconds. Everything is a deterministic function of the seeds; nothing is downloaded.

Versions built by :func:`build_grid` (one "family" per ``family_seed``):

* ``v1``: pretrained from init seed on stage-1 text;
* ``v2``: ``v1`` continued on stage-1 text (within-lineage);
* ``v3``: ``v2`` continued on stage-2 text (cross-stage data shift);
* ``v2x``: same schedule as ``v2`` from another init seed (independent seed);
* ``rand``: random init, never trained;

and ``ft_<v>`` = ``<v>`` fine-tuned on the task, for every version.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

N_EXTRA = 33  # make_tokenizer's 31 tokens + 33 = vocabulary of 64
EXTRA_WORDS = [f"w{i:02d}" for i in range(N_EXTRA)]


def tokenizer():
    from deltaport.testing import make_tokenizer

    return make_tokenizer(extra_words=EXTRA_WORDS)


def _content_ids(tok) -> list[int]:
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


class Language:
    """Markov chains over the content tokens; ``shifted`` re-draws the successors of half the tokens."""

    def __init__(self, tok, world_seed: int = 1234):
        self.ids = _content_ids(tok)
        self.tok = tok
        rng = random.Random(world_seed)
        self.chain1 = {t: rng.sample(self.ids, 3) for t in self.ids}
        self.chain2 = dict(self.chain1)
        for t in rng.sample(self.ids, len(self.ids) // 2):
            self.chain2[t] = rng.sample(self.ids, 3)
        task_x = rng.sample(self.ids, 16)
        ys = rng.sample(self.ids, 16)
        self.task = dict(zip(task_x, ys))
        self.q, self.a, self.dot = (tok.convert_tokens_to_ids(w) for w in ("Q", "A", "."))

    def doc(self, rng: random.Random, stage: int, length: int = 32) -> list[int]:
        chain = self.chain1 if stage == 1 or (stage == 2 and rng.random() < 0.5) else self.chain2
        t = rng.choice(self.ids)
        out = [t]
        for _ in range(length - 1):
            r = rng.random()
            nxt = chain[t]
            t = nxt[0] if r < 0.6 else nxt[1] if r < 0.9 else nxt[2]
            out.append(t)
        return out

    def docs(self, n: int, stage: int, seed: int, length: int = 32) -> list[list[int]]:
        rng = random.Random(seed)
        return [self.doc(rng, stage, length) for _ in range(n)]

    def texts(self, n: int, stage: int, seed: int, length: int = 32) -> list[str]:
        return [" ".join(self.tok.convert_ids_to_tokens(d)) for d in self.docs(n, stage, seed, length)]

    def task_batch(self) -> torch.Tensor:
        """All task items as rows ``Q x A y .`` (5 tokens)."""
        return torch.tensor([[self.q, x, self.a, y, self.dot] for x, y in self.task.items()], dtype=torch.long)


def train(model, batches_fn, steps: int, *, lr: float = 3e-3, seed: int = 0):
    """``steps`` AdamW steps of next-token loss on ``batches_fn(rng) -> LongTensor[B, T]``; returns model."""
    gen = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = batches_fn(gen)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def text_batches(lang: Language, stage: int, batch: int = 16, length: int = 32):
    def fn(rng: random.Random) -> torch.Tensor:
        return torch.tensor([lang.doc(rng, stage, length) for _ in range(batch)], dtype=torch.long)

    return fn


def task_batches(lang: Language, stage: int = 1, mix: int = 4, length: int = 20):
    """Fine-tuning batches: every task item plus ``mix`` text rows (gentle SFT that keeps the LM)."""
    items = lang.task_batch()

    def fn(rng: random.Random) -> torch.Tensor:
        text = torch.tensor([lang.doc(rng, stage, items.shape[1]) for _ in range(mix)], dtype=torch.long)
        return torch.cat([items, text])

    return fn


@torch.no_grad()
def task_nll(model, lang: Language) -> float:
    """Mean NLL of the answer token y given ``Q x A`` over all task items."""
    items = lang.task_batch()
    logits = model(input_ids=items[:, :3], use_cache=False).logits[:, -1].float()
    return float(torch.nn.functional.cross_entropy(logits, items[:, 3]))


def pretrain(init_seed: int, lang: Language, steps: int, *, stage: int = 1, data_seed: int = 0, model=None,
             **overrides):
    """A tiny Llama (``make_model``) trained ``steps`` steps on stage-``stage`` text (continuing ``model``)."""
    import copy

    from deltaport.testing import make_model

    m = copy.deepcopy(model) if model is not None else make_model("llama", seed=init_seed, vocab_size=64, **overrides)
    torch.manual_seed(init_seed)
    return train(m, text_batches(lang, stage), steps, seed=data_seed)


def finetune(model, lang: Language, steps: int = 150, *, lr: float = 3e-3, seed: int = 0):
    import copy

    return train(copy.deepcopy(model), task_batches(lang), steps, lr=lr, seed=seed)


def build_grid(root: str | Path, family_seed: int, *, steps: int = 400, ft_steps: int = 150, save: bool = True,
               **overrides) -> dict[str, object]:
    """Build one family (see the module docstring) under ``root``; returns name -> path (or model)."""
    from deltaport.testing import save as save_model

    torch.set_num_threads(1)
    lang = Language(tokenizer())
    s = 1000 * (family_seed + 1)
    models = {}
    models["v1"] = pretrain(s + 1, lang, steps, data_seed=s + 11, **overrides)
    models["v2"] = pretrain(s + 1, lang, steps // 2, data_seed=s + 12, model=models["v1"])
    models["v3"] = pretrain(s + 1, lang, steps // 2, stage=2, data_seed=s + 13, model=models["v2"])
    vx = pretrain(s + 2, lang, steps, data_seed=s + 21, **overrides)
    models["v2x"] = pretrain(s + 2, lang, steps // 2, data_seed=s + 22, model=vx)
    from deltaport.testing import make_model

    models["rand"] = make_model("llama", seed=s + 3, vocab_size=64, **overrides)
    for name in ("v1", "v2", "v3", "v2x", "rand"):
        models[f"ft_{name}"] = finetune(models[name], lang, ft_steps, seed=s + 31)
    if not save:
        return models
    root = Path(root)
    tok = tokenizer()
    return {name: save_model(m, root / name, tokenizer=tok, max_shard_size="10MB") for name, m in models.items()}
