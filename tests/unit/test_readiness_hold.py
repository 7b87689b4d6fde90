"""Observed readiness, the canary hold and ``serving``, against fake processes on a virtual clock.

The fakes say whether a worker's tree is accepting through ``FakeSpawner.probe`` (the
generation's ``ReadinessProbe`` seam); everything above it is the production state machine.
"""

from __future__ import annotations

import signal

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from handoff._control import UpgradeEvent, UpgradeReply, UpgradeRequest
from handoff._readiness import STABLE_FOR
from handoff._supervisor import Supervisor
from tests.daemon import write_config
from tests.fakes import FakeProcess, FakeSpawner
from tests.unit.test_supervisor import base as base
from tests.unit.test_supervisor import start


async def upgrade(
    sup: Supervisor,
    events: list[UpgradeEvent] | None = None,
    holding: trio.Event | None = None,
) -> UpgradeReply:
    """Upgrade, keeping the phase events; ``holding`` is set when the hold begins."""

    async def keep(event: UpgradeEvent) -> None:
        if events is not None:
            events.append(event)
        if holding is not None and event.phase == "holding":
            holding.set()

    return await sup.upgrade(UpgradeRequest(), keep)


def ready_and_accepting(proc: FakeProcess) -> None:
    proc.notify("READY=1")
    proc.accepting = True


async def later(seconds: float, action) -> None:
    await trio.sleep(seconds)
    action()


async def test_a_worker_crashing_during_the_hold_fails_the_upgrade_and_keeps_the_old_one(
    autojump_clock, base
):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="notify", hold=2)
        t0 = trio.current_time()

        def crash_later(proc: FakeProcess) -> None:
            proc.notify("READY=1")
            if proc.generation == 2 and int(proc.environ["HANDOFF_WORKER"]) == 0:
                nursery.start_soon(later, 1.0, lambda: proc.exit(1))

        spawner.behaviour = crash_later
        events: list[UpgradeEvent] = []
        with capture_logs() as logs:
            reply = await upgrade(sup, events)
        assert not reply.ok
        assert reply.reason is not None
        assert reply.reason.startswith(
            "worker 0 of generation 2 exited with status 1 during the hold (1."
        ), reply.reason
        assert reply.reason.endswith("of 2s)")
        assert sup.current is not None
        assert sup.current.number == 1
        assert all(p.signals == [] and p.returncode is None for p in spawner.of_generation(1))
        assert all(p.returncode is not None for p in spawner.of_generation(2))
        assert [e.phase for e in events][-2:] == ["holding", "stopping"]
        assert next(e.detail for e in events if e.phase == "holding") == "2.0s"
        assert 1.0 <= trio.current_time() - t0 < 2.0
        finished = [e for e in logs if e["event"] == "upgrade.finished"]
        assert finished[0]["log_level"] == "warning"
        sup.stop()


async def test_hold_zero_skips_the_hold(autojump_clock, base):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="notify", hold=0)
        events: list[UpgradeEvent] = []
        reply = await upgrade(sup, events)
        assert reply.ok
        assert "holding" not in [e.phase for e in events]
        assert reply.duration_s < 0.01
        sup.stop()


async def test_the_hold_keeps_both_generations_serving_then_the_old_one_drains(
    autojump_clock, base
):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="notify", hold=2)
        old = spawner.of_generation(1)

        async def watch_hold() -> None:
            await holding.wait()
            await trio.sleep(1.9)
            # Late in the hold: the old generation is untouched, the new one serves too.
            assert all(p.signals == [] for p in old)
            assert all(p.returncode is None for p in spawner.of_generation(2))

        holding = trio.Event()
        nursery.start_soon(watch_hold)
        reply = await upgrade(sup, holding=holding)
        assert reply.ok
        assert reply.duration_s >= 2.0  # the upgrade's duration covers the hold
        assert [await p.next_signal() for p in old] == [signal.SIGTERM] * 2
        sup.stop()


async def test_auto_readiness_waits_for_accepting_without_notify(autojump_clock, base):
    spawner = FakeSpawner(behaviour=lambda p: None)  # never notifies
    async with trio.open_nursery() as nursery:

        def accept_after_one_second(proc: FakeProcess) -> None:
            nursery.start_soon(later, 1.0, lambda: setattr(proc, "accepting", True))

        spawner.behaviour = accept_after_one_second
        t0 = trio.current_time()
        sup = await start(nursery, base, spawner, ready="auto", hold=0)
        took = trio.current_time() - t0
        assert 1.0 + STABLE_FOR <= took < 1.0 + STABLE_FOR + 0.2
        assert sup.current is not None
        assert all(s.state == "ready" for s in sup.current.slots)
        sup.stop()


