"""What the test apps do at import, by ``APP_*`` env (see __init__.py): shared by both apps.

The servers import the apps as top-level modules from this directory (gunicorn ``--chdir``,
uvicorn ``--app-dir``, hypercorn ``PYTHONPATH``), so this is imported as ``boot``.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def boot(app: str) -> str:
    """Fail, wait or arm a crash as the env says; returns the version to answer with."""
    version = os.environ.get("APP_VERSION", "0")
    mode = os.environ.get("APP_MODE", "ok")
    fail_if = os.environ.get("APP_FAIL_IF_EXISTS")
    if mode == "import-error" or (fail_if and os.path.exists(fail_if)):
        raise ImportError(f"tests/servers/{app}: version {version} is broken (APP_MODE={mode})")
    if mode == "exit":
        print(f"{app}: version {version} exits at boot (APP_MODE=exit)", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("APP_IMPORT_DELAY", "0")))
    if mode == "crash-after-ready":
        # The servers accept right after the import; the process dies this long after.
        threading.Timer(float(os.environ.get("APP_CRASH_AFTER", "1")), os._exit, (1,)).start()
    return version
