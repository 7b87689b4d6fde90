"""Worker programs for the integration tests, chosen with ``WORKER_MODE``.

Kept free of trio so they start fast; each speaks sd_notify and LISTEN_FDS by hand, as a worker
written by someone else would (no handoff library).

Modes:
- ``serve`` (default): HTTP on every passed stream socket, READY=1, drains on SIGTERM.
- ``exit``: exits 1 at once (a broken new version); ``WORKER_EXIT_INDEX=N`` makes only worker
  N of a generation do so.
- ``never_ready``: serves but never sends READY=1.
- ``ignore_term``: serves, but ignores SIGTERM (must be SIGKILLed after drain_timeout).
- ``shutdown_on_term``: serves; when told to drain, calls shutdown(SHUT_RDWR) on its inherited
  listeners before closing them (which stops them listening for every holder: a common way to
  "stop accepting" that is wrong for a shared socket).
- ``strict``: first checks exactly what libsystemd's sd_listen_fds(3) checks, and exits 3 with
  the reason on stderr if anything is off; then serves.

With any serving mode, ``WORKER_NO_ACCEPT=1`` makes it ready without ever accepting (the
connections wait in the accept queue until it drains), and ``WORKER_TERM_LOG=path`` makes it
append ``pid monotonic-time`` to ``path`` when SIGTERM arrives.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import stat
import sys


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def sd_listen_fds_strict() -> list[int]:
    """The checks of sd_listen_fds(3), failing loudly instead of returning 0."""
    problems = []
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        problems.append(f"LISTEN_PID={os.environ.get('LISTEN_PID')} but getpid()={os.getpid()}")
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if n <= 0:
        problems.append("LISTEN_FDS missing or 0")
    if len(names) != n:
        problems.append(f"LISTEN_FDNAMES has {len(names)} names for {n} fds")
    for fd in range(3, 3 + n):
        try:
            st = os.fstat(fd)
        except OSError as exc:
            problems.append(f"fd {fd} not open: {exc}")
            continue
        if not stat.S_ISSOCK(st.st_mode):
            problems.append(f"fd {fd} is not a socket")
    # fds beyond the passed range must not leak into the worker (except 0-2)
    extra = sorted(int(x) for x in os.listdir("/proc/self/fd") if int(x) >= 3 + n)
    extra = [fd for fd in extra if not os.path.realpath(f"/proc/self/fd/{fd}").startswith("/proc")]
    if extra:
        problems.append(
            f"unexpected open fds {extra}: {[os.path.realpath(f'/proc/self/fd/{f}') for f in extra]}"
        )
    sigpipe = signal.getsignal(signal.SIGPIPE)
    if problems:
        print("strict worker: " + "; ".join(problems), file=sys.stderr, flush=True)
        sys.exit(3)
    del sigpipe
    return list(range(3, 3 + n))


def serve(fds: list[int], ignore_term: bool, announce: bool, shutdown: bool = False) -> None:
    gen = os.environ.get("HANDOFF_GENERATION", "0")
    pid = os.getpid()
    body = f"generation {gen} pid {pid}\n".encode()
    sel = selectors.DefaultSelector()
    listeners = []
    for fd in fds:
        s = socket.socket(fileno=fd)
        if s.type != socket.SOCK_STREAM:
            continue
        s.setblocking(False)
        listeners.append(s)
        sel.register(s, selectors.EVENT_READ, "listener")
    if os.environ.get("WORKER_NO_ACCEPT") == "1":
        for s in listeners:
            sel.unregister(s)
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    draining = False
    term_log = os.environ.get("WORKER_TERM_LOG")

    def on_term(signum: int, frame: object) -> None:
        nonlocal draining
        if term_log and signum == signal.SIGTERM:
            import time

            with open(term_log, "a") as f:
                f.write(f"{os.getpid()} {time.monotonic()}\n")
        if not ignore_term:
            draining = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sel.register(rfd, selectors.EVENT_READ, "wakeup")
    buffers: dict[socket.socket, bytes] = {}
    if announce:
        notify("READY=1\nSTATUS=test worker serving")
    while True:
        if draining and listeners:
            for s in listeners:
                with contextlib.suppress(KeyError):  # WORKER_NO_ACCEPT: never registered
                    sel.unregister(s)
                if shutdown:
                    with contextlib.suppress(OSError):  # ENOTCONN: another worker did it first
                        s.shutdown(socket.SHUT_RDWR)
                s.close()
            listeners = []
        if draining and not buffers:
            return
        for key, _ in sel.select(timeout=None):
            if key.data == "wakeup":
                os.read(rfd, 512)
            elif key.data == "listener":
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(False)
                buffers[conn] = b""
                sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
                    continue
                buf = buffers[conn] + data
                close = False
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    close = draining or b"connection: close" in head.lower()
                    resp = (
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Handoff-Generation: %s\r\n"
                        b"X-Handoff-Pid: %d\r\nConnection: %s\r\n\r\n"
                        % (len(body), gen.encode(), pid, b"close" if close else b"keep-alive")
                    ) + body
                    conn.setblocking(True)
                    conn.sendall(resp)
                    conn.setblocking(False)
                    if close:
                        break
                if close:
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
                else:
                    buffers[conn] = buf


def main() -> None:
    mode = os.environ.get("WORKER_MODE", "serve")
    if os.environ.get("WORKER_EXIT_INDEX") == os.environ.get("HANDOFF_WORKER", "-"):
        mode = "exit"  # only this worker of the generation is broken
    if mode == "exit":
        print("test worker: failing on purpose", file=sys.stderr)
        sys.exit(1)
    if mode == "strict":
        fds = sd_listen_fds_strict()
    else:
        fds = list(range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))))
    serve(
        fds,
        ignore_term=mode == "ignore_term",
        announce=mode != "never_ready",
        shutdown=mode == "shutdown_on_term",
    )


if __name__ == "__main__":
    main()
