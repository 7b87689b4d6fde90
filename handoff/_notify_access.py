"""Which process may speak for a worker on its ``NOTIFY_SOCKET``: its own process tree only.

Design notes:
- A worker's notify socket path is no secret: every process of the worker's uid can read it from
  ``/proc/PID/environ`` and send to it. So a datagram counts only when its sender is in the
  worker's tree (systemd's ``NotifyAccess=all`` judges by the unit's cgroup; handoffd has no
  cgroup of its own per worker and judges by the tree it signals and drains). The sender is the
  pid of ``SCM_CREDENTIALS``: unix(7), the kernel fills it in with the sender's process id, and
  only a sender with CAP_SYS_ADMIN may claim another pid (such a sender could ptrace the worker
  anyway). A datagram without credentials, or with pid 0 (a sender in a pid namespace we cannot
  see), never counts.
- The tree is the one ``_processes`` defines: the worker, its descendants, and the members of
  its process group reparented to handoffd (a child subreaper), with their descendants. It is
  judged upwards, from the sender: follow its parents (proc(5) ``stat`` field 4) until the
  worker (it belongs), or a child of handoffd that is in the worker's group and is not a worker
  itself (it belongs: an orphan of the worker's tree), or anything else (it does not). After
  reading a parent's ``stat``, the child's is read again: a process's parent changes when the
  parent exits, so an unchanged ppid proves the parent's entry was read while that pid still
  named it. A process that ``setpgid``s into the worker's group from outside (possible within
  one session) is still refused: its parents lead elsewhere.
- The sender's identity: ``SO_PASSPIDFD`` (Linux 6.5+) attaches a pidfd of the sender
  (``SCM_PIDFD``). Once the walk is done, the pidfd still naming the same pid (its fdinfo
  ``Pid:``) proves every ``/proc`` read was of the sender: a pid stays reserved until its
  process is reaped. Without a pidfd (older kernels), a sender that exited and whose pid was
  reused before its datagram was read could be mistaken for the new holder of its pid; that
  needs the pid space to wrap in the milliseconds a datagram waits, and is accepted.
- Senders that exited before their datagram was read:
  - not reaped yet (a zombie): ``/proc`` still shows its parent and group; judged as above.
  - reaped by handoffd (an orphan of the worker's group, reaped on SIGCHLD): handoffd keeps a
    short record of what it reaped (``ReapedOrphan``: pid, process group, pidfs inode), for
    ``REAPED_WINDOW`` seconds, and a gone sender counts when a record puts its pid in the worker's
    group. With a pidfd, the pidfs inode must match too, so a recycled pid never does (before
    Linux 6.9 every pidfd has the same inode, and the pid alone decides).
  - reaped by its own parent (a helper a worker's shell ran and waited for) before handoffd read
    its datagram: nothing left says where it was, so it is refused, and the log says how to fix
    it. systemd refuses these as well; that is why ``systemd-notify`` waits (``BARRIER=1``) until
    the manager has read its message unless given ``--no-block``. Send from a process that lives
    until then: ``systemd-notify`` without ``--no-block``, or the worker itself.
- A descendant that left the worker's group (``setsid``, the classic daemon double fork) and
  then lost its parent is reparented to handoffd but is no longer in the tree: drains neither
  signal nor wait for it, and its datagrams are refused like any other process's. While its
  parents lead up to the worker it is a descendant and counts.
- Outside Linux a datagram carries no credentials at all (macOS has no SCM_CREDENTIALS for
  datagram sockets): nothing can be judged, every datagram counts, and the notify sockets are
  guarded only by handoffd's 0700 runtime dir, which keeps other uids out but not our own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

if TYPE_CHECKING:
    from collections.abc import Sequence

# How long handoffd remembers an orphan it reaped, for a datagram the orphan sent just before it
# exited (normally read within milliseconds; a self-upgrade's freeze can hold it longer).
REAPED_WINDOW: Final = 10.0
# The most orphans remembered at once (a worker that forks and double-forks in a loop would
# otherwise grow the record without bound); the oldest go first.
REAPED_MAX: Final = 1024
# The deepest chain of parents followed from a sender (pid trees are rarely deeper than a few).
MAX_DEPTH: Final = 256
# A walk that saw a parent change under it is tried again this many times, then refused.
WALK_ATTEMPTS: Final = 3


@final
@dataclass(frozen=True, slots=True)
class NotifySender:
    """Who sent a notify datagram, from its ancillary data.

    ``pidfd`` is only valid while the datagram is judged (the receiver closes it after);
    ``reaped`` says the kernel could not make a pidfd because the sender was already reaped
    (Linux 6.5 to 6.16 put an error in ``SCM_PIDFD``; later kernels give a pidfd anyway).
    """

    pid: int
    uid: int | None = None
    pidfd: int | None = None
    inode: int | None = None
    reaped: bool = False
    #: Why this platform cannot say who sent it (no per-datagram credentials outside Linux).
    unverifiable: str | None = None


@final
@dataclass(frozen=True, slots=True)
class Attribution:
    """Whether a datagram's sender speaks for the worker; ``reason`` says how, or why not."""

    accepted: bool
    reason: str


