"""The control-socket client used by the ``handoffd`` command: plain JSON over a Unix socket.

Deliberately free of trio and pydantic (the daemon validates every request with its pydantic
models in ``_control``): the CLI's start-up time is part of every ``handoffd upgrade`` and
``systemctl reload``.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Final

from ._errors import DaemonUnreachableError, ProtocolError
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

PROTOCOL_VERSION: Final = 1
# The longest reply line we accept (a status of a few thousand workers fits easily).
MAX_REPLY_LINE: Final = 16 * 1024 * 1024


def call(
    path: Path,
    request: Mapping[str, object],
    *,
    on_event: Callable[[dict[str, object]], None] | None = None,
    timeout: float | None = None,
    wait_closed: bool = False,
) -> dict[str, object]:
    """Send one request (``{"v": 1, "op": ...}``) and return the final reply as a dict.

    Lines carrying ``"event"`` are progress and go to ``on_event``. With ``wait_closed`` (for
    ``stop``), also wait until the daemon closes the connection, which it does only as it exits.

    Raises:
        DaemonUnreachableError: nothing answers at ``path``.
        ProtocolError: the daemon answered something that is not a reply.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachableError(
                f"no handoffd is listening on {path} ({exc.strerror}); is it running with this "
                "config? Start it with `handoffd run --config PATH`"
            ) from exc
        except PermissionError as exc:
            raise DaemonUnreachableError(
                f"cannot connect to {path}: permission denied; run as the user handoffd runs as "
                "(or root), or add your uid to supervisor.allowed_uids"
            ) from exc
        sock.sendall(json.dumps({"v": PROTOCOL_VERSION, **request}).encode() + b"\n")
        with sock.makefile("rb") as reader:
            while True:
                line = reader.readline(MAX_REPLY_LINE)
                if not line:
                    raise DaemonUnreachableError(
                        f"handoffd at {path} closed the connection before replying (did it stop?)"
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
                if wait_closed:
                    sock.settimeout(None)
                    while reader.read(65536):
                        pass
                return message
    except TimeoutError as exc:
        raise DaemonUnreachableError(
            f"handoffd at {path} did not answer within {timeout}s"
        ) from exc
    finally:
        sock.close()
