"""Observed readiness against real processes: each way of waiting on a listener, and prefork."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, TypeVar

import pytest

from handoff._observe import Readiness, check_readiness, listener_keys, walk_tree

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

T = TypeVar("T")

# Every child starts with this: the listener at fd {fd}, a pipe end {note} to say "about to
# block", and serve_one(), which answers one connection with the pid that accepted it.
PRELUDE = """
import os, select, selectors, signal, socket, sys, time
lsock = socket.socket(fileno={fd})
def note():
    os.write({note}, b"x")
def serve_one(sock=lsock):
    conn, _ = sock.accept()
    conn.sendall(str(os.getpid()).encode())
    conn.close()
"""


def wait_until(fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``fn`` every 10 ms until it returns something true (/proc has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last value {value!r}")
        time.sleep(0.01)
    return value


def blocked(pid: int) -> bool:
    """The process sleeps in the kernel (state S), so its syscall line is final."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


class Children:
    """Python children on a shared listener, killed by session at the end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.keys = listener_keys({"http": self.listener})
        self.listener_inode = os.fstat(self.listener.fileno()).st_ino
        self.note_r, self.note_w = os.pipe()
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, body: str, *extra_fds: int) -> subprocess.Popen[bytes]:
        code = PRELUDE.format(fd=self.listener.fileno(), note=self.note_w) + body
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(self.listener.fileno(), self.note_w, *extra_fds),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def wait_noted(self, count: int = 1) -> None:
        for _ in range(count):
            assert os.read(self.note_r, 1) == b"x"

    def check(self, pid: int) -> Readiness:
        return check_readiness([pid], self.keys)

    def ready(self, pid: int) -> Readiness | None:
        readiness = self.check(pid)
        return readiness if readiness.ready else None

    def accepted_by(self) -> int:
        with socket.create_connection(self.listener.getsockname(), timeout=10) as conn:
            return int(conn.recv(64))

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.listener.close()
        os.close(self.note_r)
        os.close(self.note_w)


def session_members(sids: set[int]) -> list[int]:
    """Live pids in any of the sessions ``sids`` (each child leads its own)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if int(fields[3]) in sids and fields[0] != "Z":
                members.append(int(entry))
    return members


@pytest.fixture
def children(no_fd_leak: None) -> Iterator[Children]:
    kids = Children()
    yield kids
    sessions = {p.pid for p in kids.procs}
    kids.close()
    # grandchildren (the forks, sleep) are orphans once killed: init reaps them soon after
    wait_until(lambda: not session_members(sessions))


def test_holding_the_listener_without_waiting_is_not_accepting(children: Children) -> None:
    paused = children.spawn("note(); signal.pause()")
    reading = children.spawn("r, w = os.pipe(); note(); os.read(r, 1)")
    children.wait_noted(2)
    for proc in (paused, reading):
        wait_until(lambda proc=proc: blocked(proc.pid))
        readiness = children.check(proc.pid)
        assert readiness.verdict == "not-accepting", readiness.reason
        assert "holding one: pid" in readiness.reason


@pytest.mark.parametrize(
    ("how", "body"),
    [
        ("accept", "serve_one()"),
        (
            "epoll",
            "sel = selectors.EpollSelector(); sel.register(lsock, selectors.EVENT_READ)\n"
            "sel.select(); serve_one()",
        ),
        ("select", "select.select([lsock], [], []); serve_one()"),
        ("poll", "p = select.poll(); p.register(lsock, select.POLLIN); p.poll(); serve_one()"),
    ],
)
def test_each_way_of_waiting_is_seen_and_that_process_accepts(
    children: Children, how: str, body: str
) -> None:
    proc = children.spawn(body)
    readiness = wait_until(lambda: children.ready(proc.pid))
    assert readiness.waiting == {children.listener_inode: frozenset({proc.pid})}
    assert str(proc.pid) in readiness.reason
    assert children.accepted_by() == proc.pid


def test_dup_at_another_fd_number_is_still_matched(children: Children) -> None:
    proc = children.spawn(
        "old = lsock.detach(); fd = os.dup2(old, 57); os.close(old)\n"
        "serve_one(socket.socket(fileno=fd))"
    )
    readiness = wait_until(lambda: children.ready(proc.pid))
    assert readiness.waiting == {children.listener_inode: frozenset({proc.pid})}
    assert not os.path.exists(f"/proc/{proc.pid}/fd/{children.listener.fileno()}")
    assert os.readlink(f"/proc/{proc.pid}/fd/57") == f"socket:[{children.listener_inode}]"
    assert children.accepted_by() == proc.pid


