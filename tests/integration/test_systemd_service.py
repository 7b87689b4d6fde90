"""The real handoffd, started by a real systemd (252) from the shipped ``deploy/handoffd.service``.

Each test gets a private ``systemd --user`` manager (``tests/systemd_user.py``) and installs the
shipped unit with only its two paths substituted: the executable becomes a wrapper that runs this
checkout's ``handoff`` package on the interpreter the services' user can read, and the config is
written by the test. Workers are ``tests/workers.py`` (no library), copied where that user can read
them. What is asserted is what systemd itself reports (``systemctl show``), what clients see (the
strict load client counts every failed request), and handoffd's own status and log.

Waiting: ``systemctl start``/``reload``/``restart``/``stop`` block until systemd's job is done; for
the rest ``wait_prop`` polls a property with a deadline (this manager has no D-Bus to subscribe to).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

import pytest

from bench.strict_client import LoadClient, LoadReport, request_once
from tests.daemon import pid_alive, wait_until, write_config
from tests.notify_sink import socket_inode
from tests.systemd_user import REPO, SystemdUser, free_port
from tests.systemd_user import systemd_user as systemd_user

pytestmark = pytest.mark.systemd

UNIT = "handoffd.service"
#: Safety net for waits on systemd states; each ends much earlier unless something is broken.
DEADLINE = 30.0


class HandoffdService:
    """``deploy/handoffd.service`` installed in ``manager`` with a config this object writes."""

    def __init__(self, manager: SystemdUser, *, processes: int = 2, **config: Any) -> None:
        self.manager = manager
        self.python = manager.require_python()
        state = manager.state
        self.worker = state / "workers.py"
        shutil.copyfile(REPO / "tests" / "workers.py", self.worker)
        self.worker.chmod(0o644)
        self.executable = state / "handoffd"
        self.executable.write_text(
            f'#!/bin/sh\nPYTHONPATH={manager.pythonpath} exec {self.python} -m handoff "$@"\n'
        )
        self.executable.chmod(0o755)
        self.config = state / "handoffd.toml"
        # RuntimeDirectory=handoffd: in a user manager that is $XDG_RUNTIME_DIR/handoffd
        self.runtime_dir = manager.base / "runtime" / "handoffd"
        self.port = free_port()
        self.processes = processes
        self.write_config(**config)
        manager.install_shipped_unit(UNIT, executable=self.executable, config=self.config)

    def write_config(self, **config: Any) -> None:
        config.setdefault("processes", self.processes)
        config.setdefault("command", [str(self.python), str(self.worker)])
        config.setdefault("listeners", [("http", f"127.0.0.1:{self.port}")])
        write_config(self.config, self.runtime_dir, **config)
        self.config.chmod(0o644)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def status(self) -> dict[str, Any]:
        """``handoffd status --json``, run as the unit's user: with PrivateUsers= handoffd sees
        any other uid (root included) as nobody, and refuses it."""
        result = self.manager.as_user(
            str(self.executable), "status", "--json", "--config", str(self.config)
        )
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def props(self, *names: str) -> dict[str, str]:
        return self.manager.props(UNIT, *names)

    def main_pid(self) -> int:
        return int(self.manager.prop(UNIT, "MainPID"))

    def events(self) -> list[dict[str, Any]]:
        """handoffd's JSON log events (its stderr lands in the manager log)."""
        found = []
        for line in self.manager.log().splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and "event" in event:
                found.append(event)
        return found

    def listener(self) -> dict[str, Any]:
        """The one listener as handoffd reports it, plus the inode of its socket."""
        status = self.status()
        [listener] = status["listeners"]
        return {**listener, "inode": socket_inode(status["pid"], listener["fd"])}


@pytest.fixture
def service(systemd_user: SystemdUser) -> HandoffdService:
    return HandoffdService(systemd_user)


def run_load(service: HandoffdService) -> LoadClient:
    """Fresh connections only: each request is a new connect() on the (stored) listening socket."""
    client = LoadClient(service.address, keepalive=0, fresh=4, max_duration=120)
    client.start()
    assert client.wait_for_responses(50, timeout=DEADLINE), client.snapshot().describe()
    return client


def finish_load(client: LoadClient) -> LoadReport:
    seen = client.snapshot().total
    # the load goes on after the event under test: not one request may fail, late ones included
    assert client.wait_for_responses(seen + 50, timeout=DEADLINE), client.snapshot().describe()
    return client.stop()


def assert_no_refusal_and_no_failure(report: LoadReport) -> None:
    assert report.failures["connect_refused"] == 0, report.describe()
    assert report.failures["connect_timeout"] == 0, report.describe()
    assert report.failures["timeout"] == 0, report.describe()
    assert report.failed == 0, report.describe()


