"""sd_notify parsing and LISTEN_FDS parsing (pure functions)."""

from __future__ import annotations

import pytest

from handoff._listen_fds import InheritedFd, parse_listen_fds
from handoff._notify import parse_notify
from handoff._sdnotify import notify, notify_address
from handoff._systemd import clean_worker_environ


def test_parse_notify_reads_assignments_and_ignores_junk() -> None:
    msg = parse_notify(b"READY=1\nSTATUS=serving: a=b\ngarbage\n=x\nFDSTORE=1\nFDNAME=conn-7")
    assert msg.ready
    assert msg.fdstore
    assert msg.status == "serving: a=b"
    assert msg.fdname == "conn-7"
    assert not msg.stopping
    assert parse_notify(b"FDSTORE=1").fdname == "stored"  # sd_pid_notify_with_fds(3) default


def test_notify_without_socket_is_a_noop() -> None:
    assert notify("READY=1", environ={}) is False


def test_notify_address_abstract() -> None:
    assert notify_address("@sd") == b"\0sd"
    assert notify_address("/run/n.sock") == "/run/n.sock"


def test_parse_listen_fds_like_sd_listen_fds() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "http:admin"}
    assert parse_listen_fds(env, 42) == [InheritedFd(3, "http"), InheritedFd(4, "admin")]
    assert parse_listen_fds(env, 43) is None  # meant for another process
    assert parse_listen_fds({}, 42) is None
    assert parse_listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "42"}, 42) == [
        InheritedFd(3, "unknown")
    ]
    with pytest.raises(ValueError, match="LISTEN_FDS='x' is not a number"):
        parse_listen_fds({"LISTEN_FDS": "x", "LISTEN_PID": "42"}, 42)


def test_workers_never_see_systemds_variables_for_handoffd() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "7",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
        "LISTEN_PID": "7",
        "LISTEN_PIDFDID": "4242",  # systemd v256+
        "PATH": "/bin",
    }
    assert clean_worker_environ(env) == {"PATH": "/bin"}


def test_listen_fds_without_listen_pid_is_ignored_as_sd_listen_fds_does() -> None:
    assert parse_listen_fds({"LISTEN_FDS": "2"}, 42) is None
