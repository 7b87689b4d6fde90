"""Naive kill-and-restart: stop the service (its socket closes with it), start the new one.

The service is bench/apps/launch.py --bind (2 apps on a socket the launcher binds), the way a
plain ``systemctl restart`` of a Type=simple unit behaves: the restart returns as soon as the
new process is started, so a new version that cannot start is not reported, and every
connection attempt in between is refused.
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

from bench.peers import (
    LAUNCH,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Peer,
    ReloadOutcome,
    free_port,
    gunicorn_argv,
    wait_serving,
)

# How long a new instance may take to report READY=1 (the slow version needs 2 s).
READY_TIMEOUT = 30.0


class NaivePeer(Peer):
    name: ClassVar[str] = "naive-restart"
    summary: ClassVar[str] = "kill the service, then start the new one (launch.py --bind, 2 apps)"
    self_upgrade_na: ClassVar[str | None] = "no supervisor"

    current: subprocess.Popen[bytes] | None = None
    serial: int = 0

    def launch(self, reuseport: bool = False, **env: str) -> subprocess.Popen[bytes]:
        bind = f"{self.address[0]}:{self.address[1]}"
        if self.app == "gunicorn":
            cmd = gunicorn_argv("--bind", bind, *(["--reuse-port"] if reuseport else []))
        else:
            cmd = [sys.executable, str(LAUNCH), "--bind", bind, "--processes", "2"]
            if reuseport:
                cmd.append("--reuseport")
        return self.spawn(cmd, "launch.log", env=self.env(**env))

    def launch_ready(self, reuseport: bool = False) -> tuple[subprocess.Popen[bytes], str]:
        """Start an instance and wait for READY=1 or its exit; returns it and "" or why it failed.

        launch.py reports READY=1 once every app process has (each does once it accepts);
        gunicorn's arbiter reports it before its workers have loaded the app.
        """
        self.serial += 1
        path = str(self.workdir / f"notify-{self.serial}.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nsock:
            nsock.bind(path)
            proc = self.launch(reuseport=reuseport, NOTIFY_SOCKET=path)
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
        # Every app accepting before the load starts, as handoffd's start waits for every worker:
        # a load that starts while the second app is still importing puts all of wrk's kept-alive
        # connections on the first one (the steady-state baseline measured one worker, not two).
        self.address = ("127.0.0.1", free_port())
        proc, why = self.launch_ready()
        if why:
            raise RuntimeError(why)
        self.current = proc
        wait_serving(self.address, START_TIMEOUT)

    def reload(self) -> ReloadOutcome:
        if self.current is not None:
            os.kill(self.current.pid, signal.SIGTERM)
            try:
                self.current.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.current.kill()
                self.current.wait()
        self.current = self.launch()
        return ReloadOutcome("none", "restarted; nothing waits for the new process")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        super().stop()
