"""What ``handoffd status`` and systemd's STATUS= say about a supervisor."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._control import ListenerInfo, StatusInfo, WorkerInfo
from ._platform import recorded
from ._version import version

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ._control import UpgradeReply
    from ._generation import Generation
    from ._listeners import Listener
    from ._phases import Phase


def status_text(
    phase: Phase,
    current: Generation | None,
    draining: Sequence[Generation],
    last_upgrade: UpgradeReply | None,
) -> str:
    """One line for systemd's STATUS=: the phase (outside steady state) and the workers."""
    if current is None:
        return "starting"
    ready = sum(1 for s in current.slots if s.state == "ready")
    text = f"generation {current.number}: {ready}/{len(current.slots)} workers ready"
    if draining:
        text += f", draining {', '.join(str(g.number) for g in draining)}"
    if last_upgrade is not None:
        text += f"; last upgrade {last_upgrade.outcome}"
    return text if phase in ("running", "starting") else f"{phase}: {text}"


def status_info(
    *,
    phase: Phase,
    config: Path,
    generations: Sequence[Generation],
    current: Generation | None,
    listeners: Sequence[Listener],
    parked: Sequence[tuple[str, int]],
    last_upgrade: UpgradeReply | None,
) -> StatusInfo:
    """The reply to a ``status`` request."""
    return StatusInfo(
        pid=os.getpid(),
        version=version(),
        config=str(config),
        state=phase,
        generation=current.number if current else 0,
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
            for g in generations
            for s in g.slots
        ],
        listeners=[
            ListenerInfo(name=li.name, address=li.bound_address(), fd=li.fd, origin=li.origin)
            for li in listeners
        ],
        parked=[name for name, _ in parked],
        draining_generations=[g.number for g in generations if g is not current],
        last_upgrade=last_upgrade,
        degraded=[d.text() for d in recorded()],
    )
