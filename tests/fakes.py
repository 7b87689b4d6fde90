"""Fake processes for unit tests of the supervisor and the generations (the process seam).

``FakeSpawner`` implements ``handoff._processes.Spawner``: nothing is started, each "worker" is
a ``FakeProcess`` the test drives. A fake worker speaks the real sd_notify protocol to the real
notify socket the generation bound (``notify("READY=1")``), so everything above the seam is the
production code. Run these on trio's ``autojump_clock``: timeouts and backoffs pass instantly.

Notify access: a fake's tree is the test process (``FakeProcess.tree``), since its datagrams come
from there; empty it to see a worker's datagrams refused as an intruder's would be.

Observed readiness: ``FakeSpawner.probe`` is a ``_readiness.ReadinessProbe`` that reports a fake
process as accepting while its ``accepting`` flag is set (``holds`` says whether it still holds a
listener); ``unobservable`` makes every tree unobservable, as on a host without ``/proc``.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from handoff._errors import SpawnError
from handoff._notify_access import Attribution, NotifySender
from handoff._processes import SpawnRequest
from handoff._readiness import TreeCheck

_pids = itertools.count(900_001)


@dataclass(eq=False)
class FakeProcess:
    """A worker the test drives: ``exit(code)``, ``notify(text)``, ``await next_signal()``."""

    command: list[str]
    environ: dict[str, str]
    fds: list[int]
    pid: int = field(default_factory=lambda: next(_pids))
    returncode: int | None = None
    is_child: bool = True
    pidfd: int = -1
    #: Signals it exits on by itself (SIGKILL always ends it).
    exits_on: frozenset[int] = frozenset({signal.SIGTERM})
    signals: list[int] = field(default_factory=list)
    started_at: float = field(default_factory=trio.current_time)
    #: What the fake probe sees: waiting on a listener, holding one.
    accepting: bool = False
    holds: bool = True
    #: Senders in its "tree": the test process, which sends its datagrams (``notify``).
    tree: frozenset[int] = field(default_factory=lambda: frozenset({os.getpid()}))
    _exited: trio.Event = field(default_factory=trio.Event)
    _signal_send: trio.MemorySendChannel[int] | None = None
    _signal_receive: trio.MemoryReceiveChannel[int] | None = None

    def __post_init__(self) -> None:
        self._signal_send, self._signal_receive = trio.open_memory_channel[int](100)

    @property
    def generation(self) -> int:
        return int(self.environ["HANDOFF_GENERATION"])

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        self.signals.append(sig)
        assert self._signal_send is not None
        self._signal_send.send_nowait(sig)
        if sig == signal.SIGKILL:
            self.exit(-signal.SIGKILL)
        elif sig in self.exits_on:
            self.exit(-sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        pass

    def signal_group(self, sig: int) -> None:
        # A fake has no group members: its group is itself.
        self.send_signal(sig)

    def group_roots(self) -> list[int]:
        return [self.pid] if self.returncode is None else []

    async def wait_group_exited(self) -> None:
        await trio.lowlevel.checkpoint()

    def attribute(self, sender: NotifySender) -> Attribution:
        if sender.pid in self.tree:
            return Attribution(True, "the fake worker's tree")
        return Attribution(False, f"pid {sender.pid} is not in the fake worker's tree")

    def exit(self, code: int) -> None:
        """The process ends with ``code`` (``-N``: killed by signal N)."""
        if self.returncode is None:
            self.returncode = code
            self._exited.set()

    def notify(self, text: str) -> None:
        """Send ``text`` to the worker's NOTIFY_SOCKET, as sd_notify(3) would."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), self.environ["NOTIFY_SOCKET"])

    async def next_signal(self) -> int:
        assert self._signal_receive is not None
        return await self._signal_receive.receive()


#: What a fake worker does as soon as it is spawned (e.g. notify READY=1, or exit).
Behaviour = Callable[[FakeProcess], None]


def ready_at_once(proc: FakeProcess) -> None:
    proc.notify("READY=1")


@dataclass
class FakeSpawner:
    """A ``Spawner`` whose processes are ``FakeProcess``es; ``behaviour`` runs on each spawn."""

    behaviour: Behaviour = ready_at_once
    handover_refusal: str | None = None
    processes: list[FakeProcess] = field(default_factory=list)
    fail_with: str | None = None
    #: Set: every tree is unobservable with this reason (a host where /proc shows nothing).
    unobservable: str | None = None
    _spawns: tuple[trio.MemorySendChannel[FakeProcess], trio.MemoryReceiveChannel[FakeProcess]] = (
        field(default_factory=lambda: trio.open_memory_channel[FakeProcess](10_000))
    )

    def spawn(self, request: SpawnRequest) -> FakeProcess:
        if self.fail_with is not None:
            raise SpawnError(self.fail_with)
        proc = FakeProcess(
            command=list(request.command), environ=dict(request.environ), fds=list(request.fds)
        )
        self.processes.append(proc)
        self._spawns[0].send_nowait(proc)
        self.behaviour(proc)
        return proc

    async def next_spawn(self) -> FakeProcess:
        """The next process spawned (in order; none is missed)."""
        return await self._spawns[1].receive()

    def probe(
        self, roots: Sequence[int], keys: Mapping[int, object], remembered: frozenset[int]
    ) -> TreeCheck:
        """A ``ReadinessProbe`` over the fake processes (see the module docstring)."""
        if self.unobservable is not None:
            return TreeCheck("unobservable", self.unobservable)
        procs = [p for p in self.processes if p.pid in roots and p.returncode is None]
        holders = frozenset(p.pid for p in procs if p.holds)
        waiters = frozenset(p.pid for p in procs if p.holds and p.accepting)
        if holders and waiters == holders:
            return TreeCheck("accepting", "fake accepting", holders, waiters, waiting_now=True)
        return TreeCheck("not-accepting", "fake not accepting", holders, waiters)

    def adopt(self, pid: int, pidfd: int | None = None) -> FakeProcess:
        raise AssertionError("the fakes do not adopt processes")

    def of_generation(self, number: int) -> list[FakeProcess]:
        return [p for p in self.processes if p.generation == number]

    def live(self) -> list[FakeProcess]:
        return [p for p in self.processes if p.returncode is None]
