"""The benchmark's app as a WSGI callable, for gunicorn (which owns the HTTP side).

Same version file as bench/apps/app.py, read at import, which gunicorn does in each new worker
after fork (no ``--preload``), so SIGHUP's new workers pick up the new version. ``slow`` sleeps
2 s during import; ``broken`` exits 1 during import (gunicorn respawns such a worker for ever);
``import-error`` raises ImportError, as a bad deploy does (gunicorn's worker exits with its
app-load error and the arbiter halts). Keep-alive and drain are gunicorn's: the
sync worker answers one request per connection and finishes it on SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable

# Same as app.py's SLOW_START.
SLOW_START = 2.0


def _load_version() -> tuple[int, str]:
    path = os.environ.get("BENCH_VERSION_FILE")
    if not path:
        return 0, "ok"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return int(data.get("generation", 0)), str(data.get("mode", "ok"))


GENERATION, MODE = _load_version()
if MODE == "broken":
    print(f"wsgi: version {GENERATION} is broken (mode=broken)", file=sys.stderr)
    sys.exit(1)
if MODE == "import-error":
    raise ImportError(f"wsgi: version {GENERATION} is broken (mode=import-error)")
if MODE == "slow":
    time.sleep(SLOW_START)


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    pid = os.getpid()
    body = f"version {GENERATION} pid {pid}\n".encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Handoff-Generation", str(GENERATION)),
            ("X-Handoff-Pid", str(pid)),
        ],
    )
    return [body]
