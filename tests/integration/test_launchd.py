"""handoff._launchd against a C stand-in for launch_activate_socket(3) (tests/launchd_stub/).

The stand-in is compiled with the system C compiler into a temp dir and loaded with ctypes, the way
libSystem is on macOS. It binds real listening sockets, so these tests check what the binding hands
back (real fds, bound where the stand-in says, owned by the caller), and its ``stub_free`` checks
that the binding frees exactly the array it was given, once.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import plistlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bench.strict_client import LoadClient
from handoff._config import LoadedConfig, load_config
from handoff._errors import ListenerError
from handoff._held import open_listeners
from handoff._launchd import LaunchdLibrary, activate_socket, launchd_sockets, load_libsystem
from handoff._platform import pidfd_problem

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.daemon import Daemon

STUB_SOURCE = Path(__file__).resolve().parent.parent / "launchd_stub" / "launch_stub.c"


@pytest.fixture(scope="module")
def stub_cdll(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip(
            "no C compiler (cc) to build the launchd stand-in; run scripts/setup-systemd-tests.sh"
        )
    out = tmp_path_factory.mktemp("launchd_stub") / "liblaunch_stub.so"
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(STUB_SOURCE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.stub_declare.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.stub_port.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.stub_set_managed.argtypes = [ctypes.c_int]
    return lib


@pytest.fixture
def stub(stub_cdll: ctypes.CDLL) -> Iterator[ctypes.CDLL]:
    """The stand-in, reset; after the test no array may be outstanding or freed wrongly."""
    stub_cdll.stub_reset()
    fds_before = set(os.listdir("/proc/self/fd"))
    yield stub_cdll
    assert stub_cdll.stub_outstanding() == 0, "an fd array was not freed"
    assert stub_cdll.stub_bad_frees() == 0, "free() got a pointer the library did not hand out"
    assert set(os.listdir("/proc/self/fd")) == fds_before, "fds leaked"


@pytest.fixture
def library(stub: ctypes.CDLL) -> LaunchdLibrary:
    return LaunchdLibrary.from_cdll(stub, free_symbol="stub_free")


def test_activate_socket_returns_owned_listening_sockets_bound_where_launchd_said(
    stub: ctypes.CDLL, library: LaunchdLibrary
) -> None:
    assert stub.stub_declare(b"http", 2) == 0

    fds = activate_socket("http", library=library)

    assert len(fds) == 2
    assert (stub.stub_frees(), stub.stub_outstanding()) == (1, 0)
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        for i, sock in enumerate(socks):
            assert sock.getsockname() == ("127.0.0.1", stub.stub_port(b"http", i))
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not os.get_inheritable(sock.fileno())
            with socket.create_connection(sock.getsockname(), timeout=5) as client:
                conn, _ = sock.accept()
                with conn:
                    conn.sendall(b"served")
                    assert client.recv(16) == b"served"
    finally:
        for sock in socks:
            sock.close()


def test_activate_socket_with_zero_sockets_returns_empty_and_still_frees(
    stub: ctypes.CDLL, library: LaunchdLibrary
) -> None:
    assert stub.stub_declare(b"none", 0) == 0

    assert activate_socket("none", library=library) == []
    # malloc(0) returned something (glibc does): it is the caller's to free all the same.
    assert stub.stub_frees() == 1


@pytest.mark.parametrize(
    ("setup", "code", "hint"),
    [
        ("undeclared", errno.ENOENT, "no Sockets entry with this name"),
        ("unmanaged", errno.ESRCH, "not started by launchd"),
        ("twice", errno.EALREADY, "already activated"),
    ],
)
def test_activate_socket_failure_names_the_socket_the_errno_and_the_fix(
    stub: ctypes.CDLL, library: LaunchdLibrary, setup: str, code: int, hint: str
) -> None:
    kept: list[int] = []
    if setup == "unmanaged":
        stub.stub_declare(b"http", 1)
        stub.stub_set_managed(0)
    elif setup == "twice":
        stub.stub_declare(b"http", 1)
        kept = activate_socket("http", library=library)

    try:
        with pytest.raises(ListenerError) as info:
            activate_socket("http", library=library)
    finally:
        for fd in kept:
            os.close(fd)

    message = str(info.value)
    assert message.startswith("launchd socket 'http': ")
    assert errno.errorcode[code] in message
    assert hint in message
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == code
    # The failed call allocated nothing, so the only free is the first activation's.
    assert stub.stub_frees() == (1 if setup == "twice" else 0)


@pytest.mark.skipif(sys.platform == "darwin", reason="libSystem exists on macOS")
def test_default_library_outside_macos_says_launchd_is_macos_only() -> None:
    with pytest.raises(ListenerError, match="launchd socket activation is macOS only"):
        activate_socket("http")
    with pytest.raises(ListenerError, match=r"under systemd use a \.socket unit"):
        load_libsystem()


def test_shipped_plist_declares_a_socket_named_like_the_shipped_socket_units_listener() -> None:
    deploy = Path(__file__).resolve().parent.parent.parent / "deploy"
    with (deploy / "com.handoffd.plist").open("rb") as f:
        plist = plistlib.load(f)
    socket_unit = (deploy / "handoffd.socket").read_text().splitlines()

    assert plist["ProgramArguments"][:2] == ["/usr/local/bin/handoffd", "run"]
    assert list(plist["Sockets"]) == ["http"]
    assert "FileDescriptorName=http" in socket_unit


def _two_listener_config(tmp_path: Path) -> LoadedConfig:
    path = tmp_path / "handoffd.toml"
    path.write_text(
        '[[listener]]\nname = "http"\naddress = "127.0.0.1:0"\n'
        '[[listener]]\nname = "admin"\naddress = "127.0.0.1:0"\n'
        '[program]\ncommand = ["true"]\n'
    )
    return load_config(path)


def test_supervisor_takes_launchd_sockets_by_listener_name_and_binds_the_rest(
    stub: ctypes.CDLL, library: LaunchdLibrary, tmp_path: Path
) -> None:
    assert stub.stub_declare(b"http", 1) == 0  # the plist declares "http" only
    listeners = open_listeners(_two_listener_config(tmp_path), {}, launchd=library)
    try:
        assert listeners["http"].origin == "inherited"
        assert listeners["http"].sock.getsockname() == ("127.0.0.1", stub.stub_port(b"http", 0))
        assert listeners["admin"].origin == "bound"
    finally:
        for li in listeners.values():
            li.close()


def test_supervisor_not_started_by_launchd_binds_everything(
    stub: ctypes.CDLL, library: LaunchdLibrary, tmp_path: Path
) -> None:
    assert stub.stub_declare(b"http", 1) == 0
    stub.stub_set_managed(0)  # launch_activate_socket answers ESRCH
    listeners = open_listeners(_two_listener_config(tmp_path), {}, launchd=library)
    try:
        assert {li.origin for li in listeners.values()} == {"bound"}
    finally:
        for li in listeners.values():
            li.close()


def test_launchd_is_not_asked_off_macos_without_a_library() -> None:
    assert launchd_sockets(["http"]) is None


def test_worker_library_takes_a_launchd_socket_by_name(stub_cdll: ctypes.CDLL) -> None:
    """A worker started by launchd (no LISTEN_FDS): one_listener("http") asks launchd for it."""
    code = f"""
