"""Self-upgrade: the running supervisor hands its state and fds to a new handoffd executable.

The workers keep running and keep serving: they hold the same listening sockets the whole time,
and only the process that watches them changes. The old supervisor stays in charge until the new
one says it is, and keeps serving if it never does. Supervision never stops meanwhile: a worker
that crashes during a self-upgrade is restarted as at any other time.

Two ways, chosen by ``supervisor.self_upgrade`` ("auto": new-pid when ``NOTIFY_SOCKET`` is set,
that is under systemd, in-place otherwise):

- **in-place** keeps the pid: whatever started handoffd (a shell's ``wait``, tini, runit, s6,
  supervisord) keeps waiting on the same process, since only systemd follows a new main pid
  (MAINPID=). A *pre-flight* copy of the new executable (``handoffd run --preflight``) is
  offered a sample of the state, exactly as a new-pid successor would be, and must answer
  ``checked``: a broken binary, an older handoffd or an unreadable state is refused there, with
  the old supervisor serving on. Then the callers get their reply, and the supervisor takes the
  state and fd set again and calls execve(2) in the same scheduling step (nothing can change
  between the two, and crash restarts went on until then): the state goes in a memfd, every fd
  (and the control socket, so the control path never stops answering) as inheritable copies.
  The new image reads them (``Handover.from_exec``) and adopts the workers, which are still
  its children: it reaps them and sees their exit status. The handled signals are blocked
  across the exec (pending ones wait for the new image's handlers). The exec is the point of no
  return; the pre-flight exists so that it holds.
- **new-pid** (systemd) hands over to a new process, over one ``AF_UNIX``/``SOCK_SEQPACKET``
  socketpair (the child's end is ``HANDOFF_SUPERVISOR_FD``); every message is a ``_passing``
  Put (JSON payload + SCM_RIGHTS)::

    old supervisor                                   new supervisor (handoffd run --config PATH)
    freeze the notify pumps (datagrams wait)
    snapshot: state + owned copies of every fd
    spawn the new executable ----------------------> (started, same process group and stderr)
    Put(fd set, SupervisorState) ------------------> check state version, config path, sender pid;
    (crashed workers are restarted meanwhile)        rebuild listeners, parked fds, adopted workers
                                                     bind a staged control socket (.NAME.<pid>)
                                                     systemd: MAINPID=<new> READY=1, BARRIER=1
                            <--------------------- Put([], {"op": "in_charge", "pid": N})
                                                     (or {"op": "refused", "reason": ...}, exit 1)
    stop spawning; snapshot the generations again
    Put(workers' fds, {"op": "commit", "reply": ...,  take the commit's generations instead of
        "generations": [...]}) ------------------->  the first state's; rename the staged socket
    reply ok to the caller, exit 0 without            over the control path; start supervising:
    signalling a worker or unlinking anything         adopted generations, watchdog, pid file

Restarts during the exchange: the first state may be stale by the commit (a worker died and was
replaced). The commit therefore carries the generations as they are at that instant, taken in the
same scheduling step as every spawn is stopped (``Generation.hand_over``), and the successor
adopts those. A worker that dies after that is seen by the successor (its pidfd is readable at
once) and restarted there, never by both. The notify pumps stay frozen from the first snapshot
to the end: a datagram read by the old supervisor after it would be lost to the successor (an
FDSTORE's fds, a READY=1); frozen, they wait in the sockets, which the successor reads on.

The commit message is the point of no return, and the old side decides it: until it is sent, the
old supervisor can still give up (timeout, exit, refusal, a failed send), SIGKILL the new one and
carry on, because the new one starts nothing (no worker, no notify read) before it gets the commit,
and the control socket path stays the old one's until then (so a caller waiting on the old one is
never cut off). What the new one may already have done is undone by the old: it tells systemd
``MAINPID=<old>`` and removes the staged socket. If the old one dies between ``in_charge`` and the
commit, the new one sees the channel close and carries on alone.

Every failure of the exchange ends the wait at once with its own cause (a failed send, a reply
that is not one, an exit status); only silence costs ``self_upgrade_timeout``.

The state (``SupervisorState``) names every fd of the set by a key, so the JSON carries the
structure and SCM_RIGHTS the fds: listeners (and their flock lock fds), parked fds, and for every
live worker its pidfd, the supervisor's end of its notify socket, and its scm_rights channel. The
fds sent are copies taken at the snapshot (``HandedFds``): a worker reaped or a listener retired
meanwhile closes the supervisor's fd, never what is being sent.

Design notes:
- Workers are adopted through the *pidfds* the old supervisor passes, not ``pidfd_open(pid)`` on
  a pid number: a worker that died during the handover cannot be confused with a process that
  reused its pid. A worker handed to a new pid is not the new supervisor's child: its exit is
  seen as the pidfd becoming readable, and its status is unknown (it is never waited on).
- The notify sockets travel as sockets (their bound path keeps working: a worker's
  ``NOTIFY_SOCKET`` never changes), so READY/STATUS/FDSTORE keep flowing to the new supervisor.
- A self-upgrade replaces the supervisor, not the program: adopted generations keep the program
  config they were started with (sent in the state). A changed config applies at the next worker
  upgrade, as it always does. The new supervisor's own ``[supervisor]`` settings apply at once.
- systemd: ``NOTIFY_SOCKET`` and the watchdog interval come from the state, not the environment
  (``WATCHDOG_PID`` there names the old pid). ``BARRIER=1`` (sd_notify_barrier(3)) makes the new
  one wait until systemd has processed ``MAINPID=``, so the unit never sees its main process exit.
  The unit needs ``NotifyAccess=all``: with ``main``, systemd drops a child's MAINPID= silently.
- State format changes: ``STATE_VERSION`` is bumped for any change an older reader would
  misread. A reader accepts every version from ``OLDEST_STATE_VERSION`` to its own (migrating
  older ones in ``_migrate``) and refuses a newer one, naming both versions; the old supervisor
  then keeps serving and reports the refusal. Downgrading handoffd across a version bump therefore
  needs a restart, and says so.
- A worker started during an in-place pre-flight or a new-pid exchange in ``fd_delivery =
  "scm_rights"`` mode whose fd set was still being sent when the state was taken is handed over
  with its channel; the successor does not send the set again.
- The new executable is the entry point the old one was started from, as it is on disk now
  (``handoffd`` script, or ``python -m handoff`` from the same interpreter path), else
  ``handoffd`` on PATH, else ``python -m handoff``; ``upgrade --self --exec PATH`` overrides it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar, final

import structlog
import trio
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from ._config import ListenerConfig, ProgramConfig, load_config
from ._control import UpgradeReply
from ._errors import (
    ConfigError,
    HandoffError,
    ListenerError,
    ProtocolError,
    SpawnError,
    UpgradeError,
)
from ._generation import AdoptedWorker
from ._listeners import Listener
from ._notify import NotifyReceiver
from ._passing import Received
from ._passing_trio import get, put
from ._paths import HANDOVER_FD_ENV, REEXEC_FD_ENV
from ._peercred import peer_pid
from ._phases import WorkerState  # noqa: TC001  pydantic resolves it at run time
from ._pidfile import restore_pid_file
from ._platform import SOCK_CLOEXEC
from ._processes import SpawnRequest, kill_and_reap
from ._sdnotify import notify
from ._spawn import DEFAULT_SPAWNER, adopt_child, describe_exit
from ._systemd import SystemdNotifier
from ._validation import render_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ._generation import Generation, WorkerSlot
    from ._output import Stream
    from ._processes import ProcessHandle, Spawner
    from ._tickets import UpgradeQueue, UpgradeTicket

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Version of ``SupervisorState``; see the module notes for the compatibility rule.
#: 2: the commit carries the generations as they are at the commit (v1 readers ignored them).
STATE_VERSION: Final = 2
#: The oldest state version this handoffd can still read (migrating it in ``_migrate``).
OLDEST_STATE_VERSION: Final = 1

# Variables a successor must not take for its own: systemd's LISTEN_* name the old pid's fds.
_NOT_FOR_SUCCESSOR: Final = (
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    HANDOVER_FD_ENV,
    REEXEC_FD_ENV,
)
#: The hidden ``handoffd run`` flag of a pre-flight copy: check the state, never take over.
PREFLIGHT_FLAG: Final = "--preflight"
# After the new supervisor exited, how long its last message (a refusal) may take to be read.
_LAST_WORDS_S: Final = 1.0
# How long a supervisor that handed over waits for its callers to take their replies.
_REPLY_GRACE_S: Final = 5.0
# sd_notify_barrier(3) is normally answered in microseconds; this bounds a wedged manager.
_BARRIER_TIMEOUT_S: Final = 10.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class HandedWorker(_Model):
    """One worker slot; the fd fields are keys into the fd set (None: not sent)."""

    index: int
    pid: int | None
    state: WorkerState
    status: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    ever_ready: bool = False
    pidfd: str | None = None
    notify: str | None = None
    notify_path: str | None = None
    channel: str | None = None
    #: output = "log": the read ends of its stdout/stderr pipes (the pumps go on here).
    stdout: str | None = None
    stderr: str | None = None


class HandedGeneration(_Model):
    """A live generation: the current one, or one still draining."""

    number: int
    program: dict[str, JsonValue]  # ProgramConfig as JSON, validated by the reading version
    listeners: list[str]  # names of the listeners in its fd set, in order
    draining: bool
    # Seconds of drain_timeout left once its stop signal was sent; None: not signalled yet.
    drain_remaining_s: float | None = None
    workers: list[HandedWorker]


class HandedListener(_Model):
    name: str
    fd: str
    lock_fd: str | None = None
    address: str
    origin: str
    config: dict[str, JsonValue]  # ListenerConfig as JSON


class HandedParked(_Model):
    name: str
    fd: str


class SupervisorState(_Model):
    """Everything a successor needs besides the fds; the payload of the first Put."""

    v: int
    pid: int
    config_path: str
    next_generation: int
    current: int | None
    generations: list[HandedGeneration]
    listeners: list[HandedListener]
    parked: list[HandedParked]
    retired_listeners: list[str] = []
    last_upgrade: dict[str, JsonValue] | None = None
    watchdog_interval: float | None = None
    notify_socket: str | None = None
    #: The counters of ``_metrics.Metrics.dump`` (absent from an older handoffd: from zero).
    metrics: dict[str, JsonValue] | None = None


class HandoverReply(_Model):
    """The new supervisor's answer to the state."""

    v: int = 1
    # checked: a pre-flight copy (``--preflight``) read everything and takes nothing over.
    op: Literal["in_charge", "refused", "checked"]
    pid: int
    reason: str | None = None


