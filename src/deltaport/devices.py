"""The torch device a model runs on (eval, finetune): ``cpu``, ``cuda[:N]``, ``mps`` or ``auto``."""

from __future__ import annotations

import functools

from deltaport.errors import InputError


def resolve_device(device: str | None) -> str:
    """``device`` checked against this torch; ``auto`` (or None) is cuda when a GPU is seen, else cpu."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                         "use --device cpu (or auto)")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a ``torchrun`` / ``accelerate launch`` run; (0, 1) when alone."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def release_process_group() -> None:
    """Destroy the default process group of a ``torchrun`` / ``accelerate launch`` run, if one is open.

    A process that exits with a gloo group still open can abort during interpreter shutdown ("terminate
    called without an active exception", SIGABRT): gloo's worker threads outlive the objects they hold.
    The CLI calls this when a command ends; :func:`release_at_exit` registers it for library callers.
    It is not always enough: while anything else still refers to the group its worker threads live on,
    and the CLI then also skips interpreter finalisation (:func:`deltaport.cli.main.exit_process`).
    Does nothing (and imports nothing) in a process that never loaded ``torch.distributed``."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.destroy_process_group()


@functools.cache
def release_at_exit() -> None:
    """Register :func:`release_process_group` to run at interpreter exit (once), while Python is still whole."""
    import atexit

    atexit.register(release_process_group)
