"""handoffd run by systemd's own tools: ``systemd-socket-activate`` in, ``systemd-notify`` from workers.

``systemd-socket-activate`` (systemd's reference for LISTEN_FDS) binds the sockets, waits for the
first connection and then execs handoffd in its own process, so ``LISTEN_PID`` is handoffd's pid
exactly as under a .socket unit. Workers run in ``strict`` mode where they can: they refuse to start
if any fd other than their fd set leaked into them, which inherited sockets easily would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import request_once
from tests.daemon import (
    WORKER,
    Daemon,
    pid_alive,
    remove_tree,
    short_tempdir,
    wait_until,
    write_config,
)
from tests.notify_sink import NotifySink, socket_inode
from tests.notify_sink import make_sink as make_sink
from tests.systemd_user import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [
    pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} missing (Debian package systemd; run scripts/setup-systemd-tests.sh)",
    )
    for tool in ("systemd-socket-activate", "systemd-notify")
]

#: Safety net only: every wait ends on a log event, a response or a datagram.
DEADLINE = 30.0
STRICT = {"WORKER_MODE": "strict"}


@dataclass
class Activated:
    daemon: Daemon
    ports: list[int]
    #: The connection that made systemd-socket-activate exec handoffd; it waited in the queue.
    first: socket.socket


def http_get(sock: socket.socket) -> dict[str, str]:
    """One request on an open connection; the response's headers (lower-case names)."""
    sock.settimeout(DEADLINE)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode()
    status, *lines = head.split("\r\n")
    assert status.startswith("HTTP/1.1 200"), data
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture
def activate(no_fd_leak: None) -> Iterator[Callable[..., Activated]]:
    """Start handoffd under ``systemd-socket-activate``; stop it and check no worker is left."""
    started: list[tuple[Daemon, Path, socket.socket | None]] = []

    def start(
        *,
        fdnames: str,
        listeners: Callable[[list[int]], list[tuple[str, str]]],
        sockets: int = 1,
        setenv: dict[str, str] | None = None,
        exec_prefix: tuple[str, ...] = (),
        **config: object,
    ) -> Activated:
        for _attempt in range(5):
            ports = [free_port() for _ in range(sockets)]
            base = short_tempdir()
            cfg = base / "handoffd.toml"
            write_config(cfg, base / "run", listeners=listeners(ports), **config)  # type: ignore[arg-type]
            wrap = [
                "systemd-socket-activate",
                *(f"--listen=127.0.0.1:{port}" for port in ports),
                f"--fdname={fdnames}",
                # it passes on only TERM, PATH, USER, HOME and what --setenv names
                *(f"--setenv={k}={v}" for k, v in (setenv or {}).items()),
                *exec_prefix,
            ]
            daemon = Daemon(cfg, base / "run", wrap=wrap)
            entry = (daemon, base, None)
            started.append(entry)
            try:
                listening = f":{ports[-1]} as "
                daemon.wait_event(
                    "raw", DEADLINE, where=lambda e, text=listening: text in e.get("line", "")
                )
            except AssertionError:
                # most likely a port was taken in between: try others
                started.remove(entry)
                daemon.stop()
                remove_tree(base)
                continue
            first = socket.create_connection(("127.0.0.1", ports[0]), DEADLINE)
            started[-1] = (daemon, base, first)
            daemon.wait_ready(DEADLINE)
            return Activated(daemon, ports, first)
        pytest.fail("systemd-socket-activate could not listen five times")

    yield start
    for daemon, base, first in started:
        if first is not None:
            first.close()
        pids: list[int] = []
        if daemon.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                pids = [w["pid"] for w in daemon.status()["workers"] if w["pid"]]
        code = daemon.stop()
        for pid in pids:
            wait_until(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to be gone")
        remove_tree(base)
        assert code == 0, f"handoffd exited {code}:\n{daemon.log_text()}"


def test_handoffd_serves_on_the_socket_systemd_socket_activate_passed_and_upgrades_keep_it(
    activate: Callable[..., Activated], make_sink: Callable[[bool], NotifySink]
) -> None:
    sink = make_sink(False)
    run = activate(
        fdnames="http",
        listeners=lambda ports: [("http", f"127.0.0.1:{ports[0]}")],
        setenv={"NOTIFY_SOCKET": sink.address},
        processes=2,
        env=STRICT,
    )
    daemon, port = run.daemon, run.ports[0]
    # the connection that arrived before handoffd even existed is served by generation 1
    assert http_get(run.first)["x-handoff-generation"] == "1"
    inherited = daemon.wait_event("listener.inherited")
    assert (inherited["listener"], inherited["fd"], inherited["fdname"]) == ("http", 3, "http")
    status = daemon.status()
    assert status["pid"] == daemon.proc.pid  # systemd-socket-activate exec'd handoffd
    assert status["listeners"] == [
        {"name": "http", "address": f"127.0.0.1:{port}", "fd": 3, "origin": "inherited"}
    ]
    inode = socket_inode(status["pid"], 3)
    stored = sink.next()
    assert stored.text == "FDSTORE=1\nFDNAME=http"
    assert len(stored.fds) == 1
    assert os.fstat(stored.fds[0]).st_ino == inode
    assert not any(e["event"] == "listener.bound" for e in daemon.events)

    for generation in (2, 3):
        mark = daemon.mark()
        code, reply = daemon.upgrade()
        assert code == 0, reply
        daemon.wait_event("generation.drained", DEADLINE, start=mark)
        assert daemon.status()["listeners"] == status["listeners"]
        assert socket_inode(status["pid"], 3) == inode
        assert request_once(("127.0.0.1", port)).generation == generation


def test_listener_takes_an_inherited_socket_by_address_when_its_name_differs(
    activate: Callable[..., Activated],
) -> None:
    run = activate(
        fdnames="web",
        listeners=lambda ports: [("http", f"127.0.0.1:{ports[0]}")],
        processes=1,
        env=STRICT,
    )
    assert http_get(run.first)["x-handoff-generation"] == "1"
    inherited = run.daemon.wait_event("listener.inherited")
    assert (inherited["listener"], inherited["fd"], inherited["fdname"]) == ("http", 3, "web")
    assert [li["origin"] for li in run.daemon.status()["listeners"]] == ["inherited"]


@pytest.mark.parametrize("keep", [False, True], ids=["closed", "kept"])
def test_an_inherited_socket_no_listener_claims_is_logged_and_closed_unless_kept(
    activate: Callable[..., Activated], make_sink: Callable[[bool], NotifySink], keep: bool
) -> None:
    sink = make_sink(False)
    run = activate(
        fdnames="http:spare",
        sockets=2,
        listeners=lambda ports: [("http", f"127.0.0.1:{ports[0]}")],
        setenv={"NOTIFY_SOCKET": sink.address},
        processes=1,
        env=STRICT,
        extra_supervisor=f"keep_unclaimed = {'true' if keep else 'false'}",
    )
    daemon, spare_port = run.daemon, run.ports[1]
    assert http_get(run.first)["x-handoff-generation"] == "1"
    event = daemon.wait_event("listener.unclaimed_kept" if keep else "listener.unclaimed_closed")
    assert (event["fd"], event["fdname"]) == (4, "spare")
    if keep:
        # still bound and listening: the connection waits in its queue (nobody accepts it)
        with socket.create_connection(("127.0.0.1", spare_port), DEADLINE):
            pass
        assert sink.next().text == "FDSTORE=1\nFDNAME=http"
    else:
        # nothing holds it any more, and handoffd told the fd store to let go of it too
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", spare_port), DEADLINE),
        ):
            pass
        assert sink.next().text == "FDSTOREREMOVE=1\nFDNAME=spare"
        assert sink.next().text == "FDSTORE=1\nFDNAME=http"
    # the strict worker started, so the spare fd did not leak into it either way
    assert [w["state"] for w in daemon.status()["workers"]] == ["ready"]


