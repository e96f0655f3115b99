"""``python -m`` target for the multi-process tests: run ``deltaport`` (``deltaport.cli.main``) with a
fault injected at a training step, under torchrun or accelerate launch.

``DELTAPORT_TEST_FAULT=STEP:RANKS:KIND`` (RANKS comma-separated): when a listed rank ends optimizer step
STEP, ``raise`` raises RuntimeError (a crashing rank) and ``kill`` sends SIGKILL to this process (a
killed run: no clean-up at all). The fault lives here, in the tests, not in deltaport.
"""

from __future__ import annotations

import os
import signal
import sys


def _install(spec: str) -> None:
    from transformers.trainer_callback import CallbackHandler

    step, ranks, kind = spec.split(":")
    step, ranks = int(step), {int(r) for r in ranks.split(",")}
    real = CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):
        out = real(self, args, state, control)
        if state.global_step == step and int(os.environ.get("RANK", "0")) in ranks:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step}")
        return out

    CallbackHandler.on_step_end = on_step_end


if __name__ == "__main__":
    if os.environ.get("DELTAPORT_TEST_FAULT"):
        _install(os.environ["DELTAPORT_TEST_FAULT"])
    from deltaport.cli.main import main

    sys.exit(main(sys.argv[1:]))
