"""The process seam: how the supervisor starts, watches, signals and reaps processes.

The supervisor, the generations and the handover never call ``posix_spawn``, ``pidfd_open`` or
``waitid`` themselves; they go through a ``Spawner`` that returns ``ProcessHandle`` objects.
The default is the pidfd-backed implementation in ``_spawn`` (Linux 5.4+); ``_portable`` has
the one for kernels without pidfds (kqueue, or SIGCHLD + waitid). Unit tests pass
the fakes of ``tests/fakes.py`` instead, so the state machine runs on trio's virtual clock with
processes the test drives (the shape tableflip's ``env`` struct gives its upgrader).

Design notes:
- A handle is owned by exactly one task (the worker slot that runs it); ``close()`` releases
  what watches it (a pidfd) without signalling it, which is how a self-upgrade lets go.
- A worker owns its whole process tree: it leads its own process group, and handoffd is a child
  subreaper, so descendants whose parent died become handoffd's children and still carry the
  worker's process group id. ``signal_group`` signals all of them (stop, drain, SIGKILL);
  ``group_roots`` names them for observation and ``status``; ``wait_group_exited`` waits for the
  last one. A handle must only signal a group id that cannot have been reused: see ``_spawn``.
- ``kill_and_reap`` is the one place that SIGKILLs and waits a bounded time for the reap; every
  caller (a worker slot's cleanup, a failed successor) shares its bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from ._notify_access import Attribution, NotifySender

# How long a SIGKILLed process may take to be reaped before we stop waiting for it. It cannot
# ignore SIGKILL; this only bounds a process stuck in uninterruptible sleep (a dead NFS mount).
REAP_TIMEOUT_S: Final = 5.0


@final
@dataclass(frozen=True)
class WorkerSettings:
    """How a worker is started beyond command, environment and fds (``[program]``'s settings).

    ``uid``/``gid``: the ids to switch to (None: keep ours); ``user_name``: initgroups(3) its
    supplementary groups (None: none at all). ``identity_setting`` names the setting in errors.
    ``core`` is in bytes (``resource.RLIM_INFINITY``: unlimited); ``memory`` in bytes.
    """

    uid: int | None = None
    gid: int | None = None
    user_name: str | None = None
    setpriv: str = "setpriv"
    identity_setting: str = "program.user"
    umask: int | None = None
    nofile: int | None = None
    core: int | None = None
    memory: int | None = None

    @property
    def switches_identity(self) -> bool:
        return self.uid is not None or self.gid is not None


#: A worker started with nothing beyond its command.
NO_SETTINGS: Final = WorkerSettings()


@final
@dataclass(frozen=True)
class SpawnRequest:
    """One process to start: ``command`` with ``fds`` at 3, 4, ... (``_spawn.start_process``).

    The caller sets ``LISTEN_FDS``/``LISTEN_FDNAMES`` in ``environ``; with ``set_listen_pid``
    the process also gets ``LISTEN_PID`` equal to its own pid. ``own_process_group=False`` keeps
    it in our process group (a successor supervisor, which must get the terminal's Ctrl-C as we
    do). ``settings``: user, umask and limits; ``stdout``/``stderr``: fds to give it as 1 and 2
    (default: ours).
    """

    command: Sequence[str]
    environ: Mapping[str, str]
    fds: Sequence[int]
    set_listen_pid: bool
    cwd: Path | None = None
    own_process_group: bool = True
    settings: WorkerSettings = NO_SETTINGS
    stdout: int | None = None
    stderr: int | None = None


class ProcessHandle(Protocol):
    """A process we supervise: ours (a child) or adopted from a previous supervisor."""

    pid: int
    #: The exit code once reaped (``-signal`` when killed); None while it runs.
    returncode: int | None
    #: Only a parent can reap and learn the exit status; an adopted process is not our child.
    is_child: bool
    #: The pidfd a self-upgrade hands over, or -1 (closed, or a platform without pidfds).
    pidfd: int

    async def wait(self) -> int:
        """Wait for the exit (reaping a child); returns the exit code, or -signal."""
        ...

    def send_signal(self, sig: int) -> None:
        """Signal the process; a no-op once it has exited."""
        ...

    def kill(self) -> None:
        """SIGKILL it; a no-op once it has exited."""
        ...

    def signal_group(self, sig: int) -> None:
        """Signal every process of its process group (the process too, while it lives).

        A no-op once the process has exited and no member of its group is left.
        """
        ...

    def group_roots(self) -> list[int]:
        """The process (while it lives) and the members of its group reparented to us.

        Every process of the worker's tree is one of these or a descendant of one (a process
        that left the group and was orphaned is not attributed).
        """
        ...

    async def wait_group_exited(self) -> None:
        """After ``wait()`` returned: block until no member of its process group is left."""
        ...

    def attribute(self, sender: NotifySender) -> Attribution:
        """Whether a datagram on its notify socket from ``sender`` speaks for it (its tree)."""
        ...

    def close(self) -> None:
        """Stop watching it, without signalling it."""
        ...


class Spawner(Protocol):
    """Starts worker processes and adopts handed-over ones."""

    #: Why a self-upgrade cannot hand this spawner's processes to a successor here (the
    #: user-facing refusal, with the fix), or None when it can.
    handover_refusal: str | None

    def spawn(self, request: SpawnRequest) -> ProcessHandle:
        """Start ``request``'s process; raises ``SpawnError`` on failure."""
        ...

    def adopt(self, pid: int, pidfd: int | None = None) -> ProcessHandle:
        """Watch a process that is not our child (handed over by a previous supervisor)."""
        ...


async def kill_and_reap(process: ProcessHandle, reap_timeout: float = REAP_TIMEOUT_S) -> None:
    """SIGKILL ``process`` and wait up to ``reap_timeout`` for it to be reaped, shielded.

    Safe to call from cleanup (``finally``) in a cancelled scope: the wait is shielded and
    bounded, so a cancelled supervisor still reaps what it kills.
    """
    with trio.CancelScope(shield=True):
        process.kill()
        with trio.move_on_after(reap_timeout):
            await process.wait()
