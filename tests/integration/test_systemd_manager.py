"""Smoke tests of the real-manager harness: a Type=notify unit that uses ``handoff.ready()``.

These need no supervisor, only ``tests/systemd_harness.sh``; they prove that the harness brings a
manager up, that the worker library's notify client is what systemd 252 accepts as readiness, and
that teardown leaves nothing behind. They skip where the harness cannot run (see
``tests/systemd_user.py``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.systemd_user import SystemdUser, cgroup2_root, unavailable_reason
from tests.systemd_user import systemd_user as systemd_user

pytestmark = pytest.mark.systemd

# The service blocks on a FIFO until the test writes to it, so the test decides when READY=1 is
# sent and can observe the unit before it (no timing assumption).
READY_WORKER = """\
import os, sys, handoff
gate, state = sys.argv[1], sys.argv[2]
with open(gate) as f:
    f.read()
with open(state + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(state + ".tmp", state)
import signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before READY=1, so stop is graceful
assert handoff.ready(status=f"serving from pid {os.getpid()}")
signal.sigwait({signal.SIGTERM})
"""


def _write_worker(manager: SystemdUser) -> Path:
    script = manager.state / "ready_worker.py"
    script.write_text(READY_WORKER)
    script.chmod(0o644)
    return script


def test_notify_unit_is_activating_until_handoff_ready_then_active_with_status(
    systemd_user: SystemdUser,
) -> None:
    python = systemd_user.require_python()
    script = _write_worker(systemd_user)
    gate = systemd_user.state / "gate"
    pid_file = systemd_user.state / "worker.pid"
    os.mkfifo(gate, 0o666)
    os.chmod(gate, 0o666)  # mkfifo's mode is masked by the umask
    systemd_user.write_unit(
        "demo.service",
        f"""\
        [Service]
        Type=notify
        Environment=PYTHONPATH={systemd_user.pythonpath}
        ExecStart={python} {script} {gate} {pid_file}
        """,
    )

    systemd_user.ctl("start", "--no-block", "demo.service")
    systemd_user.wait_prop("demo.service", "SubState", "start")
    # The worker cannot have sent READY=1: it is still blocked on the gate.
    before = systemd_user.props("demo.service", "ActiveState", "StatusText")
    assert before == {"ActiveState": "activating", "StatusText": ""}

    with open(gate, "w") as f:
        f.write("go")
    systemd_user.wait_prop("demo.service", "ActiveState", "active")

    after = systemd_user.props("demo.service", "SubState", "MainPID", "StatusText", "Type")
    worker_pid = pid_file.read_text()
    assert after == {
        "SubState": "running",
        "MainPID": worker_pid,
        "StatusText": f"serving from pid {worker_pid}",
        "Type": "notify",
    }

    systemd_user.ctl("stop", "demo.service")
    stopped = systemd_user.props("demo.service", "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert not Path(f"/proc/{worker_pid}").exists()


def test_harness_down_kills_services_and_removes_its_cgroup_and_files() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"systemd --user harness unavailable: {reason}")
    name = f"pytest-down-{uuid.uuid4().hex[:8]}"
    manager = SystemdUser(name)
    try:
        # A service that ignores SIGTERM: down must still get rid of it (cgroup.kill).
        manager.write_unit(
            "stubborn.service",
            """\
            [Service]
            ExecStart=/bin/sh -c 'trap "" TERM; while :; do sleep 1; done'
            """,
        )
        manager.ctl("start", "stubborn.service")
        main_pid = manager.prop("stubborn.service", "MainPID")
        assert Path(f"/proc/{main_pid}").exists()
        cgroup_lines = Path(f"/proc/{main_pid}/cgroup").read_text().splitlines()
        assert any(line.endswith("/stubborn.service") for line in cgroup_lines)
        base = manager.base
    finally:
        manager.down(grace=1)

    status = Path(f"/proc/{main_pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()
    assert not base.exists()
    assert not (cgroup2_root() / f"sdh-{name}").exists()


# Stands in for the handoffd CLI to probe the sandbox the shipped unit sets up (the real handoffd
# under the shipped unit is in test_systemd_service.py): `run` is a Type=notify
# daemon that records what the sandbox lets it do; `upgrade` records its argv and exits with the
# code in $SDH_STATE/upgrade_exit, as `handoffd upgrade` reports a failed upgrade with 1.
FAKE_HANDOFFD = """\
import json, os, signal, sys, handoff
state = os.environ["SDH_STATE"]
def record(name, value):
    with open(f"{state}/{name}.tmp", "w") as f:
        json.dump(value, f)
    os.rename(f"{state}/{name}.tmp", f"{state}/{name}")
if sys.argv[1] == "run":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        open("/usr/handoffd-sandbox-probe", "w").close()
        usr = "writable"
    except OSError as exc:
        usr = exc.strerror
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    record("run", {"argv": sys.argv[1:], "runtime": runtime, "usr": usr})
    handoff.ready(status=f"fake handoffd {os.getpid()}")
    signal.sigwait({signal.SIGTERM})
    record("stop", {"pid": os.getpid()})
else:
    record(sys.argv[1], {"argv": sys.argv[1:]})
    with open(f"{state}/upgrade_exit") as f:
        sys.exit(int(f.read()))
"""


def test_shipped_service_unit_starts_reloads_reports_failed_reload_and_stops_gracefully(
    systemd_user: SystemdUser,
) -> None:
    python = systemd_user.require_python()
    state = systemd_user.state
    script = state / "fake_handoffd.py"
    script.write_text(FAKE_HANDOFFD)
    executable = state / "handoffd"
    executable.write_text(
        f'#!/bin/sh\nPYTHONPATH={systemd_user.pythonpath} exec {python} {script} "$@"\n'
    )
    executable.chmod(0o755)
    config = state / "handoffd.toml"
    (state / "upgrade_exit").write_text("0")
    for path in (script, config, state / "upgrade_exit"):
        path.touch()
        path.chmod(0o666)
    systemd_user.install_shipped_unit("handoffd.service", executable=executable, config=config)

    systemd_user.ctl("start", "handoffd.service")
    main_pid = systemd_user.prop("handoffd.service", "MainPID")
    assert systemd_user.props("handoffd.service", "ActiveState", "StatusText", "Type") == {
        "ActiveState": "active",
        "StatusText": f"fake handoffd {main_pid}",
        "Type": "notify",
    }
    run = json.loads((state / "run").read_text())
    assert run["argv"] == ["run", "--config", str(config)]
    assert run["runtime"] == f"{systemd_user.base}/runtime/handoffd"  # user manager's /run
    assert run["usr"] == "Read-only file system"  # ProtectSystem=strict is in force

    systemd_user.ctl("reload", "handoffd.service")
    assert json.loads((state / "upgrade").read_text())["argv"] == [
        "upgrade",
        "--config",
        str(config),
    ]

    (state / "upgrade_exit").write_text("1")
    failed = systemd_user.ctl("reload", "handoffd.service", check=False)
    assert failed.returncode != 0
    # A failed upgrade leaves the old generation serving: the unit stays up with the same pid.
    assert systemd_user.props("handoffd.service", "ActiveState", "MainPID") == {
        "ActiveState": "active",
        "MainPID": main_pid,
    }

    systemd_user.ctl("stop", "handoffd.service")
    assert json.loads((state / "stop").read_text()) == {"pid": int(main_pid)}
    assert systemd_user.props("handoffd.service", "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }


def test_notify_reload_variant_is_silently_simple_on_systemd_252(systemd_user: SystemdUser) -> None:
    """The header of deploy/handoffd-notify-reload.service warns about exactly this."""
    executable = systemd_user.state / "handoffd"
    executable.write_text("#!/bin/sh\nexec sleep 60\n")
    executable.chmod(0o755)
    systemd_user.install_shipped_unit(
        "handoffd-notify-reload.service", executable=executable, config=systemd_user.state / "x"
    )
    version = int(systemd_user.as_user("systemctl", "--version").stdout.split()[1])

    unit_type = systemd_user.prop("handoffd-notify-reload.service", "Type")

    assert unit_type == ("notify-reload" if version >= 253 else "simple")
    if version < 253:
        assert "Failed to parse service type, ignoring: notify-reload" in systemd_user.log()
