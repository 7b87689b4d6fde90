"""Start-up wiring of ``handoffd run``: runtime dir, listeners, control socket, pid file, signals.

``run_supervisor`` is also the successor's start-up in a self-upgrade: with
``HANDOFF_SUPERVISOR_FD`` set it claims what the old supervisor hands over (``_handover``)
instead of opening listeners and starting generation 1.

Design notes:
- Signal handlers are installed before READY=1 is sent anywhere: a SIGHUP that arrived between
  READY and the handler would otherwise take its default action and kill the daemon.
- handoffd is a child subreaper (``_spawn.become_subreaper``) from the start, and reaps on every
  SIGCHLD the children that are not workers: descendants of workers whose parent died (they are
  attributed to their generation by process group), and, as PID 1, any orphan at all.
- Whoever opens a resource closes it: this module opens the control socket and the listeners
  and closes them on the way out, whatever the supervisor did meanwhile.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._config import control_socket_path
from ._control import UpgradeRequest, bind_control_socket, serve_control
from ._custody import CustodyKeeper, recover_orphans
from ._errors import ConfigError, ListenerError
from ._held import open_listeners
from ._limits import raise_nofile_limit
from ._memory import release_after_startup
from ._metrics_http import metrics_address, open_metrics_socket, serve_metrics_http
from ._paths import HANDOVER_FD_ENV, REEXEC_FD_ENV
from ._pidfile import remove_pid_file, write_configured_pid_file
from ._platform import record as record_degradations
from ._portable import reap_children, select_spawner
from ._runtime_dir import open_runtime_dir, refuse_if_running, unlink_if_ours
from ._spawn import become_subreaper, reap_orphans
from ._supervisor import Supervisor

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from ._config import LoadedConfig
    from ._custody import Orphans
    from ._handover import Handover
    from ._processes import Spawner
    from ._runtime_dir import RuntimeDir

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


async def run_supervisor(
    loaded: LoadedConfig,
    environ: Mapping[str, str],
    *,
    spawner: Spawner | None = None,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run handoffd until stopped: listeners, control socket, generation 1, upgrades.

    ``spawner`` defaults to the one this kernel supports (``_portable.select_spawner``:
    pidfds, else kqueue, else SIGCHLD + waitid; ``HANDOFF_PLATFORM=portable`` forces the
    portable one).

    Raises:
        HandoffError: startup failed (listeners, control socket, or generation 1 never ready).
    """
    start = _Start.prepare(loaded, environ, spawner or _platform_spawner(environ))
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        # Blocked by a predecessor image across its exec in place (pending ones arrive now).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        try:
            await start.open()
            await start.serve(signals, task_status)
        finally:
            start.close()
    log.info("supervisor.stopped", handed_over_to=start.sup.successor_pid)


# What the supervisor handles; SIGCHLD reaps (handoffd is a child subreaper).
_SIGNALS: Final = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGCHLD)