class HandoverCommit(_Model):
    """The old supervisor's last word: the new one is in charge, with this upgrade reply."""

    v: int = 1
    op: Literal["commit"] = "commit"
    reply: dict[str, JsonValue]
    # The generations as they are at the commit (state v2+), their fds sent with it; they
    # replace those of the first state. None: a v1 sender, keep those.
    generations: list[HandedGeneration] | None = None


# ---- the old supervisor's side ----


def successor_command(
    exec_path: str | None, config_path: Path, environ: Mapping[str, str]
) -> list[str]:
    """The command line of the new supervisor (see the module notes for which executable).

    Raises:
        UpgradeError: ``exec_path`` is not an executable file.
    """
    tail = ["run", "--config", str(config_path), *_log_format_args(sys.argv)]
    if exec_path:
        found = exec_path if "/" in exec_path else shutil.which(exec_path, path=_path(environ))
        if found is None or not os.path.isabs(found):
            raise UpgradeError(
                f"--exec {exec_path!r}: give the new handoffd as an absolute path (the daemon "
                "does not share your working directory) or a command on its PATH"
            )
        if not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise UpgradeError(f"--exec {found!r} is not an executable file")
        return [found, *tail]
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "handoffd" and os.access(argv0, os.X_OK):
        return [os.path.abspath(argv0), *tail]
    if argv0.endswith(os.path.join("handoff", "__main__.py")):
        return [sys.executable, "-m", "handoff", *tail]
    found = shutil.which("handoffd", path=_path(environ))
    if found is not None:
        return [found, *tail]
    return [sys.executable, "-m", "handoff", *tail]


def _path(environ: Mapping[str, str]) -> str:
    path = environ.get("PATH", os.defpath)
    if sys.prefix != sys.base_prefix:  # a venv: its scripts first, as for workers
        path = f"{Path(sys.executable).parent}:{path}"
    return path


def _log_format_args(argv: Sequence[str]) -> list[str]:
    """The old supervisor's ``--log-format``, so both write the same lines to the shared stderr."""
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            return ["--log-format", argv[i + 1]]
        if arg.startswith("--log-format="):
            return ["--log-format", arg.split("=", 1)[1]]
    return []


@final
@dataclass(frozen=True)
class SupervisorView:
    """What a self-upgrade hands over, as the supervisor sees it with its generations frozen.

    A value the supervisor builds for ``snapshot``: the handover never reads the supervisor.
    """

    config_path: Path
    listeners: tuple[Listener, ...]
    parked: tuple[tuple[str, int], ...]
    generations: tuple[Generation, ...]
    current: int | None
    next_generation: int
    retired_listeners: frozenset[str]
    last_upgrade: UpgradeReply | None
    watchdog_interval: float | None
    notify_socket: str | None
    metrics: dict[str, JsonValue] | None = None


