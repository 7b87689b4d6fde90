"""The process watcher for kernels without pidfds: kqueue on macOS/BSD, SIGCHLD + waitid elsewhere.

``PortableSpawner`` implements the ``_processes.Spawner`` seam. It starts workers exactly as the
pidfd spawner does (``_spawn.start_process``) and watches them in one of two ways:

- **kqueue** (macOS, the BSDs): ``EVFILT_PROC``/``NOTE_EXIT`` on trio's own kqueue
  (``trio.lowlevel.current_kqueue``/``wait_kevent``), as trio's own ``Process.wait`` does there.
  It watches any process by pid, so it also watches workers adopted after a self-upgrade.
  A child is reaped with a blocking ``waitpid`` after NOTE_EXIT: on macOS kqueue may report the
  exit a moment before ``waitpid(WNOHANG)`` can reap it (trio's note in ``_subprocess.py``).
- **waitid** (any other POSIX kernel, Linux before 5.4, or ``HANDOFF_PLATFORM=portable``): the
  reaper (``ChildReaper.sweep``, run on every SIGCHLD by handoffd's one signal task) calls
  ``waitid(P_PID, pid, WEXITED|WNOHANG)`` for each child it registered and sets that child's ``trio.Event``. It waits only for the pids it registered,
  so it never steals a status another wait owns. A process that is not our child cannot be
  watched this way: ``adopt`` refuses, and so does a self-upgrade (``handover_refusal``).

Signals go through ``os.kill(pid)``, only while the process is unreaped. A child that we have
not reaped keeps its pid even as a zombie, so signalling it cannot hit a recycled pid: this is as
race-free as a pidfd. An *adopted* worker (kqueue only) is reaped by someone else (its old
parent, or init/launchd once that parent exited): between its exit and our NOTE_EXIT its pid
could in principle be reused. macOS cycles pids up to 99,999, so that needs a full wrap of the pid
space within the event loop's latency; stated here rather than hidden.

A worker's tree is handled as with pidfds (``_spawn.signal_group`` and friends): it leads its
own process group, and ``signal_group`` signals the group only while its id cannot name another
group. Without a child subreaper (outside Linux) a worker's own children that outlive it go to
init/launchd; they keep the group id, so a group signal sent while the worker lives reaches them.

Reaping, one story per process: every worker pid whose status a watcher owns is in
``_spawn``'s tracked set (``track_child``), and ``_spawn.reap_orphans`` (on every SIGCHLD, in
``_startup``) reaps only the other children. ``_startup``'s signal task is the one SIGCHLD
receiver: on each SIGCHLD it first calls ``reap_children(spawner)``, which sweeps the waitid
watcher's children (``waitid`` per tracked pid) and sets their Events, then reaps orphans. A
second receiver would steal the signal (trio delivers it to the newest one only). Code that runs
a ``PortableSpawner`` without ``_startup`` (tests) runs ``ChildReaper.run`` in a nursery instead. The
kqueue watcher needs no reaper: each wait reaps its own child (tracked all the same).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, final

import structlog
import trio

from . import _platform
from ._errors import ProtocolError
from ._spawn import (
    DEFAULT_SPAWNER,
    attribute,
    deliver_signal,
    group_roots,
    signal_group,
    start_process,
    track_child,
    untrack_child,
    wait_group_exited,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._notify_access import Attribution, NotifySender
    from ._processes import Spawner, SpawnRequest

log: structlog.stdlib.BoundLogger = structlog.get_logger()

PortableWatcher = Literal["kqueue", "waitid"]

# Exit code for a process whose status we cannot know (adopted, or reaped by someone else).
_UNKNOWN_CODE: Final = 0


@final
@dataclass(eq=False)
class PortableProcess:
    """A worker watched without a pidfd: by kqueue, or by the SIGCHLD reaper (children only)."""

    pid: int
    is_child: bool
    returncode: int | None = None
    #: Never a pidfd here: nothing to hand over as an fd (the successor watches by pid).
    pidfd: int = -1
    #: Set by the reaper in the same step as ``returncode`` (waitid watcher only).
    exited: trio.Event | None = field(default=None, repr=False)

    async def wait(self) -> int:
        """Wait for the exit (reaping a child); returns the exit code, or -signal."""
        if self.returncode is not None:
            return self.returncode
        if self.exited is not None:
            await self.exited.wait()
        else:
            await _wait_kqueue_exit(self.pid)
            if self.returncode is None:  # nobody else finished it meanwhile
                self.returncode = _reap_blocking(self.pid) if self.is_child else _UNKNOWN_CODE
                untrack_child(self.pid)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal it by pid, only while unreaped (so never a recycled pid); a no-op after."""
        if self.returncode is not None:
            return
        deliver_signal(self.pid, sig, lambda: os.kill(self.pid, sig))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        signal_group(self, sig)

    def group_roots(self) -> list[int]:
        return group_roots(self)

    async def wait_group_exited(self) -> None:
        await wait_group_exited(self)

    def attribute(self, sender: NotifySender) -> Attribution:
        return attribute(self, sender)

    def close(self) -> None:
        """Nothing is held per process (no fd): letting go is forgetting."""


