"""One generation: ``processes`` workers of the same command, started, watched and drained together.

Design notes:
- ``run_generation`` is started with ``nursery.start``: it calls ``task_status.started(gen)`` only
  once every worker is ready by the program's ``ready`` mode (below). Before that, any worker exit, a
  spawn error or ``ready_timeout`` makes it stop every worker it started and raise
  ``SpawnError`` with the reason, so an upgrade can keep the old generation and report why.
- A generation that failed is stopped like a draining one (stop_signal, drain_timeout, SIGKILL):
  a worker that never said READY=1 may still have accepted connections from the shared queue,
  and killing it outright would reset them.
- After it is ready, a worker that dies is restarted with exponential backoff (reset once a
  worker stayed up longer than the maximum backoff). Its replacement gets the same fd set.
- ``request_drain()`` (sync, so it is atomic) makes the task send ``stop_signal`` to every
  worker, wait up to ``drain_timeout`` for them to exit, then SIGKILL what is left. The task
  returns when no worker of the generation remains.
- Readiness modes. ``notify``: READY=1. ``delay:N``: alive N seconds. ``accepting``: the
  worker's process tree is seen waiting for connections on the generation's listeners
  (``_observe``'s rule, probed every ``_readiness.POLL_INTERVAL`` while the worker starts, and
  held for ``STABLE_FOR``); where that cannot be observed it fails at ready_timeout with the
  reason. ``auto`` (the default): accepting, and READY=1 as well if the program speaks sd_notify,
  which it does when any datagram reached its NOTIFY_SOCKET before its tree was accepting (so
  gunicorn's early READY=1 no longer counts alone, and a program that never notifies is ready on
  observation alone). Where nothing can be observed (not Linux, ``/proc`` denied, io_uring),
  ``auto`` falls back to READY=1: logged once per generation (``readiness.fallback``) and shown
  per worker in ``status``.
- The canary hold (``begin_hold``/``end_hold``, driven by the supervisor): a worker that exits
  during it is not restarted; it makes the hold fail (``hold_lost``) with the reason, and the
  supervisor stops the generation like a failed start. In the observed modes the trees are also
  probed: a tree that no longer holds any listener, or that was accepting through epoll and has
  no listener registered or waited on any more, fails it too. A busy sync worker is not "in
  accept" at every snapshot, so being busy never fails a hold.
- A generation owns its workers' whole trees (each worker leads a process group; handoffd is a
  subreaper): stop signals go to the group, and a drain ends only when every member has exited;
  drain_timeout ends with SIGKILL to every group.
- Readiness is attributed by socket: every worker has its own ``NOTIFY_SOCKET`` path, and a new
  one for each restart, so a late datagram from a dead worker can never mark its successor ready.
  And by sender: only a datagram from the worker's own tree is applied (``_notify_access``); any
  other is refused (its fds closed), counted per worker (``notify_rejected`` in ``status``) and
  logged as ``notify.rejected`` at most once per ``_REJECTED_LOG_INTERVAL`` per worker, with how
  many were held back.
- Self-upgrade (see ``_handover``): ``freeze()`` stops a generation from reading its workers'
  notify sockets, and returns once no datagram can be applied any more (the datagrams wait in
  the sockets for the successor). Crashed workers are still seen and restarted meanwhile:
  supervision never stops for a handover. ``hand_over()`` (when the commit is taken) stops
  every spawn, so the commit's snapshot stays true, and makes the tasks let go of everything
  without killing a worker or unlinking a notify socket when the old supervisor's nursery is
  cancelled. ``thaw()`` undoes both when the handover fails. ``run_adopted_generation`` is the successor's side: the same generation,
  its workers watched through the pidfds handed over (they are not its children, so their exit
  status is unknown), restarted as normal children when they crash, drained like any other.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, final

import structlog
import trio
from structlog.contextvars import bound_contextvars, clear_contextvars

from ._errors import ConfigError, ProtocolError, SpawnError
from ._fdname import valid_fdname
from ._listeners import restore_flags, revive_dead
from ._notify import NotifyMessage, NotifyReceiver, close_fds
from ._output import OUTPUT_FLUSH, OutputPipe, open_output_pipes, pump_output, take_read_ends
from ._processes import REAP_TIMEOUT_S, SpawnRequest, WorkerSettings, kill_and_reap
from ._readiness import POLL_INTERVAL, STABLE_FOR, TreeCheck, probe_proc
from ._spawn import DEFAULT_SPAWNER, describe_exit

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from pathlib import Path

    from ._config import ProgramConfig
    from ._observe import ListenerKey, Verdict
    from ._output import Stream
    from ._phases import WorkerState
    from ._processes import ProcessHandle, Spawner
    from ._readiness import ReadinessProbe

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


_spawn_sequence = itertools.count(1)
# At most one notify.rejected line per worker this often: a same-uid process could send refused
# datagrams in a loop, and each would otherwise write a log line.
_REJECTED_LOG_INTERVAL: Final = 10.0
# The longest STATUS= text kept per worker (one line for `handoffd status`).
_STATUS_MAX: Final = 1024
# The most fds workers may park at once (systemd's FileDescriptorStoreMax= plays the same role).
PARKED_MAX: Final = 4096
# Every parked fd is passed to every later worker, at fds 3.. under the worker's own soft
# RLIMIT_NOFILE: keep room below it for the listeners and the worker's own fds.
PARKED_FD_HEADROOM: Final = 128
# The parked fds' names (each + 1 for the ':') must fit, with the listeners' names, in one
# LISTEN_FDNAMES string (execve(2): MAX_ARG_STRLEN, 128 KiB, per string; argv + environ within
# ARG_MAX, a quarter of the stack limit: 2 MiB at the common 8 MiB), and, with the rest of the
# state, in a self-upgrade's 128 KiB state message. 64 KiB leaves room for all three.
PARKED_NAME_BYTES: Final = 64 * 1024


@final
class ParkedFds:
    """Fds that workers parked (``FDSTORE=1`` + ``FDNAME=``) for the next generation.

    Owned by the supervisor and kept across upgrades until a worker unparks them
    (``FDSTOREREMOVE=1``). Every worker started later receives them after the listeners.
    """

    def __init__(self, worker_fd_limit: int | None = None) -> None:
        """``worker_fd_limit``: the soft RLIMIT_NOFILE workers start with (see ``_limits``)."""
        self._items: list[tuple[str, int]] = []
        self.max_fds = PARKED_MAX
        if worker_fd_limit is not None:
            self.max_fds = max(0, min(PARKED_MAX, worker_fd_limit - PARKED_FD_HEADROOM))
        self._name_bytes = 0

    def park(self, name: str, fd: int) -> None:
        self._items.append((name, fd))
        self._name_bytes += len(name) + 1
        log.info("fd.parked", fdname=name, fd=fd, parked=len(self._items))

    def park_all(self, name: str, fds: Sequence[int]) -> bool:
        """Park ``fds`` under ``name`` if the name is valid and there is room; else refuse.

        Every parked fd and its name go to every later worker, so the store is bounded by what
        every later spawn and a self-upgrade can carry (see ``PARKED_FD_HEADROOM`` and
        ``PARKED_NAME_BYTES``), as systemd bounds its own (FileDescriptorStoreMax=): a refused
        FDSTORE is logged; a stored one never breaks the next spawn. Returns whether the fds
        were kept (the caller closes them otherwise).
        """
        invalid = valid_fdname(name)
        problem = None if invalid is None else f"FDNAME {invalid}"
        if problem is None and len(self._items) + len(fds) > self.max_fds:
            problem = (
                f"more than {self.max_fds} parked fds (every later worker gets them at fds "
                "3.., below its fd limit)"
            )
        if problem is None and self._name_bytes + (len(name) + 1) * len(fds) > PARKED_NAME_BYTES:
            problem = (
                f"the parked fds' names would exceed {PARKED_NAME_BYTES} bytes (they travel "
                "in every later worker's LISTEN_FDNAMES and in a self-upgrade's state)"
            )
        if problem is not None:
            log.warning(
                "fd.park_refused",
                fdname=name[:64],
                fds=len(fds),
                parked=len(self._items),
                reason=f"{problem}; unpark (FDSTOREREMOVE=1) what the next generation no "
                "longer needs, or use shorter names",
            )
            return False
        for fd in fds:
            self.park(name, fd)
        return True

    def unpark(self, name: str) -> None:
        gone = [fd for n, fd in self._items if n == name]
        self._items = [(n, fd) for n, fd in self._items if n != name]
        self._name_bytes -= (len(name) + 1) * len(gone)
        close_fds(gone)
        log.info("fd.unparked", fdname=name, closed=len(gone))

    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple(self._items)

    def restore(self, items: Sequence[tuple[str, int]]) -> None:
        """Take over fds parked under a previous supervisor (a self-upgrade); we own them now."""
        self._items.extend(items)
        self._name_bytes += sum(len(name) + 1 for name, _ in items)

    def close_all(self) -> None:
        close_fds([fd for _, fd in self._items])
        self._items = []
        self._name_bytes = 0


class WorkerCounters(Protocol):
    """What generations report about their workers (``_metrics.Metrics``)."""

    def generation_created(self) -> None:
        """A generation is being spawned (never called for an adopted one)."""

    def worker_exited(self, proc: ProcessHandle | None) -> None:
        """A worker process ended (``proc``), or one could not be started (None)."""

    def worker_restarted(self) -> None:
        """A crashed worker is being restarted."""


@final
@dataclass(frozen=True)
class GenerationSpec:
    """Everything needed to start the workers of generation ``number``."""

    number: int
    program: ProgramConfig
    listeners: tuple[tuple[str, int], ...]
    environ: Mapping[str, str]
    notify_dir: Path
    backoff_initial: float
    backoff_max: float
    compat_environ: Mapping[str, str] = field(default_factory=dict)
    #: How workers are started and watched (the process seam; fakes in unit tests).
    spawner: Spawner = DEFAULT_SPAWNER
    #: How many worker processes are alive in all generations (see ``_spawn``'s flag rule).
    live_workers: Callable[[], int] = lambda: 0
    #: The held listeners by socket inode, for observed readiness (``_observe.listener_keys``).
    listener_keys: Mapping[int, ListenerKey] = field(default_factory=dict)
    #: How a worker's tree is judged accepting (the /proc one; fakes in unit tests).
    probe: ReadinessProbe = probe_proc
    #: Makes the notify dir reachable by workers of another uid (``program.user``).
    open_notify_dir: Callable[[], None] = lambda: None
    #: Where worker exits and restarts are counted, if anywhere.
    counters: WorkerCounters | None = None
    #: Called once a worker process is in a slot (spawned or adopted), its notify socket set.
    on_spawned: Callable[[], None] = lambda: None


@final
@dataclass(eq=False)
class WorkerSlot:
    """One worker position of a generation; the process in it changes on restarts."""

    index: int
    state: WorkerState = "starting"
    process: ProcessHandle | None = None
    status: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    ever_ready: bool = False
    # Replaced by a rolling upgrade: no worker until the generation recalls it.
    retired: bool = False
    exited: trio.Event = field(default_factory=trio.Event)
    # What the running worker has shown so far (reset at each spawn; see the module notes).
    notified: bool = False
    ready_sent: bool = False
    accepting: bool = False
    epoll_ready: bool = False
    #: Why the worker is ready by READY=1 alone under ``auto`` (nothing could be observed).
    fallback: str | None = None
    #: The last verdict of its tree while it starts, for the ready_timeout reason.
    observed: str | None = None
    # The supervisor's ends of the running worker's sockets (a self-upgrade hands them over).
    notify: NotifyReceiver | None = field(default=None, repr=False)
    channel: socket.socket | None = field(default=None, repr=False)
    #: output = "log": the read ends the running worker's pumps hold (a self-upgrade hands
    #: them over, or the worker would get EPIPE once we exit).
    outputs: dict[Stream, int] = field(default_factory=dict, repr=False)
    #: Notify datagrams refused because their sender was not in the worker's tree (all spawns).
    notify_rejected: int = 0
    #: When ``notify.rejected`` was last logged (trio clock), and how many were refused since.
    rejected_logged_at: float | None = None
    rejected_unlogged: int = 0


@final
@dataclass(eq=False)
class AdoptedWorker:
    """A worker handed over by the previous supervisor, for ``run_adopted_generation``.

    ``process`` is None for a slot that had no live worker (it was waiting to be restarted): it
    is started afresh. Everything else is the slot as the previous supervisor saw it.
    """

    index: int
    process: ProcessHandle | None
    notify: NotifyReceiver | None
    channel: socket.socket | None
    state: WorkerState
    status: str | None
    restarts: int
    last_exit: str | None
    ever_ready: bool
    outputs: dict[Stream, int] = field(default_factory=dict)

    def close(self) -> None:
        """Let go of what we were handed without touching the worker (adoption was abandoned)."""
        close_fds(list(self.outputs.values()))
        self.outputs = {}
        if self.process is not None:
            self.process.close()
        if self.notify is not None:
            _close_receiver(self.notify, unlink=False)
        if self.channel is not None:
            self.channel.close()


@final
class Generation:
    """A running generation, as the supervisor and ``handoffd status`` see it."""

    def __init__(self, spec: GenerationSpec, parked: ParkedFds) -> None:
        self.spec = spec
        self.number = spec.number
        self.parked = parked
        self.slots = [WorkerSlot(index=i) for i in range(spec.program.processes)]
        self.ready = trio.Event()
        self.stopped = trio.Event()
        self.draining = False
        self.failure: str | None = None
        # trio.current_time() by which a drain SIGKILLs what is left (set once draining).
        self.drain_deadline: float | None = None
        self.handed_over = False
        # Not None while handed over; set (and dropped) by thaw(): spawns wait for it.
        self._taken_back: trio.Event | None = None
        self._settled = trio.Event()
        self._drain_requested = trio.Event()
        # Not None while frozen; set (and dropped) by thaw().
        self._thawed: trio.Event | None = None
        self._pumps: set[trio.CancelScope] = set()
        self._pumps_idle = trio.Event()
        # Every worker process spawned whose group may still have members (drained together).
        self.spawned: list[ProcessHandle] = []
        # The canary hold (see the module notes).
        self.holding = False
        self.hold_for = 0.0
        self.hold_started = 0.0
        self.hold_failure: str | None = None
        self.hold_lost = trio.Event()
        self._hold_begun = trio.Event()
        #: The first reason ``auto`` fell back to READY=1 in this generation (logged once).
        self.fallback: str | None = None
        # output = "log": the nursery the output pumps run in (they outlive their worker, see
        # _output), and one Event per pump, set at its EOF.
        self._nursery: trio.Nursery | None = None
        self._pumps_done: list[trio.Event] = []
        # A rolling upgrade (``_rolling``): slots at or above ``enabled`` start no worker yet;
        # a ``retired`` slot of the old generation stops its worker and waits to be recalled.
        self.enabled = len(self.slots)
        self._enabled = trio.Event()
        self._recalled = trio.Event()
        self._changed = trio.Event()

    def request_drain(self) -> None:
        """Ask the generation to stop (stop_signal, drain_timeout, then SIGKILL)."""
        self.draining = True
        self._drain_requested.set()

    def is_draining(self) -> bool:
        """A method, not the attribute, so type checkers do not assume it is unchanged by awaits."""
        return self.draining

    async def freeze(self) -> None:
        """Stop reading notify sockets until ``thaw()`` (crash restarts go on).

        Returns once every notify pump has stopped: from then on nothing a worker sends changes
        this generation (datagrams wait in the sockets, for whoever reads them next).
        """
        if self._thawed is None:
            self._thawed = trio.Event()
        if not self._pumps:
            await trio.lowlevel.checkpoint()
            return
        self._pumps_idle = trio.Event()
        for scope in self._pumps:
            scope.cancel()
        await self._pumps_idle.wait()

    def thaw(self) -> None:
        """Undo ``freeze()`` and ``hand_over()``: the handover failed and we carry on."""
        self.handed_over = False
        for event in (self._thawed, self._taken_back):
            if event is not None:
                event.set()
        self._thawed = self._taken_back = None

    def hand_over(self) -> None:
        """A successor owns the workers now: spawn nothing more, and when cancelled, let go
        without killing them."""
        self.handed_over = True
        if self._taken_back is None:
            self._taken_back = trio.Event()

    async def _wait_thawed(self) -> None:
        # A loop, not one wait: a thaw followed at once by another freeze must keep us waiting.
        while self._thawed is not None:
            await self._thawed.wait()

    async def _wait_taken_back(self) -> None:
        while self._taken_back is not None:
            await self._taken_back.wait()

    def begin_hold(self, seconds: float) -> None:
        """Both generations serve now: a worker exit or a lost listener fails the hold."""
        self.holding = True
        self.hold_for = seconds
        self.hold_started = trio.current_time()
        self._hold_begun.set()

    def end_hold(self) -> None:
        self.holding = False

    def is_holding(self) -> bool:
        """A method, not the attribute, so type checkers do not assume it is unchanged by awaits."""
        return self.holding

    def hold_elapsed(self) -> str:
        """``1.02s of 2s``: how far into the hold we are, for a failure's reason."""
        return f"{trio.current_time() - self.hold_started:.2f}s of {self.hold_for:g}s"

    def lose_hold(self, reason: str) -> None:
        """The hold failed (or a stop cut it short): the supervisor stops this generation."""
        if self.holding and self.hold_failure is None:
            self.hold_failure = reason
            self.hold_lost.set()

    def start_output(self, outputs: Mapping[Stream, int], pid: int, slot: WorkerSlot) -> None:
        """Pump ``outputs``' read ends (ours from now on) until EOF (see ``_output``)."""
        slot.outputs = {}
        for stream, fd in outputs.items():
            if self._nursery is None:
                os.close(fd)
                continue
            done = trio.Event()
            self._pumps_done = [e for e in self._pumps_done if not e.is_set()]
            self._pumps_done.append(done)
            slot.outputs[stream] = fd
            self._nursery.start_soon(self._pump, fd, stream, pid, slot, done)

    async def _pump(
        self, fd: int, stream: Stream, pid: int, slot: WorkerSlot, done: trio.Event
    ) -> None:
        try:
            await pump_output(fd, stream, pid=pid, generation=self.number, worker=slot.index)
        finally:
            if slot.outputs.get(stream) == fd:
                del slot.outputs[stream]
            done.set()

    async def flush_output(self) -> None:
        """Once the trees are gone: give the pumps ``OUTPUT_FLUSH`` seconds to reach EOF."""
        with trio.move_on_after(OUTPUT_FLUSH):
            for done in list(self._pumps_done):
                await done.wait()

    def owns_group(self, pgid: int) -> bool:
        """Whether ``pgid`` is the process group of one of this generation's workers."""
        return any(proc.pid == pgid for proc in self.spawned)

    def _track(self, proc: ProcessHandle) -> None:
        self.spawned = [p for p in self.spawned if p.returncode is None or p.group_roots()]
        self.spawned.append(proc)

    def probe(self, slot: WorkerSlot, remembered: frozenset[int] = frozenset()) -> TreeCheck:
        """One look at ``slot``'s worker tree (the generation's probe, its listeners)."""
        if slot.process is None:
            return TreeCheck("not-accepting", "no worker process")
        if not self.spec.listener_keys:
            return TreeCheck("unobservable", "the generation has no listeners to watch")
        return self.spec.probe(slot.process.group_roots(), self.spec.listener_keys, remembered)

    def pids(self) -> list[int]:
        return [
            s.process.pid
            for s in self.slots
            if s.process is not None and s.process.returncode is None
        ]

    def enable(self, count: int) -> None:
        """Let the first ``count`` slots start their workers (a rolling upgrade's next batch)."""
        self.enabled = count
        self._enabled.set()
        self._enabled = trio.Event()

    def batch_ready(self) -> bool:
        """Whether every enabled slot has been ready (the whole generation, outside rolling)."""
        return all(s.ever_ready for s in self.slots[: self.enabled])

    async def wait_changed(self) -> None:
        """Until a slot becomes ready or the generation fails."""
        await self._changed.wait()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def retire(self, slot: WorkerSlot) -> None:
        """Stop ``slot``'s worker tree like a drain (stop signal, drain_timeout, SIGKILL) and
        keep the slot empty until ``recall()``: a rolling upgrade replaced it."""
        slot.retired = True
        proc = slot.process
        if proc is None or proc.returncode is not None:
            return
        slot.state = "draining"
        proc.signal_group(self.spec.program.stop_signum)
        with trio.move_on_after(self.spec.program.drain_timeout) as timer:
            await slot.exited.wait()
            await proc.wait_group_exited()
        if timer.cancelled_caught:
            log.warning("worker.drain_timed_out", pid=proc.pid, hint="killed with SIGKILL")
            proc.signal_group(signal.SIGKILL)
            with trio.move_on_after(REAP_TIMEOUT_S):
                await slot.exited.wait()
                await proc.wait_group_exited()

    def recall(self) -> None:
        """Undo ``retire`` for every slot: a rolling upgrade failed, the old workers return."""
        for slot in self.slots:
            slot.retired = False
        self._recalled.set()
        self._recalled = trio.Event()

    def _mark_ready(self, slot: WorkerSlot) -> None:
        if self.draining:
            return
        slot.state = "ready"
        slot.ever_ready = True
        if all(s.ever_ready for s in self.slots):
            self.ready.set()
        if self.batch_ready():
            self._settled.set()
        self._pulse()

    def abort(self, reason: str) -> None:
        """Give up on a generation that is not ready yet; it is drained and start() fails."""
        if not self.ready.is_set():
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self._settled.set()
        self._pulse()