@final
class HandedFds:
    """The fd set of one snapshot: owned *copies* of every fd the state names.

    A copy, not the supervisor's fd: between the snapshot and the last byte sent, a worker may
    exit (its pidfd and notify socket are closed as it is reaped) and a retired listener may be
    closed, and that fd number may even be reused by another open. What is sent is what was
    snapshotted, whatever happens to the originals meanwhile.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def add(self, name: str, fd: int) -> str:
        """Keep a copy of ``fd`` under ``name``; returns ``name`` (the key the state uses).

        Raises:
            UpgradeError: the copy cannot be made (out of fds).
        """
        try:
            copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError as exc:
            raise UpgradeError(
                f"cannot copy fd {fd} ({name}) for the handover: {exc.strerror}; raise "
                "RLIMIT_NOFILE (LimitNOFILE= under systemd) or park fewer fds"
            ) from exc
        self.items.append((name, copy))
        return name

    def close(self) -> None:
        _close_fds(fd for _, fd in self.items)
        self.items = []


def snapshot(view: SupervisorView) -> tuple[SupervisorState, list[tuple[str, int]]]:
    """The state and the fd set to hand over, taken in one scheduling step (sync).

    The fds are copies (see ``HandedFds``) that the caller owns and closes
    (``close_fds``); the supervisor's own fds are untouched.
    """
    fds = HandedFds()
    try:
        listeners = [
            HandedListener(
                name=li.name,
                fd=fds.add(f"listener:{li.name}", li.fd),
                lock_fd=None if li.lock_fd is None else fds.add(f"lock:{li.name}", li.lock_fd),
                address=li.bound_address(),
                origin=li.origin,
                config=li.config.model_dump(mode="json"),
            )
            for li in view.listeners
        ]
        parked = [
            HandedParked(name=name, fd=fds.add(f"parked:{i}", fd))
            for i, (name, fd) in enumerate(view.parked)
        ]
        generations = snapshot_generations(view.generations, fds)
    except BaseException:
        fds.close()
        raise
    state = SupervisorState(
        v=STATE_VERSION,
        pid=os.getpid(),
        config_path=str(view.config_path),
        next_generation=view.next_generation,
        current=view.current,
        generations=generations,
        listeners=listeners,
        parked=parked,
        retired_listeners=sorted(view.retired_listeners - {li.name for li in view.listeners}),
        last_upgrade=None
        if view.last_upgrade is None
        else view.last_upgrade.model_dump(mode="json"),
        watchdog_interval=view.watchdog_interval,
        notify_socket=view.notify_socket,
        metrics=view.metrics,
    )
    return state, fds.items


def snapshot_generations(gens: Iterable[Generation], fds: HandedFds) -> list[HandedGeneration]:
    """Every live generation and its workers, their fds copied into ``fds`` (see ``snapshot``)."""
    now = trio.current_time()
    generations: list[HandedGeneration] = []
    for gen in gens:
        workers: list[HandedWorker] = []
        for slot in gen.slots:
            proc, receiver = slot.process, slot.notify
            tag = f"worker:{gen.number}.{slot.index}"
            # Watched without a pidfd (kqueue), a live worker is handed over by pid only.
            live = proc is not None and proc.returncode is None and receiver is not None
            if not live or proc is None or receiver is None:
                workers.append(_handed_worker(slot))
                continue
            workers.append(
                _handed_worker(
                    slot,
                    pid=proc.pid,
                    pidfd=fds.add(f"{tag}:pidfd", proc.pidfd) if proc.pidfd >= 0 else None,
                    notify=fds.add(f"{tag}:notify", receiver.sock.fileno()),
                    notify_path=receiver.path,
                    channel=None
                    if slot.channel is None
                    else fds.add(f"{tag}:channel", slot.channel.fileno()),
                    outputs={
                        stream: fds.add(f"{tag}:{stream}", fd)
                        for stream, fd in slot.outputs.items()
                    },
                )
            )
        deadline = gen.drain_deadline
        generations.append(
            HandedGeneration(
                number=gen.number,
                program=gen.spec.program.model_dump(mode="json"),
                listeners=[name for name, _ in gen.spec.listeners],
                draining=gen.is_draining(),
                drain_remaining_s=None if deadline is None else max(deadline - now, 0.0),
                workers=workers,
            )
        )
    return generations


def _handed_worker(
    slot: WorkerSlot,
    pid: int | None = None,
    pidfd: str | None = None,
    notify: str | None = None,
    notify_path: str | None = None,
    channel: str | None = None,
    outputs: Mapping[Stream, str] | None = None,
) -> HandedWorker:
    outputs = outputs or {}
    return HandedWorker(
        index=slot.index,
        pid=pid,
        state=slot.state,
        status=slot.status,
        restarts=slot.restarts,
        last_exit=slot.last_exit,
        ever_ready=slot.ever_ready,
        pidfd=pidfd,
        notify=notify,
        notify_path=notify_path,
        channel=channel,
        stdout=outputs.get("stdout"),
        stderr=outputs.get("stderr"),
    )


@final
class Successor:
    """A new supervisor that answered the state: in charge (``commit()`` makes it so,
    ``abort()`` not), or a pre-flight copy that passed (``finish_preflight()``)."""

    def __init__(self, process: ProcessHandle, channel: trio.socket.SocketType) -> None:
        self.process = process
        self.pid = process.pid
        self._channel = channel

    async def commit(self, reply: UpgradeReply, gens: Sequence[Generation]) -> None:
        """Tell it that it is in charge, with the generations as they are *now*.

        Crash restarts went on during the exchange, so the workers of the first state may have
        been replaced: the commit carries a fresh snapshot of every generation, which the
        successor adopts instead (the caller stopped every spawn first: ``Generation.hand_over``).
        From here on we must exit without touching anything.

        Raises:
            UpgradeError: it went away first, or the snapshot failed (then ``abort()`` and
                carry on).
        """
        copies = HandedFds()
        try:
            generations = snapshot_generations(gens, copies)
            message = HandoverCommit(reply=reply.model_dump(mode="json"), generations=generations)
            await put(self._channel, copies.items, message.model_dump(mode="json"))
        except ProtocolError as exc:
            raise UpgradeError(
                f"the new handoffd (pid {self.pid}) went away before it was told to take over: "
                f"{exc}"
            ) from exc
        finally:
            copies.close()
        # It outlives us: no pidfd, no channel. Not reaped by us either: when we exit it is
        # re-parented (to a subreaper such as systemd's manager, or to init).
        self._channel.close()
        self.process.close()

    async def finish_preflight(self) -> None:
        """Let the pre-flight copy exit (it holds only copies and started nothing), reap it."""
        self._channel.close()
        with trio.move_on_after(_LAST_WORDS_S):
            await self.process.wait()
        await _kill(self.process)

    async def abort(self) -> None:
        """SIGKILL it and reap it; it has started nothing, so nothing else needs undoing here."""
        await _kill(self.process)
        self._channel.close()


async def _kill(process: ProcessHandle) -> None:
    await kill_and_reap(process)
    process.close()


async def offer(
    state: SupervisorState,
    fds: Sequence[tuple[str, int]],
    argv: Sequence[str],
    environ: Mapping[str, str],
    self_upgrade_timeout: float,
    phase: Callable[[str, str | None], None],
    spawned: Callable[[int], None],
    spawner: Spawner = DEFAULT_SPAWNER,
    *,
    preflight: bool = False,
) -> Successor:
    """Start the new supervisor, hand it ``state`` and ``fds``, and wait for its answer:
    ``in_charge``, or with ``preflight`` (``argv`` ends in ``--preflight``) ``checked``.

    Raises:
        UpgradeError: it could not start, exited, refused, broke the protocol, or did not
            answer within ``self_upgrade_timeout``; it has been killed and reaped, and nothing
            of ours was touched.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | SOCK_CLOEXEC)
    env = {k: v for k, v in environ.items() if k not in _NOT_FOR_SUCCESSOR}
    env[HANDOVER_FD_ENV] = "3"
    try:
        request = SpawnRequest(argv, env, [theirs.fileno()], False, own_process_group=False)
        process = spawner.spawn(request)
    except SpawnError as exc:
        ours.close()
        raise UpgradeError(f"cannot start the new handoffd {argv[0]!r}: {exc}") from exc
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    spawned(process.pid)
    channel = trio.socket.from_stdlib_socket(ours)
    what = (
        f"the new handoffd's pre-flight run ({argv[0]}, pid {process.pid})"
        if preflight
        else f"the new handoffd ({argv[0]}, pid {process.pid})"
    )
    log.info("handover.spawned", successor_pid=process.pid, argv=list(argv), preflight=preflight)
    phase("spawned", f"pid {process.pid}: {' '.join(argv)}")
    expected = "checked" if preflight else "in_charge"
    handed = False
    try:
        answer = await _exchange(
            channel, process, state, fds, self_upgrade_timeout, what, preflight=preflight
        )
        handed = True
    finally:
        if not handed:
            await _kill(process)
            channel.close()
    if answer.op != expected or answer.pid != process.pid:
        await _kill(process)
        channel.close()
        if answer.op == "refused":
            raise UpgradeError(f"{what} refused the handover: {answer.reason or answer.op}")
        raise UpgradeError(
            f"{what} answered {answer.op!r} (pid {answer.pid}) where {expected!r} from pid "
            f"{process.pid} was due: it is not a handoffd of this version"
        )
    return Successor(process, channel)


