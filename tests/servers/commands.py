"""Command lines that run each real server on handoffd's first listener (fd 3), for the tests.

These are the README's "Running real servers" recipes, with the test apps of this directory
(``wsgi_app``, ``asgi_app``, ``node_server.js``). Python servers run as ``python -m SERVER`` from
the test interpreter, so they are the ones the test environment installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def gunicorn(
    worker_class: str = "sync", workers: int = 1, *, preload: bool = False, bind_fd: bool = False
) -> list[str]:
    """gunicorn on handoffd's listeners; gthread runs 4 threads per worker.

    gunicorn reads ``LISTEN_FDS`` itself when ``LISTEN_PID`` is its pid (handoffd execs it), so
    it needs no ``--bind``; adding ``--bind fd://3`` then makes it take fd 3 twice and exit with
    EBADF (gunicorn 27). ``bind_fd`` is for a wrapper that does not exec: there ``LISTEN_PID`` is
    the wrapper's pid, gunicorn ignores ``LISTEN_FDS``, and ``--bind fd://3`` is the way in.
    """
    cmd = [PY, "-m", "gunicorn", "--workers", str(workers)]
    if bind_fd:
        cmd += ["--bind", "fd://3"]
    cmd += ["--worker-class", worker_class]
    if worker_class == "gthread":
        cmd += ["--threads", "4"]
    if preload:
        cmd.append("--preload")
    cmd += ["--chdir", str(HERE), "--config", str(HERE / "gunicorn_conf.py")]
    # gunicorn >= 27 opens a control socket in ~/.gunicorn by default, shared by every instance.
    cmd += ["--no-control-socket", "--graceful-timeout", "5", "--log-level", "warning"]
    return [*cmd, "wsgi_app:app"]


def uvicorn() -> list[str]:
    return [
        PY,
        "-m",
        "uvicorn",
        "--fd",
        "3",
        "--app-dir",
        str(HERE),
        "--log-level",
        "warning",
        "asgi_app:app",
    ]


def hypercorn() -> list[str]:
    # hypercorn imports the app from its working directory or PYTHONPATH (APP_ENV below).
    return [PY, "-m", "hypercorn", "--bind", "fd://3", "--log-level", "warning", "asgi_app:app"]


def node() -> list[str]:
    return [shutil.which("node") or "node", str(HERE / "node_server.js")]


def node_missing() -> str | None:
    """Why the node tests cannot run here, or None."""
    if shutil.which("node"):
        return None
    return "node is not installed: run ./scripts/test as root (it installs Debian's nodejs) or apt-get install nodejs"


#: The environment every server gets (hypercorn finds asgi_app on PYTHONPATH).
APP_ENV = {"PYTHONPATH": str(HERE)}
