"""Give memory back to the OS at the few moments a long-lived supervisor can afford it.

Design notes:
- Start-up (imports, pydantic schema building, the first generation) leaves freed heap that
  glibc keeps mapped; a supervisor lives for months, so that is RSS paid for nothing. After
  start-up we collect once, ``gc.freeze()`` what is left (it lives as long as the process, and
  later collections need not walk it), and ask glibc to return free pages (malloc_trim(3)).
- After an upgrade only ``malloc_trim`` runs: it costs well under a millisecond, where a full
  collection would pause the event loop for longer.
- Where there is no glibc (musl, macOS), this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

_LIBC_NAME: Final = ctypes.util.find_library("c")


@functools.cache
def _trim_function() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (a CDLL per call would pile up ctypes objects)."""
    if _LIBC_NAME is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(_LIBC_NAME).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


def _malloc_trim() -> None:
    trim = _trim_function()
    if trim is not None:
        trim(0)


def release_after_startup() -> None:
    """Collect, freeze the survivors and return free heap pages (once, after readiness)."""
    gc.collect()
    gc.freeze()
    _malloc_trim()


def release_after_upgrade() -> None:
    """Return free heap pages left by a finished upgrade."""
    _malloc_trim()
