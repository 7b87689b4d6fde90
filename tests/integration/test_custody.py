"""Socket custody: a handoffd killed with SIGKILL outside systemd is replaced by the next
``handoffd run``, which takes the listeners back from the workers left running and adopts them.

Real processes throughout: the daemons (started by the test, not under systemd), their workers,
a strict load client on loopback counting every failed request, and real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import LoadClient, request_once
from tests.daemon import (
    REPO,
    WORKER,
    Daemon,
    pid_alive,
    remove_tree,
    short_tempdir,
    wait_until,
    write_config,
)
from tests.integration.test_self_upgrade import python_handoffd

if TYPE_CHECKING:
    from collections.abc import Iterator

NOBODY = 65534


@pytest.fixture
def base(no_fd_leak: None) -> Iterator[Path]:
    path = short_tempdir()
    yield path
    remove_tree(path)


def kill_supervisor(daemon: Daemon) -> None:
    """SIGKILL the supervisor (not its workers) and reap it."""
    os.kill(daemon.pid, signal.SIGKILL)
    assert daemon.proc.wait(10) == -signal.SIGKILL


def release(daemon: Daemon) -> None:
    """Stop following a killed daemon's stderr (its orphans held the pipe until they exited)."""
    daemon._reader.join(10)
    if daemon.proc.stderr is not None:
        daemon.proc.stderr.close()


def stop_cleanly(daemon: Daemon, pids: list[int]) -> None:
    assert daemon.stop() == 0, daemon.log_text()
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to be gone")
    left = {p.name for p in daemon.runtime_dir.iterdir()}
    assert "custody.json" not in left
    assert "control.sock" not in left


def assert_recovered(daemon: Daemon, predecessor: int, workers: list[int], address: object) -> None:
    recovered = daemon.wait_event("custody.recovered")
    assert recovered["predecessor"] == predecessor
    assert sorted(recovered["pids"]) == workers
    status = daemon.status()
    assert status["state"] == "running"
    assert sorted(w["pid"] for w in status["workers"]) == workers
    assert {w["generation"] for w in status["workers"]} == {1}
    assert [li["origin"] for li in status["listeners"]] == ["recovered"]
    assert daemon.address() == address
    # never bound again: the same socket as before, taken from the orphans
    assert not any(e.get("event") == "listener.bound" for e in daemon.events)


def test_sigkilled_handoffd_is_replaced_by_the_next_run_without_a_refused_connection(
    base: Path,
) -> None:
    config, run = base / "handoffd.toml", base / "run"
    write_config(config, run, processes=2)
    first = Daemon(config, run)
    first.wait_ready()
    address = first.address()
    workers = sorted(first.worker_pids())
    record = run / "custody.json"
    info = record.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    client = LoadClient(address, keepalive=2, fresh=2, max_duration=120)
    client.start()
    second: Daemon | None = None
    try:
        assert client.wait_for_responses(50, timeout=30)
        kill_supervisor(first)
        # unsupervised, the orphans serve on
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 50, timeout=30)
        assert all(pid_alive(p) for p in workers)

        second = Daemon(config, run)
        second.wait_ready()
        assert_recovered(second, first.proc.pid, workers, address)
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 50, timeout=30)
        assert record.exists()

        # an upgrade drains the adopted generation like any other; numbering went on
        mark = second.mark()
        code, reply = second.upgrade()
        assert code == 0, reply
        assert reply["generation"] == 2
        second.wait_event("generation.drained", where=lambda e: e["generation"] == 1, start=mark)
        wait_until(lambda: not any(pid_alive(p) for p in workers), 10, "the orphans to exit")
        assert request_once(address).generation == 2
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 50, timeout=30)
    finally:
        report = client.stop()
        if second is None:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    new_workers = second.worker_pids()
    stop_cleanly(second, new_workers)
    release(first)
    assert report.failed == 0, report.describe()
    assert set(report.by_generation) == {1, 2}, report.by_generation


def test_sigkill_mid_handover_is_recovered_the_same_way(base: Path) -> None:
    """The old supervisor dies after its successor started but before the commit."""
    config, run = base / "handoffd.toml", base / "run"
    write_config(
        config,
        run,
        processes=2,
        extra_supervisor='self_upgrade_timeout = 60\nself_upgrade = "new-pid"',
    )
    hangs = python_handoffd(
        base / "handoffd-hangs",
        "import time, handoff._handover as h\n"
        "async def confirm(self, status, timeout):\n"
        "    time.sleep(600)  # received everything, never says in_charge\n"
        "h.Handover.confirm = confirm",
    )
    first = Daemon(config, run)
    first.wait_ready()
    address = first.address()
    workers = sorted(first.worker_pids())
    client = LoadClient(address, keepalive=2, fresh=2, max_duration=120)
    client.start()
    caller = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "handoff",
            "upgrade",
            "--self",
            "--exec",
            str(hangs),
            *("--config", str(config)),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    successor = 0
    second: Daemon | None = None
    try:
        assert client.wait_for_responses(30, timeout=30)
        successor = first.wait_event("handover.spawned")["successor_pid"]
        # it has the state and the fds, and bound its staged control socket: mid-handover
        staged = run / f".control.sock.{successor}"
        wait_until(staged.exists, 30, "the successor to stage its control socket")
        kill_supervisor(first)
        assert caller.wait(30) != 0
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 30, timeout=30)

        second = Daemon(config, run)
        second.wait_ready()
        assert_recovered(second, first.proc.pid, workers, address)
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 30, timeout=30)
    finally:
        report = client.stop()
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        if successor:
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGKILL)
            wait_until(lambda: not pid_alive(successor), 10, "the hung successor to be gone")
            with contextlib.suppress(FileNotFoundError):
                (run / f".control.sock.{successor}").unlink()
        if second is None:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    stop_cleanly(second, workers)
    release(first)
    assert report.failed == 0, report.describe()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run workers as another uid")
def test_orphans_whose_fds_may_not_be_taken_stop_the_start_with_their_pids_and_the_fix(
    base: Path,
) -> None:
    """The workers run as uid nobody; the second handoffd runs as root without CAP_SYS_PTRACE,
    so it may not ptrace them: what a non-root handoffd meets under Yama ptrace_scope=1."""
    config, run = base / "handoffd.toml", base / "run"
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # nobody cannot reach root's 0700 runtime dir: readiness is observed, not notified
    worker = [*as_nobody, "/usr/bin/env", "-u", "NOTIFY_SOCKET", "/usr/bin/python3", WORKER]
    write_config(config, run, processes=2, command=worker, ready="accepting")
    first = Daemon(config, run)
    first.wait_ready()
    address = first.address()
    workers = sorted(first.worker_pids())
    try:
        kill_supervisor(first)
        without_ptrace = ["setpriv", "--bounding-set=-sys_ptrace"]
        second = subprocess.run(
            [*without_ptrace, sys.executable, "-m", "handoff", "run", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        message = second.stderr
        assert f"pids {' '.join(map(str, workers))}" in message, message
        assert "kill -TERM" in message
        assert "CAP_SYS_PTRACE" in message
        assert "Traceback" not in message
        assert all(pid_alive(p) for p in workers)  # left serving: never killed by handoffd
        assert (run / "custody.json").exists()  # kept for a start that may take them
        request_once(address)  # still served by the orphans

        # and with the capability the next start takes them over
        third = Daemon(config, run)
        third.wait_ready()
        assert_recovered(third, first.proc.pid, workers, address)
        stop_cleanly(third, workers)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in workers:
            wait_until(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to be gone")
        release(first)
