"""The demo worker: a small HTTP/1.1 server on the sockets handoffd passes, with a graceful drain.

Every response names the generation and pid that served it (body, ``X-Handoff-Generation`` and
``X-Handoff-Pid``), so you can watch an upgrade move traffic::

    handoffd run --config config/handoffd.toml &
    curl -i http://127.0.0.1:8080/
    handoffd upgrade --config config/handoffd.toml
    curl -i http://127.0.0.1:8080/

On SIGTERM it drains the way DESIGN.md asks of a well-behaved worker:
- it stops accepting (closing only *its* fds: the listening socket lives on in handoffd and the
  next generation, so queued connections wait for them instead of being refused);
- requests in flight finish;
- the next request on a kept-alive connection is answered with ``Connection: close``, which is
  how a client learns to reconnect without losing a request;
- a connection idle for longer than the grace period is closed. Closing an idle connection at
  once would race the client's next request on it (the main source of errors in nginx, haproxy
  and Go's Shutdown in our peer runs).

The signal handlers are installed before READY=1 is sent, and the main thread never blocks
outside trio, so SIGTERM is always handled.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Final

import trio

from ._worker import listeners, ready, status, stopping

# Largest request head we read; more is answered with 431 and the connection is closed.
MAX_HEAD: Final = 16 * 1024
# Keep-alive connections idle this long are closed in steady state.
IDLE_TIMEOUT: Final = 60.0


@dataclass
class _DemoState:
    generation: str
    pid: int
    draining: bool = False
    idle_grace: float = 1.0
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)
    requests: int = 0


def _response(
    state: _DemoState, close: bool, status_line: str = "200 OK", body: str | None = None
) -> bytes:
    text = (
        body
        if body is not None
        else (f"hello from handoffd demo: generation {state.generation}, pid {state.pid}\n")
    )
    payload = text.encode()
    head = (
        f"HTTP/1.1 {status_line}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"X-Handoff-Generation: {state.generation}\r\n"
        f"X-Handoff-Pid: {state.pid}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + payload


async def _serve_connection(stream: trio.SocketStream, state: _DemoState) -> None:
    buffer = b""
    async with stream:
        while True:
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > MAX_HEAD:
                    await stream.send_all(
                        _response(state, True, "431 Request Header Fields Too Large", "too large\n")
                    )
                    return
                idle = not buffer
                with trio.CancelScope() as scope:
                    if idle:
                        state.idle_scopes.add(scope)
                        scope.deadline = trio.current_time() + (
                            state.idle_grace if state.draining else IDLE_TIMEOUT
                        )
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    finally:
                        state.idle_scopes.discard(scope)
                if scope.cancelled_caught or not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await stream.send_all(_response(state, True, "400 Bad Request", "bad request\n"))
                return
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip().lower()
            length = int(headers.get("content-length", "0") or "0")
            while len(buffer) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            client_close = headers.get("connection") == "close" or (
                parts[2] == "HTTP/1.0" and headers.get("connection") != "keep-alive"
            )
            close = client_close or state.draining
            state.requests += 1
            try:
                await stream.send_all(_response(state, close))
            except trio.BrokenResourceError:
                return
            if close:
                return


async def _accept_loop(
    listener: trio.socket.SocketType, state: _DemoState, nursery: trio.Nursery
) -> None:
    while True:
        try:
            conn, _ = await listener.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another worker took it: the socket is shared
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nursery.start_soon(_serve_connection, trio.SocketStream(conn), state)


def _fallback_listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(os.environ.get("PORT", "8080"))))
    sock.listen(128)
    return sock


async def serve() -> None:
    """Serve until SIGTERM/SIGINT, then drain (see the module docstring)."""
    state = _DemoState(
        generation=os.environ.get("HANDOFF_GENERATION", "0"),
        pid=os.getpid(),
        idle_grace=float(os.environ.get("HANDOFF_DEMO_IDLE_GRACE", "1.0")),
    )
    given = [s for socks in listeners().values() for s in socks if s.type == socket.SOCK_STREAM]
    if not given:
        given = [_fallback_listener()]
        print(
            f"handoff.demo: no sockets passed; serving on {given[0].getsockname()}", file=sys.stderr
        )
    tsocks = [trio.socket.from_stdlib_socket(s) for s in given]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for sock in tsocks:
                    acceptors.start_soon(_accept_loop, sock, state, connections)
                ready(f"generation {state.generation} serving")
                async for _ in signals:
                    break
                state.draining = True
                stopping()
                status(f"generation {state.generation} draining")
                acceptors.cancel_scope.cancel()
            for sock in tsocks:
                # Only our fd: the socket itself lives on in handoffd and the next generation.
                sock.close()
            deadline = trio.current_time() + state.idle_grace
            for scope in list(state.idle_scopes):
                scope.deadline = min(scope.deadline, deadline)


def main() -> None:
    trio.run(serve)