def test_listen_fds_meant_for_another_pid_are_ignored_and_logged(
    activate: Callable[..., Activated],
) -> None:
    run = activate(
        fdnames="http",
        listeners=lambda ports: [("http", "127.0.0.1:0")],
        # exec keeps the pid, so the fds are there but LISTEN_PID names someone else
        exec_prefix=("sh", "-c", 'export LISTEN_PID=1; exec "$@"', "sh"),
        processes=1,
        env=STRICT,
    )
    daemon = run.daemon
    ignored = daemon.wait_event("systemd.listen_fds_ignored")
    assert (ignored["listen_pid"], ignored["pid"]) == ("1", daemon.proc.pid)
    [listener] = daemon.status()["listeners"]
    assert listener["origin"] == "bound"
    assert listener["address"] != f"127.0.0.1:{run.ports[0]}"
    assert request_once(daemon.address()).generation == 1
    assert not any(e["event"] == "listener.inherited" for e in daemon.events)


def test_a_worker_that_says_ready_with_systemd_notify_from_its_shell_counts_as_ready(
    run_daemon: Callable[..., Daemon],
) -> None:
    # never_ready: the worker itself sends nothing, only systemd-notify (another pid) does
    command = [
        "sh",
        "-c",
        f'systemd-notify --ready --status="shell $$"; exec {sys.executable} {WORKER}',
    ]
    daemon = run_daemon(
        command=command, processes=2, ready_timeout=10, env={"WORKER_MODE": "never_ready"}
    )
    workers = daemon.status()["workers"]
    assert [(w["state"], w["status"]) for w in workers] == [
        ("ready", f"shell {w['pid']}") for w in workers
    ]
    assert request_once(daemon.address()).generation == 1

    mark = daemon.mark()
    code, reply = daemon.upgrade()
    assert code == 0, reply
    daemon.wait_event("generation.drained", DEADLINE, start=mark)
    assert request_once(daemon.address()).generation == 2
    # systemd-notify waits for its BARRIER=1 fd to be closed and complains if it is not
    assert "barrier" not in "".join(daemon.raw_lines).lower()
