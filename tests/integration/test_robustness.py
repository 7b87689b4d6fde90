"""What a client, an operator or the kernel can throw at the daemon without taking it down.

Each case here once killed the supervisor (and with it every worker) or mishandled a stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bench.strict_client import LoadClient
from tests.daemon import REPO, Daemon, pid_alive, short_tempdir, wait_until, write_config


def send_raw(path: Path, payload: bytes, *, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        if not read:
            return b""
        return sock.makefile("rb").readline()


def test_pathological_json_gets_an_error_reply_and_the_daemon_lives(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    path = daemon.runtime_dir / "control.sock"
    # deeper than the recursion limit, shorter than MAX_LINE (16 KiB)
    for payload in (b"[" * 10_000 + b"\n", b"9" * 5_000 + b"\n", b"\xff\xfe\n"):
        assert b'"bad_json"' in send_raw(path, payload)
    assert daemon.status()["generation"] == 1


def test_client_that_leaves_before_its_error_reply_does_not_kill_the_daemon(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    path = daemon.runtime_dir / "control.sock"
    for _ in range(5):
        send_raw(path, b"x" * (70 * 1024), read=False)  # no newline, then gone
    assert daemon.status()["generation"] == 1
    assert daemon.proc.poll() is None


def test_stop_while_generation_one_starts_drains_it_and_exits_zero(tmp_path: Path) -> None:
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    write_config(
        cfg, base / "run", processes=1, ready_timeout=60, env={"WORKER_MODE": "never_ready"}
    )
    daemon = Daemon(cfg, base / "run")
    try:
        started = daemon.wait_event("worker.started")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0, daemon.log_text()  # long before ready_timeout
        exited = daemon.wait_event("worker.exited", where=lambda e: e["pid"] == started["pid"])
        # drained with its stop signal (it may not have installed a handler yet), never SIGKILLed
        assert exited["reason"] in ("exited with status 0", "was killed by SIGTERM")
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_stop_during_an_upgrade_drains_the_new_generation_and_answers_the_caller(
    run_daemon: Callable[..., Daemon],
) -> None:
    from handoff._control import UpgradeRequest, call

    daemon = run_daemon(processes=1)
    write_config(
        daemon.config,
        daemon.runtime_dir,
        processes=1,
        ready_timeout=60,
        env={"WORKER_MODE": "never_ready"},
    )
    sock = daemon.runtime_dir / "control.sock"
    replies: list[dict[str, object]] = []
    caller = threading.Thread(
        target=lambda: replies.append(call(sock, UpgradeRequest(), timeout=60))
    )
    mark = daemon.mark()
    caller.start()
    new = daemon.wait_event("worker.started", start=mark)
    client = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=60)
    client.start()
    try:
        # the old generation serves while the new one fails to become ready
        assert client.wait_for_responses(50, timeout=30)
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        assert daemon.proc.wait(30) == 0, daemon.log_text()
    finally:
        caller.join(30)
    assert replies
    assert replies[0]["outcome"] == "failed"
    assert "handoffd is stopping" in str(replies[0]["reason"])
    exited = daemon.wait_event("worker.exited", where=lambda e: e["pid"] == new["pid"], start=mark)
    # drained like a failed start (stop signal), never SIGKILLed
    assert exited["reason"] in ("exited with status 0", "was killed by SIGTERM")


def test_unwritable_pid_file_is_a_config_error_not_a_crash() -> None:
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", processes=1, extra_supervisor='pid_file = "/proc/handoffd.pid"')
    result = subprocess.run(
        [sys.executable, "-m", "handoff", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    subprocess.run(["rm", "-rf", str(base)], check=False)
    assert result.returncode == 2, result.stderr
    assert "supervisor.pid_file = '/proc/handoffd.pid': cannot write it" in result.stderr
    assert "Traceback" not in result.stderr


def test_pid_file_is_written_and_removed(run_daemon: Callable[..., Daemon]) -> None:
    base = short_tempdir()
    pid_file = base / "handoffd.pid"
    daemon = run_daemon(processes=1, extra_supervisor=f'pid_file = "{pid_file}"')
    assert pid_file.read_text().strip() == str(daemon.proc.pid)
    daemon.stop()
    assert not pid_file.exists()
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_second_daemon_on_the_same_control_socket_is_refused(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    result = subprocess.run(
        [sys.executable, "-m", "handoff", "run", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        f"another handoffd (pid {daemon.proc.pid}) already serves the control socket"
        in result.stderr
    )
    assert daemon.status()["pid"] == daemon.proc.pid


def test_allowed_uid_can_use_the_control_socket_and_others_cannot(
    run_daemon: Callable[..., Daemon],
) -> None:
    if os.getuid() != 0:
        import pytest

        pytest.skip("needs root to act as another uid")
    daemon = run_daemon(processes=1, extra_supervisor="allowed_uids = [65534]")
    os.chmod(daemon.runtime_dir.parent, 0o711)
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        's.sendall(b\'{"v":1,"op":"status"}\\n\'); print(s.makefile().readline())'
    )

    def as_uid(uid: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                probe,
                str(daemon.runtime_dir / "control.sock"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    allowed = as_uid(65534)
    assert '"op":"status"' in allowed.stdout, allowed.stderr
    other = as_uid(65533)
    assert '"forbidden"' in other.stdout, (other.stdout, other.stderr)


def test_renamed_listener_keeps_its_socket(run_daemon: Callable[..., Daemon]) -> None:
    path = Path(f"/tmp/hd-rename-{os.getpid()}.sock")
    daemon = run_daemon(processes=1, listeners=[("http", "127.0.0.1:0"), ("local", f"unix:{path}")])
    try:
        before = {li["name"]: li for li in daemon.status()["listeners"]}
        write_config(
            daemon.config,
            daemon.runtime_dir,
            processes=1,
            listeners=[("http", "127.0.0.1:0"), ("sock", f"unix:{path}")],
        )
        code, reply = daemon.upgrade()
        assert code == 0, reply
        after = {li["name"]: li for li in daemon.status()["listeners"]}
        assert set(after) == {"http", "sock"}
        assert after["sock"]["fd"] == before["local"]["fd"]  # the same held socket
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # the path still reaches a live socket
    finally:
        path.unlink(missing_ok=True)


def test_worker_crash_loop_while_notify_dir_vanishes_does_not_kill_the_daemon(
    run_daemon: Callable[..., Daemon],
) -> None:
    import shutil

    daemon = run_daemon(processes=1)
    (victim,) = daemon.worker_pids()
    shutil.rmtree(daemon.runtime_dir / "notify")
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    daemon.wait_event("worker.crashed", start=mark)
    daemon.wait_event(
        "worker.crashed", start=mark, where=lambda e: "notify socket" in str(e.get("reason"))
    )
    assert daemon.proc.poll() is None
    (daemon.runtime_dir / "notify").mkdir(mode=0o700)
    wait_until(
        lambda: len(daemon.worker_pids()) == 1 and pid_alive(daemon.worker_pids()[0]), 20, "restart"
    )


def test_demo_answers_a_bad_content_length_with_400_and_keeps_serving(
    run_daemon: Callable[..., Daemon],
) -> None:
    from bench.strict_client import request_once

    daemon = run_daemon(processes=1, command=[sys.executable, "-m", "handoff.demo"])
    (pid,) = daemon.worker_pids()
    with socket.create_connection(daemon.address(), timeout=10) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 400")
    with socket.create_connection(daemon.address(), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and a client that leaves mid-request
    assert request_once(daemon.address()).pid == pid  # the same worker still serves


def test_worker_notify_without_a_listener_returns_false_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))  # bound, then closed: sends get ECONNREFUSED
    code = "import handoff; print(handoff.ready(), handoff.status('x'), handoff.stopping())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "NOTIFY_SOCKET": str(path)},
        check=True,
    )
    assert out.stdout.split() == ["False", "False", "False"]
    assert out.stderr.count("cannot notify") == 1  # said once, not per call
