"""The one rule for fd names (``FDNAME=``, ``LISTEN_FDNAMES``), for the worker library and the
supervisor alike.

Stdlib-only: the worker library imports it, and must not pay for pydantic or trio.

Design notes:
- The rule is systemd's ``fdname_is_valid()``: ASCII from space to ``~``, except ``:`` (the
  separator of ``LISTEN_FDNAMES``, sd_listen_fds_with_names(3)), at most 255 characters. A worker
  that parks an fd under systemd's fd store (sd_pid_notify_with_fds(3)) can park it under
  handoffd with the same name, and the other way round.
- systemd accepts the empty name; we do not: an empty entry in ``LISTEN_FDNAMES`` reads back as
  ``unknown`` in libsystemd, so the next generation could not find the fd by its name.
"""

from __future__ import annotations

from typing import Final

#: sd_pid_notify_with_fds(3): FDNAME= is at most 255 characters (systemd's FDNAME_MAX).
FDNAME_MAX: Final = 255
#: The rule in words, for messages that say how to fix a name.
FDNAME_RULE: Final = f"1 to {FDNAME_MAX} printable ASCII characters (space included) without ':'"


def valid_fdname(name: str) -> str | None:
    """Why ``name`` cannot be an fd name, or None when it can.

    Example::

        assert valid_fdname("client-42") is None
        assert valid_fdname("a:b") == "it contains ':' (the LISTEN_FDNAMES separator)"
    """
    if not name:
        return "it is empty"
    if len(name) > FDNAME_MAX:
        return f"it is {len(name)} characters long (at most {FDNAME_MAX})"
    if ":" in name:
        return "it contains ':' (the LISTEN_FDNAMES separator)"
    bad = next((c for c in name if not " " <= c <= "~"), None)
    if bad is not None:
        return f"it contains {bad!r} (only printable ASCII, space included, is allowed)"
    return None
