"""What a worker loads: the worker library in a fresh interpreter, on real sockets and fds.

``import handoff`` and every call a worker makes (``ready``, ``listeners``, ``park``, blocking
Put/Get) must load no module of handoffd's own dependencies: they cost each worker process
~150 ms and ~28 MiB (bench/RESULTS.md, "Worker import"). Each test runs its code with
``sys.executable -c`` and the child reports ``sys.modules`` after the calls.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("trio", "pydantic", "pydantic_core", "structlog")
# Printed last by every child: the heavy modules it loaded, [] when the wing holds.
REPORT_HEAVY = f"""
import sys
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_python(code: str, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> list[object]:
    """Run ``code`` in a fresh interpreter; each line it prints is JSON, returned in order."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + REPORT_HEAVY],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, **env},
        cwd=ROOT,  # `python -c` imports from the working directory first
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_ready_listeners_and_park_load_no_daemon_dependency(tmp_path: Path) -> None:
    before = open_fds()
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(60)  # a safety net: both datagrams are sent before the child exits
    http = socket.create_server(("127.0.0.1", 0))
    port = http.getsockname()[1]
    # The child puts the listener at fd 3 and names itself in LISTEN_PID, as systemd does
    # between fork and exec, before it imports handoff.
    code = f"""
        import json, os
        os.dup2({http.fileno()}, 3)
        os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="http", LISTEN_PID=str(os.getpid()))
        import handoff
        ready = handoff.ready("up")
        got = handoff.listeners()
        a, b = __import__("socket").socketpair()
        parked = handoff.park("client-1", a)
        print(json.dumps({{
            "ready": ready,
            "parked": parked,
            "listeners": {{n: [handoff.is_tcp_listener(s, "127.0.0.1:{port}") for s in socks]
                          for n, socks in got.items()}},
        }}))
    """
    with http:
        calls, heavy = run_python(code, {"NOTIFY_SOCKET": path}, pass_fds=(http.fileno(),))
    ready = receiver.recv(4096)
    data, ancdata, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(4))
    receiver.close()
    fds = array.array("i")
    for _, _, payload in ancdata:
        fds.frombytes(payload)
    for fd in fds:
        os.close(fd)
    assert calls == {"ready": True, "parked": True, "listeners": {"http": [True]}}
    assert ready == b"READY=1\nSTATUS=up"
    assert data == b"FDSTORE=1\nFDNAME=client-1"
    assert len(fds) == 1
    assert heavy == []
    assert open_fds() == before


def test_the_library_without_a_supervisor_loads_no_daemon_dependency() -> None:
    code = """
        import json, handoff
        print(json.dumps([handoff.ready(), handoff.listeners(), handoff.park("p", 0)]))
    """
    calls, heavy = run_python(code, {})
    assert calls == [False, {}, False]
    assert heavy == []


def test_blocking_put_and_get_load_no_daemon_dependency() -> None:
    # 300 fds: two chunks, one with the payload (the long way) and one in the canonical form.
    code = """
        import json, os, socket, handoff
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pipes = [os.pipe() for _ in range(150)]
        named = [(f"fd{i}", fd) for i, fd in enumerate(fd for pair in pipes for fd in pair)]
        handoff.put_blocking(a, named, {"listeners": 2})
        got = handoff.get_blocking(b, timeout=60)
        same = [os.fstat(x).st_ino for _, x in named] == [os.fstat(x).st_ino for x in got.fd_numbers]
        print(json.dumps([got.names == [n for n, _ in named], same, got.payload]))
    """
    calls, heavy = run_python(code, {})
    assert calls == [True, True, {"listeners": 2}]
    assert heavy == []


def test_async_put_and_get_are_still_exported_and_load_trio_when_used() -> None:
    code = """
        import json, handoff
        print(json.dumps([handoff.put.__module__, handoff.get.__module__]))
    """
    calls, heavy = run_python(code, {})
    assert calls == ["handoff._passing_trio", "handoff._passing_trio"]
    assert "trio" in heavy
