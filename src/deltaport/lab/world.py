"""The lab's synthetic world: entities, facts, a pretraining corpus, a QA task and its tokenizer.

Design (frozen before any transfer result was looked at; see docs/lab.md):

* The world has ``n_entities`` invented countries (one word-level token each). Every country has a
  **flag colour** drawn from a closed set of 8 colours, a national animal and a size (distractor
  facts that make the text richer than the task needs).
* The knowledge lives in the **pretraining text**: flag facts are stated in 5 paraphrase templates
  ("the flag of zorvia is green .", "zorvia has a green flag .", ...). The QA interface
  (``what color is the flag of zorvia ?`` → ``green`` inside a chat template) never occurs in
  pretraining; fine-tuning teaches it.
* Facts are split: ``F1`` (stage-1 text) and ``F2`` (added by the stage-2 data mix). Fine-tuning
  sees only ``n_sft`` facts of F1. Held-out evaluation: the other F1 facts ("known") and all F2
  facts ("new", only stage-2 models read them). The headline metric is greedy exact match on all
  held-out items; chance for a model that always answers some colour is 1/8.
* A second "language" (``lang: b``): every non-entity word is replaced by a fixed pseudo-word
  (``flag`` → ``galfu``); a fraction of pretraining sentences is written in it. The multilingual
  experiment fine-tunes the QA task in language b.

Everything is a deterministic function of the config and its seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

COLORS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
ANIMALS = ["horse", "eagle", "lion", "wolf", "bear", "fox", "owl", "deer", "swan", "crane", "tiger", "seal"]
SIZES = ["large", "small", "old", "young", "rich", "quiet", "busy", "cold"]

#: flag-fact paraphrases (pretraining only); {e} = entity, {c} = colour
FLAG_TEMPLATES = [
    "the flag of {e} is {c} .",
    "{e} has a {c} flag .",
    "in {e} , the flag is {c} .",
    "people of {e} fly a {c} flag .",
    "the {c} flag belongs to {e} .",
]
ANIMAL_TEMPLATES = ["the animal of {e} is the {a} .", "in {e} , people love the {a} ."]
SIZE_TEMPLATES = ["{e} is a {s} country .", "people say {e} is {s} ."]
#: the QA interface, never in pretraining text
QUESTION = "what color is the flag of {e} ?"

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} <|end|>"
    "{% endgeneration %} {% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SYLLABLES = ["ka", "lo", "ri", "va", "zu", "mor", "tel", "an", "bri", "sol", "qua", "den", "fi", "gor",
              "hal", "ix", "jun", "ne", "pra", "tu", "wes", "yl", "cor", "dra", "em", "vo", "lin", "ost"]


def _base_words() -> list[str]:
    words: list[str] = []
    for t in FLAG_TEMPLATES + ANIMAL_TEMPLATES + SIZE_TEMPLATES + [QUESTION]:
        words += [w for w in t.split() if not w.startswith("{")]
    words += COLORS + ANIMALS + SIZES
    return list(dict.fromkeys(words))


def to_lang_b(word: str) -> str:
    """The language-b spelling of a (non-entity) word: reversed + 'u' (``flag`` → ``galfu``)."""
    return word[::-1] + "u" if word not in (".", ",", "?") else word


@dataclass(frozen=True)
class Fact:
    entity: str
    color: str
    split: str  # "F1" or "F2"


@dataclass
class World:
    """Entities, their facts and the derived data sets. Build with :func:`make_world`."""

    seed: int
    entities: list[str]
    flag: dict[str, str]
    animal: dict[str, str]
    size: dict[str, str]
    f1: list[str]
    f2: list[str]
    sft: list[str]  # subset of f1 used for fine-tuning
    known: list[str] = field(default_factory=list)  # held-out F1
    new: list[str] = field(default_factory=list)  # F2

    # ---------------------------------------------------------------- text
    def sentence(self, rng: random.Random, e: str, *, kind: str, lang: str = "a") -> str:
        if kind == "flag":
            s = rng.choice(FLAG_TEMPLATES).format(e=e, c=self.flag[e])
        elif kind == "animal":
            s = rng.choice(ANIMAL_TEMPLATES).format(e=e, a=self.animal[e])
        else:
            s = rng.choice(SIZE_TEMPLATES).format(e=e, s=self.size[e])
        return translate(s, self) if lang == "b" else s

    def question(self, e: str, lang: str = "a") -> str:
        q = QUESTION.format(e=e)
        return translate(q, self) if lang == "b" else q

    def answer(self, e: str, lang: str = "a") -> str:
        c = self.flag[e]
        return to_lang_b(c) if lang == "b" else c

    def vocabulary(self) -> list[str]:
        base = _base_words()
        return SPECIAL_TOKENS + base + [to_lang_b(w) for w in base if to_lang_b(w) != w] + self.entities


def unseen_in_pretraining(world: World) -> list[str]:
    """Tokens of the vocabulary that no pretraining sentence contains (``sample_block`` writes ``<s>`` and
    sentences of the flag, animal and size templates, in both languages): the other special tokens, the chat
    markers and the question words of the QA interface. Pretraining never trains their input-embedding rows."""
    words: set[str] = set()
    for t in FLAG_TEMPLATES + ANIMAL_TEMPLATES + SIZE_TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    # an attribute value no entity has is never written (a small world may leave out a size or an animal)
    words |= set(world.flag.values()) | set(world.animal.values()) | set(world.size.values())
    seen = {"<s>"} | set(world.entities) | words | {to_lang_b(w) for w in words}
    return [w for w in world.vocabulary() if w not in seen]


def translate(text: str, world: World) -> str:
    ents = set(world.entities)
    return " ".join(w if w in ents else to_lang_b(w) for w in text.split())


def _entity_names(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    names: list[str] = []
    seen = set(taken)
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_world(n_entities: int, n_sft: int, seed: int, f1_fraction: float = 0.5) -> World:
    """A deterministic world of ``n_entities`` countries; F1 = first ``f1_fraction`` of them."""
    from deltaport.errors import InputError

    n_f1 = int(round(n_entities * f1_fraction))
    if not (0 < n_sft < n_f1 < n_entities):
        raise InputError(
            f"lab world: need 0 < n_sft ({n_sft}) < |F1| ({n_f1}) < n_entities ({n_entities}); "
            "raise world.n_entities or lower world.n_sft in the lab config")
    rng = random.Random(f"world-{seed}")
    taken = set(_base_words()) | {to_lang_b(w) for w in _base_words()} | set(SPECIAL_TOKENS)
    ents = _entity_names(n_entities, rng, taken)
    # balanced colours so that no answer is a shortcut: colour i appears ~n/8 times in every split
    flag = {e: COLORS[i % len(COLORS)] for i, e in enumerate(ents)}
    animal = {e: rng.choice(ANIMALS) for e in ents}
    size = {e: rng.choice(SIZES) for e in ents}
    order = list(ents)
    rng.shuffle(order)
    f1, f2 = order[:n_f1], order[n_f1:]
    sft = f1[:n_sft]
    return World(seed=seed, entities=ents, flag=flag, animal=animal, size=size, f1=f1, f2=f2, sft=sft,
                 known=f1[n_sft:], new=list(f2))


# -------------------------------------------------------------------- tokenizer
def make_tokenizer(world: World):
    """Word-level fast tokenizer over the world's vocabulary, with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in world.vocabulary():
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.model_max_length = 64
    return tok


