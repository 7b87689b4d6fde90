"""Self-upgrade pieces against fakes and socketpairs: adopted generations, snapshots, tickets.

The generations, the snapshot and the handover exchange are the production code; workers are
``tests/fakes.py`` processes (virtual clock where no real I/O is involved).
"""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._generation import (
    AdoptedWorker,
    GenerationSpec,
    ParkedFds,
    run_adopted_generation,
)
from handoff._notify import NotifyReceiver
from handoff._tickets import UpgradeTicket
from tests.daemon import write_config
from tests.fakes import FakeProcess, FakeSpawner
from tests.unit.test_supervisor import start, upgrade


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="hsu", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _program(base: Path, **config):
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", command=["fake-worker"], **config)
    return load_config(cfg).config.program


async def test_an_adopted_draining_generation_stops_once_its_workers_exit(autojump_clock, base):
    """Item 6: the successor saw adopted workers exit only after the full drain_timeout (the
    drain waited on an Event the adopted slot had replaced), then logged a SIGKILL of nobody."""
    program = _program(base, processes=2, drain_timeout=30)
    notify_dir = base / "notify"
    notify_dir.mkdir()
    spec = GenerationSpec(
        number=2,
        program=program,
        listeners=(),
        environ={},
        notify_dir=notify_dir,
        backoff_initial=0.1,
        backoff_max=1.0,
        spawner=FakeSpawner(),
    )
    # trio shuffles the order its tasks start in: repeat, so one ordering cannot hide the bug.
    for attempt in range(8):
        procs = [
            FakeProcess(command=["fake-worker"], environ={"HANDOFF_GENERATION": "2"}, fds=[])
            for _ in range(2)
        ]
        workers = [
            AdoptedWorker(
                index=i,
                process=proc,
                notify=NotifyReceiver.bind(str(notify_dir / f"{attempt}.{i}")),
                channel=None,
                state="draining",
                status=None,
                restarts=0,
                last_exit=None,
                ever_ready=True,
            )
            for i, proc in enumerate(procs)
        ]
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                gen = await nursery.start(
                    partial(
                        run_adopted_generation,
                        spec,
                        ParkedFds(),
                        workers,
                        draining=True,
                        drain_remaining=25.0,
                    )
                )
                started = trio.current_time()
                await trio.sleep(1)
                for proc in procs:
                    proc.exit(0)
                await gen.stopped.wait()
                took = trio.current_time() - started
        assert took < 2, f"attempt {attempt}: still draining {took:g}s after its workers exited"
        events = [e["event"] for e in logs]
        assert "generation.drain_timed_out" not in events, logs
        assert all(p.signals == [] for p in procs)  # signalled by the old supervisor, not again


async def test_a_successful_upgrade_finishes_its_ticket_once_with_its_reply(
    autojump_clock, base, monkeypatch
):
    """Item 15: every successful upgrade's ticket was first finished as "failed: handoffd is
    stopping" (in a ``finally``) and then overwritten with the real reply."""
    finished: list[tuple[UpgradeTicket, bool, str | None]] = []
    real_finish = UpgradeTicket.finish

    def observed(self: UpgradeTicket, reply) -> None:
        finished.append((self, reply.ok, reply.reason))
        if self.reply is None:  # record a second call instead of tripping the assertion
            real_finish(self, reply)

    monkeypatch.setattr(UpgradeTicket, "finish", observed)
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner)
        for _ in range(3):
            reply = await upgrade(sup)
            assert reply.ok, reply
        sup.stop()
    assert [(ok, reason) for _, ok, reason in finished] == [(True, None)] * 3
    assert len({id(ticket) for ticket, _, _ in finished}) == 3
