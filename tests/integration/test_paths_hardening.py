"""Issue 14's hardening of paths, the pid file, listeners and the worker environment.

Each test here failed on the main branch before the fix it guards.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from tests.daemon import short_tempdir

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.daemon import Daemon

#: An unprivileged uid to play "another user" (the tests run as root).
OTHER_UID = 65534


def _under_sh(script: str) -> list[str]:
    """A ``wrap`` for ``run_daemon``: run ``script`` in sh, then exec handoffd (``$$`` is its pid)."""
    return ["/bin/sh", "-c", f'{script}\nexec "$@"', "sh"]


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


def test_pid_file_temp_name_planted_as_a_symlink_by_another_uid_is_never_followed(
    run_daemon: Callable[..., Daemon],
) -> None:
    # The pid file lives in a directory of the service's user (another uid). On main, root
    # wrote through the predictable ".handoffd.pid.PID" and overwrote the file it points at.
    base = short_tempdir()
    base.chmod(0o755)  # the other uid must reach its own directory
    piddir = base / "app"
    piddir.mkdir()
    os.chown(piddir, OTHER_UID, OTHER_UID)
    victim = base / "victim"
    victim.write_text("precious\n")
    pid_file = piddir / "handoffd.pid"
    plant = f"setpriv --reuid={OTHER_UID} --regid={OTHER_UID} --clear-groups ln -s {victim}"
    daemon = run_daemon(
        wrap=_under_sh(f"{plant} {piddir}/.handoffd.pid.$$ || exit 99"),
        base=base,
        processes=1,
        extra_supervisor=f'pid_file = "{pid_file}"',
    )
    assert victim.read_text() == "precious\n"
    assert pid_file.read_text() == f"{daemon.pid}\n"
    assert not pid_file.is_symlink()


def test_pid_file_is_0644_even_under_umask_000(run_daemon: Callable[..., Daemon]) -> None:
    base = short_tempdir()
    pid_file = base / "handoffd.pid"
    daemon = run_daemon(
        wrap=_under_sh("umask 000"),
        base=base,
        processes=1,
        extra_supervisor=f'pid_file = "{pid_file}"',
    )
    assert pid_file.read_text() == f"{daemon.pid}\n"
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644
    daemon.stop()
    assert not pid_file.exists()
