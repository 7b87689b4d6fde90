"""The supervisor: holds the listeners, runs generations, and serialises upgrades.

The upgrade state machine (one upgrade at a time)::

    idle -> load config -> reconcile listeners -> spawn N+1 -> wait ready (ready_timeout)
         -> N+1 becomes current, N drains (stop_signal, drain_timeout, SIGKILL) -> idle
    any failure before N+1 is ready -> N+1 killed, new listeners closed, N keeps serving,
    the upgrade is reported failed with the reason.

Requests that arrive while an upgrade runs coalesce into one follow-up: every caller waiting
on it gets its outcome. SIGHUP and ``handoffd upgrade`` are the same request.

Self-upgrade (``handoffd upgrade --self``, SIGUSR2) is serialised with worker upgrades::

    idle -> load config -> freeze generations -> spawn the new handoffd -> Put state + fds
         -> wait "in_charge" (self_upgrade_timeout) -> commit -> reply ok -> exit 0, workers untouched
    any failure before the commit -> new one SIGKILLed, MAINPID taken back, its staged control
    socket removed, generations thawed, the upgrade is reported failed with the reason.

``_handover`` owns the protocol; ``run_supervisor`` is also the successor's start-up: with
``HANDOFF_SUPERVISOR_FD`` set it adopts what it is handed instead of starting generation 1.

Design notes:
- Signal handlers are installed before READY=1 is sent anywhere: a SIGHUP that arrived between
  READY and the handler would otherwise take its default action and kill the daemon.
- The upgrade boundary is the one place that catches ``Exception``: whatever goes wrong while
  starting N+1, N must keep serving and the caller must get an answer.
- State changes are sync methods; only waiting is async.
- A supervisor that handed over exits once every caller of the self-upgrade got its reply: the
  reply is written in the same scheduling step as ``upgrade()`` returns (trio's socket send only
  yields after its syscall when not cancelled), so cancelling the root after the last caller
  returned cannot cut it off. It never drains, signals or kills a worker after the commit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import socket
import sys
from contextlib import ExitStack, suppress
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import structlog
import trio
from structlog.contextvars import bound_contextvars

from . import _client
from ._config import (
    ListenerConfig,
    LoadedConfig,
    control_socket_path,
    load_config,
    resolve_runtime_dir,
)
from ._control import (
    ControlHandler,
    ListenerInfo,
    StatusInfo,
    UpgradeEvent,
    UpgradePhase,
    UpgradeReply,
    UpgradeRequest,
    WorkerInfo,
    bind_control_socket,
    serve_control,
)
from ._errors import ConfigError, HandoffError, ListenerError, SpawnError, UpgradeError
from ._generation import (
    Generation,
    GenerationSpec,
    ParkedFds,
    notify_dir_ok,
    run_adopted_generation,
    run_generation,
)
from ._launchd import LaunchdLibrary, launchd_sockets
from ._listen_fds import InheritedFd, parse_listen_fds
from ._listeners import Listener, adopt_inherited, bind_listener
from ._memory import release_after_startup, release_after_upgrade
from ._paths import HANDOVER_FD_ENV
from ._spawn import unreaped_children
from ._systemd import SystemdNotifier, clean_worker_environ, monotonic_usec

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from ._config import ProgramConfig
    from ._handover import Handover, Successor

log: structlog.stdlib.BoundLogger = structlog.get_logger()

# Extra time systemd should allow beyond our own timeouts (EXTEND_TIMEOUT_USEC=): reaping,
# closing sockets and the round trip of the notify message itself.
_SYSTEMD_SLACK_S: Final = 5.0
# How long a stopping supervisor waits for killed workers to be reaped (they cannot ignore SIGKILL).
_REAP_GRACE_S: Final = 5.0
# How long a supervisor that handed over waits for its callers to take their replies.
_REPLY_GRACE_S: Final = 5.0


@functools.cache
def _version() -> str:
    """The installed version, read once: it cannot change under a running process."""
    try:
        return metadata.version("handoffd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@final
class UpgradeTicket:
    """One pending upgrade and everyone waiting for its outcome."""

    def __init__(self, request: UpgradeRequest) -> None:
        self.request = request
        self.reply: UpgradeReply | None = None
        self._subscribers: list[trio.MemorySendChannel[UpgradeEvent]] = []
        self.callers = 0
        self.returned = trio.Event()  # set once every caller has its reply in hand

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

    def finish(self, reply: UpgradeReply) -> None:
        self.reply = reply
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()
        if self.callers == 0:
            self.returned.set()

    def caller_returned(self) -> None:
        self.callers -= 1
        if self.callers == 0 and self.reply is not None:
            self.returned.set()


@final
class Supervisor(ControlHandler):
    """The running daemon's state; see the module docstring for the state machine."""

    def __init__(self, loaded: LoadedConfig, environ: Mapping[str, str]) -> None:
        self.loaded = loaded
        self.environ = dict(environ)
        self.systemd = SystemdNotifier(environ)
        self.runtime_dir = resolve_runtime_dir(loaded.config.supervisor, environ)
        self.notify_dir = self.runtime_dir / "notify"
        self.listeners: dict[str, Listener] = {}
        self.parked = ParkedFds()
        self.current: Generation | None = None
        self.draining: list[Generation] = []
        self.next_generation = 1
        self.state = "starting"
        self.last_upgrade: UpgradeReply | None = None
        # Names of listeners that left the config, closed once no generation uses them.
        self.retired_listeners: set[str] = set()
        # Set once a successor is in charge: from then on we only exit.
        self.successor_pid: int | None = None
        self._pending: dict[bool, UpgradeTicket] = {}
        # The generation being started (1, or N+1 of an upgrade): a stop aborts it gracefully.
        self.starting: Generation | None = None
        # Set when the upgrade in progress (if any) has finished; a stop waits for it.
        self._upgrade_done: trio.Event | None = None
        self._upgrade_wanted = trio.Event()
        self._stop_requested = trio.Event()
        self._root: trio.Nursery | None = None
        self._control_path: Path | None = None
        self._control_inode: int | None = None

    # ---- sync state changes ----

    def stop(self) -> None:
        """Begin a graceful stop: drain every generation, then exit."""
        if self.successor_pid is not None:
            # Handed over: the stop is meant for the service, which is the successor now.
            log.info("supervisor.forwarded", signal="SIGTERM", successor_pid=self.successor_pid)
            with suppress(ProcessLookupError):
                os.kill(self.successor_pid, signal.SIGTERM)
            return
        if not self._stop_requested.is_set():
            log.info("supervisor.stopping")
        self._stop_requested.set()
        if self.starting is not None:
            self.starting.abort("handoffd is stopping")

    def stop_grace(self) -> float:
        """How long a stop waits for an upgrade in progress: its drain, or its handover."""
        program = self.loaded.config.program
        sup = self.loaded.config.supervisor
        return max(program.drain_timeout, sup.self_upgrade_timeout) + _SYSTEMD_SLACK_S

    def generations(self) -> list[Generation]:
        """The live generations: the current one first, then those still draining."""
        return ([self.current] if self.current else []) + self.draining

    def request_upgrade(self, request: UpgradeRequest) -> UpgradeTicket:
        """Queue an upgrade, joining the pending one of the same kind if there is one.

        A stopping supervisor answers at once that it is stopping; a self-upgrade naming another
        executable than the pending one is refused rather than silently merged into it.
        """
        ticket = self._pending.get(request.supervisor)
        refusal: str | None = None
        if self.successor_pid is not None:
            refusal = (
                f"this handoffd handed over to pid {self.successor_pid}; send the request again "
                "(it reaches the new supervisor on the same control socket)"
            )
        elif self._stop_requested.is_set():
            refusal = "handoffd is stopping"
        elif ticket is not None and ticket.request.exec_path != request.exec_path:
            refusal = (
                f"a self-upgrade with exec_path={ticket.request.exec_path!r} is already pending; "
                "send this one again once it is done"
            )
        if refusal is not None:
            refused = UpgradeTicket(request)
            refused.finish(self._failed(refused, refusal, 0.0, []))
            return refused
        if ticket is None:
            ticket = self._pending[request.supervisor] = UpgradeTicket(request)
            self._upgrade_wanted.set()
        else:
            log.info("upgrade.coalesced", supervisor=request.supervisor)
        return ticket

    def status_text(self) -> str:
        gen = self.current
        if gen is None:
            return "starting"
        ready = sum(1 for s in gen.slots if s.state == "ready")
        text = f"generation {gen.number}: {ready}/{len(gen.slots)} workers ready"
        if self.draining:
            text += f", draining {', '.join(str(g.number) for g in self.draining)}"
        if self.last_upgrade is not None:
            text += f"; last upgrade {self.last_upgrade.outcome}"
        return text

    def status(self) -> StatusInfo:
        gens = ([self.current] if self.current else []) + self.draining
        return StatusInfo(
            pid=os.getpid(),
            version=_version(),
            config=str(self.loaded.path),
            state=self.state,
            generation=self.current.number if self.current else 0,
            workers=[
                WorkerInfo(
                    generation=g.number,
                    index=s.index,
                    pid=s.process.pid
                    if s.process is not None and s.process.returncode is None
                    else None,
                    state=s.state,
                    status=s.status,
                    restarts=s.restarts,
                    last_exit=s.last_exit,
                )
                for g in gens
                for s in g.slots
            ],
            listeners=[
                ListenerInfo(name=li.name, address=li.bound_address(), fd=li.fd, origin=li.origin)
                for li in self.listeners.values()
            ],
            parked=[name for name, _ in self.parked.items()],
            draining_generations=[g.number for g in self.draining],
            last_upgrade=self.last_upgrade,
        )

    # ---- async ----

    async def upgrade(
        self, request: UpgradeRequest, on_event: Callable[[UpgradeEvent], Awaitable[None]]
    ) -> UpgradeReply:
        ticket = self.request_upgrade(request)
        ticket.callers += 1
        try:
            async with ticket.subscribe() as events:
                async for event in events:
                    await on_event(event)
        finally:
            ticket.caller_returned()
        assert ticket.reply is not None
        return ticket.reply

    def _spec(self, loaded: LoadedConfig, listeners: Mapping[str, Listener]) -> GenerationSpec:
        ordered = [listeners[lc.name] for lc in loaded.config.listener]
        names = [lc.name for lc in loaded.config.listener]  # a reused socket may be renamed
        return self._spec_for(
            self.next_generation, loaded, loaded.config.program, ordered, names=names
        )

    def _spec_for(
        self,
        number: int,
        loaded: LoadedConfig,
        program: ProgramConfig,
        ordered: Sequence[Listener],
        names: Sequence[str] | None = None,
    ) -> GenerationSpec:
        config = loaded.config
        compat: dict[str, str] = {}
        if ordered:
            compat["EINHORN_FDS"] = " ".join(str(3 + i) for i in range(len(ordered)))
            compat["SERVER_STARTER_PORT"] = ";".join(
                f"{_starter_address(li)}={3 + i}" for i, li in enumerate(ordered)
            )
        environ = clean_worker_environ(self.environ)
        if sys.prefix != sys.base_prefix:
            # Run from a virtualenv: let workers find its interpreter and scripts as if the
            # venv were activated, so `command = ["python", ...]` means this venv's python.
            bindir = str(Path(sys.executable).parent)
            path = environ.get("PATH", os.defpath)
            if bindir not in path.split(":"):
                environ["PATH"] = f"{bindir}:{path}"
        return GenerationSpec(
            number=number,
            program=program,
            listeners=tuple(
                zip(
                    names if names is not None else [li.name for li in ordered],
                    [li.fd for li in ordered],
                    strict=True,
                )
            ),
            environ=environ,
            notify_dir=self.notify_dir,
            backoff_initial=config.supervisor.restart_backoff_initial,
            backoff_max=config.supervisor.restart_backoff_max,
            compat_environ=compat,
        )

    async def _start_generation(
        self, loaded: LoadedConfig, listeners: Mapping[str, Listener]
    ) -> Generation:
        assert self._root is not None
        spec = self._spec(loaded, listeners)
        self.next_generation += 1
        self.systemd.send(
            f"EXTEND_TIMEOUT_USEC={int((spec.program.ready_timeout + _SYSTEMD_SLACK_S) * 1e6)}"
        )
        try:
            gen: Generation = await self._root.start(
                partial(run_generation, on_created=self._starting), spec, self.parked
            )
        finally:
            self.starting = None
        self._root.start_soon(self._forget_when_stopped, gen)
        return gen

    def _starting(self, gen: Generation) -> None:
        self.starting = gen
        if self._stop_requested.is_set():
            gen.abort("handoffd is stopping")

    async def _forget_when_stopped(self, gen: Generation) -> None:
        await gen.stopped.wait()
        if gen in self.draining:
            self.draining.remove(gen)
            log.info("generation.drained", generation=gen.number)
            self.systemd.status(self.status_text())

    async def _run_upgrades(self) -> None:
        while True:
            await self._upgrade_wanted.wait()
            self._upgrade_wanted = trio.Event()
            for kind in (False, True):
                ticket = self._pending.pop(kind, None)
                if ticket is None:
                    continue
                if self._stop_requested.is_set():
                    ticket.finish(self._failed(ticket, "handoffd is stopping", 0.0, []))
                    continue
                self._upgrade_done = trio.Event()
                try:
                    if kind:
                        reply = await self._upgrade_supervisor(ticket)
                    else:
                        reply = await self._upgrade_workers(ticket)
                finally:
                    self._upgrade_done.set()
                    if ticket.reply is None:
                        ticket.finish(self._failed(ticket, "handoffd is stopping", 0.0, []))
                ticket.finish(reply)
                if self.successor_pid is not None:
                    await self._exit_after_handover(ticket)
                    return
                # Let the callers' replies go out first; then return the upgrade's freed heap.
                await trio.lowlevel.checkpoint()
                release_after_upgrade()

    async def _exit_after_handover(self, ticket: UpgradeTicket) -> None:
        """Answer every caller (requests that came meanwhile fail: resend them), then exit."""
        assert self.successor_pid is not None
        tickets = [ticket, *self._pending.values()]
        # What arrived for us during the handover is now the successor's business: a stop (an
        # operator's SIGTERM or `systemctl stop`) and a worker upgrade (SIGHUP) are passed on,
        # not lost with this process.
        forward = []
        if self._stop_requested.is_set():
            forward.append(signal.SIGTERM)
        if any(not t.request.supervisor for t in tickets[1:]):
            forward.append(signal.SIGHUP)
        for signum in forward:
            log.info("supervisor.forwarded", signal=signum.name, successor_pid=self.successor_pid)
            with suppress(ProcessLookupError):
                os.kill(self.successor_pid, signum)
        self._pending.clear()
        for pending in tickets[1:]:
            pending.finish(
                self._failed(
                    pending,
                    f"handoffd handed over to a new supervisor (pid {self.successor_pid}) while "
                    "this request waited; send it again",
                    0.0,
                    [],
                )
            )
        with trio.move_on_after(_REPLY_GRACE_S):
            for each in tickets:
                await each.returned.wait()
        log.info("supervisor.handed_over", successor_pid=self.successor_pid)
        self._stop_requested.set()

    def fail_pending(self, reason: str) -> None:
        """Answer every queued upgrade with ``reason`` (a stopping supervisor runs none)."""
        pending = list(self._pending.values())
        self._pending.clear()
        for ticket in pending:
            ticket.finish(self._failed(ticket, reason, 0.0, []))

    def _failed(
        self, ticket: UpgradeTicket, reason: str, started: float, phases: list[UpgradePhase]
    ) -> UpgradeReply:
        number = self.current.number if self.current else 0
        return UpgradeReply(
            ok=False,
            outcome="failed",
            reason=reason,
            generation=number,
            previous_generation=number,
            duration_s=round(trio.current_time() - started, 4) if started else 0.0,
            phases=phases,
        )

    async def _upgrade_supervisor(self, ticket: UpgradeTicket) -> UpgradeReply:
        """One self-upgrade (see ``_handover``); never raises for a failure of the new one."""
        started = trio.current_time()
        phases: list[UpgradePhase] = []

        def phase(name: str, detail: str | None = None) -> None:
            item = UpgradePhase(
                phase=name, elapsed_s=round(trio.current_time() - started, 4), detail=detail
            )
            phases.append(item)
            ticket.publish(UpgradeEvent(phase=name, elapsed_s=item.elapsed_s, detail=detail))

        gens = self.generations()
        number = self.current.number if self.current else 0
        successor: Successor | None = None
        spawned: list[int] = []
        reply: UpgradeReply | None = None
        reason: str | None = None
        self.state = "self-upgrading"
        log.info("upgrade.started", supervisor=True, exec_path=ticket.request.exec_path)
        try:
            try:
                if os.getpid() == 1:
                    raise UpgradeError(
                        "handoffd runs as pid 1 (a container's init): its exit would end the "
                        "container, so it cannot hand over; restart the container instead"
                    )
                # The same check the new one makes, here for the exact message and no spawn.
                # Imported on use: the handover's models cost ~1.5 MB the daemon need not carry.
                from ._handover import offer, snapshot, successor_command

                loaded = load_config(self.loaded.path)
                argv = successor_command(ticket.request.exec_path, loaded.path, self.environ)
                phase("config_loaded", str(loaded.path))
                for gen in gens:
                    await gen.freeze()
                state, fds = snapshot(self)
                phase("frozen", f"{len(gens)} generation(s), {len(fds)} fds to hand over")
                successor = await offer(
                    state,
                    fds,
                    argv,
                    self.environ,
                    self.loaded.config.supervisor.self_upgrade_timeout,
                    phase,
                    spawned.append,
                )
                phase("in_charge", f"supervisor pid {successor.pid}")
                reply = UpgradeReply(
                    ok=True,
                    outcome="ok",
                    generation=number,
                    previous_generation=number,
                    duration_s=round(trio.current_time() - started, 4),
                    phases=phases,
                    supervisor_pid=successor.pid,
                )
                # Let go before the commit leaves: sending it may wait, and a drain deadline
                # reached meanwhile must not SIGKILL workers the successor is taking. A failed
                # commit takes them back (_take_back).
                for gen in gens:
                    gen.hand_over()
                await successor.commit(reply)
                # Committed: the control socket path is about to be the successor's (never
                # unlink it).
                self.successor_pid = successor.pid
                self._control_inode = None
                self.state = "handed-over"
            except HandoffError as exc:
                reason = str(exc)
            except Exception as exc:  # the upgrade boundary: we keep serving whatever happened
                log.exception("upgrade.crashed", supervisor=True)
                reason = f"internal error: {exc!r}"
        finally:
            if self.successor_pid is None:
                with trio.CancelScope(shield=True):
                    # The main pid is ours again before the successor dies: systemd must never
                    # see "main process killed" for a unit that keeps serving.
                    self.systemd.send(f"MAINPID={os.getpid()}")
                    if successor is not None:
                        await successor.abort()
                    self._take_back(gens, spawned)
        if reply is None or reason is not None:
            reply = self._failed(ticket, reason or "not handed over", started, phases)
        self._record_upgrade(reply, supervisor=True, supervisor_pid=reply.supervisor_pid)
        return reply

    def _take_back(self, gens: Sequence[Generation], spawned: list[int]) -> None:
        """After a failed handover: systemd's MAINPID, the generations, and no litter.

        The new supervisor (killed by now) may have sent MAINPID= and bound its staged control
        socket; both are undone whether or not it got that far.
        """
        if self._control_path is not None:
            for pid in spawned:
                with suppress(FileNotFoundError):
                    from ._handover import staged_control_path

                    staged_control_path(self._control_path, pid).unlink()
        self.systemd.send(f"MAINPID={os.getpid()}")
        pid_file = self.loaded.config.supervisor.pid_file
        if pid_file is not None:
            # The new one wrote its pid before saying in_charge; the file is ours again.
            try:
                write_pid_file(pid_file)
            except OSError as exc:
                log.warning("pid_file.not_restored", path=str(pid_file), error=exc.strerror)
        for gen in gens:
            gen.handed_over = False
            gen.thaw()
        self.state = "running"
        self.systemd.ready(self.status_text())

    async def _upgrade_workers(self, ticket: UpgradeTicket) -> UpgradeReply:
        """One worker upgrade; never raises for a failure of the new generation."""
        started = trio.current_time()
        phases: list[UpgradePhase] = []
        old = self.current

        def phase(name: str, detail: str | None = None) -> None:
            item = UpgradePhase(
                phase=name, elapsed_s=round(trio.current_time() - started, 4), detail=detail
            )
            phases.append(item)
            ticket.publish(UpgradeEvent(phase=name, elapsed_s=item.elapsed_s, detail=detail))

        self.state = "upgrading"
        self.systemd.reloading(monotonic_usec())
        new_listeners: list[Listener] = []
        reason: str | None
        with bound_contextvars(upgrade_generation=self.next_generation):
            log.info("upgrade.started", from_generation=old.number if old else None)
            try:
                loaded = load_config(self.loaded.path)
                phase("config_loaded", str(loaded.path))
                listeners, new_listeners, updates = self._reconcile_listeners(loaded)
                phase(
                    "spawning",
                    f"generation {self.next_generation}, {loaded.config.program.processes} workers",
                )
                gen = await self._start_generation(loaded, listeners)
                phase("ready", f"generation {gen.number} pids {gen.pids()}")
            except HandoffError as exc:
                reason = str(exc)
            except Exception as exc:  # the upgrade boundary: N keeps serving whatever happened
                log.exception("upgrade.crashed")
                reason = f"internal error: {exc!r}"
            else:
                reason = None
            if reason is not None:
                for li in new_listeners:
                    li.close()
                reply = self._failed(ticket, reason, started, phases)
            else:
                kept = {id(li) for li in listeners.values()}
                retired = [li for li in self.listeners.values() if id(li) not in kept]
                self._apply_listener_updates(updates)
                self.listeners = dict(listeners)
                self.loaded = loaded
                self.current = gen
                for li in new_listeners:
                    self.systemd.store_fd(li.name, li.fd)
                if old is not None:
                    self.draining.append(old)
                    old.request_drain()
                    phase(
                        "draining",
                        f"generation {old.number} (drain_timeout {old.spec.program.drain_timeout:g}s)",
                    )
                if retired:
                    assert self._root is not None
                    self.retired_listeners.update(li.name for li in retired)
                    self._root.start_soon(self._close_retired, retired, list(self.draining))
                reply = UpgradeReply(
                    ok=True,
                    outcome="ok",
                    generation=gen.number,
                    previous_generation=old.number if old else None,
                    duration_s=round(trio.current_time() - started, 4),
                    phases=phases,
                )
            self.state = "running"
            self._record_upgrade(reply)
            self.systemd.ready(self.status_text())
        return reply

    def _record_upgrade(self, reply: UpgradeReply, **extra: object) -> None:
        """Keep the outcome for ``status`` and write the one canonical line per upgrade."""
        self.last_upgrade = reply
        log.info(
            "upgrade.finished",
            outcome=reply.outcome,
            reason=reply.reason,
            generation=reply.generation,
            duration_s=reply.duration_s,
            **extra,
        )

    def _reconcile_listeners(
        self, loaded: LoadedConfig
    ) -> tuple[dict[str, Listener], list[Listener], list[tuple[Listener, ListenerConfig]]]:
        """Keep every held socket whose address is still configured; bind the rest.

        A held socket is reused when its address is unchanged, even under a new name: binding
        the same address again would fail (or, for a Unix path, unlink the path the current
        generation serves on). Nothing held is changed here; the returned updates are applied
        only if the upgrade succeeds.

        Returns every listener the new config wants, the ones newly bound (closed on failure),
        and the (held listener, new config) updates.
        """
        result: dict[str, Listener] = {}
        fresh: list[Listener] = []
        updates: list[tuple[Listener, ListenerConfig]] = []
        held = list(self.listeners.values())
        with ExitStack() as cleanup_on_fail:
            for config in loaded.config.listener:
                address = config.parsed_address
                existing = self.listeners.get(config.name)
                if existing is not None and existing.config.parsed_address != address:
                    existing = None
                if existing is None and (address.is_unix or address.port != 0):
                    # The same concrete address under a new name: the same socket.
                    existing = next(
                        (li for li in held if li.config.parsed_address == address), None
                    )
                if existing is not None and all(existing is not li for li in result.values()):
                    result[config.name] = existing
                    if existing.config != config:
                        updates.append((existing, config))
                    continue
                try:
                    listener = bind_listener(config)
                except ListenerError as exc:
                    clash = next(
                        (
                            li
                            for li in held
                            if not address.is_unix
                            and li.config.parsed_address.kind == address.kind
                            and li.config.parsed_address.port == address.port
                        ),
                        None,
                    )
                    if clash is None:
                        raise
                    raise ListenerError(
                        f"{exc}; handoffd itself holds port {address.port} as listener "
                        f"{clash.name!r} ({clash.config.address}): moving a listener to another "
                        "host on the same port needs a restart of handoffd"
                    ) from exc
                cleanup_on_fail.callback(listener.close)
                result[config.name] = listener
                fresh.append(listener)
            cleanup_on_fail.pop_all()
        return result, fresh, updates

    def _apply_listener_updates(self, updates: list[tuple[Listener, ListenerConfig]]) -> None:
        """Commit config changes to held listeners (after a successful upgrade only)."""
        for listener, config in updates:
            if listener.name != config.name:
                self.systemd.remove_fd(listener.name, listener.fd)
                self.systemd.store_fd(config.name, listener.fd)
                log.info("listener.renamed", listener=config.name, was=listener.name)
            if (
                listener.config.backlog != config.backlog
                and listener.sock.type == socket.SOCK_STREAM
            ):
                listener.sock.listen(config.backlog)
            listener.config = config

    async def _close_retired(self, retired: list[Listener], users: list[Generation]) -> None:
        """Close listeners that left the config once no generation that used them remains."""
        for gen in users:
            await gen.stopped.wait()
        for li in retired:
            log.info("listener.closed", listener=li.name, address=li.bound_address())
            self.systemd.remove_fd(li.name, li.fd)
            self.retired_listeners.discard(li.name)
            li.close()

    async def _forget_retired(self, names: Sequence[str], users: Sequence[Generation]) -> None:
        """``_close_retired`` for listeners retired under the previous supervisor (we have no fd)."""
        for gen in users:
            await gen.stopped.wait()
        for name in names:
            if name not in self.listeners:
                log.info("listener.closed", listener=name)
                self.systemd.remove_fd(name)
                self.retired_listeners.discard(name)

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if self.successor_pid is not None:
                # The workers are the successor's now; never act on them from here.
                log.warning(
                    "signal.received",
                    signal=signal.Signals(signum).name,
                    action="ignored: handed over",
                    successor_pid=self.successor_pid,
                )
            elif signum == signal.SIGHUP:
                log.info("signal.received", signal="SIGHUP", action="upgrade")
                self.request_upgrade(UpgradeRequest())
            elif signum == signal.SIGUSR2:
                log.info("signal.received", signal="SIGUSR2", action="upgrade --self")
                self.request_upgrade(UpgradeRequest(supervisor=True))
            elif signum == signal.SIGCHLD:
                _reap_orphans(unreaped_children())
            elif self._stop_requested.is_set():
                log.warning(
                    "signal.received", signal=signal.Signals(signum).name, action="kill workers now"
                )
                for gen in ([self.current] if self.current else []) + self.draining:
                    for slot in gen.slots:
                        if slot.process is not None:
                            slot.process.kill()
            else:
                log.info("signal.received", signal=signal.Signals(signum).name, action="stop")
                self.stop()

    def _take_state(self, handover: Handover) -> None:
        """A successor's start: the listeners, parked fds, numbering and systemd link handed over."""
        state = handover.state
        self.listeners, handover.listeners = handover.listeners, {}
        self.parked.restore(handover.parked)
        handover.parked = []
        self.next_generation = state.next_generation
        self.last_upgrade = handover.last_upgrade
        self.retired_listeners = set(state.retired_listeners)
        # From the state, not our environment: WATCHDOG_PID there names the old supervisor.
        notify_env = {"NOTIFY_SOCKET": state.notify_socket} if state.notify_socket else {}
        self.systemd = SystemdNotifier(notify_env)
        self.systemd.watchdog_interval = state.watchdog_interval
        for li in self.listeners.values():
            log.info("listener.handed_over", listener=li.name, address=li.bound_address(), fd=li.fd)

    async def _adopt(self, handover: Handover) -> None:
        """Supervise the generations handed over, numbered and configured as they were."""
        assert self._root is not None
        users: list[Generation] = []
        generations, handover.generations = handover.generations, []
        for adopted in generations:
            ordered = [self.listeners[n] for n in adopted.listeners if n in self.listeners]
            spec = self._spec_for(adopted.number, self.loaded, adopted.program, ordered)
            gen: Generation = await self._root.start(
                partial(
                    run_adopted_generation,
                    spec,
                    self.parked,
                    adopted.workers,
                    draining=adopted.draining,
                    drain_remaining=adopted.drain_remaining,
                )
            )
            self._root.start_soon(self._forget_when_stopped, gen)
            if adopted.number == handover.state.current and not adopted.draining:
                self.current = gen
            else:
                self.draining.append(gen)
            users.append(gen)
        if self.retired_listeners:
            self._root.start_soon(self._forget_retired, sorted(self.retired_listeners), users)

    async def _shutdown(self) -> None:
        gens = ([self.current] if self.current else []) + self.draining
        self.state = "stopping"
        longest = max((g.spec.program.drain_timeout for g in gens), default=0.0)
        self.systemd.stopping(
            f"stopping: draining generation(s) {', '.join(str(g.number) for g in gens)}"
        )
        self.systemd.extend_timeout(longest + _SYSTEMD_SLACK_S)
        for gen in gens:
            gen.request_drain()
        with trio.move_on_after(longest + _REAP_GRACE_S):
            for gen in gens:
                await gen.stopped.wait()