@final
@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of proc(5) ``/proc/PID/stat`` the rule reads."""

    state: str
    ppid: int
    pgid: int


@final
@dataclass(frozen=True, slots=True)
class ReapedOrphan:
    """An orphan handoffd reaped: its pid, process group, pidfs inode, and when (monotonic)."""

    pid: int
    pgid: int | None
    inode: int | None
    at: float


@final
@dataclass(frozen=True, slots=True)
class WorkerTree:
    """What handoffd knows of one worker when it judges a datagram sent to its socket."""

    pid: int
    #: The pidfs inode of the worker's own pidfd (None when unknown).
    inode: int | None
    #: Not reaped yet: its pid cannot name another process.
    alive: bool
    supervisor_pid: int
    #: Every worker process handoffd spawned and has not reaped (never an orphan of a tree).
    workers: frozenset[int]
    reaped: Sequence[ReapedOrphan] = ()
    now: float = 0.0


class SenderFacts(Protocol):
    """The reads the rule makes (``/proc`` and pidfds; fakes in unit tests)."""

    def stat(self, pid: int) -> ProcStat | None:
        """``pid``'s stat, or None once it is gone (reaped) or unreadable."""
        ...

    def pidfd_pid(self, pidfd: int) -> int | None:
        """The pid ``pidfd`` names now: -1 once reaped, None when that cannot be read."""
        ...


def parse_stat(text: str) -> ProcStat | None:
    """Parse proc(5) ``stat``; the command (field 2) may hold spaces and ``)``, so split after
    its last ``)``. None for anything unparsable."""
    try:
        fields = text.rsplit(")", 1)[1].split()
        return ProcStat(state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]))
    except (IndexError, ValueError):
        return None


