"""What handoffd tells its service manager, received on a ``NOTIFY_SOCKET`` the test owns.

Each test binds a datagram socket (a path, or an abstract ``@name``), starts a real handoffd with
``NOTIFY_SOCKET`` naming it, and asserts every datagram in order: its exact keys and values, and
for ``FDSTORE=1`` the one fd attached, which must be the listener's own open socket (same inode,
same address), not only that a send returned. sd_notify(3) is the reference for the protocol.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import request_once
from tests.daemon import Daemon, pid_alive, write_config
from tests.notify_sink import Datagram, NotifySink, socket_inode
from tests.notify_sink import make_sink as make_sink

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

#: EXTEND_TIMEOUT_USEC handoffd asks for while generation N starts: ready_timeout + its slack.
READY_TIMEOUT = 10


def listener_info(daemon: Daemon, name: str) -> dict[str, object]:
    status = daemon.status()
    for li in status["listeners"]:
        if li["name"] == name:
            return {**li, "inode": socket_inode(status["pid"], li["fd"])}
    raise AssertionError(f"no listener {name} in {status['listeners']}")


def assert_fdstore(message: Datagram, daemon: Daemon, name: str) -> None:
    """``FDSTORE=1`` + ``FDNAME=name`` with exactly handoffd's listener socket attached."""
    assert message.text == f"FDSTORE=1\nFDNAME={name}"
    assert len(message.fds) == 1, message
    info = listener_info(daemon, name)
    assert os.fstat(message.fds[0]).st_ino == info["inode"]
    with socket.socket(fileno=os.dup(message.fds[0])) as stored:
        host, port = stored.getsockname()
        assert f"{host}:{port}" == info["address"]
        assert stored.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def assert_plain(message: Datagram, text: str) -> None:
    assert (message.text, message.fds) == (text, ())


def assert_extend(message: Datagram) -> None:
    assert message.keys == ["EXTEND_TIMEOUT_USEC"], message
    assert message.fds == ()


def assert_reloading(message: Datagram, before: float, after: float) -> None:
    """``RELOADING=1`` + ``MONOTONIC_USEC=`` within the upgrade call (same CLOCK_MONOTONIC)."""
    assert message.keys == ["RELOADING", "MONOTONIC_USEC"], message
    assert message.fields["RELOADING"] == "1"
    assert message.fds == ()
    usec = int(message.fields["MONOTONIC_USEC"])
    assert before * 1e6 <= usec <= after * 1e6, (before, usec, after)


def upgrade(daemon: Daemon) -> tuple[int, dict[str, object], float, float]:
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    code, reply = daemon.upgrade()
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    return code, reply, before, after


def rewrite(daemon: Daemon, **config: object) -> None:
    write_config(daemon.config, daemon.runtime_dir, ready_timeout=READY_TIMEOUT, **config)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["path", "abstract"])
def test_start_upgrades_failed_upgrade_and_stop_send_exact_messages_in_order(
    run_daemon: Callable[..., Daemon], make_sink: Callable[[bool], NotifySink], address: str
) -> None:
    sink = make_sink(address == "abstract")
    daemon = run_daemon(
        env={"NOTIFY_SOCKET": sink.address}, processes=2, ready_timeout=READY_TIMEOUT
    )

    # start: the listener goes to the fd store as soon as it is open, READY=1 once gen 1 is ready
    assert_fdstore(sink.next(), daemon, "http")
    extend = sink.next()
    assert_extend(extend)
    assert int(extend.fields["EXTEND_TIMEOUT_USEC"]) == (READY_TIMEOUT + 5) * 1_000_000
    assert_plain(sink.next(), "READY=1\nSTATUS=generation 1: 2/2 workers ready")

    # an upgrade that works: RELOADING=1 ... READY=1, then a STATUS= once generation 1 drained
    old_pids = daemon.worker_pids(generation=1)
    code, reply, before, after = upgrade(daemon)
    assert code == 0, reply
    assert_reloading(sink.next(), before, after)
    assert_extend(sink.next())
    assert_plain(
        sink.next(), "READY=1\nSTATUS=generation 2: 2/2 workers ready, draining 1; last upgrade ok"
    )
    drained = sink.next()
    assert_plain(drained, "STATUS=generation 2: 2/2 workers ready; last upgrade ok")
    assert not any(pid_alive(pid) for pid in old_pids)

    # a failed upgrade ends with READY=1 too (systemd must leave "reloading"), saying it failed
    rewrite(daemon, processes=2, env={"WORKER_MODE": "exit"})
    code, reply, before, after = upgrade(daemon)
    assert code == 1, reply
    assert_reloading(sink.next(), before, after)
    assert_extend(sink.next())
    assert_plain(
        sink.next(), "READY=1\nSTATUS=generation 2: 2/2 workers ready; last upgrade failed"
    )

    # stop: STOPPING=1 first, then more time for the drain
    assert daemon.stop() == 0
    assert_plain(sink.next(), "STOPPING=1\nSTATUS=stopping: draining generation(s) 2")
    assert_extend(sink.next())
    sink.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sink.sock.recv(65536)
    assert [m.keys[0] for m in sink.received] == [
        "FDSTORE",
        "EXTEND_TIMEOUT_USEC",
        "READY",
        "RELOADING",
        "EXTEND_TIMEOUT_USEC",
        "READY",
        "STATUS",
        "RELOADING",
        "EXTEND_TIMEOUT_USEC",
        "READY",
        "STOPPING",
        "EXTEND_TIMEOUT_USEC",
    ]