def _starter_address(listener: Listener) -> str:
    addr = listener.bound_address()
    return (
        addr.split(":", 1)[1]
        if addr.startswith(("unix:", "unixgram:"))
        else addr.removeprefix("udp://")
    )


def _reap_orphans(known: frozenset[int]) -> None:
    """As PID 1 (a container), reap exited processes that are not our workers.

    Workers (every child we spawned and have not reaped, including those of a generation still
    starting) are reaped through their pidfds; waiting on them here would steal their status.
    """
    children: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(p) for p in f.read().split())
    except OSError:
        return
    for pid in children - known:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def open_listeners(
    loaded: LoadedConfig,
    environ: Mapping[str, str],
    systemd: SystemdNotifier | None = None,
    launchd: LaunchdLibrary | None = None,
) -> dict[str, Listener]:
    """Inherit what the service manager passed (by name, then by address), bind the rest.

    systemd's LISTEN_FDS come first; without them, on macOS, launchd is asked for a socket
    named like each listener (``launchd`` injects its library, for tests on Linux).

    An unclaimed fd that is closed is also removed from systemd's fd store: after a crash the
    store may still hold a listener that an upgrade dropped, and it would stay bound (accepting
    into a queue nobody serves) for as long as the unit runs.
    """
    config = loaded.config
    try:
        inherited = parse_listen_fds(environ, os.getpid())
    except ValueError as exc:
        raise ListenerError(f"cannot use the fds passed by the service manager: {exc}") from exc
    if inherited is None and "LISTEN_FDS" in environ:
        log.warning(
            "systemd.listen_fds_ignored",
            listen_pid=environ.get("LISTEN_PID"),
            pid=os.getpid(),
            reason="LISTEN_PID names another process",
        )
    if inherited is None:
        from_launchd = launchd_sockets([lc.name for lc in config.listener], library=launchd)
        if from_launchd:
            inherited = [InheritedFd(fd=fd, name=name) for name, fd in from_launchd]
            log.info("launchd.sockets_inherited", names=sorted({n for n, _ in from_launchd}))
    claimed, unclaimed = adopt_inherited(config.listener, _without_duplicates(inherited or []))
    for item in unclaimed:
        if config.supervisor.keep_unclaimed:
            os.set_inheritable(item.fd, False)  # kept by us, not passed to every worker
            log.info("listener.unclaimed_kept", fd=item.fd, fdname=item.name)
        else:
            log.warning(
                "listener.unclaimed_closed",
                fd=item.fd,
                fdname=item.name,
                hint="add a [[listener]] with this name, or set keep_unclaimed = true",
            )
            os.close(item.fd)
            if systemd is not None:
                systemd.remove_fd(item.name)
    result: dict[str, Listener] = {}
    with ExitStack() as cleanup_on_fail:
        for li in claimed.values():
            cleanup_on_fail.callback(li.close)
        for lc in config.listener:
            if lc.name in claimed:
                result[lc.name] = claimed[lc.name]
                continue
            listener = bind_listener(lc)
            cleanup_on_fail.callback(listener.close)
            result[lc.name] = listener
        cleanup_on_fail.pop_all()
    return result


