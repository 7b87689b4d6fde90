"""Issue 14's hardening of paths, the pid file, listeners and the worker environment.

Each test here failed on the main branch before the fix it guards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.daemon import Daemon


def _environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item and b"=" in item)


def test_workers_never_inherit_systemds_listen_and_notify_variables(
    run_daemon: Callable[..., Daemon],
) -> None:
    # What systemd v256+ sets for handoffd itself; LISTEN_PID names another process, so the
    # fds are ignored, and none of it may reach a worker (LISTEN_PIDFDID would make a stock
    # libsystemd in the worker ignore every fd handoffd passes).
    daemon = run_daemon(
        processes=1,
        env={
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "from-systemd",
            "LISTEN_PID": "1",
            "LISTEN_PIDFDID": "4242",
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": "1",
        },
    )
    (pid,) = daemon.worker_pids()
    environ = _environ_of(pid)
    assert "LISTEN_PIDFDID" not in environ
    assert "WATCHDOG_USEC" not in environ
    assert "WATCHDOG_PID" not in environ
    # Set by handoffd for this worker, never systemd's values passed through.
    assert environ["LISTEN_FDNAMES"] == "http"
    assert environ["LISTEN_PID"] == str(pid)
    assert environ["NOTIFY_SOCKET"].startswith(str(daemon.runtime_dir))
