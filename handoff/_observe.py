"""Observed readiness: is a worker's process tree waiting for connections on our listeners?

handoffd holds the listening sockets, so it knows their inodes, and Linux shows in ``/proc`` what
every process does with its fds. A tree is *accepting* when its processes wait on those sockets.
This module reads that and judges it; it does no I/O other than ``/proc`` reads, keeps no state,
never blocks on anything but ``/proc``, and is synchronous, so a generation can call it directly
or from ``trio.to_thread.run_sync`` (one check of a 16-process tree costs about a millisecond, see
bench/RESULTS.md).

What counts as *waiting on* a listener, for one process (``ProcessObservation.waits``):

- **epoll** (asyncio, uvloop, Node/libuv, Go, gthread workers): an ``anon_inode:[eventpoll]`` fd
  whose ``/proc/PID/fdinfo/FD`` has a ``tfd:`` line with ``ino:`` (hex) equal to the listener's
  inode, ``sdev:`` its device (sockfs), and EPOLLIN or EPOLLRDNORM in ``events:``. This is a
  registration, not a syscall in progress: a loop that registered the listener accepts as soon as
  it is scheduled, so it counts even while the loop runs a callback. A disarmed EPOLLONESHOT entry
  has no event bits left and does not count.
- **accept/accept4** (blocking servers, gunicorn sync workers with one listener): some thread's
  ``/proc/PID/task/TID/syscall`` names accept with arg0 an fd of the listener.
- **poll/ppoll** and **select/pselect6** (gunicorn sync with several listeners, ``select.poll``):
  the ``struct pollfd`` array (arg0, nfds arg1) or the read ``fd_set`` (arg1, nfds arg0) is read
  from ``/proc/PID/mem``; a listener fd polled for POLLIN/POLLRDNORM or set in readfds counts.
- **recvfrom/recvmsg/recvmmsg/read** on a datagram listener (a UDP server blocked reading it).

Only listeners the process still holds count (``readlink /proc/PID/fd/*`` = ``socket:[INODE]``):
an epoll entry outlives the fd it was added with while another process (the supervisor) keeps the
socket open, but a process that closed its fd cannot accept. Listeners are matched by inode, never
by fd number, because servers dup them.

**The readiness rule** (``judge_readiness``), over one observation of the whole tree:

1. Nothing is judged from a tree that cannot be observed (not Linux, ``/proc`` missing): verdict
   ``unobservable``, and the caller falls back to READY=1.
2. A *holder* is a process holding at least one listener. A *leaf holder* is a holder none of
   whose descendants is a holder. Holders with holding descendants (gunicorn's arbiter, a wrapper
   shell that does not ``exec``, uvicorn's ``--workers`` supervisor) are exempt: they hold the
   sockets for their children.
3. At least ``min_waiting`` (default 1) processes must be waiting on a listener they hold.
4. Every leaf holder running the same executable (``/proc/PID/exe``) as some waiting process must
   itself be waiting on at least one listener: these are the siblings of a pre-forking server, so
   ``gunicorn -w 4`` is ready only when all four workers are, not the first one.
5. Leaf holders running an executable that no waiting process runs are *helpers* and exempt: the
   ``sleep 300`` of ``sh -c "sleep 300 & exec server"`` inherits fds 3.. and never waits on them;
   requiring it would block readiness forever.
6. Which listeners: a process needs to wait on *one* of those it holds, not all. uvicorn
   ``--fd 3`` serves one of two inherited sockets, so "every inherited listener" would never be
   met. Listeners nobody waits on are reported (``Readiness.idle_listeners``), not required.
7. If a process that rule 4 requires is not seen waiting and cannot be fully observed (permission
   denied on its ``/proc`` entries or memory, an io_uring fd: io_uring can accept with no syscall
   or epoll entry to see, an architecture whose syscall numbers are unknown), the verdict is
   ``unobservable`` with that reason instead of ``not-accepting`` that may never change.

Trade-offs of the rule, decided:

- *Why executables, not "ever waited".* Requiring only leaf holders that have once been seen
  waiting would call ``gunicorn -w 2`` ready on its first worker (the second, still importing the
  app, has never waited). The executable tells a pre-fork sibling (a fork, or a re-exec of the
  same interpreter as ``multiprocessing`` spawn does) from a helper, without timing. The cost: a
  helper running the *same* executable as the server (a Python sidecar under a Python server)
  that inherits the listeners and never waits blocks readiness until ``ready_timeout``. The
  reason then names its pid and executable; the fix is to close the fds for it (``3>&- 4>&-``).
  ``comm`` is not used: ``setproctitle`` (gunicorn) rewrites it per process.
- *A snapshot, not a history.* The accept/poll/select evidence is the syscall a thread is in at
  the instant of the read. An idle server at start-up sits in it; a sync worker busy with a
  request does not. So the verdict is reliable for start-up (no traffic yet for the new tree);
  a caller watching a tree under load (the hold) should treat a worker that was waiting and
  still holds the listener as serving, and fail only on exit or on holding no listener.
- *Forking servers that stagger.* A pre-fork master that forks its workers one by one (gunicorn
  sleeps up to 0.1 s between forks) may show one worker accepting before the next exists. The
  rule cannot know an unborn process; callers get ``min_waiting`` for a known worker count, and
  should require the verdict to hold over two polls (same waiting pids) a few hundred ms apart.
- *Shared epoll sets* (an epoll fd created before a fork) count for every process holding the
  listener and the epoll fd: the kernel cannot tell which one will call ``epoll_wait``.
- *Cost.* Only holders get their fdinfo, syscalls and memory read; other processes cost one
  ``listdir`` and a ``readlink`` per fd. Memory is read only for the fd numbers of listeners.

``/proc`` access: reading another process's ``fd``, ``fdinfo``, ``syscall`` and ``mem`` needs
ptrace access (proc(5), ptrace(2) "Ptrace access mode checking"): the same uid with Yama's
``/proc/sys/kernel/yama/ptrace_scope`` at 0 or 1 (1 allows descendants, which workers are), or
CAP_SYS_PTRACE (root). A denied read is reported as unobservable, never guessed.

All ``/proc`` reads go through a ``ProcReader``, so the parsing and the rule are tested against
recorded text (tests/unit/fixtures/observe/) without processes.

Example::

    keys = listener_keys({"http": listener.sock})
    readiness = check_readiness([worker.pid], keys)
    if readiness.verdict == "accepting": ...
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeVar, final

from ._pidfd import pidfd_getfd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

_T = TypeVar("_T")
SocketKind = Literal["stream", "datagram"]
WaitKind = Literal["epoll", "accept", "poll", "select", "recv", "serving"]
Verdict = Literal["accepting", "not-accepting", "unobservable"]

# epoll_ctl(2) and poll(2): the input bits. asm-generic/poll.h; x86 and arm64 use these values.
EPOLLIN: Final = 0x001
EPOLLRDNORM: Final = 0x040
POLLIN: Final = 0x001
POLLRDNORM: Final = 0x040
_INPUT_BITS: Final = POLLIN | POLLRDNORM
# struct pollfd is {int fd; short events; short revents;}: 8 bytes on every Linux ABI.
_POLLFD_SIZE: Final = 8
# A poll() or select() with more fds than this is not read from memory: a server's readiness
# never needs a megabyte copied out of another process (poll allows up to RLIMIT_NOFILE entries).
MAX_POLLED_FDS: Final = 65536
# ptrace(2): what a denied /proc read of another process means, said once.
_PTRACE_HINT: Final = (
    "it needs ptrace access: the same uid with kernel.yama.ptrace_scope <= 1, or CAP_SYS_PTRACE"
)
_GONE: Final = (FileNotFoundError, ProcessLookupError)
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]\Z")
_EPOLL_FIELD = re.compile(r"(\w+):\s*([0-9a-fA-F]+)")


@final
@dataclass(frozen=True, slots=True)
class ListenerKey:
    """How a held listener is recognised in other processes: its sockfs inode and device."""

    name: str
    inode: int
    dev: int
    kind: SocketKind
    #: A TCP listener's port: a connection with this local port in a process that holds the
    #: listener is one it accepted (``_accepted_connections``). None for other listeners.
    port: int | None = None


def listener_key(name: str, sock: socket.socket) -> ListenerKey:
    """The key of one held listener.

    Takes the socket object the supervisor already holds rather than a bare fd: building a
    ``socket.socket`` around an fd to ask its type would set O_NONBLOCK on the shared open file
    description whenever ``socket.setdefaulttimeout`` has been called (DESIGN.md, Pitfalls).
    """
    st = os.fstat(sock.fileno())
    kind: SocketKind = "stream" if sock.type == socket.SOCK_STREAM else "datagram"
    port: int | None = None
    if kind == "stream" and sock.family in (socket.AF_INET, socket.AF_INET6):
        port = int(sock.getsockname()[1])
    return ListenerKey(name=name, inode=st.st_ino, dev=st.st_dev, kind=kind, port=port)


def listener_keys(socks: Mapping[str, socket.socket]) -> dict[int, ListenerKey]:
    """Keys of the held listeners by inode, the form ``observe_tree`` takes.

    Args:
        socks: The held listening sockets by name.

    Returns:
        Inode to key.
    """
    keys = (listener_key(name, sock) for name, sock in socks.items())
    return {key.inode: key for key in keys}


class ProcReader(Protocol):
    """The ``/proc`` reads this module makes; paths are relative to ``/proc`` (``"42/fd"``).

    A missing entry raises ``FileNotFoundError`` or ``ProcessLookupError`` (the process or fd
    went away mid-scan), a denied one ``PermissionError``.
    """

    def unavailable(self) -> str | None:
        """Why ``/proc`` cannot be used on this host, or None when it can."""
        ...

    def listdir(self, path: str) -> list[str]: ...

    def readlink(self, path: str) -> str: ...

    def read_text(self, path: str) -> str: ...

    def read_mem(self, pid: int, address: int, size: int) -> bytes:
        """``size`` bytes of process ``pid``'s memory at ``address`` (``/proc/PID/mem``)."""
        ...


