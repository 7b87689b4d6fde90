"""Server::Starter (``start_server``, Debian's libserver-starter-perl) with the launcher as worker.

start_server binds the port once and hands it to its worker in ``SERVER_STARTER_PORT``; the
worker here is bench/apps/launch.py, which runs 2 app processes on that fd. Reload:
``start_server --restart`` sends SIGHUP and then polls the status file once a second until only
the new generation is left. start_server judges a new worker healthy if it is still alive after
``--interval`` (1 s), not if it can serve; a worker that dies sooner is retried for ever while
the old one keeps serving, and ``--restart`` then never returns (the harness gives up after
RELOAD_TIMEOUT).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import ClassVar

from bench.peers import (
    LAUNCH,
    START_TIMEOUT,
    Peer,
    ReloadOutcome,
    Requirement,
    free_port,
    gunicorn_argv,
    run_command,
    wait_serving,
    which,
)

# How long --restart may block; longer than a healthy reload (interval 1 s + 1 s status poll).
RESTART_TIMEOUT = 8.0


class StarterPeer(Peer):
    name: ClassVar[str] = "start_server"
    summary: ClassVar[str] = (
        "Server::Starter start_server --restart, worker = launch.py (2 apps on the inherited fd)"
    )
    self_upgrade_na: ClassVar[str | None] = "start_server cannot replace itself"
    requires: ClassVar[list[Requirement]] = [Requirement("apt", "libserver-starter-perl")]

    @classmethod
    def missing(cls) -> str | None:
        if which("start_server") is None:
            return "start_server is not installed (apt-get install libserver-starter-perl)"
        return None

    def files(self) -> list[str]:
        return [
            f"--pid-file={self.workdir / 'starter.pid'}",
            f"--status-file={self.workdir / 'starter.status'}",
        ]

    def start(self) -> None:
        port = free_port()
        self.address = ("127.0.0.1", port)
        worker = [sys.executable, str(LAUNCH), "--inherit-starter", "--processes", "2"]
        if self.app == "gunicorn":
            # SERVER_STARTER_PORT is "127.0.0.1:PORT=FD": gunicorn takes the FD.
            argv = shlex.join(gunicorn_argv("--bind", "fd://FD"))
            worker = [
                "sh",
                "-c",
                "exec " + argv.replace("fd://FD", 'fd://"${SERVER_STARTER_PORT##*=}"'),
            ]
        self.spawn(
            [
                str(which("start_server")),
                f"--port=127.0.0.1:{port}",
                "--backlog=1024",
                *self.files(),
                "--signal-on-hup=TERM",
                "--signal-on-term=TERM",
                "--",
                *worker,
            ],
            "start_server.log",
        )
        wait_serving(self.address, START_TIMEOUT)

    def reload(self) -> ReloadOutcome:
        rc, out = run_command(
            [str(which("start_server")), "--restart", *self.files()], timeout=RESTART_TIMEOUT
        )
        if rc is None:
            return ReloadOutcome(
                "none", f"start_server --restart still waiting after {RESTART_TIMEOUT} s"
            )
        if rc == 0:
            return ReloadOutcome("ok", "--restart returned once only the new generation was left")
        return ReloadOutcome("failed", f"exit {rc}: {out.strip()[-200:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        super().stop()
