"""How a planner refuses: every problem is collected and reported at once, before a tensor byte is
read (:class:`~deltaport.errors.PlanError`); mixed float/non-float tensors and a plan in which no tensor
receives Δ are refused the same way for every operation."""

from __future__ import annotations

from deltaport.errors import PlanError
from deltaport.io.tensors import FLOAT_DTYPE_NAMES, TensorSpec
from deltaport.plan.policy import Policies
from deltaport.plan.types import Plan

SHOWN = 20  # problems listed by name (all are counted)


class Problems:
    """The problems a planner found; :meth:`raise_if_any` reports them all in one :class:`PlanError`."""

    def __init__(self, what: str):
        self.what = what
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            shown = self.items[:SHOWN]
            more = f"\n  ... and {n - SHOWN} more" if n > SHOWN else ""
            raise PlanError(f"{self.what}: {n} problem(s) found before reading any weights:\n  " + "\n  ".join(shown) + more)


def all_float(name: str, specs: list[tuple[str, TensorSpec]], problems: Problems) -> bool:
    """True when all are floating point. Mixed float/non-float cannot be combined: added to ``problems``."""
    floats = [s.dtype_name in FLOAT_DTYPE_NAMES for _, s in specs]
    if all(floats):
        return True
    if not any(floats):
        return False
    desc = ", ".join(f"{who} {s.dtype_name}" for who, s in specs)
    problems.add(f"{name}: dtypes cannot be combined ({desc}); a difference needs floating-point tensors on "
                 "every side. Exclude it with --exclude, or fix the checkpoint that stores it as an integer.")
    return False


def refuse_no_delta(plan: Plan, policies: Policies, source: str) -> None:
    """A transfer/apply in which no output tensor receives Δ would write a copy of the target and call it a
    result: an input error, stating how many tensors matched and why the others did not."""
    if plan.received_delta or not plan.ops:
        return
    n = len(plan.ops)
    reasons: dict[str, int] = {}
    for op in plan.ops:
        why = "; ".join(op.notes) or "copied"
        reasons[why] = reasons.get(why, 0) + 1
    why = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    hint = []
    if policies.shape_policy == "skip":
        hint.append("--shape-policy skip left out every tensor: the models are not the same architecture and size, "
                    "or their tensor names differ (--key-map maps renamed modules)")
    if policies.include or policies.exclude:
        hint.append("check --include/--exclude")
    raise PlanError(f"no tensor would receive Δ: 0 of {n} target tensors matched {source} ({why}). "
                    + (". ".join(hint) + ". " if hint else "") + "Nothing was written.")
