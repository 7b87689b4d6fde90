"""The process watcher for kernels without pidfds: kqueue on macOS/BSD, SIGCHLD + waitid elsewhere.

``PortableSpawner`` implements the ``_processes.Spawner`` seam. It starts workers exactly as the
pidfd spawner does (``_spawn.start_process``) and watches them in one of two ways:

- **kqueue** (macOS, the BSDs): ``EVFILT_PROC``/``NOTE_EXIT`` on trio's own kqueue
  (``trio.lowlevel.current_kqueue``/``wait_kevent``), as trio's own ``Process.wait`` does there.
  It watches any process by pid, so it also watches workers adopted after a self-upgrade.
  A child is reaped with a blocking ``waitpid`` after NOTE_EXIT: on macOS kqueue may report the
  exit a moment before ``waitpid(WNOHANG)`` can reap it (trio's note in ``_subprocess.py``).
- **waitid** (any other POSIX kernel, Linux before 5.4, or ``HANDOFF_PLATFORM=portable``): one
  reaper task, woken by SIGCHLD, calls ``waitid(P_PID, pid, WEXITED|WNOHANG)`` for each child
  it registered and sets that child's ``trio.Event``. It waits only for the pids it registered,
  so it never steals a status another wait owns. A process that is not our child cannot be
  watched this way: ``adopt`` refuses, and so does a self-upgrade (``handover_refusal``).

Signals go through ``os.kill(pid)``, only while the process is unreaped. A child that we have
not reaped keeps its pid even as a zombie, so signalling it cannot hit a recycled pid: this is as
race-free as a pidfd. An *adopted* worker (kqueue only) is reaped by someone else (its old
parent, or init/launchd once that parent exited): between its exit and our NOTE_EXIT its pid
could in principle be reused. macOS cycles pids up to 99,999, so that needs a full wrap of the pid
space within the event loop's latency; stated here rather than hidden.

Without a child subreaper (outside Linux), a worker's own children that outlive it are re-parented
to init/launchd. Workers lead their own process group, so ``kill()`` SIGKILLs the worker's whole
group (the pgid is the unreaped worker's pid, reserved just as its pid is), and the SIGKILL that
ends a drain reaches the worker's children too.

Reaping, one story per process:
- pidfds: each ``WorkerProcess`` reaps its own child through its pidfd; as PID 1, ``_startup``'s
  SIGCHLD handler reaps every other child (``_spawn.unreaped_children`` are skipped).
- waitid: the reaper here owns SIGCHLD. It reaps the pids it registered and, when built with
  ``reap_orphans=True`` (PID 1, or a child subreaper), every other child too; ``_startup`` then
  opens no SIGCHLD receiver of its own (trio delivers a signal to one receiver only).
- kqueue: each process is waited for on its own; there is no orphan reaping (macOS has no
  subreaper, and handoffd is never PID 1 there).

The reaper is a trio *system task*, started by the first spawn: the spawner is built before any
nursery exists (it is a value in ``GenerationSpec``), and it must hear every SIGCHLD from the
first spawn on. It opens its signal receiver and then sweeps once, so a child that exited before
the receiver existed is still reaped. It never raises (a system task's exception would crash the
run): a failing ``waitid`` is logged and the child is treated as gone.
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
from ._spawn import DEFAULT_SPAWNER, deliver_signal, start_process

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from ._processes import Spawner

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
    #: Whether it leads its own process group (pgid == pid): ``kill()`` then ends the group.
    leads_group: bool
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
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal it by pid, only while unreaped (so never a recycled pid); a no-op after."""
        if self.returncode is not None:
            return
        deliver_signal(self.pid, sig, lambda: os.kill(self.pid, sig))

    def kill(self) -> None:
        """SIGKILL it, and its process group when it leads one (see the module notes)."""
        if self.returncode is not None:
            return
        if self.leads_group:
            deliver_signal(self.pid, signal.SIGKILL, lambda: os.killpg(self.pid, signal.SIGKILL))
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Nothing is held per process (no fd): letting go is forgetting."""


@final
class ChildReaper:
    """The one SIGCHLD-driven task that reaps our children and wakes their waiters."""

    def __init__(self, *, reap_orphans: bool = False) -> None:
        #: Also reap children nobody registered (PID 1 or a child subreaper adopts orphans).
        self.reap_orphans = reap_orphans
        self._children: dict[int, PortableProcess] = {}
        self._started = False

    def unreaped(self) -> frozenset[int]:
        """Pids registered and not yet reaped: an orphan reaper elsewhere must skip these."""
        return frozenset(self._children)

    def register(self, process: PortableProcess) -> None:
        """Watch a child we just started (before any checkpoint: its SIGCHLD is not lost)."""
        process.exited = trio.Event()
        self._children[process.pid] = process
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="handoff.reaper")

    async def _run(self) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.sweep()
            async for _ in signals:
                self.sweep()

    def sweep(self) -> None:
        """Reap every registered child that has exited (and orphans, with ``reap_orphans``)."""
        for pid in list(self._children):
            try:
                code = _reap_nowait(pid)
            except ChildProcessError:
                # Someone reaped it behind our back (a waitpid(-1) elsewhere): status lost.
                log.warning("worker.reaped_elsewhere", pid=pid)
                code = _UNKNOWN_CODE
            if code is not None:
                self._finish(pid, code)
        if self.reap_orphans:
            self._reap_orphans()

    def _finish(self, pid: int, code: int) -> None:
        process = self._children.pop(pid)
        process.returncode = code
        assert process.exited is not None
        process.exited.set()

    def _reap_orphans(self) -> None:
        while (pid := _next_exited_child()) is not None:
            if pid in self._children:
                code = _reap_nowait(pid)
                if code is not None:
                    self._finish(pid, code)
            else:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    return


@final
class PortableSpawner:
    """A ``Spawner`` without pidfds (see the module notes for the two watchers)."""

    def __init__(self, watcher: PortableWatcher, *, reap_orphans: bool = False) -> None:
        self.watcher: PortableWatcher = watcher
        self.reaper = ChildReaper(reap_orphans=reap_orphans)
        #: Why a self-upgrade cannot hand our workers over here (None: it can).
        self.handover_refusal: str | None = _platform.self_upgrade_refusal(watcher)

    def spawn(
        self,
        command: Sequence[str],
        *,
        environ: Mapping[str, str],
        fds: Sequence[int],
        set_listen_pid: bool,
        cwd: Path | None = None,
        own_process_group: bool = True,
    ) -> PortableProcess:
        pid = start_process(
            command,
            environ=environ,
            fds=fds,
            set_listen_pid=set_listen_pid,
            cwd=cwd,
            own_process_group=own_process_group,
        )
        process = PortableProcess(pid=pid, is_child=True, leads_group=own_process_group)
        if self.watcher == "waitid":
            self.reaper.register(process)
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
        try:
            leads_group = os.getpgid(pid) == pid
        except OSError:
            leads_group = False
        return PortableProcess(pid=pid, is_child=False, leads_group=leads_group)


def select_spawner(
    environ: Mapping[str, str], *, reap_orphans: bool = False
) -> tuple[Spawner, list[_platform.Degradation]]:
    """The spawner for this kernel (pidfds, else kqueue, else waitid) and what degrades.

    ``HANDOFF_PLATFORM=portable`` forces the portable watcher where pidfds exist.

    Raises:
        ValueError: ``HANDOFF_PLATFORM`` has an unknown value (the message names the choices).
    """
    watcher, why = _platform.choose_watcher(environ)
    spawner: Spawner = (
        DEFAULT_SPAWNER
        if watcher == "pidfd"
        else PortableSpawner(watcher, reap_orphans=reap_orphans)
    )
    return spawner, _platform.degradations(watcher, why)


def owns_sigchld(spawner: Spawner) -> bool:
    """Whether ``spawner`` reaps through SIGCHLD itself (then nobody else may receive it)."""
    return isinstance(spawner, PortableSpawner) and spawner.watcher == "waitid"


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


def _next_exited_child() -> int | None:
    """The pid of some exited child, left unreaped (``WNOWAIT``); None if there is none."""
    if sys.platform == "darwin":
        return None  # no waitid on macOS; and no orphans to reap there (see the module notes)
    else:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is None or info.si_pid == 0:
            return None
        return int(info.si_pid)


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
