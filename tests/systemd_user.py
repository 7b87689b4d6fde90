"""A private, unprivileged ``systemd --user`` manager for tests, and the ``systemd_user`` fixture.

Drives ``tests/systemd_harness.sh`` (read its header for the safety model: the manager runs as the
``sdtest`` user in its own mount and cgroup namespace, sees only the units a test writes, and
``down`` kills everything it started). One fresh manager per test costs ~0.1 s up and ~0.1 s down.

Services run as ``sdtest``, which cannot read interpreters installed under ``/root``; they use
``SystemdUser.python`` (the venv ``scripts/setup-systemd-tests.sh`` creates, override with
``HANDOFF_TEST_PYTHON``) with ``PYTHONPATH=SystemdUser.pythonpath``, a copy of the ``handoff``
package under test placed where ``sdtest`` can read it, whatever the checkout's location.

Example::

    def test_ready(systemd_user: SystemdUser) -> None:
        systemd_user.write_unit("demo.service", f'''
            [Service]
            Type=notify
            Environment=PYTHONPATH={systemd_user.pythonpath}
            ExecStart={systemd_user.require_python()} -c "import handoff; handoff.ready()"
            ''')
        systemd_user.ctl("start", "demo.service")   # Type=notify: returns once READY=1 arrived
        assert systemd_user.prop("demo.service", "ActiveState") == "active"

Waiting: ``systemctl start`` of a Type=notify unit already blocks until READY=1. For states that
systemctl cannot wait for, ``wait_prop`` polls the property with a deadline: systemd offers no
change notification without D-Bus, which this manager does not have.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO: Final = Path(__file__).resolve().parent.parent
HARNESS: Final = Path(__file__).resolve().parent / "systemd_harness.sh"
SYSTEMD: Final = Path(os.environ.get("SYSTEMD", "/usr/lib/systemd/systemd"))
SDH_USER: Final = os.environ.get("SDH_USER", "sdtest")
#: The interpreter the services run on (see the module docstring for why not sys.executable).
TEST_PYTHON: Final = Path(
    os.environ.get("HANDOFF_TEST_PYTHON", "/opt/handoffd-test-venv/bin/python")
)
#: Upper bound for one harness or systemctl call; a hung manager must fail the test, not CI.
CALL_TIMEOUT: Final = 30.0
SETUP_HINT: Final = "run scripts/setup-systemd-tests.sh as root"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that could be bound a moment ago, for tools that cannot bind 0.

    Picked below the ephemeral range (``ip_local_port_range``): on a busy box every ephemeral port
    can be the local end of some client's TIME_WAIT, and a TIME_WAIT left by a socket without
    SO_REUSEADDR blocks bind() even with SO_REUSEADDR, so "bind 0, close, reuse" fails there.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no bindable port found in 10000..{low}")


def cgroup2_root() -> Path:
    """The cgroup v2 mount point; only valid when ``unavailable_reason()`` is None."""
    root = _find_cgroup2_root()
    assert root is not None
    return root


def _find_cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted: pure v2 hosts, or ``unified`` on hybrid ones (Debian 12 here)."""
    for path in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        # Only a v2 hierarchy has cgroup.subtree_control at its root.
        if (path / "cgroup.subtree_control").exists():
            return path
    return None


