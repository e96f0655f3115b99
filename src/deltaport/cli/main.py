"""The ``deltaport`` command: one Typer app, one module per command group.

Each command module defines ``register(app)``; commands parse their options, call one library
function and print a summary. :func:`main` maps :class:`~deltaport.errors.DeltaportError` to exit
codes (2 = bad input/usage, 1 = runtime failure).
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading

import typer

app = typer.Typer(
    name="deltaport",
    help="Carry fine-tuning over to new base-model releases (fine-tuning transfer, arXiv 2503.20110).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# command modules, in help order; each has register(app)
_COMMAND_MODULES = [
    "deltaport.cli.core",  # diff, apply, transfer, inspect
    "deltaport.cli.evaluate",  # eval
    "deltaport.cli.train",  # finetune, evolve
    "deltaport.cli.diagnose",  # connectivity, similarity, check
    "deltaport.cli.lab",  # lab run, demo
]


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command group not built yet
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_all()


def _flags_show_no_type(app_: typer.Typer) -> None:
    """``--help`` lists a flag as a flag: typer's rich help prints a ``<bool>`` type beside every flag
    (``--help`` included) and a ``<str>`` beside free-text options; give every command a class whose
    flags show no type column."""
    from typer.core import TyperCommand, TyperGroup

    names = {"<str>": "TEXT", "<int>": "INTEGER", "<float>": "FLOAT", "<path>": "PATH", "<list[str]>": "TEXT",
             "<list[float]>": "FLOAT", "<list[int]>": "INTEGER"}

    def shown(original):
        def display_type_rich(ctx=None):
            t = original(ctx=ctx)
            if t is None:
                return None
            if t in names:
                return names[t]
            if t.startswith("<") and t.endswith(">") and "|" in t:  # choices
                return "[" + t[1:-1] + "]"
            return t
        return display_type_rich

    def typed(params):
        for p in params:
            if getattr(p, "_deltaport_help", False):
                continue
            p._deltaport_help = True
            if getattr(p, "is_flag", False):
                p.display_type_rich = lambda ctx=None: None
            elif hasattr(p, "display_type_rich"):
                p.display_type_rich = shown(p.display_type_rich)
        return params

    class Command(TyperCommand):
        def get_params(self, ctx):
            return typed(super().get_params(ctx))

    class Group(TyperGroup):  # the group's own --help (``deltaport --help``, ``deltaport lab --help``)
        def get_params(self, ctx):
            return typed(super().get_params(ctx))

    if app_.info.cls is None or app_.info.cls is TyperGroup or type(app_.info.cls).__name__ == "DefaultPlaceholder":
        app_.info.cls = Group
    for info in app_.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = Command
    for group in app_.registered_groups:
        if group.typer_instance is not None:
            _flags_show_no_type(group.typer_instance)


_flags_show_no_type(app)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Python warnings (transformers' FutureWarnings and the like) as one line, without the
    source-file location and code line the default format adds."""
    return f"warning ({category.__name__}): {message}\n"


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP (or SIGINT) turned into an exception, so ``atomic_output_dir`` and every other
    ``finally`` block run and the temporary output folder is removed before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_RECEIVED: list[int] = []  # signals handled during this main() call (typer turns the exception into Exit(130))