import ctypes, json
import handoff
from handoff._launchd import LaunchdLibrary
lib = ctypes.CDLL({stub_cdll._name!r})
lib.stub_declare.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.stub_port.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.stub_declare(b"http", 1)
launchd = LaunchdLibrary.from_cdll(lib, free_symbol="stub_free")
sock = handoff.one_listener("http", launchd=launchd)
again = handoff.one_listener("http", launchd=launchd)  # cached: launchd hands a name out once
print(json.dumps([sock.getsockname()[1], lib.stub_port(b"http", 0), sock is again, lib.stub_outstanding()]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "HANDOFF_"))}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=Path(__file__).resolve().parent.parent.parent,
    )
    port, declared, same, outstanding = json.loads(out.stdout)
    assert port == declared
    assert same is True
    assert outstanding == 0


# ---- handoffd started "by launchd": the stand-in as libSystem, a real daemon, real load ----

RUN_UNDER_STUB = Path(__file__).resolve().parent.parent / "launchd_stub" / "run_handoffd.py"


def _launchd_daemon(
    run_daemon: Callable[..., Daemon], stub_cdll: ctypes.CDLL, platform: str
) -> Daemon:
    daemon = run_daemon(
        env={"HANDOFF_PLATFORM": platform},
        wrap=[sys.executable, str(RUN_UNDER_STUB), stub_cdll._name, "http"],
        processes=2,
    )
    inherited = daemon.wait_event("launchd.sockets_inherited")
    assert inherited["names"] == ["http"]
    (http,) = daemon.status()["listeners"]
    assert (http["name"], http["origin"]) == ("http", "inherited")
    return daemon


