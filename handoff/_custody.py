"""Socket custody: what handoffd supervises, on record, so that a restart after a crash takes it back.

A handoffd killed by SIGKILL (or the OOM killer) outside systemd leaves its workers running: they
hold the listening sockets and serve on, unsupervised, for ever, and a new ``handoffd run`` on the
same config cannot bind ("Address already in use"). So the supervisor keeps a small record in its
runtime dir (``custody.json``): its pid and start time, every generation's workers (pid, start
time, notify socket path) and every listener's socket cookie. A new ``handoffd run`` that finds
the record of a dead predecessor whose workers live:

1. takes the listeners back from those workers with pidfd_getfd(2), matched by socket cookie
   (``SO_COOKIE``, socket(7): unique for the socket's life) and address. These are the same open
   file descriptions, so the kernel's accept queue never closes and no connection is refused;
2. adopts the workers as the generations they were (numbers, program config, current or
   draining), watched through pidfds as the workers a self-upgrade hands over are
   (``run_adopted_generation``); a slot whose worker exits is restarted as our own child;
3. binds each worker's recorded ``NOTIFY_SOCKET`` path again, so that a worker keeps being heard
   (STATUS=, a restarted child's READY=1). The path is in our runtime dir: only we can bind it.

Design notes:
- A pid is checked against its start time (proc(5) ``stat`` field 22) when recorded and again
  after ``pidfd_open(2)``: a pid reused by an unrelated process is never taken for a worker or
  for the predecessor, and from the pidfd on, the identity is pinned.
- pidfd_getfd(2) (Linux 5.6) needs PTRACE_MODE_ATTACH on the worker: root (CAP_SYS_PTRACE) has
  it; a non-root handoffd has it for its own uid's dumpable processes unless Yama's
  ``ptrace_scope`` >= 1 (Ubuntu's default) limits it to its descendants, which orphans are not.
  Then the start fails (exit 2) naming the orphans and the fix. It never kills them itself:
  they are serving, and the operator chooses between a restart with refusals and root.
- The record is rewritten (atomically: a random ``O_EXCL`` temp file and ``rename(2)``, mode
  0600, relative to the runtime dir held open) when handoffd starts, when a worker is spawned or
  adopted, and when a generation is promoted, adopted or drained: never on a request's path. It
  is read back only if it is a regular file of our uid, mode 0600, not a symlink, and valid.
- A supervisor writes the record only once it has claimed it, and only while the file on disk is
  the one it wrote last: the supervisor that handed over (self-upgrade) never overwrites its
  successor's. A clean stop removes it. The successor claims it once in charge; a supervisor
  killed mid-handover, before the successor took charge, leaves its own record naming the same
  workers, so the next start recovers the same way (a successor that never took charge only
  holds copies: the workers are taken back from whoever still serves).
- A predecessor that is still alive (same pid and start time) but did not answer on the control
  socket is refused, never recovered from: two supervisors must never watch the same workers.
- Under systemd with the fd store, the listeners come back as ``LISTEN_FDS`` on a restart:
  custody takes from orphans only the listeners that did not, and adopts the workers. With the
  shipped units' ``KillMode=control-group`` systemd stops the whole cgroup when handoffd dies, so
  no orphan is left: the record names dead workers only and is ignored (``KillMode=process``
  would leave them, and custody adopts them).
- Parked fds lived in the dead supervisor only: they are lost. Listeners retired by an upgrade
  but still used by a draining generation are not recorded: the drain finishes without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, final

import structlog
import trio
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from ._config import ProgramConfig
from ._errors import ListenerError
from ._generation import AdoptedWorker
from ._listen_fds import parse_listen_fds
from ._listeners import Listener, socket_matches
from ._notify import NotifyReceiver
from ._phases import WorkerState  # noqa: TC001  pydantic resolves it at run time
from ._pidfd import pidfd_getfd as pidfd_getfd
from ._pidfile import write_file_at
from ._spawn import DEFAULT_SPAWNER

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._config import LoadedConfig
    from ._generation import Generation
    from ._generation_set import GenerationSet
    from ._handover import AdoptedGeneration
    from ._held import HeldListeners
    from ._runtime_dir import HeldDir

    #: pidfd_getfd(pidfd, targetfd) -> a new fd of ours (the seam tests replace).
    GetFd = Callable[[int, int], int]

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: The record's name in the runtime dir.
RECORD_NAME: Final = "custody.json"
#: Bumped for any change an older reader would misread; another version is ignored (logged).
RECORD_VERSION: Final = 1
# Ours alone: it names every worker and socket we supervise.
RECORD_MODE: Final = 0o600
# A record of 1,024 workers is ~200 KiB; a far larger file is not one we wrote.
_RECORD_MAX_BYTES: Final = 4 << 20
# socket(7) SO_COOKIE (asm-generic/socket.h, Linux 4.12); Python 3.11 has no constant for it.
SO_COOKIE: Final = 57
_FIX: Final = (
    "stop them (kill -TERM {pids}: they drain) and start handoffd again, or run handoffd as "
    "root or with CAP_SYS_PTRACE to take them over without a refused connection"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class RecordedWorker(_Model):
    index: int
    pid: int
    start: int  # proc(5) stat field 22: clock ticks after boot
    notify_path: str | None
    state: WorkerState
    restarts: int = 0
    ever_ready: bool = False


class RecordedGeneration(_Model):
    number: int
    # "starting": N+1 of an upgrade (or generation 1) that was never promoted.
    role: Literal["current", "draining", "starting"]
    # Wall clock (time.time()) by which its drain SIGKILLs; None: not signalled yet.
    drain_deadline: float | None = None
    listeners: list[str]
    program: dict[str, JsonValue]  # ProgramConfig as JSON
    workers: list[RecordedWorker]


class RecordedListener(_Model):
    name: str
    configured: str  # the config's address ("127.0.0.1:0")
    address: str  # family, type and bound name, as ``socket_address`` renders them
    cookie: int


class CustodyRecord(_Model):
    """The record of one supervisor (see the module notes)."""

    v: int
    pid: int
    start: int
    config_path: str
    next_generation: int
    generations: list[RecordedGeneration]
    listeners: list[RecordedListener]


# ---- the kernel's side ----


def start_time(pid: int) -> int | None:
    """proc(5) ``/proc/PID/stat`` field 22 (start time); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # comm may hold anything: skip it
        return None if fields[0] == b"Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def socket_cookie(sock: socket.socket) -> int:
    """The socket's ``SO_COOKIE``: the same for every fd of one socket, in any process."""
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def socket_address(sock: socket.socket) -> str:
    """Family, type and bound name: ``AF_INET/SOCK_STREAM/('127.0.0.1', 8080)``."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        name = name[:2]  # AF_INET6's flowinfo and scope id are not the address
    elif isinstance(name, bytes):
        name = name.decode("latin-1")
    return f"{sock.family.name}/{sock.type.name}/{name!r}"


# ---- the record ----


def read_record(root: HeldDir) -> CustodyRecord | None:
    """The record in the runtime dir, if there is one we wrote; anything else is logged, ignored."""
    where = str(root.real / RECORD_NAME)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(RECORD_NAME, flags, dir_fd=root.fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        _refused(where, f"cannot open it without following a link: {exc.strerror}")
        return None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            problem = "it is not a regular file"
        elif info.st_uid != os.getuid():
            problem = f"it is owned by uid {info.st_uid}, not by uid {os.getuid()}"
        elif mode & 0o077:
            problem = f"its mode is {mode:o}, not {RECORD_MODE:o}"
        elif info.st_size > _RECORD_MAX_BYTES:
            problem = f"it is {info.st_size} bytes, more than a record can be"
        else:
            problem = None
        if problem is not None:
            _refused(where, problem)
            return None
        data = os.read(fd, _RECORD_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        payload = json.loads(data)
        version = payload.get("v") if isinstance(payload, dict) else None
        if version != RECORD_VERSION:
            _refused(where, f"record version {version!r}; this handoffd writes {RECORD_VERSION}")
            return None
        return CustodyRecord.model_validate(payload)
    except (ValueError, ValidationError) as exc:
        _refused(where, f"it is not a valid record: {str(exc).splitlines()[0]}")
        return None


def _refused(where: str, problem: str) -> None:
    log.warning(
        "custody.record_refused",
        path=where,
        reason=problem,
        hint="handoffd does not use it; workers a crashed handoffd left running are not adopted",
    )


@final
class CustodyKeeper:
    """Keeps one supervisor's record current (see the module notes on who may write it).

    ``handed_over`` says whether a successor is in charge (from then on nothing is written).
    """

    def __init__(
        self,
        root: HeldDir,
        held: HeldListeners,
        gens: GenerationSet,
        config_path: Path,
        handed_over: Callable[[], bool],
    ) -> None:
        self.root = root
        self.held = held
        self.gens = gens
        self.config_path = config_path
        self.handed_over = handed_over
        # (st_dev, st_ino) of the record we wrote last; None until claimed.
        self._written: tuple[int, int] | None = None
        self._starts: dict[int, int] = {}
        self._own_start = start_time(os.getpid()) or 0

    def claim(self) -> None:
        """Write our record whoever's is there (a start, or a successor now in charge)."""
        self._write()

    def update(self) -> None:
        """Rewrite our record (a worker started, a generation changed); only if still ours."""
        if self._still_ours():
            self._write()

    def remove(self) -> None:
        """A clean stop: nothing is left to take back. Never a successor's record."""
        if self._still_ours():
            with contextlib.suppress(OSError):
                os.unlink(RECORD_NAME, dir_fd=self.root.fd)
        self._written = None

    def _still_ours(self) -> bool:
        """Claimed, not handed over, and the file on disk is the one we wrote last."""
        return (
            self._written is not None
            and not self.handed_over()
            and self._on_disk() == self._written
        )

    def _on_disk(self) -> tuple[int, int] | None:
        try:
            info = os.stat(RECORD_NAME, dir_fd=self.root.fd, follow_symlinks=False)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _write(self) -> None:
        data = self.snapshot().model_dump_json().encode()
        try:
            write_file_at(self.root.fd, RECORD_NAME, data, RECORD_MODE)
        except OSError as exc:
            log.warning(
                "custody.record_not_written",
                path=str(self.root.real / RECORD_NAME),
                error=exc.strerror,
                hint="a restart after a crash cannot adopt the workers left running",
            )
            return
        self._written = self._on_disk()

    def snapshot(self) -> CustodyRecord:
        """The record of what we supervise now."""
        gens = self.gens
        roles: list[tuple[Generation | None, Literal["current", "draining", "starting"]]] = [
            (gens.current, "current"),
            *((g, "draining") for g in gens.draining),
            (gens.starting, "starting"),
            (gens.holding, "starting"),
        ]
        seen: set[int] = set()
        recorded: list[RecordedGeneration] = []
        alive: set[int] = set()
        for gen, role in roles:
            if gen is None or id(gen) in seen:
                continue
            seen.add(id(gen))
            recorded.append(self._generation(gen, role, alive))
        self._starts = {pid: t for pid, t in self._starts.items() if pid in alive}
        return CustodyRecord(
            v=RECORD_VERSION,
            pid=os.getpid(),
            start=self._own_start,
            config_path=str(self.config_path),
            next_generation=gens.next_number,
            generations=recorded,
            listeners=[
                RecordedListener(
                    name=li.name,
                    configured=li.config.address,
                    address=socket_address(li.sock),
                    cookie=socket_cookie(li.sock),
                )
                for li in self.held.values()
            ],
        )

    def _generation(
        self, gen: Generation, role: Literal["current", "draining", "starting"], alive: set[int]
    ) -> RecordedGeneration:
        workers: list[RecordedWorker] = []
        for slot in gen.slots:
            proc = slot.process
            if proc is None or proc.returncode is not None:
                continue
            started = self._starts.get(proc.pid) or start_time(proc.pid)
            if started is None:
                continue
            self._starts[proc.pid] = started
            alive.add(proc.pid)
            workers.append(
                RecordedWorker(
                    index=slot.index,
                    pid=proc.pid,
                    start=started,
                    notify_path=slot.notify.path if slot.notify is not None else None,
                    state=slot.state,
                    restarts=slot.restarts,
                    ever_ready=slot.ever_ready,
                )
            )
        deadline = None
        if gen.drain_deadline is not None:
            deadline = time.time() + (gen.drain_deadline - trio.current_time())
        return RecordedGeneration(
            number=gen.number,
            role="draining" if gen.is_draining() and role == "current" else role,
            drain_deadline=deadline,
            listeners=[name for name, _ in gen.spec.listeners],
            program=gen.spec.program.model_dump(mode="json"),
            workers=workers,
        )


