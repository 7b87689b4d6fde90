"""Fleet rollouts: the real ``ansible-playbook`` runs deploy/ansible against four "hosts".

Each host is its own ``handoffd run`` (started by the test, as a service manager would) with its
own config, runtime dir and root folder under one temp dir, and its own listener on a loopback
port; Ansible reaches them with ``ansible_connection=local`` and per-host variables. Separate
network namespaces would need root (``unshare -n``) and a veth per host for the load client to
reach them, and would test nothing the play depends on: the play only ever talks to a host's
handoffd through its CLI and config, which the per-host folders already keep apart.

No systemd unit is started (``handoffd_manage_systemd: false``; the unit is written into the
host's root folder). Every host carries a bounded loopback load for the whole rollout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bench.strict_client import LoadClient, request_once
from tests.daemon import REPO, WORKER, Daemon, pid_alive, remove_tree, short_tempdir, write_config

if TYPE_CHECKING:
    from collections.abc import Iterator

PLAYBOOKS = REPO / "deploy" / "ansible"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HANDOFFD = Path(sys.executable).with_name("handoffd")
HOSTS = ["web1", "web2", "web3", "web4"]

# A release that cannot start: exits at boot, before READY=1.
BROKEN_WORKER = (
    'import sys\nprint("app: failing at boot on purpose", file=sys.stderr)\nsys.exit(1)\n'
)


class PacedLoadClient(LoadClient):
    """LoadClient with a pause before each request: four hosts' load on a shared 2-core machine
    must leave the CPU to ansible-playbook and the workers (the pause paces, it synchronises
    nothing)."""

    PAUSE = 0.005

    def _running(self) -> bool:
        self._stop.wait(self.PAUSE)
        return super()._running()


class Fleet:
    """Four hosts, each a handoffd under load, and the inventory that describes them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: dict[str, Daemon] = {}
        self.clients: dict[str, PacedLoadClient] = {}
        self.releases = base / "releases"
        for name, text in (("good", (REPO / WORKER).read_text()), ("broken", BROKEN_WORKER)):
            (self.releases / name).mkdir(parents=True)
            (self.releases / name / "worker.py").write_text(text)

    def root(self, host: str) -> Path:
        return self.base / host

    def config(self, host: str) -> Path:
        return self.root(host) / "etc" / "handoffd" / "handoffd.toml"

    def runtime_dir(self, host: str) -> Path:
        return self.root(host) / "run"

    def start(self) -> None:
        """Generation 1 on every host: the version installed before this rollout."""
        for host in HOSTS:
            config = self.config(host)
            config.parent.mkdir(parents=True)
            write_config(config, self.runtime_dir(host), processes=1)
            self.daemons[host] = Daemon(config, self.runtime_dir(host))
        for daemon in self.daemons.values():
            daemon.wait_ready()

    def start_load(self) -> None:
        for host, daemon in self.daemons.items():
            self.clients[host] = PacedLoadClient(
                daemon.address(), keepalive=1, fresh=1, max_duration=120
            )
            self.clients[host].start()
        for client in self.clients.values():
            assert client.wait_for_responses(10, timeout=30), "no load before the rollout"

    def stop_load(self) -> dict[str, Any]:
        """Every host's report, once each has answered a few more requests after the play."""
        for client in self.clients.values():
            assert client.wait_for_responses(client.snapshot().total + 5, timeout=30)
        reports = {host: client.stop() for host, client in self.clients.items()}
        self.clients = {}
        return reports

    def inventory(self, version: str, per_host: dict[str, dict[str, Any]] | None = None) -> Path:
        common = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "handoffd_install": "none",
            "handoffd_bin": str(HANDOFFD),
            "handoffd_python": sys.executable,
            "handoffd_manage_systemd": False,
            "handoffd_program_version": version,
            "handoffd_program_src": str(self.releases / "good"),
            "handoffd_program_command": [sys.executable, "{{ handoffd_release_dir }}/worker.py"],
            "handoffd_processes": 1,
            "handoffd_ready_timeout": 10,
            "handoffd_drain_timeout": 10,
            "handoffd_supervisor_options": {
                "restart_backoff_initial": 0.1,
                "restart_backoff_max": 1.0,
            },
            # port 0 as when generation 1 started: an unchanged listener keeps its socket
            "handoffd_listeners": [{"name": "http", "address": "127.0.0.1:0"}],
            "handoffd_health_delay": 0.5,
        }
        hosts = {
            host: {
                "handoffd_root": str(self.root(host)),
                "handoffd_runtime_dir": str(self.runtime_dir(host)),
                **(per_host or {}).get(host, {}),
            }
            for host in HOSTS
        }
        path = self.base / f"inventory-{version}.json"  # JSON is YAML
        path.write_text(json.dumps({"handoffd": {"vars": common, "hosts": hosts}}, indent=2))
        return path

    def play(self, playbook: str, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
            "ANSIBLE_HOME": str(self.base / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible" / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(self.base / "ansible" / "remote"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        }
        started = time.monotonic()
        result = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(PLAYBOOKS / playbook), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.base,
            timeout=120,
        )
        print(f"{playbook} {args}: exit {result.returncode} in {time.monotonic() - started:.1f}s")
        print(result.stdout[-6000:], result.stderr[-3000:])
        return result

    def generation(self, host: str) -> int:
        return int(self.daemons[host].status()["generation"])


def self_upgrade_outcome(status: dict[str, Any]) -> str | None:
    """The outcome of the supervisor's last upgrade if it was a self-upgrade, else None."""
    last = status.get("last_upgrade") or {}
    phases = {p["phase"] for p in last.get("phases", [])}
    return (
        last.get("outcome")
        if phases & {"snapshot", "in_charge", "frozen", "preflight_passed"}
        else None
    )


@pytest.fixture
def fleet(no_fd_leak: None) -> Iterator[Fleet]:
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.fail(
            f"{ANSIBLE_PLAYBOOK} is missing: install the test extras "
            "(pip install -e '.[dev]', which includes ansible-core)"
        )
    fleet = Fleet(short_tempdir())
    try:
        fleet.start()
        yield fleet
    finally:
        for client in fleet.clients.values():
            client.stop()
        codes = {}
        for host, daemon in fleet.daemons.items():
            pids = [w["pid"] for w in daemon.status()["workers"] if w["pid"]]
            daemon.pid = daemon.status()["pid"]  # the successor after a self-upgrade
            codes[host] = daemon.stop()
            for pid in pids:
                assert not pid_alive(pid), f"{host}: worker {pid} outlived handoffd"
        remove_tree(fleet.base)
    assert all(code in (0, None) for code in codes.values()), codes


def assert_no_failed_requests(reports: dict[str, Any]) -> None:
    for host, report in reports.items():
        assert report.failed == 0, f"{host}: {report.describe()}"
        assert report.ok > 0, f"{host}: {report.describe()}"


@pytest.mark.slow
def test_rollout_goes_through_every_host_and_stops_at_the_first_failed_upgrade(
    fleet: Fleet,
) -> None:
    # --check says what would change and changes nothing
    configs = {host: fleet.config(host).read_text() for host in HOSTS}
    # the whole fleet at once: a check changes nothing, so it needs no batches
    checked = fleet.play("rollout.yml", fleet.inventory("2"), "--check", "-e", "handoffd_serial=4")
    assert checked.returncode == 0
    for host in HOSTS:
        assert '"msg": "would upgrade the program (generation 1 serves now)' in _task_output(
            checked.stdout, host
        ), host
        assert fleet.generation(host) == 1
        assert fleet.config(host).read_text() == configs[host]
        assert not (fleet.root(host) / "opt" / "app" / "releases" / "2").exists()

    # a good release rolls through every host, one at a time, under load, failing no request
    fleet.start_load()
    # (the gate checks each batch only here; the broken run below checks every host done so far)
    good = fleet.play("rollout.yml", fleet.inventory("2"), "-e", "handoffd_health_scope=batch")
    reports = fleet.stop_load()
    assert good.returncode == 0
    assert_no_failed_requests(reports)
    for host in HOSTS:
        assert fleet.generation(host) == 2, host
        assert request_once(fleet.daemons[host].address()).generation == 2
        assert 2 in reports[host].by_generation, reports[host].describe()
        assert "releases/2/worker.py" in fleet.config(host).read_text()
        assert (fleet.root(host) / "etc" / "systemd" / "system" / "handoffd.service").exists()
    unit = (fleet.root("web1") / "etc" / "systemd" / "system" / "handoffd.service").read_text()
    assert f"ExecReload={HANDOFFD} upgrade --config {fleet.config('web1')}\n" in unit

    # release 3 is broken on the third host: the play stops there
    web4_before = fleet.daemons["web4"].worker_pids()
    web4_config = fleet.config("web4").read_text()
    broken = {"web3": {"handoffd_program_src": str(fleet.releases / "broken")}}
    fleet.start_load()
    failed = fleet.play("rollout.yml", fleet.inventory("3", broken))
    reports = fleet.stop_load()
    assert failed.returncode == 2, "the play's exit code must say a host failed"
    assert_no_failed_requests(reports)
    assert [fleet.generation(host) for host in HOSTS[:2]] == [3, 3]
    # the third host tried generation 3 and still serves generation 2
    status = fleet.daemons["web3"].status()
    assert status["generation"] == 2
    assert status["last_upgrade"]["outcome"] == "failed"
    assert request_once(fleet.daemons["web3"].address()).generation == 2
    assert set(reports["web3"].by_generation) == {2}, reports["web3"].describe()
    assert "the program upgrade failed" in failed.stdout
    assert "exited with status 1 before it was ready" in failed.stdout
    assert "generation 2 keeps serving" in failed.stdout
    # the fourth was not touched: same generation, same workers, same files
    assert fleet.generation("web4") == 2
    assert fleet.daemons["web4"].worker_pids() == web4_before
    assert fleet.config("web4").read_text() == web4_config
    assert not (fleet.root("web4") / "opt" / "app" / "releases" / "3").exists()
    assert "web4" not in failed.stdout

    # resume after the fix: only the hosts left, the url gate (any HTTP path answers 200 here)
    urls = {
        host: {"handoffd_health_url": "http://{}:{}/readyz".format(*fleet.daemons[host].address())}
        for host in HOSTS
    }
    resumed = fleet.play(
        "rollout.yml",
        fleet.inventory("3", urls),
        "--limit",
        "web3,web4",
        "-e",
        "handoffd_health_gate=url",
    )
    assert resumed.returncode == 0
    assert "web1" not in resumed.stdout
    assert [fleet.generation(host) for host in HOSTS] == [3, 3, 4, 3]  # web3's 3 was the failed one
    assert "releases/3/worker.py" in fleet.config("web4").read_text()
    assert "TASK [handoffd : Health gate (url) on the hosts done so far]" in resumed.stdout


def _task_output(stdout: str, host: str) -> str:
    """The lines of ``stdout`` about ``host`` (the default callback's ``ok: [host] => {...}``)."""
    lines = stdout.splitlines()
    found = []
    for i, line in enumerate(lines):
        if f"[{host}]" in line:
            found.append(line)
            found += lines[i + 1 : i + 4]
    return "\n".join(found)


@pytest.mark.slow
def test_self_upgrade_play_replaces_every_supervisor_and_stops_at_a_failed_one(
    fleet: Fleet,
) -> None:
    # On the third host the new handoffd answers as a client but cannot run as a supervisor.
    broken = fleet.base / "broken-handoffd"
    broken.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "if sys.argv[1:2] == ['run']:\n"
        "    sys.exit('handoffd: this build is broken on purpose')\n"
        "from handoff._cli import main\nsys.exit(main())\n"
    )
    broken.chmod(0o755)
    before = {host: fleet.daemons[host].status() for host in HOSTS}
    fleet.start_load()
    stopped = fleet.play(
        "self-upgrade.yml",
        fleet.inventory("1", {"web3": {"handoffd_bin": str(broken)}}),
        "-e",
        "handoffd_force_upgrade=true",
    )
    # web1 and web2 were replaced; web3 kept its supervisor; web4 was not touched. Outside
    # systemd a self-upgrade keeps the pid (it re-executes in place): the supervisor's own
    # record of its last upgrade says whether it was replaced.
    outcomes = [self_upgrade_outcome(fleet.daemons[h].status()) for h in HOSTS]
    assert outcomes == ["ok", "ok", "failed", None]
    good = fleet.play("self-upgrade.yml", fleet.inventory("1"), "-e", "handoffd_force_upgrade=true")
    reports = fleet.stop_load()
    assert_no_failed_requests(reports)

    assert stopped.returncode == 2
    assert "the handoffd supervisor upgrade failed" in stopped.stdout
    assert "web4" not in stopped.stdout
    assert good.returncode == 0
    assert good.stdout.count("upgraded the handoffd supervisor: generation 1 serves") == 4
    for host in HOSTS:
        after = fleet.daemons[host].status()
        assert after["pid"] == before[host]["pid"], host  # in place: whatever waits on it keeps it
        assert self_upgrade_outcome(after) == "ok", host
        assert after["generation"] == 1
        assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before[host]["workers"]]
