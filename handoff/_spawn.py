"""Start one worker process with the fd set at 3.. and watch it through a pidfd.

Design notes:
- ``os.posix_spawn`` (vfork+exec) instead of ``subprocess``: no ``preexec_fn`` in a threaded
  parent, and no Python running between fork and exec.
- ``LISTEN_PID`` must be the worker's own pid, known only after the fork. The worker is started
  through ``/bin/sh -c 'LISTEN_PID=$$ ... exec "$@"'``: the shell's pid is the pid the worker's
  program keeps after ``exec``, which is what sd_listen_fds(3) compares against.
- posix_spawn, unlike subprocess, keeps Python's SIG_IGN for SIGPIPE and SIGXFSZ in the child:
  they are reset with ``setsigdef``, and the signal mask is emptied.
- Each fd is first duplicated to a number above the target range, then dup2'ed to 3+i, so a
  source fd that happens to sit in 3..3+n can never be overwritten before it is copied.
- Workers get their own process group: a Ctrl-C in handoffd's terminal reaches handoffd, which
  drains them, instead of killing every worker at once.
- The pidfd gives a wait that is an fd (``wait_readable``) and signals that cannot hit a
  recycled pid.
- A worker's tree: handoffd is a child subreaper (prctl(2) ``PR_SET_CHILD_SUBREAPER``), so a
  descendant whose parent dies becomes our child instead of init's, keeps the worker's process
  group id (the worker's pid), and is reaped by ``reap_orphans`` (on SIGCHLD). A worker's own
  pid is never reaped there: its pidfd wait owns its exit status.
- Group signals and pid reuse: ``killpg(pid)`` is only sent while the group id cannot name
  another group. While the leader is not reaped (alive or a zombie we have not waited for) its
  pid, hence the group id, is reserved; once it is reaped, only while a member of the group is
  our child that we have not reaped (alive or zombie), which holds the group id as well.
  An adopted worker (a self-upgrade; not our child) is signalled through its pidfd only.
- Worker settings (``WorkerSettings``, from ``[program]``): posix_spawn can set neither a
  working directory, rlimits, a umask nor the user, so the shim does them, in this order:
  ``cd``, ``ulimit -n``/``-c`` (both soft and hard, as systemd's ``LimitNOFILE=`` does), ``umask``,
  then ``exec setpriv --reuid U --regid G --init-groups|--clear-groups -- command``: the
  directory and the limits are applied while still root (raising a hard limit needs it),
  and setpriv(1) execs, so ``LISTEN_PID=$$`` is still the final program's pid and the process
  group is still the one posix_spawn made. What can be checked before spawning (not root, a
  limit above what we may grant, a missing directory) fails with the setting named
  (``SpawnError``); a shim step that still fails prints the setting to the worker's stderr and
  exits 126.
- ``memory`` needs a cgroup per worker, which this version does not create: a configured one
  fails every spawn with that sentence rather than being ignored. RLIMIT_AS was not taken as a
  fallback: it bounds address space, not memory, and runtimes that reserve far more than they
  use (Go, the JVM, glibc's per-thread arenas, ASan) fail under a limit sized to their RSS.
- ``stdout``/``stderr``: fds (pipes of ``_output``) dup2'ed to 1 and 2, staged like the fd set.
- Notify access (``WorkerProcess.attribute``, the rule in ``_notify_access``): a datagram on a
  worker's notify socket counts only from the worker's tree. ``reap_orphans`` remembers what it
  reaped (pid, process group, pidfs inode) for ``REAPED_WINDOW``, so an orphan of the tree that
  sent a datagram and exited, and was reaped before the datagram was read, still counts.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._errors import SpawnError
from ._notify_access import (
    LINUX_FACTS,
    REAPED_MAX,
    REAPED_WINDOW,
    ReapedOrphan,
    WorkerTree,
    attribute_sender,
    pidfd_inode,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from ._notify_access import Attribution, NotifySender
    from ._processes import ProcessHandle, SpawnRequest, WorkerSettings

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# sh(1) exec shim: export LISTEN_PID as the shell's own pid, then become the worker.
_SHIM: Final = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
#: Set in a worker's environment, the shim lowers its soft RLIMIT_NOFILE to this (see _limits).
NOFILE_ENV: Final = "HANDOFF_NOFILE"
_NOFILE_SHIM: Final = f'ulimit -S -n "${NOFILE_ENV}" || exit 126; unset {NOFILE_ENV}; '
_SHELL: Final = "/bin/sh"
# dash(1)'s and bash(1)'s ``ulimit -c`` count 512-byte blocks.
_CORE_BLOCK: Final = 512
# Signals Python leaves as SIG_IGN, which exec would otherwise pass on to the worker.
_RESET_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)
# prctl(2): become the reaper of orphaned descendants (linux/prctl.h).
PR_SET_CHILD_SUBREAPER: Final = 36


# Children we spawned and have not reaped yet. As PID 1, handoffd also reaps orphans it did not
# spawn; it must never reap these, or their exit status would be lost to their pidfd wait.
_unreaped: set[int] = set()


def unreaped_children() -> frozenset[int]:
    """Pids of workers this process spawned and has not reaped (see ``_unreaped``)."""
    return frozenset(_unreaped)


# The orphans reap_orphans reaped lately, oldest first (see the module notes on notify access).
_reaped: collections.deque[ReapedOrphan] = collections.deque(maxlen=REAPED_MAX)


def recently_reaped() -> tuple[ReapedOrphan, ...]:
    """The orphans reaped within ``REAPED_WINDOW``, oldest first."""
    now = time.monotonic()
    while _reaped and now - _reaped[0].at > REAPED_WINDOW:
        _reaped.popleft()
    return tuple(_reaped)


def _inode_of(pid: int) -> int | None:
    """The pidfs inode of our unreaped child ``pid`` (a zombie still has its pid), or None."""
    try:
        pidfd = _pidfd_open(pid)
    except OSError:
        return None
    try:
        return pidfd_inode(pidfd)
    finally:
        os.close(pidfd)


# Replaced (after being set) whenever reap_orphans reaped something: one Event per occurrence.
_orphans_reaped: trio.Event | None = None


def _reaped_event() -> trio.Event:
    global _orphans_reaped
    if _orphans_reaped is None:
        _orphans_reaped = trio.Event()
    return _orphans_reaped


def become_subreaper() -> str | None:
    """Make handoffd the reaper of its workers' orphans; returns why not, or None.

    Linux only (prctl(2) ``PR_SET_CHILD_SUBREAPER``, since 3.4). Elsewhere orphans go to init
    and a generation's tree is what its process groups still hold.
    """
    if os.uname().sysname != "Linux":  # not sys.platform: mypy --platform darwin checks on
        return f"{sys.platform} has no PR_SET_CHILD_SUBREAPER"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"cannot load the C library: {exc}"
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}"
    return None


def _our_children() -> set[int]:
    """Our children, from ``/proc/self/task/*/children`` (each thread has its own)."""
    children: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return children


def process_group_of(pid: int) -> int | None:
    """The process group id of ``pid`` (proc(5) ``stat`` field 5), None once it is gone."""
    stat = LINUX_FACTS.stat(pid)
    return stat.pgid if stat is not None else None


def group_orphans(pgid: int) -> list[int]:
    """Our children in process group ``pgid`` other than workers: reparented descendants."""
    return sorted(pid for pid in _our_children() - _unreaped if process_group_of(pid) == pgid)


def reap_orphans() -> list[tuple[int, int | None]]:
    """Reap exited children that are not workers; returns (pid, process group) of each.

    Workers (every child we spawned and have not reaped, including those of a generation still
    starting) are reaped through their pidfds; waiting on them here would steal their status.
    """
    reaped: list[tuple[int, int | None]] = []
    for pid in sorted(_our_children() - _unreaped):
        group = process_group_of(pid)
        inode = _inode_of(pid)
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done == pid:
            reaped.append((pid, group))
            _reaped.append(ReapedOrphan(pid, group, inode, time.monotonic()))
    if reaped:
        global _orphans_reaped
        _reaped_event().set()
        _orphans_reaped = trio.Event()
    return reaped


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning(
            "worker.signal_refused",
            process_group=pgid,
            signal=sig,
            hint="a process of the group became another user; run handoffd as root",
        )


@final
@dataclass(eq=False)
class WorkerProcess:
    """A running (or exited) worker, owned through its pidfd."""

    pid: int
    pidfd: int
    is_child: bool = True
    returncode: int | None = None
    #: The pidfs inode of its pidfd (see ``attribute``), read once while the pidfd is open.
    inode: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.inode = pidfd_inode(self.pidfd) if self.pidfd >= 0 else None

    async def wait(self) -> int:
        """Wait for the exit and reap it; returns the exit code, or -signal when killed."""
        if self.returncode is not None:
            return self.returncode
        await trio.lowlevel.wait_readable(self.pidfd)
        return self._reap()

    def _reap(self) -> int:
        code = 0
        if self.is_child:
            code = _reap_pidfd(self.pidfd)
            untrack_child(self.pid)
        self.returncode = code
        self.close()
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the worker; a no-op once it has exited (the pidfd prevents pid reuse races)."""
        if self.returncode is not None:
            return
        deliver_signal(self.pid, sig, lambda: _pidfd_send_signal(self.pidfd, sig))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        signal_group(self, sig)

    def group_roots(self) -> list[int]:
        return group_roots(self)

    def attribute(self, sender: NotifySender) -> Attribution:
        return attribute(self, sender, self.inode)

    async def wait_group_exited(self) -> None:
        await wait_group_exited(self)

    def close(self) -> None:
        if self.pidfd >= 0:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1


def _fail_step(command: str, setting: str) -> str:
    """A shim step that, when it fails, says which setting could not be applied."""
    return f'{command} || {{ echo "handoffd: cannot apply {setting}" >&2; exit 126; }}; '


def build_shim(
    *,
    cwd: Path | None,
    inherited_nofile: bool,
    settings: WorkerSettings,
    set_listen_pid: bool,
) -> tuple[str, list[str]] | None:
    """The ``sh -c`` script and the argv words before the command; None: exec it directly.

    Numbers are written into the script (they are ints); paths travel as arguments.
    """
    script = ""
    before: list[str] = []
    if cwd is not None:
        script += _fail_step('cd "$1"', "program.working_dir") + "shift; "
        before.append(str(cwd))
    if settings.nofile is not None:
        script += _fail_step(f"ulimit -n {int(settings.nofile)}", "program.nofile")
        script += f"unset {NOFILE_ENV}; "
    elif inherited_nofile:
        script += _NOFILE_SHIM
    if settings.core is not None:
        if settings.core == resource.RLIM_INFINITY:
            blocks = "unlimited"
        else:
            blocks = str(-(-int(settings.core) // _CORE_BLOCK))
        script += _fail_step(f"ulimit -c {blocks}", "program.core")
    if settings.umask is not None:
        script += _fail_step(f"umask {int(settings.umask):04o}", "program.umask")
    if settings.switches_identity:
        before.append(settings.setpriv)
        if settings.uid is not None:
            before.append(f"--reuid={int(settings.uid)}")
        if settings.gid is not None:
            before.append(f"--regid={int(settings.gid)}")
        before += ["--init-groups" if settings.user_name is not None else "--clear-groups", "--"]
    if not script and not before and not set_listen_pid:
        return None
    return script + (_SHIM if set_listen_pid else 'exec "$@"'), before


def check_settings(settings: WorkerSettings, cwd: Path | None) -> None:
    """Refuse, before spawning, a setting that cannot be applied; naming it and the fix.

    Raises:
        SpawnError: not root for ``user``/``group``, a limit above what we may grant, a
            ``memory`` limit (no per-worker cgroup), a missing ``working_dir``.
    """
    root = os.geteuid() == 0
    if settings.switches_identity and not root:
        raise SpawnError(
            f"{settings.identity_setting}: handoffd runs as uid {os.geteuid()}, not as root, so "
            "it cannot start workers as another user; run handoffd as root (it binds the "
            "listeners, then starts the workers unprivileged), or remove program.user and "
            "program.group"
        )
    if settings.memory is not None:
        raise SpawnError(
            f"program.memory = {settings.memory}: this handoffd cannot apply it: a memory limit "
            "needs a cgroup per worker, which it does not create; remove program.memory and "
            "limit the whole service instead (systemd's MemoryMax=, docker run --memory)"
        )
    if settings.nofile is not None:
        _check_limit("program.nofile", resource.RLIMIT_NOFILE, settings.nofile, root)
        try:
            with open("/proc/sys/fs/nr_open") as f:
                nr_open = int(f.read())
        except (OSError, ValueError):
            nr_open = None
        if nr_open is not None and settings.nofile > nr_open:
            raise SpawnError(
                f"program.nofile = {settings.nofile} is above the kernel's maximum "
                f"(fs.nr_open = {nr_open}); lower it"
            )
    if settings.core is not None:
        _check_limit("program.core", resource.RLIMIT_CORE, settings.core, root)
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(
            f"program.working_dir = {str(cwd)!r} is not a directory; create it or fix the path"
        )


def _check_limit(setting: str, which: int, value: int, root: bool) -> None:
    _, hard = resource.getrlimit(which)
    above = hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard)
    if above and not root:
        shown = "unlimited" if value == resource.RLIM_INFINITY else value
        raise SpawnError(
            f"{setting} = {shown} is above handoffd's hard limit ({hard}), which only root may "
            "raise; lower it, or raise the limit handoffd is started with (systemd's Limit*=)"
        )


# The tree of a worker, for every watcher (pidfds here, ``_portable`` elsewhere): the handle
# only supplies pid, is_child, returncode and send_signal.


def signal_group(process: ProcessHandle, sig: int) -> None:
    """Signal the worker's process group (see the module notes on pid reuse)."""
    if not process.is_child:
        process.send_signal(sig)
    elif process.returncode is None:
        left_group = process_group_of(process.pid) not in (process.pid, None)
        _killpg(process.pid, sig)
        if left_group:  # the worker moved to another group; its old one got the signal
            process.send_signal(sig)
    elif group_orphans(process.pid):
        _killpg(process.pid, sig)


def group_roots(process: ProcessHandle) -> list[int]:
    """The worker (while it lives) and the members of its group reparented to us."""
    alive = [process.pid] if process.returncode is None else []
    return alive + (group_orphans(process.pid) if process.is_child else [])


def attribute(
    process: ProcessHandle, sender: NotifySender, inode: int | None = None
) -> Attribution:
    """Whether ``sender`` is in the worker's tree (``_notify_access``'s rule, real /proc);
    ``inode``: the pidfs inode of the worker's pidfd, where there is one."""
    tree = WorkerTree(
        pid=process.pid,
        inode=inode,
        alive=process.returncode is None,
        supervisor_pid=os.getpid(),
        workers=frozenset(_unreaped),
        reaped=recently_reaped(),
        now=time.monotonic(),
    )
    return attribute_sender(sender, tree)


async def wait_group_exited(process: ProcessHandle) -> None:
    """Wait (on ``reap_orphans``, driven by SIGCHLD) until the group has no member left."""
    await trio.lowlevel.checkpoint()
    while process.is_child:
        reaped = _reaped_event()
        if not group_orphans(process.pid):
            return
        await reaped.wait()


def track_child(pid: int) -> None:
    """A worker whose exit status a watcher owns: ``reap_orphans`` must never reap it."""
    _unreaped.add(pid)


def untrack_child(pid: int) -> None:
    """Its watcher reaped it."""
    _unreaped.discard(pid)


def deliver_signal(pid: int, sig: int, send: Callable[[], None]) -> None:
    """Run ``send`` (which signals ``pid``); a process already gone is no error, nor a refusal.

    A worker that became another user (setuid) cannot be signalled by a non-root handoffd; a
    drain then ends with its timeout. Never an error that ends the daemon.
    """
    try:
        send()
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning(
            "worker.signal_refused",
            pid=pid,
            signal=sig,
            hint="run handoffd as root, or keep the worker's uid",
        )


# The Linux-only calls, each guarded so that the module type-checks (and imports) elsewhere.
def _pidfd_open(pid: int) -> int:
    if sys.platform == "linux":
        return os.pidfd_open(pid)
    raise OSError(errno.ENOSYS, f"pidfd_open(2) is Linux only (this is {sys.platform})")


def _pidfd_send_signal(pidfd: int, sig: int) -> None:
    if sys.platform == "linux":
        signal.pidfd_send_signal(pidfd, sig)
        return
    raise OSError(errno.ENOSYS, f"pidfd_send_signal(2) is Linux only (this is {sys.platform})")


def _reap_pidfd(pidfd: int) -> int:
    """waitid(P_PIDFD): the exit code, or -signal; 0 when someone else reaped it."""
    if sys.platform == "linux":
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        except ChildProcessError:
            return 0
        if info is None:
            return 0
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    raise OSError(errno.ENOSYS, f"waitid(P_PIDFD) is Linux only (this is {sys.platform})")


def describe_exit(code: int) -> str:
    """``exited with status 3`` / ``was killed by SIGKILL``, plus a hint for 126/127."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    hint = {126: " (command not executable)", 127: " (command not found)"}.get(code, "")
    return f"exited with status {code}{hint}"


def resolve_command(command: Sequence[str], environ: Mapping[str, str], cwd: Path | None) -> str:
    """The executable ``command[0]`` names, checked before spawning for a clear error.

    Raises:
        SpawnError: naming the command and where it was looked for.
    """
    program = command[0]
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else str(cwd / program)
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            raise SpawnError(
                f"program.command[0]: {program!r} is not an executable file; fix the path in "
                "the config"
            )
        return path
    found = shutil.which(program, path=environ.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(
            f"program.command[0]: {program!r} was not found on PATH "
            f"({environ.get('PATH', os.defpath)}); install it or give its absolute path"
        )
    return found


def start_process(request: SpawnRequest) -> int:
    """Start ``request``'s process (see ``SpawnRequest``) and return its pid; the caller watches
    it. Shared by every process watcher (pidfds here, ``_portable`` elsewhere); ``settings``
    are applied by the shim (see the module notes).

    Raises:
        SpawnError: the command cannot be found or started, or a setting cannot be applied
            (naming it).
    """
    command, fds, cwd, settings = request.command, request.fds, request.cwd, request.settings
    set_listen_pid, own_process_group = request.set_listen_pid, request.own_process_group
    check_settings(settings, cwd)
    resolve_command(command, request.environ, cwd)
    environ = dict(request.environ)
    if settings.nofile is not None:
        environ.pop(NOFILE_ENV, None)
    first_free = 3 + len(fds)
    staged: list[int] = []
    try:
        for fd in fds:
            staged.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first_free))
        actions: list[tuple[int | str, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        ]
        for target, out_fd in ((1, request.stdout), (2, request.stderr)):
            if out_fd is not None:
                staged.append(fcntl.fcntl(out_fd, fcntl.F_DUPFD_CLOEXEC, first_free))
                actions.append((os.POSIX_SPAWN_DUP2, staged[-1], target))
        actions += [(os.POSIX_SPAWN_DUP2, src, 3 + i) for i, src in enumerate(staged[: len(fds)])]
        shim = build_shim(
            cwd=cwd,
            inherited_nofile=NOFILE_ENV in environ,
            settings=settings,
            set_listen_pid=set_listen_pid,
        )
        if shim is not None:
            # posix_spawn has no portable chdir, setrlimit, umask or setuid action: the shim.
            script, before = shim
            argv = [_SHELL, "-c", script, "handoffd-worker", *before, *command]
            path = _SHELL
        else:
            argv = list(command)
            path = resolve_command(command, environ, cwd)
        try:
            pid = os.posix_spawn(
                path,
                argv,
                dict(environ),
                file_actions=actions,
                # 0: a new group led by the child; our pgid: join ours (setpgid(2)).
                setpgroup=0 if own_process_group else os.getpgrp(),
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        except OSError as exc:
            raise SpawnError(f"cannot start {command[0]!r}: {exc.strerror}") from exc
    except OSError as exc:  # F_DUPFD_CLOEXEC: out of fds
        raise SpawnError(f"cannot start {command[0]!r}: {exc.strerror}") from exc
    finally:
        for fd in staged:
            os.close(fd)
    return pid


def watch_child(pid: int, program: str) -> WorkerProcess:
    """Watch the child ``start_process`` just started through a pidfd (Linux 5.4+).

    Raises:
        SpawnError: no pidfd could be opened; the child has been killed and reaped.
    """
    try:
        pidfd = _pidfd_open(pid)
    except OSError as exc:
        # Never leave a worker we cannot watch holding the listeners: kill and reap it now.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SpawnError(f"cannot watch {program!r} (pid {pid}): {exc.strerror}") from exc
    track_child(pid)
    return WorkerProcess(pid=pid, pidfd=pidfd)


@final
class PidfdSpawner:
    """The default ``Spawner`` (see ``_processes``): posix_spawn, watched through pidfds."""

    #: pidfds travel to a successor: a self-upgrade can always hand the workers over.
    handover_refusal: str | None = None

    def spawn(self, request: SpawnRequest) -> WorkerProcess:
        return watch_child(start_process(request), request.command[0])

    def adopt(self, pid: int, pidfd: int | None = None) -> WorkerProcess:
        return adopt_process(pid, pidfd)


#: The spawner every supervisor uses unless a test injects another.
DEFAULT_SPAWNER: Final = PidfdSpawner()


def adopt_process(pid: int, pidfd: int | None = None) -> WorkerProcess:
    """Watch a process that is not our child (after a self-upgrade) through a pidfd.

    Pass the ``pidfd`` the previous supervisor handed over when there is one: unlike
    ``pidfd_open(pid)`` it cannot name another process if the worker died and its pid was reused
    in between. The returned process owns it. Its exit code is unknown (only a parent can reap).

    Raises:
        ProcessLookupError: (without ``pidfd``) no process has this pid any more.
    """
    return WorkerProcess(
        pid=pid, pidfd=_pidfd_open(pid) if pidfd is None else pidfd, is_child=False
    )


def adopt_child(pid: int, pidfd: int) -> WorkerProcess:
    """Watch a worker that is our child although we did not spawn it in this image.

    After an exec in place (see ``_handover.exec_in_place``) the pid is the same, so the workers
    the previous image spawned are still our children: we reap them and see their exit status.
    """
    _unreaped.add(pid)
    return WorkerProcess(pid=pid, pidfd=pidfd, is_child=True)
