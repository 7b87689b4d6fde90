"""handoff: the worker library of handoffd, the zero-downtime reload supervisor.

A worker gets its listening sockets with ``listeners()`` (or ``listen("&name")``) and says it
serves with ``ready()``; ``put``/``get`` hand named fd sets over a Unix socket (SCM_RIGHTS).
The rest of handoffd is the ``handoffd`` command.

Everything but ``put``/``get`` (async, for trio programs) uses only the standard library: a
worker that imports this loads none of handoffd's own dependencies (trio, pydantic, structlog).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Where each public name lives; ``__all__``, ``__getattr__`` and ``__dir__`` are derived from it.
# The package imports nothing until a name is used (PEP 562), so `handoffd status` and friends
# start without loading the worker library, and ``handoff.put``/``get`` load trio only when
# used. Type checkers cannot read this dict: the TYPE_CHECKING block repeats it in the form that
# mypy --strict takes as a re-export, and tests/unit/test_exports.py fails when the two differ
# in a name or a module.
_EXPORTS: dict[str, str] = {
    "ListenPidMismatchError": "._errors",
    "ListenerError": "._errors",
    "ProtocolError": "._errors",
    "Received": "._passing",
    "get_blocking": "._passing",
    "put_blocking": "._passing",
    "get": "._passing_trio",
    "put": "._passing_trio",
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

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ._errors import ListenerError as ListenerError
    from ._errors import ListenPidMismatchError as ListenPidMismatchError
    from ._errors import ProtocolError as ProtocolError
    from ._passing import Received as Received
    from ._passing import get_blocking as get_blocking
    from ._passing import put_blocking as put_blocking
    from ._passing_trio import get as get
    from ._passing_trio import put as put
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


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'handoff' has no attribute {name!r}")
    value: object = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
