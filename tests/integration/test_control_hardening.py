"""The control socket and the CLI against overload, abuse and operator mistakes (issue 14).

Each test here failed on the code before it: a traceback, a wrong daemon reached, a daemon that
stopped answering, or a client that said something untrue.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from typing import TYPE_CHECKING

import pytest

from handoff import _client
from handoff._control import MAX_CONNECTIONS, MAX_LINE
from handoff._errors import DaemonUnreachableError
from tests.daemon import (
    REPO,
    Daemon,
    remove_tree,
    short_tempdir,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

NEVER_READY = {"WORKER_MODE": "never_ready"}


def handoffd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handoff", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connect to ``path`` until its (never accepted) backlog is full."""
    queued: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return queued
        queued.append(sock)


@pytest.fixture
def full_backlog() -> Iterator[tuple[Path, socket.socket]]:
    """A listening socket that accepts nothing, its backlog full."""
    base = short_tempdir()
    path = base / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = fill_backlog(path)
    try:
        yield path, listener
    finally:
        for sock in queued:
            sock.close()
        listener.close()
        remove_tree(base)


def connect(path: Path) -> socket.socket:
    """A client connection; connect(2) blocks (for at most 30 s) while the backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 30, 0))
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(30)
    return sock


def wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes we sent that the peer has not read yet (SIOCOUTQ, unix(7))."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", out)[0])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def control_path(daemon: Daemon) -> Path:
    return daemon.runtime_dir / "control.sock"


def read_reply(sock: socket.socket) -> dict[str, object] | None:
    with sock.makefile("rb") as reader:
        line = reader.readline()
    return json.loads(line) if line else None


# ---- item 8: a momentarily full backlog is waited out, not a traceback ----


def test_cli_waits_for_room_in_a_full_backlog_instead_of_crashing(
    full_backlog: tuple[Path, socket.socket],
) -> None:
    path, listener = full_backlog
    cli = subprocess.Popen(
        [sys.executable, "-m", "handoff", "status", "--json", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        # Blocked in connect(2), waiting for room (before the fix: exited with EAGAIN at once).
        wait_until(
            lambda: cli.poll() is not None or wchan(cli.pid) == "unix_wait_for_peer",
            30,
            "the CLI to wait in connect(2)",
        )
        assert cli.poll() is None, cli.communicate()
        while True:  # make room; the CLI's connection is the last one queued
            conn, _ = listener.accept()
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                if struct.unpack("3i", creds)[0] == cli.pid:
                    conn.settimeout(10)
                    assert json.loads(conn.makefile("rb").readline())["op"] == "status"
                    conn.sendall(b'{"ok": true, "op": "status", "pid": 4242}\n')
                    break
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err
    assert json.loads(out)["pid"] == 4242


def test_a_backlog_that_stays_full_is_unreachable_with_a_sentence(
    full_backlog: tuple[Path, socket.socket],
) -> None:
    path, _ = full_backlog
    with pytest.raises(DaemonUnreachableError, match=r"accepted no connection within 0\.3s"):
        _client.call(path, {"op": "status"}, timeout=0.3)


def test_status_answers_every_one_of_100_concurrent_clients(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    start = threading.Barrier(100)
    replies: list[dict[str, object]] = []
    errors: list[BaseException] = []

    def client() -> None:
        start.wait(30)
        try:
            replies.append(_client.call(control_path(daemon), {"op": "status"}, timeout=30))
        except BaseException as exc:  # every failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert [r.get("op") for r in replies] == ["status"] * 100


# ---- item 9: bounded connections, idle timeout, bounded memory ----


def test_status_and_restarts_work_with_more_idle_connections_than_the_fd_limit() -> None:
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", processes=1)
    # 1,077 idle connections at 1,024 fds, scaled down: 300 at 128.
    daemon = Daemon(cfg, base / "run", wrap=["prlimit", "--nofile=128:128", "--"])
    idle: list[socket.socket] = []
    try:
        daemon.wait_ready()
        (victim,) = daemon.worker_pids()
        for _ in range(300):
            idle.append(connect(control_path(daemon)))
        assert daemon.status()["generation"] == 1
        mark = daemon.mark()
        os.kill(victim, signal.SIGKILL)
        started = daemon.wait_event("worker.started", start=mark)
        assert started["pid"] != victim
        wait_until(lambda: daemon.worker_pids() == [started["pid"]], 20, "the restarted worker")
        # the oldest idle connections made room, each told why
        assert read_reply(idle[0]) == {
            "ok": False,
            "error": {
                "code": "evicted",
                "message": f"closed to make room: {MAX_CONNECTIONS} control connections were "
                "open and this one was idle the longest; connect again and send the request "
                "at once",
            },
        }
    finally:
        for sock in idle:
            sock.close()
        assert daemon.stop() == 0, daemon.log_text()
        remove_tree(base)


def test_status_is_told_busy_when_every_connection_serves_a_long_request(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    never_ready_upgrade(daemon)
    mark = daemon.mark()
    upgrades = [connect(control_path(daemon)) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in upgrades:
            sock.sendall(b'{"v": 1, "op": "upgrade"}\n')
        # Every connection is being served: the one upgrade that runs, and the one queued
        # after it (if it started before the rest arrived), which the others joined.
        wait_until(
            lambda: (
                sum(e["event"] == "upgrade.coalesced" for e in daemon.events[mark:])
                >= MAX_CONNECTIONS - 2
            ),
            30,
            "every upgrade request to be taken",
        )
        result = daemon.cli("status")
    finally:
        for sock in upgrades:
            sock.close()
    assert result.returncode == 3, result.stderr
    assert result.stderr == (
        f"handoffd: handoffd is serving {MAX_CONNECTIONS} control requests (upgrades or stops in "
        "progress); try again when they are done\n"
    )
    # Clients that left free their connections; the upgrade goes on.
    assert daemon.status()["state"] == "waiting_ready"


def test_idle_and_half_sent_connections_are_closed_after_the_idle_timeout(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1, env={"HANDOFF_CONTROL_IDLE_TIMEOUT": "0.5"})
    path = control_path(daemon)
    with connect(path) as silent, connect(path) as half, connect(path) as served:
        half.sendall(b'{"v": 1, "op": "sta')
        served.sendall(b'{"v": 1, "op": "status"}\n')
        with silent.makefile("rb") as a, half.makefile("rb") as b, served.makefile("rb") as c:
            assert json.loads(c.readline())["op"] == "status"
            for reader in (a, b, c):  # c: idle again after its reply
                reply = json.loads(reader.readline())
                assert reply["error"]["code"] == "idle_timeout", reply
                assert "no complete request line within 0.5s" in reply["error"]["message"]
                assert reader.readline() == b""  # and closed
    assert daemon.status()["generation"] == 1


def test_an_upgrade_that_streams_longer_than_the_idle_timeout_is_not_cut_off(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1, ready="delay:1.5", env={"HANDOFF_CONTROL_IDLE_TIMEOUT": "0.3"})
    code, reply = daemon.upgrade()
    assert code == 0, reply
    assert reply["generation"] == 2
    assert reply["duration_s"] > 0.3


def test_500_partial_lines_do_not_grow_the_daemon_by_more_than_a_few_mib(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    before = rss_kib(daemon.pid)
    partial = b"x" * (MAX_LINE - 1)  # the longest line that is not refused, less its newline
    clients: list[socket.socket] = []
    try:
        for _ in range(500):
            clients.append(connect(control_path(daemon)))
            clients[-1].sendall(partial)
        # Everything sent has been read by the daemon (or dropped as it closed the connection).
        wait_until(
            lambda: all(unread_by_peer(s) == 0 for s in clients), 60, "the daemon to read it all"
        )
        grown_kib = rss_kib(daemon.pid) - before
        assert daemon.status()["generation"] == 1
    finally:
        for sock in clients:
            sock.close()
    assert grown_kib < 6 * 1024, f"the daemon grew by {grown_kib} KiB"


# ---- item 17 and the refusal log: a refused uid is answered, and cannot flood the log ----

REFUSED_UID = 65533


def as_uid(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.fixture
def shared_daemon(run_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon that lets uid 65534 in, so that other uids can reach its socket and be refused."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another uid")
    daemon = run_daemon(processes=1, extra_supervisor="allowed_uids = [65534]")
    os.chmod(daemon.runtime_dir.parent, 0o711)
    return daemon


def test_a_refused_uid_is_answered_after_its_request_is_read(shared_daemon: Daemon) -> None:
    # The client sends late: a daemon that answers and closes before reading makes its send fail
    # with EPIPE (the flaky test's failure), and the reply is lost.
    probe = (
        "import select, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "early = select.select([s], [], [], 0.5)[0]\n"
        's.sendall(b\'{"v":1,"op":"status"}\\n\')\n'
        "print('early' if early else 'after the request', s.makefile().readline())\n"
    )
    path = str(control_path(shared_daemon))
    probed = as_uid(REFUSED_UID, "/usr/bin/python3", "-c", probe, path)
    assert probed.stdout.startswith("after the request"), (probed.stdout, probed.stderr)
    assert '"forbidden"' in probed.stdout
    cli = as_uid(REFUSED_UID, "/usr/bin/python3", "-m", "handoff", "status", "--socket", path)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr == (
        f"handoffd: uid {REFUSED_UID} may not control this handoffd; add it to "
        "supervisor.allowed_uids\n"
    )


def test_refusals_are_logged_at_most_once_per_interval(shared_daemon: Daemon) -> None:
    flood = (
        "import socket, sys\n"
        "for _ in range(50):\n"
        "    with socket.socket(socket.AF_UNIX) as s:\n"
        "        s.connect(sys.argv[1])\n"
        '        s.sendall(b\'{"v":1,"op":"status"}\\n\')\n'
        "        assert b'forbidden' in s.makefile('rb').readline()\n"
    )
    mark = shared_daemon.mark()
    flooded = as_uid(REFUSED_UID, "/usr/bin/python3", "-c", flood, str(control_path(shared_daemon)))
    assert flooded.returncode == 0, flooded.stderr
    # A line logged after the flood: every refusal line is before it.
    code, _ = shared_daemon.upgrade()
    assert code == 0
    upgraded = shared_daemon.wait_event("upgrade.started", start=mark)
    with shared_daemon._cond:
        events = shared_daemon.events[mark : shared_daemon.events.index(upgraded)]
    refused = [e for e in events if e.get("event") == "control.refused"]
    assert len(refused) == 1, refused  # the flood lasted far less than REFUSAL_LOG_INTERVAL
    assert refused[0]["uid"] == REFUSED_UID


# ---- item 12: a named config that cannot be read is an error, never the default daemon ----


def test_client_commands_with_a_missing_config_fail_and_reach_no_daemon(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = run_daemon(processes=1)
    # This daemon is the one the default socket reaches (RuntimeDirectory= sets this).
    env = {"RUNTIME_DIRECTORY": str(daemon.runtime_dir)}
    assert handoffd("status", env=env).returncode == 0
    missing = tmp_path / "nowhere" / "handoffd.toml"
    for command in ("upgrade", "status", "stop"):
        result = handoffd(command, "--config", str(missing), env=env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr == (
            f"handoffd: config {missing}: cannot read it (No such file or directory); name the "
            "config the daemon runs with, or its control socket with --socket PATH\n"
        )
        assert result.stdout == ""
    named_by_env = handoffd("upgrade", env={**env, "HANDOFFD_CONFIG": str(missing)})
    assert named_by_env.returncode == 2, named_by_env.stderr
    status = daemon.status()
    assert status["generation"] == 1
    assert status["last_upgrade"] is None


# ---- a repeated key is refused, naming it ----


def test_a_request_with_a_repeated_key_is_refused_naming_the_key(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(control_path(daemon)))
        sock.sendall(b'{"v":1,"op":"status","op":"stop"}\n{"v":1,"op":"status"}\n')
        with sock.makefile("rb") as reader:
            refused = json.loads(reader.readline())
            assert refused["error"] == {
                "code": "bad_request",
                "message": "request repeats the key 'op'; send each key once",
            }
            assert json.loads(reader.readline())["op"] == "status"  # the connection stays up
    assert daemon.proc.poll() is None
    assert daemon.status()["state"] == "running"


# ---- sentences and documented exit codes instead of tracebacks ----


def test_a_socket_under_a_regular_file_is_unreachable_with_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = handoffd("status", "--socket", str(tmp_path / "file" / "x"))
    assert result.returncode == 3, result.stderr
    assert result.stderr == (
        f"handoffd: no handoffd can listen on {tmp_path / 'file' / 'x'}: a directory in that "
        "path is a file; check --socket, or supervisor.runtime_dir in the config\n"
    )


def test_a_socket_path_longer_than_unix_allows_is_a_usage_error(tmp_path: Path) -> None:
    long = "/tmp/" + "d" * 120 + "/control.sock"
    result = handoffd("upgrade", "--socket", long)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"handoffd: --socket {long}: the path is {len(long)} bytes, longer than a Unix socket "
        "path may be (107, unix(7)); use a shorter path or a symlinked directory\n"
    )
    cfg = tmp_path / "handoffd.toml"
    cfg.write_text(f'[supervisor]\nruntime_dir = "/tmp/{"d" * 120}"\n')
    from_config = handoffd("status", "--config", str(cfg))
    assert from_config.returncode == 2, from_config.stderr
    assert "longer than unix(7) allows (107); set a shorter supervisor.runtime_dir" in (
        from_config.stderr
    )
    assert "Traceback" not in from_config.stderr


# ---- what the client says is what happens ----


def test_stop_with_no_daemon_says_only_that_it_is_unreachable(tmp_path: Path) -> None:
    result = handoffd("stop", "--socket", str(tmp_path / "control.sock"))
    assert result.returncode == 3
    assert result.stdout == ""  # not "draining workers" first
    assert result.stderr.startswith(f"handoffd: no handoffd is listening on {tmp_path}")


def never_ready_upgrade(daemon: Daemon) -> None:
    """Make the next upgrade hang: its generation never becomes ready (for 60 s)."""
    write_config(daemon.config, daemon.runtime_dir, processes=1, ready_timeout=60, env=NEVER_READY)


def test_upgrade_timeout_exits_5_and_says_the_upgrade_goes_on(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    never_ready_upgrade(daemon)
    result = daemon.cli("upgrade", "--timeout", "1")
    assert result.returncode == 5, result.stderr
    assert result.stderr == (
        f"handoffd: gave up waiting after 1s; the upgrade goes on in handoffd at "
        f"{control_path(daemon)}; see `handoffd status`\n"
    )
    assert daemon.status()["state"] == "waiting_ready"


def ctrl_c_during_upgrade(daemon: Daemon, *, of_the_daemon: bool) -> tuple[int, str]:
    """Start an upgrade that hangs with ``handoffd upgrade``, then Ctrl-C that command (or the
    daemon); the command's exit code and stderr.

    The command runs as a terminal runs it: Ctrl-C raises KeyboardInterrupt in it even when this
    test runs with SIGINT ignored (as a background job does).
    """
    never_ready_upgrade(daemon)
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from handoff._cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    mark = daemon.mark()
    cli = subprocess.Popen(
        [sys.executable, "-c", code, "upgrade", "--config", str(daemon.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        daemon.wait_event("worker.started", start=mark)  # the daemon has the request
        (daemon.proc if of_the_daemon else cli).send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    return cli.returncode, err


def test_interrupted_upgrade_exits_130_and_says_the_upgrade_goes_on(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    code, err = ctrl_c_during_upgrade(daemon, of_the_daemon=False)
    assert code == 130, err
    assert err.endswith(
        "handoffd: interrupted; an upgrade handoffd has received goes on; see `handoffd status`\n"
    )
    assert daemon.status()["state"] == "waiting_ready"


def test_an_upgrade_cut_short_by_the_daemon_stopping_does_not_claim_anything_keeps_serving(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    code, err = ctrl_c_during_upgrade(daemon, of_the_daemon=True)
    assert daemon.proc.wait(60) == 0
    assert code == 1, err
    assert "generation 1 keeps serving" not in err
    assert err.endswith(
        "handoffd is shutting down: its workers drain and none keeps serving once it has exited\n"
    )


def test_check_config_warns_about_a_program_not_on_path(tmp_path: Path) -> None:
    cfg = tmp_path / "handoffd.toml"
    cfg.write_text('[program]\ncommand = ["handoffd-test-no-such-program", "--serve"]\n')
    result = handoffd("check-config", str(cfg))
    # Still valid: the program may be installed after the config is checked.
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert result.stderr.startswith(
        f"config {cfg}: warning: program.command[0]: 'handoffd-test-no-such-program' was not "
        "found on PATH ("
    )
