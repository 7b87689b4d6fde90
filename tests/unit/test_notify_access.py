"""Who may speak for a worker on its notify socket: the rule of ``_notify_access`` on recorded
``/proc`` data, and the generation refusing, counting and logging what it rejects (fakes).

The process trees below are written as proc(5) ``stat`` lines, as they were read on Linux 6.18:
``pid (comm) state ppid pgrp session ...``. handoffd is pid 100, the worker 200 (leading
process group 200).
"""

from __future__ import annotations

import array
import dataclasses
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._held import open_listeners
from handoff._notify import NotifyReceiver
from handoff._notify_access import (
    LINUX_FACTS,
    REAPED_WINDOW,
    Attribution,
    NotifySender,
    ProcStat,
    ReapedOrphan,
    WorkerTree,
    attribute_sender,
    parse_fdinfo_pid,
    parse_stat,
)
from handoff._supervisor import Supervisor
from tests.daemon import write_config
from tests.fakes import FakeProcess, FakeSpawner

SUPERVISOR, WORKER, OTHER_WORKER = 100, 200, 300

# Recorded: a worker's shell (200) ran systemd-notify (201); python (210) forked 211, 211 forked
# 212 and exited (212 reparented to handoffd, still in group 200); 213 did setsid and lost its
# parent; 400 is a login shell of the same uid (its parent sshd 399, then init), 401 its child
# that joined the worker's group with setpgid; 300 is another worker of handoffd.
RECORDED_STAT: Mapping[int, str] = {
    200: "200 (sh) S 100 200 90 0 -1 4194304 120 0 0 0 0 0 0 0 20 0 1 0 5000 2674688 212",
    201: "201 (systemd-notify) S 200 200 90 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 5010",
    210: "210 (python3) S 200 200 90 0 -1 4194304 900 0 0 0 3 1 0 0 20 0 1 0 5020",
    212: "212 (python3 -c) S 100 200 90 0 -1 4194368 12 0 0 0 0 0 0 0 20 0 1 0 5030",
    213: "213 (a (b) c) S 100 213 213 0 -1 4194368 12 0 0 0 0 0 0 0 20 0 1 0 5040",
    220: "220 (worker) S 210 200 90 0 -1 4194304 12 0 0 0 0 0 0 0 20 0 1 0 5050",
    300: "300 (sh) S 100 300 90 0 -1 4194304 120 0 0 0 0 0 0 0 20 0 1 0 5000",
    399: "399 (sshd) S 1 399 399 0 -1 4194560 300 0 0 0 0 0 0 0 20 0 1 0 100",
    400: "400 (bash) S 399 400 400 34816 400 4194304 700 0 0 0 0 0 0 0 20 0 1 0 2000",
    401: "401 (python3) S 400 200 400 34816 400 4194304 700 0 0 0 0 0 0 0 20 0 1 0 2100",
    500: "500 (zombie) Z 200 200 90 0 -1 4227084 0 0 0 0 0 0 0 0 20 0 1 0 5100",
}


class Facts:
    """Recorded ``/proc``; ``pidfds`` maps a pidfd to the pid(s) its fdinfo shows, in turn."""

    def __init__(
        self,
        stats: Mapping[int, str] = RECORDED_STAT,
        pidfds: Mapping[int, list[int]] | None = None,
        on_stat: Callable[[int, int], str | None] | None = None,
    ) -> None:
        self.stats = dict(stats)
        self.pidfds = {fd: list(pids) for fd, pids in (pidfds or {}).items()}
        self.on_stat = on_stat
        self.reads = 0

    def stat(self, pid: int) -> ProcStat | None:
        self.reads += 1
        text = self.on_stat(pid, self.reads) if self.on_stat else self.stats.get(pid)
        return parse_stat(text) if text is not None else None

    def pidfd_pid(self, pidfd: int) -> int | None:
        pids = self.pidfds[pidfd]
        return pids.pop(0) if len(pids) > 1 else pids[0]


def tree(**overrides: object) -> WorkerTree:
    values: dict[str, object] = {
        "pid": WORKER,
        "inode": 7200,
        "alive": True,
        "supervisor_pid": SUPERVISOR,
        "workers": frozenset({WORKER, OTHER_WORKER}),
        "reaped": (),
        "now": 1000.0,
    }
    values.update(overrides)
    return WorkerTree(**values)  # type: ignore[arg-type]


def judge(sender: NotifySender, worker: WorkerTree | None = None, facts: Facts | None = None):
    return attribute_sender(sender, worker or tree(), facts or Facts())


def test_parse_stat_reads_past_a_command_with_spaces_and_parentheses() -> None:
    assert parse_stat(RECORDED_STAT[213]) == ProcStat(state="S", ppid=100, pgid=213)
    assert parse_stat(RECORDED_STAT[500]) == ProcStat(state="Z", ppid=200, pgid=200)
    assert parse_stat("garbage") is None
    assert parse_stat("1 (x) S nope 1") is None