async def run_generation(
    spec: GenerationSpec,
    parked: ParkedFds,
    *,
    on_created: Callable[[Generation], None] | None = None,
    task_status: trio.TaskStatus[Generation] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start, supervise and finally drain one generation (see the module docstring).

    ``on_created`` gets the generation before it is ready, so that a stopping supervisor can
    ``abort`` it (drained gracefully, like any failed start) instead of cancelling it (SIGKILL).

    Raises:
        SpawnError: before readiness, with the reason the generation could not become ready.
    """
    gen = Generation(spec, parked)
    if on_created is not None:
        on_created(gen)
    failure: str | None = None
    # A task root: trio gave this task a copy of the starting upgrade's logging context, whose
    # bindings would label this generation's lines for its whole life. Start clean.
    clear_contextvars()
    with bound_contextvars(generation=spec.number):
        try:
            async with trio.open_nursery() as nursery:
                gen._nursery = nursery
                for slot in gen.slots:
                    nursery.start_soon(_run_slot, gen, slot)
                with trio.move_on_after(spec.program.ready_timeout) as timer:
                    await gen._settled.wait()
                if timer.cancelled_caught:
                    gen._fail(_not_ready_reason(gen))
                if gen.failure is not None:
                    # Workers that did start may already have accepted connections from the
                    # shared queue: stop them as gracefully as a drain, never with SIGKILL first.
                    failure = gen.failure
                    gen.request_drain()
                    await _drain(gen)
                    await gen.flush_output()
                    nursery.cancel_scope.cancel()
                else:
                    log.info("generation.ready", pids=gen.pids())
                    task_status.started(gen)
                    await gen._drain_requested.wait()
                    await _drain(gen)
                    await gen.flush_output()
                    nursery.cancel_scope.cancel()
        finally:
            gen.stopped.set()
    if failure is not None:
        raise SpawnError(failure)
    log.info("generation.stopped")


async def run_adopted_generation(
    spec: GenerationSpec,
    parked: ParkedFds,
    workers: Sequence[AdoptedWorker],
    *,
    draining: bool = False,
    drain_remaining: float | None = None,
    task_status: trio.TaskStatus[Generation] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Supervise a generation handed over by the previous supervisor, then drain it.

    It was ready there, so ``started(gen)`` comes at once; the handed-over workers are watched
    through their pidfds (never waited on: they are not our children) and, if one crashes, its
    replacement is spawned as our child with the usual backoff. A generation that was
    ``draining`` keeps draining: its stop signal was sent already, and what was left of its
    drain_timeout (``drain_remaining``) still applies before SIGKILL. Takes ownership of every
    pidfd and socket in ``workers``.
    """
    gen = Generation(spec, parked)
    by_index = {w.index: w for w in workers}
    adopted: list[WorkerSlot] = []
    by_slot_outputs: dict[int, dict[Stream, int]] = {}
    for slot in gen.slots:
        w = by_index.pop(slot.index, None)
        if w is None:
            continue
        slot.state, slot.status, slot.restarts = w.state, w.status, w.restarts
        slot.last_exit, slot.ever_ready = w.last_exit, w.ever_ready
        if w.process is not None and w.notify is not None:
            slot.process, slot.notify, slot.channel = w.process, w.notify, w.channel
            by_slot_outputs[slot.index], w.outputs = w.outputs, {}
            adopted.append(slot)
        else:
            w.close()
            if w.notify is not None:
                _close_receiver(w.notify, unlink=True)
    for w in by_index.values():  # slots the program no longer has: nothing to supervise
        w.close()
    gen.ready.set()
    gen._settled.set()
    with bound_contextvars(generation=spec.number):
        try:
            async with trio.open_nursery() as nursery:
                gen._nursery = nursery
                for slot in adopted:
                    outputs = by_slot_outputs.pop(slot.index, {})
                    if slot.process is not None:
                        gen.start_output(outputs, slot.process.pid, slot)
                for slot in gen.slots:
                    if slot in adopted or not draining:
                        nursery.start_soon(_run_slot, gen, slot, slot in adopted)
                    else:
                        slot.state = "exited"
                if draining:
                    gen.request_drain()
                log.info("generation.adopted", pids=gen.pids(), draining=draining)
                task_status.started(gen)
                await gen._drain_requested.wait()
                # A generation handed over mid-drain was signalled only if its deadline was set;
                # None means the old supervisor had not sent the stop signal yet.
                signalled = draining and drain_remaining is not None
                await _drain(
                    gen, signalled=signalled, drain_timeout=drain_remaining if signalled else None
                )
                await gen.flush_output()
                nursery.cancel_scope.cancel()
        finally:
            gen.stopped.set()
    log.info("generation.stopped")


def _not_ready_reason(gen: Generation) -> str:
    waiting = [
        f"worker {s.index} (pid {s.process.pid if s.process else '-'}: {s.state})"
        for s in gen.slots
        if not s.ever_ready
    ]
    mode = gen.spec.program.ready_mode
    hint = ""
    if mode == "notify":
        hint = '; the worker must send READY=1 to $NOTIFY_SOCKET (sd_notify), or set ready = "auto"'
    elif mode in ("auto", "accepting"):
        seen = [f"worker {s.index}: {_pending_reason(s)}" for s in gen.slots if not s.ever_ready]
        hint = f" ({'; '.join(seen)})"
    return (
        f"generation {gen.number} was not ready within program.ready_timeout = "
        f"{gen.spec.program.ready_timeout:g}s: {', '.join(waiting)} never became ready{hint}"
    )


def _pending_reason(slot: WorkerSlot) -> str:
    if slot.fallback is not None or (slot.accepting and slot.notified):
        why = "accepting, " if slot.accepting else ""
        return f"{why}waiting for READY=1 (it speaks sd_notify){_fallback_note(slot)}"
    return slot.observed or "not observed yet"


def _fallback_note(slot: WorkerSlot) -> str:
    return f"; readiness falls back to READY=1: {slot.fallback}" if slot.fallback else ""


async def _drain(
    gen: Generation, *, signalled: bool = False, drain_timeout: float | None = None
) -> None:
    """Stop signal to every group (unless ``signalled`` already), wait up to ``drain_timeout``
    for every process of the generation's trees, SIGKILL every group that is left.

    The caller then cancels the workers' tasks, which reaps the leaders.
    """
    program = gen.spec.program
    signum = program.stop_signum
    timeout = program.drain_timeout if drain_timeout is None else max(drain_timeout, 0.0)
    live = [s for s in gen.slots if s.process is not None and s.process.returncode is None]
    for slot in gen.slots:
        slot.state = "draining" if slot in live else "exited"
    if not signalled:
        for proc in gen.spawned:
            proc.signal_group(signum)
    gen.drain_deadline = trio.current_time() + timeout
    log.info(
        "generation.draining",
        signal=signum.name,
        pids=[s.process.pid for s in live if s.process],
        signalled_before=signalled,
    )
    with trio.move_on_after(timeout) as timer:
        await _wait_trees(gen, live)
    if timer.cancelled_caught:
        stuck = sorted({pid for proc in gen.spawned for pid in proc.group_roots()})
        for proc in gen.spawned:
            proc.signal_group(signal.SIGKILL)
        if stuck:  # a deadline that found nobody left kills nobody: no SIGKILL line
            log.warning(
                "generation.drain_timed_out",
                drain_timeout=program.drain_timeout,
                waited_s=round(timeout, 3),
                killed=stuck,
                hint="workers ignored the stop signal; they were killed with SIGKILL",
            )
        with trio.CancelScope(shield=True), trio.move_on_after(REAP_TIMEOUT_S):
            await _wait_trees(gen, live)


async def _wait_trees(gen: Generation, live: Sequence[WorkerSlot]) -> None:
    """Until every leader in ``live`` is reaped and no group of ``gen`` has a member left."""
    for slot in live:
        await slot.exited.wait()
    for proc in list(gen.spawned):
        await proc.wait_group_exited()


async def _run_slot(gen: Generation, slot: WorkerSlot, adopted: bool = False) -> None:
    """Keep a worker in ``slot``; ``adopted``: first watch the one handed over, already in it."""
    spec = gen.spec
    backoff = spec.backoff_initial
    with bound_contextvars(worker=slot.index):
        while adopted or not gen.is_draining():
            started_at = trio.current_time()
            if adopted:
                adopted = False
                code = await _watch_adopted_worker(gen, slot)
            else:
                await gen._wait_taken_back()  # a handed-over generation starts no worker
                await _wait_enabled(gen, slot)
                if gen.is_draining():
                    break
                code = await _run_one_worker(gen, slot)
            slot.last_exit = describe_exit(code) if code is not None else slot.last_exit
            # Its STATUS= text ("serving") described the process that is gone.
            slot.status = None
            if gen.is_draining():
                break
            if slot.retired:
                continue  # replaced by a rolling upgrade; _wait_enabled holds it until recalled
            if not gen.ready.is_set():
                gen._fail(f"worker {slot.index} {slot.last_exit} before it was ready")
                break
            if gen.holding:
                gen.lose_hold(
                    f"worker {slot.index} of generation {gen.number} {slot.last_exit} during "
                    f"the hold ({gen.hold_elapsed()})"
                )
                break
            slot.state = "backoff"
            slot.restarts += 1
            if spec.counters is not None:
                spec.counters.worker_restarted()
            if trio.current_time() - started_at > spec.backoff_max:
                backoff = spec.backoff_initial
            log.warning(
                "worker.crashed",
                reason=slot.last_exit,
                restart_in_s=backoff,
                restarts=slot.restarts,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, spec.backoff_max)
        slot.state = "exited"


async def _wait_enabled(gen: Generation, slot: WorkerSlot) -> None:
    """A slot of a rolling upgrade waits for its batch; a retired one for a recall."""
    while (slot.index >= gen.enabled or slot.retired) and not gen.is_draining():
        slot.state = "exited" if slot.retired else "starting"
        waits = [gen._enabled.wait, gen._recalled.wait, gen._drain_requested.wait]
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def _run_one_worker(gen: Generation, slot: WorkerSlot) -> int | None:
    """Spawn one process into ``slot`` and return its exit code (None if it never started)."""
    spec = gen.spec
    # A str, not a Path: pathlib interns every path component, and these names are unique per
    # spawn, so a Path here would grow the interpreter's interned-string table for ever.
    path = f"{spec.notify_dir}/{spec.number}.{slot.index}.{next(_spawn_sequence)}"
    slot.exited = trio.Event()
    identity = spec.program.identity
    # Not root: nothing to chown; the spawn refuses program.user with the reason.
    other_uid = (
        identity.uid
        if identity is not None and identity.uid != os.geteuid() and os.geteuid() == 0
        else None
    )
    try:
        if other_uid is not None:
            spec.open_notify_dir()
        receiver = NotifyReceiver.bind(path)
    except OSError as exc:
        # The runtime dir vanished or we are out of fds: a failed start (retried with backoff),
        # never an exception that would end the whole supervisor.
        slot.last_exit = (
            f"could not be started: cannot bind its notify socket {path}: {exc.strerror}"
        )
        slot.exited.set()
        return None
    pipes: tuple[OutputPipe, ...] = ()
    try:
        if other_uid is not None:
            # Only the worker's uid (and root) may send to it: the notify dir is traversable
            # by all once a worker runs as another user, and the path is new for each spawn.
            os.chmod(path, 0o600, follow_symlinks=False)
            os.chown(path, other_uid, -1, follow_symlinks=False)
        if spec.program.output == "log":
            pipes = open_output_pipes()
        proc, channel = _spawn(spec, gen.parked, slot, path, pipes)
    except (SpawnError, OSError) as exc:
        _close_receiver(receiver, unlink=True)
        for pipe in pipes:
            pipe.close()
        why = str(exc) if isinstance(exc, SpawnError) else f"{path}: {exc.strerror}"
        slot.last_exit = f"could not be started: {why}"
        slot.exited.set()
        return None
    except BaseException:
        _close_receiver(receiver, unlink=True)
        for pipe in pipes:
            pipe.close()
        raise
    for pipe in pipes:
        pipe.close_write()
    gen.start_output(take_read_ends(pipes), proc.pid, slot)
    slot.process = proc
    slot.state = "starting"
    slot.notified = slot.ready_sent = slot.accepting = slot.epoll_ready = False
    slot.fallback = slot.observed = None
    log.info("worker.started", pid=proc.pid)
    return await _supervise_worker(gen, slot, proc, receiver, channel, deliver=True)


async def _watch_adopted_worker(gen: Generation, slot: WorkerSlot) -> int | None:
    """Supervise the handed-over worker already in ``slot`` until it exits (status unknown)."""
    proc, receiver = slot.process, slot.notify
    assert proc is not None
    assert receiver is not None
    # slot.exited is the slot's first Event, never replaced here: a drain that started before
    # this task ran already waits on it.
    return await _supervise_worker(gen, slot, proc, receiver, slot.channel, deliver=False)


async def _supervise_worker(
    gen: Generation,
    slot: WorkerSlot,
    proc: ProcessHandle,
    receiver: NotifyReceiver,
    channel: socket.socket | None,
    *,
    deliver: bool,
) -> int | None:
    """Pump the worker's notify socket until it exits; owns ``receiver`` and ``channel``.

    Returns the exit code, or None for a worker that is not our child (its status is unknown).
    """
    slot.notify, slot.channel = receiver, channel
    gen._track(proc)
    gen.spec.on_spawned()
    program = gen.spec.program
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump_notify, gen, slot, proc, receiver)
                if channel is not None and deliver:
                    nursery.start_soon(_put_fds, gen.spec, gen.parked, channel)
                delay = program.ready_delay
                if delay is not None and slot.state == "starting":
                    nursery.start_soon(_ready_after, gen, slot, delay)
                if program.observed and slot.state == "starting":
                    nursery.start_soon(_observe_worker, gen, slot)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # Handed over: the successor supervises this worker now; it must live on.
                if proc.returncode is None and not gen.handed_over:
                    proc.signal_group(signal.SIGKILL)
                    await kill_and_reap(proc)
                elif not gen.handed_over and not gen.is_draining():
                    # It died on its own: what it left in its group goes with it (a drain
                    # signals and waits for them itself).
                    proc.signal_group(program.stop_signum)
                slot.exited.set()
            if proc.returncode is not None:
                log.info("worker.exited", pid=proc.pid, reason=_exit_reason(proc))
                if gen.spec.counters is not None:
                    gen.spec.counters.worker_exited(proc)
            elif gen.handed_over:
                proc.close()
        if not proc.is_child:
            slot.last_exit = _exit_reason(proc)
            return None
        return code
    finally:
        slot.notify = slot.channel = None
        # Handed over: the worker's NOTIFY_SOCKET path now belongs to the successor's socket.
        _close_receiver(receiver, unlink=not gen.handed_over)
        if channel is not None:
            channel.close()


