"""The benchmark's HTTP app: the same worker behind every peer, so a comparison measures the reload.

Stdlib only (no handoff import: the other peers do not have our library either). One process,
one thread, an epoll loop over non-blocking sockets.

Behaviour:
- HTTP/1.1 keep-alive; every response names its version and pid in the body and in the
  ``X-Handoff-Generation``/``X-Handoff-Pid`` headers (bench/strict_client.py attributes by them).
- The *version* comes from the JSON file named by ``BENCH_VERSION_FILE``
  (``{"generation": 3, "mode": "ok" | "slow" | "broken"}``), read once at start-up, so each peer's
  own reload picks up a new version by starting a new process. ``slow`` sleeps ``SLOW_START`` seconds
  before it accepts or reports ready; ``broken`` exits 1 at once.
- Sockets: ``--fd N`` (circus, the launcher), ``LISTEN_FDS`` (handoffd, systemd),
  ``SERVER_STARTER_PORT`` (start_server), or ``--bind HOST:PORT [--reuseport]``.
- Readiness: ``READY=1`` to ``NOTIFY_SOCKET`` once it accepts (sd_notify(3)).
- Drain on SIGTERM/SIGINT/SIGQUIT: stop accepting, answer the next request on each kept-alive
  connection with ``Connection: close``, close connections idle for ``DRAIN_IDLE_GRACE`` seconds,
  and exit when none is left (or after ``DRAIN_TIMEOUT``). Closing an idle keep-alive connection
  at once would race the client's next request on it (DESIGN.md, pitfalls).

Example::

    BENCH_VERSION_FILE=/tmp/v.json python3 bench/apps/app.py --bind 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time

# The slow-start scenario: the new version needs this long before it can serve.
SLOW_START = 2.0
# A draining worker closes a kept-alive connection only once it has been idle this long; a
# busy client gets ``Connection: close`` on its next response instead.
DRAIN_IDLE_GRACE = 1.0
# A draining worker exits after this long even if clients keep connections open.
DRAIN_TIMEOUT = 20.0
# accept() at most this many connections per wake-up, so one listener cannot starve the others.
ACCEPT_BATCH = 64
# EAGAIN on accept is normal: another worker (or generation) sharing the socket took it.
ACCEPT_RETRY_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EINTR}
# Running out of fds: back off instead of dying (trio's ACCEPT_CAPACITY_ERRNOS).
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def load_version() -> tuple[int, str]:
    path = os.environ.get("BENCH_VERSION_FILE")
    if not path:
        return 0, "ok"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return int(data.get("generation", 0)), str(data.get("mode", "ok"))


def notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode(), addr)


def inherited_listeners(args: argparse.Namespace) -> list[socket.socket]:
    fds: list[int] = list(args.fd)
    if not fds and "LISTEN_FDS" in os.environ:
        pid = os.environ.get("LISTEN_PID")
        if pid is None or pid == str(os.getpid()):
            fds = list(range(3, 3 + int(os.environ["LISTEN_FDS"])))
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            os.environ.pop(key, None)
    if not fds and os.environ.get("SERVER_STARTER_PORT"):
        # "127.0.0.1:8080=3;127.0.0.1:8081=4"
        for item in os.environ["SERVER_STARTER_PORT"].split(";"):
            fds.append(int(item.rpartition("=")[2]))
    socks = [socket.socket(fileno=fd) for fd in fds]
    if args.bind:
        host, _, port = args.bind.rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if args.reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, int(port)))
        s.listen(1024)
        socks.append(s)
    if not socks:
        sys.exit("app: no listening socket: pass --fd, --bind, LISTEN_FDS or SERVER_STARTER_PORT")
    for s in socks:
        s.set_inheritable(False)
        # Sets O_NONBLOCK on the shared open file description: every holder of this socket
        # sees it. Every worker of this benchmark tolerates EAGAIN on accept.
        s.setblocking(False)
    return socks


class Conn:
    __slots__ = ("close_after", "idle_since", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.close_after = False
        self.idle_since = time.monotonic()


class App:
    def __init__(self, listeners: list[socket.socket], generation: int) -> None:
        self.listeners = {s.fileno(): s for s in listeners}
        self.generation = generation
        self.pid = os.getpid()
        self.body = f"version {generation} pid {self.pid}\n".encode()
        self.conns: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.draining_since: float | None = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.ep.register(self.wake_r.fileno(), select.EPOLLIN)
        for fd in self.listeners:
            self.ep.register(fd, select.EPOLLIN)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def response(self, close: bool) -> bytes:
        conn = "close" if close else "keep-alive"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"X-Handoff-Generation: %d\r\nX-Handoff-Pid: %d\r\nConnection: %s\r\n\r\n"
            % (len(self.body), self.generation, self.pid, conn.encode())
        ) + self.body

    def start_drain(self) -> None:
        for fd, s in list(self.listeners.items()):
            self.ep.unregister(fd)
            s.close()  # our fd only; the open socket lives on in the other holders
        self.listeners.clear()
        for conn in list(self.conns.values()):
            if conn.outbuf:
                conn.close_after = True

    def accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = lsock.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_RETRY_ERRNOS or exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = Conn(sock)
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        self.ep.unregister(fd)
        del self.conns[fd]
        conn.sock.close()

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        conn.inbuf += data
        out = []
        while True:
            head, sep, rest = conn.inbuf.partition(b"\r\n\r\n")
            if not sep:
                break
            conn.inbuf = rest
            lower = head.lower()
            close = (
                self.draining_since is not None
                or b"\r\nconnection: close" in lower
                or (head.startswith(b"GET") and b" http/1.0" in lower.split(b"\r\n", 1)[0])
            )
            out.append(self.response(close))
            if close:
                conn.close_after = True
                conn.inbuf = b""
                break
        if out:
            conn.outbuf += b"".join(out)
            self.flush(conn)
        conn.idle_since = time.monotonic()

    def flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if conn.outbuf:
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        elif conn.close_after:
            # Half-close first so the client reads the whole response before the FIN.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self.close(conn)
        else:
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def run(self) -> None:
        notify(f"READY=1\nSTATUS=version {self.generation}\nMAINPID={self.pid}")
        drain_started = False
        while True:
            timeout = -1.0
            if self.draining_since is not None:
                if not drain_started:
                    drain_started = True
                    notify("STOPPING=1")
                    self.start_drain()
                now = time.monotonic()
                if not self.conns or now - self.draining_since > DRAIN_TIMEOUT:
                    return
                for conn in list(self.conns.values()):
                    if not conn.outbuf and not conn.inbuf and now - conn.idle_since > DRAIN_IDLE_GRACE:
                        self.close(conn)
                if not self.conns:
                    return
                timeout = 0.1  # re-check the idle grace; a deadline, not a readiness poll
            for fd, events in self.ep.poll(timeout):
                if fd == self.wake_r.fileno():
                    with contextlib.suppress(BlockingIOError):
                        self.wake_r.recv(512)
                    continue
                lsock = self.listeners.get(fd)
                if lsock is not None:
                    self.accept(lsock)
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if events & select.EPOLLOUT and conn.outbuf:
                    self.flush(conn)
                    if fd not in self.conns:
                        continue
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self.on_readable(conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, action="append", default=[], help="an inherited listening fd")
    parser.add_argument("--bind", help="HOST:PORT to bind when nothing is inherited")
    parser.add_argument("--reuseport", action="store_true", help="set SO_REUSEPORT before --bind")
    args = parser.parse_args()
    generation, mode = load_version()
    if mode == "broken":
        print(f"app: version {generation} is broken (BENCH_VERSION_FILE mode=broken)", file=sys.stderr)
        sys.exit(1)
    # A stop signal during the slow start takes the default action: there is nothing to drain.
    if mode == "slow":
        time.sleep(SLOW_START)
    App(inherited_listeners(args), generation).run()


if __name__ == "__main__":
    main()