# ---- taking it back ----


@final
@dataclass
class Orphans:
    """What a dead predecessor left running, taken back: owned until claimed or ``close()``d."""

    predecessor: int
    listeners: dict[str, Listener]
    generations: list[AdoptedGeneration]
    current: int | None
    next_generation: int
    pids: list[int] = field(default_factory=list)

    def claim_listeners(self) -> dict[str, Listener]:
        listeners, self.listeners = self.listeners, {}
        return listeners

    def claim_generations(self) -> list[AdoptedGeneration]:
        generations, self.generations = self.generations, []
        return generations

    def close(self) -> None:
        """Let go of what was not claimed, without touching a worker."""
        for li in self.claim_listeners().values():
            li.close()
        for gen in self.claim_generations():
            for worker in gen.workers:
                worker.close()


@dataclass
class _Live:
    generation: RecordedGeneration
    worker: RecordedWorker
    pidfd: int


def recover_orphans(
    root: HeldDir,
    notify_dir: Path,
    loaded: LoadedConfig,
    environ: Mapping[str, str],
    control_path: Path,
    *,
    getfd: GetFd = pidfd_getfd,
) -> Orphans | None:
    """Take back what a dead predecessor's record names and is still alive (module notes).

    Returns None when there is nothing to take back (no record, or every worker in it has
    exited: the record is removed and handoffd starts fresh).

    Raises:
        ListenerError: the predecessor is alive, or its workers' listeners cannot be taken
            (naming the pids and the fix).
    """
    record = read_record(root)
    if record is None:
        return None
    where = root.real / RECORD_NAME
    if record.pid != os.getpid() and start_time(record.pid) == record.start:
        raise ListenerError(
            f"handoffd pid {record.pid} (recorded in {where}) is still running but does not "
            f"answer on its control socket {control_path}; stop it (kill {record.pid}) and "
            "start again"
        )
    with ExitStack() as cleanup_on_fail:
        live: list[_Live] = []
        for rg in record.generations:
            for rw in rg.workers:
                pidfd = _open_if_same(rw)
                if pidfd is not None:
                    cleanup_on_fail.callback(os.close, pidfd)
                    live.append(_Live(rg, rw, pidfd))
        if not live:
            log.info(
                "custody.record_ignored",
                path=str(where),
                predecessor=record.pid,
                reason="every worker it names has exited",
            )
            with contextlib.suppress(OSError):
                os.unlink(RECORD_NAME, dir_fd=root.fd)
            return None
        pids = [each.worker.pid for each in live]
        taken = _take_listeners(record, live, environ, getfd)
        for sock in taken.values():
            cleanup_on_fail.callback(sock.close)
        listeners, names = _match_listeners(record, taken, loaded)
        generations, current = _adopt(record, live, names, notify_dir, loaded)
        cleanup_on_fail.pop_all()
    log.info(
        "custody.recovered",
        predecessor=record.pid,
        pids=pids,
        generations=[g.number for g in generations],
        current=current,
        listeners=sorted(listeners),
    )
    return Orphans(
        predecessor=record.pid,
        listeners=listeners,
        generations=generations,
        current=current,
        next_generation=record.next_generation,
        pids=pids,
    )


