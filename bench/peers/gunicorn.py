"""gunicorn, sync worker class, 2 workers; reload by SIGHUP to the master.

SIGHUP: the master re-reads its config, forks 2 new workers (which import the app, so they pick
up the new version), and gracefully stops the old ones without waiting for the new ones to be
able to serve. Nothing is reported back to whoever sent the signal.

Self-upgrade (the binary-upgrade dance from gunicorn's docs): USR2 to the master starts a new
master on the same sockets (the old pid file becomes ``.oldbin``); once the new master's workers
serve, WINCH to the old master (gunicorn ignores it unless daemonized) and TERM (graceful stop;
QUIT would be the fast one).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import ClassVar

from bench.peers import (
    START_TIMEOUT,
    Peer,
    ReloadOutcome,
    Requirement,
    free_port,
    gunicorn_argv,
    wait_serving,
    which,
)


class GunicornPeer(Peer):
    name: ClassVar[str] = "gunicorn"
    summary: ClassVar[str] = (
        "gunicorn 2 sync workers, SIGHUP (no keep-alive: the sync worker closes every connection)"
    )
    self_upgrade_na: ClassVar[str | None] = None
    requires: ClassVar[list[Requirement]] = [Requirement("pip", "gunicorn")]

    @classmethod
    def missing(cls) -> str | None:
        if which("gunicorn") is None:
            return "gunicorn is not installed (pip install gunicorn)"
        return None

    @property
    def pidfile(self) -> str:
        return str(self.workdir / "gunicorn.pid")

    def master_pid(self) -> int:
        """The newest master: gunicorn 27 writes a USR2-started master's pid to ``PIDFILE.2``."""
        for path in (self.pidfile + ".2", self.pidfile):
            try:
                with open(path, encoding="ascii") as f:
                    return int(f.read().strip())
            except (FileNotFoundError, ValueError):
                continue
        raise FileNotFoundError(self.pidfile)

    def start(self) -> None:
        port = free_port()
        self.address = ("127.0.0.1", port)
        # Its own app is already the unmodified gunicorn: app="gunicorn" changes nothing.
        self.spawn(
            gunicorn_argv("--bind", f"127.0.0.1:{port}", "--pid", self.pidfile), "gunicorn.log"
        )
        wait_serving(self.address, START_TIMEOUT)

    def reload(self) -> ReloadOutcome:
        os.kill(self.master_pid(), signal.SIGHUP)
        return ReloadOutcome("none", "SIGHUP sent; gunicorn answers nothing")

    def self_upgrade(self) -> ReloadOutcome:
        old = self.master_pid()
        target = json.loads(self.version_file.read_text())["generation"]
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.master_pid() != old:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        else:
            return ReloadOutcome("none", "no new master wrote the pid file")
        try:
            wait_serving(self.address, START_TIMEOUT, generation=target)
        except TimeoutError as exc:
            return ReloadOutcome("none", f"new master's workers never served: {exc}")
        os.kill(old, signal.SIGWINCH)
        os.kill(old, signal.SIGTERM)
        return ReloadOutcome(
            "none", "USR2, then WINCH+TERM to the old master once the new workers served"
        )

    def stop(self) -> None:
        for path in (self.pidfile + ".2", self.pidfile):
            try:
                with open(path, encoding="ascii") as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        super().stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m bench.compare --peers gunicorn")
