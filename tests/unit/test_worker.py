"""Predicates and fresh binds of the worker library, on real sockets in this process."""

from __future__ import annotations

import fcntl
import os
import socket
from typing import TYPE_CHECKING

import pytest

import handoff
from handoff import ListenerError

if TYPE_CHECKING:
    from pathlib import Path


def test_predicates_tell_tcp_udp_unix_and_fifo_apart(tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "u.sock"))
    unix.listen()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with tcp, udp, unix:
        assert handoff.is_tcp_listener(tcp, f"127.0.0.1:{port}")
        assert handoff.is_tcp_listener(tcp.fileno())
        assert not handoff.is_tcp_listener(tcp, f"127.0.0.1:{port + 1}")
        assert not handoff.is_tcp_listener(udp)
        assert handoff.is_udp(udp, f"127.0.0.1:{udp.getsockname()[1]}")
        assert not handoff.is_udp(tcp)
        assert handoff.is_unix_listener(unix, str(tmp_path / "u.sock"))
        assert not handoff.is_unix_listener(unix, "/elsewhere")
        assert handoff.is_listening(tcp)
        assert handoff.is_listening(unix)
        assert not handoff.is_listening(udp)
        assert handoff.is_socket(tcp, socket.AF_INET, socket.SOCK_STREAM, listening=True)
        assert not handoff.is_socket(tcp, socket.AF_INET6)
        assert not handoff.is_socket(fifo_fd)
        assert handoff.is_fifo(fifo_fd, str(fifo))
        assert not handoff.is_fifo(tcp)
        assert not handoff.has_reuseport(tcp)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        assert handoff.has_reuseport(udp)
    os.close(fifo_fd)


def test_a_wildcard_address_matches_either_wildcard() -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as v6:
        port = v6.getsockname()[1]
        assert handoff.is_tcp_listener(v6, f":{port}")
        assert handoff.is_tcp_listener(v6, f"0.0.0.0:{port}")
        assert not handoff.is_tcp_listener(v6, f"127.0.0.1:{port}")


def test_predicates_leave_o_nonblock_alone_even_with_a_default_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        flags = fcntl.fcntl(tcp.fileno(), fcntl.F_GETFL)
        socket.setdefaulttimeout(5)
        try:
            assert handoff.is_tcp_listener(tcp)
        finally:
            socket.setdefaulttimeout(None)
        assert fcntl.fcntl(tcp.fileno(), fcntl.F_GETFL) == flags


def test_listen_binds_fresh_without_an_inherited_match(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh.sock")
    with handoff.listen(f"unix:{path}") as sock:
        assert handoff.is_unix_listener(sock, path)
    with handoff.listen_packet("udp://127.0.0.1:0") as sock:
        assert handoff.is_udp(sock)


def test_listen_names_the_fix_for_the_wrong_kind_of_address() -> None:
    with pytest.raises(ListenerError, match=r"use listen_packet\('udp://127.0.0.1:0'\)"):
        handoff.listen("udp://127.0.0.1:0")
    with pytest.raises(ListenerError, match="listen address 'nonsense'"):
        handoff.listen("nonsense")


def test_park_refuses_an_invalid_fd_name() -> None:
    with pytest.raises(ValueError, match="without ':'"):
        handoff.park("a:b", 0)


def test_listen_pid_mismatch_is_a_listener_error_with_its_exit_code() -> None:
    from handoff._errors import EXIT_USAGE

    error = handoff.ListenPidMismatchError("LISTEN_PID=1 but this process is 2")
    assert isinstance(error, ListenerError)
    assert error.exit_code == EXIT_USAGE