def test_prefork_parent_is_ready_only_once_both_children_accept(children: Children) -> None:
    go_r, go_w = os.pipe()
    try:
        parent = children.spawn(
            f"""
first = os.fork()
if first == 0:
    serve_one(); os._exit(0)
second = os.fork()
if second == 0:
    note(); os.read({go_r}, 1); serve_one(); os._exit(0)
os.waitpid(first, 0); os.waitpid(second, 0)
""",
            go_r,
        )
        children.wait_noted()
        tree = wait_until(lambda: len(walk_tree([parent.pid])) == 3 and walk_tree([parent.pid]))
        first, second = sorted(pid for pid in tree if pid != parent.pid)
        wait_until(lambda: children.check(parent.pid).waiting and blocked(second))
        readiness = children.check(parent.pid)
        assert readiness.verdict == "not-accepting", readiness.reason
        assert readiness.pending == {second}
        assert readiness.waiting == {children.listener_inode: frozenset({first})}
        os.write(go_w, b"x")
        readiness = wait_until(lambda: children.ready(parent.pid))
        assert readiness.waiting == {children.listener_inode: frozenset({first, second})}
        assert {children.accepted_by(), children.accepted_by()} == {first, second}
    finally:
        os.close(go_r)
        os.close(go_w)


def test_shell_helper_holding_the_listener_does_not_block_readiness(children: Children) -> None:
    fd = children.listener.fileno()
    shell = subprocess.Popen(
        [
            "sh",
            "-c",
            'sleep 300 & exec "$@"',
            "sh",
            sys.executable,
            "-c",
            PRELUDE.format(fd=fd, note=children.note_w) + "serve_one()",
        ],
        pass_fds=(fd, children.note_w),
        start_new_session=True,
    )
    children.procs.append(shell)
    readiness = wait_until(lambda: children.ready(shell.pid))
    tree = walk_tree([shell.pid])
    assert len(tree) == 2  # the server (the shell, exec'd) and sleep, which holds fd too
    (helper,) = (pid for pid in tree if pid != shell.pid)
    assert os.readlink(f"/proc/{helper}/exe").endswith("sleep")
    assert os.readlink(f"/proc/{helper}/fd/{fd}") == f"socket:[{children.listener_inode}]"
    assert readiness.waiting == {children.listener_inode: frozenset({shell.pid})}
    assert children.accepted_by() == shell.pid


def test_datagram_listener_counts_while_being_read(no_fd_leak: None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        keys = listener_keys({"dns": udp})
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import socket; socket.socket(fileno={udp.fileno()}).recv(9)"],
            pass_fds=(udp.fileno(),),
        )
        try:
            readiness = wait_until(lambda: check_readiness([proc.pid], keys).ready)
            assert readiness
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"q", udp.getsockname())
            assert proc.wait(timeout=10) == 0  # the datagram went to the process seen reading
        finally:
            proc.kill()
            proc.wait()


def test_exited_tree_is_not_accepting(children: Children) -> None:
    proc = children.spawn("pass")
    proc.wait()
    readiness = children.check(proc.pid)
    assert readiness.verdict == "not-accepting"
    assert readiness.reason == "no process of the tree is alive"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_observer_without_ptrace_access_reports_unobservable(children: Children) -> None:
    proc = children.spawn("serve_one()")
    wait_until(lambda: children.ready(proc.pid))
    key = next(iter(children.keys.values()))
    code = (
        "from handoff._observe import ListenerKey, check_readiness\n"
        f"key = ListenerKey('http', {key.inode}, {key.dev}, 'stream')\n"
        f"r = check_readiness([{proc.pid}], {{key.inode: key}})\n"
        "print(r.verdict, r.reason)"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        timeout=30,
    ).stdout
    assert out.startswith(
        f"unobservable readiness cannot be observed: cannot read /proc/{proc.pid}/fd"
    )
    assert "ptrace" in out


def test_a_busy_worker_holding_an_accepted_connection_counts_as_accepting(
    children: Children,
) -> None:
    """A sync worker under load goes from one connection to the next, never blocking in accept
    or select: holding the listener and a connection on its port shows it serves."""
    busy = children.spawn("conn, _ = lsock.accept(); note(); r, w = os.pipe(); os.read(r, 1)")
    with socket.create_connection(children.listener.getsockname(), timeout=10):
        children.wait_noted()
        wait_until(lambda: blocked(busy.pid))
        readiness = children.check(busy.pid)
        assert readiness.ready, readiness
        assert readiness.waiting == {children.listener_inode: frozenset({busy.pid})}