_HANDLED_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _install_signal_handlers() -> dict:
    """Raise :class:`Interrupted` in the main thread on SIGINT/SIGTERM/SIGHUP; return the old handlers.

    SIGKILL cannot be caught: its temporary folder is removed by the next run on the same output
    (``deltaport.io.atomic.cleanup_leftovers``). Only possible from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        _RECEIVED.append(signum)
        raise Interrupted(signum)

    old = {}
    for s in _HANDLED_SIGNALS:
        try:
            old[s] = signal.signal(s, handler)
        except (OSError, ValueError):  # pragma: no cover - unusual platforms
            pass
    return old


def _restore_signal_handlers(old: dict) -> None:
    for s, h in old.items():
        try:
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        except (OSError, ValueError):  # pragma: no cover
            pass


def _interrupted_message(signum: int) -> str:
    from deltaport.io import atomic

    name = signal.Signals(signum).name
    if atomic.COMMITTED:
        return (f"interrupted ({name}) after the output was complete: {atomic.COMMITTED[-1]} was written "
                "and verified before the signal was handled\n")
    return (f"interrupted ({name}): nothing was written - the temporary output folder was removed and any "
            "existing output is unchanged\n")


def _is_click_exception(exc: BaseException) -> bool:
    classes = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        classes.append(VendoredClickException)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException

        classes.append(ClickException)
    except ImportError:
        pass
    return isinstance(exc, tuple(classes))


def _usage_message(exc, argv: list[str] | None = None) -> str:
    msg = " ".join(exc.format_message().replace("Value error, ", "").split())  # one line (click lists choices on several)
    if msg and msg[-1] not in ".!?:":
        msg += "."  # click's and pydantic's messages end without a full stop
    ctx = getattr(exc, "ctx", None)
    parts = []
    while ctx is not None and ctx.parent is not None:
        parts.insert(0, ctx.info_name)
        ctx = ctx.parent
    if not parts and argv:  # an option's missing value is reported from the group's context: name the command
        import typer.main

        group = typer.main.get_command(app)
        cmd = getattr(group, "commands", {}).get(argv[0])
        if cmd is not None:
            parts = [argv[0]] + ([argv[1]] if hasattr(cmd, "commands") and len(argv) > 1 and argv[1] in cmd.commands else [])
    return f"{msg} See: deltaport {' '.join(parts) + ' ' if parts else ''}--help"


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, map deltaport errors to exit codes.

    Exit codes: 0 ok, 2 bad input/usage (:class:`~deltaport.errors.InputError`), 1 runtime failure,
    128+N when stopped by signal N (130 for SIGINT/Ctrl-C, 143 for SIGTERM) after cleaning up.
    """
    from deltaport.errors import DeltaportError
    from deltaport.io import atomic

    import warnings

    from deltaport.cli import flags

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    old_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    _RECEIVED.clear()
    atomic.COMMITTED.clear()  # outputs published by an earlier main() in this process are not this run's
    old_handlers = _install_signal_handlers()
    try:
        rv = app(args=argv, standalone_mode=False)
        if _RECEIVED:  # typer catches KeyboardInterrupt (ours included) and returns 130
            sys.stderr.write(_interrupted_message(_RECEIVED[0]))
            return 128 + int(_RECEIVED[0])
        if isinstance(rv, int) and not isinstance(rv, bool):  # click returns Exit codes in non-standalone mode
            return rv
    except DeltaportError as exc:
        kind = type(exc).__name__
        sys.stderr.write(f"error ({kind}): {exc}\n")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        sys.stderr.write(_interrupted_message(signum))
        return 128 + int(signum)
    except Exception as exc:  # click.UsageError & co. (typer >= 0.20 vendors click as typer._click)
        if _is_click_exception(exc):  # usage errors read like every other deltaport error
            sys.stderr.write(f"error (UsageError): {_usage_message(exc, argv if argv is not None else sys.argv[1:])}\n")
            return 2
        if type(exc).__name__ == "Abort":  # click turns KeyboardInterrupt into Abort (cause kept)
            cause = exc.__cause__ or exc.__context__
            signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
            sys.stderr.write(_interrupted_message(signum))
            return 128 + int(signum)
        raise
    finally:
        from deltaport.devices import release_process_group

        release_process_group()  # a launch's gloo group left open aborts the process at shutdown
        _restore_signal_handlers(old_handlers)
        flags.restore_env()
        warnings.formatwarning = old_format
    return 0


def entry() -> None:  # pragma: no cover
    exit_process(main())


def exit_process(code: int) -> None:
    """End the process with ``code``. In a multi-process launch (``WORLD_SIZE`` > 1) whose command loaded
    ``torch.distributed``, skip interpreter finalisation: flush stdout/stderr, run the atexit handlers, then
    ``os._exit(code)``.

    Why: a gloo worker thread can still hold the last reference to a tensor of the command's final
    broadcast when the main thread finalises the interpreter (``destroy_process_group`` does not join the
    workers while anything else still refers to the group, and torch/accelerate/Trainer objects do). The
    worker then waits for the GIL, CPython ends it with ``pthread_exit`` inside a ``noexcept`` destructor,
    and the process aborts ("terminate called without an active exception", SIGABRT) after the command
    has succeeded: core dump backtrace ``runLoop → ~AsyncBroadcastWork → THPVariable_dealloc → take_gil →
    PyThread_exit_thread``, tests/test_distributed.py 1 run in 7-20. Nothing is left to finalise at this
    point: outputs are written and renamed, the group destroyed by :func:`main`."""
    import os

    from deltaport.devices import process_rank

    if process_rank()[1] > 1 and "torch.distributed" in sys.modules:
        import atexit

        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        atexit._run_exitfuncs()  # logging.shutdown, weakref.finalize, tempfile cleanup, library handlers
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    exit_process(main())
