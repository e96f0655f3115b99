"""Crash-safe outputs: directories (:func:`atomic_output_dir`), single files (:func:`atomic_write_file`,
:func:`write_json`), and the checks that refuse an unusable output before any work
(:func:`check_output_location`, :func:`check_output_file`).

Every command writes into a temporary *sibling* of its output (``.NAME.deltaport-tmp-PID-XXXX``) and
only renames it into place once complete and verified. With ``overwrite=True`` an existing output is
swapped atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere rename-old-away, rename-new-in,
delete-old), so at every moment either the previous output or the new, complete one is at ``out``.

A run killed with SIGKILL leaves its temp folder behind; the next run on the same output removes
leftovers whose process is gone (and restores an ``old`` folder stranded between the two renames of
the non-atomic fallback), logging what it did.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from deltaport.errors import DiskError, OutputError

LOG = logging.getLogger(__name__)

TMP_TAG = ".deltaport-tmp-"
OLD_TAG = ".deltaport-old-"

#: outputs this process has moved into place (the CLI uses it to word its message after a signal)
COMMITTED: list[Path] = []

#: errno -> what it means for an output being written (disk full, ...): the errors that become DiskError
DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached",
                errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system", errno.EIO: "I/O error"}
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path, tag: str) -> list[tuple[Path, int]]:
    prefix = f".{out.name}{tag}"
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        if p.name.startswith(prefix):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            found.append((p, pid))
    return found


def cleanup_leftovers(out: str | Path) -> list[str]:
    """Remove temp folders of dead runs next to ``out``; restore a stranded previous output.

    Returns a list of human-readable actions taken (also logged as warnings).
    """
    out = Path(out).absolute()
    actions = []
    for p, pid in _leftovers(out, OLD_TAG):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if not out.exists():
            os.rename(p, out)
            actions.append(f"restored previous output {out} from {p.name} (a run was killed mid-swap)")
        else:
            _remove(p)
            actions.append(f"removed stale previous-output folder {p}")
    for p, pid in _leftovers(out, TMP_TAG):
        if _pid_alive(pid) and pid != os.getpid():
            LOG.warning("another deltaport process (pid %d) is writing %s; leaving %s alone", pid, out, p)
            continue
        kind = "folder" if p.is_dir() else "file"
        _remove(p)
        actions.append(f"removed temporary {kind} {p} left by a killed run (pid {pid})")
    stale = _stale_lock(out)
    if stale is not None:
        actions.append(f"removed the writer lock of {out} left by a killed run (pid {stale})")
    for a in actions:
        LOG.warning(a)
    return actions


def _stale_lock(out: Path) -> int | None:
    """Remove ``out``'s lock file when no process holds it (its writer was killed); returns the pid it named,
    or None when there is no such file, this process holds it, or a live process does."""
    import fcntl

    path = out.parent / f".{out.name}{LOCK_TAG}"
    if out in _HELD or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # a live writer holds it
        pid = _lock_pid(fd) or 0
        with contextlib.suppress(OSError):
            os.unlink(path)
        return pid
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    """Remove a leftover: a temp folder (directory outputs) or a temp file (single-file outputs)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


LOCK_TAG = ".deltaport-lock"
_HELD: dict[Path, int] = {}  # outputs whose writer lock this process holds -> the lock file's descriptor
_HELD_GUARD = threading.Lock()
_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _unwritable(exc: OSError, path: Path, out: Path, doing: str = "creating") -> OutputError:
    why = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (an immutable or protected "
           "folder?)", errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror)
    return OutputError(f"cannot write output {out}: {doing} {path} failed: {why}. Nothing was written; choose an "
                       "output in a folder you can write (or make this one writable).")


