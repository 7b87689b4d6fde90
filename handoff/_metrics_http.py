"""The ``[metrics]`` HTTP listener: ``GET /metrics``, ``/healthz`` and ``/readyz``.

A tiny HTTP/1.1 server on a trio socket in the supervisor's root nursery, for Prometheus,
load balancers, Kubernetes probes and Docker's HEALTHCHECK.

Design notes:
- It must never be a way to take the daemon down or starve it: at most ``MAX_CONNECTIONS``
  connections are served at once (the rest wait in the kernel's backlog), a request head is at
  most ``MAX_REQUEST`` bytes and must arrive within ``REQUEST_TIMEOUT``, the answer must be
  read within it, and each connection carries one request (``Connection: close``). Nothing a
  client does ends the accept loop; accept errors are retried as the control server does. The
  rendering of an answer is a boundary of its own: a bug there is logged and answered 500.
- The listening socket is ours alone (never a held listener): it is close-on-exec (Python
  creates every socket non-inheritable, PEP 446), so no worker inherits it, and trio may make it
  non-blocking.
- A self-upgrade's successor binds the same address next to ours (``SO_REUSEPORT``, which the
  kernel allows only to sockets of the same effective uid, so no other user can join): the
  two listen side by side until this supervisor exits. The successor listens only once it
  supervises the handed-over generations, so its ``/readyz`` is never a false 503; connections
  the kernel queued on our socket when we close it are reset (a probe retries). A first start
  checks that nobody holds the address already, since SO_REUSEPORT would hide that.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import TYPE_CHECKING, Final

import structlog
import trio

from ._control import _ACCEPT_BACKOFF_S, _ACCEPT_CONNECTION_ERRNOS
from ._errors import ListenerError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import MetricsConfig

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Connections served at once: scrapers and probes are few; past this, connect(2) waits in the
#: backlog rather than costing the daemon fds and memory.
MAX_CONNECTIONS: Final = 16
#: The longest request head accepted (request line and headers): probes send under 200 bytes.
MAX_REQUEST: Final = 8 * 1024
#: Seconds a connection has to send its request head, and then to read the answer.
REQUEST_TIMEOUT: Final = 5.0
BACKLOG: Final = 64

Answer = tuple[int, str, bytes]
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def open_metrics_socket(config: MetricsConfig, *, successor: bool) -> socket.socket:
    """Bind and listen on ``[metrics] address`` (see the module notes for ``successor``).

    Raises:
        ListenerError: the address cannot be bound, naming it and the fix.
    """
    address = config.parsed_address
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    where = (address.host, address.port)
    try:
        if not successor and address.port != 0:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _bind_error(config, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise _bind_error(config, exc) from exc
    return sock


def _bind_error(config: MetricsConfig, exc: OSError) -> ListenerError:
    hint = (
        "another program (or another handoffd) uses it: pick a free port for [metrics] address"
        if exc.errno == errno.EADDRINUSE
        else "check [metrics] address"
    )
    return ListenerError(
        f"cannot listen for metrics on {config.address}: {exc.strerror or exc}; {hint}"
    )


def metrics_address(sock: socket.socket) -> str:
    """The address as bound (port 0 resolved), for the log."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics_http(
    listener: socket.socket,
    answer: Callable[[str], Answer],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer HTTP requests on ``listener`` until cancelled (``listener`` stays the caller's).

    ``answer(path)`` gives (status, content type, body) for a GET of ``path``; each connection
    has ``request_timeout`` seconds to send its request and read the answer.
    """
    sock = trio.socket.from_stdlib_socket(listener)
    room = trio.Semaphore(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await room.acquire()
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                room.release()
                if exc.errno not in _ACCEPT_CONNECTION_ERRNOS:
                    log.warning("metrics.accept_failed", error=str(exc))
                    await trio.sleep(_ACCEPT_BACKOFF_S)
                continue
            except BaseException:
                room.release()
                raise
            nursery.start_soon(_serve_one, conn, answer, room, request_timeout)


async def _serve_one(
    conn: trio.socket.SocketType,
    answer: Callable[[str], Answer],
    room: trio.Semaphore,
    request_timeout: float,
) -> None:
    stream = trio.SocketStream(conn)
    try:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                with trio.move_on_after(request_timeout):
                    head = await _read_head(stream)
                    status, content_type, body, head_only = _respond(head, answer)
                    header = (
                        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                    ).encode()
                    await stream.send_all(header if head_only else header + body)
                    # FIN first, then close: closing with the client's bytes unread would
                    # reset the connection and could cut the answer off (tcp(7)).
                    await stream.send_eof()
                    await _drain_input(stream)
    finally:
        room.release()


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head (up to the blank line), or None if it is too long or cut short."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST + 1 - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


async def _drain_input(stream: trio.SocketStream) -> None:
    """Read (and drop) what the client still sends, until it closes, bounded in size."""
    left = MAX_REQUEST
    while left > 0:
        chunk = await stream.receive_some(left)
        if not chunk:
            return
        left -= len(chunk)


def _respond(head: bytes | None, answer: Callable[[str], Answer]) -> tuple[int, str, bytes, bool]:
    """(status, content type, body, head only) for a request head."""
    text = "text/plain; charset=utf-8"
    if head is None:
        return 431, text, b"request head too long or incomplete\n", False
    line = head.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, text, b"expected an HTTP/1.x request line\n", False
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return 405, text, b"only GET and HEAD are served\n", False
    try:
        status, content_type, body = answer(target.split("?", 1)[0])
    except Exception:  # the scrape boundary: a bug in rendering is a 500, never the daemon's end
        log.exception("metrics.render_failed")
        return 500, text, b"internal error rendering the answer; see handoffd's log\n", False
    return status, content_type, body, method == "HEAD"
