"""The readiness probe: one look at a worker's process tree, judged for a generation.

``_observe`` reads ``/proc`` and applies the readiness rule to one snapshot; this module adapts
it to what a generation needs while a worker starts and during the canary hold, behind a seam
(``ReadinessProbe``) so unit tests can say "accepting" for fake processes.

Design notes:
- **Polling.** ``/proc`` has no event for "this process now waits in accept": observation is the
  one polling loop the house style allows. A generation polls every ``POLL_INTERVAL`` seconds,
  only while one of its workers is starting or the generation is holding; an idle supervisor
  makes no wake-ups.
- **Inline, not in a thread.** One check of a 16-process tree costs about a millisecond
  (bench/RESULTS.md), i.e. 2% of one core at 20 Hz and only during an upgrade. Running it
  inline keeps it deterministic under trio's virtual clock in unit tests, and a ``/proc`` read
  cannot be cancelled in a worker thread anyway.
- **Stability.** A pre-forking server that forks its workers one by one may look ready before
  its last worker exists. The verdict ``accepting`` counts only once it held on polls at least
  ``STABLE_FOR`` seconds apart, with the same set of listener holders in the tree.
- **Snapshot memory.** accept/poll/select evidence is the syscall a thread is in *now*; a sync
  worker busy with a request (the new generation shares the accept queue with the old one, so
  it gets traffic at once) is not in accept. A process once seen waiting that still holds a
  listener keeps counting as waiting (``remembered``), as ``_observe`` advises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

from ._observe import judge_readiness, observe_tree, walk_tree

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._observe import ListenerKey, ProcessObservation, Verdict

# How often a starting or holding generation looks at its workers' trees (see module notes).
POLL_INTERVAL: Final = 0.05
# How long the verdict "accepting" must hold before a worker counts as ready (forking stagger).
STABLE_FOR: Final = 0.2


@final
@dataclass(frozen=True)
class TreeCheck:
    """One probe of one worker's tree.

    Attributes:
        verdict: ``accepting``, ``not-accepting`` or ``unobservable`` (see ``_observe``).
        reason: One sentence for the log and ``status``.
        holders: Pids holding at least one listener.
        waiters: Pids waiting on a listener, now or remembered.
        epoll: Some process has a listener registered for input in an epoll set right now (a
            registration persists while the loop is busy, unlike a syscall).
        waiting_now: Some process waits on a listener in this very snapshot.
    """

    verdict: Verdict
    reason: str
    holders: frozenset[int] = frozenset()
    waiters: frozenset[int] = frozenset()
    epoll: bool = False
    waiting_now: bool = False


class ReadinessProbe(Protocol):
    """Looks at the tree under ``roots`` (a worker and its group's reparented members)."""

    def __call__(
        self, roots: Sequence[int], keys: Mapping[int, ListenerKey], remembered: frozenset[int]
    ) -> TreeCheck:
        """Judge the tree; ``remembered`` are pids seen waiting before (see module notes)."""
        ...


def probe_proc(
    roots: Sequence[int], keys: Mapping[int, ListenerKey], remembered: frozenset[int]
) -> TreeCheck:
    """The default probe: the real ``/proc`` (``_observe``), with snapshot memory."""
    observation = observe_tree(walk_tree(roots), keys)
    if observation.unobservable is not None:
        readiness = judge_readiness(observation, keys)
        return TreeCheck(readiness.verdict, readiness.reason)
    procs: dict[int, ProcessObservation] = dict(observation.processes)
    epoll = any("epoll" in how for p in procs.values() for how in p.waits.values())
    waiting_now = any(p.waits for p in procs.values())
    for pid in remembered:
        seen = procs.get(pid)
        if seen is not None and seen.holds and not seen.waits:
            procs[pid] = dataclasses.replace(
                seen, waits={inode: frozenset({"accept"}) for inode in seen.holds}
            )
    judged = judge_readiness(dataclasses.replace(observation, processes=procs), keys)
    return TreeCheck(
        verdict=judged.verdict,
        reason=judged.reason,
        holders=frozenset(pid for pid, p in procs.items() if p.holds),
        waiters=frozenset(pid for pid, p in procs.items() if p.waits),
        epoll=epoll,
        waiting_now=waiting_now,
    )