async def _exchange(
    channel: trio.socket.SocketType,
    process: ProcessHandle,
    state: SupervisorState,
    fds: Sequence[tuple[str, int]],
    self_upgrade_timeout: float,
    what: str,
    *,
    preflight: bool = False,
) -> HandoverReply:
    """Put the state, get the answer; every failure ends the wait at once, with its cause.

    Only a successor that hung up is given ``_LAST_WORDS_S`` more: its exit status, when it
    comes, is the better reason (a config error exits 2, a crash shows its signal).
    """
    answer: HandoverReply | None = None
    problem: str | None = None
    talked = trio.Event()

    async def talk(cancel: trio.CancelScope) -> None:
        nonlocal answer, problem
        try:
            try:
                await put(channel, fds, state.model_dump(mode="json"))
            except ValueError as exc:  # too large to send; nothing was sent
                raise ProtocolError(f"cannot send it the state: {exc}") from exc
            received = await get(channel)
        except ProtocolError as exc:
            problem = str(exc)
            talked.set()
            if _peer_hung_up(channel):
                await trio.sleep(_LAST_WORDS_S)  # watch() reports its exit, if it comes
        else:
            answer, problem = _parse_reply(received)
            talked.set()
        cancel.cancel()

    async def watch(cancel: trio.CancelScope) -> None:
        await process.wait()
        with trio.move_on_after(_LAST_WORDS_S):  # its refusal may already be in the channel
            await talked.wait()
        cancel.cancel()

    with trio.move_on_after(self_upgrade_timeout) as timer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk, nursery.cancel_scope)
            nursery.start_soon(watch, nursery.cancel_scope)
    if answer is not None:
        return answer
    if process.returncode is not None:
        hint = (
            " (a usage or config error: its message is in handoffd's log)"
            if process.returncode == 2
            else ""
        )
        goal = "answering" if preflight else "taking over"
        raise UpgradeError(f"{what} {describe_exit(process.returncode)} before {goal}{hint}")
    if problem is not None:
        raise UpgradeError(f"{what} broke the handover: {problem}")
    assert timer.cancelled_caught
    raise UpgradeError(
        f"{what} did not take over within supervisor.self_upgrade_timeout = "
        f"{self_upgrade_timeout:g}s "
        "and was killed; see its messages in handoffd's log, or raise the timeout"
    )


def _anonymous_file() -> int:
    """An fd of a file with no name, for the state an exec in place reads back."""
    memfd_create: Callable[[str, int], int] | None = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        return int(memfd_create("handoffd-state", int(getattr(os, "MFD_CLOEXEC", 1))))
    fd, path = tempfile.mkstemp(prefix=".handoffd-state-")
    os.unlink(path)  # elsewhere: an unlinked temp file serves the same
    return fd


def _peer_hung_up(channel: trio.socket.SocketType) -> bool:
    """Whether the other end of ``channel`` is closed (poll(2): POLLHUP/POLLRDHUP)."""
    rdhup = int(getattr(select, "POLLRDHUP", 0))  # Linux only; POLLHUP says it elsewhere
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN | rdhup)
    return any(ev & (select.POLLHUP | rdhup) for _, ev in poller.poll(0))


def _parse_reply(received: Received) -> tuple[HandoverReply | None, str | None]:
    received.close()  # a reply carries no fds; never keep what a confused peer sent
    try:
        return HandoverReply.model_validate(received.payload), None
    except ValidationError:
        return None, f"it answered {str(received.payload)[:200]}, not a handover reply"


@final
@dataclass(frozen=True)
class ExecPlan:
    """A pre-flight passed: how to re-execute the supervisor in place (``exec_in_place``)."""

    argv: tuple[str, ...]
    environ: Mapping[str, str]


@final
@dataclass(frozen=True)
class HandoverOutcome:
    """How a self-upgrade ended, for the supervisor to apply."""

    #: Set once the commit went out: the successor is in charge and we only exit from here on.
    successor_pid: int | None
    reply: UpgradeReply | None
    reason: str | None
    #: Pids of every successor started (dead or alive): their staged sockets must not remain.
    spawned: tuple[int, ...]
    #: In place: the pre-flight passed; reply, then ``exec_in_place`` with this.
    exec_plan: ExecPlan | None = None


async def hand_over(
    ticket: UpgradeTicket,
    gens: Sequence[Generation],
    view: Callable[[], SupervisorView],
    *,
    config_path: Path,
    environ: Mapping[str, str],
    systemd: SystemdNotifier,
    self_upgrade_timeout: float,
    generation: int,
    in_place: bool,
    spawner: Spawner = DEFAULT_SPAWNER,
) -> HandoverOutcome:
    """The old supervisor's side of one self-upgrade; never raises for a failure of the new one.

    To a new pid (``in_place`` False): freezes the notify pumps of ``gens``, snapshots
    ``view()``, offers it to a new handoffd and commits. Before the commit every failure
    SIGKILLs the successor (after claiming systemd's MAINPID back, so systemd never sees "main
    process killed" for a unit that keeps serving); the caller then thaws the generations and
    carries on. In place: offers a sample of the state to a pre-flight copy and, once it passed,
    returns an ``ExecPlan`` (the caller replies, then calls ``exec_in_place``).
    """
    spawned: list[int] = []
    successor: Successor | None = None
    committed = False
    reason: str | None = None
    try:
        try:
            if os.getpid() == 1 and not in_place:
                raise UpgradeError(
                    "handoffd runs as pid 1 (a container's init): its exit would end the "
                    "container, so it cannot hand over to a new pid; set supervisor.self_upgrade "
                    '= "in-place" (or "auto"), or restart the container instead'
                )
            if spawner.handover_refusal is not None:
                raise UpgradeError(spawner.handover_refusal)
            # The same check the new one makes, here for the exact message and no spawn.
            loaded = load_config(config_path)
            argv = successor_command(ticket.request.exec_path, loaded.path, environ)
            ticket.phase("config_loaded", str(loaded.path))
            if in_place:
                return await _preflight(
                    ticket, view, argv, environ, self_upgrade_timeout, spawned, generation
                )
            for gen in gens:
                await gen.freeze()
            state, fds = snapshot(view())
            try:
                ticket.phase("frozen", f"{len(gens)} generation(s), {len(fds)} fds to hand over")
                successor = await offer(
                    state,
                    fds,
                    argv,
                    environ,
                    self_upgrade_timeout,
                    ticket.phase,
                    spawned.append,
                    spawner,
                )
            finally:
                _close_fds(fd for _, fd in fds)
            ticket.phase("in_charge", f"supervisor pid {successor.pid}")
            reply = ticket.ok(generation, generation, supervisor_pid=successor.pid)
            # Let go before the commit leaves: from its snapshot on, no spawn may happen here
            # (the successor would not know of it), and a drain deadline reached while it is
            # sent must not SIGKILL workers the successor is taking. A failed commit takes
            # them back (the caller thaws them).
            for gen in gens:
                gen.hand_over()
            await successor.commit(reply, view().generations)
            committed = True
            return HandoverOutcome(successor.pid, reply, None, tuple(spawned))
        except HandoffError as exc:
            reason = str(exc)
        except Exception as exc:  # the upgrade boundary: we keep serving whatever happened
            log.exception("upgrade.crashed", supervisor=True)
            reason = f"internal error: {exc!r}"
    finally:
        if not committed:
            with trio.CancelScope(shield=True):
                systemd.send(f"MAINPID={os.getpid()}")
                if successor is not None:
                    await successor.abort()
    return HandoverOutcome(None, None, reason or "not handed over", tuple(spawned))


