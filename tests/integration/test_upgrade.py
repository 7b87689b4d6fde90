"""Zero-downtime upgrades and their failure paths, with real processes, sockets and signals."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import LoadClient, RequestFailed, request_once
from tests.daemon import Daemon, pid_alive, wait_until, worker_command, write_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def _answers(daemon: Daemon) -> bool:
    try:
        return request_once(daemon.address()).status == 200
    except RequestFailed:
        return False


def _seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def rewrite(daemon: Daemon, **config: object) -> None:
    """Change the daemon's config file the way an operator would before an upgrade."""
    write_config(daemon.config, daemon.runtime_dir, **config)  # type: ignore[arg-type]


def fresh_request_generation(daemon: Daemon) -> int | None:
    return request_once(daemon.address()).generation


DEMO = [sys.executable, "-m", "handoff.demo"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("delivery", "command"),
    [
        ("listen_fds", None),  # a plain worker reading LISTEN_FDS by hand (no handoff library)
        ("listen_fds", DEMO),  # the demo worker: trio, handoff.listeners(), graceful drain
        ("scm_rights", DEMO),  # the fd set over SCM_RIGHTS on HANDOFF_FD
    ],
    ids=["listen_fds-plain", "listen_fds-demo", "scm_rights-demo"],
)
def test_twenty_upgrades_under_load_fail_no_request(
    run_daemon: Callable[..., Daemon], delivery: str, command: list[str] | None
) -> None:
    daemon = run_daemon(processes=2, command=command, extra_program=f'fd_delivery = "{delivery}"')
    client = LoadClient(daemon.address(), keepalive=4, fresh=2, max_duration=300)
    client.start()
    try:
        assert client.wait_for_responses(50, timeout=30)
        for upgrade in range(20):
            old_pids = daemon.worker_pids(generation=upgrade + 1)
            code, reply = daemon.upgrade()
            assert code == 0, reply
            assert reply["outcome"] == "ok"
            assert reply["generation"] == upgrade + 2
            for pid in old_pids:
                wait_until(lambda pid=pid: not pid_alive(pid), 20, f"old worker {pid} to drain")
            # once the old generation is gone, every new connection is served by the new one
            assert fresh_request_generation(daemon) == upgrade + 2
            seen = client.snapshot().total
            assert client.wait_for_responses(seen + 20, timeout=30), "load stalled after upgrade"
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    assert set(range(1, 22)) <= set(report.by_generation), report.by_generation
    assert report.ok > 500, report.describe()


def test_sighup_upgrades_like_the_upgrade_command(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(processes=1)
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    finished = daemon.wait_event("upgrade.finished", start=mark)
    assert finished["outcome"] == "ok"
    assert finished["generation"] == 2
    assert isinstance(finished["duration_s"], float)
    assert daemon.status()["generation"] == 2


def _assert_failed_upgrade_keeps_serving(
    daemon: Daemon, expect_reason: str, new_may_serve: bool = False, **config: object
) -> dict[str, object]:
    """The upgrade fails, generation 1 keeps serving throughout, and no request fails.

    A new generation that never says READY=1 may still accept from the shared queue before it
    is stopped (``new_may_serve``); what it accepted must then be answered, not reset.
    """
    before = daemon.worker_pids(generation=1)
    client = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(20, timeout=30)
        rewrite(daemon, **config)
        code, reply = daemon.upgrade()
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30)
    finally:
        report = client.stop()
    assert code == 1, reply
    assert reply["outcome"] == "failed"
    assert expect_reason in str(reply["reason"]), reply["reason"]
    status = daemon.status()
    assert status["generation"] == 1
    assert daemon.worker_pids(generation=1) == before
    assert all(pid_alive(p) for p in before)
    assert report.failed == 0, report.describe()
    assert set(report.by_generation) <= ({1, 2} if new_may_serve else {1})
    assert status["last_upgrade"]["outcome"] == "failed"
    # and a good upgrade still works afterwards
    rewrite(daemon)
    code, reply = daemon.upgrade()
    assert code == 0, reply
    assert reply["generation"] == 3  # the failed attempt used number 2
    return reply


