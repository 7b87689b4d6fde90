"""A client connection parked by one generation and served by the next ones (the demo's ticker).

Real handoffd, real demo workers, a real TCP client that never reconnects: every line it gets is
checked, so a lost, repeated or cut byte fails the test.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from tests.daemon import Daemon, pid_alive, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

DEMO = [sys.executable, "-m", "handoff.demo"]
LINE = re.compile(r"(tick|echo ping) (\d+) from generation (\d+) pid (\d+)")


@dataclass
class TickerClient:
    """Sends ``ping K`` every 50 ms on one connection and records every line it gets back."""

    address: tuple[str, int]
    lines: list[tuple[str, str, int, int]] = field(default_factory=list)
    sent: int = 0
    error: str | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=10)
        self.local = self.sock.getsockname()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        while not self._stop.wait(0.05):
            with self._cond:
                self.sent += 1
                number = self.sent
            self.sock.sendall(f"ping {number}\n".encode())

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self._fail("the server closed the connection")
                    return
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    match = LINE.fullmatch(raw.decode())
                    if match is None:
                        self._fail(f"malformed line {raw!r}")
                        return
                    kind, what, gen, pid = match.groups()
                    kind = kind.split()[0]
                    with self._cond:
                        self.lines.append((kind, what, int(gen), int(pid)))
                        self._cond.notify_all()
        except OSError as exc:
            if not self._stop.is_set():
                self._fail(f"connection error: {exc!r}")

    def _fail(self, why: str) -> None:
        with self._cond:
            self.error = why
            self._cond.notify_all()

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate() or self.error is not None, timeout):
                raise AssertionError(f"no {what} within {timeout}s; got {self.lines[-5:]}")
            assert self.error is None, self.error

    def wait_generation(self, generation: int) -> None:
        self.wait_for(
            f"line from generation {generation}",
            lambda: any(gen == generation for _, _, gen, _ in self.lines),
        )

    def finish(self) -> None:
        """Stop pinging, wait for the answer to the last ping, and hang up."""
        self._stop.set()
        self._writer.join(5)
        last = str(self.sent)
        self.wait_for(
            "the answer to the last ping",
            lambda: any(kind == "echo" and what == last for kind, what, *_ in self.lines),
        )
        self.sock.close()
        self._reader.join(5)


def supervisor_fds(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def ticker_names(daemon: Daemon) -> set[str]:
    return {name for name in daemon.status()["parked"] if name.startswith("ticker-")}


@pytest.mark.parametrize("delivery", ["listen_fds", "scm_rights"])
def test_a_parked_connection_keeps_talking_across_three_upgrades(
    run_daemon: Callable[..., Daemon], delivery: str
) -> None:
    daemon = run_daemon(
        processes=2,
        command=DEMO,
        listeners=[("http", "127.0.0.1:0"), ("ticker", "127.0.0.1:0")],
        extra_program=(
            f'fd_delivery = "{delivery}"\n[program.env]\nHANDOFF_DEMO_TICK_INTERVAL = "0.1"\n'
        ),
    )
    baseline = supervisor_fds(daemon)
    client = TickerClient(daemon.address("ticker"))
    try:
        client.wait_for("three ticks", lambda: sum(k == "tick" for k, *_ in client.lines) >= 3)
        wait_until(lambda: len(ticker_names(daemon)) == 1, 10, "the ticker connection to be parked")
        (name,) = ticker_names(daemon)
        # the connection and its state file, both kept by the supervisor
        assert daemon.status()["parked"].count(name) == 2
        for generation in (2, 3, 4):
            old_pids = daemon.worker_pids(generation=generation - 1)
            code, reply = daemon.upgrade()
            assert code == 0, reply
            client.wait_generation(generation)
            for pid in old_pids:
                wait_until(lambda pid=pid: not pid_alive(pid), 20, f"old worker {pid} to exit")
            assert ticker_names(daemon) == {name}, "parked across the upgrade"
        wait_until(
            lambda: supervisor_fds(daemon) == baseline + 2,
            10,
            f"the supervisor to hold its baseline fds plus the 2 parked ({supervisor_fds(daemon)} vs {baseline})",
        )
        client.finish()
    finally:
        client.sock.close()

    assert client.error is None, client.error
    ticks = [int(w) for k, w, _, _ in client.lines if k == "tick"]
    assert ticks == list(range(1, len(ticks) + 1)), f"ticks lost or repeated: {ticks}"
    echoes = [int(w) for k, w, _, _ in client.lines if k == "echo"]
    assert echoes == list(range(1, client.sent + 1)), "every ping answered once, in order"
    generations = [gen for _, _, gen, _ in client.lines]
    assert generations == sorted(generations), "answered by one generation after the other"
    assert set(generations) == {1, 2, 3, 4}
    # ...by worker 0 only once handed over: one pid per adopting generation
    assert len({pid for _, _, gen, pid in client.lines if gen > 1}) == 3

    wait_until(lambda: not ticker_names(daemon), 10, "the name to be unparked after hang-up")
    wait_until(
        lambda: supervisor_fds(daemon) == baseline,
        10,
        f"the supervisor to close the parked fds ({supervisor_fds(daemon)} vs {baseline})",
    )


def test_a_ticker_connection_nobody_takes_over_gets_a_bye_line_and_a_clean_close(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(
        processes=1,
        command=DEMO,
        listeners=[("http", "127.0.0.1:0"), ("ticker", "127.0.0.1:0")],
        extra_program='[program.env]\nHANDOFF_DEMO_TICK_INTERVAL = "0.1"\n',
    )
    with socket.create_connection(daemon.address("ticker"), timeout=10) as conn:
        reader = conn.makefile("rb")
        first = reader.readline().decode()
        assert first.startswith("tick 1 from generation 1 "), first
        wait_until(lambda: len(ticker_names(daemon)) == 1, 10, "the connection to be parked")
        assert daemon.stop() == 0  # no next generation: the server must not leave it hanging
        rest = reader.read().decode().splitlines()
        reader.close()
    assert rest, "the server said nothing before closing"
    assert rest[-1].startswith("bye (nobody takes over: please reconnect) from generation 1 "), rest
    ticks = [int(line.split()[1]) for line in [first, *rest[:-1]]]
    assert ticks == list(range(1, len(ticks) + 1))
