"""pidfd_getfd(2): a copy of another process's fd (Linux 5.6), for custody and observation."""

from __future__ import annotations

import ctypes
import os
from typing import Final

# pidfd_getfd(2) (Linux 5.6): 438 in the unified syscall table (x86_64, aarch64, ...).
_SYS_PIDFD_GETFD: Final = 438
_libc: ctypes.CDLL | None = None


def pidfd_getfd(pidfd: int, target: int) -> int:
    """pidfd_getfd(2): a copy (O_CLOEXEC) of fd ``target`` of the process behind ``pidfd``.

    Needs PTRACE_MODE_ATTACH on that process (root, or CAP_SYS_PTRACE, or the same uid where
    Yama allows it).

    Raises:
        PermissionError: no ptrace access to that process.
        OSError: EBADF (no such fd there), ESRCH (it exited), ENOSYS (before Linux 5.6).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(target), ctypes.c_uint(0)
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)