def _exit_reason(proc: ProcessHandle) -> str:
    if proc.is_child and proc.returncode is not None:
        return describe_exit(proc.returncode)
    return "exited (status unknown: adopted from the previous supervisor, not our child)"


def _close_receiver(receiver: NotifyReceiver, *, unlink: bool) -> None:
    if unlink:
        receiver.close()
    else:
        trio.lowlevel.notify_closing(receiver.sock)
        receiver.sock.close()


def worker_settings(program: ProgramConfig) -> WorkerSettings:
    """``[program]``'s user, umask and limits as the spawner takes them."""
    identity = program.identity
    return WorkerSettings(
        uid=identity.uid if identity is not None else None,
        gid=identity.gid if identity is not None else None,
        user_name=identity.name if identity is not None else None,
        setpriv=identity.setpriv if identity is not None else "setpriv",
        identity_setting=identity.setting if identity is not None else "program.user",
        umask=program.umask_bits,
        nofile=program.nofile,
        core=program.core_bytes,
        memory=program.memory_bytes,
    )


def worker_environ(spec: GenerationSpec) -> dict[str, str]:
    """Ours, then the user's USER/LOGNAME/HOME (as login does), ``env_file``, ``[program.env]``.

    Raises:
        SpawnError: ``env_file`` cannot be read (a handed-over generation reads it at its
            first spawn).
    """
    env = dict(spec.environ)
    identity = spec.program.identity
    if identity is not None and identity.name is not None:
        env.update(USER=identity.name, LOGNAME=identity.name)
        if identity.home is not None:
            env["HOME"] = identity.home
    try:
        env.update(spec.program.worker_env())
    except ConfigError as exc:
        raise SpawnError(str(exc)) from exc
    return env


