"""Self-upgrade: the running supervisor hands its state and fds to a new handoffd executable.

The workers keep running and keep serving: they hold the same listening sockets the whole time,
and only the process that watches them changes. The old supervisor stays in charge until the new
one says it is, and keeps serving if it never does.

Message sequence, over one ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair (the child's end is
``HANDOFF_SUPERVISOR_FD``); every message is a ``_passing`` Put (JSON payload + SCM_RIGHTS)::

    old supervisor                                   new supervisor (handoffd run --config PATH)
    freeze generations (no notify read, no spawn)
    spawn the new executable ----------------------> (started, same process group and stderr)
    Put(fd set, SupervisorState) ------------------> check state version, config path, sender pid;
                                                     rebuild listeners, parked fds, adopted workers
                                                     bind a staged control socket (.NAME.<pid>)
                                                     systemd: MAINPID=<new> READY=1, BARRIER=1
                            <--------------------- Put([], {"op": "in_charge", "pid": N})
                                                     (or {"op": "refused", "reason": ...}, exit 1)
    Put([], {"op": "commit", "reply": ...}) -------> rename the staged socket over the control path;
    reply ok to the caller, exit 0 without            start supervising: adopted generations,
    signalling a worker or unlinking anything         watchdog, pid file

The commit message is the point of no return, and the old side decides it: until it is sent, the
old supervisor can still give up (timeout, exit, refusal, a failed send), SIGKILL the new one and
carry on, because the new one starts nothing (no worker, no notify read) before it gets the commit,
and the control socket path stays the old one's until then (so a caller waiting on the old one is
never cut off). What the new one may already have done is undone by the old: it tells systemd
``MAINPID=<old>`` and removes the staged socket. If the old one dies between ``in_charge`` and the
commit, the new one sees the channel close and carries on alone.

The state (``SupervisorState``) names every fd of the set by a key, so the JSON carries the
structure and SCM_RIGHTS the fds: listeners (and their flock lock fds), parked fds, and for every
live worker its pidfd, the supervisor's end of its notify socket, and its scm_rights channel.

Design notes:
- Workers are adopted through the *pidfds* the old supervisor passes, not ``pidfd_open(pid)`` on
  a pid number: a worker that died during the handover cannot be confused with a process that
  reused its pid. A handed-over worker is not the new supervisor's child: its exit is seen as the
  pidfd becoming readable, and its status is unknown (it is never waited on).
- The notify sockets travel as sockets (their bound path keeps working: a worker's
  ``NOTIFY_SOCKET`` never changes), so READY/STATUS/FDSTORE keep flowing to the new supervisor.
  ``Generation.freeze()`` guarantees that the old one applies no datagram after the snapshot.
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
- The new executable is the entry point the old one was started from, as it is on disk now
  (``handoffd`` script, or ``python -m handoff`` from the same interpreter path), else
  ``handoffd`` on PATH, else ``python -m handoff``; ``upgrade --self --exec PATH`` overrides it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
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
from ._passing_trio import get, put
from ._paths import HANDOVER_FD_ENV
from ._peercred import peer_pid
from ._phases import WorkerState  # noqa: TC001  pydantic resolves it at run time
from ._pidfile import restore_pid_file
from ._platform import SOCK_CLOEXEC
from ._processes import kill_and_reap
from ._sdnotify import notify
from ._spawn import DEFAULT_SPAWNER, describe_exit
from ._systemd import SystemdNotifier
from ._validation import render_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ._generation import Generation
    from ._passing import Received
    from ._processes import ProcessHandle, Spawner
    from ._tickets import UpgradeQueue, UpgradeTicket

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Version of ``SupervisorState``; see the module notes for the compatibility rule.
STATE_VERSION: Final = 1
#: The oldest state version this handoffd can still read (migrating it in ``_migrate``).
OLDEST_STATE_VERSION: Final = 1

# Variables a successor must not take for its own: systemd's LISTEN_* name the old pid's fds.
_NOT_FOR_SUCCESSOR: Final = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", HANDOVER_FD_ENV)
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


class HandoverReply(_Model):
    """The new supervisor's answer to the state."""

    v: int = 1
    op: Literal["in_charge", "refused"]
    pid: int
    reason: str | None = None


class HandoverCommit(_Model):
    """The old supervisor's last word: the new one is in charge, with this upgrade reply."""

    v: int = 1
    op: Literal["commit"] = "commit"
    reply: dict[str, JsonValue]


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


