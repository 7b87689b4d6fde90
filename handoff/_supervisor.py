"""The supervisor: the upgrade state machine over the held listeners and the generations.

One upgrade at a time walks the phase table of ``_phases``::

    running -> spawning -> waiting_ready -> holding -> running     (N+1 current, N drains)
    any failure before the hold ends -> running                    (N+1 stopped, N serves)
    running -> self-upgrading -> handed-over | running             (see ``_handover``)

The hold (``program.hold`` seconds, the canary) has both generations serve; a worker of N+1 that
exits or stops holding the listeners fails the upgrade, as a stop does. The supervisor decides;
effects report back: ``_generation_set`` starts, holds and drains generations (raising
``SpawnError`` with the reason one cannot serve), ``_handover.hand_over`` runs a self-upgrade,
``_held`` plans, commits or rolls back the listeners, and ``_tickets`` owns the callers'
requests (coalesced: a burst costs the running upgrade and one follow-up). Start-up wiring
(control socket, pid file, signals, a successor's start) is ``_startup``.

Design notes:
- The upgrade boundary is the one place that catches ``Exception``: whatever goes wrong while
  starting N+1, N must keep serving and the caller must get an answer.
- State changes are sync methods; only waiting is async, so every transition is atomic.
- A supervisor that handed over exits once every caller of the self-upgrade got its reply: the
  reply is written in the same scheduling step as ``upgrade()`` returns (trio's socket send only
  yields after its syscall when not cancelled), so cancelling the root after the last caller
  returned cannot cut it off. It never drains, signals or kills a worker after the commit.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Final, final

import structlog
import trio
from structlog.contextvars import bound_contextvars

from ._config import load_config, resolve_runtime_dir
from ._control import ControlHandler, UpgradeRequest
from ._errors import HandoffError, SpawnError
from ._generation import ParkedFds
from ._generation_set import GenerationSet
from ._held import HeldListeners
from ._limits import worker_fd_limit
from ._memory import release_after_upgrade
from ._metrics import Metrics
from ._phases import PhaseMachine
from ._processes import REAP_TIMEOUT_S
from ._readiness import probe_proc
from ._reconfigure import apply_changes, refuse_unappliable
from ._rolling import bring_up
from ._spawn import DEFAULT_SPAWNER
from ._status import status_info, status_text
from ._systemd import SystemdNotifier, monotonic_usec
from ._tickets import UpgradeQueue, UpgradeTicket, log_finished

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from pathlib import Path

    from ._config import LoadedConfig
    from ._control import StatusInfo, UpgradeEvent, UpgradeReply
    from ._custody import Orphans
    from ._generation import Generation
    from ._handover import ExecPlan, Handover, HandoverOutcome
    from ._held import ListenerPlan
    from ._listeners import Listener
    from ._processes import Spawner
    from ._readiness import ReadinessProbe
    from ._self_upgrade import SelfUpgrade

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# Extra time systemd should allow beyond our own timeouts (EXTEND_TIMEOUT_USEC=): reaping,
# closing sockets and the round trip of the notify message itself.
SYSTEMD_SLACK_S: Final = 5.0


@final
class Supervisor(ControlHandler):
    """The running daemon's state; see the module docstring for the state machine."""

    def __init__(
        self,
        loaded: LoadedConfig,
        environ: Mapping[str, str],
        spawner: Spawner = DEFAULT_SPAWNER,
        probe: ReadinessProbe = probe_proc,
    ) -> None:
        self.loaded = loaded
        self.environ = dict(environ)
        self.systemd = SystemdNotifier(environ)
        self.runtime_dir = resolve_runtime_dir(loaded.config.supervisor, environ)
        self.notify_dir = self.runtime_dir / "notify"
        self.held = HeldListeners(self.systemd)
        self.parked = ParkedFds(worker_fd_limit(environ))
        self.gens = GenerationSet(
            parked=self.parked,
            notify_dir=self.notify_dir,
            environ=environ,
            spawner=spawner,
            on_drained=lambda: self.systemd.status(self.status_text()),
            probe=probe,
        )
        self.gens.counters = self.metrics = Metrics(self.held, self.parked, self.gens)
        self.machine = PhaseMachine()
        self.queue = UpgradeQueue()
        self.last_upgrade: UpgradeReply | None = None
        # Set once a successor is in charge: from then on we only exit.
        self.successor_pid: int | None = None
        # Set when the upgrade in progress (if any) has finished; a stop waits for it.
        self.upgrade_done: trio.Event | None = None
        self.stop_requested = trio.Event()
        self.control_path: Path | None = None
        # Who may use the control socket (the server reads it per connection).
        self.allowed_uids = {0, os.getuid(), *loaded.config.supervisor.allowed_uids}
        self.control_inode: int | None = None
        # The listening control socket (set by _startup): an exec in place keeps it open.
        self.control_socket: socket.socket | None = None
        # A pre-flight passed: re-execute in place once the callers have their replies.
        self.exec_plan: ExecPlan | None = None
        self._self_upgrade: SelfUpgrade | None = None
        self._root: trio.Nursery | None = None

    # ---- queries ----

    @property
    def current(self) -> Generation | None:
        return self.gens.current

    def generations(self) -> list[Generation]:
        """The live generations: the current one first, then those still draining."""
        return self.gens.all()

    def status_text(self) -> str:
        return status_text(self.machine.phase, self.current, self.gens.draining, self.last_upgrade)

    def status(self) -> StatusInfo:
        return status_info(
            phase=self.machine.phase,
            config=self.loaded.path,
            generations=self.generations(),
            current=self.current,
            listeners=self.held.values(),
            parked=self.parked.items(),
            last_upgrade=self.last_upgrade,
        )

    def metrics_text(self) -> str | None:
        return self.metrics.render().decode() if self.metrics.enabled else None

    # ---- requests (sync: atomic) ----

    def stop(self) -> None:
        """Begin a graceful stop: not ready for ``stop_delay`` seconds (a load balancer takes
        us out; another stop ends the delay), then drain every generation and exit."""
        if self.successor_pid is not None:
            # Handed over: the stop is meant for the service, which is the successor now.
            from ._handover import forward_signal

            forward_signal(self.successor_pid, signal.SIGTERM)
            return
        delay = self.loaded.config.supervisor.stop_delay
        if self.metrics.announce_stop() and delay > 0 and self._root is not None:
            log.info("supervisor.unready", stop_delay_s=delay)
            self.systemd.extend_timeout(delay + SYSTEMD_SLACK_S)  # then _shutdown extends again
            self._root.start_soon(self._stop_after, delay)
            return
        if not self.stop_requested.is_set():
            log.info("supervisor.stopping")
        self.stop_requested.set()
        self.gens.abort_new("handoffd is stopping")

    async def _stop_after(self, delay: float) -> None:
        await trio.sleep(delay)
        self.stop()

    def request_upgrade(self, request: UpgradeRequest) -> UpgradeTicket:
        """Queue an upgrade, joining the pending one of the same kind; a stopping or handed-over
        supervisor answers at once."""
        stopping = self.stop_requested.is_set() or self.metrics.stopping
        return self.queue.request(request, self.gens.number(), stopping, self.successor_pid)

    async def upgrade(
        self, request: UpgradeRequest, on_event: Callable[[UpgradeEvent], Awaitable[None]]
    ) -> UpgradeReply:
        return await self.request_upgrade(request).follow(on_event)

    # ---- the loop ----

    async def run(
        self,
        handover: Handover | None = None,
        orphans: Orphans | None = None,
        *,
        task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start generation 1 (or adopt the handed-over ones), run upgrades until stopped, drain.

        ``orphans``: the workers a killed predecessor left running (``_custody``) are adopted
        first; a fresh generation starts only if none of them is current.

        Calls ``task_status.started(True)`` once serving, or ``started(False)`` when a stop came
        before generation 1 was ready (it was drained; a clean exit).

        Raises:
            SpawnError: generation 1 could not start (and no stop was asked for meanwhile).
        """
        async with trio.open_nursery() as root:
            self._root = root
            if handover is not None:
                await self._adopt(handover)
            else:
                if orphans is not None:  # what a killed predecessor left serving (_custody)
                    handed, current = orphans.claim_generations(), orphans.current
                    supervisor, listeners = self.loaded.config.supervisor, self.held.by_name
                    await self.gens.adopt(root, handed, current, supervisor, listeners)
                if self.current is None and not await self._start_first(root):
                    task_status.started(False)
                    return
            self.machine.to("running")
            task_status.started(True)
            async with trio.open_nursery() as upgrades:
                upgrades.start_soon(self._run_upgrades, root)
                await self.stop_requested.wait()
                # An upgrade in progress ends first: stop() aborted its new generation, which
                # is drained gracefully (cancelling it would SIGKILL workers that may hold
                # connections). A self-upgrade may still complete.
                program, supervisor = self.loaded.config.program, self.loaded.config.supervisor
                grace = max(program.drain_timeout, supervisor.self_upgrade_timeout)
                if self.upgrade_done is not None:
                    with trio.move_on_after(grace + SYSTEMD_SLACK_S):
                        await self.upgrade_done.wait()
                upgrades.cancel_scope.cancel()
            self.queue.fail_all("handoffd is stopping", self.gens.number())
            if self.successor_pid is None:
                await self._shutdown()
            root.cancel_scope.cancel()

    async def _start_first(self, root: trio.Nursery) -> bool:
        """Generation 1; False if a stop came first (it was drained: a clean exit)."""
        try:
            self.gens.promote(await self._start_generation(self.loaded, self.held.by_name))
        except SpawnError as exc:
            if not self.stop_requested.is_set():
                raise SpawnError(f"generation 1 could not start: {exc}") from exc
            self.machine.to("stopping")
            root.cancel_scope.cancel()
            return False
        return True

    async def _run_upgrades(self, root: trio.Nursery) -> None:
        while True:
            ticket = await self.queue.next()
            if self.stop_requested.is_set():
                ticket.finish(ticket.failed("handoffd is stopping", self.gens.number()))
                continue
            ticket.begin()
            self.metrics.on_upgrade_started()
            self.upgrade_done = trio.Event()
            root.start_soon(self.held.guard, self.upgrade_done, self.metrics.sample)  # N+1 starts
            try:
                if ticket.request.supervisor:
                    reply = await self._upgrade_supervisor(ticket)
                else:
                    reply = await self._upgrade_workers(ticket)
            except BaseException:
                # Cancelled by a stop that could not wait any longer: the caller still hears.
                ticket.finish(ticket.failed("handoffd is stopping", self.gens.number()))
                raise
            finally:
                self.upgrade_done.set()
            ticket.finish(reply)
            self.metrics.on_upgrade_finished(reply, supervisor=ticket.request.supervisor)
            if self.successor_pid is not None:
                from ._handover import leave

                # Answer every caller (requests that came meanwhile fail: resend them), exit.
                await leave(ticket, self.queue, self.successor_pid, self.stop_requested.is_set())
                self.stop_requested.set()
                return
            if self.exec_plan is not None:
                from ._handover import reexec

                # Answer every caller, then become the new version (returns if exec failed).
                await reexec(ticket, self.queue, self.stop_requested.is_set(), self._exec)
                self.exec_plan = None
            # Let the callers' replies go out first; then return the upgrade's freed heap.
            await trio.lowlevel.checkpoint()
            release_after_upgrade()

    async def _upgrade_workers(self, ticket: UpgradeTicket) -> UpgradeReply:
        """One worker upgrade; never raises for a failure of the new generation."""
        old = self.current
        plan: ListenerPlan | None = None
        gen: Generation | None = None
        self.machine.to("spawning", generation=self.gens.next_number)
        self.systemd.reloading(monotonic_usec())
        with bound_contextvars(upgrade_generation=self.gens.next_number):
            log.info("upgrade.started", from_generation=old.number if old else None)
            try:
                loaded = load_config(self.loaded.path)
                refuse_unappliable(self.loaded.config.supervisor, loaded)
                ticket.phase("config_loaded", str(loaded.path))
                plan = self.held.plan(loaded)
                processes = loaded.config.program.processes
                ticket.phase("spawning", f"generation {self.gens.next_number}, {processes} workers")
                gen = await self._start_generation(loaded, plan.wanted, ticket)
            except HandoffError as exc:
                reason: str | None = str(exc)
            except Exception as exc:  # the upgrade boundary: N keeps serving whatever happened
                log.exception("upgrade.crashed")
                reason = f"internal error: {exc!r}"
            else:
                reason = None
            if reason is not None or plan is None or gen is None:
                if plan is not None:
                    self.held.roll_back(plan)
                reply = ticket.failed(reason or "no listener plan", self.gens.number())
            else:
                reply = self._promote(ticket, loaded, plan, gen)
            self.machine.to("running")
            self.last_upgrade = reply
            log_finished(reply)
            self.systemd.ready(self.status_text())
        return reply

    def _promote(
        self, ticket: UpgradeTicket, loaded: LoadedConfig, plan: ListenerPlan, gen: Generation
    ) -> UpgradeReply:
        """N+1 serves: make it current, drain N, commit the listener plan and [supervisor]."""
        apply_changes(
            self.loaded.config.supervisor,
            loaded.config.supervisor,
            allowed_uids=self.allowed_uids,
            control_path=self.control_path,
            runtime_dir=self.runtime_dir,
        )
        self.loaded = loaded
        old = self.gens.promote(gen)
        if old is not None:
            drain = old.spec.program.drain_timeout
            ticket.phase("draining", f"generation {old.number} (drain_timeout {drain:g}s)")
        assert self._root is not None
        self.held.commit(plan, self.gens.draining, self._root)
        return ticket.ok(gen.number, old.number if old else None)

    async def _upgrade_supervisor(self, ticket: UpgradeTicket) -> UpgradeReply:
        """One self-upgrade (``_self_upgrade``, imported on use); never raises for its failure."""
        from ._self_upgrade import SelfUpgrade

        upgrade = self._self_upgrade = SelfUpgrade(
            self.loaded,
            self.environ,
            self.systemd,
            self.held,
            self.parked,
            self.gens,
            self.metrics,
            self.control_path,
        )
        self.machine.to("self-upgrading")
        request = ticket.request
        log.info(
            "upgrade.started",
            supervisor=True,
            exec_path=request.exec_path,
            in_place=upgrade.in_place,
        )
        outcome: HandoverOutcome | None = None
        try:
            outcome = await upgrade.run(ticket, self.last_upgrade)
        finally:
            if outcome is None or outcome.successor_pid is None:  # we serve on (or exec later)
                self.machine.to("running")
                self.systemd.ready(self.status_text())
        if outcome.exec_plan is not None and outcome.reply is not None:
            self.exec_plan = outcome.exec_plan
            reply = outcome.reply
        elif outcome.successor_pid is not None and outcome.reply is not None:
            # Committed: the control socket path is about to be the successor's (never unlink).
            self.successor_pid = outcome.successor_pid
            self.control_inode = None
            self.machine.to("handed-over", successor_pid=outcome.successor_pid)
            reply = outcome.reply
        else:
            reply = ticket.failed(outcome.reason or "not handed over", self.gens.number())
        self.last_upgrade = reply
        log_finished(reply, supervisor=True, supervisor_pid=reply.supervisor_pid)
        return reply

    def _exec(self, resend: Sequence[signal.Signals]) -> None:
        """Re-execute in place (returns only if the exec failed: then we carry on, and say so)."""
        assert self._self_upgrade is not None
        assert self.exec_plan is not None
        assert self.control_socket is not None
        plan, control = self.exec_plan, self.control_socket
        failure = self._self_upgrade.exec(control, plan, resend, self.last_upgrade)
        if failure is not None and self.last_upgrade is not None:
            update = {"ok": False, "outcome": "failed", "reason": failure}
            self.last_upgrade = self.last_upgrade.model_copy(update=update)

    # ---- generations ----

    async def _start_generation(
        self,
        loaded: LoadedConfig,
        listeners: Mapping[str, Listener],
        ticket: UpgradeTicket | None = None,
    ) -> Generation:
        """Bring up the next generation (``_rolling``): ready, and through its hold if it is
        an upgrade's; raises ``HandoffError`` with the reason if it cannot serve."""
        assert self._root is not None
        program = loaded.config.program
        self.systemd.extend_timeout(program.ready_timeout + program.hold + SYSTEMD_SLACK_S)
        return await bring_up(
            self.gens,
            self._root,
            loaded,
            listeners,
            on_created=self._created,
            phase=None if ticket is None else ticket.phase,
            to_phase=self.machine.to,
            stopping=self.stop_requested.is_set,
        )

    def _created(self, gen: Generation) -> None:
        if self.machine.phase == "spawning":
            self.machine.to("waiting_ready", generation=gen.number)
        if self.stop_requested.is_set():
            gen.abort("handoffd is stopping")

    async def _adopt(self, handover: Handover) -> None:
        """Supervise the generations handed over, numbered and configured as they were."""
        assert self._root is not None
        await self.gens.adopt(
            self._root,
            handover.claim_generations(),
            handover.state.current,
            self.loaded.config.supervisor,
            self.held.by_name,
        )
        self._root.start_soon(self.held.forget_retired, self.generations())

    async def _shutdown(self) -> None:
        self.machine.to("stopping")
        gens = self.generations()
        longest = max((g.spec.program.drain_timeout for g in gens), default=0.0)
        self.systemd.stopping(f"stopping: draining generation(s) {self.gens.numbers()}")
        self.systemd.extend_timeout(longest + SYSTEMD_SLACK_S)
        await self.gens.drain_all(longest + REAP_TIMEOUT_S)
