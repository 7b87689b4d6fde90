"""The supervisor's end of the sd_notify protocol: the per-worker receiver, and its parser.

Design notes:
- Workers speak the protocol of sd_notify(3) to a datagram socket named by ``NOTIFY_SOCKET``:
  newline-separated ``KEY=VALUE`` assignments, optionally with fds attached (``FDSTORE=1``).
  A path starting with ``@`` is in the abstract namespace.
- The supervisor gives every worker its own socket, and a new one per spawn, so a message is
  attributed to the worker by the socket it arrives on. The path is no secret (any process of
  the worker's uid can read it from ``/proc/PID/environ``), so ``receive`` also hands each
  datagram's sender (``SCM_CREDENTIALS``, and ``SCM_PIDFD`` where the kernel has it) to a judge
  while its pidfd is open: ``_notify_access`` accepts only the worker's process tree. That still
  lets ``systemd-notify --ready`` run from a worker's shell count: it is the shell's child.
- The client that sends (workers, and handoffd to systemd) is ``_sdnotify``, standard library
  only; this module is the daemon's (trio, structlog).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._notify_access import NotifySender, pidfd_inode
from ._platform import SOCK_CLOEXEC
from ._sdnotify import SCM_MAX_FD

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._notify_access import Attribution

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# Linux attaches each sender's credentials (SO_PASSCRED) and sets close-on-exec on received fds
# atomically; elsewhere neither exists (``_peercred`` says what guards the notify sockets there).
if sys.platform == "linux":
    _RECV_FLAGS: Final = socket.MSG_CMSG_CLOEXEC
    _SCM_CREDENTIALS: Final = socket.SCM_CREDENTIALS
else:
    _RECV_FLAGS: Final = 0
    _SCM_CREDENTIALS: Final = -1
#: Why no datagram's sender can be judged here (None on Linux, where each carries credentials).
_UNVERIFIABLE: Final = (
    None
    if sys.platform == "linux"
    else f"{sys.platform} attaches no sender credentials to datagrams (the 0700 runtime dir "
    "is the only guard of the notify sockets)"
)

# A notify datagram is small; systemd itself reads at most PIPE_BUF-ish lines. 64 KiB is far more
# than any sane message and bounds what a misbehaving worker can make us buffer.
NOTIFY_MAX_DATAGRAM: Final = 65536


def _so_passpidfd() -> int | None:
    """``SO_PASSPIDFD`` (socket(7), Linux 6.5+), which Python 3.11 does not name.

    76 in asm-generic/socket.h, which every architecture but alpha, mips, parisc and sparc
    uses; on those we do without (the rule falls back to the pid alone).
    """
    if sys.platform == "linux":
        named = getattr(socket, "SO_PASSPIDFD", None)
        if isinstance(named, int):
            return named
        if platform.machine().startswith(("alpha", "mips", "parisc", "sparc")):
            return None
        return 76
    else:
        return None


SO_PASSPIDFD: Final = _so_passpidfd()
# include/linux/socket.h: SCM_PIDFD is 4 on every architecture (SCM_RIGHTS 1, SCM_CREDENTIALS 2);
# elsewhere 4 may be another kind (macOS: SCM_TIMESTAMP_MONOTONIC), so it is never matched there.
SCM_PIDFD: Final = int(getattr(socket, "SCM_PIDFD", 4)) if sys.platform == "linux" else -1


@final
@dataclass(frozen=True)
class NotifyMessage:
    """One parsed notify datagram; ``fds`` are owned by whoever holds the message."""

    fields: Mapping[str, str]
    fds: tuple[int, ...] = ()
    #: From the datagram's credentials (pid 0: it had none); its pidfd is closed by now.
    sender: NotifySender | None = None
    #: What the judge given to ``receive`` said of the sender (None: no judge was given).
    attribution: Attribution | None = None

    @property
    def sender_pid(self) -> int | None:
        return self.sender.pid if self.sender is not None else None

    @property
    def accepted(self) -> bool:
        """Whether the message may be acted upon: its judge accepted the sender."""
        return self.attribution is not None and self.attribution.accepted

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
    data: bytes, fds: Sequence[int] = (), sender: NotifySender | None = None
) -> NotifyMessage:
    """Parse a datagram into a ``NotifyMessage``; lines without ``=`` are ignored as systemd does."""
    parsed: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            parsed[key] = value
    return NotifyMessage(fields=parsed, fds=tuple(fds), sender=sender)


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
            # unix(7): on Linux every datagram then carries its sender's credentials, filled in
            # by the kernel; the sender's pid is how _notify_access knows who speaks. Elsewhere
            # nothing does, and the 0700 runtime dir is the only guard (_peercred).
            if sys.platform == "linux":
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if SO_PASSPIDFD is not None:
                # Older kernels say ENOPROTOOPT: the pid alone identifies the sender there.
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
        except BaseException:
            raw.close()
            raise
        return cls(path=path, sock=trio.socket.from_stdlib_socket(raw))

    async def receive(
        self, judge: Callable[[NotifySender], Attribution] | None = None
    ) -> NotifyMessage:
        """Wait for the next datagram and parse it; ``judge`` decides whether its sender counts.

        The judge runs while the sender's pidfd (if any) is open; it is closed before this
        returns, so a caller owns only the message's ``fds``. A datagram without credentials
        is judged as from pid 0.
        """
        fd_space = socket.CMSG_SPACE(SCM_MAX_FD * 4)
        cred_space = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
        pidfd_space = socket.CMSG_SPACE(4)
        while True:
            data, ancdata, flags, _ = await self.sock.recvmsg(
                NOTIFY_MAX_DATAGRAM, fd_space + cred_space + pidfd_space, _RECV_FLAGS
            )
            fds: list[int] = []
            pid: int | None = None
            uid: int | None = None
            pidfd: int | None = None
            pidfd_error = False
            for level, kind, payload in ancdata:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
                elif kind == _SCM_CREDENTIALS and len(payload) >= 8:
                    pid = int.from_bytes(payload[0:4], "little", signed=True)
                    uid = int.from_bytes(payload[4:8], "little")
                elif kind == SCM_PIDFD and len(payload) >= 4:
                    value = int.from_bytes(payload[0:4], "little", signed=True)
                    # A negative value is the error making it failed (the sender was reaped).
                    pidfd, pidfd_error = (value, False) if value >= 0 else (None, True)
            if not _RECV_FLAGS:
                for fd in fds:  # no MSG_CMSG_CLOEXEC here: close-on-exec right after
                    os.set_inheritable(fd, False)
            try:
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    close_fds(fds)
                    log.warning("notify.truncated", path=self.path, sender_pid=pid)
                    continue
                sender = NotifySender(
                    pid=pid or 0,
                    uid=uid,
                    pidfd=pidfd,
                    inode=pidfd_inode(pidfd) if pidfd is not None else None,
                    reaped=pidfd_error,
                    unverifiable=_UNVERIFIABLE,
                )
                try:
                    attribution = judge(sender) if judge is not None else None
                except BaseException:
                    close_fds(fds)
                    raise
            finally:
                if pidfd is not None:
                    close_fds([pidfd])
            message = parse_notify(data, fds, dataclasses.replace(sender, pidfd=None))
            return dataclasses.replace(message, attribution=attribution)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