def _spawn(
    spec: GenerationSpec,
    parked: ParkedFds,
    slot: WorkerSlot,
    notify_path: str,
    pipes: Sequence[OutputPipe] = (),
) -> tuple[ProcessHandle, socket.socket | None]:
    program = spec.program
    env = worker_environ(spec)
    settings = worker_settings(program)
    out = {pipe.stream: pipe.write_fd for pipe in pipes}
    env["NOTIFY_SOCKET"] = notify_path
    env["HANDOFF_GENERATION"] = str(spec.number)
    env["HANDOFF_WORKER"] = str(slot.index)
    fdset = spec.listeners + parked.items()

    def worker(fds: list[int], *, set_listen_pid: bool) -> SpawnRequest:
        return SpawnRequest(
            program.command,
            env,
            fds,
            set_listen_pid,
            cwd=program.working_dir,
            settings=settings,
            stdout=out.get("stdout"),
            stderr=out.get("stderr"),
        )

    # The listeners' status flags (O_NONBLOCK) live on the open file description every
    # generation shares: restoring them under a running worker that set O_NONBLOCK would turn
    # its next accept() into a blocking one and stall it. Only with no worker alive are they
    # put back as bound, so a setting does not outlive the workers that made it.
    if spec.live_workers() == 0:
        restore_flags(fd for _, fd in spec.listeners)
    revive_dead(fd for _, fd in spec.listeners)
    if program.fd_delivery == "listen_fds":
        env["LISTEN_FDS"] = str(len(fdset))
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in fdset)
        env["HANDOFF_LISTENERS"] = str(len(spec.listeners))
        env.update(spec.compat_environ)
        proc = spec.spawner.spawn(worker([fd for _, fd in fdset], set_listen_pid=True))
        return proc, None
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:
        raise SpawnError(f"cannot create the handoff channel: {exc.strerror}") from exc
    try:
        env["HANDOFF_FD"] = "3"
        proc = spec.spawner.spawn(worker([theirs.fileno()], set_listen_pid=False))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