@final
class LinuxProc:
    """The real ``/proc``."""

    def __init__(self, root: str = "/proc") -> None:
        self._root = root

    def unavailable(self) -> str | None:
        if os.uname().sysname != "Linux":  # not sys.platform: mypy --platform darwin checks on
            return f"not Linux (sys.platform={sys.platform!r}): there is no /proc to observe"
        if not os.path.isdir(f"{self._root}/self/fd"):
            return f"{self._root} is not mounted or not readable"
        # /proc/PID/task/TID/children exists only with CONFIG_PROC_CHILDREN (proc(5)).
        if not os.path.exists(f"{self._root}/thread-self/children"):
            return f"this kernel has no {self._root}/PID/task/TID/children (CONFIG_PROC_CHILDREN)"
        return None

    def listdir(self, path: str) -> list[str]:
        return os.listdir(f"{self._root}/{path}")

    def readlink(self, path: str) -> str:
        return os.readlink(f"{self._root}/{path}")

    def read_text(self, path: str) -> str:
        with open(f"{self._root}/{path}", encoding="ascii", errors="replace") as f:
            return f.read()

    def read_mem(self, pid: int, address: int, size: int) -> bytes:
        fd = os.open(f"{self._root}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, address)
        finally:
            os.close(fd)


@final
@dataclass(frozen=True, slots=True)
class SyscallTable:
    """The syscall numbers that mean "waiting on an fd", for one architecture's native ABI."""

    arch: str
    accept: frozenset[int]
    recv: frozenset[int]
    poll: frozenset[int]
    select: frozenset[int]
    byteorder: Literal["little", "big"] = "little"
    word_size: int = 8  # sizeof(long): fd_set is an array of longs (select(2), __fd_mask)


# arch/x86/entry/syscalls/syscall_64.tbl (as installed: asm/unistd_64.h): read 0, poll 7,
# select 23, accept 43, recvfrom 45, recvmsg 47, pselect6 270, ppoll 271, accept4 288,
# recvmmsg 299. A 32-bit (ia32) process on an x86_64 kernel uses other numbers and is misread.
_X86_64: Final = SyscallTable(
    arch="x86_64",
    accept=frozenset({43, 288}),
    recv=frozenset({0, 45, 47, 299}),
    poll=frozenset({7, 271}),
    select=frozenset({23, 270}),
)
# include/uapi/asm-generic/unistd.h, used by arm64, riscv64 and loongarch64 (no poll, select or
# epoll_wait syscalls there): read 63, pselect6 72, ppoll 73, accept 202, recvfrom 207,
# recvmsg 212, accept4 242, recvmmsg 243.
_GENERIC_64: Final = SyscallTable(
    arch="generic",
    accept=frozenset({202, 242}),
    recv=frozenset({63, 207, 212, 243}),
    poll=frozenset({73}),
    select=frozenset({72}),
)
SYSCALL_TABLES: Final[Mapping[str, SyscallTable]] = {
    "x86_64": _X86_64,
    "aarch64": _GENERIC_64,
    "arm64": _GENERIC_64,
    "riscv64": _GENERIC_64,
    "loongarch64": _GENERIC_64,
}


@final
@dataclass(frozen=True, slots=True)
class ProcessObservation:
    """What one process does with the listeners.

    Attributes:
        pid: The process.
        parent: Its parent within the observed tree, None for a root.
        exe: ``readlink /proc/PID/exe``, None when unreadable (zombie, kernel thread, denied).
        holds: Inodes of the listeners it has an fd for.
        waits: For each held listener it waits on, how (a subset of ``holds``).
        uncertain: Why ``waits`` may be incomplete (permission, io_uring, unknown arch), or None.
    """

    pid: int
    parent: int | None
    exe: str | None
    holds: frozenset[int] = frozenset()
    waits: Mapping[int, frozenset[WaitKind]] = field(default_factory=dict)
    uncertain: str | None = None


@final
@dataclass(frozen=True, slots=True)
class TreeObservation:
    """One observation of a process tree. ``unobservable`` is set when nothing could be read."""

    processes: Mapping[int, ProcessObservation]
    unobservable: str | None = None

    def waiting(self) -> dict[int, frozenset[int]]:
        """For each listener inode somebody waits on, the pids waiting on it."""
        found: dict[int, set[int]] = {}
        for proc in self.processes.values():
            for inode in proc.waits:
                found.setdefault(inode, set()).add(proc.pid)
        return {inode: frozenset(pids) for inode, pids in found.items()}


@final
@dataclass(frozen=True, slots=True)
class Readiness:
    """The verdict of ``judge_readiness``, with what it was based on.

    Attributes:
        verdict: ``accepting``, ``not-accepting``, or ``unobservable`` (fall back to READY=1).
        reason: One sentence for the log and ``status``: why this verdict.
        waiting: Listener inode to the pids waiting on it.
        pending: Leaf holders the rule requires to wait that do not yet.
        idle_listeners: Names of listeners held in the tree that nobody waits on.
    """

    verdict: Verdict
    reason: str
    waiting: Mapping[int, frozenset[int]] = field(default_factory=dict)
    pending: frozenset[int] = frozenset()
    idle_listeners: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.verdict == "accepting"


def walk_tree(roots: Iterable[int], reader: ProcReader | None = None) -> dict[int, int | None]:
    """The roots and all their descendants, each mapped to its parent in the tree.

    Children come from ``/proc/PID/task/TID/children`` of every thread (each thread forks its own
    children). Roots may include processes the supervisor knows by other means (its process
    group, orphans reparented to it as subreaper); a root found below another root gets that
    parent. A process that exits mid-scan is left out; its children, reparented, are found only
    if they are roots.

    Args:
        roots: Pids to start from.
        reader: The ``/proc`` to read; the real one by default.

    Returns:
        Pid to parent pid (None for a root that is nobody's child in the tree).
    """
    proc = reader or LinuxProc()
    parents: dict[int, int | None] = dict.fromkeys(roots)
    stack = list(parents)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            tids = proc.listdir(f"{pid}/task")
        except _GONE:
            del parents[pid]
            continue
        for tid in tids:
            try:
                children = proc.read_text(f"{pid}/task/{tid}/children").split()
            except (*_GONE, PermissionError):
                continue
            for child in map(int, children):
                if child != pid and child not in _ancestors(pid, parents):
                    parents[child] = pid
                    stack.append(child)
    return parents


def process_tree(root_pid: int, reader: ProcReader | None = None) -> list[int]:
    """``root_pid`` and all its descendants (see ``walk_tree``)."""
    return list(walk_tree([root_pid], reader))


def _ancestors(pid: int, parents: Mapping[int, int | None]) -> set[int]:
    found: set[int] = set()
    parent = parents.get(pid)
    while parent is not None and parent not in found:
        found.add(parent)
        parent = parents.get(parent)
    return found


def parse_syscall(line: str) -> tuple[int, tuple[int, ...]] | None:
    """Parse ``/proc/PID/task/TID/syscall``: the syscall number and its six arguments.

    proc(5): the line is the number (decimal) and six arguments, stack and program counter (hex);
    ``running`` for a task on a CPU, ``-1 sp pc`` for one blocked outside a syscall. Both of
    those, and anything unparsable, give None.
    """
    fields = line.split()
    if len(fields) < 7 or not fields[0].isdigit():
        return None
    try:
        return int(fields[0]), tuple(int(arg, 16) for arg in fields[1:7])
    except ValueError:
        return None


def parse_epoll_targets(fdinfo: str) -> list[tuple[int, int, int]]:
    """The ``(inode, sdev, events)`` of each ``tfd:`` line of an eventpoll fd's fdinfo.

    fs/eventpoll.c ``ep_show_fdinfo``: ``tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx
    sdev:%x``. ``sdev`` is the kernel's internal dev_t (major << 20 | minor).
    """
    targets: list[tuple[int, int, int]] = []
    for line in fdinfo.splitlines():
        if not line.startswith("tfd:"):
            continue
        values = dict(_EPOLL_FIELD.findall(line))
        try:
            targets.append(
                (int(values["ino"], 16), int(values["sdev"], 16), int(values["events"], 16))
            )
        except (KeyError, ValueError):
            continue
    return targets


def polled_for_input(pollfds: bytes, fds: Iterable[int], table: SyscallTable) -> set[int]:
    """Which of ``fds`` the ``struct pollfd`` array asks POLLIN/POLLRDNORM for."""
    wanted = set(fds)
    found: set[int] = set()
    for offset in range(0, len(pollfds) - _POLLFD_SIZE + 1, _POLLFD_SIZE):
        fd = int.from_bytes(pollfds[offset : offset + 4], table.byteorder, signed=True)
        events = int.from_bytes(pollfds[offset + 4 : offset + 6], table.byteorder)
        if fd in wanted and events & _INPUT_BITS:
            found.add(fd)
    return found


def fd_set_size(nfds: int, table: SyscallTable) -> int:
    """Bytes of an ``fd_set`` covering fds below ``nfds``: whole longs, as the kernel copies."""
    bits = table.word_size * 8
    return (nfds + bits - 1) // bits * table.word_size


def selected_for_input(fd_set: bytes, fds: Iterable[int], table: SyscallTable) -> set[int]:
    """Which of ``fds`` are set in a read ``fd_set`` (an array of native longs)."""
    bits = table.word_size * 8
    found: set[int] = set()
    for fd in fds:
        start = fd // bits * table.word_size
        word = fd_set[start : start + table.word_size]
        if (
            len(word) == table.word_size
            and int.from_bytes(word, table.byteorder) >> (fd % bits) & 1
        ):
            found.add(fd)
    return found


@final
@dataclass(slots=True)
class _Scan:
    """The mutable state of one process's scan."""

    pid: int
    listener_fds: dict[int, int]  # fd -> listener inode
    waits: dict[int, set[WaitKind]] = field(default_factory=dict)
    uncertain: str | None = None

    def add(self, inode: int, how: WaitKind) -> None:
        self.waits.setdefault(inode, set()).add(how)

    def doubt(self, reason: str) -> None:
        if self.uncertain is None:
            self.uncertain = reason


def observe_tree(
    tree: Mapping[int, int | None],
    keys: Mapping[int, ListenerKey],
    reader: ProcReader | None = None,
    arch: str | None = None,
) -> TreeObservation:
    """Observe what every process of ``tree`` does with the listeners in ``keys``.

    Args:
        tree: Pid to parent, as ``walk_tree`` returns.
        keys: The held listeners by inode (``listener_keys``).
        reader: The ``/proc`` to read; the real one by default.
        arch: ``os.uname().machine`` of the host by default; picks the syscall numbers.

    Returns:
        One ``ProcessObservation`` per process still alive, or ``unobservable`` with the reason.
    """
    proc = reader or LinuxProc()
    reason = proc.unavailable()
    if reason is not None:
        return TreeObservation(processes={}, unobservable=reason)
    machine = arch or os.uname().machine
    table = SYSCALL_TABLES.get(machine)
    observed: dict[int, ProcessObservation] = {}
    for pid, parent in tree.items():
        seen = _observe_process(pid, parent, keys, proc, table, machine)
        if seen is not None:
            observed[pid] = seen
    return TreeObservation(processes=observed)


def _observe_process(
    pid: int,
    parent: int | None,
    keys: Mapping[int, ListenerKey],
    proc: ProcReader,
    table: SyscallTable | None,
    machine: str,
) -> ProcessObservation | None:
    try:
        exe: str | None = proc.readlink(f"{pid}/exe")
    except _GONE:
        exe = None  # a zombie or a kernel thread has no exe; a gone process fails below
    except PermissionError:
        exe = None
    try:
        fd_names = proc.listdir(f"{pid}/fd")
    except _GONE:
        return None
    except PermissionError:
        return ProcessObservation(
            pid, parent, exe, uncertain=f"cannot read /proc/{pid}/fd: {_PTRACE_HINT}"
        )
    scan = _Scan(pid, listener_fds={})
    sockets: list[int] = []  # fds of sockets that are not listeners (maybe accepted ones)
    epolls: list[int] = []
    io_uring: str | None = None
    for name in fd_names:
        try:
            target = proc.readlink(f"{pid}/fd/{name}")
        except _GONE:
            continue  # closed between listdir and readlink
        except PermissionError:
            scan.doubt(f"cannot read /proc/{pid}/fd/{name}: {_PTRACE_HINT}")
            continue
        match = _SOCKET_LINK.match(target)
        if match is not None:
            inode = int(match.group(1))
            if inode in keys:
                scan.listener_fds[int(name)] = inode
            else:
                sockets.append(int(name))
        elif target == "anon_inode:[eventpoll]":
            epolls.append(int(name))
        elif target == "anon_inode:[io_uring]":
            io_uring = name
    holds = frozenset(scan.listener_fds.values())
    if holds:
        if io_uring is not None:
            scan.doubt(
                f"pid {pid} has an io_uring fd ({io_uring}): io_uring can accept with no "
                "syscall or epoll registration that /proc shows"
            )
        for epfd in epolls:
            _scan_epoll(scan, epfd, keys, holds, proc)
        if table is None:
            scan.doubt(f"the syscall numbers of architecture {machine!r} are not known")
        else:
            _scan_syscalls(scan, keys, proc, table)
        if not scan.waits and sockets and isinstance(proc, LinuxProc):
            for inode in _accepted_connections(pid, sockets, keys, holds):
                scan.add(inode, "serving")
    return ProcessObservation(
        pid=pid,
        parent=parent,
        exe=exe,
        holds=holds,
        waits={inode: frozenset(how) for inode, how in scan.waits.items()},
        uncertain=scan.uncertain,
    )


def _accepted_connections(
    pid: int, fds: Sequence[int], keys: Mapping[int, ListenerKey], holds: frozenset[int]
) -> set[int]:
    """The held TCP listeners ``pid`` has accepted a connection from, and still holds it.

    A sync worker under load goes from one accepted connection to the next without blocking in
    accept or select (the queue it shares with the old generation is never empty): no syscall
    shows it waiting, yet it serves. A connection whose local port is a listener's, held by a
    process that also holds that listener, is that evidence. Seen through a copy of the fd
    (pidfd_getfd(2): the same ptrace access ``/proc/PID/mem`` already needs), closed at once:
    reading ``/proc/net/tcp`` instead races with connections that live a millisecond.
    """
    ports = {key.port: inode for inode, key in keys.items() if key.port and inode in holds}
    pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)
    # socket(fileno=) sets O_NONBLOCK when a default timeout is in force, and the copy shares
    # its file description with the worker's connection: then look at nothing.
    if not ports or pidfd_open is None or socket.getdefaulttimeout() is not None:
        return set()
    found: set[int] = set()
    try:
        pidfd = pidfd_open(pid)
    except OSError:
        return found
    try:
        for fd in fds[:_ACCEPTED_FDS_MAX]:
            try:
                copy = pidfd_getfd(pidfd, fd)
            except OSError:
                continue  # closed meanwhile, or no ptrace access: nothing is claimed
            try:
                sock = socket.socket(fileno=copy)
            except OSError:  # no longer a socket (the fd number was reused meanwhile)
                os.close(copy)
                continue
            try:
                with sock:
                    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == (
                        socket.SOCK_STREAM
                    ):
                        inode = ports.get(sock.getsockname()[1])
                        if inode is not None:
                            sock.getpeername()  # connected: OSError (ENOTCONN) otherwise
                            found.add(inode)
            except OSError:
                continue
    finally:
        os.close(pidfd)
    return found


