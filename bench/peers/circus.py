"""circus: circusd binds the socket and passes its fd to 2 app processes; ``circusctl reload``.

A graceful reload spawns ``numprocesses`` new processes and then stops the oldest ones, without
any readiness check (circus has no notion of a process being ready: only ``warmup_delay``).
``circusctl reload --waiting`` answers once that is done; a new process that exits at start-up
is just respawned.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import ClassVar

from bench.peers import (
    APP,
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

INI = """\
[circus]
endpoint = ipc://{dir}/endpoint.sock
pubsub_endpoint = ipc://{dir}/pubsub.sock
statsd = False
check_delay = 5
loglevel = WARNING

[watcher:app]
cmd = {cmd}
use_sockets = True
numprocesses = 2
graceful_timeout = 20
copy_env = True
stop_signal = TERM

[socket:web]
host = 127.0.0.1
port = {port}
backlog = 1024
"""


class CircusPeer(Peer):
    name: ClassVar[str] = "circus"
    summary: ClassVar[str] = "circusd holds the socket, 2 app processes, circusctl reload --waiting"
    self_upgrade_na: ClassVar[str | None] = (
        "circusd cannot replace itself; restarting it closes the socket"
    )
    requires: ClassVar[list[Requirement]] = [Requirement("pip", "circus")]

    @classmethod
    def missing(cls) -> str | None:
        if which("circusd") is None or which("circusctl") is None:
            return "circus is not installed (pip install circus)"
        return None

    def endpoint(self) -> str:
        return f"ipc://{self.workdir}/endpoint.sock"

    def start(self) -> None:
        port = free_port()
        self.address = ("127.0.0.1", port)
        ini = self.workdir / "circus.ini"
        cmd = f"{sys.executable} {APP} --fd $(circus.sockets.web)"
        if self.app == "gunicorn":
            cmd = shlex.join(gunicorn_argv("--bind", "fd://FD")).replace(
                "FD", "$(circus.sockets.web)"
            )
        ini.write_text(INI.format(dir=self.workdir, cmd=cmd, port=port))
        self.spawn([str(which("circusd")), str(ini)], "circusd.log")
        wait_serving(self.address, START_TIMEOUT)

    def reload(self) -> ReloadOutcome:
        rc, out = run_command(
            [
                str(which("circusctl")),
                "--endpoint",
                self.endpoint(),
                "--timeout",
                "30",
                "reload",
                "app",
                "--waiting",
            ]
        )
        text = out.strip().splitlines()[-1] if out.strip() else ""
        if rc == 0 and "error" not in text.lower():
            return ReloadOutcome("ok", text[-200:])
        return ReloadOutcome("failed", f"exit {rc}: {text[-200:]}")

    def stop(self) -> None:
        rc, _ = run_command(
            [str(which("circusctl")), "--endpoint", self.endpoint(), "quit", "--waiting"],
            timeout=40,
        )
        if rc != 0:
            for proc in self.procs:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
        super().stop()