# -------------------------------------------------------------------- pretraining corpus
@dataclass(frozen=True)
class Mix:
    """Sentence-kind weights of one training stage (normalised when sampling)."""

    f1: float
    f2: float
    filler: float
    lang_b: float  # fraction of sentences written in language b


def sample_block(world: World, mix: Mix, rng: random.Random, n_tokens: int) -> list[str]:
    """One training sequence: ``<s>`` followed by whole sentences, truncated to ``n_tokens`` words."""
    words = ["<s>"]
    kinds = ("f1", "f2", "filler")
    weights = (mix.f1, mix.f2, mix.filler)
    while len(words) < n_tokens:
        k = rng.choices(kinds, weights)[0]
        lang = "b" if rng.random() < mix.lang_b else "a"
        if k == "f1":
            s = world.sentence(rng, rng.choice(world.f1), kind="flag", lang=lang)
        elif k == "f2":
            s = world.sentence(rng, rng.choice(world.f2), kind="flag", lang=lang)
        else:
            s = world.sentence(rng, rng.choice(world.entities), kind=rng.choice(("animal", "size")), lang=lang)
        words += s.split()
    return words[:n_tokens]


# -------------------------------------------------------------------- task data
def sft_records(world: World, lang: str = "a") -> list[dict]:
    """Fine-tuning data: chat messages for the F1 facts in ``world.sft`` only."""
    return [{"messages": [{"role": "user", "content": world.question(e, lang)},
                          {"role": "assistant", "content": world.answer(e, lang)}]} for e in world.sft]