def _open_if_same(rw: RecordedWorker) -> int | None:
    """A pidfd of the recorded worker if it is still that process (same start time)."""
    before = start_time(rw.pid)
    if before != rw.start:
        if before is not None:
            log.info("custody.pid_reused", pid=rw.pid, recorded_start=rw.start, start=before)
        return None
    pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # not Linux: pidfd_getfd is Linux-only, nothing to take fds with
        return None
    try:
        pidfd = int(pidfd_open(rw.pid))
    except ProcessLookupError:
        return None
    if start_time(rw.pid) != rw.start:  # it exited and the pid was reused in between
        os.close(pidfd)
        return None
    return pidfd


def _socket_fds(pid: int, listeners: int) -> list[int]:
    """The worker's fds 3.. that may be sockets: every socket /proc shows, every fd it lists
    when it hides what they are, the spawn layout (3..) when it lists nothing."""
    try:
        numbers = sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd") if int(name) > 2)
    except (OSError, ValueError):
        return list(range(3, 3 + max(listeners, 1)))
    found = []
    for number in numbers:
        try:
            if os.readlink(f"/proc/{pid}/fd/{number}").startswith("socket:"):
                found.append(number)
        except PermissionError:
            return numbers  # no ptrace read access: pidfd_getfd will say so
        except OSError:
            continue  # closed meanwhile
    return found