def test_launchd_started_daemon_on_the_portable_watcher_serves_and_upgrades_under_load(
    run_daemon: Callable[..., Daemon], stub_cdll: ctypes.CDLL
) -> None:
    daemon = _launchd_daemon(run_daemon, stub_cdll, "portable")
    assert any(d.startswith("process watcher") for d in daemon.status()["degraded"])
    client = LoadClient(daemon.address(), keepalive=4, fresh=2, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(50, timeout=30)
        for upgrade in range(3):
            code, reply = daemon.upgrade()
            assert code == 0, reply
            assert reply["generation"] == upgrade + 2
            seen = client.snapshot().total
            assert client.wait_for_responses(seen + 20, timeout=30), "load stalled after upgrade"
        # The self-upgrade is refused on this watcher, with the documented sentence; serving goes on.
        code, reply = daemon.upgrade("--self")
        assert code == 1, reply
        assert "self-upgrade is not available with the waitid process watcher" in reply["reason"]
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30)
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    assert {1, 2, 3, 4} <= set(report.by_generation), report.by_generation


@pytest.mark.skipif(pidfd_problem() is not None, reason=f"{pidfd_problem()}")
def test_launchd_started_daemon_self_upgrades_under_load_keeping_the_launchd_socket(
    run_daemon: Callable[..., Daemon], stub_cdll: ctypes.CDLL
) -> None:
    """The successor never asks launchd: the socket launchd bound travels in the handover.

    launchd, like any manager but systemd, follows the pid it started: outside systemd the
    self-upgrade re-executes in place, so the pid stays the one launchd watches.
    """
    daemon = _launchd_daemon(run_daemon, stub_cdll, "")
    address = daemon.address()
    workers = daemon.worker_pids()
    client = LoadClient(address, keepalive=4, fresh=2, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(50, timeout=30)
        code, reply = daemon.self_upgrade()
        assert code == 0, reply
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30), "load stalled after handover"
        code, reply = daemon.upgrade()
        assert code == 0, reply
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30), "load stalled after upgrade"
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    assert daemon.pid == daemon.proc.pid
    (http,) = daemon.status()["listeners"]
    assert http["origin"] == "handed-over"
    assert daemon.address() == address
    assert not set(workers) & set(daemon.worker_pids()), "the upgrade replaced the workers"


