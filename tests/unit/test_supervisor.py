"""The upgrade state machine against fake processes, on trio's virtual clock.

The supervisor, its generations, tickets and listeners are the production code; only the
processes are fakes (tests/fakes.py), so drain timeouts and backoffs pass instantly and every
interleaving here is deterministic.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._control import UpgradeEvent, UpgradeReply, UpgradeRequest
from handoff._held import open_listeners
from handoff._supervisor import Supervisor
from tests.daemon import write_config
from tests.fakes import FakeProcess, FakeSpawner


@pytest.fixture
def base():
    # Short: notify socket paths must fit unix(7)'s 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="hsup", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(nursery: trio.Nursery, base: Path, spawner: FakeSpawner, **config) -> Supervisor:
    """A supervisor serving generation 1 of fake workers (probed through the fakes)."""
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", command=["fake-worker"], **config)
    loaded = load_config(cfg)
    sup = Supervisor(loaded, {}, spawner, probe=spawner.probe)
    sup.notify_dir.mkdir(parents=True)
    sup.held.adopt(open_listeners(loaded, {}))

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            await sup.run(task_status=task_status)
        finally:
            sup.held.close_all(unlink=True)

    await nursery.start(run)
    return sup


async def upgrade(sup: Supervisor) -> UpgradeReply:
    async def ignore(event: UpgradeEvent) -> None:
        pass

    return await sup.upgrade(UpgradeRequest(), ignore)


def by_generation(number: int, then):
    """A behaviour: generation ``number``'s workers do ``then``; the others are ready at once."""

    def behaviour(proc: FakeProcess) -> None:
        if proc.generation == number:
            then(proc)
        else:
            proc.notify("READY=1")

    return behaviour


async def test_upgrade_walks_the_phase_table_and_drains_the_old_generation(autojump_clock, base):
    spawner = FakeSpawner()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            sup = await start(nursery, base, spawner)
            reply = await upgrade(sup)
            assert reply.ok, reply
            assert sup.current is not None
            assert sup.current.number == 2
            old = spawner.of_generation(1)
            assert [await p.next_signal() for p in old] == [signal.SIGTERM] * 2
            sup.stop()
    phases = [e["phase"] for e in logs if e["event"] == "supervisor.phase_changed"]
    assert phases == ["running", "spawning", "waiting_ready", "holding", "running", "stopping"]
    assert all(p.returncode is not None for p in spawner.processes)


async def test_a_burst_of_requests_costs_the_running_upgrade_and_one_follow_up(
    autojump_clock, base
):
    spawner = FakeSpawner(behaviour=by_generation(2, lambda p: None))  # 2 waits for the test
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner)
        replies: list[UpgradeReply] = []

        async def one() -> None:
            replies.append(await upgrade(sup))

        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert sup.machine.phase == "waiting_ready"
        for _ in range(5):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        for proc in spawner.of_generation(2):
            proc.notify("READY=1")
        while len(replies) < 6:
            await trio.testing.wait_all_tasks_blocked()
        # generation 1, the running upgrade's 2, and one follow-up (3) for all five.
        assert {p.generation for p in spawner.processes} == {1, 2, 3}
        assert [r.generation for r in replies] == [2, 3, 3, 3, 3, 3]
        assert all(r.ok for r in replies)
        sup.stop()


async def test_a_stopping_supervisor_refuses_upgrades_at_once(autojump_clock, base):
    spawner = FakeSpawner(
        behaviour=by_generation(
            1, lambda p: (p.notify("READY=1"), setattr(p, "exits_on", frozenset()))
        )
    )
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, drain_timeout=30)
        sup.stop()
        start_time = trio.current_time()
        reply = await upgrade(sup)
        assert not reply.ok
        assert reply.reason == "handoffd is stopping"
        assert trio.current_time() == start_time  # answered without waiting for the drain
    assert {p.generation for p in spawner.processes} == {1}


