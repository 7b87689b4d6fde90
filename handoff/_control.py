"""The control socket: newline-delimited JSON requests and replies, server and client.

Design notes:
- A Unix stream socket, mode 0600, whose peers are checked with SO_PEERCRED against root, our
  own uid and ``supervisor.allowed_uids``. The socket is bound under a temporary name and renamed
  into place, so a client never sees a half-set-up socket and a successor supervisor can take
  the path over atomically.
- One request per line, at most ``MAX_LINE`` bytes. A malformed, unknown or oversized request
  (or one that repeats a key: ``{"op":"status","op":"stop"}`` must not mean "stop") gets
  ``{"ok": false, "error": {...}}`` and the daemon carries on; an oversized line also ends that
  connection, since the rest of it cannot be framed.
- ``upgrade`` streams ``{"event": ...}`` lines while it runs and ends with the reply, so
  ``handoffd upgrade`` (and ``systemctl reload`` through it) returns only when the outcome is known.
- Control clients must never starve the workers of fds (a crashed worker must always be
  restartable) nor the daemon of memory: at most ``MAX_CONNECTIONS`` allowed connections are
  served and ``MAX_REFUSALS`` refused ones answered at once, each buffering at most ``MAX_LINE``
  bytes; everyone else waits in the kernel's backlog (the client's connect has a deadline).
- Past the limit, a newcomer takes the place of the connection idle the longest, once that one
  has been idle (no request being served, none waiting unread) for ``EVICT_IDLE_AFTER``: idle
  clients cannot lock ``status`` out, and a client between its connect and its send is not cut
  off by a burst of others. Otherwise accept waits for room, and after ``ADMIT_TIMEOUT`` (every
  connection is serving a long request: upgrades, stops) the newcomer is told to retry.
- A connection must send each request line within the idle timeout of connecting or of its
  previous reply, and read each reply within it; a request being served (a streaming
  ``upgrade``, a ``stop``) has no deadline.
- A refused connection (a uid not allowed, or no room) has its request line read, bounded in
  size and time, before the refusal is written: replying first races the client's send, which
  then fails with EPIPE, and closing with the request unread resets the connection. Past
  ``MAX_REFUSALS`` the oldest refusal is written at once: refused uids cannot queue up and
  delay the allowed ones.
- Refusals and closes are logged at most once per ``REFUSAL_LOG_INTERVAL`` per kind, with a count
  of those held back: a refused uid must not be able to fill the journal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import struct
import termios
from typing import TYPE_CHECKING, Annotated, Final, Literal, Protocol, final

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import _client
from ._peercred import peer_uid
from ._phases import Phase, WorkerState  # noqa: TC001  pydantic resolves them at run time
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from collections.abc import Set as AbstractSet
    from pathlib import Path

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

PROTOCOL_VERSION: Final = 1
# Requests are tiny (the longest, an upgrade with an exec_path of PATH_MAX, is under 4.2 KiB);
# a line longer than this is a client bug or an attack, not a request.
MAX_LINE: Final = 16 * 1024
#: Allowed connections served at once. Each holds an fd (which a worker may need more) and up to
#: MAX_LINE of buffer; past this the longest-idle one is closed to make room.
MAX_CONNECTIONS: Final = 64
#: Refusals (a uid not allowed, or no room) being answered at once; past this the oldest is
#: answered without waiting for its request.
MAX_REFUSALS: Final = 8
#: How long a connection must have been idle before a newcomer may take its place: far longer
#: than any client takes between its connect and its request.
EVICT_IDLE_AFTER: Final = 1.0
#: How long a newcomer waits for room when no connection may be evicted, before it is told
#: that handoffd is busy.
ADMIT_TIMEOUT: Final = 2.0
#: How long a connection may take to send a request line (from connecting or its previous reply)
#: or to read a reply: an idle, half-sent or non-reading connection is closed after it.
IDLE_TIMEOUT: Final = 10.0
#: Overrides IDLE_TIMEOUT (seconds), for tests and for operators with very slow clients.
IDLE_TIMEOUT_ENV: Final = "HANDOFF_CONTROL_IDLE_TIMEOUT"
#: How long a refused connection gets to send its request line before the refusal is written.
REFUSAL_READ_TIMEOUT: Final = 2.0
#: At most one log line per kind of refusal (or close) per this many seconds.
REFUSAL_LOG_INTERVAL: Final = 10.0


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class StatusRequest(_Wire):
    v: Literal[1] = 1
    op: Literal["status"] = "status"


class UpgradeRequest(_Wire):
    v: Literal[1] = 1
    op: Literal["upgrade"] = "upgrade"
    supervisor: bool = False  # True: replace handoffd itself (``upgrade --self``)
    exec_path: str | None = None


class StopRequest(_Wire):
    v: Literal[1] = 1
    op: Literal["stop"] = "stop"


class MetricsRequest(_Wire):
    v: Literal[1] = 1
    op: Literal["metrics"] = "metrics"


_AnyRequest = StatusRequest | UpgradeRequest | StopRequest | MetricsRequest
Request = Annotated[_AnyRequest, Field(discriminator="op")]
_request_adapter: TypeAdapter[_AnyRequest] = TypeAdapter(Request)


class WorkerInfo(_Wire):
    generation: int
    index: int
    pid: int | None
    state: WorkerState
    status: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    #: Its tree below it: descendants, and group members reparented to handoffd.
    descendants: list[int] = Field(default_factory=list)
    #: How its readiness is decided when that is not its mode's usual way (a fallback).
    readiness: str | None = None
    #: Notify datagrams refused: their sender was not in the worker's process tree.
    notify_rejected: int = 0


class GenerationInfo(_Wire):
    number: int
    #: The sum of VmRSS over every process of its workers' trees, in KiB.
    rss_kib: int
    processes: int


class ListenerInfo(_Wire):
    name: str
    address: str
    fd: int
    origin: str


class UpgradePhase(_Wire):
    phase: str
    elapsed_s: float
    detail: str | None = None


class UpgradeReply(_Wire):
    ok: bool
    op: Literal["upgrade"] = "upgrade"
    outcome: Literal["ok", "failed"]
    reason: str | None = None
    generation: int
    previous_generation: int | None = None
    duration_s: float
    phases: list[UpgradePhase] = Field(default_factory=list)
    supervisor_pid: int | None = None


class UpgradeEvent(_Wire):
    event: Literal["phase"] = "phase"
    phase: str
    elapsed_s: float
    detail: str | None = None


class StatusInfo(_Wire):
    ok: bool = True
    op: Literal["status"] = "status"
    pid: int
    version: str
    config: str
    state: Phase
    generation: int
    workers: list[WorkerInfo]
    listeners: list[ListenerInfo]
    parked: list[str] = Field(default_factory=list)
    draining_generations: list[int] = Field(default_factory=list)
    last_upgrade: UpgradeReply | None = None
    #: Whether the current generation serves: every worker ready and holding its listeners.
    serving: bool = True
    #: Why not, when ``serving`` is false (``handoffd status`` then exits 4).
    not_serving: str | None = None
    generations: list[GenerationInfo] = Field(default_factory=list)
    #: What this platform lacks, "what: why" (see _platform.degradations); empty on new Linux.
    degraded: list[str] = Field(default_factory=list)


class StopReply(_Wire):
    ok: bool = True
    op: Literal["stop"] = "stop"


class MetricsReply(_Wire):
    ok: bool = True
    op: Literal["metrics"] = "metrics"
    #: The Prometheus text exposition, as ``GET /metrics`` serves it.
    text: str


class ErrorDetail(_Wire):
    code: str
    message: str


class ErrorReply(_Wire):
    ok: Literal[False] = False
    error: ErrorDetail


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` that refuses a repeated key (json keeps the last one silently)."""
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKeyError(key)
        found[key] = value
    return found