# launchd.plist(5): every top-level key it defines, with the type each must have.
LAUNCHD_KEYS: dict[str, type | tuple[type, ...]] = {
    "Label": str,
    "Disabled": bool,
    "UserName": str,
    "GroupName": str,
    "inetdCompatibility": dict,
    "LimitLoadToHosts": list,
    "LimitLoadFromHosts": list,
    "LimitLoadToSessionType": (str, list),
    "LimitLoadToHardware": dict,
    "LimitLoadFromHardware": dict,
    "Program": str,
    "ProgramArguments": list,
    "EnableGlobbing": bool,
    "EnableTransactions": bool,
    "EnablePressuredExit": bool,
    "OnDemand": bool,
    "ServiceIPC": bool,
    "KeepAlive": (bool, dict),
    "RunAtLoad": bool,
    "RootDirectory": str,
    "WorkingDirectory": str,
    "EnvironmentVariables": dict,
    "Umask": (int, str),
    "TimeOut": int,
    "ExitTimeOut": int,
    "ThrottleInterval": int,
    "InitGroups": bool,
    "WatchPaths": list,
    "QueueDirectories": list,
    "StartOnMount": bool,
    "StartInterval": int,
    "StartCalendarInterval": (dict, list),
    "StandardInPath": str,
    "StandardOutPath": str,
    "StandardErrorPath": str,
    "Debug": bool,
    "WaitForDebugger": bool,
    "SoftResourceLimits": dict,
    "HardResourceLimits": dict,
    "Nice": int,
    "ProcessType": str,
    "AbandonProcessGroup": bool,
    "LowPriorityIO": bool,
    "LowPriorityBackgroundIO": bool,
    "MaterializeDatalessFiles": bool,
    "LaunchOnlyOnce": bool,
    "MachServices": dict,
    "Sockets": dict,
    "LaunchEvents": dict,
    "SessionCreate": bool,
    "LegacyTimers": bool,
    "AssociatedBundleIdentifiers": (str, list),
}
# launchd.plist(5), Sockets: the keys of one socket's dictionary.
SOCKET_KEYS: dict[str, type | tuple[type, ...]] = {
    "SockType": str,
    "SockPassive": bool,
    "SockNodeName": str,
    "SockServiceName": (str, int),
    "SockFamily": str,
    "SockProtocol": str,
    "SockPathName": str,
    "SecureSocketWithKey": str,
    "SockPathOwner": int,
    "SockPathGroup": int,
    "SockPathMode": int,
    "Bonjour": (bool, str, list),
    "MulticastGroup": str,
}
# launchd.plist(5), KeepAlive as a dictionary.
KEEPALIVE_KEYS = {
    "SuccessfulExit",
    "NetworkState",
    "PathState",
    "OtherJobEnabled",
    "Crashed",
    "AfterInitialDemand",
}


def _check_keys(
    where: str, found: dict[str, object], allowed: dict[str, type | tuple[type, ...]]
) -> list[str]:
    problems = [
        f"{where}: {key!r} is not a key launchd.plist(5) defines"
        for key in found
        if key not in allowed
    ]
    problems += [
        f"{where}.{key}: {type(value).__name__}, launchd wants {allowed[key]}"
        for key, value in found.items()
        if key in allowed and not isinstance(value, allowed[key])
    ]
    return problems


def test_shipped_plist_uses_only_keys_launchd_defines_with_their_types() -> None:
    deploy = Path(__file__).resolve().parent.parent.parent / "deploy"
    with (deploy / "com.handoffd.plist").open("rb") as f:
        plist = plistlib.load(f)

    problems = _check_keys("plist", plist, LAUNCHD_KEYS)
    for name, entry in plist.get("Sockets", {}).items():
        for each in entry if isinstance(entry, list) else [entry]:  # one dict, or an array of them
            problems += _check_keys(f"Sockets.{name}", each, SOCKET_KEYS)
            assert each.get("SockType", "stream") in ("stream", "dgram", "seqpacket")
            assert each.get("SockFamily", "IPv4") in ("IPv4", "IPv6", "IPv4v6", "Unix")
    if isinstance(plist.get("KeepAlive"), dict):
        problems += [
            f"KeepAlive: {k!r} is not defined"
            for k in plist["KeepAlive"]
            if k not in KEEPALIVE_KEYS
        ]
    assert not problems, problems
    assert all(isinstance(arg, str) for arg in plist["ProgramArguments"])
    # Workers inherit handoffd's stdout/stderr: they must go somewhere one can read.
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith("/usr/local/var/log/handoffd/"), plist[key]


def test_plist_check_fails_on_a_key_launchd_does_not_define() -> None:
    """The check above can fail: a typo'd key (launchd ignores it silently) is reported."""
    assert _check_keys("plist", {"Label": "x", "StandardErrPath": "/tmp/e"}, LAUNCHD_KEYS) == [
        "plist: 'StandardErrPath' is not a key launchd.plist(5) defines"
    ]
    assert _check_keys("Sockets.http", {"SockServiceName": 8080.5}, SOCKET_KEYS) == [
        "Sockets.http.SockServiceName: float, launchd wants (<class 'str'>, <class 'int'>)"
    ]
