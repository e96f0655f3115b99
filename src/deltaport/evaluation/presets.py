"""Evaluation presets: the paper's protocols as lm-evaluation-harness task settings.

A preset is a list of :class:`PresetTask` (an lm-eval task or group name, its few-shot count, the
metric the comparison table shows) plus the protocol it was designed for. Sources (``paper.md``
§6.2, Tables 13–14):

* ``llama3-instruct`` — Table 13, the Llama 3 evaluation details. lm-eval ships Meta's formatting
  as ``*_llama`` tasks, written for ``apply_chat_template`` + ``fewshot_as_multiturn``; MATH uses
  lm-eval's Minerva 4-shot CoT prompt. IFEval's column is the mean of prompt-/instruction-level
  strict and loose accuracy (Meta's "avg of strict & loose").
* ``olmo2-tulu3`` — Table 14, the Tülu 3 / OLMES settings as close as lm-eval gets (OLMES itself is a
  separate harness): GSM8K 8-shot CoT, MATH 4-shot CoT (flexible/``math_verify`` match), ARC-C 5-shot
  acc, GPQA 0-shot CoT, MMLU 0-shot CoT (lm-eval's ``mmlu_cot_llama`` prompt: the 0-shot CoT MMLU
  whose group aggregate is well defined), IFEval prompt-level loose, MATH500 (0-shot, as the paper/s1
  ran it, overriding the 4-shot default of lm-eval's Minerva prompt) and GPQA-Diamond 0-shot CoT.
* ``global-mmlu`` — Global MMLU 0-shot accuracy for the paper's languages (Malagasy, Sinhala,
  Turkish; §2.3, Table 2) plus English as a reference; ``languages=`` picks others.

Presets name real lm-eval tasks (they need the datasets, i.e. network or a warm HF cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaport.errors import InputError


@dataclass(frozen=True)
class PresetTask:
    """One column of a preset: an lm-eval task/group, its shots and the metric the table shows."""

    task: str
    num_fewshot: int | None
    metric: str  # result key as deltaport names it: "acc", "exact_match,strict-match", ...
    label: str  # column title, as in the paper's tables
    derived: dict[str, list[str]] = field(default_factory=dict)  # new metric -> mean of these metrics


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    protocol: str  # protocol the preset's prompts were written for: "chat" | "base" | "auto"
    tasks: tuple[PresetTask, ...]


_IFEVAL_AVG = {"strict_loose_avg": ["prompt_level_strict_acc", "prompt_level_loose_acc",
                                    "inst_level_strict_acc", "inst_level_loose_acc"]}

PRESETS: dict[str, Preset] = {
    "llama3-instruct": Preset(
        name="llama3-instruct",
        description="paper Table 13 (Llama 3 evaluation details): GSM8K 8-shot CoT, MATH 4-shot CoT, "
                    "ARC-C 0-shot, GPQA 0-shot CoT, MMLU 0-shot CoT, IFEval",
        protocol="auto",
        tasks=(
            PresetTask("gsm8k_cot_llama", 8, "exact_match,strict-match", "GSM8K"),
            PresetTask("minerva_math", 4, "exact_match", "MATH"),
            PresetTask("arc_challenge_llama", 0, "exact_match,strict_match", "ARC-C"),
            PresetTask("gpqa_main_cot_zeroshot", 0, "exact_match,flexible-extract", "GPQA"),
            PresetTask("mmlu_cot_llama", 0, "exact_match,strict_match", "MMLU"),
            PresetTask("ifeval", 0, "strict_loose_avg", "IFEval", derived=_IFEVAL_AVG),
        ),
    ),
    "olmo2-tulu3": Preset(
        name="olmo2-tulu3",
        description="paper Table 14 (OLMo 2 / Tülu 3 settings): GSM8K 8-shot CoT, MATH 4-shot CoT (flex), "
                    "ARC-C 5-shot, GPQA 0-shot CoT, MMLU 0-shot CoT, IFEval (prompt loose), MATH500, "
                    "GPQA-Diamond",
        protocol="auto",
        tasks=(
            PresetTask("gsm8k_cot", 8, "exact_match,flexible-extract", "GSM8K"),
            PresetTask("minerva_math", 4, "math_verify", "MATH"),
            PresetTask("arc_challenge", 5, "acc", "ARC-C"),
            PresetTask("gpqa_main_cot_zeroshot", 0, "exact_match,flexible-extract", "GPQA"),
            PresetTask("mmlu_cot_llama", 0, "exact_match,strict_match", "MMLU"),
            PresetTask("ifeval", 0, "prompt_level_loose_acc", "IFEval"),
            PresetTask("minerva_math500", 0, "math_verify", "MATH500"),
            PresetTask("gpqa_diamond_cot_zeroshot", 0, "exact_match,flexible-extract", "GPQA-D"),
        ),
    ),
    "global-mmlu": Preset(
        name="global-mmlu",
        description="Global MMLU 0-shot accuracy (paper Table 2 languages: mg, si, tr; en as reference)",
        protocol="auto",
        tasks=tuple(PresetTask(f"global_mmlu_full_{lang}", 0, "acc", f"Global-MMLU-{lang}")
                    for lang in ("mg", "si", "tr", "en")),
    ),
}

#: Global MMLU languages lm-eval 0.4.x ships (``global_mmlu_full_<lang>``).
GLOBAL_MMLU_LANGUAGES = (
    "am ar bn cs de el en es fa fil fr ha he hi id ig it ja ko ky lt mg ms ne nl ny pl pt ro ru si sn so "
    "sr sv sw te tr uk vi yo zh"
).split()


def get_preset(name: str, *, languages: list[str] | None = None) -> Preset:
    """The preset called ``name``; ``languages`` replaces global-mmlu's language list."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise InputError(f"unknown eval preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    if languages:
        if name != "global-mmlu":
            raise InputError(f"languages= only applies to the global-mmlu preset, not {name!r}")
        bad = [x for x in languages if x not in GLOBAL_MMLU_LANGUAGES]
        if bad:
            raise InputError(f"Global MMLU has no language(s) {', '.join(bad)}; known: "
                             f"{' '.join(GLOBAL_MMLU_LANGUAGES)}")
        preset = Preset(preset.name, preset.description, preset.protocol,
                        tuple(PresetTask(f"global_mmlu_full_{x}", 0, "acc", f"Global-MMLU-{x}") for x in languages))
    return preset
