"""[program] worker settings on real processes: user/group, umask, working_dir, env_file, limits.

What a worker got is read from outside, in /proc (status, limits, cwd, environ), so a worker
that lied could not make a test pass.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from typing import TYPE_CHECKING

import pytest

from tests.daemon import short_tempdir, worker_command, write_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.daemon import Daemon

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="starting workers as another user needs handoffd to run as root"
)
NEEDS_SETPRIV = pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="setpriv(1) (util-linux) is not installed"
)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def limit(pid: int, name: str) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith(name):
                soft, hard = line[len(name) :].split()[:2]
                return soft, hard
    raise AssertionError(f"no {name!r} in /proc/{pid}/limits")


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().decode().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def get(address: tuple[str, int]) -> dict[str, str]:
    """One HTTP request; the response's headers (the test worker names its pid in them)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert head[0] == "HTTP/1.1 200 OK", head
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}


def free_low_port() -> int:
    """A port below 1024 nothing on 127.0.0.1 uses now (other tests share the machine)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def open_base() -> Path:
    """A base dir other uids may traverse (mkdtemp makes it 0700), for workers run as nobody."""
    base = short_tempdir()
    base.chmod(0o755)
    return base


@ROOT_ONLY
@NEEDS_SETPRIV
@pytest.mark.parametrize("delivery", ["listen_fds", "scm_rights"])
def test_root_handoffd_binds_a_port_below_1024_and_runs_workers_as_nobody(
    run_daemon: Callable[..., Daemon], delivery: str
) -> None:
    port = free_low_port()
    command = (
        worker_command() if delivery == "listen_fds" else [sys.executable, "-m", "handoff.demo"]
    )
    daemon = run_daemon(
        env={"WORKER_MODE": "strict"},
        base=open_base(),
        command=command,
        processes=2,
        listeners=[("http", f"127.0.0.1:{port}")],
        ready="notify" if delivery == "listen_fds" else "auto",
        extra_program=f'user = "nobody"\nfd_delivery = "{delivery}"',
    )
    pids = daemon.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        status = proc_status(pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(NOBODY)] * 4, status["Gid"]
        # initgroups(nobody): only its own groups, never root's
        assert set(status["Groups"].split()) <= {str(NOBODY)}, status["Groups"]
        assert status["CapEff"] == "0000000000000000"
        env = environ_of(pid)
        assert (env["USER"], env["HOME"]) == ("nobody", "/nonexistent")
    assert proc_status(daemon.pid)["Uid"].split()[0] == "0"
    served = {int(get(("127.0.0.1", port)).get("x-handoff-pid", "0")) for _ in range(20)}
    if delivery == "listen_fds":  # the demo worker does not name its pid
        assert served <= set(pids), (served, pids)
    # a new generation's notify sockets are made the workers' too
    code, reply = daemon.upgrade()
    assert code == 0, reply
    for pid in daemon.worker_pids(2):
        assert proc_status(pid)["Uid"].split()[0] == str(NOBODY)
    get(("127.0.0.1", port))
    notify_dir = daemon.runtime_dir / "notify"
    assert oct(notify_dir.stat().st_mode & 0o777) == "0o711"
    for sock in notify_dir.iterdir():
        info = sock.stat()
        assert (info.st_uid, oct(info.st_mode & 0o777)) == (NOBODY, "0o600"), sock


def test_umask_working_dir_env_file_and_limits_reach_the_worker(
    run_daemon: Callable[..., Daemon],
) -> None:
    base = short_tempdir()
    app = base / "app"
    app.mkdir()
    env_file = base / "app.env"
    env_file.write_text(
        "# a comment\n"
        "PLAIN=plain value\n"
        "export EXPORTED=yes\n"
        "SINGLE='a $b \\n'\n"
        'DOUBLE="tab\\tquote\\" end"\n'
        "OVERRIDDEN=from the file\n"
    )
    env_file.chmod(0o600)
    daemon = run_daemon(
        base=base,
        processes=1,
        env={"WORKER_MODE": "strict"},
        extra_program=(
            'umask = "027"\nworking_dir = "app"\nenv_file = "app.env"\n'
            "nofile = 777\ncore = 1048576\n[program.env]\nOVERRIDDEN = 'from the config'"
        ),
    )
    (pid,) = daemon.worker_pids()
    assert proc_status(pid)["Umask"] == "0027"
    assert os.readlink(f"/proc/{pid}/cwd") == str(app)
    assert limit(pid, "Max open files") == ("777", "777")
    assert limit(pid, "Max core file size") == ("1048576", "1048576")
    env = environ_of(pid)
    assert env["PLAIN"] == "plain value"
    assert env["EXPORTED"] == "yes"
    assert env["SINGLE"] == "a $b \\n"
    assert env["DOUBLE"] == 'tab\tquote" end'
    assert env["OVERRIDDEN"] == "from the config"
    assert "HANDOFF_NOFILE" not in env
    get(daemon.address())


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('memory = "512M"', "program.memory = 536870912: this handoffd cannot apply it"),
        ('working_dir = "/nonexistent/app"', "program.working_dir = '/nonexistent/app' is not"),
        ("nofile = 1000000000", "program.nofile = 1000000000 is above the kernel's maximum"),
    ],
)
def test_a_setting_that_cannot_be_applied_fails_the_upgrade_naming_it(
    run_daemon: Callable[..., Daemon], setting: str, expected: str
) -> None:
    daemon = run_daemon(processes=1)
    old = daemon.worker_pids()
    write_config(daemon.config, daemon.runtime_dir, processes=1, extra_program=setting)
    code, reply = daemon.upgrade()
    assert code == 1, reply
    assert expected in json.dumps(reply), reply
    assert daemon.worker_pids() == old  # generation 1 still serves
    get(daemon.address())


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('env_file = "missing.env"', "program.env_file = '"),
        ('user = "no-such-user-here"', "no user of that name on this host"),
        ('group = "no-such-group-here"', "no group of that name on this host"),
    ],
)
def test_a_bad_setting_fails_the_upgrade_at_config_load_naming_it(
    run_daemon: Callable[..., Daemon], setting: str, expected: str
) -> None:
    daemon = run_daemon(processes=1)
    write_config(daemon.config, daemon.runtime_dir, processes=1, extra_program=setting)
    code, reply = daemon.upgrade()
    assert code != 0, reply
    text = json.dumps(reply)
    assert expected in text, reply
    if "env_file" in setting:
        assert "missing.env': cannot read it: No such file or directory" in text


@ROOT_ONLY
@NEEDS_SETPRIV
def test_user_set_when_handoffd_is_not_root_fails_the_start_naming_the_setting() -> None:
    from tests.daemon import Daemon, remove_tree

    base = open_base()
    os.chown(base, NOBODY, NOBODY)
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", processes=1, extra_program='user = "root"')
    daemon = Daemon(
        cfg,
        base / "run",
        wrap=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"],
    )
    try:
        code = daemon.proc.wait(30)
    finally:
        daemon.stop()  # joins the log reader: every line is in
        remove_tree(base)
    assert code != 0
    assert "program.user = 'root': handoffd runs as uid 65534, not as root" in daemon.log_text()


# A worker whose child (part of its tree, holding its stdout/stderr) floods the output once the
# test opens the FIFO it waits on; the worker itself serves as the test worker does.
FLOODING_WORKER = """
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
os.execv(sys.executable, [sys.executable, sys.argv[4]])
"""
FLOOD = """
import sys
fifo, lines = sys.argv[1], int(sys.argv[2])
if fifo != "-":
    with open(fifo) as f:
        f.read(1)