# How many non-listener sockets of one process are looked at (a busy worker has a few).
_ACCEPTED_FDS_MAX: Final = 64


def _attempt(scan: _Scan, read: Callable[[str], _T], path: str) -> _T | None:
    """``read(path)``, or None when the process or fd went away or access is denied (noted)."""
    try:
        return read(path)
    except _GONE:
        return None
    except PermissionError:
        scan.doubt(f"cannot read /proc/{path}: {_PTRACE_HINT}")
        return None


def _scan_epoll(
    scan: _Scan, epfd: int, keys: Mapping[int, ListenerKey], holds: frozenset[int], proc: ProcReader
) -> None:
    fdinfo = _attempt(scan, proc.read_text, f"{scan.pid}/fdinfo/{epfd}")
    for inode, sdev, events in parse_epoll_targets(fdinfo or ""):
        key = keys.get(inode)
        if key is None or inode not in holds or not events & (EPOLLIN | EPOLLRDNORM):
            continue
        # An inode number is unique only within its filesystem: check the target is on sockfs.
        if (sdev >> 20, sdev & 0xFFFFF) == (os.major(key.dev), os.minor(key.dev)):
            scan.add(inode, "epoll")


def _scan_syscalls(
    scan: _Scan, keys: Mapping[int, ListenerKey], proc: ProcReader, table: SyscallTable
) -> None:
    for tid in _attempt(scan, proc.listdir, f"{scan.pid}/task") or ():
        line = _attempt(scan, proc.read_text, f"{scan.pid}/task/{tid}/syscall")
        parsed = None if line is None else parse_syscall(line)
        if parsed is not None:
            _classify(scan, parsed[0], parsed[1], keys, proc, table)


