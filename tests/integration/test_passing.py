"""Put/Get between real processes: 10,000 fds there and back, truncation and hang-ups."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import trio

from handoff import ProtocolError, get, get_blocking, put, put_blocking

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def identity(fd: int) -> tuple[int, int]:
    """Which pipe end this is: the pipe's inode and its access mode (read or write end)."""
    return os.fstat(fd).st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def child(
    code: str, channel: socket.socket, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A Python child with the channel as fd CHANNEL_FD in its environment."""
    env = {**os.environ, "PYTHONPATH": ROOT, "CHANNEL_FD": str(channel.fileno())}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        pass_fds=[channel.fileno()],
        env={**env, **(env_extra or {})},
        stdout=subprocess.PIPE,
    )


@pytest.fixture
def many_fds_allowed() -> Iterator[None]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (children inherit it), then restore."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 10_500 and hard != resource.RLIM_INFINITY:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low for 10,000 fds; raise it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


ECHO_BACK = """
    import os, socket, json
    from handoff import get_blocking, put_blocking
    channel = socket.socket(fileno=int(os.environ["CHANNEL_FD"]))
    received = get_blocking(channel, timeout=60)
    with open(os.environ["REPORT"], "w") as report:
        json.dump({
        "count": len(received.fds),
        "payload": received.payload,
        "cloexec": all(not os.get_inheritable(fd) for _, fd in list(received.fds)[:50]),
        "inodes": [os.fstat(fd).st_ino for _, fd in received.fds],
    }, report)
    put_blocking(channel, received.fds, {"back": True})
    received.close()
"""


async def test_10000_fds_go_to_a_child_and_come_back_intact(
    many_fds_allowed: None, tmp_path: Path
) -> None:
    fds_before = open_fds()
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sent: list[tuple[str, int]] = []
    for i in range(5_000):
        r, w = os.pipe()
        sent += [(f"r{i}", r), (f"w{i}", w)]
    expected = {name: identity(fd) for name, fd in sent}
    report_path = tmp_path / "report.json"
    with child_end:
        proc = child(ECHO_BACK, child_end, env_extra={"REPORT": str(report_path)})
    channel = trio.socket.from_stdlib_socket(parent)
    with trio.fail_after(60):
        await put(channel, sent, {"listeners": 10_000, "generation": 5})
    # The child now holds its own copies; close ours so that the set coming back fits the limit.
    for _, fd in sent:
        os.close(fd)
    with trio.fail_after(60):
        back = await get(channel)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait() == 0
    report = json.loads(report_path.read_text())
    assert report["count"] == 10_000
    assert report["payload"] == {"listeners": 10_000, "generation": 5}
    assert report["cloexec"]
    assert report["inodes"] == [ino for ino, _ in expected.values()]
    assert back.payload == {"back": True}
    assert [name for name, _ in back.fds] == list(expected)
    assert {name: identity(fd) for name, fd in back.fds} == expected
    # Same open file descriptions, not lookalikes: bytes written into a returned write end come
    # out of the returned read end of the same pipe.
    by_name = dict(back.fds)
    os.write(by_name["w4321"], b"ping")
    assert os.read(by_name["r4321"], 4) == b"ping"
    back.close()
    channel.close()
    assert open_fds() == fds_before


TRUNCATED = """
    import os, resource, socket, json
    from handoff import ProtocolError, get_blocking
    channel = socket.socket(fileno=int(os.environ["CHANNEL_FD"]))
    before = sorted(os.listdir("/proc/self/fd"))
    # Room for a few fds only: the kernel installs what fits and truncates the rest (MSG_CTRUNC).
    highest = max(int(fd) for fd in before)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + 20, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        get_blocking(channel, timeout=30)
        error = None
    except ProtocolError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "before": before, "after": sorted(os.listdir("/proc/self/fd"))}))
"""


def test_truncation_by_a_low_fd_limit_raises_and_leaks_nothing() -> None:
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with child_end:
        proc = child(TRUNCATED, child_end)
    with parent:
        put_blocking(parent, [(f"fd{i}", r if i % 2 else w) for i in range(300)])
        out, _ = proc.communicate(timeout=60)
    os.close(r)
    os.close(w)
    report = json.loads(out)
    assert report["error"] is not None
    assert "MSG_CTRUNC" in report["error"]
    assert "RLIMIT_NOFILE" in report["error"]
    assert report["after"] == report["before"], "the fds that did fit must be closed too"


HANG_UP = """
    import os, socket, json, array
    channel = socket.socket(fileno=int(os.environ["CHANNEL_FD"]))
    r, w = os.pipe()
    names = [f"fd{i}" for i in range(253)]
    header = {"v": 1, "op": "put", "seq": 0, "names": names, "more": True}
    fds = array.array("i", [r, w] * 126 + [r]).tobytes()
    channel.sendmsg([json.dumps(header).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    # and exit without sending the rest of the set
"""


def test_a_sender_that_exits_mid_set_raises_and_leaks_nothing() -> None:
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with child_end:
        proc = child(HANG_UP, child_end)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    before = open_fds()
    with parent, pytest.raises(ProtocolError, match=r"hung up after 253 fd\(s\) in 1 message"):
        get_blocking(parent, timeout=30)
    assert open_fds() == before - 1


async def test_a_receiver_that_exits_makes_put_fail_clearly() -> None:
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with child_end:
        proc = child("pass", child_end)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    r, w = os.pipe()
    channel = trio.socket.from_stdlib_socket(parent)
    with channel, pytest.raises(ProtocolError, match="has probably exited"):
        await put(channel, [("r", r), ("w", w)] * 200)
    os.close(r)
    os.close(w)