def parse_fdinfo_pid(text: str) -> int | None:
    """The ``Pid:`` line of a pidfd's fdinfo (-1 once the process is reaped)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Pid":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@final
class LinuxFacts:
    """The real ``/proc``."""

    def stat(self, pid: int) -> ProcStat | None:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                return parse_stat(f.read())
        except OSError:
            return None

    def pidfd_pid(self, pidfd: int) -> int | None:
        try:
            with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
                return parse_fdinfo_pid(f.read())
        except OSError:
            return None


LINUX_FACTS: Final = LinuxFacts()


def pidfd_inode(pidfd: int) -> int | None:
    """The pidfs inode of ``pidfd`` (unique per process since Linux 6.9), None on error."""
    try:
        return os.fstat(pidfd).st_ino
    except OSError:
        return None


def attribute_sender(
    sender: NotifySender, tree: WorkerTree, facts: SenderFacts = LINUX_FACTS
) -> Attribution:
    """Whether ``sender`` is in the worker's tree (see the module notes for the rule).

    Args:
        sender: The datagram's sender, its pidfd still open.
        tree: The worker the socket belongs to.
        facts: Where ``/proc`` and pidfds are read.

    Returns:
        Accepted with how the sender belongs, or refused with why (a phrase for the log).
    """
    if sender.unverifiable is not None:
        return Attribution(True, f"not judged: {sender.unverifiable}")
    if sender.pid <= 0:
        return Attribution(
            False, "it came without the sender's credentials (another pid namespace?)"
        )
    if _reaped(sender, facts):
        return _attribute_reaped(sender, tree)
    if sender.pid == tree.pid and tree.alive:
        return Attribution(True, "the worker")
    for _ in range(WALK_ATTEMPTS):
        verdict = _walk_up(sender, tree, facts)
        if verdict is None:
            continue  # a parent changed under the walk: look again
        if verdict.accepted and _reaped(sender, facts):
            # It was reaped during the walk: what was read may be another process's.
            return _attribute_reaped(sender, tree)
        return verdict
    return Attribution(
        False, f"its parents kept changing while pid {sender.pid} was traced to the worker"
    )


def _reaped(sender: NotifySender, facts: SenderFacts) -> bool:
    if sender.reaped:
        return True
    if sender.pidfd is None:
        return False
    return facts.pidfd_pid(sender.pidfd) == -1


def _walk_up(sender: NotifySender, tree: WorkerTree, facts: SenderFacts) -> Attribution | None:
    """Follow the sender's parents to a verdict; None when a parent changed under the walk."""
    chain = [sender.pid]
    current = facts.stat(sender.pid)
    if current is None:
        # No pidfd said it was reaped, but /proc has no such process: it was, meanwhile.
        return _attribute_reaped(sender, tree)
    while len(chain) <= MAX_DEPTH:
        child = chain[-1]
        if child == tree.pid:
            if not tree.alive:
                return Attribution(False, "the worker has exited and its pid names no one")
            return Attribution(True, f"a descendant of the worker ({_path(chain)})")
        if current.ppid == tree.supervisor_pid:
            if child in tree.workers:
                return Attribution(False, f"it is another worker (pid {child}), not this one")
            if current.pgid != tree.pid:
                return _outside_group(
                    f"{_path(chain)} was reparented to handoffd", current.pgid, tree
                )
            return Attribution(
                True,
                f"a member of the worker's process group reparented to handoffd ({_path(chain)})",
            )
        if current.ppid <= 1:
            return Attribution(
                False, f"it is not in the worker's tree (its parents: {_path(chain)} → init)"
            )
        parent = facts.stat(current.ppid)
        again = facts.stat(child)
        if parent is None or again is None or again.ppid != current.ppid:
            return None
        chain.append(current.ppid)
        current = parent
    return Attribution(False, f"its parents are more than {MAX_DEPTH} deep: {_path(chain[:4])} …")


def _attribute_reaped(sender: NotifySender, tree: WorkerTree) -> Attribution:
    """A sender that was reaped before its datagram was judged: only handoffd's own records of
    the orphans it reaped can place it (see the module notes)."""
    for orphan in reversed(tree.reaped):
        if orphan.pid != sender.pid or tree.now - orphan.at > REAPED_WINDOW:
            continue
        if sender.inode is not None and orphan.inode is not None and sender.inode != orphan.inode:
            continue  # the same pid, another process
        if orphan.pgid != tree.pid:
            return _outside_group(f"pid {orphan.pid} was reaped by handoffd", orphan.pgid, tree)
        return Attribution(
            True,
            f"a member of the worker's process group that handoffd reaped "
            f"{max(tree.now - orphan.at, 0.0):.3f}s before its message was read",
        )
    if sender.pid == tree.pid and sender.inode is not None and sender.inode == tree.inode:
        return Attribution(True, "the worker (exited since)")
    return Attribution(
        False,
        f"pid {sender.pid} had exited and been reaped before its message was read, so nothing "
        "shows it was in the worker's tree; send from a process that lives until the message is "
        "read (systemd-notify without --no-block waits for that, or send from the worker itself)",
    )


def _outside_group(what: str, pgid: int | None, tree: WorkerTree) -> Attribution:
    return Attribution(
        False,
        f"it is not in the worker's tree: {what} from process group {pgid}, not the worker's "
        f"({tree.pid}); a descendant that left the worker's group (setsid) and lost its parent "
        "is not part of the tree",
    )


def _path(chain: Sequence[int]) -> str:
    return " → ".join(str(pid) for pid in chain)