@pytest.mark.parametrize(
    ("then", "reason"),
    [
        (lambda p: p.exit(3), "exited with status 3 before it was ready"),
        (lambda p: None, "was not ready within program.ready_timeout = 5s"),
        (lambda p: p.notify("STATUS=loading"), "was not ready within program.ready_timeout = 5s"),
    ],
    ids=["exits", "never-ready", "times-out-while-talking"],
)
async def test_upgrade_keeps_the_old_generation_when_the_new_one_fails(
    autojump_clock, base, then, reason
):
    spawner = FakeSpawner(behaviour=by_generation(2, then))
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready_timeout=5)
        started = trio.current_time()
        reply = await upgrade(sup)
        assert not reply.ok
        assert reason in (reply.reason or ""), reply
        assert sup.current is not None
        assert sup.current.number == 1
        assert all(not p.signals for p in spawner.of_generation(1))
        if "ready_timeout" in reason:
            assert trio.current_time() - started >= 5
        # the failed generation was stopped like a drain: stop signal first, never SIGKILL first
        for proc in spawner.of_generation(2):
            assert proc.returncode is not None
            assert proc.signals[:1] in ([], [signal.SIGTERM])
        assert sup.status().last_upgrade == reply
        sup.stop()


async def test_a_drain_that_outlasts_drain_timeout_ends_with_sigkill(autojump_clock, base):
    def ignores_sigterm(proc: FakeProcess) -> None:
        proc.exits_on = frozenset()
        proc.notify("READY=1")

    spawner = FakeSpawner(behaviour=by_generation(1, ignores_sigterm))
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, drain_timeout=7)
        assert (await upgrade(sup)).ok
        old = spawner.of_generation(1)[0]
        assert await old.next_signal() == signal.SIGTERM
        term_at = trio.current_time()
        assert await old.next_signal() == signal.SIGKILL
        assert trio.current_time() - term_at == pytest.approx(7, abs=0.01)
        sup.stop()


async def test_a_crashed_worker_is_restarted_with_exponential_backoff(autojump_clock, base):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, processes=1)
        first = spawner.processes[0]
        await spawner.next_spawn()  # generation 1's worker
        times = []
        crashing = first
        for _ in range(4):
            crashed_at = trio.current_time()
            crashing.exit(1)
            crashing = await spawner.next_spawn()
            times.append(round(trio.current_time() - crashed_at, 3))
        # restart_backoff_initial = 0.1, doubling up to restart_backoff_max = 1.0
        assert times == [0.1, 0.2, 0.4, 0.8]
        assert sup.status().workers[0].restarts == 4
        sup.stop()


async def test_a_stop_during_an_upgrade_fails_it_and_drains_both_generations(autojump_clock, base):
    spawner = FakeSpawner(behaviour=by_generation(2, lambda p: None))
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready_timeout=60)
        replies: list[UpgradeReply] = []

        async def one() -> None:
            replies.append(await upgrade(sup))

        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert sup.machine.phase == "waiting_ready"
        sup.stop()
    assert len(replies) == 1
    assert not replies[0].ok
    assert "handoffd is stopping" in (replies[0].reason or "")
    for proc in spawner.processes:
        assert proc.signals[:1] == [signal.SIGTERM], proc
        assert proc.returncode is not None
    assert sup.machine.phase == "stopping"


async def test_a_spawn_error_fails_the_upgrade_with_its_reason(autojump_clock, base):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner)
        spawner.fail_with = "cannot start 'fake-worker': No such file or directory"
        reply = await upgrade(sup)
        assert not reply.ok
        assert "No such file or directory" in (reply.reason or "")
        assert sup.current is not None
        assert sup.current.number == 1
        spawner.fail_with = None
        sup.stop()


async def test_an_upgrade_refuses_a_runtime_dir_change_and_applies_a_pid_file_change(
    autojump_clock, base
):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, extra_supervisor=f'pid_file = "{base}/a.pid"')
        cfg = base / "handoffd.toml"
        write_config(cfg, base / "elsewhere", command=["fake-worker"])
        reply = await upgrade(sup)
        assert not reply.ok
        assert "supervisor.runtime_dir" in (reply.reason or "")
        assert "upgrade --self" in (reply.reason or "")
        assert sup.current is not None
        assert sup.current.number == 1
        write_config(
            cfg,
            base / "run",
            command=["fake-worker"],
            extra_supervisor=f'pid_file = "{base}/b.pid"\nallowed_uids = [4242]',
        )
        reply = await upgrade(sup)
        assert reply.ok, reply
        assert (base / "b.pid").read_text().strip() == str(os.getpid())
        assert 4242 in sup.allowed_uids
        sup.stop()