def _inherited_cookies(environ: Mapping[str, str]) -> set[int]:
    """Cookies of the sockets the service manager passed (the fd store gave them back)."""
    cookies: set[int] = set()
    with contextlib.suppress(ValueError):
        for item in parse_listen_fds(environ, os.getpid()) or []:
            with contextlib.suppress(OSError):
                probe = socket.socket(fileno=item.fd)
                try:
                    cookies.add(socket_cookie(probe))
                finally:
                    probe.detach()
    return cookies


def _take_listeners(
    record: CustodyRecord, live: Sequence[_Live], environ: Mapping[str, str], getfd: GetFd
) -> dict[int, socket.socket]:
    """Copy each recorded listener from a live worker, by cookie and address."""
    inherited = _inherited_cookies(environ)
    wanted = {rl.cookie: rl for rl in record.listeners if rl.cookie not in inherited}
    taken: dict[int, socket.socket] = {}
    refused: dict[int, str] = {}
    for each in live:
        if len(taken) == len(wanted):
            break
        for target in _socket_fds(each.worker.pid, len(each.generation.listeners)):
            try:
                fd = getfd(each.pidfd, target)
            except PermissionError as exc:
                refused[each.worker.pid] = exc.strerror or str(exc)
                break
            except OSError:
                continue  # closed meanwhile, or the worker exited
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            rl = wanted.get(socket_cookie(sock))
            if rl is None or rl.cookie in taken or socket_address(sock) != rl.address:
                sock.close()
                continue
            taken[rl.cookie] = sock
    missing = sorted(rl.name for cookie, rl in wanted.items() if cookie not in taken)
    if missing and refused:
        for sock in taken.values():
            sock.close()
        pids = " ".join(str(pid) for pid in sorted(each.worker.pid for each in live))
        reason = next(iter(refused.values()))
        raise ListenerError(
            f"a handoffd that was killed (pid {record.pid}) left workers running that still "
            f"serve listener {', '.join(map(repr, missing))}: pids {pids}; this handoffd may not "
            f"take the listeners back from them (pidfd_getfd: {reason}: it needs ptrace access, "
            "which a process without CAP_SYS_PTRACE lacks for another uid's processes, for "
            "non-dumpable ones, and under Yama ptrace_scope >= 1 for any it did not start); "
            f"{_FIX.format(pids=pids)}"
        )
    return taken