def test_upgrade_stores_new_listeners_and_removes_dropped_ones_after_the_drain(
    run_daemon: Callable[..., Daemon], make_sink: Callable[[bool], NotifySink]
) -> None:
    sink = make_sink(False)
    two = [("http", "127.0.0.1:0"), ("admin", "127.0.0.1:0")]
    daemon = run_daemon(
        env={"NOTIFY_SOCKET": sink.address},
        processes=1,
        listeners=two,
        ready_timeout=READY_TIMEOUT,
    )
    assert_fdstore(sink.next(), daemon, "http")
    assert_fdstore(sink.next(), daemon, "admin")
    assert_extend(sink.next())
    assert_plain(sink.next(), "READY=1\nSTATUS=generation 1: 1/1 workers ready")
    admin_address = listener_info(daemon, "admin")["address"]
    host, _, port = str(admin_address).rpartition(":")

    # "admin" leaves the config, "extra" joins it
    gen1 = daemon.worker_pids(generation=1)
    rewrite(daemon, processes=1, listeners=[("http", "127.0.0.1:0"), ("extra", "127.0.0.1:0")])
    code, reply, before, after = upgrade(daemon)
    assert code == 0, reply
    assert_reloading(sink.next(), before, after)
    assert_extend(sink.next())
    assert_fdstore(sink.next(), daemon, "extra")
    assert_plain(
        sink.next(), "READY=1\nSTATUS=generation 2: 1/1 workers ready, draining 1; last upgrade ok"
    )
    # Generation 1 may still accept on "admin" while it drains: the removal waits for its end.
    # The two messages that follow the drain have no order between them.
    after_drain = [sink.next(), sink.next()]
    assert all(not pid_alive(pid) for pid in gen1)
    assert sorted(m.text for m in after_drain) == [
        "FDSTOREREMOVE=1\nFDNAME=admin",
        "STATUS=generation 2: 1/1 workers ready; last upgrade ok",
    ]
    assert all(m.fds == () for m in after_drain)
    # once the store lets go of it too, nothing holds "admin" open any more
    sink.drop_stored("admin")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 5):
        pass

    # "http" moves to another address under the same name: the store must end up holding only
    # the new socket, so the old one's removal comes first and nothing is removed after the drain
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        new_port = probe.getsockname()[1]
    gen2 = daemon.worker_pids(generation=2)
    rewrite(
        daemon,
        processes=1,
        listeners=[("http", f"127.0.0.1:{new_port}"), ("extra", "127.0.0.1:0")],
    )
    code, reply, before, after = upgrade(daemon)
    assert code == 0, reply
    assert_reloading(sink.next(), before, after)
    assert_extend(sink.next())
    assert_plain(sink.next(), "FDSTOREREMOVE=1\nFDNAME=http")
    assert_fdstore(sink.next(), daemon, "http")
    assert listener_info(daemon, "http")["address"] == f"127.0.0.1:{new_port}"
    assert_plain(
        sink.next(), "READY=1\nSTATUS=generation 3: 1/1 workers ready, draining 2; last upgrade ok"
    )
    assert_plain(sink.next(), "STATUS=generation 3: 1/1 workers ready; last upgrade ok")
    assert all(not pid_alive(pid) for pid in gen2)
    assert request_once(("127.0.0.1", new_port)).generation == 3

    assert daemon.stop() == 0
    assert sink.next().keys == ["STOPPING", "STATUS"]
    assert_extend(sink.next())