out = sys.stdout
for i in range(lines):
    out.write(f"line {i} " + "x" * 100 + "\\n")
out.write("L" * 40000 + "\\n")
out.flush()
sys.stderr.write("to stderr\\n")
sys.stderr.flush()
out.write("\\u00e9t\\u00e9 done\\n")
"""
FLOOD_LINES = 10_000


def flooding(fifo: str, lines: int) -> list[str]:
    """The worker command: its child waits for ``fifo`` to open ("-": no wait), prints ``lines``."""
    from tests.daemon import WORKER

    return [sys.executable, "-c", FLOODING_WORKER, FLOOD, fifo, str(lines), WORKER]


def fifo_in(base: Path) -> Path:
    fifo = base / "go"
    os.mkfifo(fifo)
    return fifo


def test_output_log_turns_a_flood_of_worker_lines_into_json_events_and_status_stays_fast(
    run_daemon: Callable[..., Daemon],
) -> None:
    import time

    base = short_tempdir()
    fifo = fifo_in(base)
    daemon = run_daemon(
        base=base,
        processes=2,
        env={"WORKER_MODE": "strict"},  # strict: exits if another worker's pipe leaked into it
        command=flooding("-", 0),
        extra_program='output = "log"',
    )
    write_config(
        daemon.config,
        daemon.runtime_dir,
        processes=1,
        command=flooding(str(fifo), FLOOD_LINES),
        extra_program='output = "log"',
    )
    code, reply = daemon.upgrade()
    assert code == 0, reply
    (pid,) = daemon.worker_pids(2)
    mark = daemon.mark()
    latencies: list[float] = []
    with open(fifo, "w") as f:
        f.write("x")
    started = time.monotonic()
    while not any(
        e.get("event") == "worker.output" and e.get("line") == "été done"
        for e in daemon.events[mark:]
    ):
        t0 = time.monotonic()
        assert daemon.status()["state"] == "running"
        latencies.append(time.monotonic() - t0)
        assert time.monotonic() - started < 60, "the flood did not arrive within 60 s"
    flood_s = time.monotonic() - started
    # its own pipe: it may be logged after stdout's last line
    daemon.wait_event("worker.output", where=lambda e: e["stream"] == "stderr", start=mark)
    events = [e for e in daemon.events[mark:] if e.get("event") == "worker.output"]
    lines = [e for e in events if e["line"].startswith("line ")]
    assert [e["line"].split()[1] for e in lines] == [str(i) for i in range(FLOOD_LINES)]
    assert {(e["generation"], e["worker"], e["pid"], e["stream"]) for e in lines} == {
        (2, 0, pid, "stdout")
    }
    (long,) = [e for e in events if e["line"].startswith("L")]
    assert long["line"] == "L" * 16384
    assert long["truncated"] is True
    assert "truncated" not in lines[0]
    (err,) = [e for e in events if e["stream"] == "stderr"]
    assert err["line"] == "to stderr"
    for raw in daemon.raw_lines:
        assert isinstance(json.loads(raw), dict), raw
    print(
        f"\n{FLOOD_LINES} lines in {flood_s:.2f}s; status x{len(latencies)}: "
        f"max {max(latencies) * 1000:.1f} ms, median "
        f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms"
    )
    assert max(latencies) < 1.0, latencies


@pytest.mark.parametrize("mode", ["in-place", "new-pid"])
def test_output_log_pipes_survive_a_self_upgrade(
    run_daemon: Callable[..., Daemon], mode: str
) -> None:
    base = short_tempdir()
    fifo = fifo_in(base)
    daemon = run_daemon(
        base=base,
        processes=1,
        command=flooding(str(fifo), 3),
        extra_program='output = "log"',
        extra_supervisor=f'self_upgrade = "{mode}"',
    )
    (pid,) = daemon.worker_pids()
    old = daemon.pid
    code, reply = daemon.self_upgrade()
    assert code == 0, reply
    assert (daemon.pid == old) == (mode == "in-place")
    mark = daemon.mark()
    with open(fifo, "w") as f:  # the worker's child writes only now, to the new supervisor
        f.write("x")
    done = daemon.wait_event("worker.output", where=lambda e: e["line"] == "été done", start=mark)
    assert (done["pid"], done["generation"], done["worker"]) == (pid, 1, 0)
    # stdout and stderr are two pipes, pumped apart: only each stream keeps its order
    lines = [
        e["line"]
        for e in daemon.events[mark:]
        if e.get("event") == "worker.output" and e["stream"] == "stdout"
    ]
    assert lines[:3] == ["line 0 " + "x" * 100, "line 1 " + "x" * 100, "line 2 " + "x" * 100]
    assert daemon.worker_pids() == [pid]
