"""Only a worker's own process tree may notify for it: real handoffd, real processes.

A process of the same uid outside the tree (here: the test process itself) can read a worker's
NOTIFY_SOCKET from ``/proc/PID/environ`` and send READY=1 to it; that must never make a
generation ready. The honest senders must still count: ``systemd-notify`` run by the worker's
shell (its child, alive until its BARRIER=1 is answered), and a double-forked grandchild whose
parent exited (reparented to handoffd, the subreaper, still in the worker's process group).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest

from bench.strict_client import request_once
from tests.daemon import WORKER, Daemon, wait_until, write_config

if TYPE_CHECKING:
    from collections.abc import Callable

NEVER_READY = {"WORKER_MODE": "never_ready"}

# A worker that double-forks: its child C forks G and exits once G holds a pidfd of it; G waits on
# that pidfd (no sleep) for C to be gone, checks it was reparented, sends READY=1 and exits; the
# worker then becomes the test worker in never_ready mode, so G's READY=1 is the only one.
# LEAVE_GROUP=1: C calls setsid() first (the classic daemon double fork), so G is outside the
# worker's process group.
DOUBLE_FORK = r"""
import os, select, socket, sys
r, w = os.pipe()
child = os.fork()
if child == 0:
    if os.environ.get("LEAVE_GROUP") == "1":
        os.setsid()
    if os.fork() == 0:
        parent = os.getppid()
        pidfd = os.pidfd_open(parent)  # C waits for the byte below: it is alive
        os.write(w, b"x")
        select.select([pidfd], [], [], 30)
        assert os.getppid() != parent, "not reparented"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1\nSTATUS=from the grandchild", os.environ["NOTIFY_SOCKET"])
        os._exit(0)
    os.read(r, 1)
    os._exit(0)
os.waitpid(child, 0)
os.close(r)
os.close(w)
os.execv(sys.executable, [sys.executable, sys.argv[1]])
"""


def rewrite(daemon: Daemon, **config: Any) -> None:
    write_config(daemon.config, daemon.runtime_dir, **config)


def notify_socket_of(pid: int) -> str:
    """The worker's NOTIFY_SOCKET, as any process of its uid can read it (once it has exec'd)."""
    found: list[str] = []

    def read() -> bool:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"NOTIFY_SOCKET="):
                    found.append(item.split(b"=", 1)[1].decode())
        return bool(found)

    wait_until(read, 10, f"NOTIFY_SOCKET in /proc/{pid}/environ")
    return found[0]


class BackgroundUpgrade:
    """``handoffd upgrade`` in a thread, so the test can act while generation N+1 starts."""

    def __init__(self, daemon: Daemon) -> None:
        self.result: tuple[int, dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._run, args=(daemon,), daemon=True)
        self._thread.start()

    def _run(self, daemon: Daemon) -> None:
        self.result = daemon.upgrade()

    def wait(self, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        self._thread.join(timeout)
        assert self.result is not None, "the upgrade did not finish"
        return self.result


def test_ready_from_a_process_outside_the_tree_does_not_make_a_generation_ready(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    [old] = daemon.worker_pids(generation=1)
    mark = daemon.mark()
    rewrite(daemon, processes=1, env=NEVER_READY, ready_timeout=4)
    upgrade = BackgroundUpgrade(daemon)
    started = daemon.wait_event(
        "worker.started", where=lambda e: e.get("generation") == 2, start=mark
    )
    path = notify_socket_of(started["pid"])
    # The same uid, not in the worker's tree: the test process itself.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=hijacked", path)
    # And a separately started systemd-notify: its BARRIER=1 (with a pipe fd) is refused too,
    # and the fd closed, so it does not wait out its 5 s barrier timeout and fail.
    notifier = subprocess.run(
        ["systemd-notify", "--pid=self", "--ready"],
        env={**os.environ, "NOTIFY_SOCKET": path},
        capture_output=True,
        text=True,
        timeout=30,
    )
    rejected = daemon.wait_event("notify.rejected", start=mark)
    code, reply = upgrade.wait()

    assert (rejected["pid"], rejected["generation"]) == (started["pid"], 2)
    assert (rejected["sender_pid"], rejected["sender_uid"]) == (os.getpid(), os.getuid())
    assert rejected["keys"] == ["READY", "STATUS"]
    assert "not in the worker's tree" in rejected["reason"]
    assert notifier.returncode == 0, notifier.stderr
    assert code == 1, reply
    assert "generation 2 was not ready within program.ready_timeout = 4s" in reply["reason"]
    assert daemon.worker_pids() == [old]
    assert request_once(daemon.address()).generation == 1

    # The serving generation's worker: a foreign STATUS= is not shown, the refusal is counted.
    [before] = daemon.status()["workers"]
    mark = daemon.mark()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"STATUS=hijacked\nSTOPPING=1", notify_socket_of(old))
    daemon.wait_event("notify.rejected", where=lambda e: e.get("pid") == old, start=mark)
    [after] = daemon.status()["workers"]
    assert (after["status"], after["state"]) == (before["status"], "ready")
    assert (before["notify_rejected"], after["notify_rejected"]) == (0, 1)


def test_systemd_notify_run_as_a_child_of_the_workers_shell_counts(
    run_daemon: Callable[..., Daemon],
) -> None:
    # --pid=self: the datagram's credentials name systemd-notify itself (as they do for any
    # non-root caller; as root it would otherwise claim its parent's pid, the worker's).
    command = [
        "sh",
        "-c",
        f'systemd-notify --pid=self --ready --status="shell $$"; exec {sys.executable} {WORKER}',
    ]
    daemon = run_daemon(command=command, processes=2, ready_timeout=10, env=NEVER_READY)
    workers = daemon.status()["workers"]
    assert [(w["state"], w["status"], w["notify_rejected"]) for w in workers] == [
        ("ready", f"shell {w['pid']}", 0) for w in workers
    ]
    assert not [e for e in daemon.events if e.get("event") == "notify.rejected"]
    assert request_once(daemon.address()).generation == 1


@pytest.mark.parametrize(
    ("leave_group", "counts"),
    [("0", True), ("1", False)],
    ids=["stays-in-the-group", "setsid-leaves-the-tree"],
)
def test_a_double_forked_grandchild_counts_only_while_in_the_workers_group(
    run_daemon: Callable[..., Daemon], leave_group: str, counts: bool
) -> None:
    daemon = run_daemon(processes=1)
    [old] = daemon.worker_pids(generation=1)
    mark = daemon.mark()
    rewrite(
        daemon,
        processes=1,
        command=[sys.executable, "-c", DOUBLE_FORK, WORKER],
        env={**NEVER_READY, "LEAVE_GROUP": leave_group},
        ready_timeout=4,
    )
    code, reply = daemon.upgrade()
    rejected = [e for e in daemon.events[mark:] if e.get("event") == "notify.rejected"]
    if counts:
        assert code == 0, reply
        assert not rejected
        [new] = [w for w in daemon.status()["workers"] if w["generation"] == 2]
        assert new["status"] == "from the grandchild"
        assert request_once(daemon.address()).generation == 2
    else:
        assert code == 1, reply
        assert "was not ready within" in reply["reason"]
        assert len(rejected) == 1, daemon.log_text()
        [event] = rejected
        assert "left the worker's group (setsid)" in event["reason"]
        assert daemon.worker_pids() == [old]
        assert request_once(daemon.address()).generation == 1
