"""The peers the benchmark compares: how to start, reload, self-upgrade and stop each one.

Every peer runs the same app (bench/apps/app.py; gunicorn runs bench/apps/wsgi.py, tableflip
bench/apps/go) and learns its version from ``BENCH_VERSION_FILE``. The harness writes the next
version into that file and then calls ``reload()``, so the peer's own reload mechanism is what
makes the new version serve. A reload returns a ``ReloadOutcome`` saying what the peer told its
caller: ``ok``, ``failed`` or ``none`` (it cannot say: a signal was sent and nothing came back).

Each peer's processes live in their own session (``start_new_session``) so ``stop()`` can make
sure none is left, including processes that re-parented themselves (a gunicorn master started
by USR2, a tableflip child), without touching anything the benchmark did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bench.strict_client import RequestFailed, request_once

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
APPS = BENCH / "apps"
APP = APPS / "app.py"
LAUNCH = APPS / "launch.py"
# The venv the project uses: gunicorn, circus and handoffd are installed there.
VENV_BIN = Path(sys.executable).parent
# A peer must serve this soon after start() (the slow version needs 2 s).
START_TIMEOUT = 30.0
# A peer's stop may take this long before its session is killed. The load has ended by then,
# so a drain has nothing left to wait for; a peer still running after this is stuck.
STOP_TIMEOUT = 6.0
# The longest any reload command may block before the harness gives up on it.
RELOAD_TIMEOUT = 40.0


@dataclass(frozen=True)
class ReloadOutcome:
    reported: str  # "ok" | "failed" | "none"
    detail: str = ""


@dataclass
class Requirement:
    kind: str  # "apt" | "pip" | "build"
    name: str


def free_port() -> int:
    """A port the kernel has just handed out; for peers that cannot bind port 0 themselves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: tuple[str, int], timeout: float, generation: int | None = None) -> int:
    """Poll with fresh requests until the peer answers (with ``generation`` if given).

    Returns the generation that answered. Polling with a deadline is how a benchmark learns that
    a peer that exposes no readiness event is up.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            resp = request_once(address, timeout=2.0)
        except RequestFailed as exc:
            last = str(exc)
        else:
            if resp.status == 200 and (generation is None or resp.generation == generation):
                return resp.generation if resp.generation is not None else -1
            last = f"status {resp.status} generation {resp.generation}"
        time.sleep(0.02)
    raise TimeoutError(f"{address} not serving (generation {generation}) after {timeout} s: {last}")


def run_command(
    cmd: list[str], timeout: float = RELOAD_TIMEOUT, **kwargs: object
) -> tuple[int | None, str]:
    """Run a control command; returns (exit code or None on timeout, combined output)."""
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            text=True,
            **kwargs,  # type: ignore[arg-type]
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.stdout
            if isinstance(exc.stdout, str)
            else (exc.stdout or b"").decode(errors="replace")
        )
        return None, out
    return proc.returncode, proc.stdout


@dataclass
class Peer:
    """Base class; subclasses fill in the ClassVars and the four verbs."""

    name: ClassVar[str] = "?"
    summary: ClassVar[str] = ""
    # Why self-upgrade does not apply, or None when the peer has one.
    self_upgrade_na: ClassVar[str | None] = "the peer has no supervisor to replace"
    requires: ClassVar[list[Requirement]] = []
    # Whether the self-upgrade starts new workers (a new version serves) or adopts the old ones.
    self_upgrade_restarts_workers: ClassVar[bool] = True

    workdir: Path
    version_file: Path
    address: tuple[str, int] = ("127.0.0.1", 0)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pgids: list[int] = field(default_factory=list)
    # Processes stop() had to SIGKILL after STOP_TIMEOUT: a peer that does not stop cleanly.
    killed: list[str] = field(default_factory=list)
    # "own": the peer's usual app; "gunicorn": an unmodified gunicorn (GUNICORN_APP) as the
    # app, run the way this peer would run any server (scenarios gunicorn-slow/-broken).
    app: str = "own"
    # Why the peer cannot run gunicorn as its app, or None when it can.
    gunicorn_na: ClassVar[str | None] = None

    # -- availability ---------------------------------------------------------------------
    @classmethod
    def missing(cls) -> str | None:
        """None when the peer can run here, else why not (the peer is then reported skipped)."""
        return None

    # -- the verbs -----------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def reload(self) -> ReloadOutcome:
        raise NotImplementedError

    def self_upgrade(self) -> ReloadOutcome:
        raise NotImplementedError(self.self_upgrade_na or "")

    def stop(self) -> None:
        """Stop gracefully (subclasses), then make sure no process of the peer is left."""
        self.reap_all()

    # -- helpers -------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for key in (
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "SERVER_STARTER_PORT",
        ):
            env.pop(key, None)
        env["BENCH_VERSION_FILE"] = str(self.version_file)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(self, cmd: list[str], log_name: str, **kwargs: object) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (closed in reap_all)
        kwargs.setdefault("env", self.env())
        proc = subprocess.Popen(  # type: ignore[call-overload]
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
            **kwargs,
        )
        log.close()
        self.procs.append(proc)
        self.pgids.append(proc.pid)
        return proc

    def reap_all(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.killed.append(f"{proc.pid} {proc.args}")
                proc.kill()
                proc.wait()
        # Anything still in one of our sessions' process groups (re-parented children).
        for pgid in self.pgids:
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in group_alive(pgid):
                self.killed.append(f"{pid} {_cmdline(pid)}")
            if group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        self.procs.clear()
        self.pgids.clear()

    def log_tail(self, log_name: str, n: int = 400) -> str:
        try:
            return (self.workdir / log_name).read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


_GUNICORN_FLAGS: list[str] | None = None


def gunicorn_argv(*bind: str) -> list[str]:
    """An unmodified gunicorn: 2 sync workers, no ``--preload``, bench/apps/wsgi.py as the app.

    ``bind``: how this peer hands it the socket (``--bind fd://N``, ``--bind HOST:PORT``), or
    nothing for handoffd, whose ``LISTEN_FDS`` gunicorn reads by itself.
    """
    global _GUNICORN_FLAGS
    if _GUNICORN_FLAGS is None:
        # gunicorn >= 27 opens a control socket in ~/.gunicorn by default, shared by every
        # instance of the user; the benchmark does not use it.
        help_text = subprocess.run(
            [str(which("gunicorn")), "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
        _GUNICORN_FLAGS = ["--no-control-socket"] if "--no-control-socket" in help_text else []
    return [
        str(which("gunicorn")),
        "--workers",
        "2",
        "--worker-class",
        "sync",
        *bind,
        "--backlog",
        "1024",
        "--chdir",
        str(APPS),
        "--graceful-timeout",
        "20",
        "--log-level",
        "warning",
        *_GUNICORN_FLAGS,
        "wsgi:app",
    ]


def group_alive(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group ``pgid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # fields after the comm: state ppid pgrp ...  (proc(5))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else None


def all_peers() -> list[type[Peer]]:
    from bench.peers import circus, gunicorn, handoffd, naive, reuseport, starter, tableflip

    return [
        handoffd.HandoffdPeer,
        gunicorn.GunicornPeer,
        starter.StarterPeer,
        circus.CircusPeer,
        tableflip.TableflipPeer,
        naive.NaivePeer,
        reuseport.ReuseportPeer,
    ]