def test_parse_fdinfo_pid_reads_the_pid_and_minus_one_once_reaped() -> None:
    alive = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t103108\nPid:\t5741\nNSpid:\t5741\n"
    assert parse_fdinfo_pid(alive) == 5741
    assert parse_fdinfo_pid("pos:\t0\nPid:\t-1\nNSpid:\t-1\n") == -1
    assert parse_fdinfo_pid("pos:\t0\n") is None


@pytest.mark.parametrize(
    ("pid", "how"),
    [
        (WORKER, "the worker"),
        (201, "a descendant of the worker (201 → 200)"),  # systemd-notify run by its shell
        (220, "a descendant of the worker (220 → 210 → 200)"),
        (500, "a descendant of the worker (500 → 200)"),  # exited, not reaped yet
        (212, "a member of the worker's process group reparented to handoffd (212)"),
    ],
)
def test_the_worker_and_its_tree_are_accepted(pid: int, how: str) -> None:
    verdict = judge(NotifySender(pid=pid, uid=1000))
    assert (verdict.accepted, verdict.reason) == (True, how)


@pytest.mark.parametrize(
    ("pid", "why"),
    [
        (0, "without the sender's credentials"),
        (400, "not in the worker's tree (its parents: 400 → 399 → init)"),
        # In the worker's process group (setpgid within a session), but its parents lead away.
        (401, "not in the worker's tree (its parents: 401 → 400 → 399 → init)"),
        (OTHER_WORKER, "it is another worker (pid 300), not this one"),
        (213, "reparented to handoffd from process group 213, not the worker's (200)"),
        (SUPERVISOR + 1, "had exited and been reaped before its message was read"),
    ],
)
def test_processes_outside_the_tree_are_refused(pid: int, why: str) -> None:
    stats = {**RECORDED_STAT, SUPERVISOR: "100 (handoffd) S 1 100 90 0 -1 0 0 0"}
    verdict = judge(NotifySender(pid=pid, uid=1000), facts=Facts(stats))
    assert not verdict.accepted
    assert why in verdict.reason


def test_where_datagrams_carry_no_credentials_nothing_is_judged() -> None:
    verdict = judge(NotifySender(pid=0, unverifiable="darwin attaches no sender credentials"))
    assert (verdict.accepted, verdict.reason) == (
        True,
        "not judged: darwin attaches no sender credentials",
    )


def test_a_worker_that_has_exited_no_longer_vouches_for_its_pid() -> None:
    verdict = judge(NotifySender(pid=WORKER), tree(alive=False))
    assert not verdict.accepted
    assert "the worker has exited" in verdict.reason


def test_a_sender_reaped_by_handoffd_from_the_worker_group_counts_within_the_window() -> None:
    orphan = ReapedOrphan(pid=777, pgid=WORKER, inode=9777, at=999.5)
    facts = Facts(pidfds={5: [-1]})
    sender = NotifySender(pid=777, pidfd=5, inode=9777)
    verdict = judge(sender, tree(reaped=(orphan,)), facts)
    assert verdict.accepted
    assert "handoffd reaped 0.500s before its message was read" in verdict.reason
    # Too late, another process with the same pid, another group, no pidfd inode recorded:
    late = tree(reaped=(orphan,), now=999.5 + REAPED_WINDOW + 0.1)
    assert not judge(sender, late, facts).accepted
    assert not judge(
        NotifySender(pid=777, pidfd=5, inode=1), tree(reaped=(orphan,)), facts
    ).accepted
    elsewhere = ReapedOrphan(pid=777, pgid=OTHER_WORKER, inode=9777, at=999.5)
    verdict = judge(sender, tree(reaped=(elsewhere,)), facts)
    assert not verdict.accepted
    assert "reaped by handoffd from process group 300, not the worker's (200)" in verdict.reason
    # Without a pidfd (an older kernel) the record's pid and group decide alone.
    assert judge(NotifySender(pid=777), tree(reaped=(orphan,)), Facts()).accepted


def test_a_sender_reaped_by_someone_else_is_refused_with_the_fix() -> None:
    verdict = judge(NotifySender(pid=777, pidfd=5, inode=9777), facts=Facts(pidfds={5: [-1]}))
    assert not verdict.accepted
    assert "systemd-notify without --no-block" in verdict.reason
    # Linux 6.5 to 6.16: no pidfd for a reaped sender, an error in SCM_PIDFD instead.
    assert not judge(NotifySender(pid=201, reaped=True)).accepted


def test_a_pid_reused_after_the_sender_was_reaped_is_not_taken_for_the_sender() -> None:
    # The sender (pid 201, not in the tree) was reaped and 201 now names systemd-notify under the
    # worker's shell: the pidfd says the sender is gone, so /proc's 201 does not speak for it.
    verdict = judge(NotifySender(pid=201, pidfd=5, inode=1), facts=Facts(pidfds={5: [-1]}))
    assert not verdict.accepted
    # Reaped while the walk read /proc: the walk's "descendant" is dropped for the same reason.
    verdict = judge(NotifySender(pid=201, pidfd=5, inode=1), facts=Facts(pidfds={5: [201, -1]}))
    assert not verdict.accepted
    assert "reaped before its message was read" in verdict.reason


