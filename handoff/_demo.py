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

**A connection that survives upgrades** (Linux). A listener named ``ticker`` (127.0.0.1:8081 in
config/handoffd.toml) speaks a line protocol: every second the server writes
``tick N from generation G pid P``, and it answers each line you send with
``echo <line> from generation G pid P``. Keep one open and upgrade::

    python3 -c 'import socket; s=socket.create_connection(("127.0.0.1",8081)); [print(l,end="",flush=True) for l in s.makefile()]' &
    handoffd upgrade --config config/handoffd.toml      # ticks go on, now from generation 2

(``nc 127.0.0.1 8081`` works too, and lets you type lines to be echoed.) The same TCP connection
is served by each generation in turn: tick numbers go on without a gap or a repeat, and no line
you send is lost. How:

- At accept, the worker parks the connection with the supervisor (``handoff.park``) under a
  unique name, ``ticker-<uuid>``, together with a small state file (a memfd: the last tick
  number, and any part of a line not answered yet). Every worker started later receives both.
- Exactly one process serves a connection: the one holding a POSIX record lock (``fcntl(2)``
  ``F_SETLK``, on byte 0 of the state file). Record locks belong to a process, not to an open
  file, so the lock tells processes that share the very same file apart, and the kernel drops
  it when its holder exits or closes the file; no process can serve a stale copy.
- Of a new generation, only worker 0 (``HANDOFF_WORKER``) adopts parked connections; the
  others close their copies at once (with ``processes = 2`` both receive every parked fd).
  Before READY=1 it writes itself into the state file as the successor; then it takes the lock
  if it is free (the previous server crashed, or has let go), and otherwise waits, on a pidfd,
  for the holder to exit: the holder is a worker of an older generation that will be told to
  drain once this generation is ready (the next generation is started before the old one
  drains, so parking at accept time, not at SIGTERM, is what makes this work). A connection
  held by a live worker of the same generation (a restarted worker 0 sees those) is left to it.
- On SIGTERM, a worker stops reading its ticker connections (a cancelled ``recv`` takes no
  bytes), saves the state and closes its copies, which releases the lock. The ticks pause
  while the old worker finishes its drain and exits, then the new generation carries on.
  When no newer worker is registered as the successor (handoffd is stopping, or the connection
  arrived after the next generation had taken the parked fds), the worker writes
  ``bye (nobody takes over: please reconnect) ...`` and closes the connection instead of leaving
  it hanging until some later upgrade.
- When the client disconnects, the serving worker unparks the name (``handoff.unpark``), so the
  supervisor closes its copies, and ``handoffd status`` no longer lists it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import sys
import uuid
from dataclasses import dataclass, field
from typing import Final

import trio

from ._worker import listeners, park, parked_fds, ready, status, stopping, unpark

# Largest request head we read; more is answered with 431 and the connection is closed.
MAX_HEAD: Final = 16 * 1024
# Keep-alive connections idle this long are closed in steady state.
IDLE_TIMEOUT: Final = 60.0
#: The listener served with the ticker line protocol instead of HTTP.
TICKER_LISTENER: Final = "ticker"
# Parked ticker connections are named TICKER_PREFIX + a uuid (at most 255 characters, no ':').
TICKER_PREFIX: Final = "ticker-"
# A ticker line longer than this without a newline is answered in pieces of this size.
MAX_LINE: Final = 4096
# How long one write to a ticker client may take before the client is given up as stuck.
TICKER_SEND_TIMEOUT: Final = 10.0
# The state file holds a successor record (pid and generation of the worker waiting to take the
# connection over, written before it says READY=1) in its first bytes, and the JSON state after.
_SUCCESSOR_SIZE: Final = 64
# fcntl(2) struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK: Final = struct.Struct("hhqqi4x")
# Handing over a connection needs memfd_create(2), pidfd_open(2) and record locks: Linux.
_CAN_HAND_OVER: Final = hasattr(os, "memfd_create") and hasattr(os, "pidfd_open")