def _match_listeners(
    record: CustodyRecord, taken: Mapping[int, socket.socket], loaded: LoadedConfig
) -> tuple[dict[str, Listener], dict[str, str]]:
    """Give the taken sockets to the configured listeners (by name, then by address).

    Returns them by config name, and the config name of each recorded name.
    """
    pool = {rl.name: (rl, taken[rl.cookie]) for rl in record.listeners if rl.cookie in taken}
    listeners: dict[str, Listener] = {}
    names: dict[str, str] = {}
    for config in loaded.config.listener:
        addr = config.parsed_address
        pick = pool.get(config.name)
        if pick is not None and not (
            pick[0].configured == config.address or socket_matches(pick[1], addr)
        ):
            pick = None
        if pick is None:
            pick = next((p for p in pool.values() if socket_matches(p[1], addr)), None)
        if pick is None:
            continue
        rl, sock = pick
        del pool[rl.name]
        listeners[config.name] = listener = Listener(config=config, sock=sock, origin="recovered")
        names[rl.name] = config.name
        log.info(
            "listener.recovered",
            listener=config.name,
            address=listener.bound_address(),
            fd=sock.fileno(),
        )
    for rl, sock in pool.values():
        # Not configured any more: the orphans keep their own copies until they drain.
        log.info("listener.not_recovered", listener=rl.name, reason="not in the config")
        sock.close()
    return listeners, names


