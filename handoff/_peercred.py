"""Who is at the other end of a connected Unix socket: SO_PEERCRED, or getpeereid/LOCAL_PEERPID.

The control socket admits a peer by its uid, and a successor supervisor checks that the
handover channel's peer is the supervisor the state says it comes from (by pid). The kernel
records both at connect(2)/socketpair(2) time, so a peer cannot lie about them.

- Linux: ``SO_PEERCRED`` gives ``struct ucred {pid, uid, gid}`` (unix(7)).
- macOS and the BSDs: ``getpeereid(3)`` (libc, through ctypes) gives the uid; the pid comes from
  ``LOCAL_PEERPID`` on macOS (<sys/un.h>, level SOL_LOCAL = 0) and is None elsewhere.

The notify sockets are datagram sockets, which have no peer: on Linux each datagram carries
SCM_CREDENTIALS; elsewhere nothing replaces them per message, and the protection is the
filesystem: every notify socket lives in handoffd's 0700 runtime directory, reachable only by
our uid and root (see README, Supported platforms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    _GetPeerEid: TypeAlias = Callable[[int, ctypes._CArgObject, ctypes._CArgObject], int]

    class _Socket(Protocol):  # anything with a fileno(): socket.socket and trio's socket
        def fileno(self) -> int: ...


# <sys/un.h> on macOS: getsockopt(fd, SOL_LOCAL, LOCAL_PEERPID, &pid, &len).
_SOL_LOCAL: Final = 0
_LOCAL_PEERPID: Final = 0x002


def peer_uid(sock: _Socket) -> int:
    """The uid of the peer of a connected Unix socket, as the kernel recorded it.

    Raises:
        OSError: the socket is not a connected Unix socket.
    """
    if sys.platform == "linux":
        return _linux_ucred(sock.fileno())[1]
    else:
        return _getpeereid(sock.fileno())[0]


def peer_pid(sock: _Socket) -> int | None:
    """The pid of the peer of a connected Unix socket, or None where the kernel does not say.

    Raises:
        OSError: the socket is not a connected Unix socket.
    """
    if sys.platform == "linux":
        return _linux_ucred(sock.fileno())[0]
    elif sys.platform == "darwin":
        raw = _getsockopt(sock.fileno(), _SOL_LOCAL, _LOCAL_PEERPID, struct.calcsize("i"))
        return int(struct.unpack("i", raw)[0])
    else:
        return None


def _getsockopt(fd: int, level: int, option: int, size: int) -> bytes:
    """getsockopt(2) on an fd we do not own (the socket object is detached, never closed)."""
    view = socket.socket(fileno=fd)
    try:
        return view.getsockopt(level, option, size)
    finally:
        view.detach()


def _linux_ucred(fd: int) -> tuple[int, int, int]:
    if sys.platform == "linux":
        raw = _getsockopt(fd, socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return int(pid), int(uid), int(gid)
    raise OSError(f"SO_PEERCRED is Linux only (this is {sys.platform})")


@functools.cache
def _libc_getpeereid() -> _GetPeerEid:
    path = ctypes.util.find_library("c")
    function = ctypes.CDLL(path, use_errno=True).getpeereid
    function.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    function.restype = ctypes.c_int
    getpeereid: _GetPeerEid = function
    return getpeereid


def _getpeereid(fd: int) -> tuple[int, int]:
    """getpeereid(3): (uid, gid) of the peer; uid_t and gid_t are 32-bit on macOS and the BSDs."""
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if _libc_getpeereid()(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"getpeereid: {os.strerror(code)}")
    return uid.value, gid.value
