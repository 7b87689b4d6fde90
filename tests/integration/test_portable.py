"""The portable process watcher (``HANDOFF_PLATFORM=portable``) with real processes and signals.

On Linux the portable watcher is SIGCHLD + waitid (kqueue exists only on macOS and the BSDs).
These tests run in every pytest pass; ``./scripts/test`` also runs a subset of the whole
integration suite a second time with the variable set for every daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from bench.strict_client import LoadClient, request_once
from handoff import _platform
from handoff._errors import ProtocolError
from handoff._peercred import peer_pid, peer_uid
from handoff._portable import PortableSpawner, reap_children, select_spawner
from handoff._processes import SpawnRequest
from handoff._spawn import DEFAULT_SPAWNER, reap_orphans, start_process, unreaped_children
from tests.daemon import REPO, Daemon, pid_alive, wait_until, write_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PORTABLE = {"HANDOFF_PLATFORM": "portable"}
# An empty value means "auto": the daemon probes for pidfds even in the second, portable pass.
AUTO = {"HANDOFF_PLATFORM": ""}

needs_pidfds = pytest.mark.skipif(
    _platform.pidfd_problem() is not None, reason=f"{_platform.pidfd_problem()}"
)


def pidfds_of(pid: int) -> list[str]:
    """The pidfds process ``pid`` holds, as /proc/PID/fd shows them."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target == "anon_inode:[pidfd]":
            found.append(fd)
    return found


# ---- the whole daemon ----


