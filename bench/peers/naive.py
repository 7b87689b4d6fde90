"""Naive kill-and-restart: stop the service (its socket closes with it), start the new one.

The service is bench/apps/launch.py --bind (2 apps on a socket the launcher binds), the way a
plain ``systemctl restart`` of a Type=simple unit behaves: the restart returns as soon as the
new process is started, so a new version that cannot start is not reported, and every
connection attempt in between is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import ClassVar

from bench.peers import (
    LAUNCH,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Peer,
    ReloadOutcome,
    free_port,
    wait_serving,
)


class NaivePeer(Peer):
    name: ClassVar[str] = "naive-restart"
    summary: ClassVar[str] = "kill the service, then start the new one (launch.py --bind, 2 apps)"
    self_upgrade_na: ClassVar[str | None] = "no supervisor"

    current: subprocess.Popen[bytes] | None = None

    def launch(self, reuseport: bool = False, **env: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, str(LAUNCH), "--bind", f"{self.address[0]}:{self.address[1]}", "--processes", "2"]
        if reuseport:
            cmd.append("--reuseport")
        return self.spawn(cmd, "launch.log", env=self.env(**env))

    def start(self) -> None:
        self.address = ("127.0.0.1", free_port())
        self.current = self.launch()
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
