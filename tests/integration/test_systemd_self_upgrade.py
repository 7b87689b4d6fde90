"""Self-upgrade under a real systemd (252): MainPID moves to the new supervisor, the unit stays up.

The shipped ``deploy/handoffd.service`` runs the real handoffd (``HandoffdService`` from
``test_systemd_service``). What is asserted is what systemd reports (``systemctl show``), what
clients see (the strict load client), and handoffd's own status and log. The new supervisor sends
``MAINPID=`` and waits on ``BARRIER=1`` before the old one exits, which needs
``NotifyAccess=all`` (the shipped unit has it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.daemon import pid_alive, wait_until
from tests.integration.test_systemd_service import (
    DEADLINE,
    UNIT,
    HandoffdService,
    assert_no_refusal_and_no_failure,
    finish_load,
    run_load,
)
from tests.systemd_user import systemd_user as systemd_user

if TYPE_CHECKING:
    from tests.systemd_user import SystemdUser

pytestmark = pytest.mark.systemd


def self_upgrade(service: HandoffdService) -> dict[str, Any]:
    """``handoffd upgrade --self --json`` as the unit's user; the reply (after the events)."""
    result = service.manager.as_user(
        str(service.executable), "upgrade", "--self", "--json", "--config", str(service.config)
    )
    reply: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{\n") :])
    return reply


def test_self_upgrade_moves_main_pid_keeps_the_unit_active_and_stop_is_clean(
    systemd_user: SystemdUser,
) -> None:
    service = HandoffdService(systemd_user)
    systemd_user.ctl("start", UNIT)
    first = service.main_pid()
    workers = sorted(w["pid"] for w in service.status()["workers"])
    client = run_load(service)
    supervisors = [first]
    for _ in range(2):
        reply = self_upgrade(service)
        assert reply["ok"], reply
        new = reply["supervisor_pid"]
        old = supervisors[-1]
        wait_until(lambda old=old: not pid_alive(old), DEADLINE, f"old supervisor {old} to exit")
        # MAINPID= was processed (BARRIER=1) before the old one exited: never a gap
        assert service.props("MainPID", "ActiveState", "SubState") == {
            "MainPID": str(new),
            "ActiveState": "active",
            "SubState": "running",
        }
        status = service.status()
        assert status["pid"] == new
        assert sorted(w["pid"] for w in status["workers"]) == workers
        supervisors.append(new)
    assert len(set(supervisors)) == 3
    assert_no_refusal_and_no_failure(finish_load(client))
    assert "Supervising process" in systemd_user.log()  # systemd: the new main is not its child

    systemd_user.ctl("stop", UNIT)

    assert service.props("ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }
    assert not any(pid_alive(p) for p in [*supervisors, *workers])
    events = service.events()
    exited = [e for e in events if e["event"] == "worker.exited" and e["pid"] in workers]
    assert sorted(e["pid"] for e in exited) == workers  # drained by the last supervisor
    stopped = [e for e in events if e["event"] == "supervisor.stopped"]
    assert stopped[-1]["handed_over_to"] is None
    # handoffd stopped by itself within ExecStop=: systemd found nothing left to kill
    assert "Killing process" not in systemd_user.log()


def test_new_supervisor_feeds_the_watchdog_with_the_interval_it_was_handed(
    systemd_user: SystemdUser,
) -> None:
    """Its WATCHDOG_PID names the old pid, so the interval must come with the state."""
    service = HandoffdService(systemd_user, processes=1)
    dropin = systemd_user.units / f"{UNIT}.d" / "watchdog.conf"
    dropin.write_text("[Service]\nWatchdogSec=1s\n")
    dropin.chmod(0o644)
    systemd_user.ctl("daemon-reload")
    systemd_user.ctl("start", UNIT)
    old = service.main_pid()
    reply = self_upgrade(service)
    assert reply["ok"], reply
    wait_until(lambda: not pid_alive(old), DEADLINE, f"old supervisor {old} to exit")

    # systemd stamps every WATCHDOG=1 it accepts: three more, all after the old one exited
    stamps: set[int] = set()

    def seen_three_pings() -> bool:
        stamps.add(int(systemd_user.prop(UNIT, "WatchdogTimestampMonotonic")))
        return len(stamps) >= 4

    wait_until(seen_three_pings, DEADLINE, "three more watchdog timestamps")
    assert service.props("NRestarts", "ActiveState", "MainPID") == {
        "NRestarts": "0",
        "ActiveState": "active",
        "MainPID": str(reply["supervisor_pid"]),
    }
    assert "Watchdog timeout" not in systemd_user.log()
