"""gunicorn config for the real-server tests: the second worker can boot late.

``APP_LATE_WORKER_DELAY`` seconds: every worker after the first of its arbiter (``worker.age``
counts the workers an arbiter has forked, from 1) sleeps that long after the fork, before it
loads the app, so ``-w 2`` has one worker accepting and one still booting.
"""

from __future__ import annotations

import os
import time
from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    delay = float(os.environ.get("APP_LATE_WORKER_DELAY", "0"))
    if worker.age > 1 and delay:
        time.sleep(delay)
