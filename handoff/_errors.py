"""The error hierarchy of handoffd, and the only place exit codes are defined.

Every error carries the thing at fault (a path, a field, a listener, a pid) in its message and,
where there is one, the fix. Only ``_cli.py`` turns these into exit codes and text.
"""

from __future__ import annotations

from typing import Final

#: Exit codes of the ``handoffd`` command (documented in the README).
EXIT_OK: Final = 0
EXIT_UPGRADE_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
#: ``handoffd status``: the daemon answers, but its current generation is not serving (a crash
#: loop, a worker in backoff or still starting, or a worker tree holding no listener).
EXIT_NOT_SERVING: Final = 4
#: The CLI stopped waiting (``upgrade --timeout``) while handoffd goes on with the request.
EXIT_GAVE_UP: Final = 5
#: Interrupted (Ctrl-C) while waiting, as a shell reports SIGINT (128 + 2); handoffd goes on with
#: a request it has already received.
EXIT_INTERRUPTED: Final = 130


class HandoffError(Exception):
    """Base class of every error handoffd raises on purpose."""

    exit_code: int = EXIT_UPGRADE_FAILED


class ConfigError(HandoffError):
    """The config file cannot be read or does not validate."""

    exit_code = EXIT_USAGE


class ListenerError(HandoffError):
    """A listener cannot be bound, inherited or matched."""

    exit_code = EXIT_USAGE


class ListenPidMismatchError(ListenerError):
    """``LISTEN_FDS`` was set for another process (Go's ``ErrPIDMismatch``).

    The fds were meant for the process ``LISTEN_PID`` names, typically a parent that passed its
    environment on to this child: this process must not adopt (or close) fds 3.. for its own.
    """


class SpawnError(HandoffError):
    """A worker process could not be started, or died before it was ready."""


class ProtocolError(HandoffError):
    """A peer sent something that does not follow a handoffd or systemd wire protocol."""


class UpgradeError(HandoffError):
    """An upgrade failed; the previous generation keeps serving."""


class UsageError(HandoffError):
    """A command-line argument cannot work as given (say, a socket path unix(7) cannot hold)."""

    exit_code = EXIT_USAGE


class DaemonUnreachableError(HandoffError):
    """The CLI cannot reach a running handoffd over its control socket."""

    exit_code = EXIT_UNREACHABLE


class GaveUpWaitingError(HandoffError):
    """The CLI's deadline passed after handoffd received the request; handoffd carries on."""

    exit_code = EXIT_GAVE_UP
