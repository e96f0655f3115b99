"""Minimal stand-ins used ONLY when a deltaport library step cannot be imported.

The lab is a client of ``deltaport.finetune`` / ``deltaport.evaluate`` / ``deltaport.transfer``;
these functions exist so that the lab's task design could be built and frozen before those
landed, and so a run still completes (clearly labelled ``fallback`` in ``results.json`` and the
report) if one of them is missing. They are deliberately small: greedy exact-match scoring and a
plain AdamW loop with loss on the assistant tokens only.
"""

from __future__ import annotations

import random
from typing import Callable


def encode_chat(tok, rec: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) for one ``{"messages": [user, assistant]}`` record."""
    user, asst = rec["messages"][0], rec["messages"][1]
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([user, asst], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids, "chat template prompt is not a prefix of the full conversation"
    return f_ids, [-100] * len(p_ids) + f_ids[len(p_ids):]


def sft(model, tok, records: list[dict], *, steps: int, lr: float, batch_size: int, seed: int = 0,
        callback: Callable[[int, object], None] | None = None, every: int = 0):
    """Fine-tune ``model`` in place on chat records; ``callback(step, model)`` at 0 and every ``every``."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(f"sft-{seed}")
    enc = [encode_chat(tok, r) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    if callback and every:
        callback(0, model)
    order: list[int] = []
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(enc)))
                rng.shuffle(order)
            batch.append(enc[order.pop()])
        n = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[tok.pad_token_id] * (n - len(i)) + i for i, _ in batch])
        lab = torch.tensor([[-100] * (n - len(l)) + l for _, l in batch])
        att = (torch.arange(n)[None, :] >= torch.tensor([n - len(i) for i, _ in batch])[:, None]).long()
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if callback and every and (step + 1) % every == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
    model.eval()
    return model


def score(model, tok, items: list[dict]) -> float:
    """Greedy exact match of the first generated word against ``item["answer"]``."""
    import torch

    prompts = [it["prompt"] for it in items]
    correct = 0
    tok.padding_side = "left"
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            enc = tok(prompts[i:i + 64], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            for j, seq in enumerate(out[:, enc["input_ids"].shape[1]:]):
                words = tok.decode(seq, skip_special_tokens=True).split()
                correct += bool(words) and words[0].lower() == items[i + j]["answer"].lower()
    return correct / max(1, len(items))
