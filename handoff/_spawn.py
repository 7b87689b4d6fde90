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
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._errors import SpawnError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

log: structlog.stdlib.BoundLogger = structlog.get_logger()

# sh(1) exec shim: export LISTEN_PID as the shell's own pid, then become the worker.
_SHIM: Final = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_SHELL: Final = "/bin/sh"
# Signals Python leaves as SIG_IGN, which exec would otherwise pass on to the worker.
_RESET_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)


# Children we spawned and have not reaped yet. As PID 1, handoffd also reaps orphans it did not
# spawn; it must never reap these, or their exit status would be lost to their pidfd wait.
_unreaped: set[int] = set()


def unreaped_children() -> frozenset[int]:
    """Pids of workers this process spawned and has not reaped (see ``_unreaped``)."""
    return frozenset(_unreaped)


@final
@dataclass(eq=False)
class WorkerProcess:
    """A running (or exited) worker, owned through its pidfd."""

    pid: int
    pidfd: int
    is_child: bool = True
    returncode: int | None = None

    async def wait(self) -> int:
        """Wait for the exit and reap it; returns the exit code, or -signal when killed."""
        if self.returncode is not None:
            return self.returncode
        await trio.lowlevel.wait_readable(self.pidfd)
        return self._reap()

    def _reap(self) -> int:
        code = 0
        if self.is_child:
            try:
                info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
            except ChildProcessError:
                info = None
            if info is not None:
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            _unreaped.discard(self.pid)
        self.returncode = code
        self.close()
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the worker; a no-op once it has exited (the pidfd prevents pid reuse races)."""
        if self.returncode is not None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # A worker that became another user (setuid) cannot be signalled by a non-root
            # handoffd; a drain then ends with its timeout. Never an error that ends the daemon.
            log.warning(
                "worker.signal_refused",
                pid=self.pid,
                signal=sig,
                hint="run handoffd as root, or keep the worker's uid",
            )

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1


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


def spawn_worker(
    command: Sequence[str],
    *,
    environ: Mapping[str, str],
    fds: Sequence[int],
    set_listen_pid: bool,
    cwd: Path | None = None,
    own_process_group: bool = True,
) -> WorkerProcess:
    """Start ``command`` with ``fds`` at 3, 4, ... and return it as a pidfd-backed process.

    The caller sets ``LISTEN_FDS``/``LISTEN_FDNAMES`` in ``environ``; with ``set_listen_pid``
    the worker also gets ``LISTEN_PID`` equal to its own pid. ``own_process_group=False`` keeps
    the child in our process group (a successor supervisor, which must get the terminal's
    Ctrl-C as we do).

    Raises:
        SpawnError: the command cannot be found or started.
    """
    resolve_command(command, environ, cwd)
    first_free = 3 + len(fds)
    staged: list[int] = []
    try:
        for fd in fds:
            staged.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first_free))
        actions: list[tuple[int | str, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        ]
        actions += [(os.POSIX_SPAWN_DUP2, src, 3 + i) for i, src in enumerate(staged)]
        if set_listen_pid or cwd is not None:
            # posix_spawn has no portable chdir action: the shim changes directory itself.
            script = ('cd "$1" || exit 126; shift; ' if cwd is not None else "") + (
                _SHIM if set_listen_pid else 'exec "$@"'
            )
            argv = [_SHELL, "-c", script, "handoffd-worker"]
            argv += [str(cwd)] if cwd is not None else []
            argv += list(command)
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
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        # Never leave a worker we cannot watch holding the listeners: kill and reap it now.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SpawnError(f"cannot watch {command[0]!r} (pid {pid}): {exc.strerror}") from exc
    _unreaped.add(pid)
    return WorkerProcess(pid=pid, pidfd=pidfd)


@final
class PidfdSpawner:
    """The default ``Spawner`` (see ``_processes``): posix_spawn, watched through pidfds."""

    def spawn(
        self,
        command: Sequence[str],
        *,
        environ: Mapping[str, str],
        fds: Sequence[int],
        set_listen_pid: bool,
        cwd: Path | None = None,
        own_process_group: bool = True,
    ) -> WorkerProcess:
        return spawn_worker(
            command,
            environ=environ,
            fds=fds,
            set_listen_pid=set_listen_pid,
            cwd=cwd,
            own_process_group=own_process_group,
        )

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
        pid=pid, pidfd=os.pidfd_open(pid) if pidfd is None else pidfd, is_child=False
    )


def adopt_child(pid: int, pidfd: int) -> WorkerProcess:
    """Watch a worker that is our child although we did not spawn it in this image.

    After an exec in place (see ``_handover.exec_in_place``) the pid is the same, so the workers
    the previous image spawned are still our children: we reap them and see their exit status.
    """
    _unreaped.add(pid)
    return WorkerProcess(pid=pid, pidfd=pidfd, is_child=True)