def test_upgrade_keeps_old_generation_when_new_exits_at_once(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon()
    _assert_failed_upgrade_keeps_serving(
        daemon, "exited with status 1 before it was ready", env={"WORKER_MODE": "exit"}
    )


def test_upgrade_keeps_old_generation_when_new_never_becomes_ready(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon()
    _assert_failed_upgrade_keeps_serving(
        daemon,
        "was not ready within program.ready_timeout = 1s",
        new_may_serve=True,
        env={"WORKER_MODE": "never_ready"},
        ready_timeout=1,
    )


def test_upgrade_keeps_old_generation_when_command_is_not_found(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon()
    _assert_failed_upgrade_keeps_serving(
        daemon,
        "'no-such-program-handoffd' was not found on PATH",
        command=["no-such-program-handoffd"],
    )


def test_upgrade_keeps_old_generation_when_config_is_invalid(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon()
    before = daemon.worker_pids()
    text = daemon.config.read_text().replace("drain_timeout = 10", 'drain_timeout = "30s"')
    daemon.config.write_text(text)
    code, reply = daemon.upgrade()
    assert code == 1
    assert f"config {daemon.config}: program.drain_timeout:" in reply["reason"]
    assert "(got '30s')" in reply["reason"]
    assert daemon.worker_pids() == before
    assert request_once(daemon.address()).generation == 1


def test_old_generation_ignoring_sigterm_is_killed_after_drain_timeout(
    run_daemon: Callable[..., Daemon],
) -> None:
    """A generation that ignores its stop signal is SIGKILLed at drain_timeout, not sooner.

    Until then it keeps serving next to the new generation, and no request fails. A request in
    flight on the stubborn worker's own connections at the instant of SIGKILL is lost by
    definition (that is what drain_timeout bounds), so the load is measured up to the drain
    deadline and again after the kill, not across the kill itself.
    """
    daemon = run_daemon(processes=1)
    rewrite(daemon, drain_timeout=3, processes=1, env={"WORKER_MODE": "ignore_term"})
    code, _ = daemon.upgrade()  # generation 2 ignores SIGTERM
    assert code == 0
    (stubborn,) = daemon.worker_pids(generation=2)
    rewrite(daemon, drain_timeout=3, processes=1)
    client = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(20, timeout=30)
        mark = daemon.mark()
        code, reply = daemon.upgrade()
        assert code == 0, reply
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 50, timeout=30)
        assert pid_alive(stubborn), "killed before drain_timeout"
    finally:
        during = client.stop()
    timed_out = daemon.wait_event("generation.drain_timed_out", start=mark, timeout=15)
    assert timed_out["killed"] == [stubborn]
    assert timed_out["drain_timeout"] == 3
    exited = daemon.wait_event(
        "worker.exited", where=lambda e: e.get("pid") == stubborn, start=mark
    )
    assert exited["reason"] == "was killed by SIGKILL"
    assert not pid_alive(stubborn)
    after = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=120)
    after.start()
    try:
        assert after.wait_for_responses(50, timeout=30)
    finally:
        report = after.stop()
    assert during.failed == 0, during.describe()
    assert 2 in during.by_generation, "the stubborn generation stopped serving before its kill"
    assert report.failed == 0, report.describe()
    assert set(report.by_generation) == {3}, report.describe()


def test_worker_gets_fds_exactly_as_sd_listen_fds_checks(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(
        env={"WORKER_MODE": "strict"},
        listeners=[("http", "127.0.0.1:0"), ("admin", "127.0.0.1:0")],
        processes=2,
    )
    status = daemon.status()
    assert all(w["state"] == "ready" for w in status["workers"]), daemon.log_text()
    assert request_once(daemon.address("admin")).status == 200
    assert request_once(daemon.address("http")).status == 200


def test_crashed_worker_is_restarted(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(processes=2)
    victim = daemon.worker_pids()[0]
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    crashed = daemon.wait_event("worker.crashed", start=mark)
    assert crashed["reason"] == "was killed by SIGKILL"
    started = daemon.wait_event("worker.started", start=mark)
    assert started["pid"] != victim
    wait_until(lambda: len(daemon.worker_pids()) == 2, 10, "the worker to be replaced")
    worker = next(w for w in daemon.status()["workers"] if w["restarts"] == 1)
    assert worker["pid"] == started["pid"]


def test_burst_of_upgrade_requests_coalesces_into_one_follow_up(
    run_daemon: Callable[..., Daemon],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from handoff._control import UpgradeRequest, call

    daemon = run_daemon(processes=1, ready="delay:1")
    sock = daemon.runtime_dir / "control.sock"
    spawning = threading.Event()

    def first() -> dict[str, object]:
        return call(
            sock, UpgradeRequest(), on_event=lambda e: e["phase"] == "spawning" and spawning.set()
        )

    with ThreadPoolExecutor(max_workers=11) as pool:
        running = pool.submit(first)
        assert spawning.wait(30), "the first upgrade never started spawning"
        burst = [pool.submit(call, sock, UpgradeRequest()) for _ in range(10)]
        replies = [f.result(60) for f in burst]
        first_reply = running.result(60)
    assert first_reply["generation"] == 2
    # every request of the burst got the outcome of the one follow-up upgrade
    assert {(r["outcome"], r["generation"]) for r in replies} == {("ok", 3)}
    assert daemon.status()["generation"] == 3
    assert len([e for e in daemon.events if e.get("event") == "upgrade.finished"]) == 2


def test_sigterm_drains_workers_and_exits_zero(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = run_daemon(processes=2)
    pids = daemon.worker_pids()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to exit")
    exits = [e for e in daemon.events if e.get("event") == "worker.exited"]
    assert {e["pid"] for e in exits} == set(pids)
    assert all(e["reason"] == "exited with status 0" for e in exits)
    assert not (daemon.runtime_dir / "control.sock").exists()


def test_upgrade_reports_phases_with_timings(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(processes=1)
    result = daemon.cli("upgrade")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines[:4]] == [
        "config_loaded",
        "spawning",
        "ready",
        "draining",
    ]
    assert lines[-1].startswith("upgrade ok: generation 2 serving, took ")


def test_cli_reports_unreachable_daemon_with_exit_3(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    write_config(cfg, tmp_path / "nothing-here", command=worker_command())
    import subprocess
    import sys

    from tests.daemon import REPO

    for verb in ("status", "upgrade", "stop"):
        result = subprocess.run(
            [sys.executable, "-m", "handoff", verb, "--config", str(cfg)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 3, (verb, result.stderr)
        assert "no handoffd is listening on" in result.stderr


@pytest.mark.parametrize("processes", [1])
def test_status_json_lists_generation_workers_listeners(
    run_daemon: Callable[..., Daemon], processes: int
) -> None:
    daemon = run_daemon(processes=processes)
    status = daemon.status()
    assert status["generation"] == 1
    assert status["state"] == "running"
    assert [w["state"] for w in status["workers"]] == ["ready"]
    assert status["workers"][0]["status"] == "test worker serving"
    (li,) = status["listeners"]
    assert li["name"] == "http"
    assert li["address"].startswith("127.0.0.1:")
    assert li["origin"] == "bound"
    json.dumps(status)


def test_a_worker_that_shuts_the_shared_listener_down_does_not_kill_the_port(
    run_daemon: Callable[..., Daemon],
) -> None:
    """shutdown(2) on an inherited listener stops it for every holder; handoffd revives it."""
    daemon = run_daemon(processes=2)
    rewrite(daemon, env={"WORKER_MODE": "shutdown_on_term"})
    code, reply = daemon.upgrade()  # generation 2 will shut the listener down when it drains
    assert code == 0, reply
    client = LoadClient(daemon.address(), keepalive=0, fresh=2, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(20, timeout=30)
        rewrite(daemon, env={})
        code, reply = daemon.upgrade()
        assert code == 0, reply
        daemon.wait_event("generation.drained", where=lambda e: e.get("generation") == 2)
        draining = daemon.wait_event(
            "generation.draining", where=lambda e: e.get("generation") == 2
        )
        # The guard's last look comes when generation 2 has stopped, which also logs "drained":
        # the two are not ordered, so wait until the port answers again (the fault's end).
        wait_until(lambda: _answers(daemon), 10, "the listener to be revived")
        # each draining worker may shut it down again; the last revival ends the fault
        revived = [e for e in daemon.events if e["event"] == "listener.revived"][-1]
        seen = client.snapshot()
        assert client.wait_for_responses(seen.total + 200, timeout=30)
        after = client.snapshot()
    finally:
        report = client.stop()
    # every request since the revival succeeded
    assert after.failed == seen.failed, after
    # Refusals only while the fault went unnoticed (and the kernel resets what was queued on
    # the listener at the instant of the shutdown): a window of one guard interval or so.
    # in the accept queue, or mid-handshake, at the instant of the shutdown
    queued = {"reset", "closed_before_response", "connect_error"}
    assert set(report.failures) <= {"connect_refused", *queued}, report
    assert sum(report.failures[k] for k in queued) <= 5, report
    window = _seconds_between(draining["timestamp"], revived["timestamp"])
    assert 0 <= window < 0.5, window
    # the port keeps serving across later upgrades too (the listener is not left dead)
    code, reply = daemon.upgrade()
    assert code == 0, reply
    assert request_once(daemon.address()).status == 200
