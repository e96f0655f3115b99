"""deltaport: carry fine-tuning over to new base-model releases.

Fine-tuning transfer (arXiv 2503.20110): ``m_t + λ·(m'_s − m_s)``, streamed over sharded safetensors
checkpoints with exact arithmetic. The public API::

    import deltaport
    deltaport.transfer(source_base, source_finetuned, target_base, "out/")
    deltaport.diff(base, finetuned, "delta/")
    deltaport.apply("delta/", target_base, "out/", scale=1.0)
    deltaport.inspect(path)
    deltaport.compress("delta/", "delta-r16/", method="lowrank", rank=16)
    deltaport.evaluate(["base/", "out/"], ["arc_easy"], limit=100)   # lm-eval; see deltaport.evaluation
"""

from __future__ import annotations

__version__ = "0.1.0"

from deltaport.errors import (  # noqa: E402
    CheckpointError,
    DeltaportError,
    InputError,
    NumericalError,
    PlanError,
    RuntimeFailure,
)

__all__ = [
    "__version__",
    "DeltaportError",
    "InputError",
    "CheckpointError",
    "PlanError",
    "RuntimeFailure",
    "NumericalError",
    "transfer",
    "diff",
    "apply",
    "inspect",
    "compress",
    "evaluate",
]


def __getattr__(name):  # lazy: keep `import deltaport` and `deltaport --help` fast
    if name in ("transfer", "diff", "apply"):
        from deltaport import api

        return getattr(api, name)
    if name == "compress":
        from deltaport.compression import compress

        return compress
    if name == "evaluate":
        from deltaport.evaluation import evaluate

        return evaluate
    if name == "inspect":
        from deltaport.inspect import inspect

        return inspect
    raise AttributeError(name)
