"""Custody records and recovery (``_custody``) against a real orphan stand-in: a ``sleep`` child
that holds a listening socket, named in a record as a dead handoffd's worker."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._custody import (
    RECORD_NAME,
    RECORD_VERSION,
    CustodyRecord,
    Orphans,
    RecordedGeneration,
    RecordedListener,
    RecordedWorker,
    pidfd_getfd,
    recover_orphans,
    socket_address,
    socket_cookie,
    start_time,
)
from handoff._errors import ListenerError
from handoff._pidfile import write_file_at
from handoff._runtime_dir import open_dir

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from handoff._config import LoadedConfig
    from handoff._custody import GetFd
    from handoff._runtime_dir import HeldDir


class Orphan:
    """A child holding a listening socket, as a worker of a dead handoffd would."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.proc = subprocess.Popen(["sleep", "60"], pass_fds=[self.listener.fileno()])
        self.pid = self.proc.pid
        start = start_time(self.pid)
        assert start is not None
        self.start = start

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.listener.close()


@pytest.fixture
def orphan() -> Iterator[Orphan]:
    each = Orphan()
    yield each
    each.close()


@pytest.fixture
def root(tmp_path: Path) -> Iterator[HeldDir]:
    held = open_dir(tmp_path / "run", "supervisor.runtime_dir")
    os.mkdir(held.real / "notify", 0o700)
    yield held
    held.close()


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedConfig:
    path = tmp_path / "handoffd.toml"
    path.write_text(
        '[[listener]]\nname = "http"\naddress = "127.0.0.1:0"\n'
        '[program]\ncommand = ["sleep", "60"]\nprocesses = 1\n'
    )
    return load_config(path)


def write_record(
    root: HeldDir,
    orphan: Orphan,
    *,
    predecessor: tuple[int, int] = (2**22 + 1, 1),  # above pid_max's default: never alive
    start: int | None = None,
    mode: int = 0o600,
) -> None:
    record = CustodyRecord(
        v=RECORD_VERSION,
        pid=predecessor[0],
        start=predecessor[1],
        config_path="/x/handoffd.toml",
        next_generation=4,
        generations=[
            RecordedGeneration(
                number=3,
                role="current",
                listeners=["http"],
                program={"command": ["sleep", "60"], "processes": 1},
                workers=[
                    RecordedWorker(
                        index=0,
                        pid=orphan.pid,
                        start=orphan.start if start is None else start,
                        notify_path=str(root.real / "notify" / "3.0.0"),
                        state="ready",
                        ever_ready=True,
                    )
                ],
            )
        ],
        listeners=[
            RecordedListener(
                name="http",
                configured="127.0.0.1:0",
                address=socket_address(orphan.listener),
                cookie=socket_cookie(orphan.listener),
            )
        ],
    )
    write_file_at(root.fd, RECORD_NAME, record.model_dump_json().encode(), mode)


def recover(root: HeldDir, loaded: LoadedConfig, getfd: GetFd = pidfd_getfd) -> Orphans | None:
    return recover_orphans(
        root, root.real / "notify", loaded, {}, root.real / "control.sock", getfd=getfd
    )


async def test_the_orphans_listener_is_taken_back_by_cookie_and_its_worker_adopted(
    root: HeldDir, orphan: Orphan, loaded: LoadedConfig
) -> None:
    write_record(root, orphan)
    orphans = recover(root, loaded)
    assert orphans is not None
    try:
        assert orphans.next_generation == 4
        assert orphans.current == 3
        listener = orphans.listeners["http"]
        assert listener.origin == "recovered"
        # the same socket (open file description) as the orphan's, not a new one
        assert socket_cookie(listener.sock) == socket_cookie(orphan.listener)
        assert listener.fd != orphan.listener.fileno()
        (gen,) = orphans.generations
        assert gen.number == 3
        assert not gen.draining
        (worker,) = gen.workers
        assert worker.process is not None
        assert worker.process.pid == orphan.pid
        assert not worker.process.is_child
        # its NOTIFY_SOCKET path answers again
        assert worker.notify is not None
        assert worker.notify.path == str(root.real / "notify" / "3.0.0")
        assert (root.real / "notify" / "3.0.0").is_socket()
    finally:
        orphans.close()


async def test_a_refused_pidfd_getfd_names_the_orphans_and_the_fix(
    root: HeldDir, orphan: Orphan, loaded: LoadedConfig
) -> None:
    write_record(root, orphan)

    def refused(pidfd: int, target: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(ListenerError) as caught:
        recover(root, loaded, refused)
    message = str(caught.value)
    assert f"pids {orphan.pid};" in message
    assert f"kill -TERM {orphan.pid}" in message
    assert "run handoffd as root or with CAP_SYS_PTRACE" in message
    assert orphan.proc.poll() is None  # never signalled
    assert (root.real / RECORD_NAME).exists()  # kept for a start that may take them


async def test_a_record_whose_pids_were_reused_is_ignored_and_removed(
    root: HeldDir, orphan: Orphan, loaded: LoadedConfig
) -> None:
    write_record(root, orphan, start=orphan.start - 1)
    with capture_logs() as logs:
        assert recover(root, loaded) is None
    events = [e["event"] for e in logs]
    assert "custody.pid_reused" in events
    assert "custody.record_ignored" in events
    assert not (root.real / RECORD_NAME).exists()
    assert orphan.proc.poll() is None  # the unrelated process is left alone


async def test_a_live_predecessor_is_refused_not_recovered_from(
    root: HeldDir, orphan: Orphan, loaded: LoadedConfig
) -> None:
    write_record(root, orphan, predecessor=(orphan.pid, orphan.start))
    with pytest.raises(ListenerError, match=f"handoffd pid {orphan.pid} .* is still running"):
        recover(root, loaded)


async def test_a_record_others_could_have_written_is_not_used(
    root: HeldDir, orphan: Orphan, loaded: LoadedConfig
) -> None:
    write_record(root, orphan, mode=0o644)
    with capture_logs() as logs:
        assert recover(root, loaded) is None
    (refused,) = [e for e in logs if e["event"] == "custody.record_refused"]
    assert "mode is 644" in refused["reason"]
