"""SO_REUSEPORT overlap restart: start the new service on its own socket, then stop the old one.

The new instance (bench/apps/launch.py --bind --reuseport) binds the same port with
SO_REUSEPORT; once it reports READY=1 on a notify socket the harness gives it, the old instance
gets SIGTERM. If the new one exits before ready, the reload is reported failed and the old one
keeps serving. The flaw it shows: each socket of a reuseport group has its own accept queue, and
the old socket's queued connections are reset when it closes (DESIGN.md, pitfalls).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import ClassVar

from bench.peers import START_TIMEOUT, ReloadOutcome, free_port, wait_serving
from bench.peers.naive import NaivePeer

# How long a new instance may take to report READY=1 (the slow version needs 2 s).
READY_TIMEOUT = 30.0


class ReuseportPeer(NaivePeer):
    name: ClassVar[str] = "reuseport-overlap"
    summary: ClassVar[str] = "start new on its own SO_REUSEPORT socket, wait READY=1, then stop old"

    serial: int = 0

    def launch_ready(self) -> tuple[subprocess.Popen[bytes], str]:
        """Start an instance and wait for READY=1 or its exit; returns it and "" or why it failed."""
        self.serial += 1
        path = str(self.workdir / f"notify-{self.serial}.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nsock:
            nsock.bind(path)
            proc = self.launch(reuseport=True, NOTIFY_SOCKET=path)
            pidfd = os.pidfd_open(proc.pid)
            try:
                deadline = time.monotonic() + READY_TIMEOUT
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return proc, f"not ready after {READY_TIMEOUT} s"
                    readable, _, _ = select.select([nsock, pidfd], [], [], left)
                    if pidfd in readable:
                        return proc, f"new instance exited {proc.wait()} before READY=1"
                    if nsock in readable and b"READY=1" in nsock.recv(4096):
                        return proc, ""
            finally:
                os.close(pidfd)
                os.unlink(path)

    def start(self) -> None:
        self.address = ("127.0.0.1", free_port())
        proc, why = self.launch_ready()
        if why:
            raise RuntimeError(why)
        self.current = proc
        wait_serving(self.address, START_TIMEOUT)

    def reload(self) -> ReloadOutcome:
        proc, why = self.launch_ready()
        if why:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            return ReloadOutcome("failed", why)
        old, self.current = self.current, proc
        if old is not None:
            os.kill(old.pid, signal.SIGTERM)  # its socket, and the connections queued on it, go
        return ReloadOutcome("ok", "new instance ready; old one stopped")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m bench.compare --peers reuseport-overlap")
