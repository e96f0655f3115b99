"""Plans: decide, from headers only, what every output tensor is made of.

A :class:`Plan` lists one :class:`TensorOp` per output tensor (``out = [c] + λ·(a − b)`` with
optional row maps for vocabulary policies), the tensors skipped and why, and warnings. Every
problem found is collected and reported at once (:class:`~deltaport.errors.PlanError`), before a
single tensor byte is read. Planning imports no torch until a plan stands (a refused plan never does).

One module per reason to change:

* :mod:`~deltaport.plan.types` — the data: ``Plan``, ``TensorOp``, ``Term`` and the other Δ terms;
* :mod:`~deltaport.plan.policy` — the options (``make_policies``) and the dtypes they choose;
* :mod:`~deltaport.plan.names` — vocabulary tensors, tied embeddings, a tensor's counterpart;
* :mod:`~deltaport.plan.vocab` — tokenizer vocabularies and the row maps of vocabulary ``align``;
* :mod:`~deltaport.plan.problems` — collecting and reporting what a planner refuses;
* :mod:`~deltaport.plan.transfer`, :mod:`~deltaport.plan.lora`, :mod:`~deltaport.plan.diff`,
  :mod:`~deltaport.plan.apply`, :mod:`~deltaport.plan.compose` — one planner each;
* :mod:`~deltaport.plan.provenance` — what a delta's ``deltaport.json`` must hold before it is applied.
"""

from deltaport.plan.apply import compressed_term, plan_apply
from deltaport.plan.compose import plan_apply_many
from deltaport.plan.diff import plan_diff
from deltaport.plan.lora import plan_lora_transfer
from deltaport.plan.names import is_vocab_tensor, ties_word_embeddings
from deltaport.plan.policy import Policies, choose_compute_dtype, delta_dtype_for, make_policies
from deltaport.plan.transfer import plan_transfer
from deltaport.plan.types import DeltaPart, LoraTerm, PackedTerm, Plan, TensorOp, Term
from deltaport.plan.vocab import RowAlignment, align_rows, load_vocab

__all__ = [
    "DeltaPart", "LoraTerm", "PackedTerm", "Plan", "Policies", "RowAlignment", "TensorOp", "Term",
    "align_rows", "choose_compute_dtype", "compressed_term", "delta_dtype_for", "is_vocab_tensor", "load_vocab",
    "make_policies", "plan_apply", "plan_apply_many", "plan_diff", "plan_lora_transfer", "plan_transfer",
    "ties_word_embeddings",
]