def test_portable_daemon_holds_no_pidfd_and_status_says_what_degrades(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(env=PORTABLE, processes=2)
    assert len(daemon.worker_pids()) == 2
    assert pidfds_of(daemon.pid) == []
    degraded = daemon.status()["degraded"]
    assert any(d.startswith("process watcher waitid") for d in degraded), degraded
    assert any(d.startswith("self-upgrade refused") for d in degraded), degraded
    logged = [e for e in daemon.events if e.get("event") == "platform.degraded"]
    assert [e["what"] for e in logged] == [d.split(": ", 1)[0] for d in degraded]
    assert logged[0]["why"] == "forced by HANDOFF_PLATFORM=portable"


@needs_pidfds
def test_pidfd_daemon_holds_one_pidfd_per_worker_and_degrades_nothing(
    run_daemon: Callable[..., Daemon],
) -> None:
    """The counterpart of the test above: the /proc check does see pidfds when there are some."""
    daemon = run_daemon(env=AUTO, processes=2)
    assert len(pidfds_of(daemon.pid)) == 2
    assert daemon.status()["degraded"] == []


def test_unknown_platform_value_is_a_usage_error_naming_the_choices(tmp_path: Path) -> None:
    config = tmp_path / "handoffd.toml"
    write_config(config, tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "handoff", "run", "--config", str(config)],
        env={**os.environ, "HANDOFF_PLATFORM": "kqueue"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert "HANDOFF_PLATFORM='kqueue' is not a platform choice" in result.stderr
    assert "Traceback" not in result.stderr


def test_portable_upgrades_under_load_fail_no_request_and_hold_no_pidfd(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(env=PORTABLE, processes=2)
    client = LoadClient(daemon.address(), keepalive=4, fresh=2, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(50, timeout=30)
        for upgrade in range(5):
            old_pids = daemon.worker_pids(generation=upgrade + 1)
            code, reply = daemon.upgrade()
            assert code == 0, reply
            assert reply["generation"] == upgrade + 2
            for pid in old_pids:
                wait_until(lambda pid=pid: not pid_alive(pid), 20, f"old worker {pid} to drain")
            assert request_once(daemon.address()).generation == upgrade + 2
            seen = client.snapshot().total
            assert client.wait_for_responses(seen + 20, timeout=30), "load stalled after upgrade"
            assert pidfds_of(daemon.pid) == []
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    assert set(range(1, 7)) <= set(report.by_generation), report.by_generation


def test_portable_self_upgrade_is_refused_with_the_documented_message_and_keeps_serving(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(env=PORTABLE, processes=1)
    before = daemon.worker_pids()
    mark = daemon.mark()
    code, reply = daemon.upgrade("--self")
    assert code == 1, reply
    assert reply["reason"].startswith(
        "self-upgrade is not available with the waitid process watcher"
    ), reply
    assert "restart handoffd to replace it" in reply["reason"]
    assert not [e for e in daemon.events[mark:] if e.get("event") == "handover.spawned"]
    assert daemon.status()["pid"] == daemon.proc.pid
    assert daemon.worker_pids() == before
    assert request_once(daemon.address()).status == 200


# ---- the watcher itself, in-process ----


def _sh(script: str) -> tuple[list[str], dict[str, str]]:
    return ["/bin/sh", "-c", script], {"PATH": os.defpath}


async def test_waitid_watcher_reports_exit_codes_and_signals(nursery: trio.Nursery) -> None:
    spawner = PortableSpawner("waitid")
    await nursery.start(spawner.reaper.run)
    command, env = _sh("exit 3")
    exits = spawner.spawn(SpawnRequest(command, env, [], False))
    command, env = _sh("exec sleep 30")
    sleeper = spawner.spawn(SpawnRequest(command, env, [], False))
    with trio.fail_after(10):
        assert await exits.wait() == 3
        assert spawner.reaper.unreaped() == {sleeper.pid}
        sleeper.send_signal(signal.SIGTERM)
        assert await sleeper.wait() == -signal.SIGTERM
    assert spawner.reaper.unreaped() == frozenset()
    assert exits.pidfd == sleeper.pidfd == -1
    # Reaped: signalling is now a no-op, never a kill of whatever reuses the pid.
    sleeper.send_signal(signal.SIGTERM)


async def test_waitid_group_sigkill_reaches_the_workers_children(nursery: trio.Nursery) -> None:
    """The drain's SIGKILL goes to the worker's process group: its children die with it."""
    spawner = PortableSpawner("waitid")
    await nursery.start(spawner.reaper.run)
    read_end, write_end = os.pipe()
    command, env = _sh("sleep 30 3>&- & echo $! >&3; exec 3>&-; wait")
    try:
        worker = spawner.spawn(SpawnRequest(command, env, [write_end], False))
    finally:
        os.close(write_end)
    async with trio.lowlevel.FdStream(read_end) as pipe:
        grandchild = int(await pipe.receive_some(64))
    assert worker.group_roots() == [worker.pid]
    worker.signal_group(signal.SIGKILL)
    with trio.fail_after(10):
        assert await worker.wait() == -signal.SIGKILL
    wait_until(lambda: not pid_alive(grandchild), 10, f"grandchild {grandchild} to be killed")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open to watch alongside")
async def test_waitid_reaper_never_steals_a_status_another_watcher_owns(
    nursery: trio.Nursery,
) -> None:
    """A pidfd-watched child and an unregistered child keep their statuses through SIGCHLDs."""
    spawner = PortableSpawner("waitid")
    await nursery.start(spawner.reaper.run)
    command, env = _sh("exit 5")
    pidfd_child = DEFAULT_SPAWNER.spawn(SpawnRequest(command, env, [], False))
    command, env = _sh("exit 6")
    loose = start_process(SpawnRequest(command, env, [], False))
    command, env = _sh("exit 7")
    ours = spawner.spawn(SpawnRequest(command, env, [], False))
    with trio.fail_after(10):
        assert await ours.wait() == 7
        assert await pidfd_child.wait() == 5
        loose_pidfd = os.pidfd_open(loose)
        try:
            await trio.lowlevel.wait_readable(loose_pidfd)
        finally:
            os.close(loose_pidfd)
    spawner.reaper.sweep()
    # Still ours to reap: the reaper left it alone. (WNOHANG: it has exited, this never blocks.)
    _, status = os.waitpid(loose, os.WNOHANG)  # noqa: ASYNC222
    assert os.waitstatus_to_exitcode(status) == 6


def test_waitid_children_are_tracked_so_the_orphan_reaper_leaves_them_alone() -> None:
    spawner = PortableSpawner("waitid")
    command, env = _sh("exit 4")
    worker = spawner.spawn(SpawnRequest(command, env, [], False))
    assert worker.pid in unreaped_children()
    wait_until(lambda: not pid_alive(worker.pid), 10, "the worker to exit")
    assert worker.pid not in [pid for pid, _ in reap_orphans()]
    reap_children(spawner)  # what _startup does on SIGCHLD
    assert worker.returncode == 4
    assert worker.pid not in unreaped_children()


def test_waitid_watcher_cannot_adopt_a_process_that_is_not_its_child() -> None:
    with pytest.raises(ProtocolError, match="cannot adopt worker pid 1: self-upgrade is not"):
        PortableSpawner("waitid").adopt(1)


def test_select_spawner_forced_portable_on_linux_is_waitid_and_says_why() -> None:
    spawner, degraded = select_spawner(PORTABLE)
    assert isinstance(spawner, PortableSpawner)
    assert spawner.watcher == ("kqueue" if _platform.has_kqueue() else "waitid")
    assert spawner.handover_refusal is not None
    assert degraded[0].why == "forced by HANDOFF_PLATFORM=portable"
    with pytest.raises(ValueError, match="use HANDOFF_PLATFORM=portable"):
        select_spawner({"HANDOFF_PLATFORM": "yes"})


@needs_pidfds
def test_select_spawner_picks_pidfds_where_the_kernel_has_them() -> None:
    spawner, degraded = select_spawner({})
    assert spawner is DEFAULT_SPAWNER
    assert degraded == []


# ---- peer credentials ----


def test_peer_credentials_of_a_socketpair_are_ours() -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        left, right = socket.socketpair(socket.AF_UNIX, kind)
        with left, right:
            assert peer_uid(left) == os.getuid()
            assert peer_pid(right) == os.getpid()
            # The fd is only looked at, never taken: the socket still works afterwards.
            left.send(b"x")
            assert right.recv(1) == b"x"


@pytest.mark.skipif(sys.platform == "linux", reason="getpeereid(3) is not in glibc")
def test_getpeereid_gives_our_uid() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_uid(left) == os.getuid()
