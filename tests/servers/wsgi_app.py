"""A WSGI app for gunicorn in the real-server tests; configured by env (see __init__.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from boot import boot  # top-level: the servers import the apps from this directory

VERSION: str = boot("wsgi_app")


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    pid = os.getpid()
    body = f"version {VERSION} pid {pid}\n".encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Handoff-Generation", VERSION),
            ("X-Handoff-Pid", str(pid)),
        ],
    )
    return [body]