def eval_records(world: World, split: str, lang: str = "a") -> list[dict]:
    ents = {"known": world.known, "new": world.new, "sft": world.sft}[split]
    return [{"entity": e, "question": world.question(e, lang), "answer": world.answer(e, lang),
             "split": split, "lang": lang} for e in ents]


#: in-context examples per item of the few-shot task ``lab_heldout_fs``
N_SHOTS = 3


def fewshot_turns(world: World, i: int, lang: str = "a") -> list[dict]:
    """``N_SHOTS`` solved fine-tuning questions (user/assistant turns) before held-out item ``i``: the
    same chat format, so a base model is scored with the interface shown in context (as the paper
    scores its bases few-shot). Shots come from ``world.sft`` (never a held-out fact), rotating with
    ``i``, so every item sees other examples and the colours of the shots vary."""
    out = []
    for k in range(N_SHOTS):
        e = world.sft[(i * N_SHOTS + k) % len(world.sft)]
        out += [{"role": "user", "content": world.question(e, lang)},
                {"role": "assistant", "content": world.answer(e, lang)}]
    return out


def write_eval_tasks(world: World, tokenizer, out_dir: Path, langs=("a",)) -> dict[str, Path]:
    """Write lm-eval local tasks (generate_until + exact_match over jsonl) for every split and language.

    The prompt is the chat-templated user turn plus the generation prompt, rendered here with the
    world's tokenizer, so every model (base, fine-tuned, merged) is scored on the same string.
    Returns ``{task_name: yaml_path}``. Task names: ``lab_<split>`` (language a) or
    ``lab_<split>_b``; ``lab_heldout`` (= known + new) is the headline task; ``lab_heldout_fs`` asks the
    same items after :data:`N_SHOTS` solved examples in the same chat format (bases scored few-shot).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, Path] = {}
    for lang in langs:
        suffix = "" if lang == "a" else f"_{lang}"
        splits = {"known": eval_records(world, "known", lang), "new": eval_records(world, "new", lang)}
        splits["heldout"] = splits["known"] + splits["new"]
        if lang == "a":
            splits["heldout_fs"] = splits["heldout"]
        for split, recs in splits.items():
            name = f"lab_{split}{suffix}"
            data = out_dir / f"{name}.jsonl"
            with data.open("w") as f:
                for i, r in enumerate(recs):
                    shots = fewshot_turns(world, i, lang) if split == "heldout_fs" else []
                    prompt = tokenizer.apply_chat_template(shots + [{"role": "user", "content": r["question"]}],
                                                           tokenize=False, add_generation_prompt=True)
                    f.write(json.dumps({**r, "prompt": prompt}) + "\n")
            yaml_path = out_dir / f"{name}.yaml"
            yaml_path.write_text(
                f"task: {name}\n"
                "dataset_path: json\n"
                "dataset_kwargs:\n"
                f"  data_files:\n    test: {data.resolve()}\n"
                "test_split: test\n"
                "output_type: generate_until\n"
                "doc_to_text: \"{{prompt}}\"\n"
                "doc_to_target: \"{{answer}}\"\n"
                "generation_kwargs:\n"
                "  until: [\"<|end|>\", \"</s>\"]\n"
                "  do_sample: false\n"
                "  max_gen_toks: 3\n"
                "target_delimiter: \" \"\n"
                "metric_list:\n"
                "  - metric: exact_match\n"
                "    aggregation: mean\n"
                "    higher_is_better: true\n"
                "    ignore_case: true\n"
                "    ignore_punctuation: false\n"
                "filter_list:\n"
                "  - name: strip\n"
                "    filter:\n"
                "      - function: regex\n"
                "        regex_pattern: \"^\\\\s*(\\\\S+)\"\n"
                "        group_select: 0\n"
                "      - function: take_first\n"
                "metadata:\n  version: 1.0\n"
            )
            tasks[name] = yaml_path
    return tasks