def snapshot(view: SupervisorView) -> tuple[SupervisorState, list[tuple[str, int]]]:
    """The state and the fd set to hand over; ``view`` is taken with every generation frozen.

    The fds stay owned by the supervisor: Put sends copies.
    """
    fds: list[tuple[str, int]] = []

    def key(name: str, fd: int) -> str:
        fds.append((name, fd))
        return name

    listeners = [
        HandedListener(
            name=li.name,
            fd=key(f"listener:{li.name}", li.fd),
            lock_fd=None if li.lock_fd is None else key(f"lock:{li.name}", li.lock_fd),
            address=li.bound_address(),
            origin=li.origin,
            config=li.config.model_dump(mode="json"),
        )
        for li in view.listeners
    ]
    parked = [
        HandedParked(name=name, fd=key(f"parked:{i}", fd))
        for i, (name, fd) in enumerate(view.parked)
    ]
    now = trio.current_time()
    generations: list[HandedGeneration] = []
    for gen in view.generations:
        workers: list[HandedWorker] = []
        for slot in gen.slots:
            proc, receiver = slot.process, slot.notify
            tag = f"worker:{gen.number}.{slot.index}"
            # Watched without a pidfd (kqueue), a live worker is handed over by pid only.
            live = proc is not None and proc.returncode is None and receiver is not None
            workers.append(
                HandedWorker(
                    index=slot.index,
                    pid=proc.pid if live and proc is not None else None,
                    state=slot.state,
                    status=slot.status,
                    restarts=slot.restarts,
                    last_exit=slot.last_exit,
                    ever_ready=slot.ever_ready,
                    pidfd=key(f"{tag}:pidfd", proc.pidfd)
                    if live and proc is not None and proc.pidfd >= 0
                    else None,
                    notify=key(f"{tag}:notify", receiver.sock.fileno())
                    if live and receiver is not None
                    else None,
                    notify_path=receiver.path if live and receiver is not None else None,
                    channel=key(f"{tag}:channel", slot.channel.fileno())
                    if live and slot.channel is not None
                    else None,
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
    )
    return state, fds


@final
class Successor:
    """A new supervisor that said it is in charge; ``commit()`` makes it so, ``abort()`` not."""

    def __init__(self, process: ProcessHandle, channel: trio.socket.SocketType) -> None:
        self.process = process
        self.pid = process.pid
        self._channel = channel

    async def commit(self, reply: UpgradeReply) -> None:
        """Tell it that it is in charge; from here on we must exit without touching anything.

        Raises:
            UpgradeError: it went away first (then ``abort()`` and carry on).
        """
        message = HandoverCommit(reply=reply.model_dump(mode="json"))
        try:
            await put(self._channel, [], message.model_dump(mode="json"))
        except ProtocolError as exc:
            raise UpgradeError(
                f"the new handoffd (pid {self.pid}) went away before it was told to take over: "
                f"{exc}"
            ) from exc
        # It outlives us: no pidfd, no channel. Not reaped by us either: when we exit it is
        # re-parented (to a subreaper such as systemd's manager, or to init).
        self._channel.close()
        self.process.close()

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
) -> Successor:
    """Start the new supervisor, hand it ``state`` and ``fds``, and wait for ``in_charge``.

    Raises:
        UpgradeError: it could not start, exited, refused, or did not answer within
            ``self_upgrade_timeout``; it has been killed and reaped, and nothing of ours was touched.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | SOCK_CLOEXEC)
    env = {k: v for k, v in environ.items() if k not in _NOT_FOR_SUCCESSOR}
    env[HANDOVER_FD_ENV] = "3"
    try:
        process = spawner.spawn(
            argv, environ=env, fds=[theirs.fileno()], set_listen_pid=False, own_process_group=False
        )
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
    what = f"the new handoffd ({argv[0]}, pid {process.pid})"
    log.info("handover.spawned", successor_pid=process.pid, argv=list(argv))
    phase("spawned", f"pid {process.pid}: {' '.join(argv)}")
    handed = False
    try:
        answer = await _exchange(channel, process, state, fds, self_upgrade_timeout, what)
        handed = True
    finally:
        if not handed:
            await _kill(process)
            channel.close()
    if answer.op != "in_charge" or answer.pid != process.pid:
        await _kill(process)
        channel.close()
        raise UpgradeError(f"{what} refused the handover: {answer.reason or answer.op}")
    return Successor(process, channel)


async def _exchange(
    channel: trio.socket.SocketType,
    process: ProcessHandle,
    state: SupervisorState,
    fds: Sequence[tuple[str, int]],
    self_upgrade_timeout: float,
    what: str,
) -> HandoverReply:
    answer: HandoverReply | None = None
    problem: str | None = None
    talked = trio.Event()

    async def talk(cancel: trio.CancelScope) -> None:
        nonlocal answer, problem
        try:
            await put(channel, fds, state.model_dump(mode="json"))
            received = await get(channel)
        except ProtocolError as exc:
            problem = str(exc)  # it hung up: watch() reports how it exited
        else:
            answer, problem = _parse_reply(received)
            cancel.cancel()
        talked.set()

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
        raise UpgradeError(f"{what} {describe_exit(process.returncode)} before taking over{hint}")
    if timer.cancelled_caught:
        raise UpgradeError(
            f"{what} did not take over within supervisor.self_upgrade_timeout = "
            f"{self_upgrade_timeout:g}s "
            "and was killed; see its messages in handoffd's log, or raise the timeout"
        )
    raise UpgradeError(f"{what} broke the handover: {problem}")


def _parse_reply(received: Received) -> tuple[HandoverReply | None, str | None]:
    received.close()  # a reply carries no fds; never keep what a confused peer sent
    try:
        return HandoverReply.model_validate(received.payload), None
    except ValidationError:
        return None, f"it answered {str(received.payload)[:200]}, not a handover reply"


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
    spawner: Spawner = DEFAULT_SPAWNER,
) -> HandoverOutcome:
    """The old supervisor's side of one self-upgrade; never raises for a failure of the new one.

    Freezes ``gens``, snapshots ``view()``, offers it to a new handoffd and commits. Before the
    commit every failure SIGKILLs the successor (after claiming systemd's MAINPID back, so systemd
    never sees "main process killed" for a unit that keeps serving); the caller then thaws the
    generations and carries on.
    """
    spawned: list[int] = []
    successor: Successor | None = None
    committed = False
    reason: str | None = None
    try:
        try:
            if os.getpid() == 1:
                raise UpgradeError(
                    "handoffd runs as pid 1 (a container's init): its exit would end the "
                    "container, so it cannot hand over; restart the container instead"
                )
            if spawner.handover_refusal is not None:
                raise UpgradeError(spawner.handover_refusal)
            # The same check the new one makes, here for the exact message and no spawn.
            loaded = load_config(config_path)
            argv = successor_command(ticket.request.exec_path, loaded.path, environ)
            ticket.phase("config_loaded", str(loaded.path))
            for gen in gens:
                await gen.freeze()
            state, fds = snapshot(view())
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
            ticket.phase("in_charge", f"supervisor pid {successor.pid}")
            reply = ticket.ok(generation, generation, supervisor_pid=successor.pid)
            # Let go before the commit leaves: sending it may wait, and a drain deadline reached
            # meanwhile must not SIGKILL workers the successor is taking. A failed commit takes
            # them back (the caller thaws them).
            for gen in gens:
                gen.hand_over()
            await successor.commit(reply)
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
    """What a successor received, owned until it is claimed or ``close()``d."""

    def __init__(
        self,
        channel: trio.socket.SocketType,
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
    def _rebuild(
        cls,
        channel: trio.socket.SocketType,
        received: Received,
        config_path: Path,
        spawner: Spawner,
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
            peer = _peer_pid(channel)
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

            def take(name: str | None) -> int:
                if name is None or name not in fds:
                    raise ProtocolError(
                        f"the supervisor state names fd {name!r}, which was not sent"
                    )
                return fds.pop(name)

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
            generations: list[AdoptedGeneration] = []
            for hg in state.generations:
                program = _validate(ProgramConfig, hg.program, f"generation {hg.number}'s program")
                workers: list[AdoptedWorker] = []
                for hw in hg.workers:
                    worker = _adopt(hw, take, spawner)
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
            if fds:
                log.warning("handover.unknown_fds_closed", fdnames=sorted(fds))
            cleanup_on_fail.pop_all()
        _close_fds(fds.values())
        return cls(channel, state, listeners, parked, generations, last_upgrade)

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
        notify_socket = self.state.notify_socket
        try:
            if notify_socket:
                await _claim_main_pid({"NOTIFY_SOCKET": notify_socket}, status)
            answer = HandoverReply(op="in_charge", pid=os.getpid())
            await put(self.channel, [], answer.model_dump(mode="json"))
        except HandoffError as exc:
            await _refuse(self.channel, str(exc))
            raise
        try:
            with trio.fail_after(self_upgrade_timeout):
                received = await get(self.channel)
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
            self.channel.close()
        received.close()
        # A message arrived: the old supervisor committed and is leaving. From here on we are in
        # charge whatever it said: refusing now would orphan every worker. A reply we cannot
        # read (an older handoffd's format) only costs the last-upgrade record.
        try:
            commit = HandoverCommit.model_validate(received.payload)
            self.last_upgrade = UpgradeReply.model_validate(commit.reply)
        except ValidationError:
            log.warning("handover.commit_unreadable", payload=str(received.payload)[:200])

    async def refuse(self, reason: str) -> None:
        """Tell the old supervisor we will not take over, and why (it then carries on)."""
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
        self.channel.close()


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
    """Turn an older state version into the current one (version 1 is the first: nothing yet)."""
    return {**raw, "v": STATE_VERSION}


_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], value: Mapping[str, JsonValue], what: str) -> _M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(render_errors(exc, limit=3))
        raise ProtocolError(f"the supervisor state's {what} is not valid here: {problems}") from exc


def _adopt(hw: HandedWorker, take: Callable[[str | None], int], spawner: Spawner) -> AdoptedWorker:
    process: ProcessHandle | None = None
    receiver: NotifyReceiver | None = None
    channel: socket.socket | None = None
    if hw.pid is not None:
        with ExitStack() as cleanup_on_fail:
            if hw.notify_path is None:
                raise ProtocolError(f"worker pid {hw.pid} came without its notify socket path")
            process = spawner.adopt(hw.pid, None if hw.pidfd is None else take(hw.pidfd))
            cleanup_on_fail.callback(process.close)
            raw = _socket_from(take(hw.notify))
            cleanup_on_fail.callback(raw.close)
            receiver = NotifyReceiver(path=hw.notify_path, sock=trio.socket.from_stdlib_socket(raw))
            if hw.channel is not None:
                channel = _socket_from(take(hw.channel))
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
