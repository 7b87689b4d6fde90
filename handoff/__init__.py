"""handoff: the worker library of handoffd, the zero-downtime reload supervisor.

A worker gets its listening sockets with ``listeners()`` (or ``listen("&name")``) and says it
serves with ``ready()``; ``put``/``get`` hand named fd sets over a Unix socket (SCM_RIGHTS).
The rest of handoffd is the ``handoffd`` command.
"""

from __future__ import annotations

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
