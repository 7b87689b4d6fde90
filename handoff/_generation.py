"""One generation: ``processes`` workers of the same command, started, watched and drained together.

Design notes:
- ``run_generation`` is started with ``nursery.start``: it calls ``task_status.started(gen)`` only
  once every worker said ``READY=1`` (or survived ``delay:N``). Before that, any worker exit, a
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
- Readiness is attributed by socket: every worker has its own ``NOTIFY_SOCKET`` path, and a new
  one for each restart, so a late datagram from a dead worker can never mark its successor ready.
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
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, final

import structlog
import trio
from structlog.contextvars import bound_contextvars, clear_contextvars

from ._errors import ProtocolError, SpawnError
from ._notify import NotifyMessage, NotifyReceiver, close_fds
from ._processes import kill_and_reap
from ._spawn import DEFAULT_SPAWNER, describe_exit

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from ._config import ProgramConfig
    from ._processes import ProcessHandle, Spawner

log: structlog.stdlib.BoundLogger = structlog.get_logger()

WorkerState = Literal["starting", "ready", "draining", "backoff", "exited"]

_spawn_sequence = itertools.count(1)
# The longest STATUS= text kept per worker (one line for `handoffd status`).
_STATUS_MAX: Final = 1024
# The most fds workers may park at once (systemd's FileDescriptorStoreMax= plays the same role).
PARKED_MAX: Final = 4096
# sd_pid_notify_with_fds(3): FDNAME= is at most 255 printable characters, and ':' would break
# LISTEN_FDNAMES for every worker that receives the fd.
_FDNAME_RE: Final = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,255}$")


@final
class ParkedFds:
    """Fds that workers parked (``FDSTORE=1`` + ``FDNAME=``) for the next generation.

    Owned by the supervisor and kept across upgrades until a worker unparks them
    (``FDSTOREREMOVE=1``). Every worker started later receives them after the listeners.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, int]] = []

    def park(self, name: str, fd: int) -> None:
        self._items.append((name, fd))
        log.info("fd.parked", fdname=name, fd=fd, parked=len(self._items))

    def park_all(self, name: str, fds: Sequence[int]) -> bool:
        """Park ``fds`` under ``name`` if the name is valid and there is room; else refuse.

        Names travel in LISTEN_FDNAMES (':'-separated) to every later worker, and the store is
        bounded as systemd bounds its own (FileDescriptorStoreMax=): a worker that parks on
        every crash-looping start must not exhaust the supervisor's fds. Returns whether the
        fds were kept (the caller closes them otherwise).
        """
        if not _FDNAME_RE.match(name):
            log.warning(
                "fd.park_refused",
                fdname=name[:64],
                reason="FDNAME must be 1-255 printable characters without ':'",
            )
            return False
        if len(self._items) + len(fds) > PARKED_MAX:
            log.warning(
                "fd.park_refused",
                fdname=name,
                reason=f"more than {PARKED_MAX} parked fds; "
                "unpark (FDSTOREREMOVE=1) what the next generation no longer needs",
            )
            return False
        for fd in fds:
            self.park(name, fd)
        return True

    def unpark(self, name: str) -> None:
        gone = [fd for n, fd in self._items if n == name]
        self._items = [(n, fd) for n, fd in self._items if n != name]
        close_fds(gone)
        log.info("fd.unparked", fdname=name, closed=len(gone))

    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple(self._items)

    def restore(self, items: Sequence[tuple[str, int]]) -> None:
        """Take over fds parked under a previous supervisor (a self-upgrade); we own them now."""
        self._items.extend(items)

    def close_all(self) -> None:
        close_fds([fd for _, fd in self._items])
        self._items = []


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
    exited: trio.Event = field(default_factory=trio.Event)
    # The supervisor's ends of the running worker's sockets (a self-upgrade hands them over).
    notify: NotifyReceiver | None = field(default=None, repr=False)
    channel: socket.socket | None = field(default=None, repr=False)


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

    def close(self) -> None:
        """Let go of what we were handed without touching the worker (adoption was abandoned)."""
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

    def pids(self) -> list[int]:
        return [
            s.process.pid
            for s in self.slots
            if s.process is not None and s.process.returncode is None
        ]

    def _mark_ready(self, slot: WorkerSlot) -> None:
        if self.draining:
            return
        slot.state = "ready"
        slot.ever_ready = True
        if all(s.ever_ready for s in self.slots):
            self.ready.set()
            self._settled.set()

    def abort(self, reason: str) -> None:
        """Give up on a generation that is not ready yet; it is drained and start() fails."""
        if not self.ready.is_set():
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self._settled.set()


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
                    nursery.cancel_scope.cancel()
                else:
                    log.info("generation.ready", pids=gen.pids())
                    task_status.started(gen)
                    await gen._drain_requested.wait()
                    await _drain(gen)
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
    for slot in gen.slots:
        w = by_index.pop(slot.index, None)
        if w is None:
            continue
        slot.state, slot.status, slot.restarts = w.state, w.status, w.restarts
        slot.last_exit, slot.ever_ready = w.last_exit, w.ever_ready
        if w.process is not None and w.notify is not None:
            slot.process, slot.notify, slot.channel = w.process, w.notify, w.channel
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
    mode = gen.spec.program.ready
    hint = (
        '; the worker must send READY=1 to $NOTIFY_SOCKET (sd_notify), or set ready = "delay:N"'
        if mode == "notify"
        else ""
    )
    return (
        f"generation {gen.number} was not ready within program.ready_timeout = "
        f"{gen.spec.program.ready_timeout:g}s: {', '.join(waiting)} never became ready{hint}"
    )


