"""Rolling upgrades (strategy = "rolling") on fake processes and trio's virtual clock."""

from __future__ import annotations

import signal

import trio
import trio.testing

from tests.fakes import FakeProcess, FakeSpawner
from tests.unit.test_supervisor import base as base
from tests.unit.test_supervisor import start, upgrade

ROLLING = 'strategy = "rolling"\nmax_surge = 1'


def live_trees(spawner: FakeSpawner) -> int:
    return len(spawner.live())


async def test_rolling_replaces_one_worker_at_a_time_and_never_exceeds_processes_plus_surge(
    autojump_clock, base
):
    spawner = FakeSpawner()
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, live_trees(spawner))
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, processes=4, hold=1.0, extra_program=ROLLING)
        nursery.start_soon(watch)
        started = trio.current_time()
        reply = await upgrade(sup)
        assert reply.ok, reply
        # four batches, each held for a second
        assert trio.current_time() - started >= 4.0
        assert most <= 5
        assert sup.current is not None
        assert sup.current.number == 2
        assert sorted(p.generation for p in spawner.live()) == [2, 2, 2, 2]
        # every worker of generation 1 was stopped by its stop signal, one batch at a time
        old = spawner.of_generation(1)
        assert all(p.signals[:1] == [signal.SIGTERM] for p in old)
        phases = [p.phase for p in reply.phases]
        assert phases.count("holding") == 4
        nursery.cancel_scope.cancel()


async def test_a_failure_in_batch_2_stops_the_new_workers_and_rolls_the_replaced_one_back(
    autojump_clock, base
):
    def behaviour(proc: FakeProcess) -> None:
        if proc.generation == 2 and proc.environ["HANDOFF_WORKER"] == "1":
            proc.exit(1)  # slot 1 of generation 2: the second batch
        else:
            proc.notify("READY=1")

    spawner = FakeSpawner(behaviour=behaviour)
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, processes=4, hold=0.5, extra_program=ROLLING)
        reply = await upgrade(sup)
        assert not reply.ok
        assert "rolling upgrade failed in batch 2 of 4" in (reply.reason or ""), reply.reason
        assert "1 worker(s) of generation 1 it had replaced were started again" in (
            reply.reason or ""
        )
        await trio.testing.wait_all_tasks_blocked()
        # generation 1 serves with all four workers again; nothing of generation 2 is left
        assert sup.current is not None
        assert sup.current.number == 1
        assert sorted(p.generation for p in spawner.live()) == [1, 1, 1, 1]
        assert len(spawner.of_generation(1)) == 5  # the replaced one was started again
        assert sup.status().serving
        nursery.cancel_scope.cancel()