def test_unit_is_activating_until_generation_1_is_ready_then_active_with_handoffds_status(
    systemd_user: SystemdUser,
) -> None:
    gate = systemd_user.state / "gate"
    os.mkfifo(gate)
    os.chmod(gate, 0o666)  # mkfifo's mode is masked by the umask
    python = systemd_user.require_python()
    service = HandoffdService(systemd_user, processes=1)
    # the worker waits for the test before it starts (and says READY=1)
    service.write_config(
        command=["sh", "-c", f"cat {gate} >/dev/null; exec {python} {service.worker}"]
    )

    systemd_user.ctl("start", "--no-block", UNIT)
    wait_until(
        lambda: any(e["event"] == "worker.started" for e in service.events()),
        DEADLINE,
        "handoffd to start its worker",
    )
    # handoffd runs and has stored its listener, but its worker is not ready: no READY=1 yet
    assert service.props("ActiveState", "SubState", "StatusText", "NFileDescriptorStore") == {
        "ActiveState": "activating",
        "SubState": "start",
        "StatusText": "",
        "NFileDescriptorStore": "1",
    }
    with open(gate, "w") as f:
        f.write("go")
    systemd_user.wait_prop(UNIT, "ActiveState", "active", DEADLINE)

    status = service.status()
    assert status["pid"] == service.main_pid()
    assert service.props("SubState", "StatusText") == {
        "SubState": "running",
        "StatusText": "generation 1: 1/1 workers ready",
    }
    assert request_once(service.address).generation == 1


def test_systemctl_stop_drains_the_workers_gracefully(service: HandoffdService) -> None:
    manager = service.manager
    manager.ctl("start", UNIT)
    pid = service.main_pid()
    workers = [w["pid"] for w in service.status()["workers"]]
    assert len(workers) == 2

    manager.ctl("stop", UNIT)

    assert service.props("ActiveState", "Result", "ExecMainStatus", "NFileDescriptorStore") == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
        "NFileDescriptorStore": "0",  # systemd 252 flushes the store on stop
    }
    ours = [e for e in service.events() if e.get("pid") in workers]
    assert sorted(e["pid"] for e in ours if e["event"] == "worker.exited") == sorted(workers)
    assert {e["reason"] for e in ours if e["event"] == "worker.exited"} == {"exited with status 0"}
    assert not any(pid_alive(p) for p in [pid, *workers])
    assert any(e["event"] == "supervisor.stopped" for e in service.events())
    # handoffd drained them (ExecStop= waits for it): systemd found nothing left to kill
    assert "Killing process" not in manager.log()


def _assert_restarted_on_the_stored_socket(
    service: HandoffdService, before: dict[str, Any], old_pid: int
) -> int:
    new_pid = service.main_pid()
    assert new_pid not in (0, old_pid)
    after = service.listener()
    # the very socket the first handoffd bound, handed back by systemd's fd store
    assert after["origin"] == "inherited"
    assert (after["address"], after["inode"]) == (before["address"], before["inode"])
    assert service.props("NFileDescriptorStore", "ActiveState", "StatusText") == {
        "NFileDescriptorStore": "1",
        "ActiveState": "active",
        "StatusText": "generation 1: 2/2 workers ready",
    }
    return new_pid


def test_kill_9_of_handoffd_refuses_no_connection_and_the_restart_serves_the_stored_socket(
    service: HandoffdService,
) -> None:
    manager = service.manager
    manager.ctl("start", UNIT)
    old_pid = service.main_pid()
    before = service.listener()
    assert before["origin"] == "bound"
    old_workers = [w["pid"] for w in service.status()["workers"]]
    client = run_load(service)
    try:
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        manager.wait_prop(UNIT, "NRestarts", "1", DEADLINE)
        manager.wait_prop(UNIT, "ActiveState", "active", DEADLINE)
        back_at = time.monotonic()
        report = finish_load(client)
    finally:
        client.stop()

    new_pid = _assert_restarted_on_the_stored_socket(service, before, old_pid)
    assert_no_refusal_and_no_failure(report)
    # the orphaned workers of the killed handoffd do not linger
    for pid in old_workers:
        wait_until(lambda pid=pid: not pid_alive(pid), DEADLINE, f"orphaned worker {pid} to go")
    assert all(w["pid"] not in old_workers for w in service.status()["workers"])
    inherited = [e for e in service.events() if e["event"] == "listener.inherited"]
    assert [(e["listener"], e["fdname"]) for e in inherited] == [("http", "http")]
    print(
        f"kill -9 -> active again after {back_at - killed_at:.2f}s; max latency "
        f"{max(report.latencies):.3f}s over {report.ok} requests; new pid {new_pid}"
    )