def _without_duplicates(inherited: list[InheritedFd]) -> list[InheritedFd]:
    """Drop (and close) fds that are another copy of an earlier one.

    With a .socket unit and the fd store together, systemd can pass the same socket twice
    (the socket unit's fd and the stored copy) after a restart.
    """
    seen: set[tuple[int, int]] = set()
    unique: list[InheritedFd] = []
    for item in inherited:
        st = os.fstat(item.fd)
        if (st.st_dev, st.st_ino) in seen:
            log.info("listener.duplicate_closed", fd=item.fd, fdname=item.name)
            os.close(item.fd)
            continue
        seen.add((st.st_dev, st.st_ino))
        unique.append(item)
    return unique


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (temp file + rename), so a reader never sees a partial file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(f"{os.getpid()}\n")
    os.rename(temp, path)


def _write_pid_file(path: Path | None) -> None:
    if path is None:
        return
    try:
        write_pid_file(path)
    except OSError as exc:
        raise ConfigError(
            f"supervisor.pid_file = {str(path)!r}: cannot write it: {exc.strerror}; use a "
            "writable path, such as one under supervisor.runtime_dir"
        ) from exc


def _remove_pid_file(path: Path | None) -> None:
    """Remove the pid file if it still names us (a successor rewrites it with its own pid)."""
    if path is None:
        return
    with suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


