"""The one rule for "is this inherited socket the one bound to that address" (sd_is_socket(3)),
for the worker library's ``listen()`` and the supervisor's adoption of inherited fds alike.

Stdlib-only: the worker library imports it, and must not pay for pydantic or trio.

Design notes:
- A wildcard address means "every address of the family": ``:8080`` (``0.0.0.0:8080``) matches a
  socket bound to ``0.0.0.0:8080`` and one bound to ``[::]:8080`` that also accepts IPv4
  (``IPV6_V6ONLY`` off, as ``systemd-socket-activate -l 8080`` and a socket unit's
  ``BindIPv6Only=default`` bind it). A ``[::]`` socket with ``IPV6_V6ONLY`` on serves no IPv4
  client, so it does not match ``0.0.0.0``; ``[::]:8080`` matches either kind of ``[::]`` socket.
- A specific IPv4 address also matches the IPv4-mapped IPv6 socket for it (``[::ffff:a.b.c.d]``).
- Port 0 ("any free port") matches nothing: it names no particular socket.
- A Unix path is compared byte for byte; ``@name`` is the abstract namespace (``unix(7)``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Final

#: The socket type of each address kind of the config.
KIND_TYPES: Final = {
    "tcp": socket.SOCK_STREAM,
    "unix": socket.SOCK_STREAM,
    "udp": socket.SOCK_DGRAM,
    "unixgram": socket.SOCK_DGRAM,
}


def inet_matches(sock: socket.socket, host: str, port: int) -> bool:
    """Whether the IP socket ``sock`` is bound to ``host:port`` (see the module notes)."""
    if port == 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        name = sock.getsockname()
        want = ipaddress.ip_address(host.split("%")[0] or "0.0.0.0")
        have = ipaddress.ip_address(str(name[0]).split("%")[0])
        v6only = sock.family == socket.AF_INET6 and bool(
            sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        )
    except (OSError, ValueError):
        return False
    if name[1] != port:
        return False
    if want.is_unspecified and have.is_unspecified:
        return want.version == have.version or (want.version == 4 and not v6only)
    mapped = have.ipv4_mapped if isinstance(have, ipaddress.IPv6Address) else None
    return have == want or mapped == want


def unix_matches(sock: socket.socket, path: str) -> bool:
    """Whether the Unix socket ``sock`` is bound to ``path`` (``@name``: abstract)."""
    if sock.family != socket.AF_UNIX:
        return False
    try:
        name: str | bytes = sock.getsockname()
    except OSError:
        return False
    have = name if isinstance(name, bytes) else os.fsencode(name)
    want = b"\0" + os.fsencode(path[1:]) if path.startswith("@") else os.fsencode(path)
    return have == want


def address_matches(
    sock: socket.socket, kind: str, *, host: str = "", port: int = 0, path: str = ""
) -> bool:
    """Whether ``sock`` has the type of ``kind`` and is bound to the address given.

    Example::

        address_matches(sock, "tcp", host="0.0.0.0", port=8080)
        address_matches(sock, "unix", path="/run/app.sock")
    """
    try:
        if sock.type != KIND_TYPES[kind]:
            return False
    except OSError:
        return False
    if kind in ("unix", "unixgram"):
        return unix_matches(sock, path)
    return inet_matches(sock, host, port)
