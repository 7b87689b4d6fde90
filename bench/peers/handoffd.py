"""handoffd: holds the socket, starts generation N+1 on it, retires N once N+1 reported READY=1.

Reload: ``handoffd upgrade --config PATH`` blocks until the new generation is ready (exit 0) or
the upgrade failed (exit 1). Self-upgrade: ``handoffd upgrade --self``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import ClassVar

from bench.peers import (
    APP,
    START_TIMEOUT,
    Peer,
    ReloadOutcome,
    Requirement,
    gunicorn_argv,
    run_command,
    wait_serving,
    which,
)


def handoffd_config(
    runtime_dir: object,
    command: list[str],
    *,
    processes: int = 2,
    drain_timeout: float = 30,
    env: dict[str, str] | None = None,
    ready: str | None = "notify",
) -> str:
    """The config every benchmark runs handoffd with: one "http" listener on a free port.

    ``ready=None`` leaves the key out: handoffd's default readiness, as a new user gets it.
    """
    lines = [
        "[supervisor]",
        f"runtime_dir = {json.dumps(str(runtime_dir))}",
        "[[listener]]",
        'name = "http"',
        'address = "127.0.0.1:0"',
        "backlog = 1024",
        "[program]",
        f"command = {json.dumps(command)}",
        f"processes = {processes}",
        *([] if ready is None else [f"ready = {json.dumps(ready)}"]),
        "ready_timeout = 30",
        'stop_signal = "SIGTERM"',
        f"drain_timeout = {drain_timeout}",
    ]
    if env:
        lines.append("[program.env]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def handoffd_bin() -> str | None:
    return which("handoffd")


class HandoffdPeer(Peer):
    name: ClassVar[str] = "handoffd"
    summary: ClassVar[str] = (
        "handoffd (this project): 2 workers on one held socket, notify readiness"
    )
    self_upgrade_na: ClassVar[str | None] = None
    self_upgrade_restarts_workers: ClassVar[bool] = False
    requires: ClassVar[list[Requirement]] = [Requirement("pip", "handoffd (pip install -e .)")]

    @classmethod
    def missing(cls) -> str | None:
        if handoffd_bin() is None:
            return "the handoffd console script is not installed (cd /work/main && .venv/bin/pip install -e .)"
        probe = subprocess.run(
            [str(handoffd_bin()), "--help"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode != 0:
            return f"handoffd --help failed: {(probe.stderr or probe.stdout).strip()[-300:]}"
        return None

    @property
    def config(self) -> str:
        return str(self.workdir / "handoffd.toml")

    def cli(self, *args: str) -> list[str]:
        return [str(handoffd_bin()), *args, "--config", self.config]

    def start(self) -> None:
        runtime = self.workdir / "run"
        runtime.mkdir(exist_ok=True)
        env = {"BENCH_VERSION_FILE": str(self.version_file)}
        if self.app == "gunicorn":
            # One gunicorn (2 workers) reading LISTEN_FDS, with the default readiness.
            config = handoffd_config(runtime, gunicorn_argv(), processes=1, env=env, ready=None)
        else:
            config = handoffd_config(runtime, [sys.executable, str(APP)], env=env)
        (self.workdir / "handoffd.toml").write_text(config)
        proc = self.spawn(self.cli("run"), "handoffd.log")
        deadline = time.monotonic() + START_TIMEOUT
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"handoffd run exited {proc.returncode}: {self.log_tail('handoffd.log')}"
                )
            status = self.status()
            workers = status.get("workers") or []
            listeners = status.get("listeners") or []
            # Every worker ready before the load starts, as the baseline's start waits for every
            # app (bench/peers/naive.py): the steady-state pair compares the same 2 workers.
            if listeners and workers and all(w.get("state") == "ready" for w in workers):  # type: ignore[union-attr]
                address = str(listeners[0]["address"])  # type: ignore[index]
                host, _, port = address.rpartition(":")
                self.address = (host.strip("[]"), int(port))
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"handoffd not ready in {START_TIMEOUT} s: {status}")
        wait_serving(self.address, START_TIMEOUT)

    def status(self) -> dict[str, object]:
        rc, out = run_command([*self.cli("status"), "--json"], timeout=10)
        if rc != 0:
            return {}
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def _outcome(self, args: list[str]) -> ReloadOutcome:
        rc, out = run_command(self.cli(*args))
        if rc == 0:
            return ReloadOutcome("ok")
        if rc == 1:
            return ReloadOutcome(
                "failed", out.strip().splitlines()[-1] if out.strip() else "exit 1"
            )
        return ReloadOutcome("error", f"exit {rc}: {out.strip()[-200:]}")

    def reload(self) -> ReloadOutcome:
        return self._outcome(["upgrade"])

    def self_upgrade(self) -> ReloadOutcome:
        return self._outcome(["upgrade", "--self"])

    def stop(self) -> None:
        run_command(self.cli("stop"), timeout=60)
        super().stop()
