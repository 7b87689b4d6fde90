"""The worker library against systemd's own tools, without a manager and without the supervisor.

- ``systemd-socket-activate`` (systemd's reference for LISTEN_FDS) starts a child that reads its
  sockets with ``handoff._systemd.parse_listen_fds`` and ``handoff.listeners()`` and serves on them.
- ``systemd-notify`` (systemd's reference sd_notify client) sends to a ``NOTIFY_SOCKET`` the test
  owns, checking that ``handoff._notify``'s receiver parses it, and that ``handoff.ready()`` sends
  the same datagram, to path and abstract (``@``) addresses alike.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from handoff._notify import NotifyReceiver, parse_notify
from handoff._sdnotify import notify

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parent.parent.parent
#: Safety net only: every wait below ends on a datagram, a connection or a process exit.
DEADLINE = 15.0


pytestmark = [
    pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} missing (Debian package systemd; run scripts/setup-systemd-tests.sh)",
    )
    for tool in ("systemd-socket-activate", "systemd-notify")
]


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    fds_before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) == fds_before, "fds leaked"
    assert _children() == set(), "child processes left behind"


def _free_port() -> int:
    # systemd-socket-activate cannot bind port 0, so pick a port that was free a moment ago;
    # the caller retries if another process takes it in between.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_listening(process: trio.Process) -> bool:
    """Read systemd-socket-activate's stderr until it says it listens; False if it exits first."""
    assert process.stderr is not None
    seen = b""
    while b"Listening on " not in seen:
        chunk = await process.stderr.receive_some()
        if not chunk:
            return False
        seen += chunk
    return True


LISTEN_CHILD = """
import json, os, handoff
from handoff._listen_fds import parse_listen_fds

names = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")
parsed = [[item.fd, item.name] for item in parse_listen_fds(os.environ, os.getpid())]
seen = {k: os.environ.get(k) for k in names}
found = handoff.listeners()
left = [k for k in names if k in os.environ]
sock = found["http"][0]
handoff.ready(status=json.dumps({
    "pid": os.getpid(), "parsed": parsed, "seen": seen, "left": left,
    "names": sorted(found), "sockname": list(sock.getsockname()),
    "inheritable": os.get_inheritable(sock.fileno()),
}))
conn, _ = sock.accept()
conn.sendall(f"served by {os.getpid()}".encode())
conn.close()
"""


async def test_listeners_in_a_child_of_systemd_socket_activate_serve_on_the_inherited_socket(
    tmp_path: Path,
) -> None:
    receiver = NotifyReceiver.bind(str(tmp_path / "notify"))
    try:
        with trio.fail_after(DEADLINE):
            for _attempt in range(3):
                port = _free_port()
                process = await trio.lowlevel.open_process(
                    [
                        "systemd-socket-activate",
                        f"--listen=127.0.0.1:{port}",
                        "--fdname=http",
                        # it passes on only TERM, PATH, USER, HOME and what --setenv names
                        f"--setenv=PYTHONPATH={REPO}",
                        f"--setenv=NOTIFY_SOCKET={receiver.path}",
                        sys.executable,
                        "-c",
                        LISTEN_CHILD,
                    ],
                    stderr=subprocess.PIPE,
                )
                try:
                    if not await _wait_listening(process):
                        continue  # most likely the port was taken in between: try another
                    # Without --accept it starts the command on the first connection, which
                    # waits in the listening socket's queue until the child accepts it.
                    client = await trio.open_tcp_stream("127.0.0.1", port)
                    async with client:
                        message = await receiver.receive()
                        reply = await client.receive_some(64)
                    assert await process.wait() == 0
                    break
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        if process.returncode is None:
                            process.kill()
                        await process.wait()
                        assert process.stderr is not None
                        await process.stderr.aclose()
            else:
                pytest.fail("systemd-socket-activate could not listen three times")
    finally:
        receiver.close()

    # systemd-socket-activate execs the command in its own process: LISTEN_PID is that pid.
    assert json.loads(message.status or "") == {
        "pid": process.pid,
        "parsed": [[3, "http"]],
        "seen": {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "LISTEN_PID": str(process.pid)},
        "left": [],
        "names": ["http"],
        "sockname": ["127.0.0.1", port],
        "inheritable": False,
    }
    assert message.ready
    assert reply == f"served by {process.pid}".encode()


def _abstract_receiver() -> tuple[trio.socket.SocketType, str]:
    name = f"handoff-test-{uuid.uuid4().hex}"
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    raw.bind(b"\0" + name.encode())
    return trio.socket.from_stdlib_socket(raw), "@" + name


