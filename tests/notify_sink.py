"""A datagram socket standing in for systemd's ``NOTIFY_SOCKET``, for tests of what handoffd sends.

Example::

    sink = NotifySink(tmp_path / "notify", abstract=False)
    daemon = Daemon(..., env={"NOTIFY_SOCKET": sink.address})
    assert sink.next().text == "FDSTORE=1\nFDNAME=http"
"""

from __future__ import annotations

import array
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: Safety net only: every wait ends on a datagram long before.
DEADLINE = 30.0


@dataclass(frozen=True)
class Datagram:
    """One notify message: the raw text (key order matters) and the fds that came with it."""

    text: str
    fds: tuple[int, ...]
    received_at: float

    @property
    def keys(self) -> list[str]:
        return [line.partition("=")[0] for line in self.text.split("\n")]

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.split("\n"))


class NotifySink:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"handoff-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            self.address = str(path)
            self.sock.bind(self.address)
        self.received: list[Datagram] = []

    def next(self, timeout: float = DEADLINE) -> Datagram:
        self.sock.settimeout(timeout)
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError:
            raise AssertionError(
                f"no notify datagram within {timeout}s; so far: {self.texts()}"
            ) from None
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        assert not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
        message = Datagram(data.decode(), tuple(fds), time.monotonic())
        self.received.append(message)
        return message

    def next_non_watchdog(self, timeout: float = DEADLINE) -> Datagram:
        while True:
            message = self.next(timeout)
            if message.text != "WATCHDOG=1":
                return message

    def drop_stored(self, name: str) -> None:
        """Close our copies of the fds stored as ``name``, as systemd does on FDSTOREREMOVE=1."""
        for i, message in enumerate(self.received):
            if message.text == f"FDSTORE=1\nFDNAME={name}":
                for fd in message.fds:
                    os.close(fd)
                self.received[i] = Datagram(message.text, (), message.received_at)

    def texts(self) -> list[str]:
        return [m.text for m in self.received]

    def close(self) -> None:
        for message in self.received:
            for fd in message.fds:
                os.close(fd)
        self.sock.close()


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator[Callable[[bool], NotifySink]]:
    sinks: list[NotifySink] = []

    def make(abstract: bool = False) -> NotifySink:
        sink = NotifySink(tmp_path / f"systemd-notify-{len(sinks)}", abstract)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def socket_inode(pid: int, fd: int) -> int:
    """The inode of handoffd's fd ``fd``, from ``/proc`` (``socket:[INODE]``)."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert link.startswith("socket:["), link
    return int(link[len("socket:[") : -1])
