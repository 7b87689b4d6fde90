"""The supervisor's side of one ``upgrade --self``: its inputs, the exchange, the take-back.

The supervisor decides when a self-upgrade runs and applies its outcome (``handed-over``, an
exec in place, or failed and serving on); this object runs it against the supervisor's
collaborators (listeners, parked fds, generations, metrics) handed to it explicitly, and builds
the frozen ``SupervisorView`` the handover snapshots. Imported on use: the handover's models
cost ~1.5 MB the daemon need not carry until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import structlog

from ._errors import HandoffError
from ._handover import SupervisorView, exec_in_place, hand_over, undo_handover

if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from ._config import LoadedConfig
    from ._control import UpgradeReply
    from ._generation import ParkedFds
    from ._generation_set import GenerationSet
    from ._handover import ExecPlan, HandoverOutcome
    from ._held import HeldListeners
    from ._metrics import Metrics
    from ._systemd import SystemdNotifier
    from ._tickets import UpgradeTicket

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


@final
@dataclass
class SelfUpgrade:
    """One self-upgrade of a supervisor, with what it reads (never the supervisor itself)."""

    loaded: LoadedConfig
    environ: Mapping[str, str]
    systemd: SystemdNotifier
    held: HeldListeners
    parked: ParkedFds
    gens: GenerationSet
    metrics: Metrics
    control_path: Path | None

    @property
    def in_place(self) -> bool:
        """Whether it keeps our pid (see ``supervisor.self_upgrade``).

        Only systemd follows a new main pid (MAINPID=, which needs NOTIFY_SOCKET); anything
        else that started us (a shell's ``wait``, tini, runit, s6, supervisord, launchd) would
        see its child exit and think the service died.
        """
        mode = self.loaded.config.supervisor.self_upgrade
        if mode == "auto":
            return not self.environ.get("NOTIFY_SOCKET")
        return mode == "in-place"

    def view(self, last_upgrade: UpgradeReply | None) -> SupervisorView:
        """What the handover snapshots, as it is now (call it with the generations frozen)."""
        current = self.gens.current
        return SupervisorView(
            config_path=self.loaded.path,
            listeners=tuple(self.held.values()),
            parked=self.parked.items(),
            generations=tuple(self.gens.all()),
            current=current.number if current else None,
            next_generation=self.gens.next_number,
            retired_listeners=frozenset(self.held.retired),
            last_upgrade=last_upgrade,
            watchdog_interval=self.systemd.watchdog_interval,
            notify_socket=self.environ.get("NOTIFY_SOCKET") or None,
            metrics=self.metrics.dump(),
        )

    async def run(
        self, ticket: UpgradeTicket, last_upgrade: UpgradeReply | None
    ) -> HandoverOutcome:
        """The exchange (``_handover.hand_over``); unless a successor took charge, what it did is
        undone (MAINPID, pid file, staged socket) and the generations are thawed."""
        gens = self.gens.all()
        outcome: HandoverOutcome | None = None
        try:
            outcome = await hand_over(
                ticket,
                gens,
                lambda: self.view(last_upgrade),
                config_path=self.loaded.path,
                environ=self.environ,
                systemd=self.systemd,
                self_upgrade_timeout=self.loaded.config.supervisor.self_upgrade_timeout,
                generation=self.gens.number(),
                in_place=self.in_place,
                spawner=self.gens.spawner,
            )
        finally:
            if outcome is None or outcome.successor_pid is None:
                spawned = () if outcome is None else outcome.spawned
                pid_file = self.loaded.config.supervisor.pid_file
                undo_handover(self.control_path, spawned, self.systemd, pid_file)
                self.gens.thaw(gens)
        return outcome

    def exec(
        self,
        control: socket.socket,
        plan: ExecPlan,
        resend: Sequence[signal.Signals],
        last_upgrade: UpgradeReply | None,
    ) -> str | None:
        """Become the new executable in place; returns (only) why the exec failed."""
        try:
            exec_in_place(self.view(last_upgrade), control, plan, resend)
        except HandoffError as exc:
            log.error("upgrade.exec_failed", reason=str(exc))
            return str(exc)
        return None
