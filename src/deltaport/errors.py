"""Exception hierarchy. The library raises these; only ``deltaport.cli`` maps them to exit codes.

* :class:`InputError` (exit 2): bad input or usage - a missing shard, a corrupt header, shapes that
  do not match, a flag that makes no sense. The message names the file/tensor, what was expected and
  what to do.
* :class:`RuntimeFailure` (exit 1): the inputs were fine but the work failed - NaN/Inf produced by
  the arithmetic, disk full, a training run that diverged.
"""

from __future__ import annotations


class DeltaportError(Exception):
    """Base class of every error deltaport raises on purpose."""

    exit_code = 1


class InputError(DeltaportError):
    """Bad input or usage (exit code 2)."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint cannot be read: missing/corrupt shard, bad header, bad index, pickle refused."""


class PlanError(InputError):
    """The inputs cannot be combined as asked: key sets, shapes or dtypes differ, bad policy/map."""


class OutputError(InputError):
    """The output location is not acceptable (exists without --overwrite, inside an input, ...)."""


class RuntimeFailure(DeltaportError):
    """The work itself failed (exit code 1)."""

    exit_code = 1


class NumericalError(RuntimeFailure):
    """NaN or Inf produced by deltaport's arithmetic."""


class DiskError(RuntimeFailure):
    """Writing the output failed (disk full, file size limit, I/O error)."""
