"""LISTEN_FDS in: the fds a service manager passed, read as sd_listen_fds(3) does.

Standard library only: workers read these variables as well as handoffd, and a worker must not
load the daemon's dependencies (DESIGN.md "Layout", the worker wing). Pure: the environment is an
argument, so tests never touch ``os.environ``. Records are ``NamedTuple``s, not dataclasses,
whose import costs a worker more than the rest of the library (bench/worker_import.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple, final

if TYPE_CHECKING:
    from collections.abc import Mapping

# sd_listen_fds(3): passed fds start at 3 (SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START: Final = 3


@final
class InheritedFd(NamedTuple):
    """One fd passed by a service manager, with its name (``unknown`` if none was given)."""

    fd: int
    name: str


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[InheritedFd] | None:
    """Read ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` the way sd_listen_fds(3) does.

    Returns None when the variables are absent or meant for another process (``LISTEN_PID`` is
    not ``pid``), and the fds with names otherwise. Names beyond ``LISTEN_FDNAMES`` are
    ``unknown``, as in libsystemd.

    Raises:
        ValueError: when the variables are present for this pid but malformed.
    """
    if "LISTEN_FDS" not in environ:
        return None
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        # sd_listen_fds(3) takes fds only for the pid named: a stray LISTEN_FDS left in a shell
        # must not make us adopt (or close) whatever fds 3.. happen to be.
        return None
    try:
        if int(listen_pid) != pid:
            return None
    except ValueError:
        raise ValueError(f"LISTEN_PID={listen_pid!r} is not a process id") from None
    try:
        count = int(environ["LISTEN_FDS"])
    except ValueError:
        raise ValueError(f"LISTEN_FDS={environ['LISTEN_FDS']!r} is not a number") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count} is negative")
    names_value = environ.get("LISTEN_FDNAMES")
    names = names_value.split(":") if names_value else []
    return [
        InheritedFd(
            fd=SD_LISTEN_FDS_START + i, name=names[i] if i < len(names) and names[i] else "unknown"
        )
        for i in range(count)
    ]