def prepare_parent(out: Path) -> None:
    """Create ``out``'s parent folder; a parent that cannot be created or written is an :class:`OutputError`
    (exit 2, one paragraph) rather than a traceback."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _PERMISSION_ERRNOS or exc.errno == errno.ENOTDIR:
            raise _unwritable(exc, Path(exc.filename or out.parent), out) from None
        raise


def check_writable(out: str | Path) -> Path:
    """Refuse, before any work, an output (file or folder) that could not be written: its folder (``out``
    itself when it is an existing folder, else its parent, created if missing) must be writable by this
    process (``os.access`` sees read-only mounts and ``chattr +i``, which ``chmod`` does not show to root)."""
    out = Path(out).absolute()
    prepare_parent(out)
    where = out if out.is_dir() else out.parent
    if not os.access(where, os.W_OK):
        raise _unwritable(OSError(errno.EACCES, "not writable"), where, out, doing="writing into")
    return out


def acquire_output_lock(out: str | Path) -> Path:
    """Take the writer lock of ``out``: ``.NAME.deltaport-lock`` beside it, holding the writer's pid, locked
    with ``flock`` (released by the kernel when the process ends, however it ends). Another live deltaport
    process holding it is an :class:`OutputError` naming its pid, raised before any work; a lock file left
    by a process that is gone is taken over with a warning. Re-entrant within a process; released by
    :func:`release_output_lock` (and at exit). Returns the absolute output path."""
    import fcntl

    out = Path(out).absolute()
    with _HELD_GUARD, _signals_deferred():  # a signal lands before the lock file exists or after it is registered
        if out in _HELD:
            return out
        prepare_parent(out)
        path = out.parent / f".{out.name}{LOCK_TAG}"
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                if exc.errno in _PERMISSION_ERRNOS:
                    raise _unwritable(exc, path, out) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _lock_pid(fd)
                for _ in range(50):  # the holder writes its pid right after locking: give it a moment
                    if holder:
                        break
                    time.sleep(0.01)
                    holder = _lock_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "pid unknown"
                raise OutputError(f"another deltaport process ({who}) is writing {out}; wait for it to finish, or "
                                  "choose another output path. Nothing was written.") from None
            try:  # the file we locked must still be the one at the path (a finishing writer unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _lock_pid(fd)
        if stale and stale != os.getpid():
            LOG.warning("took over the lock of %s left by pid %d, which is no longer running", out, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[out] = fd
    return out


def _lock_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def release_output_lock(out: str | Path) -> None:
    """Give up the writer lock of ``out`` taken by :func:`acquire_output_lock` (no-op if not held)."""
    out = Path(out).absolute()
    with _HELD_GUARD, _signals_deferred():
        fd = _HELD.pop(out, None)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(out.parent / f".{out.name}{LOCK_TAG}")  # while still locked: a waiter re-checks the path
        os.close(fd)


def _release_all() -> None:
    for out in list(_HELD):
        release_output_lock(out)


atexit.register(_release_all)


@contextlib.contextmanager
def output_lock(out: str | Path, *, release: bool = False) -> Iterator[Path]:
    """:func:`acquire_output_lock` for the duration of a block. A lock this process already held is kept
    after the block unless ``release`` (the block is the last step of the write that took it)."""
    out = Path(out).absolute()
    held = out in _HELD
    acquire_output_lock(out)
    try:
        yield out
    finally:
        if release or not held:
            release_output_lock(out)


def check_output_location(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that is, contains, or lies inside an input directory."""
    out = Path(out).absolute().resolve()
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(inp)
        if not ip.exists():
            continue
        ip = ip.absolute().resolve()
        ip_dir = ip if ip.is_dir() else ip.parent
        if out == ip_dir or ip_dir in out.parents:
            raise OutputError(
                f"output {out} is inside input {ip_dir}; deltaport never writes into an input directory. "
                "Choose an output path outside every input."
            )
        if out in ip_dir.parents:
            raise OutputError(
                f"output {out} contains input {ip_dir}; writing (or --overwrite) there could destroy an input. "
                "Choose another output path."
            )
    return out


def _renameat2(a: Path, b: Path, flags: int) -> bool | None:
    """Linux renameat2; True on success, None when unsupported (not Linux, old libc/kernel/filesystem).

    Raises OSError for real failures (for RENAME_NOREPLACE: EEXIST when ``b`` exists)."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    AT_FDCWD = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return None
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    try:
        return bool(_renameat2(a, b, 2))  # RENAME_EXCHANGE
    except OSError:
        return False


def _rename_noreplace(a: Path, b: Path) -> None:
    """Rename ``a`` to ``b`` unless ``b`` exists (an output that appeared while we were writing)."""
    try:
        done = _renameat2(a, b, 1)  # RENAME_NOREPLACE
    except FileExistsError:
        done = False
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        done = False
    if done is None:  # unsupported: check-then-rename (a tiny race window)
        if b.exists():
            done = False
        else:
            os.rename(a, b)
            done = True
    if not done:
        raise OutputError(f"output {b} appeared while deltaport was writing it (another process?); the new output "
                          "was discarded. Pass --overwrite to replace it, or choose another path.")


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP during the renames that commit an output; they are delivered
    (and handled) right after, so a signal never lands between two renames."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; move it to ``out`` when the block completes.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and ``out`` is
    left as it was. Raises :class:`OutputError` when ``out`` exists and ``overwrite`` is false, or when
    ``out`` is/contains/is inside one of ``inputs``.
    """
    out = check_output_location(out, inputs)
    with output_lock(out):  # a second writer of the same output is refused here, before any work
        cleanup_leftovers(out)
        if out.exists() and not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory; remove it or choose another path")
        if out.exists() and not overwrite:
            raise OutputError(f"output {out} already exists; pass --overwrite to replace it (the new output is "
                              "completed first, then swapped in) or choose another path")
        tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            try:
                tmp.mkdir()  # inside the try: a signal right after it still removes the folder
            except OSError as exc:
                if exc.errno in _PERMISSION_ERRNOS:
                    raise _unwritable(exc, tmp, out) from None
                raise
            yield tmp
            publish_dir(tmp, out, overwrite=overwrite)
        except BaseException as exc:
            # not published: tmp is the partial new output (publish_dir cleans up after itself)
            shutil.rmtree(tmp, ignore_errors=True)
            disk = _disk_error(exc, out)
            if disk is not None:
                raise disk from None
            raise


