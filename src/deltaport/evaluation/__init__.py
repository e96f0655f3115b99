"""Evaluate models with lm-evaluation-harness, the paper's protocol, with a result cache.

::

    import deltaport
    from deltaport.evaluation import compare, comparison_table, comparisons_table
    res = deltaport.evaluate(["base/", "base+delta/"], ["arc_easy"], limit=100)  # paths or hub ids
    res = deltaport.evaluate({"M1+Δ": (model, tok)}, ["tests/data/tiny_qa.yaml"])  # in-memory models
    print(comparison_table(res, baseline="base/"))
    print(comparisons_table(compare(res, baseline="base/")))  # differences with paired bootstrap intervals

Tasks are lm-eval task/group names or paths to local task YAML files (:mod:`.tasks`); presets are the
paper's task sets (:mod:`.presets`). Results are cached (:mod:`.cache`) when ``cache_dir`` is given.

Protocols (``protocol=``): ``base`` scores the raw prompt (pretraining style); ``chat`` applies the
model's chat template (``apply_chat_template=True``, few-shot examples as multi-turn); ``both`` runs
both and reports rows ``NAME [base]`` and ``NAME [chat]``; ``auto`` picks ``chat`` when the tokenizer
has a chat template and ``base`` otherwise. The paper scored base models pretraining-style and
instruct/transferred models with the chat template; ``both`` makes the comparison explicit.

The parts, one reason to change each: :mod:`.tasks` (what a task is), :mod:`.models` (what a model to
score is), :mod:`.cache` (what identifies a result), :mod:`.harness` (how lm-eval is called),
:mod:`.results` (what is reported), :mod:`.items` (per-item records, lm-eval's own files), :mod:`.compare`
(paired comparisons between models), :mod:`.run` (:func:`evaluate`, the order of the work).
"""

from __future__ import annotations

from deltaport.evaluation.compare import compare, comparisons_table, plot_comparisons
from deltaport.evaluation.results import comparison_table
from deltaport.evaluation.run import BACKENDS, PROTOCOLS, evaluate
from deltaport.evaluation.tasks import TaskSpec, resolve_tasks

__all__ = ["evaluate", "comparison_table", "compare", "comparisons_table", "plot_comparisons", "resolve_tasks",
           "TaskSpec", "PROTOCOLS", "BACKENDS"]