async def _preflight(
    ticket: UpgradeTicket,
    view: Callable[[], SupervisorView],
    argv: Sequence[str],
    environ: Mapping[str, str],
    self_upgrade_timeout: float,
    spawned: list[int],
    generation: int,
) -> HandoverOutcome:
    """Have a copy of the new executable check a sample of the state, without taking over.

    Nothing is frozen: the sample is only checked (version, config, every fd rebuilt), and the
    state that crosses the exec is taken again at the exec itself.

    Raises:
        UpgradeError: the copy failed (see ``offer``); it has been killed and reaped.
    """
    state, fds = snapshot(view())
    try:
        ticket.phase("snapshot", f"{len(state.generations)} generation(s), {len(fds)} fds")
        checker = await offer(
            state,
            fds,
            [*argv, PREFLIGHT_FLAG],
            environ,
            self_upgrade_timeout,
            ticket.phase,
            spawned.append,
            preflight=True,
        )
    finally:
        _close_fds(fd for _, fd in fds)
    await checker.finish_preflight()
    ticket.phase("preflight_passed", f"{argv[0]} (pid {checker.pid})")
    reply = ticket.ok(generation, generation, supervisor_pid=os.getpid())
    env = {k: v for k, v in environ.items() if k not in _NOT_FOR_SUCCESSOR}
    return HandoverOutcome(None, reply, None, tuple(spawned), ExecPlan(tuple(argv), env))


#: The signals handoffd handles. Blocked across an exec in place, so that none takes its
#: default action (the end of the daemon) before the new image has installed its handlers: they
#: stay pending through execve(2) (signal(7)), and the new image unblocks them once it listens.
HANDLED_SIGNALS: Final = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def exec_in_place(
    view: SupervisorView,
    control: socket.socket,
    plan: ExecPlan,
    resend: Iterable[signal.Signals] = (),
) -> None:
    """Replace this process's image by the new handoffd, keeping the pid and every child.

    The state and the fd set are taken here, in the same scheduling step as the exec, so nothing
    can change between them: the state goes in a memfd, the fd set (and the control socket) as
    inheritable copies whose numbers the state names (``REEXEC_FD_ENV``). Workers stay our
    children (same pid), so the new image reaps them and learns their exit status. ``resend``:
    signals meant for the new image (a SIGHUP that arrived meanwhile); they wait, blocked.
    Returns only when the exec failed.

    Raises:
        UpgradeError: the exec failed; nothing changed and this supervisor carries on.
    """
    state, fds = snapshot(view)
    copies = HandedFds()
    copies.items = fds
    memfd = -1
    try:
        copies.add("control", control.fileno())
        data = json.dumps(
            {"state": state.model_dump(mode="json"), "fds": copies.items}, separators=(",", ":")
        ).encode()
        memfd = _anonymous_file()
        view_ = memoryview(data)
        while view_:
            view_ = view_[os.write(memfd, view_) :]
        for fd in [memfd, *(fd for _, fd in copies.items)]:
            os.set_inheritable(fd, True)
        env = {**plan.environ, REEXEC_FD_ENV: str(memfd)}
        log.info("supervisor.re_executed", argv=list(plan.argv), fds=len(copies.items))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            for signum in resend:
                os.kill(os.getpid(), signum)
            os.execve(plan.argv[0], list(plan.argv), env)
        finally:  # only when execve failed
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    except OSError as exc:
        raise UpgradeError(
            f"cannot re-execute handoffd as {plan.argv[0]!r}: {exc.strerror or exc}; the old "
            "version carries on"
        ) from exc
    finally:
        copies.close()
        if memfd >= 0:
            os.close(memfd)


async def reexec(
    ticket: UpgradeTicket,
    queue: UpgradeQueue,
    stop_requested: bool,
    start_exec: Callable[[Sequence[signal.Signals]], None],
) -> None:
    """After a pre-flight passed: answer every caller, then ``start_exec`` (which returns only
    if the exec failed). Requests that arrived meanwhile fail with a hint to send them again;
    a worker upgrade among them is passed on to the new image as a pending SIGHUP."""
    pending = queue.take_all()
    for each in pending:
        each.finish(
            each.failed(
                "handoffd re-executed itself while this request waited; send it again",
                ticket.reply.generation if ticket.reply else 0,
            )
        )
    with trio.move_on_after(_REPLY_GRACE_S):
        for each in [ticket, *pending]:
            await each.returned.wait()
    if stop_requested:
        # A stop came during the pre-flight: stop as asked, in this version.
        log.info("supervisor.exec_skipped", reason="handoffd is stopping")
        return
    start_exec([signal.SIGHUP] if any(not t.request.supervisor for t in pending) else [])


def undo_handover(
    control_path: Path | None,
    spawned: Sequence[int],
    systemd: SystemdNotifier,
    pid_file: Path | None,
) -> None:
    """After a failed handover: systemd's MAINPID, the pid file, and no staged socket left.

    The new supervisor (killed by now) may have sent MAINPID=, bound its staged control socket
    and written the pid file; all is undone whether or not it got that far.
    """
    if control_path is not None:
        for pid in spawned:
            with contextlib.suppress(FileNotFoundError):
                staged_control_path(control_path, pid).unlink()
    systemd.send(f"MAINPID={os.getpid()}")
    restore_pid_file(pid_file)


async def leave(
    ticket: UpgradeTicket, queue: UpgradeQueue, successor_pid: int, stop_requested: bool
) -> None:
    """After the commit: pass on what arrived meanwhile, answer every caller, then return.

    A stop (an operator's SIGTERM or ``systemctl stop``) and a worker upgrade (SIGHUP) that
    arrived during the handover are the successor's business now: they are forwarded, not
    lost with this process. Queued requests fail with a hint to send them again.
    """
    pending = queue.take_all()
    if stop_requested:
        forward_signal(successor_pid, signal.SIGTERM)
    if any(not t.request.supervisor for t in pending):
        forward_signal(successor_pid, signal.SIGHUP)
    for each in pending:
        reason = (
            f"handoffd handed over to a new supervisor (pid {successor_pid}) while this request "
            "waited; send it again"
        )
        each.finish(each.failed(reason, ticket.reply.generation if ticket.reply else 0))
    with trio.move_on_after(_REPLY_GRACE_S):
        for each in [ticket, *pending]:
            await each.returned.wait()
    log.info("supervisor.handed_over", successor_pid=successor_pid)


