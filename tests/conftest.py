from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import pytest

from tests.daemon import Daemon, pid_alive, remove_tree, short_tempdir, wait_until, write_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """The test process itself ends with the fds it started with."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # the listdir fd itself is closed again; anything else is a leak
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds leaked: {[(fd, os.readlink(f'/proc/self/fd/{fd}')) for fd in leaked]}"


@pytest.fixture
def run_daemon(no_fd_leak: None) -> Iterator[Callable[..., Daemon]]:
    """Start handoffd on a generated config; stop it and check no worker is left behind."""
    started: list[tuple[Daemon, Path]] = []

    def start(
        env: dict[str, str] | None = None,
        *,
        wrap: list[str] | None = None,
        base: Path | None = None,
        **config: Any,
    ) -> Daemon:
        """``wrap`` is a command handoffd is started under (it must exec it); ``base`` a
        directory for its config and runtime dir, removed at the end (a fresh one by default)."""
        base = base or short_tempdir()
        cfg = base / "handoffd.toml"
        write_config(cfg, base / "run", **config)
        daemon = Daemon(cfg, base / "run", env=env, wrap=wrap)
        started.append((daemon, base))
        daemon.wait_ready()
        return daemon

    yield start
    for daemon, base in started:
        pids: list[int] = []
        if daemon.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                pids = [w["pid"] for w in daemon.status()["workers"] if w["pid"]]
        code = daemon.stop()
        for pid in pids:
            wait_until(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to be gone")
        remove_tree(base)
        assert code == 0 or code is None, f"handoffd exited {code}:\n{daemon.log_text()}"


from tests.systemd_user import systemd_user as systemd_user  # noqa: E402  the real systemd --user fixture
