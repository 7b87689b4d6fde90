"""What this kernel offers handoffd, decided once at start: the process watcher and what degrades.

Three process watchers sit behind the one process seam (``_processes``):

- ``pidfd``: Linux 5.4+ (``pidfd_open`` 5.3, ``waitid(P_PIDFD)`` 5.4, ``pidfd_send_signal``
  5.1): waits and signals on an fd, adopted workers handed over as fds. The full feature set.
- ``kqueue``: macOS and the BSDs: ``EVFILT_PROC``/``NOTE_EXIT`` watches any process by pid,
  children and adopted ones alike (``_portable``).
- ``waitid``: any other POSIX kernel, or Linux before 5.4: one SIGCHLD-driven reaper waits for
  our children (``_portable``). A process that is not our child cannot be watched, so a
  self-upgrade is refused.

``HANDOFF_PLATFORM=portable`` forces the portable watcher (kqueue where it exists, else waitid)
on a kernel that has pidfds: that is how the fallback is tested on Linux.

This module imports only the standard library: the worker library and the CLI client use
``SOCK_CLOEXEC`` from here.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, final

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The environment switch; ``portable`` forces the portable watcher, ``auto`` (or unset) probes.
PLATFORM_ENV: Final = "HANDOFF_PLATFORM"

Watcher = Literal["pidfd", "kqueue", "waitid"]

# socket(2)'s SOCK_CLOEXEC is Linux and BSD only (not macOS). Python makes every socket it
# creates non-inheritable anyway (PEP 446); the flag only makes that atomic where it exists.
if sys.platform == "linux":
    SOCK_CLOEXEC: Final = socket.SOCK_CLOEXEC
else:
    SOCK_CLOEXEC: Final = int(getattr(socket, "SOCK_CLOEXEC", 0))

#: AF_UNIX SOCK_SEQPACKET carries the self-upgrade's handover and ``fd_delivery = "scm_rights"``;
#: macOS has no such socket type (socketpair(2) fails with EPROTONOSUPPORT).
HAS_UNIX_SEQPACKET: Final = sys.platform != "darwin"


@final
@dataclass(frozen=True)
class Degradation:
    """One feature this platform lacks: what does not work as on new Linux, and why."""

    what: str
    why: str

    def text(self) -> str:
        return f"{self.what}: {self.why}"


def pidfd_problem() -> str | None:
    """Why pidfds cannot watch our workers here, or None when they can.

    Probes the calls the pidfd watcher makes: ``pidfd_open`` (Linux 5.3) on our own pid, and
    ``waitid(P_PIDFD)`` (Linux 5.4) on that pidfd, which answers ECHILD (we are not our own
    child) where P_PIDFD exists and EINVAL where it does not.
    """
    if sys.platform == "linux":
        try:
            pidfd = os.pidfd_open(os.getpid())
        except (OSError, AttributeError) as exc:  # AttributeError: a Python built without it
            return f"pidfd_open(2) is not available ({exc}): it needs Linux 5.3"
        try:
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return None
        except OSError as exc:
            return f"waitid(P_PIDFD) failed ({exc.strerror}): it needs Linux 5.4"
        finally:
            os.close(pidfd)
        return None
    else:
        return f"pidfds are Linux only (this is {sys.platform})"


def has_kqueue() -> bool:
    """kqueue(2) with EVFILT_PROC: macOS and the BSDs."""
    if sys.platform == "linux" or sys.platform == "win32":
        return False
    else:
        import select

        return hasattr(select, "kqueue")


def choose_watcher(environ: Mapping[str, str]) -> tuple[Watcher, str | None]:
    """The process watcher to use and, when it is not pidfds, why not.

    Raises:
        ValueError: ``HANDOFF_PLATFORM`` has a value other than ``auto`` or ``portable``; the
            message says which values exist.
    """
    wanted = environ.get(PLATFORM_ENV, "auto") or "auto"
    if wanted not in ("auto", "portable"):
        raise ValueError(
            f"{PLATFORM_ENV}={wanted!r} is not a platform choice; use {PLATFORM_ENV}=portable to "
            "force the portable process watcher, or unset it to use pidfds where the kernel has them"
        )
    problem = f"forced by {PLATFORM_ENV}=portable" if wanted == "portable" else pidfd_problem()
    if problem is None:
        return "pidfd", None
    return ("kqueue" if has_kqueue() else "waitid"), problem


def self_upgrade_refusal(watcher: Watcher) -> str | None:
    """Why ``upgrade --self`` cannot hand the workers over here, or None when it can."""
    if not HAS_UNIX_SEQPACKET:
        return (
            f"self-upgrade is not available on {sys.platform}: the handover channel needs "
            "AF_UNIX SOCK_SEQPACKET, which this kernel lacks; replace the supervisor with a "
            "restart instead (launchctl kickstart -k), and upgrade the workers with "
            "`handoffd upgrade`"
        )
    if watcher == "waitid":
        return (
            "self-upgrade is not available with the waitid process watcher (no pidfds on this "
            "kernel, or HANDOFF_PLATFORM=portable): the new supervisor could not watch workers "
            "that are not its children; restart handoffd to replace it, or run it on Linux 5.4+ "
            "without HANDOFF_PLATFORM=portable"
        )
    return None


def degradations(watcher: Watcher, why_not_pidfd: str | None) -> list[Degradation]:
    """Everything that works differently here than with pidfds on Linux, each with the reason."""
    found: list[Degradation] = []
    if watcher != "pidfd":
        how = {
            "kqueue": "kqueue EVFILT_PROC/NOTE_EXIT, signals by pid while not reaped",
            "waitid": "SIGCHLD + waitid for our children, signals by pid while not reaped",
        }[watcher]
        found.append(Degradation(f"process watcher {watcher} ({how})", why_not_pidfd or ""))
    refusal = self_upgrade_refusal(watcher)
    if refusal is not None:
        found.append(Degradation("self-upgrade refused", refusal))
    if not HAS_UNIX_SEQPACKET:
        found.append(
            Degradation(
                'fd_delivery = "scm_rights" unavailable',
                "it needs AF_UNIX SOCK_SEQPACKET; workers get LISTEN_FDS instead",
            )
        )
    if sys.platform != "linux":
        found += [
            Degradation(
                "notify sender credentials absent",
                "no SCM_CREDENTIALS here; each worker's notify socket sits in handoffd's 0700 "
                "runtime directory, so only our uid and root can send to it",
            ),
            Degradation(
                "process groups instead of a child subreaper",
                "no PR_SET_CHILD_SUBREAPER here: a worker's own children that outlive it go to "
                "init/launchd; a SIGKILL by handoffd reaches the worker's whole process group",
            ),
            Degradation(
                "/proc readiness unavailable",
                "no /proc here: ready must come from the worker (notify, or a delay/port check)",
            ),
        ]
    return found


# Set once by handoffd's start-up (``record``): what ``status`` reports as ``degraded``.
_recorded: list[Degradation] = []


def record(found: list[Degradation]) -> None:
    """Remember this process's degradations for ``status`` (a platform fact: one per process)."""
    _recorded[:] = found


def recorded() -> list[Degradation]:
    """The degradations recorded at start, for ``status``."""
    return list(_recorded)
