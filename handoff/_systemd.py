"""systemd's side of handoffd: notify messages, the watchdog and the fd store out.

LISTEN_FDS in is ``_listen_fds`` (standard library only, the workers read it too).

Pure functions take ``environ`` so tests never touch ``os.environ`` (see sd_notify(3),
sd_watchdog_enabled(3)).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._sdnotify import notify

if TYPE_CHECKING:
    from collections.abc import Mapping

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Variables systemd sets for handoffd itself that must never reach a worker: a worker that saw
#: NOTIFY_SOCKET could make systemd think the whole unit stops (STOPPING=1) or is ready too early,
#: and one that saw LISTEN_PIDFDID (systemd v256+, the inode of handoffd's own pidfd) would make
#: a stock libsystemd ignore every fd handoffd passes (sd_listen_fds(3) checks it when set).
SYSTEMD_PRIVATE_VARS: Final = (
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


@final
class SystemdNotifier:
    """handoffd's messages to its own service manager; every method is a no-op without one.

    The environment is captured once at start, because handoffd removes ``NOTIFY_SOCKET`` from
    what its workers see.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = {k: environ[k] for k in ("NOTIFY_SOCKET",) if k in environ}
        self.watchdog_interval = watchdog_interval(environ, os.getpid())
        # The socket (st_dev, st_ino) we last stored under each name: FDSTOREREMOVE=1 removes
        # *every* fd of a name (sd_pid_notify_with_fds(3)), so a listener replaced under the
        # same name must not be removed after its successor was stored.
        self._stored: dict[str, tuple[int, int]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._environ.get("NOTIFY_SOCKET"))

    def send(self, message: str, fds: tuple[int, ...] = ()) -> None:
        """Send without blocking, logging (never raising) when systemd's socket is gone or full:
        serving matters more than telling systemd about it."""
        if not self.enabled:
            return
        try:
            notify(message, fds, environ=self._environ, block=False)
        except OSError as exc:
            log.warning("systemd.notify_failed", message=message.split("\n")[0], error=str(exc))

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def reloading(self, monotonic_usec: int) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def store_fd(self, name: str, fd: int) -> None:
        """Put ``fd`` in the fd store as ``name`` (FileDescriptorStoreMax= must allow it).

        If another socket is stored under ``name`` (a listener whose address changed), it is
        removed first: systemd would otherwise hand both back after a restart.
        """
        identity = _identity(fd)
        previous = self._stored.get(name)
        if previous is not None and previous != identity:
            self.send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self._stored[name] = identity
        self.send(f"FDSTORE=1\nFDNAME={name}", (fd,))

    def remove_fd(self, name: str, fd: int | None = None) -> None:
        """Remove what is stored as ``name``; with ``fd``, only if that socket is what it holds.

        A listener that left the config is removed once its last generation stopped; by then a
        new listener may have been stored under the same name, which must stay.
        """
        if fd is not None and self._stored.get(name, _identity(fd)) != _identity(fd):
            log.debug("systemd.fdstore_kept", fdname=name, reason="a newer socket has the name")
            return
        self._stored.pop(name, None)
        self.send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time than TimeoutStartSec=/TimeoutStopSec= while a long phase runs."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` until cancelled (sd_watchdog_enabled(3)).

        Without ``WatchdogSec=`` this returns at once, so an idle handoffd has no timer at all.
        """
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises, or None when no watchdog is set for this pid (``WATCHDOG_PID`` names another)."""
    usec = environ.get("WATCHDOG_USEC")
    owner = environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("systemd.watchdog_ignored", watchdog_usec=usec, reason="not a number")
        return None
    return value / 2 / 1_000_000 if value > 0 else None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def clean_worker_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without what systemd meant for handoffd (see SYSTEMD_PRIVATE_VARS)."""
    return {k: v for k, v in environ.items() if k not in SYSTEMD_PRIVATE_VARS}


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for ``RELOADING=1``'s ``MONOTONIC_USEC=``."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
