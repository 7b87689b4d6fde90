"""The worker library in real child processes: systemd-socket-activate, LISTEN_FDS with parked
fds, HANDOFF_FD delivery, and the exact datagrams it sends to NOTIFY_SOCKET."""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from handoff import put_blocking
from handoff._notify import parse_notify

if TYPE_CHECKING:
    from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


REPORT = """
    import json, os, socket, handoff
    def report(**extra):
        got = handoff.listeners()
        out = {
            "listeners": {n: [s.type.name for s in socks] for n, socks in got.items()},
            "parked": {n: len(socks) for n, socks in handoff.parked().items()},
            "left_in_env": sorted(k for k in os.environ if k.startswith(("LISTEN_", "HANDOFF_"))),
            **extra,
        }
        print(json.dumps(out), flush=True)
"""


def run_child(code: str, env: dict[str, str], **popen: object) -> dict[str, object]:
    proc = subprocess.run(  # type: ignore[call-overload]
        [sys.executable, "-c", textwrap.dedent(REPORT) + textwrap.dedent(code)],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, **env},
        capture_output=True,
        timeout=60,
        check=False,
        **popen,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
def test_listeners_under_systemd_socket_activate(tmp_path: Path) -> None:
    path = str(tmp_path / "web.sock")
    code = textwrap.dedent(REPORT) + textwrap.dedent(
        f"""
        sock = handoff.one_listener("web")
        conn, _ = sock.accept()
        assert handoff.listen("&web") is sock
        assert handoff.listen("unix:{path}") is sock, "an address match takes the inherited one"
        got = handoff.listeners()
        conn.sendall(json.dumps({{
            "names": sorted(got),
            "is_unix_listener": handoff.is_unix_listener(sock, "{path}"),
            "is_tcp_listener": handoff.is_tcp_listener(sock),
            "left_in_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
            "ready": handoff.ready(),
        }}).encode())
        conn.close()
        """
    )
    before = open_fds()
    proc = subprocess.Popen(
        [
            *("systemd-socket-activate", "-l", path, "--fdname=web", f"-EPYTHONPATH={ROOT}"),
            *(sys.executable, "-c", code),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        # It prints this once the socket is bound, and starts the child at the first connection.
        assert proc.stderr.readline().startswith(b"Listening on")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(60)  # a safety net; the read below waits on the child's reply
            client.connect(path)
            reply = b"".join(iter(lambda: client.recv(4096), b""))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert json.loads(reply) == {
        "names": ["web"],
        "is_unix_listener": True,
        "is_tcp_listener": False,
        "left_in_env": [],
        "ready": False,
    }
    assert open_fds() == before


def test_listen_fds_with_handoff_listeners_splits_listeners_from_parked_fds() -> None:
    before = open_fds()
    http = socket.create_server(("127.0.0.1", 0))
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.bind(b"\0handoff-test-admin-%d" % os.getpid())
    admin.listen()
    kept_a, kept_b = socket.socketpair()
    fds = [http.fileno(), admin.fileno(), kept_a.fileno()]
    port = http.getsockname()[1]
    with http, admin, kept_a, kept_b:
        out = run_shell_child(fds, port)
        assert kept_b.recv(100) == b"from the next generation"
    assert out == {
        "listeners": {"http": ["SOCK_STREAM"], "admin": ["SOCK_STREAM"]},
        "parked": {"conn": 1},
        "left_in_env": [],
        "tcp": True,
        "other_port": False,
        "abstract": True,
        "matched": True,
    }
    assert open_fds() == before


def run_shell_child(fds: list[int], port: int) -> dict[str, object]:
    code = textwrap.dedent(REPORT) + textwrap.dedent(
        f"""
        report(
            tcp=handoff.is_tcp_listener(handoff.one_listener("http"), "127.0.0.1:{port}"),
            other_port=handoff.is_tcp_listener(handoff.one_listener("http"), "127.0.0.1:1"),
            abstract=handoff.is_unix_listener(
                handoff.one_listener("admin"), "@handoff-test-admin-{os.getpid()}"
            ),
            matched=handoff.listen("127.0.0.1:{port}") is handoff.one_listener("http"),
        )
        handoff.parked()["conn"][0].sendall(b"from the next generation")
        """
    )
    return run_listen_fds_child(fds, ["http", "admin", "conn"], 2, code)


def run_listen_fds_child(
    fds: list[int], names: list[str], listeners: int, code: str
) -> dict[str, object]:
    """Run ``code`` with ``fds`` at 3.. as LISTEN_FDS, the first ``listeners`` of them listeners."""
    # The shell puts the fds at 3.. and sets LISTEN_PID to its own pid, which exec keeps.
    assert min(fds) > 5, "the redirections below would overwrite a source fd"
    moves = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(fds))
    script = f'LISTEN_PID=$$ exec "$0" -c "$1" {moves}'
    proc = subprocess.run(
        # bash, not sh: dash only redirects single-digit fds.
        ["bash", "-c", script, sys.executable, code],
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": ROOT,
            "LISTEN_FDS": str(len(fds)),
            "LISTEN_FDNAMES": ":".join(names),
            "HANDOFF_LISTENERS": str(listeners),
        },
        pass_fds=fds,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


# A child that takes the parked fds in the order given by ``calls`` and reports, for each call,
# the names and fd numbers it was handed (sockets as their fileno()).
PARKED_CHILD = """
import json, handoff
def numbers(got):
    return {n: [f if isinstance(f, int) else f.fileno() for f in fds] for n, fds in got.items()}
calls = CALLS
print(json.dumps([numbers(getattr(handoff, call)()) for call in calls]))
"""


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        (
            ["parked", "parked_fds", "parked", "parked_fds"],
            [{"conn": [3]}, {"state": [4]}, {"conn": [3]}, {}],
        ),
        (["parked_fds", "parked", "parked_fds"], [{"conn": [3], "state": [4]}, {}, {}]),
    ],
)
def test_parked_fds_are_handed_out_once(calls: list[str], expected: list[object]) -> None:
    before = open_fds()
    conn_a, conn_b = socket.socketpair()
    r, w = os.pipe()
    os.close(w)
    with conn_a, conn_b:
        out = run_listen_fds_child(
            [conn_a.fileno(), r], ["conn", "state"], 0, PARKED_CHILD.replace("CALLS", repr(calls))
        )
    os.close(r)
    assert out == expected
    assert open_fds() == before