def _classify(
    scan: _Scan,
    number: int,
    args: tuple[int, ...],
    keys: Mapping[int, ListenerKey],
    proc: ProcReader,
    table: SyscallTable,
) -> None:
    if number in table.accept or number in table.recv:
        inode = scan.listener_fds.get(args[0])
        if inode is None:
            return
        if number in table.accept and keys[inode].kind == "stream":
            scan.add(inode, "accept")
        elif number in table.recv and keys[inode].kind == "datagram":
            scan.add(inode, "recv")
        return
    if number in table.poll:
        address, nfds = args[0], min(args[1], MAX_POLLED_FDS)
        memory = _read_mem(scan, proc, address, nfds * _POLLFD_SIZE)
        if memory is not None:
            for fd in polled_for_input(memory, scan.listener_fds, table):
                scan.add(scan.listener_fds[fd], "poll")
    elif number in table.select:
        nfds, address = min(args[0], MAX_POLLED_FDS), args[1]
        below = [fd for fd in scan.listener_fds if fd < nfds]
        if address == 0 or not below:
            return
        memory = _read_mem(scan, proc, address, fd_set_size(max(below) + 1, table))
        if memory is not None:
            for fd in selected_for_input(memory, below, table):
                scan.add(scan.listener_fds[fd], "select")