@final
class ChildReaper:
    """Reaps the waitid watcher's children on SIGCHLD and wakes their waiters."""

    def __init__(self) -> None:
        self._children: dict[int, PortableProcess] = {}

    def unreaped(self) -> frozenset[int]:
        """Pids registered and not yet reaped."""
        return frozenset(self._children)

    def register(self, process: PortableProcess) -> None:
        """Watch a child we just started (before any checkpoint: its SIGCHLD is not lost)."""
        process.exited = trio.Event()
        self._children[process.pid] = process
        track_child(process.pid)

    def sweep(self) -> None:
        """Reap every registered child that has exited; never another pid (sync: atomic)."""
        for pid in list(self._children):
            try:
                code = _reap_nowait(pid)
            except ChildProcessError:
                # Reaped behind our back (a waitpid(-1) elsewhere): its status is lost.
                log.warning("worker.reaped_elsewhere", pid=pid)
                code = _UNKNOWN_CODE
            if code is not None:
                process = self._children.pop(pid)
                untrack_child(pid)
                process.returncode = code
                assert process.exited is not None
                process.exited.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep on every SIGCHLD until cancelled, for a spawner used without ``_startup``."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.sweep()
            async for _ in signals:
                self.sweep()


@final
class PortableSpawner:
    """A ``Spawner`` without pidfds (see the module notes for the two watchers)."""

    def __init__(self, watcher: PortableWatcher) -> None:
        self.watcher: PortableWatcher = watcher
        self.reaper = ChildReaper()
        #: Why a self-upgrade cannot hand our workers over here (None: it can).
        self.handover_refusal: str | None = _platform.self_upgrade_refusal(watcher)

    def spawn(self, request: SpawnRequest) -> PortableProcess:
        pid = start_process(request)
        process = PortableProcess(pid=pid, is_child=True)
        if self.watcher == "waitid":
            self.reaper.register(process)
        else:
            track_child(pid)
        return process

    def adopt(self, pid: int, pidfd: int | None = None) -> PortableProcess:
        """Watch a worker a previous supervisor handed over (kqueue only).

        Raises:
            ProtocolError: the waitid watcher cannot watch a process that is not its child.
            ProcessLookupError: no process has this pid any more.
        """
        if pidfd is not None and pidfd >= 0:
            os.close(pidfd)  # a pidfd means nothing to this watcher
        if self.watcher == "waitid":
            raise ProtocolError(
                f"cannot adopt worker pid {pid}: "
                f"{_platform.self_upgrade_refusal('waitid') or 'not a child'}"
            )
        os.kill(pid, 0)  # ProcessLookupError if it is gone; PermissionError: alive, another uid
        return PortableProcess(pid=pid, is_child=False)


def select_spawner(
    environ: Mapping[str, str],
) -> tuple[Spawner, list[_platform.Degradation]]:
    """The spawner for this kernel (pidfds, else kqueue, else waitid) and what degrades.

    ``HANDOFF_PLATFORM=portable`` forces the portable watcher where pidfds exist.

    Raises:
        ValueError: ``HANDOFF_PLATFORM`` has an unknown value (the message names the choices).
    """
    watcher, why = _platform.choose_watcher(environ)
    spawner: Spawner = DEFAULT_SPAWNER if watcher == "pidfd" else PortableSpawner(watcher)
    return spawner, _platform.degradations(watcher, why)


def reap_children(spawner: Spawner) -> None:
    """On SIGCHLD: let a waitid watcher reap its children (a no-op for the others)."""
    if isinstance(spawner, PortableSpawner) and spawner.watcher == "waitid":
        spawner.reaper.sweep()


# ---- the platform calls, each behind a sys.platform guard (mypy checks both sides) ----


def _reap_nowait(pid: int) -> int | None:
    """Reap child ``pid`` if it has exited: its exit code (-signal); None while it runs.

    Raises:
        ChildProcessError: it is not (or no longer) our child.
    """
    if sys.platform == "darwin":  # no waitid(2) in Python on macOS
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None
    else:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
        if info is None or info.si_pid == 0:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _reap_blocking(pid: int) -> int:
    """Reap child ``pid`` that kqueue reported as exited (may block for a moment on macOS)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return _UNKNOWN_CODE
    return os.waitstatus_to_exitcode(status)


async def _wait_kqueue_exit(pid: int) -> None:
    """Wait for NOTE_EXIT of ``pid`` on trio's kqueue; returns at once if it is already gone."""
    if sys.platform != "linux" and sys.platform != "win32":
        import select

        kqueue = trio.lowlevel.current_kqueue()

        def event(flags: int) -> select.kevent:
            return select.kevent(
                pid, filter=select.KQ_FILTER_PROC, flags=flags, fflags=select.KQ_NOTE_EXIT
            )

        try:
            kqueue.control([event(select.KQ_EV_ADD | select.KQ_EV_ONESHOT)], 0)
        except ProcessLookupError:
            return  # exited already (a zombie, or reaped)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            kqueue.control([event(select.KQ_EV_DELETE)], 0)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_kevent(pid, select.KQ_FILTER_PROC, abort)
        return
    raise OSError(f"kqueue is not available on {sys.platform}; use the waitid watcher")
