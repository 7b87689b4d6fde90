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

from handoff._config import LoadedConfig, load_config
from handoff._errors import ListenerError
from handoff._held import open_listeners
from handoff._launchd import LaunchdLibrary, activate_socket, launchd_sockets, load_libsystem

if TYPE_CHECKING:
    from collections.abc import Iterator

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
