"""Self-upgrade (``handoffd upgrade --self``): the supervisor is replaced, the workers are not.

Real processes throughout: the daemon, its successors (not the test's children: they are
followed through their log lines on the shared stderr, the pid file and the status reply),
real workers and a strict load client on loopback that counts every failed request.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bench.strict_client import LoadClient, request_once
from tests.daemon import (
    Daemon,
    pid_alive,
    remove_tree,
    short_tempdir,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Callable


def fd_count(pid: int, control: Path) -> int:
    """Open fds of ``pid``, not counting accepted control connections (a status call may be
    closing at any instant). The server's end of one shows in /proc/net/unix as connected (St
    03) with the name the control socket was bound under (``control.sock`` or the temporary
    ``.control.sock.<pid>`` it was renamed from)."""
    names = (control.name, f".{control.name}.")
    connections: set[str] = set()
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8 or fields[5] != "03":
                continue
            path = Path(fields[7])
            if path.parent == control.parent and path.name.startswith(names):
                connections.add(f"socket:[{fields[6]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        held += target not in connections
    return held


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return sorted(found)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def self_upgrade_in_background(
    daemon: Daemon, exec_path: Path
) -> tuple[threading.Thread, list[tuple[int, dict[str, Any]]]]:
    """``upgrade --self --exec PATH`` in a thread; its (exit code, reply) lands in the list."""
    result: list[tuple[int, dict[str, Any]]] = []
    upgrading = threading.Thread(
        target=lambda: result.append(daemon.upgrade("--self", "--exec", str(exec_path)))
    )
    upgrading.start()
    return upgrading, result


#: The pid-changing handover (as under systemd), which "auto" picks only with NOTIFY_SOCKET set.
NEW_PID = 'self_upgrade = "new-pid"'
#: Both ways of ``upgrade --self``, for the tests that hold for each.
MODES = pytest.mark.parametrize("mode", ["in-place", "new-pid"])


def python_handoffd(path: Path, patch: str) -> Path:
    """A handoffd executable that applies ``patch`` (Python) before running the real CLI."""
    return executable(
        path,
        f"#!{sys.executable}\nimport sys\n{patch}\n"
        "from handoff._cli import main\nsys.exit(main())\n",
    )


@pytest.mark.slow
def test_twenty_self_upgrades_under_load_fail_no_request_and_keep_the_workers(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    pid_file = tmp_path / "handoffd.pid"
    daemon = run_daemon(processes=2, extra_supervisor=f'pid_file = "{pid_file}"\n{NEW_PID}')
    control = daemon.runtime_dir / "control.sock"
    steady_fds = fd_count(daemon.pid, control)
    workers = sorted(daemon.worker_pids())
    assert pid_file.read_text() == f"{daemon.pid}\n"
    supervisors = [daemon.pid]
    client = LoadClient(daemon.address(), keepalive=4, fresh=2, max_duration=300)
    client.start()
    try:
        assert client.wait_for_responses(50, timeout=30)
        for _ in range(20):
            code, reply = daemon.self_upgrade()
            assert code == 0, reply
            assert reply["outcome"] == "ok"
            assert reply["generation"] == 1
            assert [p["phase"] for p in reply["phases"]] == [
                "config_loaded",
                "frozen",
                "spawned",
                "in_charge",
            ]
            new = reply["supervisor_pid"]
            assert new not in supervisors
            assert not pid_alive(supervisors[-1])
            supervisors.append(new)
            status = daemon.status()
            assert status["pid"] == new
            assert status["state"] == "running"
            assert status["last_upgrade"]["supervisor_pid"] == new
            assert sorted(w["pid"] for w in status["workers"]) == workers
            assert all(w["state"] == "ready" for w in status["workers"])
            assert [li["origin"] for li in status["listeners"]] == ["handed-over"]
            # rewritten by the new supervisor (temp file + rename) before it said it was ready
            assert pid_file.read_text() == f"{new}\n"
            # nothing of the handover is left open: the same fds as the first supervisor
            assert fd_count(new, control) == steady_fds, os.listdir(f"/proc/{new}/fd")
            seen = client.snapshot().total
            assert client.wait_for_responses(seen + 20, timeout=30), "load stalled"
        assert all(pid_alive(p) for p in workers)
        assert children(daemon.pid) == []  # adopted workers are not its children

        # a worker upgrade after the self-upgrades drains the adopted generation like any other
        mark = daemon.mark()
        code, reply = daemon.upgrade()
        assert code == 0, reply
        assert reply["generation"] == 2
        drained = daemon.wait_event("generation.drained", where=lambda e: e["generation"] == 1)
        assert drained["generation"] == 1
        exits = [
            e
            for e in daemon.events[mark:]
            if e.get("event") == "worker.exited" and e["pid"] in workers
        ]
        assert {e["pid"] for e in exits} == set(workers)
        assert not any(pid_alive(p) for p in workers)
        assert request_once(daemon.address()).generation == 2
        new_workers = daemon.worker_pids(generation=2)
        assert children(daemon.pid) == sorted(new_workers)  # spawned as its own children
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30)
    finally:
        report = client.stop()
    assert report.failed == 0, report.describe()
    assert set(report.by_generation) == {1, 2}, report.by_generation
    assert report.ok > 500, report.describe()


def test_sigusr2_self_upgrades_and_an_adopted_worker_that_crashes_is_restarted(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=2, extra_supervisor=NEW_PID)
    old = daemon.pid
    mark = daemon.mark()
    os.kill(old, signal.SIGUSR2)
    ready = daemon.wait_event(
        "supervisor.ready", where=lambda e: e.get("handover_from") == old, start=mark
    )
    assert daemon.proc.wait(30) == 0
    daemon.pid = daemon.status()["pid"]
    assert daemon.pid != old
    assert sorted(ready["pids"]) == sorted(daemon.worker_pids())

    victim = daemon.worker_pids()[0]
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    crashed = daemon.wait_event("worker.crashed", start=mark)
    assert crashed["reason"] == (
        "exited (status unknown: adopted from the previous supervisor, not our child)"
    )
    started = daemon.wait_event("worker.started", start=mark)
    wait_until(lambda: len(daemon.worker_pids()) == 2, 10, "the worker to be replaced")
    assert parent_of(started["pid"]) == daemon.pid
    worker = next(w for w in daemon.status()["workers"] if w["pid"] == started["pid"])
    assert worker["restarts"] == 1
    assert request_once(daemon.address()).status == 200


@MODES
def test_self_upgrade_during_a_drain_hands_over_the_draining_generation(
    run_daemon: Callable[..., Daemon], mode: str
) -> None:
    """A generation still draining keeps its deadline under the new supervisor: SIGKILL at
    drain_timeout, counted from the stop signal the old supervisor sent (not sent twice)."""
    from tests.integration.test_upgrade import rewrite

    chosen = f'self_upgrade = "{mode}"'
    daemon = run_daemon(processes=1, extra_supervisor=chosen)
    rewrite(
        daemon,
        processes=1,
        drain_timeout=4,
        env={"WORKER_MODE": "ignore_term"},
        extra_supervisor=chosen,
    )
    code, _ = daemon.upgrade()  # generation 2 ignores SIGTERM
    assert code == 0
    (stubborn,) = daemon.worker_pids(generation=2)
    rewrite(daemon, processes=1, drain_timeout=4, extra_supervisor=chosen)
    mark = daemon.mark()
    code, _ = daemon.upgrade()  # generation 2 drains, for up to 4 s
    assert code == 0
    code, reply = daemon.self_upgrade()
    assert code == 0, reply
    status = daemon.status()
    assert status["draining_generations"] == [2]
    assert pid_alive(stubborn)
    timed_out = daemon.wait_event("generation.drain_timed_out", start=mark, timeout=15)
    assert timed_out["killed"] == [stubborn]
    assert 0 < timed_out["waited_s"] < 4  # the rest of the old supervisor's 4 s
    adopted = next(
        e
        for e in daemon.events[mark:]
        if e.get("event") == "generation.draining"
        and e["generation"] == 2
        and e.get("signalled_before")
    )
    assert adopted["pids"] == [stubborn]
    daemon.wait_event("generation.drained", where=lambda e: e["generation"] == 2, start=mark)
    assert not pid_alive(stubborn)
    assert daemon.status()["draining_generations"] == []


def _assert_failed_self_upgrade_keeps_old_in_charge(
    daemon: Daemon,
    exec_path: Path | str,
    expect_reason: str,
    also: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The self-upgrade fails, the old supervisor and its workers carry on, nothing leaks.

    ``also`` checks more right after the failure, before a good self-upgrade ends the test.
    """
    pid = daemon.pid
    workers = sorted(daemon.worker_pids())
    control = daemon.runtime_dir / "control.sock"
    fds = fd_count(pid, control)
    client = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=120)
    client.start()
    try:
        assert client.wait_for_responses(20, timeout=30)
        code, reply = daemon.upgrade("--self", "--exec", str(exec_path))
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30)
    finally:
        report = client.stop()
    assert code == 1, reply
    assert reply["outcome"] == "failed"
    assert expect_reason in reply["reason"], reply["reason"]
    status = daemon.status()
    assert status["pid"] == pid
    assert status["state"] == "running"
    assert status["last_upgrade"]["reason"] == reply["reason"]
    assert sorted(w["pid"] for w in status["workers"]) == workers
    assert all(w["state"] == "ready" for w in status["workers"])
    assert report.failed == 0, report.describe()
    for spawned in (p for p in reply["phases"] if p["phase"] == "spawned"):
        successor = int(spawned["detail"].split()[1].rstrip(":"))
        assert not pid_alive(successor)
    assert children(pid) == workers  # the failed successor was reaped
    assert fd_count(pid, control) == fds
    also()
    # the workers still report to the old supervisor (its notify sockets were thawed) ...
    victim = workers[0]
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    daemon.wait_event("worker.started", start=mark)
    wait_until(
        lambda: all(w["state"] == "ready" for w in daemon.status()["workers"]),
        10,
        "the restarted worker to say READY=1 to the old supervisor",
    )
    # ... and a good self-upgrade still works afterwards
    code, reply = daemon.self_upgrade()
    assert code == 0, reply
    assert daemon.status()["pid"] == reply["supervisor_pid"]
    assert (reply["supervisor_pid"] == pid) == (daemon.proc.poll() is None)  # in place: same
    return reply