def _read_mem(scan: _Scan, proc: ProcReader, address: int, size: int) -> bytes | None:
    if size == 0:
        return None
    try:
        return proc.read_mem(scan.pid, address, size)
    except _GONE:
        return None
    except PermissionError:
        scan.doubt(f"cannot read /proc/{scan.pid}/mem: {_PTRACE_HINT}")
    except OSError as exc:
        # EIO/EFAULT: the process returned from the syscall and unmapped the array meanwhile.
        if exc.errno not in (errno.EIO, errno.EFAULT):
            raise
    return None


def judge_readiness(
    observation: TreeObservation, keys: Mapping[int, ListenerKey], *, min_waiting: int = 1
) -> Readiness:
    """Decide whether an observed tree is accepting, by the rule in the module docstring.

    Args:
        observation: What ``observe_tree`` saw.
        keys: The listeners the tree was given, by inode (for the names in the reason).
        min_waiting: How many processes must wait at least (a known worker count).

    Returns:
        The verdict, its reason, and the pids it rests on.
    """
    if observation.unobservable is not None:
        return Readiness(
            "unobservable", f"readiness cannot be observed: {observation.unobservable}"
        )
    procs = observation.processes
    waiting = observation.waiting()
    idle = tuple(
        sorted(
            keys[inode].name
            for inode in {i for p in procs.values() for i in p.holds}
            if inode not in waiting
        )
    )
    parents = {pid: p.parent for pid, p in procs.items()}
    holders = {pid for pid, p in procs.items() if p.holds}
    exempt = {a for pid in holders for a in _ancestors(pid, parents)}
    waiters = {pid for pid, p in procs.items() if p.waits}
    server_exes = {procs[pid].exe for pid in waiters}
    required = {pid for pid in holders - exempt if procs[pid].exe in server_exes or not waiters}
    pending = frozenset(pid for pid in required if not procs[pid].waits)
    doubtful = sorted(pid for pid in pending if procs[pid].uncertain is not None)
    # A process whose fd table could not be read may be a worker holding a listener unseen.
    unreadable = sorted(
        pid
        for pid, p in procs.items()
        if not p.holds
        and p.uncertain is not None
        and (not waiters or p.exe is None or p.exe in server_exes)
    )

    def verdict(verdict: Verdict, reason: str) -> Readiness:
        return Readiness(verdict, reason, waiting, pending, idle)

    if doubtful or unreadable:
        pid = (doubtful or unreadable)[0]
        return verdict("unobservable", f"readiness cannot be observed: {procs[pid].uncertain}")
    if not procs:
        return verdict("not-accepting", "no process of the tree is alive")
    if not holders:
        return verdict(
            "not-accepting", f"no process holds a listener yet: {_describe(procs, procs)}"
        )
    if len(waiters) < max(min_waiting, 1):
        return verdict(
            "not-accepting",
            f"{len(waiters)} waiting on a listener, at least {max(min_waiting, 1)} required; "
            f"holding one: {_describe(procs, holders)}",
        )
    if pending:
        return verdict(
            "not-accepting",
            f"{len(pending)} of {len(required)} worker processes not waiting on a listener yet: "
            f"{_describe(procs, pending)}",
        )
    names = ", ".join(sorted(keys[i].name for i in waiting if i in keys))
    return verdict("accepting", f"waiting on {names}: {_describe(procs, waiters)}")


def _describe(procs: Mapping[int, ProcessObservation], pids: Iterable[int]) -> str:
    return ", ".join(f"pid {pid} ({procs[pid].exe or '?'})" for pid in sorted(pids))


def check_readiness(
    roots: Iterable[int],
    keys: Mapping[int, ListenerKey],
    *,
    min_waiting: int = 1,
    reader: ProcReader | None = None,
) -> Readiness:
    """Walk, observe and judge a worker's tree in one call (what a generation polls).

    Args:
        roots: The worker's pid, plus any descendants known otherwise (its process group,
            orphans the subreaper adopted).
        keys: The held listeners by inode (``listener_keys``).
        min_waiting: How many processes must wait at least.
        reader: The ``/proc`` to read; the real one by default.

    Returns:
        The verdict; ``unobservable`` means fall back to READY=1 and say so.
    """
    proc = reader or LinuxProc()
    return judge_readiness(
        observe_tree(walk_tree(roots, proc), keys, proc), keys, min_waiting=min_waiting
    )