def gunicorn_like(proc: FakeProcess, later_do) -> None:
    proc.notify("READY=1")  # the arbiter says ready before its workers accept
    later_do(1.5, lambda: setattr(proc, "accepting", True))


def accepts_then_notifies(proc: FakeProcess, later_do) -> None:
    proc.notify("STATUS=loading")  # it speaks sd_notify, so READY=1 is required too
    proc.accepting = True
    later_do(3.0, lambda: proc.notify("READY=1"))


@pytest.mark.parametrize(
    ("behaviour", "ready_after"), [(gunicorn_like, 1.5 + STABLE_FOR), (accepts_then_notifies, 3.0)]
)
async def test_auto_needs_accepting_and_ready_from_a_program_that_speaks_sd_notify(
    autojump_clock, base, behaviour, ready_after
):
    async with trio.open_nursery() as nursery:

        def later_do(seconds: float, action) -> None:
            nursery.start_soon(later, seconds, action)

        spawner = FakeSpawner(behaviour=lambda proc: behaviour(proc, later_do))
        t0 = trio.current_time()
        await start(nursery, base, spawner, ready="auto", hold=0)
        assert ready_after <= trio.current_time() - t0 < ready_after + 0.1
        nursery.cancel_scope.cancel()


async def test_auto_falls_back_to_ready_where_nothing_can_be_observed(autojump_clock, base):
    spawner = FakeSpawner(unobservable="io_uring server")
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            sup = await start(nursery, base, spawner, ready="auto", hold=0, processes=2)
            info = sup.status()
            assert all(w.readiness == "READY=1 (fallback: io_uring server)" for w in info.workers)
            assert info.serving
            sup.stop()
    fallbacks = [e for e in logs if e["event"] == "readiness.fallback"]
    assert len(fallbacks) == 1  # once per generation, not per worker
    assert fallbacks[0]["reason"] == "io_uring server"


async def test_accepting_never_falls_back_and_fails_with_the_reason(autojump_clock, base):
    spawner = FakeSpawner(unobservable="/proc is not mounted")
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="notify", hold=0)
        cfg = base / "handoffd.toml"
        write_config(cfg, base / "run", command=["fake-worker"], ready="accepting", ready_timeout=5)
        reply = await upgrade(sup)
        assert not reply.ok
        assert reply.reason is not None
        assert "program.ready_timeout = 5s" in reply.reason
        assert "/proc is not mounted" in reply.reason
        assert sup.current is not None
        assert sup.current.number == 1
        sup.stop()


async def test_a_tree_that_stops_holding_its_listener_during_the_hold_fails_it(
    autojump_clock, base
):
    spawner = FakeSpawner(behaviour=ready_and_accepting)
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="auto", hold=2, processes=1)

        async def close_listener() -> None:
            await holding.wait()
            await trio.sleep(0.5)
            spawner.of_generation(2)[0].holds = False

        holding = trio.Event()
        nursery.start_soon(close_listener)
        reply = await upgrade(sup, holding=holding)
        assert not reply.ok
        assert reply.reason is not None
        assert "worker 0 of generation 2 no longer holds any listener during the hold" in (
            reply.reason
        )
        assert sup.current is not None
        assert sup.current.number == 1
        sup.stop()


async def test_a_busy_worker_does_not_fail_the_hold(autojump_clock, base):
    spawner = FakeSpawner(behaviour=ready_and_accepting)
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="auto", hold=2, processes=1)

        async def busy() -> None:
            await holding.wait()
            spawner.of_generation(2)[0].accepting = False  # serving a request, not in accept

        holding = trio.Event()
        nursery.start_soon(busy)
        reply = await upgrade(sup, holding=holding)
        assert reply.ok, reply.reason
        sup.stop()


async def test_status_is_not_serving_in_backoff_and_forgets_the_dead_workers_status(
    autojump_clock, base
):
    spawner = FakeSpawner(behaviour=lambda p: p.notify("READY=1\nSTATUS=serving"))
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, ready="notify", processes=1)
        await trio.testing.wait_all_tasks_blocked()
        assert sup.status().serving
        assert sup.status().workers[0].status == "serving"
        spawner.behaviour = lambda p: None
        spawner.of_generation(1)[0].exit(1)
        await trio.sleep(0.01)  # inside the 0.1 s restart backoff of write_config
        info = sup.status()
        assert not info.serving
        assert info.not_serving == (
            "worker 0 of generation 1 is waiting to restart after it exited with status 1 "
            "(restarted 1 times)"
        )
        assert info.workers[0].status is None
        sup.stop()
