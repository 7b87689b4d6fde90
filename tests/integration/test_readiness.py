"""Observed readiness, the canary hold and whole process trees, with real Python workers.

The workers are ``tests/ready_workers.py`` (and ``tests/workers.py``): real processes on the real
held listeners, observed through the real ``/proc``; load is a bounded loopback ``LoadClient``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from bench.strict_client import LoadClient, request_once
from tests.daemon import REPO, WORKER, pid_alive, wait_until, write_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.daemon import Daemon

READY_WORKER = str(REPO / "tests" / "ready_workers.py")


def ready_command() -> list[str]:
    return [sys.executable, READY_WORKER]


def rewrite(daemon: Daemon, **config: object) -> None:
    write_config(daemon.config, daemon.runtime_dir, **config)  # type: ignore[arg-type]


def upgrade_under_load(daemon: Daemon) -> tuple[int, dict[str, object], float, int]:
    """An upgrade under a small bounded load: (exit code, reply, longest request s, failed)."""
    client = LoadClient(daemon.address(), keepalive=2, fresh=2, max_duration=60)
    client.start()
    try:
        assert client.wait_for_responses(20, timeout=20)
        code, reply = daemon.upgrade()
        assert client.wait_for_responses(client.snapshot().total + 20, timeout=20)
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    return code, reply, report.percentile(1.0), report.failed


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_a_worker_that_never_notifies_is_ready_once_it_accepts(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(
        command=ready_command(), ready="auto", hold=None, env={"READY_MODE": "late"}
    )
    code, reply, longest, _ = upgrade_under_load(daemon)
    assert code == 0, reply
    assert float(reply["duration_s"]) >= 1.0 + 2.0  # its 1 s start, then the default 2 s hold
    assert [p["phase"] for p in reply["phases"]][-3:] == ["ready", "holding", "draining"]  # type: ignore[union-attr, index]
    assert longest < 1.0


def test_auto_readiness_waits_for_accepting_after_an_early_ready(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(command=ready_command(), ready="auto", env={"READY_MODE": "early"})
    code, reply, longest, _ = upgrade_under_load(daemon)
    assert code == 0, reply
    # READY=1 came at once; the workers accepted only 1.5 s later.
    assert float(reply["duration_s"]) >= 1.5
    assert longest < 1.0


def test_a_worker_crashing_after_ready_is_caught_by_the_default_hold(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(ready="auto", processes=1)
    rewrite(
        daemon,
        command=ready_command(),
        ready="auto",
        hold=None,
        processes=1,
        env={"READY_MODE": "crash", "CRASH_AFTER": "1"},
    )
    code, reply = daemon.upgrade()
    assert code == 1, reply
    assert "worker 0 of generation 2 exited with status 1 during the hold" in str(reply["reason"])
    assert reply["generation"] == 1
    assert request_once(daemon.address()).generation == 1
    status = daemon.status()
    assert status["generation"] == 1
    assert status["serving"] is True
    assert status["last_upgrade"]["outcome"] == "failed"
    finished = daemon.wait_event("upgrade.finished", where=lambda e: e.get("generation") == 1)
    assert finished["level"] == "warning"


def test_a_pre_forking_worker_is_ready_only_once_both_children_accept(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(
        command=ready_command(), ready="auto", processes=1, env={"READY_MODE": "prefork"}
    )
    worker = daemon.status()["workers"][0]
    assert len(worker["descendants"]) == 2
    code, reply = daemon.upgrade()
    assert code == 0, reply
    # The second child starts accepting 1 s after the first: the first alone is not ready.
    assert float(reply["duration_s"]) >= 1.0


def _tree_ends_with_its_generation(daemon: Daemon, helper: str) -> None:
    first = daemon.status()["workers"][0]
    old = [first["pid"], *first["descendants"]]
    assert helper in [comm(pid) for pid in first["descendants"]], first
    code, reply = daemon.upgrade()
    assert code == 0, reply
    daemon.wait_event("generation.drained", where=lambda e: e["generation"] == 1)
    assert [pid for pid in old if pid_alive(pid)] == []
    current = daemon.status()["workers"][0]
    new = [current["pid"], *current["descendants"]]
    assert len(new) == 2
    port = daemon.address()[1]
    assert daemon.stop() == 0
    wait_until(lambda: not any(pid_alive(pid) for pid in new), 10, "generation 2 to be gone")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # the port is free: nothing of ours holds it


def test_a_background_helper_ends_with_its_generation_and_frees_the_port(
    run_daemon: Callable[..., Daemon],
) -> None:
    command = ["/bin/sh", "-c", f"sleep 300 & exec {sys.executable} {WORKER}"]
    daemon = run_daemon(command=command, ready="auto", processes=1)
    _tree_ends_with_its_generation(daemon, "sleep")


def test_a_wrapper_shell_that_does_not_exec_ends_with_its_generation(
    run_daemon: Callable[..., Daemon],
) -> None:
    command = ["/bin/sh", "-c", f"{sys.executable} {WORKER}; exit $?"]
    daemon = run_daemon(command=command, ready="auto", processes=1)
    _tree_ends_with_its_generation(daemon, os.path.basename(sys.executable)[:15])


def test_status_exits_4_while_the_current_generation_crash_loops(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    daemon = run_daemon(
        command=ready_command(),
        processes=1,
        env={"READY_MODE": "broken_if", "BROKEN_FILE": str(broken)},
    )
    assert daemon.cli("status").returncode == 0
    broken.touch()
    mark = daemon.mark()
    os.kill(daemon.worker_pids()[0], signal.SIGKILL)
    daemon.wait_event("worker.crashed", where=lambda e: e["restarts"] >= 2, start=mark)
    result = daemon.cli("status")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "NOT serving: worker 0 of generation 1 is" in result.stdout
    as_json = daemon.cli("status", "--json")
    assert as_json.returncode == 4
    status = daemon.status()
    assert status["serving"] is False
    assert status["workers"][0]["status"] is None  # not the dead worker's "test worker serving"
    broken.unlink()
    wait_until(lambda: daemon.status()["serving"], 20, "the worker to serve again")
    assert daemon.cli("status").returncode == 0
