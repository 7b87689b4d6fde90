"""Fd and memory hygiene of the supervisor over many upgrades, and no zombies."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.daemon import Daemon


def supervisor_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def supervisor_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return sorted(found)


def zombie_children(pid: int) -> list[int]:
    zombies = []
    for child in children(pid):
        with open(f"/proc/{child}/stat") as s:
            if s.read().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(child)
    return zombies


@pytest.mark.slow
def test_200_upgrades_leave_fds_rss_and_children_where_they_started(
    run_daemon: Callable[..., Daemon],
) -> None:
    from handoff._control import UpgradeRequest, call
    from tests.daemon import wait_until

    daemon = run_daemon(processes=1)
    pid = daemon.proc.pid
    sock = daemon.runtime_dir / "control.sock"

    def upgrades(n: int) -> None:
        for _ in range(n):
            reply = call(sock, UpgradeRequest(), timeout=30)
            assert reply["ok"], reply

    def settle() -> None:
        # wait until every old generation is drained (the event the daemon logs for it)
        generation = daemon.status()["generation"]
        daemon.wait_event("generation.drained", where=lambda e: e["generation"] == generation - 1)
        # ... and until what follows a drain (closing the drained workers' sockets, rewriting
        # the custody record through a temp file) is done: the same fds on two looks in a row.
        seen: list[int] = []

        def steady() -> bool:
            seen.append(supervisor_fds(pid))
            return len(seen) >= 2 and seen[-1] == seen[-2]

        wait_until(steady, 10, "the supervisor's fds to settle after the drain")

    upgrades(20)  # warm up: imports, caches and allocator arenas reach their steady size
    settle()
    fds0, rss0 = supervisor_fds(pid), supervisor_rss_kib(pid)
    upgrades(200)
    settle()
    fds1, rss1 = supervisor_fds(pid), supervisor_rss_kib(pid)
    assert daemon.status()["generation"] == 221
    assert fds1 == fds0, f"supervisor fds {fds0} -> {fds1}: {os.listdir(f'/proc/{pid}/fd')}"
    assert rss1 - rss0 < 2048, f"supervisor RSS grew {rss0} -> {rss1} KiB over 200 upgrades"
    assert zombie_children(pid) == []
    assert children(pid) == sorted(daemon.worker_pids())


def context_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def blocked_in_epoll(pid: int) -> bool:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read().strip() == "do_epoll_wait"


def epoll_timeout_ms(pid: int) -> int | None:
    """The timeout argument of the epoll_wait the process sleeps in (x86_64 numbering)."""
    with open(f"/proc/{pid}/syscall") as f:
        fields = f.read().split()
    if fields[0] in ("232", "281"):  # epoll_wait, epoll_pwait
        return int(fields[4], 16)
    return None


def test_idle_supervisor_makes_no_wakeups(run_daemon: Callable[..., Daemon]) -> None:
    """No timers, no polling: an idle supervisor sleeps in epoll until something happens.

    The two-second window is the measurement, not a synchronisation: nothing is awaited in it.
    """
    import time

    from tests.daemon import wait_until

    daemon = run_daemon(processes=1)
    pid = daemon.proc.pid
    wait_until(lambda: blocked_in_epoll(pid), 10, "the supervisor to block in epoll_wait")
    before = context_switches(pid)
    time.sleep(2.0)
    after = context_switches(pid)
    assert after - before == 0, f"idle supervisor woke up {after - before} times in 2 s"
    timeout = epoll_timeout_ms(pid)
    if timeout is not None:  # trio's "forever" is a day: no deadline is pending at all
        assert timeout >= 3_600_000, f"epoll_wait timeout {timeout} ms: some timer is armed"
