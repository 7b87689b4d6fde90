"""Self-upgrade pieces against fakes and socketpairs: adopted generations, snapshots, tickets.

The generations, the snapshot and the handover exchange are the production code; workers are
``tests/fakes.py`` processes (virtual clock where no real I/O is involved).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._errors import UpgradeError
from handoff._generation import (
    AdoptedWorker,
    Generation,
    GenerationSpec,
    ParkedFds,
    run_adopted_generation,
)
from handoff._handover import STATE_VERSION, SupervisorState, SupervisorView, _exchange, snapshot
from handoff._notify import NotifyReceiver
from handoff._passing_trio import get, put
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


def _spec(base: Path, number: int = 1, **config) -> GenerationSpec:
    notify_dir = base / "notify"
    notify_dir.mkdir(exist_ok=True)
    return GenerationSpec(
        number=number,
        program=_program(base, **config),
        listeners=(),
        environ={},
        notify_dir=notify_dir,
        backoff_initial=0.1,
        backoff_max=1.0,
        spawner=FakeSpawner(),
    )


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


async def test_an_adopted_draining_generation_stops_once_its_workers_exit(autojump_clock, base):
    """Item 6: the successor saw adopted workers exit only after the full drain_timeout (the
    drain waited on an Event the adopted slot had replaced), then logged a SIGKILL of nobody."""
    spec = _spec(base, number=2, processes=2, drain_timeout=30)
    notify_dir = spec.notify_dir
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


async def test_what_a_snapshot_sends_survives_a_worker_exiting_after_it(base):
    """Item 4: the fd set named the supervisor's own fds; a draining worker reaped between the
    snapshot and the send closed its pidfd and notify socket, and the send failed (EBADF)."""
    spec = _spec(base, processes=1)
    gen = Generation(spec, ParkedFds())
    pidfd_stand_in, keep = os.pipe()
    receiver = NotifyReceiver.bind(str(spec.notify_dir / "1.0.1"))
    slot = gen.slots[0]
    slot.process = FakeProcess(command=["w"], environ={}, fds=[], pidfd=pidfd_stand_in)
    slot.notify = receiver
    slot.state = "draining"
    view = SupervisorView(
        config_path=base / "handoffd.toml",
        listeners=(),
        parked=(),
        generations=(gen,),
        current=None,
        next_generation=2,
        retired_listeners=frozenset(),
        last_upgrade=None,
        watchdog_interval=None,
        notify_socket=None,
    )
    expected = {"pidfd": _identity(pidfd_stand_in), "notify": _identity(receiver.sock.fileno())}
    state, fds = snapshot(view)
    # The worker is reaped now, as a draining one may be at any await of the handover.
    os.close(pidfd_stand_in)
    receiver.close()
    os.close(keep)
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        try:
            await put(a, fds, state.model_dump(mode="json"))
        finally:
            for _, fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        received = await get(b)
    try:
        got = {name.rsplit(":", 1)[1]: _identity(fd) for name, fd in received.fds}
    finally:
        received.close()
    assert got == expected
    assert state.generations[0].workers[0].pidfd == "worker:1.0:pidfd"


def _tiny_state() -> SupervisorState:
    return SupervisorState(
        v=STATE_VERSION,
        pid=os.getpid(),
        config_path="/nonexistent/handoffd.toml",
        next_generation=1,
        current=None,
        generations=[],
        listeners=[],
        parked=[],
    )


async def test_a_failed_send_of_the_state_is_reported_at_once_with_its_cause():
    """Item 4: a failed Put was swallowed; the old supervisor then waited the full
    self_upgrade_timeout and blamed a timeout."""
    hangs = FakeProcess(command=["handoffd"], environ={}, fds=[])
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # r is now a closed fd number (nothing opens one before the send)
    with a, b, trio.fail_after(3), pytest.raises(UpgradeError) as caught:
        await _exchange(a, hangs, _tiny_state(), [("x", r)], 30, "the new handoffd")
    assert "cannot send the fd set (Bad file descriptor)" in str(caught.value)


async def test_a_successor_that_answers_garbage_is_reported_at_once_as_the_protocol_error():
    """Item 5: garbage on the channel cost the full self_upgrade_timeout and was reported as
    "did not take over"."""
    hangs = FakeProcess(command=["handoffd"], environ={}, fds=[])
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await b.send(b"garbage")
    with a, b, trio.fail_after(3), pytest.raises(UpgradeError) as caught:
        await _exchange(a, hangs, _tiny_state(), [], 30, "the new handoffd")
    message = str(caught.value)
    assert message.startswith("the new handoffd broke the handover: "), message
    assert "message 0 is not a JSON object (b'garbage')" in message
