"""Worker programs for the readiness, hold and process-tree tests, chosen with ``READY_MODE``.

They serve HTTP with ``tests/workers.py``'s loop (epoll through ``selectors``) and differ only in
when they announce and when they start waiting on the listeners:

- ``late``: never notifies; waits ``READY_DELAY`` seconds (default 1), then serves.
- ``early``: sends READY=1 at once (as gunicorn's arbiter does), serves only after
  ``READY_DELAY`` seconds (default 1.5).
- ``crash``: READY=1 and serves, then exits 1 after ``CRASH_AFTER`` seconds (default 1).
- ``prefork``: a master holding the listeners forks two children; child ``i`` waits
  ``i * READY_DELAY`` seconds (default 1) and then serves. Nobody notifies. The master waits for
  its children and exits with them.
- ``broken_if``: exits 1 at once while the file ``BROKEN_FILE`` exists, else serves (READY=1).
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workers import notify, serve


def _fds() -> list[int]:
    return list(range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))))


def _prefork(delay: float) -> None:
    children = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            time.sleep(i * delay)
            serve(_fds(), ignore_term=False, announce=False)
            os._exit(0)
        children.append(pid)
    # The group gets the stop signal; the master only outlives its children.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    for _ in children:
        os.wait()


def main() -> None:
    mode = os.environ.get("READY_MODE", "late")
    if mode == "late":
        time.sleep(float(os.environ.get("READY_DELAY", "1")))
        serve(_fds(), ignore_term=False, announce=False)
    elif mode == "early":
        notify("READY=1")
        time.sleep(float(os.environ.get("READY_DELAY", "1.5")))
        serve(_fds(), ignore_term=False, announce=False)
    elif mode == "crash":
        signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(1))
        signal.setitimer(signal.ITIMER_REAL, float(os.environ.get("CRASH_AFTER", "1")))
        serve(_fds(), ignore_term=False, announce=True)
    elif mode == "prefork":
        _prefork(float(os.environ.get("READY_DELAY", "1")))
    elif mode == "broken_if":
        if os.path.exists(os.environ["BROKEN_FILE"]):
            sys.exit(1)
        serve(_fds(), ignore_term=False, announce=True)
    else:
        sys.exit(f"ready_workers: unknown READY_MODE {mode!r}")


if __name__ == "__main__":
    main()
