"""Upgrade requests, their coalescing, and the replies every caller waits for.

One ``UpgradeTicket`` per pending upgrade of a kind (worker or supervisor). Requests that
arrive while one of the same kind is pending join it; a request that arrives while an upgrade
of its kind *runs* opens the next ticket, so a burst costs the running upgrade and at most one
follow-up. Every ticket is finished exactly once (``finish`` asserts it): a reply is never
written and then overwritten.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, final

import structlog
import trio

from ._control import UpgradeEvent, UpgradePhase, UpgradeReply

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._control import UpgradeRequest

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


@final
class UpgradeTicket:
    """One pending upgrade and everyone waiting for its outcome."""

    def __init__(self, request: UpgradeRequest) -> None:
        self.request = request
        self.reply: UpgradeReply | None = None
        self.callers = 0
        self.returned = trio.Event()  # set once every caller has its reply in hand
        self.phases: list[UpgradePhase] = []
        self._started: float | None = None
        self._subscribers: list[trio.MemorySendChannel[UpgradeEvent]] = []

    def begin(self) -> None:
        """The upgrade starts now: phases and the duration count from here."""
        self._started = trio.current_time()

    def elapsed(self) -> float:
        return 0.0 if self._started is None else round(trio.current_time() - self._started, 4)

    def phase(self, name: str, detail: str | None = None) -> None:
        """Record a phase of the upgrade and stream it to every caller."""
        item = UpgradePhase(phase=name, elapsed_s=self.elapsed(), detail=detail)
        self.phases.append(item)
        self.publish(UpgradeEvent(phase=name, elapsed_s=item.elapsed_s, detail=detail))

    def subscribe(self) -> trio.MemoryReceiveChannel[UpgradeEvent]:
        send, receive = trio.open_memory_channel[UpgradeEvent](math.inf)
        if self.reply is not None:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def publish(self, event: UpgradeEvent) -> None:
        for channel in self._subscribers:
            # A caller that left does not stop the others from getting the events.
            with contextlib.suppress(trio.BrokenResourceError):
                channel.send_nowait(event)

    def ok(self, generation: int, previous: int | None, **extra: int) -> UpgradeReply:
        return UpgradeReply(
            ok=True,
            outcome="ok",
            generation=generation,
            previous_generation=previous,
            duration_s=self.elapsed(),
            phases=list(self.phases),
            **extra,
        )

    def failed(self, reason: str, generation: int) -> UpgradeReply:
        return UpgradeReply(
            ok=False,
            outcome="failed",
            reason=reason,
            generation=generation,
            previous_generation=generation,
            duration_s=self.elapsed(),
            phases=list(self.phases),
        )

    def finish(self, reply: UpgradeReply) -> None:
        """Give every caller ``reply``; a ticket is finished once."""
        assert self.reply is None, f"ticket finished twice: {self.reply} then {reply}"
        self.reply = reply
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()
        if self.callers == 0:
            self.returned.set()

    async def follow(self, on_event: Callable[[UpgradeEvent], Awaitable[None]]) -> UpgradeReply:
        """Stream this upgrade's events to ``on_event`` as one caller; return its outcome."""
        self.callers += 1
        try:
            async with self.subscribe() as events:
                async for event in events:
                    await on_event(event)
        finally:
            self.caller_returned()
        assert self.reply is not None
        return self.reply

    def caller_returned(self) -> None:
        self.callers -= 1
        if self.callers == 0 and self.reply is not None:
            self.returned.set()


@final
class UpgradeQueue:
    """The pending tickets, at most one per kind; the upgrade loop takes them in turn."""

    def __init__(self) -> None:
        self._pending: dict[bool, UpgradeTicket] = {}
        self._wanted = trio.Event()

    def request(
        self,
        request: UpgradeRequest,
        generation: int,
        stopping: bool = False,
        successor_pid: int | None = None,
    ) -> UpgradeTicket:
        """Queue ``request`` (joining a pending one of its kind), or refuse it at once.

        A stopping supervisor, one that handed over to ``successor_pid``, and a self-upgrade
        naming another executable than the pending one refuse, rather than merge or queue.
        """
        refusal: str | None = None
        if successor_pid is not None:
            refusal = (
                f"this handoffd handed over to pid {successor_pid}; send the request again "
                "(it reaches the new supervisor on the same control socket)"
            )
        elif stopping:
            refusal = "handoffd is stopping"
        ticket = self._pending.get(request.supervisor)
        if refusal is None and ticket is not None and ticket.request.exec_path != request.exec_path:
            refusal = (
                f"a self-upgrade with exec_path={ticket.request.exec_path!r} is already pending; "
                "send this one again once it is done"
            )
        if refusal is not None:
            refused = UpgradeTicket(request)
            refused.finish(refused.failed(refusal, generation))
            return refused
        if ticket is None:
            ticket = self._pending[request.supervisor] = UpgradeTicket(request)
            self._wanted.set()
        else:
            log.info("upgrade.coalesced", supervisor=request.supervisor)
        return ticket

    async def next(self) -> UpgradeTicket:
        """Wait for a pending ticket and take it (worker upgrades before self-upgrades)."""
        while not self._pending:
            await self._wanted.wait()
            self._wanted = trio.Event()
        return self._pending.pop(False if False in self._pending else True)  # noqa: SIM211  workers first

    def take_all(self) -> list[UpgradeTicket]:
        """Every pending ticket, removed from the queue (for the caller to finish)."""
        tickets = list(self._pending.values())
        self._pending.clear()
        return tickets

    def fail_all(self, reason: str, generation: int) -> None:
        """Answer every pending ticket with ``reason`` (a stopping supervisor runs none)."""
        for ticket in self.take_all():
            ticket.finish(ticket.failed(reason, generation))


def log_finished(reply: UpgradeReply, **extra: object) -> None:
    """The one canonical line per upgrade: ``upgrade.finished outcome=... reason=...``."""
    # A failed upgrade is something an operator must see: N kept serving, the deploy did not land.
    emit = log.info if reply.ok else log.warning
    emit(
        "upgrade.finished",
        outcome=reply.outcome,
        reason=reply.reason,
        generation=reply.generation,
        duration_s=reply.duration_s,
        **extra,
    )
