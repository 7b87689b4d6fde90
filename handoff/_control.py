"""The control socket: newline-delimited JSON requests and replies, server and client.

Design notes:
- A Unix stream socket, mode 0600, whose peers are checked (``_peercred``: SO_PEERCRED, getpeereid) against root, our
  own uid and ``supervisor.allowed_uids``. The socket is bound under a temporary name and renamed
  into place, so a client never sees a half-set-up socket and a successor supervisor can take
  the path over atomically.
- One request per line, at most ``MAX_LINE`` bytes. A malformed, unknown or oversized request
  gets ``{"ok": false, "error": {...}}`` and the daemon carries on; an oversized line also ends
  that connection, since the rest of it cannot be framed.
- ``upgrade`` streams ``{"event": ...}`` lines while it runs and ends with the reply, so
  ``handoffd upgrade`` (and ``systemctl reload`` through it) returns only when the outcome is known.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from typing import TYPE_CHECKING, Annotated, Final, Literal, Protocol

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import _client
from ._peercred import peer_uid
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

log: structlog.stdlib.BoundLogger = structlog.get_logger()

PROTOCOL_VERSION: Final = 1
# Requests are tiny; a line longer than this is a client bug or an attack, not a request.
MAX_LINE: Final = 64 * 1024


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


Request = Annotated[StatusRequest | UpgradeRequest | StopRequest, Field(discriminator="op")]
_request_adapter: TypeAdapter[StatusRequest | UpgradeRequest | StopRequest] = TypeAdapter(Request)


class WorkerInfo(_Wire):
    generation: int
    index: int
    pid: int | None
    state: str
    status: str | None = None
    restarts: int = 0
    last_exit: str | None = None


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
    state: str
    generation: int
    workers: list[WorkerInfo]
    listeners: list[ListenerInfo]
    parked: list[str] = Field(default_factory=list)
    draining_generations: list[int] = Field(default_factory=list)
    last_upgrade: UpgradeReply | None = None
    #: What this platform lacks, "what: why" (see _platform.degradations); empty on new Linux.
    degraded: list[str] = Field(default_factory=list)


class StopReply(_Wire):
    ok: bool = True
    op: Literal["stop"] = "stop"


class ErrorDetail(_Wire):
    code: str
    message: str


class ErrorReply(_Wire):
    ok: Literal[False] = False
    error: ErrorDetail


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


# accept(2) errors that mean "out of a resource right now" (as trio's ACCEPT_CAPACITY_ERRNOS):
# back off briefly and try again, instead of dying or spinning.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_BACKOFF_S: Final = 0.1


async def serve_control(
    listener: socket.socket,
    handler: ControlHandler,
    allowed_uids: frozenset[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept control connections until cancelled; each connection runs in its own task.

    Nothing a client does (or the kernel says about one connection) may end this loop: it is
    a task of the root nursery, and its death would take every worker with it.
    """
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.warning(
                        "control.accept_failed", error=str(exc), retry_in_s=_ACCEPT_BACKOFF_S
                    )
                    await trio.sleep(_ACCEPT_BACKOFF_S)
                continue
            nursery.start_soon(_serve_connection, conn, handler, allowed_uids)


async def _serve_connection(
    conn: trio.socket.SocketType, handler: ControlHandler, allowed_uids: frozenset[int]
) -> None:
    stream = trio.SocketStream(conn)
    async with stream:
        # A client that leaves mid-reply is its own problem, never the daemon's.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _converse(conn, stream, handler, allowed_uids)


async def _converse(
    conn: trio.socket.SocketType,
    stream: trio.SocketStream,
    handler: ControlHandler,
    allowed_uids: frozenset[int],
) -> None:
    uid = peer_uid(conn)
    if uid not in allowed_uids:
        log.warning("control.refused", uid=uid)
        await stream.send_all(
            error_line(
                "forbidden",
                f"uid {uid} may not control this handoffd; add it to supervisor.allowed_uids",
            )
        )
        return
    may_exec = uid in (0, os.getuid())
    buffer = b""
    while True:
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > MAX_LINE:
                await stream.send_all(
                    error_line("too_long", f"request line is longer than {MAX_LINE} bytes")
                )
                return
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            continue
        line, buffer = buffer[:newline], buffer[newline + 1 :]
        if len(line) > MAX_LINE:
            await stream.send_all(
                error_line("too_long", f"request line is longer than {MAX_LINE} bytes")
            )
            return
        if line.strip():
            await _dispatch(line, stream, handler, may_exec=may_exec)


async def _dispatch(
    line: bytes, stream: trio.SocketStream, handler: ControlHandler, *, may_exec: bool
) -> None:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError, deep
        # nesting. Any of them is the client's mistake, answered, never the daemon's death.
        await stream.send_all(error_line("bad_json", f"request is not JSON: {exc!s:.200}"))
        return
    if isinstance(raw, dict) and raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        await stream.send_all(
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
        await stream.send_all(error_line("bad_request", f"invalid request: {problems}"))
        return
    if isinstance(request, UpgradeRequest) and request.exec_path is not None and not may_exec:
        await stream.send_all(
            error_line(
                "forbidden",
                "only root and handoffd's own user may choose the executable of a self-upgrade "
                "(exec_path); leave it out to use the installed handoffd",
            )
        )
        return
    if isinstance(request, StatusRequest):
        await stream.send_all(handler.status().model_dump_json().encode() + b"\n")
    elif isinstance(request, StopRequest):
        await stream.send_all(StopReply().model_dump_json().encode() + b"\n")
        handler.stop()
        # Hold the connection until the daemon's shutdown cancels us: its closing is how
        # `handoffd stop` learns that the daemon is gone.
        await trio.sleep_forever()
    else:

        async def send_event(event: UpgradeEvent) -> None:
            # If the client left, the upgrade goes on and is logged all the same.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(event.model_dump_json().encode() + b"\n")

        reply = await handler.upgrade(request, send_event)
        await stream.send_all(reply.model_dump_json().encode() + b"\n")


# ---- client ----


def call(
    path: Path,
    request: StatusRequest | UpgradeRequest | StopRequest,
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