@MODES
def test_self_upgrade_keeps_old_supervisor_when_new_exits_at_once(
    run_daemon: Callable[..., Daemon], mode: str
) -> None:
    daemon = run_daemon(processes=2, extra_supervisor=f'self_upgrade = "{mode}"')
    expected = {
        "in-place": "pre-flight run (/bin/false, pid",
        "new-pid": "exited with status 1 before taking over",
    }[mode]
    reply = _assert_failed_self_upgrade_keeps_old_in_charge(daemon, "/bin/false", expected)
    assert reply["outcome"] == "ok"


@MODES
def test_self_upgrade_keeps_old_supervisor_when_new_hangs(
    run_daemon: Callable[..., Daemon], tmp_path: Path, mode: str
) -> None:
    # 3 s, not 1: the good self-upgrade at the end must start a real handoffd within it, on a
    # loaded machine (1 s failed once under load).
    daemon = run_daemon(
        processes=2, extra_supervisor=f'self_upgrade_timeout = 3\nself_upgrade = "{mode}"'
    )
    hangs = executable(tmp_path / "handoffd-hangs", "#!/bin/sh\nexec sleep 600\n")
    _assert_failed_self_upgrade_keeps_old_in_charge(
        daemon,
        hangs,
        "did not take over within supervisor.self_upgrade_timeout = 3s and was killed",
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("#!/bin/sh\nexit 1\n", "exited with status 1 before answering"),
        ("#!/bin/sh\necho garbage\n", "exited with status 0 before answering"),
        ("\x7fELF garbage, not a program\n", "cannot start the new handoffd"),
        (
            f"#!{sys.executable}\nraise SystemExit('a broken build')\n",
            "exited with status 1 before answering",
        ),
    ],
    ids=["exits-1", "shell-garbage", "not-an-executable", "broken-python"],
)
def test_in_place_self_upgrade_refuses_a_broken_executable_before_the_exec(
    run_daemon: Callable[..., Daemon], tmp_path: Path, text: str, reason: str
) -> None:
    """Item 16: the pre-flight copy of the new executable must pass before the point of no
    return (the exec); a broken one is refused and the old image serves on, same pid."""
    daemon = run_daemon(processes=2)  # auto: no NOTIFY_SOCKET, so in place
    broken = executable(tmp_path / "handoffd-broken", text)
    _assert_failed_self_upgrade_keeps_old_in_charge(daemon, broken, reason)
    assert daemon.proc.poll() is None  # the same process throughout