async def _put_fds(spec: GenerationSpec, parked: ParkedFds, channel: socket.socket) -> None:
    from ._passing_trio import put

    sock = trio.socket.from_stdlib_socket(channel)
    fdset = spec.listeners + parked.items()
    # Send duplicates: put() may wait for room, and meanwhile an unpark could close a parked
    # fd (and its number be reused) under it.
    copies: list[int] = []
    try:
        for _, fd in fdset:
            copies.append(os.dup(fd))
        await put(
            sock,
            [(name, copy) for (name, _), copy in zip(fdset, copies, strict=True)],
            {"listeners": len(spec.listeners), "generation": spec.number},
        )
    except (ProtocolError, OSError) as exc:
        # The worker went away before taking its fds (its exit is reported by its pidfd wait),
        # or we are out of fds: its start fails, never the supervisor.
        log.warning("worker.fds_not_delivered", reason=str(exc))
    finally:
        close_fds(copies)


async def _ready_after(gen: Generation, slot: WorkerSlot, delay: float) -> None:
    await trio.sleep(delay)
    gen._mark_ready(slot)


def _update_ready(gen: Generation, slot: WorkerSlot) -> None:
    """Mark ``slot`` ready once its mode's condition holds (see the module notes)."""
    mode = gen.spec.program.ready_mode
    if mode == "notify":
        ready = slot.ready_sent
    elif mode == "accepting":
        ready = slot.accepting
    elif mode == "auto":
        if slot.fallback is not None:
            ready = slot.ready_sent
        else:
            ready = slot.accepting and (slot.ready_sent or not slot.notified)
    else:
        ready = False  # delay:N: its timer marks it ready
    if ready and slot.state == "starting":
        gen._mark_ready(slot)


