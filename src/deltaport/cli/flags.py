"""What every command shares: the options a verb declares in :mod:`deltaport.options` turned into flags
(:func:`with_options`), and one progress convention.

Progress: bars only when stderr is a terminal; ``--quiet``/``-q`` turns them (and status lines) off
on every command. In a redirected log no tqdm bar is drawn (ours, transformers', huggingface_hub's or
lm-eval's): ``TQDM_DISABLE`` and ``HF_HUB_DISABLE_PROGRESS_BARS`` are set for the rest of the command,
and restored by :func:`deltaport.cli.main.main`. ``--progress/--no-progress`` stay accepted (hidden)
to force bars on or off.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from typing import Optional

import typer

from deltaport.options import REQUIRED, flag, option_fields

QUIET = typer.Option(False, "--quiet", "-q", help="no progress bars or status lines (errors and results still print)")
PROGRESS = typer.Option(None, "--progress/--no-progress", hidden=True,
                        help="force progress bars on or off (default: on when stderr is a terminal)")



def with_options(declared, before: str = "quiet"):
    """Decorator for a command whose function ends in ``**options``: add one flag per field of the
    verb's options class ``declared`` (:mod:`deltaport.options`: ``--field-name``, the declared type,
    default and help), listed before the command's own parameter ``before``. ``options`` then holds
    every declared option, except a repeatable one given no value (the function's default applies)."""

    def wrap(fn):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()
               if p.kind is not p.VAR_KEYWORD]
        hints = typing.get_type_hints(fn)
        types = typing.get_type_hints(declared)
        added, repeatable = [], set()
        for f, opt in option_fields(declared):
            typ = hints[f.name] = opt.cli_type or types[f.name]
            if _is_list(typ):
                repeatable.add(f.name)
            default = ... if opt.default is REQUIRED else (None if f.name in repeatable else opt.default)
            # an Optional[bool] (None: decided by other options) gets both --x and --no-x
            names = f"{flag(f.name)}/--no-{flag(f.name)[2:]}" if typ == Optional[bool] else flag(f.name)
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                                           default=typer.Option(default, names, help=opt.help)))
        at = next((i for i, p in enumerate(own) if p.name == before), len(own))

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(**{k: v for k, v in kwargs.items() if not (k in repeatable and v is None)})

        command.__signature__ = inspect.Signature(own[:at] + added + own[at:])
        command.__annotations__ = hints
        del command.__wrapped__  # typer must read this signature, not the wrapped function's
        return command

    return wrap


def _is_list(typ) -> bool:
    """``list[...]`` or ``Optional[list[...]]``: a repeatable option."""
    args = [a for a in typing.get_args(typ) if a is not type(None)] if typing.get_origin(typ) is typing.Union else [typ]
    return len(args) == 1 and typing.get_origin(args[0]) is list


#: environment variables this process set to silence bars (restored by main())
SET_ENV: dict[str, str | None] = {}


def _set_env(key: str, value: str) -> None:
    if key not in SET_ENV:
        SET_ENV[key] = os.environ.get(key)
    os.environ[key] = value


_TQDM_INIT: list = []  # the real tqdm.__init__ while bars are switched off
_UNDO: list = []  # callables that switch third-party bars back on


def _silence_tqdm() -> None:
    """Every tqdm bar off, also those whose caller passes ``disable=False`` (lm-eval does) and in a
    process where tqdm was imported before ``TQDM_DISABLE`` was set (tqdm reads it at import)."""
    try:
        import tqdm
    except ImportError:  # pragma: no cover
        return
    if _TQDM_INIT:
        return
    real = tqdm.tqdm.__init__

    def init(self, *args, **kwargs):
        kwargs["disable"] = True
        real(self, *args, **kwargs)

    _TQDM_INIT.append(real)
    tqdm.tqdm.__init__ = init


def restore_env() -> None:
    """Undo :func:`progress_mode`'s switches (for in-process callers of ``main``)."""
    for key, old in SET_ENV.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    SET_ENV.clear()
    if _TQDM_INIT:
        import tqdm

        tqdm.tqdm.__init__ = _TQDM_INIT.pop()
    while _UNDO:
        _UNDO.pop()()


def progress_mode(quiet: bool, progress: Optional[bool] = None) -> bool:
    """Whether this command draws progress bars: not with ``--quiet``; as forced by ``--progress`` /
    ``--no-progress``; otherwise only when stderr is a terminal. Without bars, third-party tqdm bars
    (transformers, huggingface_hub, lm-eval, datasets) are switched off too."""
    show = False if quiet else (progress if progress is not None else _isatty())
    if not show:
        _set_env("TQDM_DISABLE", "1")
        _set_env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _silence_tqdm()
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

            if not are_progress_bars_disabled():
                disable_progress_bars()
                _UNDO.append(lambda: __import__("huggingface_hub.utils").utils.enable_progress_bars())
        except ImportError:  # pragma: no cover
            pass
        if "transformers" in sys.modules:
            tlog = sys.modules["transformers"].utils.logging
            if tlog.is_progress_bar_enabled():
                tlog.disable_progress_bar()
                _UNDO.append(tlog.enable_progress_bar)
    return show


def status_lines(quiet: bool) -> bool:
    """Whether this command prints status lines (what it is doing) on stderr: unless ``--quiet``."""
    return not quiet


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