def _refuse_if_running(control_path: Path) -> None:
    """Refuse to start over a live daemon: binding would steal its control socket."""
    try:
        reply = _client.call(control_path, {"op": "status"}, timeout=2.0)
    except HandoffError:
        return  # nothing answers there: the path is free (or stale)
    raise ListenerError(
        f"another handoffd (pid {reply.get('pid')}) already serves the control socket "
        f"{control_path}; stop it first, or give this one another supervisor.runtime_dir"
    )


def _prepare_runtime_dir(sup: Supervisor, control_path: Path) -> None:
    """Create the runtime dir, or refuse one that another user could tamper with."""
    problem = notify_dir_ok(sup.notify_dir)
    if problem is None and len(os.fsencode(str(control_path))) > 107:
        problem = (
            f"the control socket path {control_path} is longer than unix(7) allows (107 bytes)"
        )
    if problem is not None:
        raise ListenerError(f"supervisor.runtime_dir: {problem}")
    try:
        sup.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.stat(sup.runtime_dir)
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ListenerError(
                f"supervisor.runtime_dir: {sup.runtime_dir} is owned by uid {info.st_uid} or "
                f"writable by others (mode {info.st_mode & 0o777:o}); handoffd keeps its control "
                "socket there, so it must be ours and not group- or world-writable"
            )
        sup.notify_dir.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ListenerError(
            f"supervisor.runtime_dir: cannot create {sup.runtime_dir}: {exc.strerror}; run as a "
            "user who may, or set runtime_dir to a directory you own"
        ) from exc


