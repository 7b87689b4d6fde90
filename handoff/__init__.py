"""handoff: the worker library of handoffd, the zero-downtime reload supervisor.

A worker gets its listening sockets with ``listeners()`` (or ``listen("&name")``) and says it
serves with ``ready()``; ``put``/``get`` hand named fd sets over a Unix socket (SCM_RIGHTS).
The rest of handoffd is the ``handoffd`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._errors import ListenerError as ListenerError
    from ._errors import ProtocolError as ProtocolError
    from ._passing import Received as Received
    from ._passing import get as get
    from ._passing import get_blocking as get_blocking
    from ._passing import put as put
    from ._passing import put_blocking as put_blocking
    from ._worker import ListenPidMismatchError as ListenPidMismatchError
    from ._worker import get_listeners as get_listeners
    from ._worker import has_reuseport as has_reuseport
    from ._worker import is_fifo as is_fifo
    from ._worker import is_listening as is_listening
    from ._worker import is_socket as is_socket
    from ._worker import is_tcp_listener as is_tcp_listener
    from ._worker import is_udp as is_udp
    from ._worker import is_unix_listener as is_unix_listener
    from ._worker import listen as listen
    from ._worker import listen_packet as listen_packet
    from ._worker import listeners as listeners
    from ._worker import one_listener as one_listener
    from ._worker import park as park
    from ._worker import parked as parked
    from ._worker import parked_fds as parked_fds
    from ._worker import ready as ready
    from ._worker import reloading as reloading
    from ._worker import status as status
    from ._worker import stopping as stopping
    from ._worker import unpark as unpark
    from ._worker import watchdog as watchdog

# Where each public name lives. The package imports nothing heavy until a name is used, so
# `handoffd status` and friends start without loading trio or pydantic (PEP 562).
_EXPORTS: dict[str, str] = {
    "ListenerError": "._errors",
    "ProtocolError": "._errors",
    "Received": "._passing",
    "get": "._passing",
    "get_blocking": "._passing",
    "put": "._passing",
    "put_blocking": "._passing",
    "ListenPidMismatchError": "._worker",
    "get_listeners": "._worker",
    "has_reuseport": "._worker",
    "is_fifo": "._worker",
    "is_listening": "._worker",
    "is_socket": "._worker",
    "is_tcp_listener": "._worker",
    "is_udp": "._worker",
    "is_unix_listener": "._worker",
    "listen": "._worker",
    "listen_packet": "._worker",
    "listeners": "._worker",
    "one_listener": "._worker",
    "park": "._worker",
    "parked": "._worker",
    "parked_fds": "._worker",
    "ready": "._worker",
    "reloading": "._worker",
    "status": "._worker",
    "stopping": "._worker",
    "unpark": "._worker",
    "watchdog": "._worker",
}

__all__ = [
    "ListenPidMismatchError",
    "ListenerError",
    "ProtocolError",
    "Received",
    "get",
    "get_blocking",
    "get_listeners",
    "has_reuseport",
    "is_fifo",
    "is_listening",
    "is_socket",
    "is_tcp_listener",
    "is_udp",
    "is_unix_listener",
    "listen",
    "listen_packet",
    "listeners",
    "one_listener",
    "park",
    "parked",
    "parked_fds",
    "put",
    "put_blocking",
    "ready",
    "reloading",
    "status",
    "stopping",
    "unpark",
    "watchdog",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'handoff' has no attribute {name!r}")
    value: object = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