async def _drain(
    gen: Generation, *, signalled: bool = False, drain_timeout: float | None = None
) -> None:
    """Stop signal (unless ``signalled`` already), wait up to ``drain_timeout``, return.

    The caller then cancels the workers' tasks, which SIGKILLs whatever is left.
    """
    program = gen.spec.program
    signum = program.stop_signum
    timeout = program.drain_timeout if drain_timeout is None else max(drain_timeout, 0.0)
    live = [s for s in gen.slots if s.process is not None and s.process.returncode is None]
    for slot in gen.slots:
        slot.state = "draining" if slot in live else "exited"
    if not signalled:
        for slot in live:
            assert slot.process is not None
            slot.process.send_signal(signum)
    gen.drain_deadline = trio.current_time() + timeout
    log.info(
        "generation.draining",
        signal=signum.name,
        pids=[s.process.pid for s in live if s.process],
        signalled_before=signalled,
    )
    with trio.move_on_after(timeout) as timer:
        for slot in live:
            await slot.exited.wait()
    stuck = [s.process.pid for s in live if s.process is not None and s.process.returncode is None]
    if timer.cancelled_caught and stuck:
        log.warning(
            "generation.drain_timed_out",
            drain_timeout=program.drain_timeout,
            waited_s=round(timeout, 3),
            killed=stuck,
            hint="workers ignored the stop signal; they were killed with SIGKILL",
        )


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
                if gen.is_draining():
                    break
                code = await _run_one_worker(gen, slot)
            slot.last_exit = describe_exit(code) if code is not None else slot.last_exit
            if gen.is_draining():
                break
            if not gen.ready.is_set():
                gen._fail(f"worker {slot.index} {slot.last_exit} before it was ready")
                break
            slot.state = "backoff"
            slot.restarts += 1
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


async def _run_one_worker(gen: Generation, slot: WorkerSlot) -> int | None:
    """Spawn one process into ``slot`` and return its exit code (None if it never started)."""
    spec = gen.spec
    # A str, not a Path: pathlib interns every path component, and these names are unique per
    # spawn, so a Path here would grow the interpreter's interned-string table for ever.
    path = f"{spec.notify_dir}/{spec.number}.{slot.index}.{next(_spawn_sequence)}"
    slot.exited = trio.Event()
    try:
        receiver = NotifyReceiver.bind(path)
    except OSError as exc:
        # The runtime dir vanished or we are out of fds: a failed start (retried with backoff),
        # never an exception that would end the whole supervisor.
        slot.last_exit = (
            f"could not be started: cannot bind its notify socket {path}: {exc.strerror}"
        )
        slot.exited.set()
        return None
    try:
        proc, channel = _spawn(spec, gen.parked, slot, path)
    except SpawnError as exc:
        _close_receiver(receiver, unlink=True)
        slot.last_exit = f"could not be started: {exc}"
        slot.exited.set()
        return None
    except BaseException:
        _close_receiver(receiver, unlink=True)
        raise
    slot.process = proc
    slot.state = "starting"
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
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump_notify, gen, slot, receiver)
                if channel is not None and deliver:
                    nursery.start_soon(_put_fds, gen.spec, gen.parked, channel)
                delay = gen.spec.program.ready_delay
                if delay is not None and slot.state == "starting":
                    nursery.start_soon(_ready_after, gen, slot, delay)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # Handed over: the successor supervises this worker now; it must live on.
                if proc.returncode is None and not gen.handed_over:
                    await kill_and_reap(proc)
                slot.exited.set()
            if proc.returncode is not None:
                log.info("worker.exited", pid=proc.pid, reason=_exit_reason(proc))
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


def _spawn(
    spec: GenerationSpec, parked: ParkedFds, slot: WorkerSlot, notify_path: str
) -> tuple[ProcessHandle, socket.socket | None]:
    program = spec.program
    env = dict(spec.environ)
    env.update(program.env)
    env["NOTIFY_SOCKET"] = notify_path
    env["HANDOFF_GENERATION"] = str(spec.number)
    env["HANDOFF_WORKER"] = str(slot.index)
    fdset = spec.listeners + parked.items()
    if program.fd_delivery == "listen_fds":
        env["LISTEN_FDS"] = str(len(fdset))
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in fdset)
        env["HANDOFF_LISTENERS"] = str(len(spec.listeners))
        env.update(spec.compat_environ)
        proc = spec.spawner.spawn(
            program.command,
            environ=env,
            fds=[fd for _, fd in fdset],
            set_listen_pid=True,
            cwd=program.cwd,
        )
        return proc, None
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:
        raise SpawnError(f"cannot create the handoff channel: {exc.strerror}") from exc
    try:
        env["HANDOFF_FD"] = "3"
        proc = spec.spawner.spawn(
            program.command,
            environ=env,
            fds=[theirs.fileno()],
            set_listen_pid=False,
            cwd=program.cwd,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


async def _put_fds(spec: GenerationSpec, parked: ParkedFds, channel: socket.socket) -> None:
    from ._passing import put

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


async def _pump_notify(gen: Generation, slot: WorkerSlot, receiver: NotifyReceiver) -> None:
    while True:
        await gen._wait_thawed()
        # freeze() cancels this scope and waits for the pump to leave it: a datagram already
        # received is applied first, none is received after (see Generation.freeze).
        with trio.CancelScope() as scope:
            gen._pumps.add(scope)
            try:
                while True:
                    message = await receiver.receive()
                    _apply_notify(gen, slot, message)
            finally:
                gen._pumps.discard(scope)
                if not gen._pumps:
                    gen._pumps_idle.set()


def _apply_notify(gen: Generation, slot: WorkerSlot, message: NotifyMessage) -> None:
    kept = False
    if message.ready and gen.spec.program.ready_delay is None:
        gen._mark_ready(slot)
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
