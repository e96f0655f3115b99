"""``python -m dist_driver ARGS`` runs ``deltaport ARGS`` (``deltaport.cli.main``) for the multi-process
tests, under torchrun or accelerate launch, with what the tests need to see inside each process.

* ``DELTAPORT_TEST_FAULT=STEP:RANKS:KIND`` (RANKS comma-separated): when a listed rank ends optimizer
  step STEP, ``raise`` raises RuntimeError (a crashing rank) and ``kill`` sends SIGKILL to the process
  (a killed run: no clean-up at all).
* ``DELTAPORT_TEST_COUNT=DIR``: each rank writes how many loglikelihood requests its lm-eval model
  scored to ``DIR/rank-R`` (to see the items split across processes).

These hooks live here, in the tests, not in deltaport.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _install_fault(spec: str) -> None:
    from transformers.trainer_callback import CallbackHandler

    step, ranks, kind = spec.split(":")
    step, ranks = int(step), {int(r) for r in ranks.split(",")}
    real = CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):
        out = real(self, args, state, control)
        if state.global_step == step and _rank() in ranks:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step}")
        return out

    CallbackHandler.on_step_end = on_step_end


def _install_count(folder: str) -> None:
    from lm_eval.models.huggingface import HFLM

    real = HFLM.loglikelihood

    def loglikelihood(self, requests, *args, **kwargs):
        p = Path(folder) / f"rank-{_rank()}"
        n = int(p.read_text()) if p.exists() else 0
        p.write_text(str(n + len(requests)))
        return real(self, requests, *args, **kwargs)

    HFLM.loglikelihood = loglikelihood


if __name__ == "__main__":
    if os.environ.get("DELTAPORT_TEST_FAULT"):
        _install_fault(os.environ["DELTAPORT_TEST_FAULT"])
    if os.environ.get("DELTAPORT_TEST_COUNT"):
        _install_count(os.environ["DELTAPORT_TEST_COUNT"])
    from deltaport.cli.main import main

    sys.exit(main(sys.argv[1:]))
