"""The supervisor's end of the sd_notify protocol: the per-worker receiver, and its parser.

Design notes:
- Workers speak the protocol of sd_notify(3) to a datagram socket named by ``NOTIFY_SOCKET``:
  newline-separated ``KEY=VALUE`` assignments, optionally with fds attached (``FDSTORE=1``).
  A path starting with ``@`` is in the abstract namespace.
- The supervisor gives every worker its own socket, so a message is attributed to the worker by the
  socket it arrives on, not by the sender's pid. That is what makes ``systemd-notify --ready`` run
  from a worker's shell count even though its pid is not the worker's, and it is race-free.
- The client that sends (workers, and handoffd to systemd) is ``_sdnotify``, standard library
  only; this module is the daemon's (trio, structlog).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._platform import SOCK_CLOEXEC
from ._sdnotify import SCM_MAX_FD

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# Linux attaches each sender's credentials (SO_PASSCRED) and sets close-on-exec on received fds
# atomically; elsewhere neither exists (``_peercred`` says what guards the notify sockets there).
if sys.platform == "linux":
    _RECV_FLAGS: Final = socket.MSG_CMSG_CLOEXEC
    _SCM_CREDENTIALS: Final = socket.SCM_CREDENTIALS
else:
    _RECV_FLAGS: Final = 0
    _SCM_CREDENTIALS: Final = -1

# A notify datagram is small; systemd itself reads at most PIPE_BUF-ish lines. 64 KiB is far more
# than any sane message and bounds what a misbehaving worker can make us buffer.
NOTIFY_MAX_DATAGRAM: Final = 65536


@final
@dataclass(frozen=True)
class NotifyMessage:
    """One parsed notify datagram; ``fds`` are owned by whoever holds the message."""

    fields: Mapping[str, str]
    fds: tuple[int, ...] = ()
    sender_pid: int | None = None

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def reloading(self) -> bool:
        return self.fields.get("RELOADING") == "1"

    @property
    def watchdog(self) -> bool:
        return self.fields.get("WATCHDOG") == "1"

    @property
    def fdstore(self) -> bool:
        return self.fields.get("FDSTORE") == "1"

    @property
    def fdstore_remove(self) -> bool:
        return self.fields.get("FDSTOREREMOVE") == "1"

    @property
    def fdname(self) -> str:
        # sd_pid_notify_with_fds(3): without FDNAME= the name is "stored".
        return self.fields.get("FDNAME", "stored")


def parse_notify(
    data: bytes, fds: Sequence[int] = (), sender_pid: int | None = None
) -> NotifyMessage:
    """Parse a datagram into a ``NotifyMessage``; lines without ``=`` are ignored as systemd does."""
    parsed: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            parsed[key] = value
    return NotifyMessage(fields=parsed, fds=tuple(fds), sender_pid=sender_pid)


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we received but will not keep; never raises for an fd already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@final
@dataclass
class NotifyReceiver:
    """The supervisor's end of one worker's ``NOTIFY_SOCKET``.

    Owns the bound socket and its path. ``receive`` yields parsed messages; fds attached to a
    message belong to the caller.
    """

    path: str
    sock: trio.socket.SocketType = field(repr=False)

    @classmethod
    def bind(cls, path: str) -> NotifyReceiver:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raw.bind(path)
            if sys.platform == "linux":  # elsewhere the 0700 runtime dir guards it (_peercred)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except BaseException:
            raw.close()
            raise
        return cls(path=path, sock=trio.socket.from_stdlib_socket(raw))

    async def receive(self) -> NotifyMessage:
        """Wait for the next datagram and parse it."""
        fd_space = socket.CMSG_SPACE(SCM_MAX_FD * 4)
        cred_space = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
        while True:
            data, ancdata, flags, _ = await self.sock.recvmsg(
                NOTIFY_MAX_DATAGRAM, fd_space + cred_space, _RECV_FLAGS
            )
            fds: list[int] = []
            pid: int | None = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
                elif level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[0:4], "little", signed=True)
            if not _RECV_FLAGS:
                for fd in fds:  # no MSG_CMSG_CLOEXEC here: close-on-exec right after
                    os.set_inheritable(fd, False)
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                close_fds(fds)
                log.warning("notify.truncated", path=self.path, sender_pid=pid)
                continue
            return parse_notify(data, fds, pid)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