def unavailable_reason() -> str | None:
    """Why a manager cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (to create a delegated cgroup and a mount namespace)"
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} missing; {SETUP_HINT}"
    for tool in ("setpriv", "unshare", "timeout", "ps"):
        if shutil.which(tool) is None:
            return f"{tool} missing; {SETUP_HINT}"
    if _find_cgroup2_root() is None:
        return "no cgroup v2 hierarchy mounted (needed to delegate a cgroup to the manager)"
    try:
        pwd.getpwnam(SDH_USER)
    except KeyError:
        return f"no {SDH_USER!r} user; {SETUP_HINT}"
    return None


@final
class SystemdUser:
    """One running manager; ``down()`` (the fixture calls it) stops it and removes everything."""

    def __init__(self, name: str) -> None:
        self.name = name
        up = self._harness("up", check=False)
        if up.returncode != 0:
            raise RuntimeError(f"systemd_harness.sh up {name} failed:\n{up.stderr}")
        self.base = Path(up.stdout.strip())
        self.units = self.base / "units"
        #: A directory sdtest can write, also exported to services as $SDH_STATE.
        self.state = self.base / "state"
        self._pythonpath: Path | None = None

    def _harness(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HARNESS), args[0], self.name, *args[1:]],
            check=check,
            env=None if env is None else {**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT,
        )

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this manager, as its user; raises if check fails."""
        result = self._harness("ctl", *args, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"systemctl --user {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stderr}{result.stdout}\n--- manager log (tail) ---\n{self.log()[-4000:]}"
            )
        return result

    def as_user(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as the manager's user with its ``XDG_RUNTIME_DIR`` (for systemd-run etc.)."""
        return self._harness("as", *cmd, check=check)

    def prop(self, unit: str, name: str) -> str:
        """One property of ``unit`` as ``systemctl show -p NAME --value`` prints it."""
        return self.ctl("show", "-p", name, "--value", unit).stdout.strip()

    def props(self, unit: str, *names: str) -> dict[str, str]:
        """Several properties in one round trip."""
        out = self.ctl("show", *(f"--property={n}" for n in names), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_prop(self, unit: str, name: str, value: str, timeout: float = 5.0) -> None:
        """Poll until ``unit``'s ``name`` equals ``value``; AssertionError with the log if not."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.prop(unit, name)
            if current == value:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{unit} {name}={current!r}, expected {value!r} within {timeout} s\n"
                    f"--- manager log (tail) ---\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def write_unit(self, name: str, text: str, *, reload: bool = True) -> Path:
        """Write a unit file (dedented) readable by the manager, then ``daemon-reload``."""
        path = self.units / name
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
        if reload:
            self.ctl("daemon-reload")
        return path

    def install_shipped_unit(self, name: str, *, executable: Path, config: Path) -> Path:
        """Install ``deploy/NAME`` as shipped, with only its two paths substituted.

        The unit names ``/opt/handoffd/bin/handoffd`` (the venv the README installs) and
        ``/etc/handoffd/handoffd.toml`` (see its header); they become ``executable`` (a wrapper
        running the checkout under test on ``TEST_PYTHON``, the venv the services' user can read)
        and ``config``. A drop-in adapts the unit to a user manager without weakening the sandbox:
        ``PrivateUsers=yes`` (a user manager can apply ProtectSystem=, PrivateTmp=, capability
        drops... only inside a user namespace); ``BindPaths=`` for this manager's directory, which
        ``PrivateTmp=yes`` would hide; ``User=``/``Group=`` emptied, because a user manager runs
        every service as its own unprivileged user and cannot switch to ``handoffd`` (that user is
        what the unit's ``User=handoffd`` stands for). (``LimitNOFILE=``'s hard limit, above
        this manager's, is clamped to it by systemd.)
        """
        text = (REPO / "deploy" / name).read_text()
        for shipped, ours in (
            ("/opt/handoffd/bin/handoffd", str(executable)),
            ("/etc/handoffd/handoffd.toml", str(config)),
        ):
            assert shipped in text, f"deploy/{name} no longer names {shipped}"
            text = text.replace(shipped, ours)
        dropin = self.units / f"{name}.d"
        dropin.mkdir()
        dropin.chmod(0o755)
        (dropin / "user-manager.conf").write_text(
            f"[Service]\nPrivateUsers=yes\nBindPaths={self.base}\nUser=\nGroup=\n"
        )
        (dropin / "user-manager.conf").chmod(0o644)
        return self.write_unit(name, text)

    def install_shipped_socket(self, name: str, *, listen: str) -> Path:
        """Install ``deploy/NAME`` (a .socket unit) as shipped, listening on ``listen`` instead of
        the address on its one ``ListenStream=`` line."""
        lines = (REPO / "deploy" / name).read_text().splitlines(keepends=True)
        shipped = [i for i, line in enumerate(lines) if line.startswith("ListenStream=")]
        assert len(shipped) == 1, f"deploy/{name} no longer has one ListenStream= line"
        lines[shipped[0]] = f"ListenStream={listen}\n"
        return self.write_unit(name, "".join(lines))

    def require_python(self) -> Path:
        """The interpreter for services; skips the test when it is not set up for sdtest."""
        probe = self.as_user(
            str(TEST_PYTHON), "-c", "import trio, structlog, pydantic", check=False
        )
        if probe.returncode != 0:
            pytest.skip(
                f"{TEST_PYTHON} cannot import handoffd's dependencies as {SDH_USER}; {SETUP_HINT}"
            )
        return TEST_PYTHON

    @property
    def pythonpath(self) -> Path:
        """A copy of the ``handoff`` package under test, readable by the services' user."""
        if self._pythonpath is None:
            target = self.base / "src"
            shutil.copytree(
                REPO / "handoff",
                target / "handoff",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            for path in (target, *target.rglob("*")):
                path.chmod(0o755 if path.is_dir() else 0o644)
            self._pythonpath = target
        return self._pythonpath

    def log(self) -> str:
        """The manager's log, which also holds every service's stdout and stderr."""
        try:
            return (self.base / "manager.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def down(self, grace: int | None = None) -> None:
        """Stop every unit gracefully, cgroup.kill what is left after ``grace`` s (default 3),
        stop the manager and remove its files."""
        self._harness("down", env=None if grace is None else {"SDH_DOWN_GRACE": str(grace)})


@pytest.fixture
def systemd_user(request: pytest.FixtureRequest) -> Iterator[SystemdUser]:
    """A fresh manager for one test; skips with the reason where the harness cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"systemd --user harness unavailable: {reason}")
    manager = SystemdUser(f"pytest-{uuid.uuid4().hex[:10]}")
    try:
        yield manager
    finally:
        # Shown by pytest only when the test fails: the manager log explains most failures.
        request.node.add_report_section("teardown", "systemd manager log", manager.log()[-20000:])
        manager.down()
