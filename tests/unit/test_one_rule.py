"""One rule for fd names and one for matching inherited sockets, shared by the worker library
and the supervisor (issue 14: they disagreed)."""

from __future__ import annotations

import os
import socket

import pytest

import handoff
from handoff._config import ListenerConfig
from handoff._fdname import valid_fdname
from handoff._generation import ParkedFds
from handoff._listen_fds import InheritedFd
from handoff._listeners import adopt_inherited

NAMES = ["a b", "client-42", "a:b", "", "x" * 255, "x" * 256, "caf\u00e9", "tab\there", "~!"]


def _library_accepts(name: str) -> bool:
    try:
        handoff.park(name, 0)  # no NOTIFY_SOCKET here: validates, then sends nothing
    except ValueError:
        return False
    return True


def _supervisor_accepts(name: str) -> bool:
    parked = ParkedFds()
    fd = os.dup(0)
    kept = parked.park_all(name, [fd])
    if kept:
        parked.close_all()
    else:
        os.close(fd)
    return kept


@pytest.mark.parametrize("name", NAMES)
def test_the_library_and_the_supervisor_accept_the_same_fd_names(name: str) -> None:
    assert "NOTIFY_SOCKET" not in os.environ
    valid = valid_fdname(name) is None
    assert _library_accepts(name) is valid
    assert _supervisor_accepts(name) is valid


def test_fd_names_follow_systemds_rule() -> None:
    # systemd's fdname_is_valid(): ASCII ' '..'~' except ':', at most 255 (never empty here).
    assert valid_fdname("a b") is None
    assert valid_fdname("x" * 255) is None
    assert valid_fdname("a:b") is not None
    assert valid_fdname("") is not None
    assert valid_fdname("x" * 256) is not None
    assert valid_fdname("caf\u00e9") is not None


def _adopted(sock: socket.socket, address: str) -> bool:
    config = ListenerConfig(name="web", address=address)
    claimed, unclaimed = adopt_inherited([config], [InheritedFd(fd=sock.fileno(), name="other")])
    for listener in claimed.values():
        listener.sock.detach()  # the test's socket object still owns the fd
    return "web" in claimed and not unclaimed


def test_daemon_adopts_a_dual_stack_v6_wildcard_for_a_wildcard_listener() -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as v6:
        port = v6.getsockname()[1]
        assert handoff.is_tcp_listener(v6, f":{port}")
        assert _adopted(v6, f":{port}")
        assert _adopted(v6, f"0.0.0.0:{port}")
        assert _adopted(v6, f"[::]:{port}")
        assert not _adopted(v6, f"127.0.0.1:{port}")
        assert not handoff.is_tcp_listener(v6, f"127.0.0.1:{port}")


def test_a_v6_only_wildcard_serves_no_ipv4_so_neither_side_matches_it_to_0_0_0_0() -> None:
    with socket.socket(socket.AF_INET6) as v6:
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::", 0))
        v6.listen()
        port = v6.getsockname()[1]
        assert not _adopted(v6, f":{port}")
        assert not handoff.is_tcp_listener(v6, f":{port}")
        assert _adopted(v6, f"[::]:{port}")
        assert handoff.is_tcp_listener(v6, f"[::]:{port}")


def test_abstract_unix_sockets_match_alike_on_both_sides() -> None:
    with socket.socket(socket.AF_UNIX) as abstract:
        abstract.bind(b"\0handoffd-test-%d" % os.getpid())
        abstract.listen()
        name = f"@handoffd-test-{os.getpid()}"
        assert _adopted(abstract, f"unix:{name}")
        assert handoff.is_unix_listener(abstract, name)
        assert not _adopted(abstract, "unix:@other")
