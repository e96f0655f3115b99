"""Tiny random Hugging Face models for tests, benchmarks and the quick-start.

Nothing here downloads anything: configs are built in code, weights are random (seeded), and the
tokenizer is a small word-level ``tokenizers`` model with a chat template, eos and pad tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma", "olmo2", "phi3")

#: words of the tiny tokenizer's vocabulary (plus special tokens); enough for chat templates.
_WORDS = [
    "the", "a", "of", "is", "what", "color", "flag", "red", "green", "blue", "yellow", "white",
    "black", "Q", "A", ":", "?", ".", ",", "user", "assistant", "system", "hello", "world",
]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} <|end|>{% endgeneration %} "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(extra_words: list[str] | None = None, chat_template: str | None = CHAT_TEMPLATE):
    """A word-level fast tokenizer (``PreTrainedTokenizerFast``) with eos/pad/bos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + _WORDS + list(extra_words or []):
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = 64, **overrides):
    """A transformers config for a tiny model of ``arch`` (see :data:`ARCHS`)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False)  # q/k/v biases
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=8)  # tied input/output embeddings
    elif arch == "olmo2":
        cfg = tf.Olmo2Config(**common, tie_word_embeddings=False)  # q/k norms
    elif arch == "phi3":
        common.pop("num_key_value_heads")
        cfg = tf.Phi3Config(**common, num_key_value_heads=4, tie_word_embeddings=False)  # fused qkv
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 64, **overrides):
    """A tiny randomly initialised ``*ForCausalLM`` (norm weights randomised too, so they carry a diff)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms / biases: make them non-trivial
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A deep copy of ``model`` with seeded Gaussian noise added to every parameter."""
    import copy

    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in new.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            p.copy_((p.float() + noise).to(p.dtype))
    return new


def save(model, path: str | Path, *, max_shard_size: str | int = "12KB", tokenizer=None) -> Path:
    """Save ``model`` (several safetensors shards by default) and a tiny tokenizer to ``path``."""
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


def make_family(root: str | Path, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
                max_shard_size: str | int = "12KB") -> dict[str, Path]:
    """Save a source base, a source fine-tune (base + δ) and a target base (base + ε) under ``root``.

    Returns ``{"source_base", "source_finetuned", "target_base"}`` -> directory.
    """
    root = Path(root)
    base = make_model(arch, seed=seed, dtype=dtype)
    ft = perturbed(base, seed=seed + 1, scale=0.02)
    target = perturbed(base, seed=seed + 2, scale=0.05)
    out = {}
    for name, m in (("source_base", base), ("source_finetuned", ft), ("target_base", target)):
        out[name] = save(m, root / name, max_shard_size=max_shard_size)
    return out
