"""The ``deltaport`` command: one Typer app, one module per command group.

Each command module defines ``register(app)``; commands parse their options, call one library
function and print a summary. :func:`main` maps :class:`~deltaport.errors.DeltaportError` to exit
codes (2 = bad input/usage, 1 = runtime failure).
"""

from __future__ import annotations

import importlib
import logging
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, map deltaport errors to exit codes."""
    from deltaport.errors import DeltaportError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except DeltaportError as exc:
        kind = type(exc).__name__
        sys.stderr.write(f"error ({kind}): {exc}\n")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:  # click usage errors arrive here in standalone_mode=False? (no: see below)
        return int(exc.code or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no output was written (temporary files removed)\n")
        return 130
    except Exception as exc:  # click.UsageError & co.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        if isinstance(exc, click.exceptions.Abort):
            sys.stderr.write("aborted\n")
            return 130
        raise
    return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