async def _receive_raw(sock: trio.socket.SocketType) -> bytes:
    with trio.fail_after(DEADLINE):
        data: bytes = await sock.recv(65536)
        return data


async def test_systemd_notify_ready_from_a_shell_counts_once_its_barrier_fd_is_closed(
    tmp_path: Path,
) -> None:
    """What a worker's receiver must do for a plain ``systemd-notify --ready`` (systemd 252).

    After its message, systemd-notify sends ``BARRIER=1`` with the write end of a pipe and waits
    (5 s) for the receiver to close it (sd_notify_barrier(3)); if nobody does, it exits 1 with
    "Failed to invoke barrier". So the receiver must close every fd it does not keep.
    """
    receiver = NotifyReceiver.bind(str(tmp_path / "notify"))
    try:
        with trio.fail_after(DEADLINE):
            process = await trio.lowlevel.open_process(
                ["sh", "-c", "systemd-notify --ready --status='up from shell'"],
                env={**os.environ, "NOTIFY_SOCKET": receiver.path},
            )
            try:
                first = await receiver.receive()
                barrier = await receiver.receive()
                barrier_fd_kinds = [stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in barrier.fds]
                for fd in barrier.fds:
                    os.close(fd)  # what releases systemd-notify
                returncode = await process.wait()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
    finally:
        receiver.close()

    assert (dict(first.fields), first.fds) == ({"READY": "1", "STATUS": "up from shell"}, ())
    assert dict(barrier.fields) == {"BARRIER": "1"}
    assert barrier_fd_kinds == [True]
    assert returncode == 0
    assert first.sender_pid is not None
    assert first.sender_pid > 0


async def test_systemd_notify_no_block_from_a_shell_that_already_exited_is_received(
    tmp_path: Path,
) -> None:
    receiver = NotifyReceiver.bind(str(tmp_path / "notify"))
    try:
        # The shell and systemd-notify are gone before the test reads: the datagram waits in the
        # socket, so a per-worker notify socket attributes it whatever pid sent it.
        await trio.run_process(
            ["sh", "-c", "systemd-notify --no-block --ready --status='up from shell'"],
            env={**os.environ, "NOTIFY_SOCKET": receiver.path},
        )
        with trio.fail_after(DEADLINE):
            message = await receiver.receive()
    finally:
        receiver.close()

    assert dict(message.fields) == {"READY": "1", "STATUS": "up from shell"}
    assert (message.ready, message.status, message.fds) == (True, "up from shell", ())


CHILD_READY = "import handoff; assert handoff.ready(status='up from shell')"


@pytest.mark.parametrize("address", ["path", "abstract"])
async def test_handoff_ready_sends_the_datagram_systemd_notify_sends(
    tmp_path: Path, address: str
) -> None:
    if address == "abstract":
        sock, target = _abstract_receiver()
    else:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        raw.bind(str(tmp_path / "notify"))
        sock, target = trio.socket.from_stdlib_socket(raw), str(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": target, "PYTHONPATH": str(REPO)}
    try:
        await trio.run_process(
            ["systemd-notify", "--no-block", "--ready", "--status=up from shell"], env=env
        )
        reference = await _receive_raw(sock)
        await trio.run_process([sys.executable, "-c", CHILD_READY], env=env)
        ours = await _receive_raw(sock)
    finally:
        sock.close()

    assert parse_notify(ours).fields == parse_notify(reference).fields
    assert parse_notify(ours).fields == {"READY": "1", "STATUS": "up from shell"}
    assert ours == b"READY=1\nSTATUS=up from shell"


async def test_notify_fdstore_attaches_the_same_open_socket_and_exact_keys(tmp_path: Path) -> None:
    receiver = NotifyReceiver.bind(str(tmp_path / "notify"))
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sent = notify(
            "FDSTORE=1\nFDNAME=http",
            [listener.fileno()],
            environ={"NOTIFY_SOCKET": receiver.path},
        )
        with trio.fail_after(DEADLINE):
            message = await receiver.receive()
        try:
            assert sent
            assert dict(message.fields) == {"FDSTORE": "1", "FDNAME": "http"}
            assert (message.fdstore, message.fdname) == (True, "http")
            assert len(message.fds) == 1
            # The same open socket, not a copy: same inode.
            assert os.fstat(message.fds[0]).st_ino == os.fstat(listener.fileno()).st_ino
            assert not os.get_inheritable(message.fds[0])  # received with MSG_CMSG_CLOEXEC
        finally:
            for fd in message.fds:
                os.close(fd)
    finally:
        listener.close()
        receiver.close()