async def run_supervisor(
    loaded: LoadedConfig,
    environ: Mapping[str, str],
    *,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run handoffd until stopped: listeners, control socket, generation 1, upgrades.

    Raises:
        HandoffError: startup failed (listeners, control socket, or generation 1 never ready).
    """
    handover_fd = environ.get(HANDOVER_FD_ENV)
    if handover_fd is not None:
        environ = {k: v for k, v in environ.items() if k != HANDOVER_FD_ENV}
    sup = Supervisor(loaded, environ)
    config = loaded.config
    control_path = control_socket_path(config.supervisor, environ)
    if handover_fd is None:
        _refuse_if_running(control_path)
    _prepare_runtime_dir(sup, control_path)
    allowed = frozenset({0, os.getuid(), *config.supervisor.allowed_uids})
    # Others than root and us can only connect if the socket file lets them (unix(7)); the
    # SO_PEERCRED check then admits exactly the allowed uids.
    control_mode = 0o666 if set(allowed) - {0, os.getuid()} else 0o600
    if control_mode != 0o600:
        # The allowed users must be able to reach the socket: traverse, but not list or write.
        os.chmod(sup.runtime_dir, 0o711)
    signals_wanted = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2]
    if os.getpid() == 1:
        signals_wanted.append(signal.SIGCHLD)
    with trio.open_signal_receiver(*signals_wanted) as signals:
        handover: Handover | None = None
        if handover_fd is None:
            sup.listeners = open_listeners(loaded, environ, sup.systemd)
        else:
            from ._handover import Handover

            handover = await Handover.receive(
                handover_fd, loaded.path, config.supervisor.self_upgrade_timeout
            )
            sup._take_state(handover)
        try:
            for li in sup.listeners.values():
                # After a handover these are stored already (systemd ignores a duplicate fd);
                # storing them again records them as ours for FDSTOREREMOVE.
                sup.systemd.store_fd(li.name, li.fd)
            sup._control_path = control_path
            if handover is None:
                try:
                    control = bind_control_socket(control_path, mode=control_mode)
                except OSError as exc:
                    raise ListenerError(
                        f"cannot create the control socket {control_path}: {exc.strerror}; "
                        "check supervisor.runtime_dir / supervisor.control_socket"
                    ) from exc
                _write_pid_file(config.supervisor.pid_file)
            else:
                # Bound now (a failure is the old one's to hear about), in place at the commit.
                from ._handover import bind_staged_control_socket

                try:
                    control, staged = bind_staged_control_socket(control_path, control_mode)
                except OSError as exc:
                    reason = f"cannot bind a control socket next to {control_path}: {exc}"
                    await handover.refuse(reason)
                    raise ListenerError(reason) from exc
                try:
                    # Before in_charge: after the commit nothing may fail any more.
                    _write_pid_file(config.supervisor.pid_file)
                except ConfigError as exc:
                    await handover.refuse(str(exc))
                    with suppress(FileNotFoundError):
                        staged.unlink()
                    raise
                try:
                    await handover.confirm(
                        f"taking over from pid {handover.state.pid}",
                        config.supervisor.self_upgrade_timeout,
                    )
                except BaseException:
                    with suppress(FileNotFoundError):
                        staged.unlink()
                    raise
                try:
                    os.rename(staged, control_path)
                except OSError as exc:
                    # Committed: serving the workers matters more than the control path.
                    log.error(
                        "handover.control_socket_not_moved",
                        staged=str(staged),
                        error=exc.strerror,
                        hint=f"handoffd answers on {staged}; use --socket with that path",
                    )
                    control_path = staged
                sup.last_upgrade = handover.last_upgrade
            sup._control_inode = os.stat(control_path).st_ino
            async with trio.open_nursery() as root:
                sup._root = root
                await root.start(serve_control, control, sup, allowed)
                root.start_soon(sup._handle_signals, signals)
                root.start_soon(sup.systemd.run_watchdog)
                if handover is None:
                    try:
                        sup.current = await sup._start_generation(loaded, sup.listeners)
                    except SpawnError as exc:
                        if not sup._stop_requested.is_set():
                            raise SpawnError(f"generation 1 could not start: {exc}") from exc
                        # Stopped while starting: generation 1 was drained; a clean exit.
                        root.cancel_scope.cancel()
                        return
                else:
                    await sup._adopt(handover)
                sup.state = "running"
                release_after_startup()
                log.info(
                    "supervisor.ready",
                    generation=sup.current.number if sup.current else None,
                    pids=sup.current.pids() if sup.current else [],
                    listeners={li.name: li.bound_address() for li in sup.listeners.values()},
                    control_socket=str(control_path),
                    handover_from=handover.state.pid if handover else None,
                )
                sup.systemd.ready(sup.status_text())
                task_status.started(sup)
                async with trio.open_nursery() as upgrades:
                    upgrades.start_soon(sup._run_upgrades)
                    await sup._stop_requested.wait()
                    # An upgrade in progress ends first: stop() aborted its new generation,
                    # which is drained gracefully (cancelling it would SIGKILL workers that
                    # may hold connections). A self-upgrade may still complete.
                    if sup._upgrade_done is not None:
                        with trio.move_on_after(sup.stop_grace()):
                            await sup._upgrade_done.wait()
                    upgrades.cancel_scope.cancel()
                sup.fail_pending("handoffd is stopping")
                if sup.successor_pid is None:
                    await sup._shutdown()
                root.cancel_scope.cancel()
        finally:
            if handover is not None:
                handover.close()  # whatever was received and not claimed
            for li in sup.listeners.values():
                li.close()
            sup.parked.close_all()
            _unlink_if_ours(control_path, sup._control_inode)
            if sup.successor_pid is None:
                _remove_pid_file(config.supervisor.pid_file)
    log.info("supervisor.stopped", handed_over_to=sup.successor_pid)


def _unlink_if_ours(path: Path, inode: int | None) -> None:
    """Remove the control socket unless a successor supervisor has already replaced it."""
    try:
        if inode is not None and os.stat(path).st_ino == inode:
            path.unlink()
    except OSError:
        pass
