"""The supervisor's phases and the one table of the transitions between them.

Every phase change goes through ``PhaseMachine.to``: it checks the table (a change the table
does not allow is a bug, so it raises), logs ``supervisor.phase_changed`` and tells whoever
listens (systemd's ``STATUS=``). ``handoffd status`` shows the phase as ``state``.

The table, one upgrade at a time (see ``_supervisor`` for the loop that walks it)::

    starting       -> running | stopping              generation 1 ready, or stopped first
    running        -> spawning | self-upgrading | stopping
    spawning       -> waiting_ready | running         config/listeners bad: failed, N serves
    waiting_ready  -> holding | running               N+1 exited / timed out: failed, N serves
    holding        -> running                         N drains (ok), or N+1 stopped (failed)
    holding        -> waiting_ready                   rolling: the next batch of N+1 starts
    self-upgrading -> running | handed-over           failed (we carry on), or committed
    handed-over    -> (end)                           the successor supervises; we exit
    stopping       -> (end)                           every generation drains, then we exit
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal, final

import structlog

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

Phase = Literal[
    "starting",
    "running",
    "spawning",
    "waiting_ready",
    "holding",
    "self-upgrading",
    "handed-over",
    "stopping",
]

#: A worker slot's state, as ``handoffd status`` shows it.
WorkerState = Literal["starting", "ready", "draining", "backoff", "exited"]

TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    "starting": frozenset({"running", "stopping"}),
    "running": frozenset({"spawning", "self-upgrading", "stopping"}),
    "spawning": frozenset({"waiting_ready", "running"}),
    "waiting_ready": frozenset({"holding", "running"}),
    "holding": frozenset({"running", "waiting_ready"}),
    "self-upgrading": frozenset({"running", "handed-over"}),
    "handed-over": frozenset(),
    "stopping": frozenset(),
}

#: Phases in which a worker upgrade is under way (its new generation exists or is coming).
UPGRADING: Final[frozenset[Phase]] = frozenset({"spawning", "waiting_ready", "holding"})


@final
class PhaseMachine:
    """The current phase; changes only along ``TRANSITIONS``."""

    def __init__(self, on_change: Callable[[Phase], None] | None = None) -> None:
        self.phase: Phase = "starting"
        self._on_change = on_change

    def to(self, new: Phase, **context: object) -> None:
        """Move to ``new``; a change the table does not allow is a bug and raises.

        Raises:
            AssertionError: ``new`` is not reachable from the current phase.
        """
        old = self.phase
        if new not in TRANSITIONS[old]:
            raise AssertionError(f"supervisor phase {old} -> {new} is not in the table")
        self.phase = new
        log.info("supervisor.phase_changed", phase=new, previous=old, **context)
        if self._on_change is not None:
            self._on_change(new)