@dataclass
class _DemoState:
    generation: str
    pid: int
    draining: bool = False
    idle_grace: float = 1.0
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)
    worker: str = "0"
    tick_interval: float = 1.0
    # Cancelled on drain: ticker connections stop being read and are handed over.
    ticker_scopes: set[trio.CancelScope] = field(default_factory=set)


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
    # One client's bad luck (reset, vanished mid-request) ends its connection, nothing more.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _converse(stream, state)


async def _converse(stream: trio.SocketStream, state: _DemoState) -> None:
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
            try:
                length = int(headers.get("content-length", "0") or "0")
            except ValueError:
                length = -1
            if length < 0:
                await stream.send_all(
                    _response(state, True, "400 Bad Request", "bad Content-Length\n")
                )
                return
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
            try:
                await stream.send_all(_response(state, close))
            except trio.BrokenResourceError:
                return
            if close:
                return


async def _accept(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    """The next connection; EAGAIN only means another worker took it (the socket is shared).

    Out of fds or buffers (as trio's ACCEPT_CAPACITY_ERRNOS), back off briefly; a connection
    aborted before we took it is simply gone.
    """
    while True:
        try:
            conn, _ = await listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                raise
            await trio.sleep(0.1)
            continue
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


async def _accept_loop(
    listener: trio.socket.SocketType, state: _DemoState, nursery: trio.Nursery
) -> None:
    while True:
        conn = await _accept(listener)
        nursery.start_soon(_serve_connection, trio.SocketStream(conn), state)


# ---- ticker: a connection handed from generation to generation (see the module docstring) ----


@dataclass
class _Ticker:
    """One ticker connection this process serves, and what the next server must know of it."""

    sock: trio.socket.SocketType
    name: str | None = None  # the parked name; None when not parked (no supervisor)
    state_fd: int | None = None  # the state file; this process holds its lock
    tick: int = 0  # the last tick sent
    pending: bytes = b""  # received, not yet a complete line


def _write_state(ticker: _Ticker, state: _DemoState, closed: bool = False) -> None:
    if ticker.state_fd is None:
        return
    data = json.dumps(
        {
            "tick": ticker.tick,
            "pending": ticker.pending.decode("latin-1"),
            "closed": closed,
            "pid": state.pid,
            "generation": state.generation,
        }
    ).encode()
    os.pwrite(ticker.state_fd, data, _SUCCESSOR_SIZE)
    os.ftruncate(ticker.state_fd, _SUCCESSOR_SIZE + len(data))


def _read_state(fd: int) -> dict[str, object]:
    try:
        saved: object = json.loads(os.pread(fd, 1 << 16, _SUCCESSOR_SIZE) or b"{}")
    except ValueError:
        saved = {}
    return {str(k): v for k, v in saved.items()} if isinstance(saved, dict) else {}


def _register_successor(fd: int, state: _DemoState) -> None:
    os.pwrite(fd, f"{state.pid} {state.generation}".encode().ljust(_SUCCESSOR_SIZE), 0)


def _successor_waits(fd: int, state: _DemoState) -> bool:
    """Whether a live worker of a newer generation waits to take this connection over."""
    try:
        pid_text, generation_text = os.pread(fd, _SUCCESSOR_SIZE, 0).split()
        pid, generation = int(pid_text), int(generation_text)
    except ValueError:  # no record (zeros), or not ours
        return False
    if generation <= int(state.generation):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another uid
        return True
    return True


def _try_lock(fd: int) -> bool:
    """Take the record lock on byte 0 of ``fd`` for this process, if nobody else holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        return False
    return True


# Linux only (see _CAN_HAND_OVER); guarded so the demo type-checks for macOS too.
def _pidfd_open(pid: int) -> int:
    if sys.platform == "linux":
        return os.pidfd_open(pid)
    raise ProcessLookupError(f"no pidfds on {sys.platform}")


def _memfd_create(name: str) -> int:
    if sys.platform == "linux":
        return os.memfd_create(name, os.MFD_CLOEXEC)
    raise OSError(f"no memfd_create on {sys.platform}")


def _lock_holder(fd: int) -> int:
    """The pid of the process holding the lock on byte 0 of ``fd`` (fcntl(2) F_GETLK), or 0."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
    kind, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return 0 if kind == fcntl.F_UNLCK else int(pid)


async def _wait_for_lock(fd: int, state: _DemoState) -> bool:
    """Take the lock once its holder has let go; False if a live worker of ours serves it."""
    while True:
        if _try_lock(fd):
            return True
        holder = _lock_holder(fd)
        if not holder:
            continue  # released between the two calls
        saved = _read_state(fd)
        if saved.get("pid") == holder and saved.get("generation") == state.generation:
            return False
        try:
            pidfd = _pidfd_open(holder)
        except ProcessLookupError:
            continue
        try:
            # The pidfd is the holder's only if the holder did not change meanwhile.
            if _lock_holder(fd) == holder:
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)