def test_systemctl_restart_refuses_no_connection_and_keeps_the_socket(
    service: HandoffdService,
) -> None:
    manager = service.manager
    manager.ctl("start", UNIT)
    old_pid = service.main_pid()
    before = service.listener()
    client = run_load(service)
    try:
        manager.ctl("restart", UNIT)
        report = finish_load(client)
    finally:
        client.stop()

    _assert_restarted_on_the_stored_socket(service, before, old_pid)
    assert_no_refusal_and_no_failure(report)
    print(f"restart: max latency {max(report.latencies):.3f}s over {report.ok} requests")


def test_systemctl_reload_returns_once_the_new_generation_serves_and_fails_with_the_upgrade(
    service: HandoffdService,
) -> None:
    manager = service.manager
    manager.ctl("start", UNIT)
    pid = service.main_pid()
    client = run_load(service)
    try:
        manager.ctl("reload", UNIT)
        # checked right after `systemctl reload` returned: generation 2 is the one serving
        status = service.status()
        assert status["generation"] == 2
        assert [w["state"] for w in status["workers"] if w["generation"] == 2] == ["ready"] * 2
        assert status["last_upgrade"]["outcome"] == "ok"
        assert service.props("ActiveState", "StatusText")["StatusText"].startswith(
            "generation 2: 2/2 workers ready"
        )

        # a new version that exits at once: the reload job fails, generation 2 keeps serving
        service.write_config(env={"WORKER_MODE": "exit"})
        failed = manager.ctl("reload", UNIT, check=False)
        assert failed.returncode != 0
        assert f"Job for {UNIT} failed" in failed.stderr, failed.stderr
        status = service.status()
        assert (status["generation"], status["last_upgrade"]["outcome"]) == (2, "failed")
        assert "exited with status 1 before it was ready" in status["last_upgrade"]["reason"]
        assert service.props("ActiveState", "MainPID") == {
            "ActiveState": "active",
            "MainPID": str(pid),
        }
        manager.wait_prop(
            UNIT, "StatusText", "generation 2: 2/2 workers ready; last upgrade failed", DEADLINE
        )
        report = finish_load(client)
    finally:
        client.stop()
    assert_no_refusal_and_no_failure(report)
    assert request_once(service.address).generation == 2


def test_socket_unit_activates_handoffd_which_takes_the_socket_by_name(
    service: HandoffdService,
) -> None:
    manager = service.manager
    manager.install_shipped_socket("handoffd.socket", listen=f"127.0.0.1:{service.port}")
    manager.ctl("start", "handoffd.socket")
    assert manager.prop(UNIT, "ActiveState") == "inactive"

    # the first request starts handoffd and waits in the socket's queue meanwhile
    assert request_once(service.address).generation == 1
    manager.wait_prop(UNIT, "ActiveState", "active", DEADLINE)
    first_pid = service.main_pid()
    before = service.listener()
    assert before["origin"] == "inherited"
    inherited = [e for e in service.events() if e["event"] == "listener.inherited"]
    assert [(e["listener"], e["fdname"]) for e in inherited] == [("http", "http")]
    assert manager.prop(UNIT, "NFileDescriptorStore") == "1"

    # after a restart systemd passes the socket twice (socket unit + fd store): one copy is
    # closed, the listener keeps the same socket and no request is refused
    client = run_load(service)
    try:
        manager.ctl("restart", UNIT)
        report = finish_load(client)
    finally:
        client.stop()
    assert service.main_pid() != first_pid
    after = service.listener()
    assert (after["origin"], after["inode"]) == ("inherited", before["inode"])
    assert [e["event"] for e in service.events() if e["event"] == "listener.duplicate_closed"] == [
        "listener.duplicate_closed"
    ]
    assert_no_refusal_and_no_failure(report)


def test_watchdog_sec_is_fed_by_handoffd_and_never_fires(service: HandoffdService) -> None:
    manager = service.manager
    dropin = manager.units / f"{UNIT}.d" / "watchdog.conf"
    dropin.write_text("[Service]\nWatchdogSec=1s\n")
    dropin.chmod(0o644)
    manager.ctl("daemon-reload")
    manager.ctl("start", UNIT)
    assert manager.prop(UNIT, "WatchdogUSec") == "1s"

    # systemd stamps every WATCHDOG=1 it accepts; see it move three times (pings every 0.5 s)
    stamps: set[int] = set()

    def seen_three_pings() -> bool:
        stamps.add(int(manager.prop(UNIT, "WatchdogTimestampMonotonic")))
        return len(stamps - {0}) >= 3

    wait_until(seen_three_pings, DEADLINE, "three distinct watchdog timestamps")
    assert service.props("NRestarts", "ActiveState", "MainPID") == {
        "NRestarts": "0",
        "ActiveState": "active",
        "MainPID": str(service.status()["pid"]),
    }
    assert "Watchdog timeout" not in manager.log()