def error_line(code: str, message: str) -> bytes:
    return (
        ErrorReply(error=ErrorDetail(code=code, message=message)).model_dump_json().encode() + b"\n"
    )


class ControlHandler(Protocol):
    """What the supervisor offers to the control socket."""

    def status(self) -> StatusInfo: ...

    async def upgrade(
        self, request: UpgradeRequest, on_event: Callable[[UpgradeEvent], Awaitable[None]]
    ) -> UpgradeReply: ...

    def stop(self) -> None: ...

    def metrics_text(self) -> str | None:
        """The Prometheus text exposition, or None when ``[metrics]`` is not configured."""


def bind_control_socket(path: Path, mode: int = 0o600) -> socket.socket:
    """Bind the control socket at ``path`` atomically (bind a temp name, chmod, rename).

    ``mode`` is 0600 unless other uids are allowed: connect(2) on a Unix socket needs write
    permission on its file, and SO_PEERCRED then decides who may talk.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        sock.bind(str(temp))
        os.chmod(temp, mode)
        sock.listen(64)
        os.rename(temp, path)
    except BaseException:
        sock.close()
        raise
    return sock


# accept(2) errors about the one connection being accepted (it went away first): take the next
# one at once. Any other error is logged and retried after a short backoff: "out of a resource
# right now" (EMFILE, ENFILE, ENOMEM, ENOBUFS, as trio's ACCEPT_CAPACITY_ERRNOS) or the
# listener's own trouble, which must not spin the loop.
_ACCEPT_CONNECTION_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})
_ACCEPT_BACKOFF_S: Final = 0.1


def idle_timeout_from(environ: Mapping[str, str]) -> float:
    """The control socket's idle timeout: ``$HANDOFF_CONTROL_IDLE_TIMEOUT`` or IDLE_TIMEOUT."""
    raw = environ.get(IDLE_TIMEOUT_ENV)
    if raw is None:
        return IDLE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        log.warning(
            "control.bad_idle_timeout",
            value=raw,
            hint=f"{IDLE_TIMEOUT_ENV} must be a positive number of seconds; using {IDLE_TIMEOUT:g}",
        )
        return IDLE_TIMEOUT
    return value


