"""The library for worker programs: the sockets you were given, and telling the supervisor how you are.

Works the same under handoffd and under systemd (both use LISTEN_FDS and NOTIFY_SOCKET), and
falls back to doing nothing where neither is present, so a worker runs unchanged on a laptop.

Example::

    import socket, handoff

    sock = handoff.listeners()["http"][0]     # the socket handoffd named "http"
    handoff.ready()                           # the supervisor may now retire the old generation
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from ._notify import notify
from ._systemd import parse_listen_fds

_cache: dict[str, list[socket.socket]] | None = None


class ListenPidMismatchError(RuntimeError):
    """``LISTEN_FDS`` was set for another process (Go's ``ErrPIDMismatch``)."""


def _socket_for(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def listeners(environ: Mapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The sockets this process was given, by name, parsed once and cached.

    Reads ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` and then removes them from
    ``os.environ`` so that children do not take them for their own. Returns ``{}`` when nothing
    was passed.

    Raises:
        ListenPidMismatchError: ``LISTEN_PID`` names another process.
    """
    global _cache
    if _cache is not None:
        return _cache
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" in env and "LISTEN_PID" in env and env["LISTEN_PID"] != str(os.getpid()):
        raise ListenPidMismatchError(
            f"LISTEN_PID={env['LISTEN_PID']} but this process is {os.getpid()}: the fds were "
            "meant for another process; do not pass LISTEN_* on to children"
        )
    inherited = parse_listen_fds(env, os.getpid()) or []
    result: dict[str, list[socket.socket]] = {}
    for item in inherited:
        result.setdefault(item.name, []).append(_socket_for(item.fd))
    if environ is None:
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            os.environ.pop(key, None)
    _cache = result
    return result


def ready(status: str | None = None) -> bool:
    """Tell the supervisor this worker serves: ``READY=1``. False where nobody listens."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """Set this worker's one-line status (``STATUS=``), shown by ``handoffd status``."""
    return notify(f"STATUS={text}")


def stopping() -> bool:
    """Say this worker is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Say this worker is reloading its own state (``RELOADING=1``)."""
    return notify("RELOADING=1")


def watchdog() -> bool:
    """Keep-alive ping (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")
