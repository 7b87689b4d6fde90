"""Listener kinds and unix-socket policies, against real sockets."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.strict_client import RequestFailed, request_once
from handoff._config import ListenerConfig
from handoff._errors import ListenerError
from handoff._listeners import bind_listener
from tests.daemon import Daemon


def test_unix_listener_has_mode_and_serves(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = Path(f"/tmp/hd-test-{os.getpid()}.sock")
    daemon = run_daemon(
        listeners=[("http", "127.0.0.1:0"), ("local", f"unix:{path}")],
        processes=1,
    )
    try:
        assert stat.S_IMODE(path.stat().st_mode) != 0
        response = request_once(str(path))
        assert response.status == 200
        assert response.generation == 1
        code, _ = daemon.upgrade()
        assert code == 0
        assert request_once(str(path)).generation in (1, 2)
    finally:
        path.unlink(missing_ok=True)


def _config(path: Path, unlink: str, mode: str | None = None) -> ListenerConfig:
    return ListenerConfig(name="s", address=f"unix:{path}", unlink=unlink, mode=mode)  # type: ignore[arg-type]


def test_socket_only_policy_replaces_a_stale_socket_but_not_a_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    listener = bind_listener(_config(stale, "socket-only", "0660"))
    try:
        assert stat.S_IMODE(stale.stat().st_mode) == 0o660
    finally:
        listener.close()
    regular = tmp_path / "regular.sock"
    regular.write_text("precious")
    with pytest.raises(ListenerError, match="exists and is not a socket; refusing to remove it"):
        bind_listener(_config(regular, "socket-only"))
    assert regular.read_text() == "precious"


def test_none_policy_refuses_an_existing_path_and_always_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    path.write_text("old")
    with pytest.raises(ListenerError, match='exists and unlink = "none"'):
        bind_listener(_config(path, "none"))
    listener = bind_listener(_config(path, "always"))
    listener.close()
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_flock_policy_refuses_while_another_holder_has_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.sock"
    holder = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(ListenerError, match="is locked by another process"):
            bind_listener(_config(path, "flock"))
    finally:
        os.close(holder)
    listener = bind_listener(_config(path, "flock"))
    assert listener.lock_fd is not None
    listener.close()


def test_busy_port_error_names_the_listener_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenerError) as info:
            bind_listener(ListenerConfig(name="web", address=f"127.0.0.1:{port}"))
    message = str(info.value)
    assert f"listener 'web' (127.0.0.1:{port}): cannot bind: Address already in use" in message
    assert "ss -ltnp" in message


def test_udp_listener_is_passed_as_a_datagram_socket(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(
        listeners=[("http", "127.0.0.1:0"), ("dns", "udp://127.0.0.1:0")],
        processes=1,
        env={"WORKER_MODE": "strict"},  # checks every passed fd is a socket, as sd_listen_fds does
    )
    dns = next(li for li in daemon.status()["listeners"] if li["name"] == "dns")
    assert dns["address"].startswith("udp://127.0.0.1:")
    assert daemon.status()["workers"][0]["state"] == "ready"


def test_upgrade_can_add_and_remove_listeners(run_daemon: Callable[..., Daemon]) -> None:
    from tests.daemon import write_config

    daemon = run_daemon(listeners=[("http", "127.0.0.1:0"), ("old", "127.0.0.1:0")], processes=1)
    http_before = daemon.address("http")
    old = next(li for li in daemon.status()["listeners"] if li["name"] == "old")
    write_config(
        daemon.config,
        daemon.runtime_dir,
        processes=1,
        listeners=[("http", "127.0.0.1:0"), ("new", "127.0.0.1:0")],
    )
    code, reply = daemon.upgrade()
    assert code == 0, reply
    names = {li["name"]: li for li in daemon.status()["listeners"]}
    assert set(names) == {"http", "new"}
    # "http" kept its socket (same address, same fd) although the config says port 0 again
    assert names["http"]["address"] == f"127.0.0.1:{http_before[1]}"
    port = int(names["new"]["address"].rsplit(":", 1)[1])
    assert request_once(("127.0.0.1", port)).status == 200
    closed = daemon.wait_event("listener.closed", where=lambda e: e["listener"] == "old")
    assert closed["address"] == old["address"]
    old_port = int(old["address"].rsplit(":", 1)[1])
    with pytest.raises(RequestFailed) as refused:
        request_once(("127.0.0.1", old_port))
    assert refused.value.kind == "connect_refused"
