"""handoff: the worker library of handoffd, the zero-downtime reload supervisor.

A worker gets its listening sockets with ``listeners()`` and says it serves with ``ready()``;
the rest of handoffd is the ``handoffd`` command.
"""

from __future__ import annotations

from ._worker import ListenPidMismatchError as ListenPidMismatchError
from ._worker import listeners as listeners
from ._worker import ready as ready
from ._worker import reloading as reloading
from ._worker import status as status
from ._worker import stopping as stopping
from ._worker import watchdog as watchdog

__all__ = [
    "ListenPidMismatchError",
    "listeners",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
]