def _line(kind: str, text: str, state: _DemoState) -> bytes:
    return f"{kind} {text} from generation {state.generation} pid {state.pid}\n".encode()


async def _send(ticker: _Ticker, data: bytes) -> bool:
    """Write all of ``data``; never interrupted by the drain, so no line is cut in half."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + TICKER_SEND_TIMEOUT
        view = memoryview(data)
        try:
            while view:
                view = view[await ticker.sock.send(view) :]
        except OSError:
            return False
    return not view


def _answers(ticker: _Ticker, state: _DemoState) -> bytes:
    *lines, ticker.pending = ticker.pending.split(b"\n")
    if len(ticker.pending) > MAX_LINE:
        lines.append(ticker.pending)
        ticker.pending = b""
    return b"".join(
        _line("echo", line.rstrip(b"\r").decode("utf-8", "replace"), state) for line in lines
    )


def _let_go(ticker: _Ticker) -> None:
    """Close this process's copies: the lock goes with the state file, the socket lives on in
    the supervisor (when parked) for the next generation."""
    ticker.sock.close()
    if ticker.state_fd is not None:
        os.close(ticker.state_fd)
        ticker.state_fd = None


async def _serve_ticker(ticker: _Ticker, state: _DemoState) -> None:
    """Tick and echo until the client leaves (unpark) or the drain (hand over)."""
    with trio.CancelScope() as drain:
        state.ticker_scopes.add(drain)
        if state.draining:
            drain.cancel()
        try:
            next_tick = trio.current_time() + state.tick_interval
            while True:
                data: bytes | None = None
                with trio.move_on_at(next_tick):
                    # A cancelled recv has taken no bytes (trio's socket methods are atomic).
                    try:
                        data = await ticker.sock.recv(65536)
                    except OSError:
                        data = b""
                if data is None:
                    ticker.tick += 1
                    next_tick = max(next_tick + state.tick_interval, trio.current_time())
                    sent = await _send(ticker, _line("tick", str(ticker.tick), state))
                elif data:
                    ticker.pending += data
                    sent = await _send(ticker, _answers(ticker, state))
                else:
                    sent = False
                if not sent:
                    break
                _write_state(ticker, state)
        finally:
            state.ticker_scopes.discard(drain)
    handing_over = ticker.state_fd is not None and _successor_waits(ticker.state_fd, state)
    if drain.cancelled_caught and ticker.name is not None and handing_over:
        _write_state(ticker, state)
    else:
        # The client left or stopped reading, or nobody will take over: handoffd is stopping,
        # or the connection arrived after the next generation had taken the parked list.
        if drain.cancelled_caught:
            await _send(ticker, _line("bye", "(nobody takes over: please reconnect)", state))
        _write_state(ticker, state, closed=True)
        if ticker.name is not None:
            unpark(ticker.name)
        with contextlib.suppress(OSError):
            ticker.sock.shutdown(socket.SHUT_RDWR)
    _let_go(ticker)


async def _accept_tickers(
    listener: trio.socket.SocketType, state: _DemoState, nursery: trio.Nursery
) -> None:
    while True:
        conn = await _accept(listener)
        ticker = _Ticker(sock=conn)
        if _CAN_HAND_OVER:
            ticker.state_fd = _memfd_create("handoff-demo-ticker")
            _try_lock(ticker.state_fd)  # a new file: nobody else can hold it
            _write_state(ticker, state)
            name = TICKER_PREFIX + uuid.uuid4().hex
            if park(name, conn, ticker.state_fd):
                ticker.name = name
        nursery.start_soon(_serve_ticker, ticker, state)


async def _adopt_ticker(name: str, conn_fd: int, state_fd: int, state: _DemoState) -> None:
    """Serve a ticker connection parked by an earlier worker, once that worker lets go."""
    owned = False
    with trio.CancelScope() as drain:
        state.ticker_scopes.add(drain)
        try:
            owned = await _wait_for_lock(state_fd, state)
        finally:
            state.ticker_scopes.discard(drain)
    saved = _read_state(state_fd) if owned else {}
    if not owned or saved.get("closed") is True:
        os.close(conn_fd)
        os.close(state_fd)
        return
    tick, pending = saved.get("tick"), saved.get("pending")
    ticker = _Ticker(
        sock=trio.socket.from_stdlib_socket(socket.socket(fileno=conn_fd)),
        name=name,
        state_fd=state_fd,
        tick=tick if isinstance(tick, int) else 0,
        pending=pending.encode("latin-1") if isinstance(pending, str) else b"",
    )
    _write_state(ticker, state)
    await _serve_ticker(ticker, state)


def _start_adopting(state: _DemoState, nursery: trio.Nursery) -> None:
    """Worker 0 adopts the parked ticker connections; every other worker closes its copies.

    Runs before READY=1: the successor record must be in place before the supervisor tells the
    previous generation to drain, which is when the old server looks for it.
    """
    for name, fds in parked_fds().items():
        conns = [fd for fd in fds if stat.S_ISSOCK(os.fstat(fd).st_mode)]
        files = [fd for fd in fds if stat.S_ISREG(os.fstat(fd).st_mode)]
        ours = name.startswith(TICKER_PREFIX) and len(fds) == 2 and len(conns) == len(files) == 1
        if ours and state.worker == "0" and _CAN_HAND_OVER:
            _register_successor(files[0], state)
            nursery.start_soon(_adopt_ticker, name, conns[0], files[0], state)
        else:
            for fd in fds:
                os.close(fd)


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
        worker=os.environ.get("HANDOFF_WORKER", "0"),
        tick_interval=float(os.environ.get("HANDOFF_DEMO_TICK_INTERVAL", "1.0")),
    )
    given = [
        s
        for name, socks in listeners().items()
        if name != TICKER_LISTENER
        for s in socks
        if s.type == socket.SOCK_STREAM
    ]
    tickers = [s for s in listeners().get(TICKER_LISTENER, []) if s.type == socket.SOCK_STREAM]
    if not given:
        given = [_fallback_listener()]
        print(
            f"handoff.demo: no sockets passed; serving on {given[0].getsockname()}", file=sys.stderr
        )
    tsocks = [trio.socket.from_stdlib_socket(s) for s in given]
    ticker_socks = [trio.socket.from_stdlib_socket(s) for s in tickers]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as connections:
            _start_adopting(state, connections)
            async with trio.open_nursery() as acceptors:
                for sock in tsocks:
                    acceptors.start_soon(_accept_loop, sock, state, connections)
                for sock in ticker_socks:
                    acceptors.start_soon(_accept_tickers, sock, state, connections)
                ready(f"generation {state.generation} serving")
                async for _ in signals:
                    break
                state.draining = True
                stopping()
                status(f"generation {state.generation} draining")
                acceptors.cancel_scope.cancel()
            for sock in tsocks + ticker_socks:
                # Only our fd: the socket itself lives on in handoffd and the next generation.
                sock.close()
            for scope in list(state.ticker_scopes):
                scope.cancel()
            deadline = trio.current_time() + state.idle_grace
            for scope in list(state.idle_scopes):
                scope.deadline = min(scope.deadline, deadline)


def main() -> None:
    trio.run(serve)
