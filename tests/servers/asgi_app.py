"""An ASGI app for uvicorn and hypercorn in the real-server tests; configured by env (__init__.py)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from boot import boot  # top-level: the servers import the apps from this directory

VERSION: str = boot("asgi_app")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    pid = os.getpid()
    body = f"version {VERSION} pid {pid}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-handoff-generation", VERSION.encode()),
                (b"x-handoff-pid", str(pid).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
