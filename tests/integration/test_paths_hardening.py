"""Issue 14's hardening of paths, the pid file, listeners and the worker environment.

Each test here failed on the main branch before the fix it guards.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import request_once
from handoff._config import ListenerConfig
from handoff._errors import ListenerError
from handoff._listeners import bind_listener
from tests.daemon import (
    REPO,
    WORKER,
    pid_alive,
    remove_tree,
    short_tempdir,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.daemon import Daemon

#: An unprivileged uid to play "another user" (the tests run as root).
OTHER_UID = 65534
#: A second one, for the user who plants a link for the first.
ATTACKER_UID = 999


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


def _run_once(config: Path, *, as_uid: int | None = None) -> subprocess.CompletedProcess[str]:
    """``handoffd run`` on ``config``, expected to exit by itself (its worker is /bin/false)."""
    prefix = []
    if as_uid is not None:
        prefix = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
    env = {k: v for k, v in os.environ.items() if k not in _DEFAULT_DIR_VARS}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "handoff", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


# What runtime_dir_for looks at before the /tmp/handoffd-UID fallback.
_DEFAULT_DIR_VARS = ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_FDS")


def _exiting_config(path: Path, runtime_dir: Path | None) -> None:
    write_config(path, runtime_dir or Path("unused"), command=["/bin/false"], processes=1)
    if runtime_dir is None:  # the default runtime dir
        text = path.read_text().replace('runtime_dir = "unused"\n', "")
        path.write_text(text)


def test_runtime_dir_through_a_symlink_owned_by_another_uid_is_refused() -> None:
    # On main the check followed the link and ignored its owner, who could swap it later and
    # receive the workers' READY=1 and parked fds.
    base = short_tempdir()
    try:
        real = base / "real"
        real.mkdir(mode=0o700)
        link = base / "run"
        link.symlink_to(real)
        os.lchown(link, OTHER_UID, OTHER_UID)
        _exiting_config(base / "handoffd.toml", link)
        result = _run_once(base / "handoffd.toml")
        assert result.returncode == 2, result.stderr
        assert f"{link} is a symlink owned by uid {OTHER_UID}" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(real.iterdir()) == []  # nothing was created through it
    finally:
        remove_tree(base)


@pytest.fixture
def fallback_setup() -> Iterator[tuple[Path, Path]]:
    """OTHER_UID's default runtime dir without XDG_RUNTIME_DIR (``/tmp/handoffd-UID``), which
    must not exist yet, and a directory with a config for it (using the default); both removed."""
    fallback = Path(f"/tmp/handoffd-{OTHER_UID}")
    if fallback.exists() or fallback.is_symlink():
        pytest.skip(f"{fallback} exists on this machine")
    base = short_tempdir()
    base.chmod(0o755)
    _exiting_config(base / "handoffd.toml", None)
    yield fallback, base
    if fallback.is_symlink():
        fallback.unlink()
    remove_tree(fallback)
    remove_tree(base)


def test_default_runtime_dir_refuses_a_link_another_uid_planted_at_the_tmp_fallback(
    fallback_setup: tuple[Path, Path],
) -> None:
    # /tmp/handoffd-UID is predictable: another uid plants a link to a directory the victim
    # owns (and swaps it later); main followed it.
    fallback, base = fallback_setup
    decoy = base / "decoy"
    decoy.mkdir(mode=0o700)
    os.chown(decoy, OTHER_UID, OTHER_UID)
    fallback.symlink_to(decoy)
    os.lchown(fallback, ATTACKER_UID, ATTACKER_UID)
    result = _run_once(base / "handoffd.toml", as_uid=OTHER_UID)
    assert result.returncode == 2, result.stderr
    assert f"{fallback} is a symlink owned by uid {ATTACKER_UID}" in result.stderr
    assert list(decoy.iterdir()) == []


def test_default_runtime_dir_fallback_is_created_0700_and_refused_if_another_uid_owns_it(
    fallback_setup: tuple[Path, Path],
) -> None:
    fallback, base = fallback_setup
    result = _run_once(base / "handoffd.toml", as_uid=OTHER_UID)
    assert "Traceback" not in result.stderr
    info = fallback.lstat()
    assert stat.S_ISDIR(info.st_mode)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (OTHER_UID, 0o700)
    remove_tree(fallback)
    fallback.mkdir(mode=0o700)  # root's now: not the user's
    result = _run_once(base / "handoffd.toml", as_uid=OTHER_UID)
    assert result.returncode == 2, result.stderr
    assert f"{fallback} is owned by uid 0, not by uid {OTHER_UID}" in result.stderr


def test_a_root_owned_link_is_followed_once_and_a_later_swap_redirects_nothing(
    run_daemon: Callable[..., Daemon],
) -> None:
    base = short_tempdir()
    (base / "one").mkdir(mode=0o700)
    (base / "two").mkdir(mode=0o700)
    (base / "run").symlink_to(base / "one")  # root's own link, like /var/run -> /run
    daemon = run_daemon(base=base, processes=1)
    (old,) = daemon.worker_pids()
    assert _environ_of(old)["NOTIFY_SOCKET"].startswith(f"{base}/one/notify/")
    swap = base / "run.new"
    swap.symlink_to(base / "two")
    swap.rename(base / "run")
    daemon.runtime_dir = base / "one"  # where the daemon still is; the CLI follows the link
    mark = daemon.mark()
    os.kill(old, signal.SIGKILL)
    started = daemon.wait_event("worker.started", start=mark)
    wait_until(
        lambda: daemon.status()["workers"][0]["state"] == "ready", 30, "the restarted worker"
    )
    assert _environ_of(started["pid"])["NOTIFY_SOCKET"].startswith(f"{base}/one/notify/")
    assert list((base / "two").iterdir()) == []


@pytest.mark.parametrize(
    ("runtime_dir", "expected"),
    [
        ("{base}/file/run", "{base}/file is a regular file, so nothing can be created below it"),
        ("{base}/" + "d" * 100, "is 1"),  # "... is 1NN bytes, longer than the 107 ..."
    ],
)
def test_unusable_runtime_dir_is_a_sentence_and_exit_2(runtime_dir: str, expected: str) -> None:
    base = short_tempdir()
    try:
        (base / "file").write_text("not a directory\n")
        _exiting_config(base / "handoffd.toml", Path(runtime_dir.format(base=base)))
        result = _run_once(base / "handoffd.toml")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert expected.format(base=base) in result.stderr
        assert result.stderr.startswith("handoffd: ")
    finally:
        remove_tree(base)


def test_unlink_none_removes_its_own_socket_at_a_clean_stop_so_the_next_start_works(
    run_daemon: Callable[..., Daemon],
) -> None:
    base = short_tempdir()
    path = base / "local.sock"
    listeners = [("http", "127.0.0.1:0"), ("local", f"unix:{path}", 'unlink = "none"')]
    first = run_daemon(base=base, processes=1, listeners=listeners)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert first.stop() == 0
    assert not path.exists()
    second = run_daemon(processes=1, listeners=listeners)  # failed on main: "exists"
    assert request_once(str(path)).status == 200
    assert second.stop() == 0
    # A file left behind by a crash is named with the command that removes it.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    config = ListenerConfig(name="local", address=f"unix:{path}", unlink="none")
    with pytest.raises(ListenerError, match=rf"a stale socket .*\(rm {path}\)"):
        bind_listener(config)
    path.unlink()


@pytest.mark.parametrize("policy", ["socket-only", "flock"])
def test_unlink_policies_never_remove_a_socket_another_process_serves(
    policy: str, tmp_path: Path
) -> None:
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        config = ListenerConfig(name="s", address=f"unix:{path}", unlink=policy)  # type: ignore[arg-type]
        with pytest.raises(ListenerError, match=rf"{path} is a live socket"):
            bind_listener(config)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the other process's socket
    # Once nobody serves it, it is stale and replaced as before.
    bind_listener(config).close()


def test_an_upgrade_applies_a_changed_mode_and_group_to_a_unix_listener(
    run_daemon: Callable[..., Daemon],
) -> None:
    base = short_tempdir()
    path = base / "local.sock"
    before = [("http", "127.0.0.1:0"), ("local", f"unix:{path}", 'mode = "0600"')]
    daemon = run_daemon(base=base, processes=1, listeners=before)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    after = [
        ("http", "127.0.0.1:0"),
        ("local", f"unix:{path}", 'mode = "0660"', f"group = {ATTACKER_UID}"),
    ]
    write_config(daemon.config, daemon.runtime_dir, processes=1, listeners=after)
    code, reply = daemon.upgrade()
    assert code == 0, reply
    info = path.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, ATTACKER_UID)
    assert request_once(str(path)).status == 200


# A worker that reports whether its listener (fd 3) came non-blocking, then sets O_NONBLOCK on
# it (as an event loop would) and serves as the usual test worker.
_NONBLOCK_WORKER = f"""
import fcntl, os, runpy, sys
flags = fcntl.fcntl(3, fcntl.F_GETFL)
print(f"nonblocking-at-start={{bool(flags & os.O_NONBLOCK)}}", file=sys.stderr, flush=True)
fcntl.fcntl(3, fcntl.F_SETFL, flags | os.O_NONBLOCK)
sys.argv = [{WORKER!r}]
runpy.run_path({WORKER!r}, run_name="__main__")
"""


def test_o_nonblock_set_by_workers_is_left_alone_while_they_run_and_reset_once_they_are_gone(
    run_daemon: Callable[..., Daemon],
) -> None:
    """O_NONBLOCK lives on the file description every generation shares.

    Clearing it under a running worker that set it would make that worker's next accept()
    block (a stall), so a new generation inherits it while the old one runs; once no worker is
    left, the next one starts with the flags as handoffd bound them (blocking).
    """
    daemon = run_daemon(processes=1, command=[sys.executable, "-c", _NONBLOCK_WORKER])

    def started_nonblocking(start: int) -> str:
        event = daemon.wait_event(
            "raw", where=lambda e: "nonblocking-at-start=" in e["line"], start=start
        )
        return str(event["line"]).strip().split("=")[1]

    assert started_nonblocking(0) == "False"
    [first] = daemon.worker_pids()
    mark = daemon.mark()
    code, reply = daemon.upgrade()
    assert code == 0, reply
    assert started_nonblocking(mark) == "True"  # generation 1 ran, and had set it, meanwhile
    wait_until(lambda: not pid_alive(first), 10, "generation 1 to drain")
    [second] = daemon.worker_pids(2)
    mark = daemon.mark()
    os.kill(second, signal.SIGKILL)  # no worker is left: its replacement starts blocking
    assert started_nonblocking(mark) == "False"
    assert request_once(daemon.address()).status == 200
