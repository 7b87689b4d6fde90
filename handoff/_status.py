"""What ``handoffd status`` and systemd's STATUS= say about a supervisor.

``serving`` tells the truth for health checks: the current generation serves only when every
worker slot is ready with a live process and, in the observed readiness modes, each worker's
tree still holds a listener (a snapshot cannot tell a busy sync worker from an idle one, so
"not in accept right now" never counts as not serving). A slot in backoff, a crash loop, a
restart still starting: not serving, with the reason.

The trees and their RSS are read from ``/proc`` on each request (a status is rare; a few
``/proc`` reads per process).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from ._control import GenerationInfo, ListenerInfo, StatusInfo, WorkerInfo
from ._observe import walk_tree
from ._platform import recorded
from ._version import version

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ._control import UpgradeReply
    from ._generation import Generation, WorkerSlot
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
    serving, why = serving_now(current)
    trees = {id(s): _tree(s) for g in generations for s in g.slots}
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
                descendants=[p for p in trees[id(s)] if s.process is None or p != s.process.pid],
                readiness=f"READY=1 (fallback: {s.fallback})" if s.fallback else None,
                notify_rejected=s.notify_rejected,
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
        serving=serving,
        not_serving=why,
        generations=[
            GenerationInfo(
                number=g.number,
                rss_kib=sum(_rss_kib(p) for s in g.slots for p in trees[id(s)]),
                processes=sum(len(trees[id(s)]) for s in g.slots),
            )
            for g in generations
        ],
        degraded=[d.text() for d in recorded()],
    )


_STATE_WORDS: Final = {
    "backoff": "waiting to restart",
    "starting": "still starting",
    "exited": "not running",
}


def serving_now(current: Generation | None) -> tuple[bool, str | None]:
    """Whether the current generation serves, and why not (see the module docstring)."""
    if current is None:
        return False, "no generation is serving yet"
    for slot in current.slots:
        what = f"worker {slot.index} of generation {current.number}"
        if slot.state != "ready" or slot.process is None or slot.process.returncode is not None:
            after = f" after it {slot.last_exit}" if slot.last_exit else ""
            restarts = f" (restarted {slot.restarts} times)" if slot.restarts else ""
            return False, f"{what} is {_STATE_WORDS.get(slot.state, slot.state)}{after}{restarts}"
    if current.spec.program.observed:
        for slot in current.slots:
            if slot.accepting and slot.fallback is None:
                check = current.probe(slot)
                if check.verdict != "unobservable" and not check.holders:
                    return False, (
                        f"worker {slot.index} of generation {current.number} holds no listener: "
                        f"{check.reason}"
                    )
    return True, None


def generation_rss_kib(gen: Generation) -> int:
    """The sum of VmRSS over every process of the generation's worker trees, in KiB."""
    return sum(_rss_kib(p) for s in gen.slots for p in _tree(s))


def _tree(slot: WorkerSlot) -> list[int]:
    """The pids of the worker's tree (itself first while it lives)."""
    if slot.process is None:
        return []
    return list(walk_tree(slot.process.group_roots()))


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (proc(5) ``status``), 0 once it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