def test_get_listeners_is_listeners_under_the_put_get_name() -> None:
    before = open_fds()
    http = socket.create_server(("127.0.0.1", 0))
    code = """
import json, handoff
got = handoff.get_listeners()
print(json.dumps({"same": got is handoff.listeners(), "names": sorted(got)}))
"""
    with http:
        out = run_listen_fds_child([http.fileno()], ["http"], 1, code)
    assert out == {"same": True, "names": ["http"]}
    assert open_fds() == before


def test_scm_rights_delivery_on_handoff_fd() -> None:
    before = open_fds()
    supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.create_server(("127.0.0.1", 0))
    kept_a, kept_b = socket.socketpair()
    with supervisor_end, worker_end, udp, tcp, kept_a, kept_b:
        put_blocking(
            supervisor_end,
            [("dns", udp.fileno()), ("http", tcp.fileno()), ("conn", kept_a.fileno())],
            {"listeners": 2, "generation": 7},
        )
        out = run_child(
            """
            report(
                udp=handoff.is_udp(handoff.listen_packet("&dns")),
                channel_closed=True,
            )
            handoff.parked()["conn"][0].sendall(b"parked over scm_rights")
            """,
            env={"HANDOFF_FD": str(worker_end.fileno())},
            pass_fds=[worker_end.fileno()],
        )
        worker_end.close()
        assert kept_b.recv(100) == b"parked over scm_rights"
        # The worker closed its end once it had the set: the supervisor sees end-of-file.
        supervisor_end.settimeout(60)
        assert supervisor_end.recv(10) == b""
    assert out["listeners"] == {"dns": ["SOCK_DGRAM"], "http": ["SOCK_STREAM"]}
    assert out["parked"] == {"conn": 1}
    assert out["left_in_env"] == []
    assert out["udp"] is True
    assert open_fds() == before


def test_listen_pid_of_another_process_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import handoff; handoff.listeners()"],
        env={"PYTHONPATH": ROOT, "LISTEN_FDS": "1", "LISTEN_PID": "1"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert b"ListenPidMismatchError: LISTEN_PID=1 but this process is" in proc.stderr


def test_notify_functions_send_exact_datagrams_with_the_parked_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(60)  # a safety net: every datagram below is sent before the child exits
    conn_a, conn_b = socket.socketpair()
    before = open_fds()
    out = run_child(
        f"""
        import socket
        conn = socket.socket(fileno={conn_a.fileno()})
        sent = [
            handoff.ready("serving"),
            handoff.status("12 clients"),
            handoff.park("client-1", conn),
            handoff.unpark("client-1"),
            handoff.reloading(),
            handoff.watchdog(),
            handoff.stopping(),
            handoff.park("client-2", conn, conn.fileno()),  # several fds, one datagram
        ]
        conn.detach()
        print(json.dumps(sent))
        """,
        env={"NOTIFY_SOCKET": path},
        pass_fds=[conn_a.fileno()],
    )
    assert out == [True] * 8
    messages = []
    for _ in range(8):
        data, ancdata, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for _, _, payload in ancdata:
            fds.frombytes(payload)
        messages.append(parse_notify(data, list(fds)))
    receiver.close()
    assert [dict(m.fields) for m in messages] == [
        {"READY": "1", "STATUS": "serving"},
        {"STATUS": "12 clients"},
        {"FDSTORE": "1", "FDNAME": "client-1"},
        {"FDSTOREREMOVE": "1", "FDNAME": "client-1"},
        {"RELOADING": "1"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
        {"FDSTORE": "1", "FDNAME": "client-2"},
    ]
    assert [len(m.fds) for m in messages] == [0, 0, 1, 0, 0, 0, 0, 2]
    for fd in messages[7].fds:
        assert os.fstat(fd).st_ino == os.fstat(conn_a.fileno()).st_ino
        os.close(fd)
    (parked_fd,) = messages[2].fds
    with socket.socket(fileno=parked_fd) as parked, conn_a, conn_b:
        parked.sendall(b"same connection")
        assert conn_b.recv(100) == b"same connection"
    assert open_fds() == before - 3  # receiver, conn_a and conn_b are closed now


def test_without_notify_socket_every_notify_function_returns_false() -> None:
    out = run_child(
        """
        import socket
        a, b = socket.socketpair()
        print(json.dumps([handoff.ready(), handoff.status("x"), handoff.park("p", a),
                          handoff.unpark("p"), handoff.stopping(), handoff.reloading(),
                          handoff.watchdog(), handoff.listeners(), handoff.parked()]))
        """,
        env={},
    )
    assert out == [False] * 7 + [{}, {}]