@final
@dataclass
class _Start:
    """One start of handoffd: fresh, after an exec in place, or as a new-pid successor.

    Owns what it opens (listeners through the supervisor, control and metrics sockets, the
    runtime dir, the custody record) and closes it in ``close`` whatever happened.
    """

    sup: Supervisor
    runtime: RuntimeDir
    custody: CustodyKeeper
    control_path: Path
    control_mode: int
    environ: Mapping[str, str]
    handover_fd: str | None
    reexec_fd: str | None
    handover: Handover | None = None
    orphans: Orphans | None = None
    control: socket.socket | None = None
    metrics: socket.socket | None = None

    @classmethod
    def prepare(cls, loaded: LoadedConfig, environ: Mapping[str, str], spawner: Spawner) -> _Start:
        handover_fd = environ.get(HANDOVER_FD_ENV)
        reexec_fd = environ.get(REEXEC_FD_ENV)
        environ = {k: v for k, v in environ.items() if k not in (HANDOVER_FD_ENV, REEXEC_FD_ENV)}
        raise_nofile_limit(environ)
        sup = Supervisor(loaded, environ, spawner)
        control_path = control_socket_path(loaded.config.supervisor, environ)
        if handover_fd is None and reexec_fd is None:
            refuse_if_running(control_path)
        runtime = open_runtime_dir(sup.runtime_dir, control_path)
        sup.notify_dir, control_path = runtime.notify_dir, runtime.control_path
        sup.gens.notify_dir = sup.notify_dir
        sup.gens.open_notify_dir = runtime.allow_workers
        # Others than root and us can only connect if the socket file lets them (unix(7)); the
        # SO_PEERCRED check then admits exactly the allowed uids.
        control_mode = 0o666 if sup.allowed_uids - {0, os.getuid()} else 0o600
        if control_mode != 0o600:
            # The allowed users must be able to reach the socket: traverse, not list or write.
            runtime.allow_traverse()
        problem = become_subreaper()
        if problem is not None:
            log.warning(
                "supervisor.not_subreaper",
                reason=problem,
                hint="descendants whose parent dies go to init: a generation's drain then waits "
                "only for what its process groups still hold",
            )
        sup.control_path = control_path
        custody = CustodyKeeper(
            runtime.root, sup.held, sup.gens, loaded.path, lambda: sup.successor_pid is not None
        )
        sup.gens.on_change = custody.update
        return cls(
            sup, runtime, custody, control_path, control_mode, environ, handover_fd, reexec_fd
        )

    async def open(self) -> None:
        """Listeners, control socket, metrics listener: inherited, taken back or bound."""
        sup = self.sup
        if self.reexec_fd is not None:
            self._open_after_exec(self.reexec_fd)
        elif self.handover_fd is None:
            self._open_fresh()
        else:
            await self._open_as_successor(self.handover_fd)
        assert self.control is not None
        sup.control_inode = self.runtime.verify_control_socket(self.control_path)
        sup.control_socket = self.control

    def _open_after_exec(self, reexec_fd: str) -> None:
        sup = self.sup
        self.handover = _claim(sup, _from_exec(sup, reexec_fd))
        self.control = self.handover.take_control() or _bind_control(
            self.control_path, self.control_mode
        )
        sup.last_upgrade = self.handover.last_upgrade
        self.custody.claim()  # the same pid: the record stays ours
        self.metrics = _open_metrics_after_exec(sup)

    def _open_fresh(self) -> None:
        sup, loaded = self.sup, self.sup.loaded
        # What a killed predecessor left serving is taken back, not bound again.
        self.orphans = recover_orphans(
            self.runtime.root, sup.notify_dir, loaded, self.environ, self.control_path
        )
        taken = self.orphans.claim_listeners() if self.orphans is not None else {}
        if self.orphans is not None:
            sup.gens.next_number = self.orphans.next_generation
        sup.held.adopt(open_listeners(loaded, self.environ, sup.systemd, taken=taken))
        self.metrics = _open_metrics(sup, None)
        self.control = _bind_control(self.control_path, self.control_mode)
        write_configured_pid_file(loaded.config.supervisor.pid_file)
        self.custody.claim()

    async def _open_as_successor(self, handover_fd: str) -> None:
        sup = self.sup
        supervisor = sup.loaded.config.supervisor
        handover = self.handover = await _receive(sup, handover_fd)
        self.metrics = await _open_metrics_or_refuse(sup, handover)
        prior = sup.last_upgrade
        self.control, self.control_path = await handover.take_over(
            self.control_path,
            self.control_mode,
            lambda: write_configured_pid_file(supervisor.pid_file),
            supervisor.self_upgrade_timeout,
        )
        sup.control_path = self.control_path
        sup.last_upgrade = handover.last_upgrade
        # In charge: the self-upgrade counts here (None: its reply never arrived).
        committed = handover.last_upgrade if handover.last_upgrade is not prior else None
        sup.metrics.on_upgrade_finished(committed, supervisor=True)

    async def serve(
        self, signals: AsyncIterator[int], task_status: trio.TaskStatus[Supervisor]
    ) -> None:
        """The control server, signals, watchdog and the supervisor, until it has stopped."""
        sup, handover, metrics = self.sup, self.handover, self.metrics
        assert self.control is not None
        async with trio.open_nursery() as root:
            sup.metrics.control_connections = await root.start(
                serve_control, self.control, sup, sup.allowed_uids
            )
            if metrics is not None and handover is None:  # /healthz while gen 1 starts
                await root.start(serve_metrics_http, metrics, sup.metrics.http_answer)
            root.start_soon(_handle_signals, sup, signals)
            root.start_soon(sup.systemd.run_watchdog)
            if await root.start(_run_until_stopped, sup, handover, self.orphans, root.cancel_scope):
                if handover is not None:
                    self.custody.claim()  # in charge now, the workers adopted
                if metrics is not None and handover is not None:  # once it supervises
                    await root.start(serve_metrics_http, metrics, sup.metrics.http_answer)
                release_after_startup()
                _log_ready(sup, handover)
                sup.systemd.ready(sup.status_text())
                task_status.started(sup)

    def close(self) -> None:
        """Close what this start opened; a successor in charge keeps the shared paths."""
        sup = self.sup
        if self.handover is not None:
            self.handover.close()  # whatever was received and not claimed
        if self.orphans is not None:
            self.orphans.close()  # whatever was taken back and not adopted
        self.custody.remove()
        for sock in (self.control, self.metrics):
            if sock is not None:
                sock.close()
        sup.held.close_all(unlink=sup.successor_pid is None)
        sup.parked.close_all()
        unlink_if_ours(sup.control_path or self.control_path, sup.control_inode)
        self.runtime.close()
        if sup.successor_pid is None:
            remove_pid_file(sup.loaded.config.supervisor.pid_file)