async def _observe_worker(gen: Generation, slot: WorkerSlot) -> None:
    """Probe the worker's tree until it is accepting, then watch it during the hold."""
    if not await _wait_accepting(gen, slot):
        return
    await gen._hold_begun.wait()
    remembered: frozenset[int] = frozenset()
    while gen.is_holding() and not gen.is_draining():
        await trio.sleep(POLL_INTERVAL)
        if not gen.is_holding():
            return
        check = gen.probe(slot, remembered)
        remembered = check.waiters
        what = f"worker {slot.index} of generation {gen.number}"
        if check.verdict == "unobservable":
            continue
        # Only holding no listener fails the hold: a busy event loop shows no armed epoll entry
        # (trio and others register with EPOLLONESHOT and re-arm after each accept), and a busy
        # sync worker is not in accept; neither has stopped serving.
        if not check.holders:
            gen.lose_hold(
                f"{what} no longer holds any listener during the hold ({gen.hold_elapsed()})"
            )


async def _wait_accepting(gen: Generation, slot: WorkerSlot) -> bool:
    """Poll until the tree is accepting (True) or cannot be observed (False, noted)."""
    remembered: frozenset[int] = frozenset()
    since: tuple[Verdict, float, frozenset[int]] | None = None
    while True:
        check = gen.probe(slot, remembered)
        remembered = check.waiters
        now = trio.current_time()
        if since is None or since[0] != check.verdict or since[2] != check.holders:
            since = (check.verdict, now, check.holders)
        stable = now - since[1] >= STABLE_FOR
        slot.observed = check.reason
        if check.verdict == "accepting" and stable:
            slot.accepting, slot.epoll_ready = True, check.epoll
            _update_ready(gen, slot)
            return True
        if check.verdict == "unobservable" and stable:
            if gen.spec.program.ready_mode == "auto":
                _fall_back(gen, slot, check.reason)
            return False
        await trio.sleep(POLL_INTERVAL)