def _adopt(
    record: CustodyRecord,
    live: Sequence[_Live],
    names: Mapping[str, str],
    notify_dir: Path,
    loaded: LoadedConfig,
) -> tuple[list[AdoptedGeneration], int | None]:
    """The recorded generations that still have a live worker, ready for adoption."""
    from ._handover import AdoptedGeneration

    by_slot = {(each.generation.number, each.worker.index): each for each in live}
    generations: list[AdoptedGeneration] = []
    current: int | None = None
    with ExitStack() as cleanup_on_fail:
        for rg in record.generations:
            workers: list[AdoptedWorker] = []
            for rw in rg.workers:
                each = by_slot.get((rg.number, rw.index))
                if each is None:
                    continue
                worker = AdoptedWorker(
                    index=rw.index,
                    process=DEFAULT_SPAWNER.adopt(rw.pid, each.pidfd),
                    notify=_notify_receiver(rw, rg.number, notify_dir),
                    channel=None,  # an scm_rights worker got its fds at start
                    state=rw.state,
                    status=None,
                    restarts=rw.restarts,
                    last_exit=None,
                    ever_ready=rw.ever_ready,
                )
                cleanup_on_fail.callback(worker.close)
                workers.append(worker)
            if not workers:
                continue
            try:
                program = ProgramConfig.model_validate(rg.program)
            except ValidationError:
                program = loaded.config.program
            draining = rg.role != "current"
            remaining = None
            if rg.role == "draining" and rg.drain_deadline is not None:
                remaining = rg.drain_deadline - time.time()
            if not draining:
                current = rg.number
            generations.append(
                AdoptedGeneration(
                    number=rg.number,
                    program=program,
                    listeners=[names[n] for n in rg.listeners if n in names],
                    draining=draining,
                    drain_remaining=remaining,
                    workers=workers,
                )
            )
        cleanup_on_fail.pop_all()
    return generations, current


def _notify_receiver(rw: RecordedWorker, number: int, notify_dir: Path) -> NotifyReceiver:
    """Bind the worker's own NOTIFY_SOCKET path again (only one in our notify dir)."""
    path = rw.notify_path
    if path is not None and Path(path).parent == notify_dir and Path(path).name[:1] != ".":
        try:
            return NotifyReceiver.bind(path)
        except OSError as exc:
            log.warning("custody.notify_not_rebound", pid=rw.pid, path=path, error=exc.strerror)
    # Supervised all the same; what it sends to its old path is lost.
    return NotifyReceiver.bind(f"{notify_dir}/{number}.{rw.index}.adopted-{rw.pid}")