def test_a_successor_that_answers_garbage_fails_the_upgrade_at_once(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Item 5: a successor that writes garbage on the channel and hangs on was reported only
    after the whole self_upgrade_timeout, as "did not take over"."""
    daemon = run_daemon(processes=2, extra_supervisor="self_upgrade_timeout = 20")
    garbage = executable(
        tmp_path / "handoffd-garbage", "#!/bin/sh\nprintf garbage >&3\nexec sleep 600\n"
    )
    started = time.monotonic()
    _assert_failed_self_upgrade_keeps_old_in_charge(
        daemon, garbage, "broke the handover: handoff channel"
    )
    failed = next(e for e in daemon.events if e.get("event") == "upgrade.finished")
    assert "message 0 is not a JSON object (b'garbage')" in failed["reason"]
    assert failed["duration_s"] < 5, failed
    assert time.monotonic() - started < 60


@MODES
def test_a_worker_that_crashes_during_a_self_upgrade_is_restarted_at_once(
    run_daemon: Callable[..., Daemon], tmp_path: Path, mode: str
) -> None:
    """Item 5: supervision went on only after the handover: with a hanging successor a
    killed worker was restarted after the whole self_upgrade_timeout."""
    daemon = run_daemon(
        processes=2, extra_supervisor=f'self_upgrade_timeout = 8\nself_upgrade = "{mode}"'
    )
    hangs = executable(tmp_path / "handoffd-hangs", "#!/bin/sh\nexec sleep 600\n")
    victim = daemon.worker_pids()[0]
    mark = daemon.mark()
    upgrading, result = self_upgrade_in_background(daemon, hangs)
    try:
        daemon.wait_event("handover.spawned", start=mark)
        os.kill(victim, signal.SIGKILL)
        started = daemon.wait_event("worker.started", start=mark, timeout=4)
        assert upgrading.is_alive(), "the self-upgrade ended before the test could check"
        assert daemon.status()["state"] == "self-upgrading"
        assert started["pid"] != victim
    finally:
        upgrading.join(30)
    ((code, reply),) = result
    assert code == 1, reply
    assert "did not take over within supervisor.self_upgrade_timeout = 8s" in reply["reason"]
    wait_until(
        lambda: [w["state"] for w in daemon.status()["workers"]] == ["ready", "ready"],
        10,
        "the restarted worker's READY=1 to be read once the notify sockets thawed",
    )
    assert started["pid"] in daemon.worker_pids()


def test_a_worker_restarted_during_a_new_pid_handover_is_handed_over_once(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Item 5: a worker the old supervisor restarts after its first snapshot must reach the
    successor (the commit re-snapshots the generations), and only once: the successor must
    not start its own replacement for the worker that died."""
    go = tmp_path / "go"
    os.mkfifo(go)
    waits = python_handoffd(
        tmp_path / "handoffd-waits",
        "import handoff._handover as h\n"
        "real = h.Handover.confirm\n"
        "async def confirm(self, status, timeout):\n"
        "    import sys\n"
        '    print(\'{"event": "test.successor_waiting"}\', file=sys.stderr, flush=True)\n'
        f"    open({str(go)!r}).read()  # until the test says go (blocking is the point)\n"
        "    await real(self, status, timeout)\n"
        "h.Handover.confirm = confirm",
    )
    daemon = run_daemon(processes=2, extra_supervisor=NEW_PID)
    victim, survivor = daemon.worker_pids()
    old = daemon.pid
    mark = daemon.mark()
    upgrading, result = self_upgrade_in_background(daemon, waits)
    try:
        daemon.wait_event("test.successor_waiting", start=mark)  # it has the first state
        os.kill(victim, signal.SIGKILL)
        replacement = daemon.wait_event("worker.started", start=mark, timeout=4)["pid"]
    finally:
        # Non-blocking: ENXIO if the successor is not (or no longer) there to read.
        with contextlib.suppress(OSError):
            os.close(os.open(go, os.O_WRONLY | os.O_NONBLOCK))
        upgrading.join(30)
    ((code, reply),) = result
    assert code == 0, reply
    new = reply["supervisor_pid"]
    daemon.wait_event("supervisor.ready", where=lambda e: e.get("handover_from") == old, start=mark)
    assert daemon.proc.wait(30) == 0
    daemon.pid = new
    wait_until(
        lambda: [w["state"] for w in daemon.status()["workers"]] == ["ready", "ready"],
        10,
        "the replacement's READY=1 (queued in its notify socket) to reach the successor",
    )
    assert sorted(daemon.worker_pids()) == sorted([replacement, survivor])
    started = [e["pid"] for e in daemon.events[mark:] if e.get("event") == "worker.started"]
    assert started == [replacement]
    assert request_once(daemon.address()).status == 200


PARENT = """
import os, signal, subprocess, sys
report, argv = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(argv)
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda n, _frame: child.send_signal(n))
with open(report, "a") as f:
    f.write(f"started {child.pid}\\n")
_, status = os.waitpid(child.pid, 0)
with open(report, "a") as f:
    f.write(f"exited {child.pid} {os.waitstatus_to_exitcode(status)}\\n")
"""


def test_in_place_self_upgrade_keeps_the_pid_a_parent_waits_on(tmp_path: Path) -> None:
    """Item 16: outside systemd nothing follows MAINPID; a parent waiting on handoffd (tini, a
    shell's ``wait``, runit) saw its child exit at every self-upgrade. Now the supervisor
    re-executes itself: same pid, the workers still its children, no request lost."""
    parent = tmp_path / "parent.py"
    parent.write_text(PARENT)
    report = tmp_path / "report"
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", processes=2)
    daemon = Daemon(cfg, base / "run", wrap=[sys.executable, str(parent), str(report)])
    try:
        daemon.wait_ready()
        pid = daemon.pid = daemon.status()["pid"]
        assert report.read_text() == f"started {pid}\n"
        workers = sorted(daemon.worker_pids())
        assert children(pid) == workers
        client = LoadClient(daemon.address(), keepalive=2, fresh=1, max_duration=120)
        client.start()
        try:
            assert client.wait_for_responses(20, timeout=30)
            for _ in range(3):
                mark = daemon.mark()
                code, reply = daemon.self_upgrade()
                assert code == 0, reply
                assert reply["supervisor_pid"] == pid
                assert [p["phase"] for p in reply["phases"]] == [
                    "config_loaded",
                    "snapshot",
                    "spawned",
                    "preflight_passed",
                ]
                ready = daemon.wait_event(
                    "supervisor.ready", where=lambda e: e.get("in_place"), start=mark
                )
                assert ready["handover_from"] == pid
                status = daemon.status()
                assert status["pid"] == pid
                assert status["last_upgrade"]["outcome"] == "ok"
                assert sorted(w["pid"] for w in status["workers"]) == workers
                assert children(pid) == workers  # still its children, across the exec
                seen = client.snapshot().total
                assert client.wait_for_responses(seen + 20, timeout=30), "load stalled"
        finally:
            load = client.stop()
        assert load.failed == 0, load.describe()
        assert report.read_text() == f"started {pid}\n", "the parent saw handoffd exit"
        assert daemon.proc.poll() is None
        # its own children again: a crash is reaped with its real status and restarted
        mark = daemon.mark()
        os.kill(workers[0], signal.SIGKILL)
        exited = daemon.wait_event("worker.exited", start=mark)
        assert exited["reason"] == "was killed by SIGKILL"
        started = daemon.wait_event("worker.started", start=mark)
        assert parent_of(started["pid"]) == pid
    finally:
        code = daemon.stop()
        remove_tree(base)
    assert code == 0
    assert report.read_text() == f"started {pid}\nexited {pid} 0\n"


def test_self_upgrade_is_refused_by_a_handoffd_that_reads_only_older_state(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A downgrade across a state version bump: the new executable refuses, naming both."""
    older = python_handoffd(
        tmp_path / "handoffd-v0",
        "import handoff._handover as h\nh.STATE_VERSION = 0\nh.OLDEST_STATE_VERSION = 0",
    )
    daemon = run_daemon(processes=2)
    _assert_failed_self_upgrade_keeps_old_in_charge(
        daemon,
        older,
        "refused the handover: the running handoffd sent supervisor state version 2, and this "
        "handoffd reads versions 0 to 0 only",
    )


def test_self_upgrade_keeps_the_control_socket_when_new_fails_after_binding_its_own(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The new one bound its staged control socket, then gave up before the commit."""
    fails_late = python_handoffd(
        tmp_path / "handoffd-fails-late",
        "import os, time, handoff._handover as h\n"
        "async def confirm(self, status, timeout):\n"
        "    await h._refuse(self.channel, 'test: gave up after binding its control socket')\n"
        "    time.sleep(600)  # killed by the old supervisor, with its staged socket left behind\n"
        "h.Handover.confirm = confirm",
    )
    daemon = run_daemon(processes=2, extra_supervisor=NEW_PID)  # in place runs no confirm()
    control = daemon.runtime_dir / "control.sock"
    inode = control.stat().st_ino

    def control_socket_untouched() -> None:
        assert control.stat().st_ino == inode
        assert sorted(p.name for p in daemon.runtime_dir.iterdir()) == [
            "control.sock",
            "custody.json",
            "notify",
        ]

    _assert_failed_self_upgrade_keeps_old_in_charge(
        daemon,
        fails_late,
        "refused the handover: test: gave up after binding its control socket",
        also=control_socket_untouched,
    )


def test_self_upgrade_with_an_invalid_config_fails_before_starting_anything(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    good = daemon.config.read_text()
    daemon.config.write_text(good.replace("drain_timeout = 10", 'drain_timeout = "10s"'))
    code, reply = daemon.upgrade("--self")
    assert code == 1, reply
    assert f"config {daemon.config}: program.drain_timeout:" in reply["reason"]
    assert [p["phase"] for p in reply["phases"]] == []
    assert daemon.status()["pid"] == daemon.proc.pid
    assert children(daemon.pid) == daemon.worker_pids()
    daemon.config.write_text(good)
