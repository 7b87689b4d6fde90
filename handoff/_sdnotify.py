"""The sd_notify client: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (sd_notify(3)).

Standard library only: every worker sends its readiness with this, and a worker must not load
the daemon's dependencies (DESIGN.md "Layout", the worker wing). handoffd uses the same client to
talk to systemd; the supervisor's receiving end is ``_notify``.

Design notes:
- Newline-separated assignments, optionally with fds attached as SCM_RIGHTS (``FDSTORE=1``).
  A ``NOTIFY_SOCKET`` starting with ``@`` is in the abstract namespace.
- One socket per call, closed at once: a worker notifies a handful of times in its life, and a
  socket kept open would be one more fd for its children to inherit or for it to leak.
"""

from __future__ import annotations

import array
import os
import socket
from typing import TYPE_CHECKING, Final

from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# unix(7): at most SCM_MAX_FD (253) fds travel in one message.
SCM_MAX_FD: Final = 253


def notify_address(value: str) -> str | bytes:
    """Turn a ``NOTIFY_SOCKET`` value into a ``sendto`` address (``@name`` is abstract)."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    return value


def notify(
    message: str,
    fds: Sequence[int] = (),
    *,
    environ: Mapping[str, str] | None = None,
    block: bool = True,
    timeout: float | None = None,
) -> bool:
    """Send one sd_notify datagram to ``$NOTIFY_SOCKET``.

    Returns False, sending nothing, when ``NOTIFY_SOCKET`` is unset: that is a process not run
    under systemd or handoffd, for which readiness is meaningless. Raises ``OSError`` when the
    socket is set but the message cannot be delivered; with ``block=False`` a receiver whose
    queue is full raises ``BlockingIOError`` instead of stalling the caller (an event loop must
    never wait on its service manager); with ``timeout`` it waits at most that long for room
    (``TimeoutError``).

    Example::

        notify("READY=1\\nSTATUS=serving on 8080")
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | SOCK_CLOEXEC) as sock:
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        if timeout is not None:
            sock.settimeout(timeout)
        flags = 0 if block else socket.MSG_DONTWAIT
        sock.sendmsg([message.encode()], ancillary, flags, notify_address(target))
    return True
