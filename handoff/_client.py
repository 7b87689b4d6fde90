"""The control-socket client used by the ``handoffd`` command: plain JSON over a Unix socket.

Deliberately free of trio and pydantic (the daemon validates every request with its pydantic
models in ``_control``): the CLI's start-up time is part of every ``handoffd upgrade`` and
``systemctl reload``.

Design notes:
- connect(2) is blocking, bounded by ``SO_SNDTIMEO``. A non-blocking connect to a Unix socket
  whose accept backlog is full fails at once with EAGAIN (unix(7); there is no "in progress" as
  for TCP), and Python's ``settimeout`` makes the socket non-blocking: a daemon that is merely
  busy for a moment would look unreachable.
- A timeout before the request is sent means the daemon is unreachable; after it, the daemon
  has the request and goes on with it, which the caller is told (``GaveUpWaitingError``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from typing import TYPE_CHECKING, Final

from ._errors import DaemonUnreachableError, GaveUpWaitingError, ProtocolError
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

PROTOCOL_VERSION: Final = 1
# The longest reply line we accept (a status of a few thousand workers fits easily).
MAX_REPLY_LINE: Final = 16 * 1024 * 1024
#: How long connect(2) waits for room in the daemon's accept backlog when the caller gives no
#: timeout: a daemon that accepts nothing for this long is hung, not busy.
CONNECT_TIMEOUT: Final = 10.0
#: The reason the daemon gives for an upgrade it did not run (or aborted) because it is
#: stopping (``Supervisor.stop``, ``fail_pending``): then no generation keeps serving.
STOPPING_REASON: Final = "handoffd is stopping"


def call(
    path: Path,
    request: Mapping[str, object],
    *,
    on_event: Callable[[dict[str, object]], None] | None = None,
    on_reply: Callable[[dict[str, object]], None] | None = None,
    timeout: float | None = None,
    wait_closed: bool = False,
) -> dict[str, object]:
    """Send one request (``{"v": 1, "op": ...}``) and return the final reply as a dict.

    Lines carrying ``"event"`` are progress and go to ``on_event``. With ``wait_closed`` (for
    ``stop``), also wait until the daemon closes the connection, which it does only as it exits;
    ``on_reply`` sees the reply before that wait.

    Raises:
        DaemonUnreachableError: nothing answers at ``path``, or the daemon closed the
            connection before its reply.
        GaveUpWaitingError: ``timeout`` passed after the daemon received the request.
        ProtocolError: the daemon answered something that is not a reply.
    """
    op = request.get("op", "request")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC)
    try:
        _connect(sock, path, CONNECT_TIMEOUT if timeout is None else timeout)
        sock.settimeout(timeout)
        sent = True
        try:
            sock.sendall(json.dumps({"v": PROTOCOL_VERSION, **request}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed first (an older handoffd refusing this uid does so at once);
            # what it wrote before closing is still ours to read.
            sent = False
        with sock.makefile("rb") as reader:
            while True:
                try:
                    line = reader.readline(MAX_REPLY_LINE)
                except ConnectionResetError:
                    line = b""
                if not line:
                    if not sent:
                        raise DaemonUnreachableError(
                            f"handoffd at {path} closed the connection before reading the "
                            f"{op} request; it may refuse this user: see its log"
                        )
                    raise DaemonUnreachableError(
                        f"handoffd at {path} closed the connection before answering the {op} "
                        "request: it stopped or crashed; see its log and `handoffd status`"
                    )
                try:
                    message = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProtocolError(
                        f"handoffd at {path} sent a line that is not JSON: {line[:200]!r}"
                    ) from exc
                if not isinstance(message, dict):
                    raise ProtocolError(f"handoffd at {path} sent {message!r}, not an object")
                if "event" in message:
                    if on_event is not None:
                        on_event(message)
                    continue
                if on_reply is not None:
                    on_reply(message)
                if wait_closed:
                    sock.settimeout(None)
                    with contextlib.suppress(ConnectionResetError):
                        while reader.read(65536):
                            pass
                return message
    except TimeoutError as exc:
        raise GaveUpWaitingError(
            f"gave up waiting after {timeout:g}s; the {op} goes on in handoffd at {path}; "
            "see `handoffd status`"
        ) from exc
    finally:
        sock.close()


def _connect(sock: socket.socket, path: Path, timeout: float) -> None:
    """connect(2) ``sock`` to ``path``, waiting at most ``timeout`` for room in the backlog.

    Raises:
        DaemonUnreachableError: saying why, with the fix.
    """
    # unix(7): a blocking connect waits for room in a full backlog for up to SO_SNDTIMEO, then
    # fails with EAGAIN. A zero timeval means "for ever", so a zero timeout waits 1 us.
    usec = max(1, round(timeout * 1_000_000))
    sock.settimeout(None)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", *divmod(usec, 1_000_000))
    )
    try:
        sock.connect(str(path))
    except BlockingIOError as exc:
        raise DaemonUnreachableError(
            f"handoffd at {path} accepted no connection within {timeout:g}s (its backlog stayed "
            "full): it is overloaded or hung; see its log"
        ) from exc
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnreachableError(
            f"no handoffd is listening on {path} ({exc.strerror}); is it running with this "
            "config? Start it with `handoffd run --config PATH`"
        ) from exc
    except NotADirectoryError as exc:
        raise DaemonUnreachableError(
            f"no handoffd can listen on {path}: a directory in that path is a file; check "
            "--socket, or supervisor.runtime_dir in the config"
        ) from exc
    except PermissionError as exc:
        raise DaemonUnreachableError(
            f"cannot connect to {path}: permission denied; run as the user handoffd runs as "
            "(or root), or add your uid to supervisor.allowed_uids"
        ) from exc
    except OSError as exc:
        raise DaemonUnreachableError(
            f"cannot connect to {path}: {exc.strerror or exc}; check --socket, or the control "
            "socket in the config"
        ) from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