def test_a_worker_that_exited_since_it_sent_is_recognised_by_its_pidfd() -> None:
    facts = Facts(pidfds={5: [-1]})
    assert judge(NotifySender(pid=WORKER, pidfd=5, inode=7200), facts=facts).accepted
    # A process that had the worker's pid before it: another pidfs inode.
    assert not judge(NotifySender(pid=WORKER, pidfd=5, inode=1), facts=facts).accepted


def test_a_parent_that_changes_under_the_walk_is_looked_at_again() -> None:
    # 220's parent 210 exits mid-walk: 220 is reparented to handoffd, still in the group.
    def changing(pid: int, reads: int) -> str | None:
        if pid == 220 and reads > 2:
            return "220 (worker) S 100 200 90 0 -1 4194304 12 0 0 0"
        return RECORDED_STAT.get(pid)

    verdict = judge(NotifySender(pid=220), facts=Facts(on_stat=changing))
    assert verdict.accepted
    assert verdict.reason == "a member of the worker's process group reparented to handoffd (220)"

    def flapping(pid: int, reads: int) -> str | None:
        if pid == 220:
            return f"220 (worker) S {600 + reads} 200 90 0 -1 4194304 12 0 0 0"
        return "600 (x) S 210 200 90 0 -1 0 0 0"

    verdict = judge(NotifySender(pid=220), facts=Facts(on_stat=flapping))
    assert not verdict.accepted
    assert "parents kept changing" in verdict.reason


async def test_the_receiver_hands_the_judge_the_senders_pidfd_and_closes_it(base: Path) -> None:
    receiver = NotifyReceiver.bind(str(base / "notify"))
    seen: list[tuple[NotifySender, int | None]] = []

    def judge_open(sender: NotifySender) -> Attribution:
        pid_now = LINUX_FACTS.pidfd_pid(sender.pidfd) if sender.pidfd is not None else None
        seen.append((sender, pid_now))
        return Attribution(False, "test")

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", receiver.path)
        with trio.fail_after(5):
            message = await receiver.receive(judge_open)
    finally:
        receiver.close()
    [(sender, pid_now)] = seen
    assert (sender.pid, sender.uid) == (os.getpid(), os.getuid())
    assert message.sender == dataclasses.replace(sender, pidfd=None)
    assert not message.accepted
    if sender.pidfd is not None:  # Linux 6.5+: SCM_PIDFD, open while judged, closed after
        assert pid_now == os.getpid()
        assert sender.inode is not None
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(sender.pidfd)


# --- the generation: refused datagrams are never applied, counted and logged, rate-limited ---


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="hna", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(nursery: trio.Nursery, base: Path, spawner: FakeSpawner) -> Supervisor:
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", command=["fake-worker"], processes=1, ready_timeout=60)
    loaded = load_config(cfg)
    sup = Supervisor(loaded, {}, spawner, probe=spawner.probe)
    sup.notify_dir.mkdir(parents=True)
    sup.held.adopt(open_listeners(loaded, {}))

    async def run() -> None:
        try:
            await sup.run()
        finally:
            sup.held.close_all(unlink=True)

    nursery.start_soon(run)
    return sup


def intruder(proc: FakeProcess) -> None:
    """The worker's datagrams come from a process outside its tree (the worker never notifies)."""
    proc.tree = frozenset()


async def test_datagrams_from_outside_the_tree_are_never_applied_and_logged_once_per_10s(
    autojump_clock: trio.abc.Clock, base: Path
) -> None:
    spawner = FakeSpawner(behaviour=intruder)
    read_end, write_end = os.pipe()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            sup = await start(nursery, base, spawner)
            proc = await spawner.next_spawn()
            proc.notify("READY=1\nSTATUS=owned")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                fds = array.array("i", [write_end])
                s.sendmsg(
                    [b"FDSTORE=1\nFDNAME=stolen"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
                    0,
                    proc.environ["NOTIFY_SOCKET"],
                )
            os.close(write_end)
            await trio.sleep(1)
            assert sup.gens.starting is not None
            [slot] = sup.gens.starting.slots
            assert (slot.state, slot.status, slot.notified) == ("starting", None, False)
            assert slot.notify_rejected == 2
            assert sup.parked.items() == ()
            assert os.read(read_end, 1) == b""  # every copy of the write end was closed
            await trio.sleep(10)
            proc.notify("WATCHDOG=1")
            await trio.sleep(1)
            assert slot.notify_rejected == 3
            sup.stop()
    os.close(read_end)
    rejected = [e for e in logs if e["event"] == "notify.rejected"]
    assert [(e["keys"], e["rejected"], e["held_back"]) for e in rejected] == [
        (["READY", "STATUS"], 1, 0),
        (["WATCHDOG"], 3, 1),
    ]
    assert rejected[0]["sender_pid"] == os.getpid()
    assert rejected[0]["sender_uid"] == os.getuid()
    assert "not in the fake worker's tree" in rejected[0]["reason"]
    assert not [e for e in logs if e["event"] == "fd.parked"]
