"""Run N copies of the app on one listening socket, with no supervision: the peers' "service unit".

Used where a peer runs one command but the comparison wants two worker processes on one socket:
- ``--bind HOST:PORT``: the naive kill-and-restart peer and the steady-state baseline ("the same
  worker run alone"). The socket lives exactly as long as this process.
- ``--bind HOST:PORT --reuseport``: the SO_REUSEPORT overlap peer (each instance has its own
  socket, and so its own accept queue).
- ``--inherit-starter``: under Server::Starter, take the fds from ``SERVER_STARTER_PORT``.

It reports ``READY=1`` to its own ``NOTIFY_SOCKET`` once every app process has (exits 1 if one
dies first), forwards SIGTERM/SIGINT/SIGQUIT to the apps, waits for them, and exits. It does not
restart crashed apps. Never in the data path: the apps accept on the socket directly.

Example::

    python3 bench/apps/launch.py --bind 127.0.0.1:8080 --processes 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import tempfile
import time

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
# How long the apps may take to report READY=1 before the launcher gives up (the slow version
# needs 2 s).
READY_TIMEOUT = 30.0
# How long a draining app may take before it is killed.
STOP_TIMEOUT = 30.0


def notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode(), addr)


def listening_fds(args: argparse.Namespace) -> list[int]:
    if args.inherit_starter:
        spec = os.environ.get("SERVER_STARTER_PORT", "")
        if not spec:
            sys.exit("launch: --inherit-starter but SERVER_STARTER_PORT is not set")
        return [int(item.rpartition("=")[2]) for item in spec.split(";")]
    host, _, port = args.bind.rpartition(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, int(port)))
    s.listen(1024)
    return [s.detach()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bind", help="HOST:PORT to bind")
    where.add_argument("--inherit-starter", action="store_true", help="use SERVER_STARTER_PORT")
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    fds = listening_fds(args)
    tmp = tempfile.mkdtemp(prefix="bench-launch-")
    notify_path = os.path.join(tmp, "notify")
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    nsock.bind(notify_path)
    nsock.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    for key in ("SERVER_STARTER_PORT", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    cmd = [sys.executable, APP]
    for fd in fds:
        os.set_inheritable(fd, True)
        cmd += ["--fd", str(fd)]
    pids = []
    for _ in range(args.processes):
        # os.posix_spawn keeps Python's SIG_IGN for SIGPIPE unless reset (DESIGN.md pitfalls).
        pid = os.posix_spawn(
            sys.executable, cmd, env,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP), setsigmask=(),
        )
        pids.append(pid)
    pidfds = {os.pidfd_open(pid): pid for pid in pids}
    # Keep our copy of the fds: with --bind, this process's lifetime is the socket's.

    poller = select.poll()
    poller.register(nsock.fileno(), select.POLLIN)
    poller.register(wake_r.fileno(), select.POLLIN)
    for pfd in pidfds:
        poller.register(pfd, select.POLLIN)
    ready: set[int] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    alive = set(pids)
    announced = False
    rc = 0
    while alive:
        if stop:
            break
        timeout = None if announced else max(0.0, deadline - time.monotonic()) * 1000
        events = poller.poll(timeout)
        if not events and not announced:
            print("launch: apps not ready in time", file=sys.stderr)
            rc = 1
            break
        for fd, _ev in events:
            if fd == nsock.fileno():
                try:
                    data, _ = nsock.recvfrom(4096)
                except BlockingIOError:
                    continue
                # One notify socket for all apps: attribute by the MAINPID= each app sends.
                for line in data.decode(errors="replace").splitlines():
                    if line.startswith("MAINPID="):
                        ready.add(int(line[8:]))
            elif fd == wake_r.fileno():
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(512)
            elif fd in pidfds:
                poller.unregister(fd)
                pid = pidfds.pop(fd)
                _, status = os.waitpid(pid, 0)
                alive.discard(pid)
                if not announced:
                    print(f"launch: app {pid} exited {status >> 8} before ready", file=sys.stderr)
                    rc = 1
                    stop.append(signal.SIGTERM)
        if not announced and ready >= set(pids):
            announced = True
            notify(f"READY=1\nMAINPID={os.getpid()}")
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for pfd, pid in pidfds.items():
        left = max(0.0, deadline - time.monotonic())
        if not select.select([pfd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    nsock.close()
    os.unlink(notify_path)
    os.rmdir(tmp)
    sys.exit(rc)


if __name__ == "__main__":
    main()
