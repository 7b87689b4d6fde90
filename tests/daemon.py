"""Run a real ``handoffd run`` for integration tests, and talk to it through its real CLI.

Waiting is done on the daemon's own log events (its stderr, JSON lines), never on sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "tests" / "workers.py")


def worker_command() -> list[str]:
    return [sys.executable, WORKER]


def write_config(
    path: Path,
    runtime_dir: Path,
    *,
    command: list[str] | None = None,
    processes: int = 2,
    ready: str | None = "notify",
    ready_timeout: float = 10,
    hold: float | None = 0,
    drain_timeout: float = 10,
    env: dict[str, str] | None = None,
    listeners: list[tuple[str, str]] | list[tuple[str, str, str]] | None = None,
    extra_program: str = "",
    extra_supervisor: str = "",
    metrics: str | None = None,
) -> None:
    """``metrics``: the ``[metrics] address`` (None: no such section)."""
    listeners = listeners if listeners is not None else [("http", "127.0.0.1:0")]
    lines = [
        "[supervisor]",
        f'runtime_dir = "{runtime_dir}"',
        "restart_backoff_initial = 0.1",
        "restart_backoff_max = 1.0",
        extra_supervisor,
    ]
    for name, address, *extra in listeners:  # extra: more TOML lines for the listener
        lines += ["[[listener]]", f'name = "{name}"', f'address = "{address}"', *extra]
    lines += [
        "[program]",
        f"command = {json.dumps(command or worker_command())}",
        f"processes = {processes}",
        # None leaves the key out: the daemon's default readiness.
        *([] if ready is None else [f'ready = "{ready}"']),
        f"ready_timeout = {ready_timeout}",
        # The tests written before the canary hold keep their speed and meaning: hold = 0 unless
        # a test asks for one (None: the default hold).
        "" if hold is None else f"hold = {hold}",
        f"drain_timeout = {drain_timeout}",
        extra_program,
    ]
    if env:
        lines.append("[program.env]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in env.items()]
    if metrics is not None:
        lines += ["[metrics]", f'address = "{metrics}"']
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """A handoffd process with its config, logs and CLI."""

    def __init__(
        self,
        config: Path,
        runtime_dir: Path,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        """Start ``handoffd run``; ``wrap`` is a command line it runs under (say
        ``systemd-socket-activate -l ...``), which must exec it in the end."""
        self.config = config
        self.runtime_dir = runtime_dir
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._addresses: dict[str, tuple[str, int]] = {}
        self._cond = threading.Condition()
        full_env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC"):
            full_env.pop(key, None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [
                *(wrap or []),
                sys.executable,
                "-m",
                "handoff",
                "run",
                "--config",
                str(config),
                "--log-format",
                "json",
            ],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=REPO,
            text=True,
        )
        #: The supervisor in charge: ``proc`` until a self-upgrade hands over (``self_upgrade``).
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw_lines.append(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = {"event": "raw", "line": line}
                if isinstance(event, dict):
                    self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "__eof__"})
            self._cond.notify_all()

    def wait_event(
        self,
        name: str,
        timeout: float = 30,
        where: Callable[[dict[str, Any]], bool] | None = None,
        start: int = 0,
    ) -> dict[str, Any]:
        """Block until the daemon logs ``name`` (matching ``where``); fails on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if event.get("event") == name and (where is None or where(event)):
                        return event
                    if event.get("event") == "__eof__":
                        raise AssertionError(
                            f"handoffd exited waiting for {name}:\n{self.log_text()}"
                        )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {name} within {timeout}s:\n{self.log_text()}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def log_text(self) -> str:
        return "".join(self.raw_lines[-80:])

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        return self.wait_event("supervisor.ready", timeout)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "handoff", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def status(self) -> dict[str, Any]:
        """The daemon's status over the control socket (in-process: the CLI costs ~0.5 s)."""
        from handoff._control import StatusRequest, call

        return call(self.runtime_dir / "control.sock", StatusRequest(), timeout=10)

    def upgrade(self, *extra: str) -> tuple[int, dict[str, Any]]:
        result = self.cli("upgrade", "--json", *extra)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        # the last JSON document is the reply (events come first, one per line)
        text = (
            result.stdout[result.stdout.index("{\n") :]
            if "{\n" in result.stdout
            else (lines[-1] if lines else "{}")
        )
        return result.returncode, json.loads(text)

    def address(self, name: str = "http") -> tuple[str, int]:
        if name in self._addresses:
            return self._addresses[name]
        for li in self.status()["listeners"]:
            if li["name"] == name:
                host, _, port = li["address"].rpartition(":")
                self._addresses[name] = (host.strip("[]"), int(port))
                return self._addresses[name]
        raise AssertionError(f"no listener {name}")

    def worker_pids(self, generation: int | None = None) -> list[int]:
        st = self.status()
        return [
            w["pid"]
            for w in st["workers"]
            if w["pid"] is not None and (generation is None or w["generation"] == generation)
        ]

    def self_upgrade(self, *extra: str) -> tuple[int, dict[str, Any]]:
        """``handoffd upgrade --self``; on success, follow the new supervisor.

        The successor inherits the old one's stderr, so its log lines arrive on the same pipe:
        this waits for its ``supervisor.ready`` and for the old supervisor to be gone.
        """
        mark = self.mark()
        old = self.pid
        code, reply = self.upgrade("--self", *extra)
        if code == 0:
            new = reply["supervisor_pid"]
            self.wait_event(
                "supervisor.ready", where=lambda e: e.get("handover_from") == old, start=mark
            )
            if new == old:
                pass  # re-executed in place: the same process, a new image
            elif old == self.proc.pid:
                self.proc.wait(30)
            else:
                wait_until(lambda: not pid_alive(old), 30, f"old supervisor {old} to exit")
            self.pid = new
        return code, reply

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the supervisor in charge and wait until it is gone; ``proc``'s exit code.

        A successor is not our child: its end shows as EOF on the stderr pipe, which it and its
        workers hold until they have all exited.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        elif self.pid != self.proc.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            if self.pid != self.proc.pid:
                self._reader.join(timeout)
                assert not self._reader.is_alive(), f"supervisor {self.pid} did not stop"
            return code
        finally:
            self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went between open and read
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll real state with a deadline (for state that offers no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def short_tempdir() -> Path:
    """A short directory for runtime sockets (sun_path is limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp"))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
