"""The deploy files agree with the example configs and with what the README installs.

Nothing here starts anything (tests/integration/test_systemd_service.py starts the unit in a real
manager, test_systemd_security.py scores it): these read the files and check the facts that tie
them together, which drift silently otherwise: a socket unit's name and address against the
config's listener, the unit's executable against the README's install commands, the Docker
image's drain against ``docker stop``'s timeout.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"
#: Where the README installs handoffd, and so what the units run.
EXECUTABLE = "/opt/handoffd/bin/handoffd"
#: `docker stop`'s default --time, seconds: SIGKILL follows STOPSIGNAL after it.
DOCKER_STOP_TIME = 10.0
#: What handoffd needs after the drain to stop its last workers and exit.
STOP_MARGIN = 2.0


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file by key, in order; comments and sections left out."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_socket_units_bind_the_example_configs_listeners_by_their_names() -> None:
    config = tomllib.loads((REPO / "config" / "handoffd.toml").read_text())
    sockets = [unit_settings(path) for path in sorted(DEPLOY.glob("*.socket"))]

    by_name = {unit["FileDescriptorName"][0]: unit for unit in sockets}
    assert sorted(by_name) == sorted(listener["name"] for listener in config["listener"])
    for listener in config["listener"]:
        unit = by_name[listener["name"]]
        assert unit["ListenStream"] == [listener["address"]]
        assert unit["Service"] == ["handoffd.service"]
        assert unit.get("Backlog", [None]) == [
            str(listener["backlog"]) if "backlog" in listener else None
        ]
        assert "ReusePort" not in unit


def test_units_run_the_venv_and_user_the_readme_installs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "python3 -m venv /opt/handoffd && /opt/handoffd/bin/pip install handoffd" in readme
    assert (
        "useradd --system --user-group --no-create-home --home-dir /nonexistent "
        "--shell /usr/sbin/nologin handoffd" in readme
    )
    for name in ("handoffd.service", "handoffd-notify-reload.service"):
        unit = unit_settings(DEPLOY / name)
        assert shlex.split(unit["ExecStart"][0])[0] == EXECUTABLE, name
        assert (unit["User"], unit["Group"]) == (["handoffd"], ["handoffd"]), name
        assert unit["CapabilityBoundingSet"] == [""], name
    reload = unit_settings(DEPLOY / "handoffd.service")["ExecReload"]
    assert reload == [f"{EXECUTABLE} upgrade --config /etc/handoffd/handoffd.toml"]


def test_notify_reload_unit_has_the_same_user_limits_and_sandbox_as_the_main_unit() -> None:
    """Unit files cannot include one another: this keeps the copy in step."""
    main = unit_settings(DEPLOY / "handoffd.service")
    variant = unit_settings(DEPLOY / "handoffd-notify-reload.service")
    lines = (DEPLOY / "handoffd.service").read_text().splitlines()
    start = lines.index("User=handoffd")
    shared = {line.partition("=")[0] for line in lines[start:] if "=" in line and line[0] != "#"}
    shared -= {"WantedBy"}

    assert len(shared) > 20
    assert {key: variant.get(key) for key in shared} == {key: main[key] for key in shared}


def test_docker_image_runs_unprivileged_with_a_healthcheck_and_a_drain_docker_stop_allows() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (config/\S+) (\S+)$", dockerfile, re.MULTILINE)
    assert len(copied) == 1
    [(source, target)] = copied
    config = tomllib.loads((REPO / source).read_text())

    assert re.search(r"^USER (?!0\b|root\b)\S+$", dockerfile, re.MULTILINE)
    assert "\nSTOPSIGNAL SIGTERM\n" in dockerfile
    assert config["program"].get("stop_signal", "SIGTERM") == "SIGTERM"
    healthcheck = re.search(r"^HEALTHCHECK .*\n\s+CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert healthcheck is not None
    assert healthcheck.group(1) == f'["handoffd", "status", "--config", "{target}"]'
    assert f'CMD ["--config", "{target}"]' in dockerfile
    assert config["program"]["drain_timeout"] + STOP_MARGIN <= DOCKER_STOP_TIME
    runtime_dir = config["supervisor"]["runtime_dir"]
    assert f"install -d -o handoffd -g handoffd -m 0700 {runtime_dir}" in dockerfile
