"""tableflip (Go, cloudflare/tableflip from Debian): SIGHUP makes the process re-execute itself.

The new process inherits the listener, reads the version file, and calls ``Ready()``; the old
one then drains. ``Upgrade()`` returns the outcome inside the old process only (the app logs it):
whoever sent SIGHUP learns nothing. tableflip refuses a new upgrade until the previous parent
has exited ("parent hasn't exited"), and its reload already replaces the binary, so there is no
separate self-upgrade. One Go process (GOMAXPROCS = all cores) instead of 2 workers.

The binary is built offline from Debian's packages in GOPATH mode (no module download):
``GO111MODULE=off GOPATH=/usr/share/gocode go build``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from bench.peers import (
    APPS,
    BENCH,
    START_TIMEOUT,
    Peer,
    ReloadOutcome,
    Requirement,
    free_port,
    wait_serving,
    which,
)

GO_SRC = APPS / "go"
GOPATH = Path("/usr/share/gocode")
BINARY = BENCH / "out" / "go" / "tableflip-app"


def build() -> str | None:
    """Build the app if needed; returns None or why it cannot be built."""
    go = which("go")
    if go is None:
        return "go is not installed (apt-get install golang-go)"
    if not (GOPATH / "src/github.com/cloudflare/tableflip").is_dir():
        return "tableflip sources missing (apt-get install golang-github-cloudflare-tableflip-dev)"
    src = GO_SRC / "main.go"
    if BINARY.exists() and BINARY.stat().st_mtime >= src.stat().st_mtime:
        return None
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=str(GOPATH),
        GOFLAGS="",
        GOPROXY="off",
        GOCACHE=str(BINARY.parent / "cache"),
    )
    proc = subprocess.run(
        [go, "build", "-o", str(BINARY), "."],
        cwd=GO_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        return f"go build failed: {proc.stderr.strip()[-300:]}"
    return None


class TableflipPeer(Peer):
    name: ClassVar[str] = "tableflip"
    summary: ClassVar[str] = (
        "Go net/http + cloudflare/tableflip, SIGHUP re-exec (1 process, all cores)"
    )
    self_upgrade_na: ClassVar[str | None] = (
        "the reload itself re-executes the binary (scenario 1 is its self-upgrade)"
    )
    gunicorn_na: ClassVar[str | None] = (
        "the app is the Go binary that re-executes itself: it cannot host gunicorn"
    )
    requires: ClassVar[list[Requirement]] = [
        Requirement("apt", "golang-go"),
        Requirement("apt", "golang-github-cloudflare-tableflip-dev"),
    ]

    @classmethod
    def missing(cls) -> str | None:
        return build()

    @property
    def pidfile(self) -> Path:
        return self.workdir / "tableflip.pid"

    def start(self) -> None:
        port = free_port()
        self.address = ("127.0.0.1", port)
        self.spawn(
            [str(BINARY), "-listen", f"127.0.0.1:{port}", "-pid-file", str(self.pidfile)],
            "tableflip.log",
        )
        wait_serving(self.address, START_TIMEOUT)

    def current_pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def reload(self) -> ReloadOutcome:
        os.kill(self.current_pid(), signal.SIGHUP)
        return ReloadOutcome("none", "SIGHUP sent; the outcome is only in the app's log")

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(self.current_pid(), signal.SIGTERM)
        super().stop()