def forward_signal(successor_pid: int, signum: signal.Signals) -> None:
    """Pass a signal meant for the service on to the supervisor now in charge of it."""
    log.info("supervisor.forwarded", signal=signum.name, successor_pid=successor_pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(successor_pid, signum)


# ---- the new supervisor's side ----


def staged_control_path(path: Path, pid: int) -> Path:
    """Where supervisor ``pid`` binds its control socket before it is in charge."""
    return path.with_name(f".{path.name}.{pid}")


def bind_staged_control_socket(path: Path, mode: int = 0o600) -> tuple[socket.socket, Path]:
    """Bind (mode 0600) and listen on our staged control socket; the caller renames it over
    ``path`` at the commit, so the old supervisor answers on ``path`` until then."""
    staged = staged_control_path(path, os.getpid())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        sock.bind(str(staged))
        os.chmod(staged, mode)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock, staged


@final
@dataclass
class AdoptedGeneration:
    """One generation as received, ready for ``run_adopted_generation``."""

    number: int
    program: ProgramConfig
    listeners: list[str]
    draining: bool
    drain_remaining: float | None
    workers: list[AdoptedWorker]


@final
@dataclass
class Claimed:
    """What a successor takes from a ``Handover`` at its start (see ``Handover.claim``)."""

    listeners: dict[str, Listener]
    parked: list[tuple[str, int]]
    next_generation: int
    retired_listeners: set[str]
    last_upgrade: UpgradeReply | None
    systemd: SystemdNotifier


@final
class Handover:
    """What a successor received, owned until it is claimed or ``close()``d.

    ``channel`` is the handover channel to the old supervisor, or None after an exec in place
    (the old supervisor is this process: there is nobody to answer, and nothing to confirm).
    """

    def __init__(
        self,
        channel: trio.socket.SocketType | None,
        state: SupervisorState,
        listeners: dict[str, Listener],
        parked: list[tuple[str, int]],
        generations: list[AdoptedGeneration],
        last_upgrade: UpgradeReply | None,
    ) -> None:
        self.channel = channel
        self.state = state
        self.listeners = listeners
        self.parked = parked
        self.generations = generations
        # The last upgrade as the old supervisor saw it; replaced by this one's reply at commit.
        self.last_upgrade = last_upgrade
        #: After an exec in place: the control socket, inherited (``take_control``).
        self.control: socket.socket | None = None

    @classmethod
    async def receive(
        cls,
        fd_text: str,
        config_path: Path,
        self_upgrade_timeout: float,
        spawner: Spawner = DEFAULT_SPAWNER,
    ) -> Handover:
        """Read the state and fd set from ``HANDOFF_SUPERVISOR_FD`` and rebuild everything.

        Raises:
            ProtocolError: no state arrived, or it cannot be used (the sender was told why).
        """
        channel = _open_channel(fd_text)
        try:
            try:
                with trio.fail_after(self_upgrade_timeout):
                    received = await get(channel)
            except trio.TooSlowError:
                raise ProtocolError(
                    f"no supervisor state arrived on {HANDOVER_FD_ENV}={fd_text} within "
                    f"supervisor.self_upgrade_timeout = {self_upgrade_timeout:g}s"
                ) from None
            try:
                return cls._rebuild(channel, received, config_path, spawner)
            except ProtocolError as exc:
                await _refuse(channel, str(exc))
                raise
        except BaseException:
            channel.close()
            raise

    @classmethod
    def from_exec(cls, fd_text: str, config_path: Path) -> Handover:
        """Read what ``exec_in_place`` left for us: the state in memfd ``fd_text``, every fd
        of the set inherited under the numbers it names. Our workers are our children.

        Raises:
            ProtocolError: the state cannot be used. This is past the point of no return: the
                pre-flight exists so that it does not happen.
        """
        try:
            memfd = int(fd_text)
            size = os.fstat(memfd).st_size
            data = os.pread(memfd, size, 0)
            os.close(memfd)
        except (ValueError, OSError) as exc:
            raise ProtocolError(
                f"{REEXEC_FD_ENV}={fd_text!r} is not the state a re-executing handoffd left "
                f"({exc}); only handoffd sets it, for itself: unset it"
            ) from None
        try:
            document = json.loads(data)
            pairs = [(str(name), int(fd)) for name, fd in document["fds"]]
            payload = document["state"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"the state left across the exec is malformed: {exc}") from exc
        if not isinstance(payload, dict):
            raise ProtocolError("the state left across the exec is not an object")
        for _, fd in pairs:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)  # never into a worker
        fds = dict(pairs)
        control = fds.pop("control", None)
        received = Received(names=list(fds), fd_numbers=list(fds.values()), payload=payload)
        try:
            handover = cls._rebuild(None, received, config_path)
        except BaseException:
            _close_fds([] if control is None else [control])
            raise
        if control is not None:
            handover.control = _socket_from(control)
        return handover

    @classmethod
    def _rebuild(
        cls,
        channel: trio.socket.SocketType | None,
        received: Received,
        config_path: Path,
        spawner: Spawner = DEFAULT_SPAWNER,
    ) -> Handover:
        fds = dict(received.fds)
        with ExitStack() as cleanup_on_fail:
            cleanup_on_fail.callback(lambda: _close_fds(fds.values()))
            state = _read_state(received.payload)
            last_upgrade = (
                None
                if state.last_upgrade is None
                else _validate(UpgradeReply, state.last_upgrade, "last upgrade")
            )
            peer = os.getpid() if channel is None else _peer_pid(channel)
            if peer != state.pid:
                raise ProtocolError(
                    f"the supervisor state says it comes from pid {state.pid}, but the channel's "
                    f"peer is pid {peer}"
                )
            if state.config_path != str(config_path):
                raise ProtocolError(
                    f"the running handoffd uses config {state.config_path}, this one was started "
                    f"with {config_path}"
                )
            take = _taker(fds)
            listeners: dict[str, Listener] = {}
            for hl in state.listeners:
                listener = Listener(
                    config=_validate(ListenerConfig, hl.config, f"listener {hl.name!r}"),
                    sock=_socket_from(take(hl.fd)),
                    origin="handed-over",
                    lock_fd=None if hl.lock_fd is None else take(hl.lock_fd),
                )
                cleanup_on_fail.callback(listener.close)
                listeners[hl.name] = listener
            parked = [(p.name, take(p.fd)) for p in state.parked]
            cleanup_on_fail.callback(lambda: _close_fds(fd for _, fd in parked))
            generations = _rebuild_generations(
                state.generations, take, cleanup_on_fail, children=channel is None, spawner=spawner
            )
            if fds:
                log.warning("handover.unknown_fds_closed", fdnames=sorted(fds))
            cleanup_on_fail.pop_all()
        _close_fds(fds.values())
        return cls(channel, state, listeners, parked, generations, last_upgrade)

    def take_control(self) -> socket.socket | None:
        """The control socket inherited across an exec in place; the caller owns it now."""
        control, self.control = self.control, None
        return control

    def claim(self) -> Claimed:
        """Take the listeners, parked fds and numbering; the caller owns them from now on."""
        state = self.state
        # From the state, not our environment: WATCHDOG_PID there names the old supervisor.
        notify_env = {"NOTIFY_SOCKET": state.notify_socket} if state.notify_socket else {}
        systemd = SystemdNotifier(notify_env)
        systemd.watchdog_interval = state.watchdog_interval
        claimed = Claimed(
            listeners=self.listeners,
            parked=self.parked,
            next_generation=state.next_generation,
            retired_listeners=set(state.retired_listeners),
            last_upgrade=self.last_upgrade,
            systemd=systemd,
        )
        self.listeners, self.parked = {}, []
        for li in claimed.listeners.values():
            log.info("listener.handed_over", listener=li.name, address=li.bound_address(), fd=li.fd)
        return claimed

    def claim_generations(self) -> list[AdoptedGeneration]:
        """Take the generations to supervise; the caller owns their workers from now on."""
        generations, self.generations = self.generations, []
        return generations

    async def take_over(
        self,
        control_path: Path,
        control_mode: int,
        write_pid_file: Callable[[], None],
        self_upgrade_timeout: float,
    ) -> tuple[socket.socket, Path]:
        """Stage our control socket, write the pid file, say in_charge, move the socket in place.

        Returns the control socket and the path it answers on (the staged one if the rename
        failed after the commit: serving the workers matters more than the control path).

        Raises:
            HandoffError: before the commit; the old supervisor was told and carries on.
        """
        try:
            control, staged = bind_staged_control_socket(control_path, control_mode)
        except OSError as exc:
            reason = f"cannot bind a control socket next to {control_path}: {exc}"
            await self.refuse(reason)
            raise ListenerError(reason) from exc
        try:
            try:
                # Before in_charge: after the commit nothing may fail any more.
                write_pid_file()
            except ConfigError as exc:
                await self.refuse(str(exc))
                raise
            await self.confirm(f"taking over from pid {self.state.pid}", self_upgrade_timeout)
        except BaseException:
            control.close()
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            raise
        try:
            os.rename(staged, control_path)
        except OSError as exc:
            log.error(
                "handover.control_socket_not_moved",
                staged=str(staged),
                error=exc.strerror,
                hint=f"handoffd answers on {staged}; use --socket with that path",
            )
            return control, staged
        return control, control_path

    async def confirm(self, status: str, self_upgrade_timeout: float) -> None:
        """Claim the main pid from systemd, say ``in_charge``, and wait for the commit.

        Raises:
            HandoffError: systemd did not take the new main pid, or the old supervisor did not
                commit in time; the old one is told (when it still listens) and carries on.
        """
        channel = self.channel
        assert channel is not None, "confirm() is for a handover over a channel"
        notify_socket = self.state.notify_socket
        try:
            if notify_socket:
                await _claim_main_pid({"NOTIFY_SOCKET": notify_socket}, status)
            answer = HandoverReply(op="in_charge", pid=os.getpid())
            await put(channel, [], answer.model_dump(mode="json"))
        except HandoffError as exc:
            await _refuse(channel, str(exc))
            raise
        try:
            with trio.fail_after(self_upgrade_timeout):
                received = await get(channel)
        except trio.TooSlowError:
            raise UpgradeError(
                f"the old supervisor (pid {self.state.pid}) neither confirmed nor cancelled the "
                f"handover within supervisor.self_upgrade_timeout = {self_upgrade_timeout:g}s"
            ) from None
        except ProtocolError:
            # It is gone without a word (it would have killed us had it given up): carry on.
            log.warning("handover.commit_missing", old_pid=self.state.pid)
            return
        finally:
            channel.close()
        # A message arrived: the old supervisor committed and is leaving. From here on we are in
        # charge whatever it said: refusing now would orphan every worker.
        self._apply_commit(received)

    def _apply_commit(self, received: Received) -> None:
        """Take the commit's reply and, from a v2 sender, its generations (see ``commit``).

        Past the point of no return nothing here may fail: a reply we cannot read (an older
        handoffd's format) only costs the last-upgrade record; generations we cannot rebuild
        leave us with those of the first state (their workers' exits are seen as usual).
        """
        fds = dict(received.fds)
        try:
            commit = HandoverCommit.model_validate(received.payload)
            self.last_upgrade = UpgradeReply.model_validate(commit.reply)
        except ValidationError:
            log.warning("handover.commit_unreadable", payload=str(received.payload)[:200])
            _close_fds(fds.values())
            return
        if commit.generations is None:
            _close_fds(fds.values())
            return
        try:
            with ExitStack() as cleanup_on_fail:
                generations = _rebuild_generations(
                    commit.generations, _taker(fds), cleanup_on_fail, children=False
                )
                cleanup_on_fail.pop_all()
        except ProtocolError as exc:
            log.error("handover.commit_generations_unusable", reason=str(exc))
            _close_fds(fds.values())
            return
        _close_fds(fds.values())
        for gen in self.generations:  # as of the first state: superseded
            for worker in gen.workers:
                worker.close()
        self.generations = generations

    async def refuse(self, reason: str) -> None:
        """Tell the old supervisor we will not take over, and why (it then carries on)."""
        if self.channel is not None:
            await _refuse(self.channel, reason)

    def close(self) -> None:
        """Let go of everything not claimed, without touching a worker or a notify path."""
        for listener in self.listeners.values():
            listener.close()
        self.listeners = {}
        _close_fds(fd for _, fd in self.parked)
        self.parked = []
        for gen in self.generations:
            for worker in gen.workers:
                worker.close()
        self.generations = []
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.channel is not None:
            self.channel.close()