@final
class _LogLimiter:
    """At most one log line per key per interval; the next line counts those held back."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """How many lines of ``key`` were held back since the last one, or None: hold this one."""
        now = trio.current_time()
        if now < self._next.get(key, -math.inf):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._held.pop(key, 0)


def _has_unread_input(fd: int) -> bool:
    """Whether bytes wait unread in the socket's receive queue (SIOCINQ, unix(7))."""
    try:
        queued = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return bool(struct.unpack("i", queued)[0])


@final
class _Slot:
    """One connection's place in a table: evictable while idle."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.scope = trio.CancelScope()
        #: Since when it has had no request being served; None while one is.
        self.idle_since: float | None = trio.current_time()
        self.evicted = False


@final
class _Slots:
    """A table of at most ``limit`` connections, where an idle one makes room for a newcomer.

    Remove a slot (``release``) before its fd is closed: the table looks at its fd.
    """

    def __init__(self, limit: int, evict_idle_after: float) -> None:
        self._limit = limit
        self._evict_idle_after = evict_idle_after
        self._live: set[_Slot] = set()
        self._changed = trio.Event()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def set_idle(self, slot: _Slot, idle: bool) -> None:
        slot.idle_since = trio.current_time() if idle else None
        self._change()

    def release(self, slot: _Slot) -> None:
        self._live.discard(slot)
        self._change()

    def count(self) -> int:
        return len(self._live)

    def _victim(self, now: float) -> tuple[_Slot | None, float]:
        """The evictable slot idle the longest, and when another one may become evictable."""
        victim: _Slot | None = None
        wake = math.inf
        for slot in self._live:
            if slot.idle_since is None or _has_unread_input(slot.fd):
                continue  # serving, or its request is there and about to be served
            evictable_at = slot.idle_since + self._evict_idle_after
            if evictable_at > now:
                wake = min(wake, evictable_at)
            elif victim is None or slot.idle_since < (victim.idle_since or 0.0):
                victim = slot
        return victim, wake

    async def admit(self, fd: int) -> _Slot:
        """A slot for the connection ``fd``, evicting an idle one if the table is full, else
        waiting for room (the caller bounds the wait)."""
        while len(self._live) >= self._limit:
            victim, wake = self._victim(trio.current_time())
            if victim is not None:
                victim.evicted = True
                victim.scope.cancel()
                self._live.discard(victim)
                break
            changed = self._changed
            with trio.move_on_at(wake):
                await changed.wait()
        slot = _Slot(fd)
        self._live.add(slot)
        return slot


class _LineTooLongError(Exception):
    pass


@final
class _Peer:
    """One connection's stream, with a deadline on every send: a client that stops reading
    must not hold its slot (and the daemon's buffers) for ever."""

    def __init__(self, stream: trio.SocketStream, send_timeout: float) -> None:
        self.stream = stream
        self._send_timeout = send_timeout
        self._buffer = bytearray()
        self._broken = False

    async def send(self, data: bytes) -> None:
        """Send ``data`` whole.

        Raises:
            trio.BrokenResourceError: the client left, or did not read it in time (the stream
                is then unusable: a cancelled send_all may have written part of the line).
        """
        if self._broken:
            raise trio.BrokenResourceError("an earlier reply was cut off")
        try:
            with trio.fail_after(self._send_timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError as exc:
            self._broken = True
            raise trio.BrokenResourceError("the client does not read its replies") from exc
        except trio.BrokenResourceError:
            self._broken = True
            raise

    async def wait_gone(self) -> bool:
        """Wait until the client closes its end: True; False if it sends more than a line
        meanwhile (kept for ``receive_line``), and is then waited for no longer."""
        try:
            while len(self._buffer) <= MAX_LINE:
                chunk = await self.stream.receive_some(MAX_LINE + 1 - len(self._buffer))
                if not chunk:
                    return True
                self._buffer += chunk
        except trio.BrokenResourceError:
            return True
        return False

    async def receive_line(self) -> bytes | None:
        """The next request line (without its newline), or None at end of stream.

        Raises:
            _LineTooLongError: the line is longer than MAX_LINE.
        """
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                if len(line) > MAX_LINE:
                    raise _LineTooLongError
                return line
            if len(self._buffer) > MAX_LINE:
                raise _LineTooLongError
            # Never more than one byte past MAX_LINE is buffered, whatever the client sends.
            chunk = await self.stream.receive_some(MAX_LINE + 1 - len(self._buffer))
            if not chunk:
                return None
            self._buffer += chunk


async def serve_control(
    listener: socket.socket,
    handler: ControlHandler,
    allowed_uids: AbstractSet[int],
    *,
    idle_timeout: float | None = None,
    task_status: trio.TaskStatus[Callable[[], int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept control connections until cancelled; each connection runs in its own task.

    Nothing a client does (or the kernel says about one connection) may end this loop: it is
    a task of the root nursery, and its death would take every worker with it. ``listener``
    stays the caller's, who opened it: it is closed there once this has returned.

    Args:
        listener: the bound, listening control socket.
        handler: the supervisor.
        allowed_uids: the uids (SO_PEERCRED) that may send requests.
        idle_timeout: see IDLE_TIMEOUT; by default from ``$HANDOFF_CONTROL_IDLE_TIMEOUT``.
        task_status: started once connections are accepted, with a function counting the
            connections being served (for the metrics).
    """
    server = _Server(
        handler,
        allowed_uids,
        idle_timeout if idle_timeout is not None else idle_timeout_from(os.environ),
    )
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        task_status.started(server.slots.count)
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                backoff = 0.0 if exc.errno in _ACCEPT_CONNECTION_ERRNOS else _ACCEPT_BACKOFF_S
                server.log_limited("control.accept_failed", error=str(exc), retry_in_s=backoff)
                await trio.sleep(backoff)
                continue
            try:
                await server.admit(nursery, conn)
            except BaseException:
                conn.close()
                raise


@final
class _Server:
    """What every connection of one control socket shares."""

    def __init__(
        self, handler: ControlHandler, allowed_uids: AbstractSet[int], idle_timeout: float
    ) -> None:
        self.handler = handler
        self.allowed_uids = allowed_uids
        self.idle_timeout = idle_timeout
        self.slots = _Slots(MAX_CONNECTIONS, EVICT_IDLE_AFTER)
        self.refusals = _Slots(MAX_REFUSALS, 0.0)
        self._limiter = _LogLimiter(REFUSAL_LOG_INTERVAL)

    def log_limited(self, event: str, **fields: object) -> None:
        held = self._limiter.allow(event)
        if held is not None:
            log.warning(event, **fields, held_back=held)

    async def admit(self, nursery: trio.Nursery, conn: trio.socket.SocketType) -> None:
        """Start serving or refusing ``conn``, waiting for room if there is none."""
        uid = peer_uid(conn)
        slot: _Slot | None = None
        if uid in self.allowed_uids:
            with trio.move_on_after(ADMIT_TIMEOUT):
                slot = await self.slots.admit(conn.fileno())
            if slot is not None:
                nursery.start_soon(self._serve, conn, slot, uid)
                return
            self.log_limited("control.busy", limit=MAX_CONNECTIONS)
            code = "busy"
            message = (
                f"handoffd is serving {MAX_CONNECTIONS} control requests (upgrades or stops in "
                "progress); try again when they are done"
            )
        else:
            self.log_limited("control.refused", uid=uid)
            code = "forbidden"
            message = f"uid {uid} may not control this handoffd; add it to supervisor.allowed_uids"
        with trio.move_on_after(ADMIT_TIMEOUT):
            slot = await self.refusals.admit(conn.fileno())
        if slot is None:
            conn.close()  # only when every refusal has its request waiting: answered soon
            return
        nursery.start_soon(self._refuse, conn, slot, code, message)

    async def _refuse(
        self, conn: trio.socket.SocketType, slot: _Slot, code: str, message: str
    ) -> None:
        """Read the request line (bounded in size and time), then write the refusal."""
        peer = _Peer(trio.SocketStream(conn), REFUSAL_READ_TIMEOUT)
        async with peer.stream:
            try:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    with (
                        slot.scope,
                        trio.move_on_after(REFUSAL_READ_TIMEOUT),
                        contextlib.suppress(_LineTooLongError),
                    ):
                        await peer.receive_line()
                    await peer.send(error_line(code, message))
            finally:
                self.refusals.release(slot)

    async def _serve(self, conn: trio.socket.SocketType, slot: _Slot, uid: int) -> None:
        peer = _Peer(trio.SocketStream(conn), self.idle_timeout)
        async with peer.stream:
            try:
                # A client that leaves mid-reply is its own problem, never the daemon's.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    with slot.scope:
                        await self._converse(peer, slot, may_exec=uid in (0, os.getuid()))
                    if slot.evicted:
                        self.log_limited("control.evicted", limit=MAX_CONNECTIONS)
                        await peer.send(
                            error_line(
                                "evicted",
                                f"closed to make room: {MAX_CONNECTIONS} control connections "
                                "were open and this one was idle the longest; connect again "
                                "and send the request at once",
                            )
                        )
            finally:
                self.slots.release(slot)

    async def _converse(self, peer: _Peer, slot: _Slot, *, may_exec: bool) -> None:
        while True:
            assert slot.idle_since is not None
            with trio.move_on_at(slot.idle_since + self.idle_timeout) as waiting:
                try:
                    line = await peer.receive_line()
                except _LineTooLongError:
                    await peer.send(
                        error_line("too_long", f"request line is longer than {MAX_LINE} bytes")
                    )
                    return
            if waiting.cancelled_caught:
                self.log_limited("control.idle_closed", idle_timeout_s=self.idle_timeout)
                await peer.send(
                    error_line(
                        "idle_timeout",
                        f"closed: no complete request line within {self.idle_timeout:g}s; "
                        "send the request as soon as you connect",
                    )
                )
                return
            if line is None:
                return
            if line.strip():
                self.slots.set_idle(slot, False)
                await _dispatch(line, peer, self.handler, may_exec=may_exec)
                self.slots.set_idle(slot, True)


async def _dispatch(line: bytes, peer: _Peer, handler: ControlHandler, *, may_exec: bool) -> None:
    try:
        raw = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        await peer.send(
            error_line("bad_request", f"request repeats the key {exc.key!r}; send each key once")
        )
        return
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError, deep
        # nesting. Any of them is the client's mistake, answered, never the daemon's death.
        await peer.send(error_line("bad_json", f"request is not JSON: {exc!s:.200}"))
        return
    if isinstance(raw, dict) and raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        await peer.send(
            error_line(
                "bad_version",
                f"protocol version {raw.get('v')!r} is not supported; this "
                f"handoffd speaks v{PROTOCOL_VERSION}",
            )
        )
        return
    try:
        request = _request_adapter.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        await peer.send(error_line("bad_request", f"invalid request: {problems}"))
        return
    if isinstance(request, UpgradeRequest) and request.exec_path is not None and not may_exec:
        await peer.send(
            error_line(
                "forbidden",
                "only root and handoffd's own user may choose the executable of a self-upgrade "
                "(exec_path); leave it out to use the installed handoffd",
            )
        )
        return
    if isinstance(request, StatusRequest):
        await peer.send(handler.status().model_dump_json().encode() + b"\n")
    elif isinstance(request, MetricsRequest):
        text = handler.metrics_text()
        if text is None:
            await peer.send(
                error_line(
                    "metrics_disabled",
                    "this handoffd has no [metrics] section in its config: add one (address = "
                    '"127.0.0.1:9464"), install handoffd[metrics], then run `handoffd upgrade '
                    "--self` or restart it",
                )
            )
        else:
            await peer.send(MetricsReply(text=text).model_dump_json().encode() + b"\n")
    elif isinstance(request, StopRequest):
        await peer.send(StopReply().model_dump_json().encode() + b"\n")
        handler.stop()
        # Hold the connection until the daemon's shutdown cancels us: its closing is how
        # `handoffd stop` learns that the daemon is gone.
        await trio.sleep_forever()
    else:
        await _serve_upgrade(request, peer, handler)


async def _serve_upgrade(request: UpgradeRequest, peer: _Peer, handler: ControlHandler) -> None:
    """Stream the upgrade's events, then its reply; stop waiting once the client has left.

    The upgrade goes on and is logged all the same, but a client that left no longer holds a
    connection slot until its outcome (which may take ``ready_timeout``).
    """

    async def send_event(event: UpgradeEvent) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await peer.send(event.model_dump_json().encode() + b"\n")

    async with trio.open_nursery() as nursery:

        async def stop_waiting_when_gone() -> None:
            if await peer.wait_gone():
                nursery.cancel_scope.cancel()

        nursery.start_soon(stop_waiting_when_gone)
        reply = await handler.upgrade(request, send_event)
        # Sent in the scheduling step in which upgrade() returned: after a self-upgrade the
        # root is cancelled as soon as every caller has returned (see _supervisor).
        with contextlib.suppress(trio.BrokenResourceError):
            await peer.send(reply.model_dump_json().encode() + b"\n")
        nursery.cancel_scope.cancel()


# ---- client ----


def call(
    path: Path,
    request: _AnyRequest,
    *,
    on_event: Callable[[dict[str, object]], None] | None = None,
    timeout: float | None = None,
    wait_closed: bool = False,
) -> dict[str, object]:
    """Send one request model and return the final reply (see ``_client.call``)."""
    return _client.call(
        path,
        request.model_dump(),
        on_event=on_event,
        timeout=timeout,
        wait_closed=wait_closed,
    )