def _fall_back(gen: Generation, slot: WorkerSlot, reason: str) -> None:
    slot.fallback = reason
    if gen.fallback is None:
        gen.fallback = reason
        log.warning(
            "readiness.fallback",
            reason=reason,
            ready="READY=1",
            hint="the workers' readiness cannot be seen in /proc (see reason); READY=1 from "
            'the worker decides alone, as with ready = "notify"',
        )
    _update_ready(gen, slot)


async def _pump_notify(
    gen: Generation, slot: WorkerSlot, proc: ProcessHandle, receiver: NotifyReceiver
) -> None:
    while True:
        await gen._wait_thawed()
        # freeze() cancels this scope and waits for the pump to leave it: a datagram already
        # received is applied first, none is received after (see Generation.freeze).
        with trio.CancelScope() as scope:
            gen._pumps.add(scope)
            try:
                while True:
                    message = await receiver.receive(proc.attribute)
                    if message.accepted:
                        _apply_notify(gen, slot, message)
                    else:
                        _reject_notify(slot, proc, message)
            finally:
                gen._pumps.discard(scope)
                if not gen._pumps:
                    gen._pumps_idle.set()


def _reject_notify(slot: WorkerSlot, proc: ProcessHandle, message: NotifyMessage) -> None:
    """Never act on a datagram from outside the worker's tree: count it, log it (rate-limited)."""
    close_fds(message.fds)
    slot.notify_rejected += 1
    now = trio.current_time()
    last = slot.rejected_logged_at
    if last is not None and now - last < _REJECTED_LOG_INTERVAL:
        slot.rejected_unlogged += 1
        return
    sender = message.sender
    log.warning(
        "notify.rejected",
        pid=proc.pid,
        sender_pid=sender.pid if sender is not None else None,
        sender_uid=sender.uid if sender is not None else None,
        # The keys only, few and short: the sender chose them, and values may be secrets.
        keys=sorted(key[:32] for key in message.fields)[:8],
        fds_closed=len(message.fds),
        reason=message.attribution.reason if message.attribution else "no judgement",
        rejected=slot.notify_rejected,
        held_back=slot.rejected_unlogged,
        hint="only the worker's own process tree may notify for it (see NotifyAccess); "
        "another process of its uid wrote to its NOTIFY_SOCKET",
    )
    slot.rejected_logged_at = now
    slot.rejected_unlogged = 0


def _apply_notify(gen: Generation, slot: WorkerSlot, message: NotifyMessage) -> None:
    kept = False
    slot.notified = True
    if message.ready:
        slot.ready_sent = True
        _update_ready(gen, slot)
    if message.status is not None:
        # Bounded: it is shown by `status` and travels in a self-upgrade's state message.
        slot.status = message.status[:_STATUS_MAX]
    if message.stopping and slot.state != "draining":
        log.info("worker.stopping", pid=slot.process.pid if slot.process else None)
    if message.fdstore_remove:
        gen.parked.unpark(message.fdname)
    if message.fdstore and message.fds:
        kept = gen.parked.park_all(message.fdname, message.fds)
    if message.fds and not kept:
        close_fds(message.fds)


def notify_dir_ok(path: Path) -> str | None:
    """A reason the notify directory cannot hold worker sockets, or None when it can."""
    longest = len(os.fsencode(str(path / "999999.9999.9999999")))
    if longest > 107:
        return (
            f"{path} is too long for Unix socket paths (unix(7) allows 107 bytes); set "
            "supervisor.runtime_dir to a shorter directory"
        )
    return None