async def run_preflight(
    config_path: Path, environ: Mapping[str, str], self_upgrade_timeout: float
) -> None:
    """``handoffd run --preflight``: check a running handoffd's state sample, take nothing over.

    The old supervisor runs this copy of the new executable before it re-executes itself in
    place: the new version must start, load the config, read this state version and rebuild
    every fd. It answers ``checked`` (or ``refused`` with the reason) and lets go of everything
    without touching a worker, a notify path or the control socket.

    Raises:
        HandoffError: the check failed (the old supervisor was told why) or this was not run by
            a self-upgrade.
    """
    fd_text = environ.get(HANDOVER_FD_ENV)
    if fd_text is None:
        raise UpgradeError(
            f"{PREFLIGHT_FLAG} is run by handoffd itself during `handoffd upgrade --self`; "
            f"start the supervisor without it"
        )
    handover = await Handover.receive(fd_text, config_path, self_upgrade_timeout)
    try:
        assert handover.channel is not None
        answer = HandoverReply(op="checked", pid=os.getpid())
        await put(handover.channel, [], answer.model_dump(mode="json"))
        log.info("handover.preflight_passed", old_pid=handover.state.pid)
    finally:
        handover.close()


def _taker(fds: dict[str, int]) -> Callable[[str | None], int]:
    """``take(name)``: the fd sent under ``name``, removed from ``fds`` (the caller owns it)."""

    def take(name: str | None) -> int:
        if name is None or name not in fds:
            raise ProtocolError(f"the supervisor state names fd {name!r}, which was not sent")
        return fds.pop(name)

    return take


