"""Listener addresses: the syntax of the config's ``address`` and of ``handoff.listen()``.

Plain Python (standard library only): the worker library parses addresses too, and a worker
must not load the daemon's dependencies (DESIGN.md "Layout", the worker wing). ``Address`` is a
``NamedTuple`` rather than a dataclass because ``dataclasses`` loads ``inspect``, which would
be most of what a worker pays for the library (bench/worker_import.py).
"""

from __future__ import annotations

import os
import re
from typing import Literal, NamedTuple, final

AddressKind = Literal["tcp", "udp", "unix", "unixgram"]

_HOST_PORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z0-9]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$"
)


@final
class Address(NamedTuple):
    """A parsed listener address.

    ``host:port`` and ``[v6]:port`` (optionally ``tcp://``) are TCP; ``udp://host:port`` is UDP;
    ``unix:/path`` and ``unixgram:/path`` are Unix stream and datagram sockets, where a path
    starting with ``@`` is in the abstract namespace. Port 0 asks the kernel for a free port.
    """

    kind: AddressKind
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.kind in ("unix", "unixgram")

    @property
    def is_abstract(self) -> bool:
        return self.is_unix and self.path.startswith("@")

    def __str__(self) -> str:
        if self.is_unix:
            return f"{self.kind}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = "udp://" if self.kind == "udp" else ""
        return f"{prefix}{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse a listener address; raises ``ValueError`` with the accepted forms on a bad one."""
    forms = "expected host:port, [v6]:port, tcp://host:port, udp://host:port, unix:/path or unixgram:/path"
    for prefix, kind in (("unixgram:", "unixgram"), ("unix:", "unix")):
        if text.startswith(prefix):
            path = text[len(prefix) :]
            if not path or not (path.startswith("/") or path.startswith("@")):
                raise ValueError(
                    f"a {kind} address needs an absolute path or @abstract name; {forms}"
                )
            # sun_path is 108 bytes including the terminating NUL (unix(7)).
            if len(os.fsencode(path)) > 107:
                raise ValueError("the socket path is longer than the 107 bytes unix(7) allows")
            return Address(kind=kind, path=path)  # type: ignore[arg-type]
    kind_tcp: AddressKind = "tcp"
    rest = text
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
    elif text.startswith("udp://"):
        kind_tcp, rest = "udp", text[len("udp://") :]
    m = _HOST_PORT_RE.match(rest)
    if m is None:
        raise ValueError(forms)
    port = int(m["port"])
    if port > 65535:
        raise ValueError("the port must be between 0 and 65535")
    host = m["v6"] if m["v6"] is not None else m["host"]
    if host in ("", "*"):
        host = "0.0.0.0"
    return Address(kind=kind_tcp, host=host, port=port)
