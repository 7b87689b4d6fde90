"""launchd's socket activation on macOS: ``launch_activate_socket(3)`` through ctypes.

A launchd job declares its listening sockets in the plist's ``Sockets`` dictionary; launchd binds
them before the job starts and hands them over when the job asks by the dictionary key::

    <key>Sockets</key>
    <dict>
        <key>http</key>                 <!-- the name handoffd's listener has -->
        <dict><key>SockServiceName</key><string>8080</string></dict>
    </dict>

    fds = activate_socket("http")      # -> [5, 6] (one fd per address family launchd bound)

Design notes:
- The C signature is ``int launch_activate_socket(const char *name, int **fds, size_t *cnt)``
  (<launch.h>). On success launchd ``malloc``s an array of ``cnt`` ints and the caller owns both
  the array, which it must ``free(3)``, and the fds. On failure it returns an errno value and
  allocates nothing: ENOENT (no such name in the plist), ESRCH (the process is not managed by
  launchd), EALREADY (this name was already activated in this process).
- The library is injectable (``LaunchdLibrary``) because the binding is tested on Linux against a
  stand-in shared library with the same signature and ownership rules (tests/launchd_stub/),
  whose ``free`` can check that exactly the returned array is released, once.
- The fds are made non-inheritable (PEP 446): handoffd passes listeners to workers explicitly,
  at fixed positions, never by leaking them into every child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from ._errors import ListenerError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeAlias

    _IntArrayPtr: TypeAlias = ctypes._Pointer[ctypes.c_int]
    _ActivateFn: TypeAlias = Callable[[bytes, ctypes._CArgObject, ctypes._CArgObject], int]
    _FreeFn: TypeAlias = Callable[[_IntArrayPtr], None]

#: What each errno of launch_activate_socket(3) means, as the fix a user can act on.
ACTIVATE_ERRORS: Final = {
    errno.ENOENT: "the job's plist has no Sockets entry with this name; "
    "add one named like the listener",
    errno.ESRCH: "this process was not started by launchd, which alone can hand out its sockets",
    errno.EALREADY: "this name was already activated in this process; "
    "launchd hands each one out once",
}

#: libSystem holds both launch_activate_socket and the malloc/free its result comes from.
LIBSYSTEM: Final = "/usr/lib/libSystem.B.dylib"

_IntArray = ctypes.POINTER(ctypes.c_int)


@final
@dataclass(frozen=True)
class LaunchdLibrary:
    """The two C functions the binding calls: the activation and the matching ``free``.

    ``free`` must release memory allocated by the library's ``malloc``: on macOS both come from
    libSystem. Build one with ``LaunchdLibrary.from_cdll``.
    """

    activate_socket: _ActivateFn
    free: _FreeFn

    @classmethod
    def from_cdll(
        cls,
        library: ctypes.CDLL,
        *,
        activate_symbol: str = "launch_activate_socket",
        free_symbol: str = "free",
    ) -> LaunchdLibrary:
        """Bind the symbols of ``library`` with the C signatures of <launch.h> and free(3)."""
        activate = getattr(library, activate_symbol)
        activate.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(_IntArray),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        activate.restype = ctypes.c_int
        free = getattr(library, free_symbol)
        free.argtypes = [_IntArray]
        free.restype = None
        return cls(activate_socket=activate, free=free)


@functools.cache
def load_libsystem() -> LaunchdLibrary:
    """macOS's libSystem, loaded once.

    Raises:
        ListenerError: not on macOS, where there is no launchd to ask.
    """
    if sys.platform == "darwin":
        path = ctypes.util.find_library("System") or LIBSYSTEM
        return LaunchdLibrary.from_cdll(ctypes.CDLL(path, use_errno=True))
    raise ListenerError(
        f"launchd socket activation is macOS only (this is {sys.platform}); "
        "under systemd use a .socket unit, elsewhere let handoffd bind the listener"
    )


def activate_socket(name: str, *, library: LaunchdLibrary | None = None) -> list[int]:
    """The fds launchd bound for the plist's ``Sockets`` entry ``name``; the caller owns them.

    One entry can yield several fds (for instance IPv4 and IPv6 for one port). Call it once per
    name and process: a second call fails with EALREADY.

    Args:
        name: the key under ``Sockets`` in the job's plist; handoffd uses the listener's name.
        library: the C functions to call; libSystem when omitted (tests pass a stand-in).

    Returns:
        The fds, in launchd's order, non-inheritable.

    Raises:
        ListenerError: launchd refused; the message names the socket, the errno and the fix.
            The ``OSError`` with the errno is chained as ``__cause__``.

    Example::

        import socket
        from handoff._launchd import activate_socket

        listeners = [socket.socket(fileno=fd) for fd in activate_socket("http")]
    """
    lib = load_libsystem() if library is None else library
    array = _IntArray()
    count = ctypes.c_size_t(0)
    code = lib.activate_socket(name.encode(), ctypes.byref(array), ctypes.byref(count))
    if code != 0:
        cause = OSError(code, os.strerror(code))
        hint = ACTIVATE_ERRORS.get(code, "see launch_activate_socket(3)")
        raise ListenerError(
            f"launchd socket {name!r}: launch_activate_socket failed with "
            f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)}): {hint}"
        ) from cause
    if not ctypes.cast(array, ctypes.c_void_p).value:
        if count.value:
            raise ListenerError(
                f"launchd socket {name!r}: launch_activate_socket reported {count.value} fds "
                "but returned no array"
            )
        return []
    try:
        fds = [int(array[i]) for i in range(count.value)]
    finally:
        # Ours to free, even when count is 0 (malloc(0) may return a real pointer).
        lib.free(array)
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def launchd_sockets(
    names: Sequence[str], *, library: LaunchdLibrary | None = None
) -> list[tuple[str, int]] | None:
    """The sockets launchd holds for these ``Sockets`` names, or None when launchd is not ours.

    This is how handoffd inherits listeners when launchd started it: each configured listener
    name is asked for once; a name the plist does not declare (ENOENT) is left for handoffd to
    bind. Returns None (asking nothing) off macOS unless a ``library`` is given, and when the
    process was not started by launchd (ESRCH).

    Raises:
        ListenerError: launchd refused for another reason (the message names the socket).
    """
    if library is None and sys.platform != "darwin":
        return None
    found: list[tuple[str, int]] = []
    for name in names:
        try:
            fds = activate_socket(name, library=library)
        except ListenerError as exc:
            code = exc.__cause__.errno if isinstance(exc.__cause__, OSError) else None
            if code == errno.ENOENT:
                continue
            if code == errno.ESRCH:
                for _, fd in found:
                    os.close(fd)
                return None
            for _, fd in found:
                os.close(fd)
            raise
        found += [(name, fd) for fd in fds]
    return found
