"""The fd limit: handoffd's own soft RLIMIT_NOFILE raised to the hard limit, workers' left as found.

handoffd holds every listener, one notify socket and often a channel per worker, two generations
of those during an upgrade, the fds workers parked, and its control connections: the common
default soft limit of 1,024 is too low for a busy host. Raising the *soft* limit to the *hard*
one needs no privilege (setrlimit(2)). Workers must not inherit the raised limit: programs built
on select() break on fds above FD_SETSIZE (1,024), so each worker is started with the soft
limit handoffd was started with (the spawn shim's ``ulimit -S -n``).

A successor supervisor (self-upgrade) inherits the raised limit; the original travels to it in
``HANDOFF_WORKER_NOFILE`` so its workers get the same as before.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Carries the soft limit workers get to a successor supervisor.
WORKER_NOFILE_ENV: Final = "HANDOFF_WORKER_NOFILE"


def raise_nofile_limit(environ: MutableMapping[str, str]) -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit; return the soft limit workers get.

    Records that limit in ``environ[WORKER_NOFILE_ENV]`` (the supervisor's environment, which a
    successor inherits); it is removed from what workers see.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    worker_soft = _inherited(environ, soft)
    environ[WORKER_NOFILE_ENV] = str(worker_soft)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("limits.nofile_not_raised", soft=soft, hard=hard, error=str(exc))
            return worker_soft
        log.info("limits.nofile_raised", soft=hard, was=soft, workers_get=worker_soft)
    return worker_soft


def worker_fd_limit(environ: Mapping[str, str]) -> int:
    """The soft RLIMIT_NOFILE workers start with (after ``raise_nofile_limit``)."""
    return _inherited(environ, current_soft_limit())


def _inherited(environ: Mapping[str, str], soft: int) -> int:
    value = environ.get(WORKER_NOFILE_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else soft


def current_soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft
