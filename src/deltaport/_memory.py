"""Process-wide glibc memory settings shared by the streaming engine and the layer-by-layer diagnostics
(elsewhere than glibc, every function here does nothing)."""

from __future__ import annotations

from typing import Any

#: glibc's M_MMAP_THRESHOLD while deltaport streams: every allocation above it is its own mapping, returned to
#: the system when freed. glibc otherwise raises the threshold each time such a block is freed (up to 32 MB),
#: so chunk- and layer-sized temporaries come from the heap, which fragments: on SmolLM2 `connectivity`
#: peaked at 819 MB with the dynamic threshold, 679 MB with 4 MB (609 MB with 1 MB, but 10 % slower again;
#: docs/diagnostics.md); a TIES apply of two Δs onto a 0.77 GB bf16 model peaked at 787 MB, 469 MB with 4 MB
#: (docs/performance.md).
MMAP_THRESHOLD = 4 << 20
_PINNED = False
_LIBC: Any = None


def _libc() -> Any:
    """glibc through ctypes, loaded once; False where there is none."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def pin_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` and its trim threshold at twice that, once for
    this process. Process-wide and not undone: it only changes where large blocks come from and how much free
    memory the heap keeps at its top."""
    global _PINNED
    if _PINNED:
        return
    _PINNED = True
    libc = _libc()
    try:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        # a fixed mmap threshold also fixes the trim threshold at 128 KB (glibc's dynamic one is twice the mmap
        # threshold): the heap's top was then given back and taken again for every chunk, 55 000 brk calls in
        # a TIES apply; twice the threshold, as glibc would have it
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD
    except AttributeError:  # no glibc (False has no mallopt)
        pass


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``). Between layers the temporaries of
    one layer are all freed, but glibc keeps most of them mapped, and the next layer's, of other sizes, do not
    fit the holes: without this the resident set grows by hundreds of MB."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim:
        trim(0)