def _platform_spawner(environ: Mapping[str, str]) -> Spawner:
    """Choose the process watcher for this kernel; log and record each degradation once.

    Raises:
        ConfigError: ``HANDOFF_PLATFORM`` has an unknown value.
    """
    try:
        spawner, degraded = select_spawner(environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    record_degradations(degraded)
    for each in degraded:
        log.warning("platform.degraded", what=each.what, why=each.why)
    return spawner


async def _run_until_stopped(
    sup: Supervisor,
    handover: Handover | None,
    orphans: Orphans | None,
    root: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the supervisor; once it has drained and returned, end the control server and the
    rest of the root nursery too."""
    try:
        await sup.run(handover, orphans, task_status=task_status)
    finally:
        root.cancel()


async def _receive(sup: Supervisor, handover_fd: str) -> Handover:
    from ._handover import Handover

    supervisor = sup.loaded.config.supervisor
    handover = await Handover.receive(
        handover_fd, sup.loaded.path, supervisor.self_upgrade_timeout, sup.gens.spawner
    )
    return _claim(sup, handover)


def _from_exec(sup: Supervisor, reexec_fd: str) -> Handover:
    from ._handover import Handover

    return Handover.from_exec(reexec_fd, sup.loaded.path)


def _claim(sup: Supervisor, handover: Handover) -> Handover:
    """Take the listeners, parked fds and numbering a predecessor handed over."""
    claimed = handover.claim()
    sup.held.systemd = sup.systemd = claimed.systemd
    sup.held.adopt(claimed.listeners)
    sup.held.retired = claimed.retired_listeners
    sup.parked.restore(claimed.parked)
    sup.gens.next_number = claimed.next_generation
    sup.last_upgrade = claimed.last_upgrade
    sup.metrics.restore(handover.state.metrics)
    return handover


def _open_metrics(sup: Supervisor, handover: Handover | None) -> socket.socket | None:
    """The ``[metrics]`` listener, if configured (``_metrics_http`` on a successor's bind)."""
    config = sup.loaded.config.metrics
    if config is None:
        return None
    sock = open_metrics_socket(config, successor=handover is not None)
    sup.metrics.enabled = True
    log.info("metrics.listening", address=metrics_address(sock))
    return sock


def _open_metrics_after_exec(sup: Supervisor) -> socket.socket | None:
    """After an exec in place the previous image's metrics socket is gone (close-on-exec): bind
    it again. Past the point of no return, a failure costs the metrics, never the workers."""
    try:
        return _open_metrics(sup, None)
    except ListenerError as exc:
        log.error("metrics.not_listening", reason=str(exc), hint="fix it and upgrade --self again")
        return None


async def _open_metrics_or_refuse(sup: Supervisor, handover: Handover) -> socket.socket | None:
    """As a successor: a metrics address we cannot bind refuses the handover (the old
    supervisor carries on)."""
    try:
        return _open_metrics(sup, handover)
    except ListenerError as exc:
        await handover.refuse(str(exc))
        raise


def _bind_control(control_path: Path, control_mode: int) -> socket.socket:
    try:
        return bind_control_socket(control_path, mode=control_mode)
    except OSError as exc:
        raise ListenerError(
            f"cannot create the control socket {control_path}: {exc.strerror}; "
            "check supervisor.runtime_dir / supervisor.control_socket"
        ) from exc


def _log_ready(sup: Supervisor, handover: Handover | None) -> None:
    log.info(
        "supervisor.ready",
        generation=sup.current.number if sup.current else None,
        pids=sup.current.pids() if sup.current else [],
        listeners={li.name: li.bound_address() for li in sup.held.values()},
        control_socket=str(sup.control_path),
        handover_from=handover.state.pid if handover else None,
        # A self-upgrade that kept the pid (the new image of the same process).
        in_place=handover is not None and handover.channel is None,
    )


async def _handle_signals(sup: Supervisor, signals: AsyncIterator[int]) -> None:
    """SIGHUP upgrades, SIGUSR2 self-upgrades, the first SIGTERM/SIGINT stops, a second one
    kills the workers now; SIGCHLD reaps orphans (never a worker: its pidfd wait does)."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGCHLD:
            reap_children(sup.gens.spawner)  # the waitid watcher's workers first: their status
            for pid, group in reap_orphans():
                log.info(
                    "orphan.reaped",
                    pid=pid,
                    process_group=group,
                    generation=sup.gens.generation_of_group(group),
                )
        elif sup.successor_pid is not None:
            # The workers are the successor's now; never act on them from here.
            log.warning("signal.received", signal=name, action="ignored: handed over")
        elif signum == signal.SIGHUP:
            log.info("signal.received", signal=name, action="upgrade")
            sup.request_upgrade(UpgradeRequest())
        elif signum == signal.SIGUSR2:
            log.info("signal.received", signal=name, action="upgrade --self")
            sup.request_upgrade(UpgradeRequest(supervisor=True))
        elif sup.stop_requested.is_set():
            log.warning("signal.received", signal=name, action="kill workers now")
            sup.gens.kill_all()
        else:
            log.info("signal.received", signal=name, action="stop")
            sup.stop()