def current_umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc/self/status``; elsewhere set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode a plainly created file has (0666 & ~umask): libraries that
    save through a private temporary file (transformers writes ``model.safetensors`` 0600) would otherwise
    publish weights other users cannot read while the rest of the output can be read."""
    mode = 0o666 & ~current_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, mode)


def publish_dir(tmp: str | Path, out: str | Path, *, overwrite: bool) -> None:
    """Move the completed folder ``tmp`` (a sibling of ``out``) to ``out``: renamed in when ``out`` does not
    exist; with ``overwrite``, swapped with the existing ``out`` (atomically where the kernel can), whose old
    contents are then deleted. Signals wait until the rename is done. On failure ``tmp`` is removed and
    ``out`` is as it was. Used by :func:`atomic_output_dir`, and by callers that stage a folder themselves
    (several processes writing one output)."""
    tmp, out = Path(tmp), Path(out)
    stranded: Path | None = None  # the previous output while it is moved aside (non-atomic fallback)
    try:
        normalize_modes(tmp)
        _fsync_dir(tmp)
        with _signals_deferred():
            if out.exists():
                if not overwrite:
                    raise OutputError(f"output {out} appeared while deltaport was writing it (another process?); "
                                      "the new output was discarded. Pass --overwrite to replace it.")
                if _exchange(tmp, out):  # tmp now holds the old output
                    _fsync_dir(out.parent)
                else:
                    stranded = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                    os.rename(out, stranded)
                    os.rename(tmp, out)
                    _fsync_dir(out.parent)
                    tmp, stranded = stranded, None
            else:
                _rename_noreplace(tmp, out)
                _fsync_dir(out.parent)
            COMMITTED.append(out)
        shutil.rmtree(tmp, ignore_errors=True)  # the previous output, after an overwrite
    except BaseException as exc:
        # not committed: tmp is the new output; committed: tmp is the replaced previous output
        shutil.rmtree(tmp, ignore_errors=True)
        if stranded is not None and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(stranded, out)  # put the previous output back
        disk = _disk_error(exc, out)
        if disk is not None:
            raise disk from None
        raise


def _disk_error(exc: BaseException, out: Path) -> DiskError | None:
    """A full disk, quota or read-only file system while writing ``out``, worded; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        where = exc.filename or out
        return DiskError(f"writing {where} failed: {DISK_ERRORS[exc.errno]} ({exc.strerror}). The partial output "
                         f"was removed{' and the previous output is unchanged' if out.exists() else ''}; free space "
                         "or choose another output location.")
    return None


def check_output_file(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a single-file output (a report, a plot, a table) that is a directory, or that exists
    without ``overwrite``. Call it before the work, so nothing is computed for an output that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; pass a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it or choose another path")
    return path


def atomic_write_file(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False,
                      record: bool = False) -> Path:
    """Write a single file through a temporary sibling (``.NAME.deltaport-tmp-PID-XXXX``), then rename it into place.

    ``write(tmp)`` creates the temporary file. On any failure (including a signal) the temporary file is
    removed and ``path`` is unchanged; a SIGKILL leaves the temporary file, which the next write to
    ``path`` removes. Without ``overwrite`` an existing ``path`` is an :class:`OutputError`, checked
    before writing and again atomically at the rename (one that appeared meanwhile is kept). Disk
    full and similar errors become :class:`DiskError`. ``record``: add ``path`` to :data:`COMMITTED`
    (a command's final output, so that an interruption right after it says it was written).
    """
    path = check_output_file(path, overwrite=overwrite)
    prepare_parent(Path(path).absolute())
    cleanup_leftovers(path)
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with _signals_deferred():
            if overwrite:
                os.replace(tmp, path)
            else:
                _rename_noreplace(tmp, path)
            if record:
                COMMITTED.append(path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
            raise _unwritable(exc, Path(exc.filename or tmp), path) from None
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            raise DiskError(f"writing {path} failed: {DISK_ERRORS[exc.errno]} ({exc.strerror}); nothing was written"
                            f"{' and the previous file is unchanged' if path.exists() else ''}. Free space or choose "
                            "another output location.") from None
        raise
    return path


def json_default(o: Any) -> Any:
    """JSON for what reports hold besides plain types: a path as its string, a numpy scalar as its value,
    anything else as its ``str``."""
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def write_json(path: str | Path, obj: Any, *, overwrite: bool = True, record: bool = False) -> Path:
    """Write ``obj`` as JSON (indent 2, keys in their order, a final newline) through
    :func:`atomic_write_file`: never half-written; without ``overwrite`` an existing file is refused.
    Paths and numpy scalars are written as strings and numbers; ``record`` as in :func:`atomic_write_file`."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    return atomic_write_file(path, lambda tmp: tmp.write_text(text), overwrite=overwrite, record=record)