def _rebuild_generations(
    handed: Sequence[HandedGeneration],
    take: Callable[[str | None], int],
    cleanup_on_fail: ExitStack,
    *,
    children: bool,
    spawner: Spawner = DEFAULT_SPAWNER,
) -> list[AdoptedGeneration]:
    generations: list[AdoptedGeneration] = []
    for hg in handed:
        program = _validate(ProgramConfig, hg.program, f"generation {hg.number}'s program")
        workers: list[AdoptedWorker] = []
        for hw in hg.workers:
            worker = _adopt(hw, take, children=children, spawner=spawner)
            cleanup_on_fail.callback(worker.close)
            workers.append(worker)
        generations.append(
            AdoptedGeneration(
                number=hg.number,
                program=program,
                listeners=hg.listeners,
                draining=hg.draining,
                drain_remaining=hg.drain_remaining_s,
                workers=workers,
            )
        )
    return generations


def _open_channel(fd_text: str) -> trio.socket.SocketType:
    try:
        raw = socket.socket(fileno=int(fd_text))
    except (ValueError, OSError) as exc:
        raise ProtocolError(
            f"{HANDOVER_FD_ENV}={fd_text!r} is not an open socket of this process ({exc}); "
            f"only a running handoffd sets it, for its successor: unset it"
        ) from None
    raw.set_inheritable(False)
    if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_SEQPACKET:
        raw.close()
        raise ProtocolError(f"{HANDOVER_FD_ENV}={fd_text} is not a SEQPACKET handover channel")
    return trio.socket.from_stdlib_socket(raw)


def _read_state(payload: Mapping[str, JsonValue]) -> SupervisorState:
    version = payload.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("the supervisor state has no version (v); the sender is not handoffd")
    if version > STATE_VERSION:
        raise ProtocolError(
            f"the running handoffd sent supervisor state version {version}, and this handoffd "
            f"reads versions {OLDEST_STATE_VERSION} to {STATE_VERSION} only: upgrade to a "
            f"handoffd that reads version {version}, or restart handoffd to change versions"
        )
    if version < OLDEST_STATE_VERSION:
        raise ProtocolError(
            f"the running handoffd sent supervisor state version {version}, older than the "
            f"oldest this handoffd reads ({OLDEST_STATE_VERSION}): upgrade through an "
            "intermediate release, or restart handoffd"
        )
    try:
        return SupervisorState.model_validate(_migrate(dict(payload)))
    except ValidationError as exc:
        problems = "; ".join(render_errors(exc, whole="state", limit=3))
        raise ProtocolError(
            f"the supervisor state (version {version}) is malformed: {problems}"
        ) from exc


def _migrate(raw: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """Turn an older state version into the current one (1 -> 2: the state is the same; a v1
    sender's commit carries no generations, and the first state's are kept)."""
    return {**raw, "v": STATE_VERSION}


_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], value: Mapping[str, JsonValue], what: str) -> _M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(render_errors(exc, limit=3))
        raise ProtocolError(f"the supervisor state's {what} is not valid here: {problems}") from exc


def _adopt(
    hw: HandedWorker,
    take: Callable[[str | None], int],
    *,
    children: bool,
    spawner: Spawner = DEFAULT_SPAWNER,
) -> AdoptedWorker:
    process: ProcessHandle | None = None
    receiver: NotifyReceiver | None = None
    channel: socket.socket | None = None
    outputs: dict[Stream, int] = {}
    if hw.pid is not None:
        with ExitStack() as cleanup_on_fail:
            if hw.notify_path is None:
                raise ProtocolError(f"worker pid {hw.pid} came without its notify socket path")
            # After an exec in place the workers are our children (same pid): we reap them.
            # Watched without a pidfd (kqueue), a worker comes by pid only.
            pidfd = None if hw.pidfd is None else take(hw.pidfd)
            if children and pidfd is None:
                raise ProtocolError(f"worker pid {hw.pid} came without its pidfd")
            process = (
                adopt_child(hw.pid, pidfd)
                if children and pidfd is not None
                else spawner.adopt(hw.pid, pidfd)
            )
            cleanup_on_fail.callback(process.close)
            raw = _socket_from(take(hw.notify))
            cleanup_on_fail.callback(raw.close)
            receiver = NotifyReceiver(path=hw.notify_path, sock=trio.socket.from_stdlib_socket(raw))
            if hw.channel is not None:
                channel = _socket_from(take(hw.channel))
                cleanup_on_fail.callback(channel.close)
            streams: tuple[tuple[Stream, str | None], ...] = (
                ("stdout", hw.stdout),
                ("stderr", hw.stderr),
            )
            for stream, name in streams:
                if name is not None:
                    outputs[stream] = take(name)
                    cleanup_on_fail.callback(os.close, outputs[stream])
            cleanup_on_fail.pop_all()
    return AdoptedWorker(
        index=hw.index,
        process=process,
        notify=receiver,
        channel=channel,
        state=hw.state,
        status=hw.status,
        restarts=hw.restarts,
        last_exit=hw.last_exit,
        ever_ready=hw.ever_ready,
        outputs=outputs,
    )


def _close_fds(fds: Iterable[int]) -> None:
    for fd in list(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


def _socket_from(fd: int) -> socket.socket:
    """Own ``fd`` as a socket; closes it if it is not one."""
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise ProtocolError(f"a handed-over fd ({fd}) is not a socket: {exc}") from exc


def _peer_pid(channel: trio.socket.SocketType) -> int:
    """The channel's peer; where the kernel does not say, our parent, which made the channel."""
    pid = peer_pid(channel)
    return os.getppid() if pid is None else pid


async def _refuse(channel: trio.socket.SocketType, reason: str) -> None:
    """Tell the old supervisor why we will not take over (it may be gone: then nobody hears)."""
    answer = HandoverReply(op="refused", pid=os.getpid(), reason=reason)
    with contextlib.suppress(ProtocolError, OSError):
        await put(channel, [], answer.model_dump(mode="json"))


async def _claim_main_pid(environ: Mapping[str, str], status: str) -> None:
    """``MAINPID=<us>`` + ``READY=1``, then wait until systemd has processed it (BARRIER=1)."""
    try:
        notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS={status}", environ=environ)
    except OSError as exc:
        raise UpgradeError(
            f"cannot tell systemd the new main pid through NOTIFY_SOCKET={environ['NOTIFY_SOCKET']}"
            f": {exc.strerror or exc}"
        ) from exc
    if not await _barrier(environ):
        raise UpgradeError(
            f"systemd did not confirm MAINPID={os.getpid()} (BARRIER=1) within "
            f"{_BARRIER_TIMEOUT_S:g}s"
        )


async def _barrier(environ: Mapping[str, str]) -> bool:
    """sd_notify_barrier(3): send BARRIER=1 with a pipe's write end; systemd closes it once it
    has processed every earlier message, which the read end sees as POLLHUP."""
    read_end, write_end = os.pipe()  # non-inheritable (PEP 446): pipe2(O_CLOEXEC) on Linux
    try:
        try:
            notify("BARRIER=1", [write_end], environ=environ)
        except OSError as exc:
            raise UpgradeError(f"cannot send BARRIER=1 to systemd: {exc.strerror or exc}") from exc
        os.close(write_end)
        write_end = -1
        with trio.move_on_after(_BARRIER_TIMEOUT_S):
            await trio.lowlevel.wait_readable(read_end)
            return True
        return False
    finally:
        trio.lowlevel.notify_closing(read_end)
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