def test_watchdog_pings_at_half_watchdog_usec_and_not_when_watchdog_pid_is_another_process(
    run_daemon: Callable[..., Daemon], make_sink: Callable[[bool], NotifySink]
) -> None:
    other_sink = make_sink(True)
    other = run_daemon(
        env={"NOTIFY_SOCKET": other_sink.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
        processes=1,
        ready_timeout=READY_TIMEOUT,
    )
    sink = make_sink(True)
    started = time.monotonic()
    daemon = run_daemon(
        env={"NOTIFY_SOCKET": sink.address, "WATCHDOG_USEC": "200000"},
        processes=1,
        ready_timeout=READY_TIMEOUT,
    )
    # wait for five pings after READY=1: by then `other` has run for at least four intervals
    while "READY=1\nSTATUS=generation 1: 1/1 workers ready" not in sink.texts():
        sink.next()
    for _ in range(5):
        assert_plain(sink.next(), "WATCHDOG=1")
    elapsed = time.monotonic() - started
    assert daemon.stop() == 0
    assert other.stop() == 0

    while "STOPPING" not in [m.keys[0] for m in sink.received] or sink.received[-1].keys[0] not in (
        "EXTEND_TIMEOUT_USEC",
    ):
        sink.next()
    pings = [m for m in sink.received if m.text == "WATCHDOG=1"]
    assert all(m.fds == () for m in pings)
    # at most one ping per 0.1 s (half of WATCHDOG_USEC), plus the one sent at start
    assert len(pings) <= (time.monotonic() - started) / 0.1 + 2, (len(pings), elapsed)
    assert [m.keys for m in sink.received if m.text != "WATCHDOG=1"] == [
        ["FDSTORE", "FDNAME"],
        ["EXTEND_TIMEOUT_USEC"],
        ["READY", "STATUS"],
        ["STOPPING", "STATUS"],
        ["EXTEND_TIMEOUT_USEC"],
    ]

    for _ in range(5):
        other_sink.next()
    other_sink.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        other_sink.sock.recv(65536)
    assert [m.keys for m in other_sink.received] == [
        ["FDSTORE", "FDNAME"],
        ["EXTEND_TIMEOUT_USEC"],
        ["READY", "STATUS"],
        ["STOPPING", "STATUS"],
        ["EXTEND_TIMEOUT_USEC"],
    ]


# A worker that tells its NOTIFY_SOCKET it is ready and then that it is stopping, records the
# variables it was given, and waits for SIGTERM.
CHATTY_WORKER = """\
import json, os, signal, socket, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
         "LISTEN_FDNAMES")
seen = {k: os.environ.get(k) for k in names}
seen["pid"] = os.getpid()
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(seen, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
path = os.environ["NOTIFY_SOCKET"]
addr = "\\0" + path[1:] if path.startswith("@") else path
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1\\nSTATUS=worker says ready", addr)
    s.sendto(b"STOPPING=1\\nSTATUS=worker says stopping", addr)
signal.sigwait({signal.SIGTERM})
"""


def test_worker_stopping_and_ready_never_reach_systemds_socket(
    run_daemon: Callable[..., Daemon], make_sink: Callable[[bool], NotifySink], tmp_path: Path
) -> None:
    sink = make_sink(False)
    seen_file = tmp_path / "worker-env.json"
    daemon = run_daemon(
        env={"NOTIFY_SOCKET": sink.address, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"},
        command=[sys.executable, "-c", CHATTY_WORKER, str(seen_file)],
        processes=1,
        ready_timeout=READY_TIMEOUT,
    )
    # handoffd got the worker's STOPPING=1 on the worker's own socket (and only logged it)
    daemon.wait_event("worker.stopping")
    worker_pid = daemon.worker_pids(generation=1)[0]
    assert daemon.status()["state"] == "running"
    assert daemon.stop() == 0
    while len(sink.received) < 5:
        sink.next()
    sink.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sink.sock.recv(65536)

    assert [m.text.split("\n") for m in sink.received[1:]] == [
        [f"EXTEND_TIMEOUT_USEC={(READY_TIMEOUT + 5) * 1_000_000}"],
        ["READY=1", "STATUS=generation 1: 1/1 workers ready"],
        ["STOPPING=1", "STATUS=stopping: draining generation(s) 1"],
        [f"EXTEND_TIMEOUT_USEC={(10 + 5) * 1_000_000}"],
    ]
    assert sink.received[0].keys == ["FDSTORE", "FDNAME"]
    seen = json.loads(seen_file.read_text())
    assert seen["pid"] == worker_pid
    assert seen["NOTIFY_SOCKET"] != sink.address
    assert seen["NOTIFY_SOCKET"].startswith(str(daemon.runtime_dir / "notify") + "/")
    assert (seen["WATCHDOG_USEC"], seen["WATCHDOG_PID"]) == (None, None)
    assert (seen["LISTEN_PID"], seen["LISTEN_FDS"], seen["LISTEN_FDNAMES"]) == (
        str(worker_pid),
        "1",
        "http",
    )
    assert not pid_alive(worker_pid)
