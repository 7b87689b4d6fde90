"""What workers may park is bounded by what every later spawn and a self-upgrade can carry."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.daemon import Daemon, remove_tree, short_tempdir, wait_until, write_config

# Parks 4 x 253 copies of one fd (SCM_MAX_FD per datagram) under names of NAME_LEN
# characters, once (a marker file), then says READY=1 and waits for SIGTERM.
PARKER = """
import os, signal, sys, handoff
marker, length = sys.argv[1], int(sys.argv[2])
if not os.path.exists(marker):
    open(marker, "w").close()
    r, w = os.pipe()
    for batch in range(4):
        name = (str(batch) * length)[:length]
        handoff.park(name, r, *([r] * 252))
handoff.ready()
signal.pause()
"""


@pytest.mark.parametrize(
    ("name_len", "kept", "refusal"),
    [(255, 253, "names would exceed"), (8, 3 * 253, "more than 896 parked fds")],
    ids=["long-names", "many-fds"],
)
def test_parking_beyond_what_later_spawns_can_carry_is_refused_and_spawns_keep_working(
    no_fd_leak, name_len, kept, refusal
):
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    marker = base / "parked"
    write_config(
        cfg,
        base / "run",
        processes=1,
        command=[sys.executable, "-c", PARKER, str(marker), str(name_len)],
    )
    daemon = Daemon(cfg, base / "run", wrap=["prlimit", "--nofile=1024:8192", "--"])
    try:
        daemon.wait_ready()
        wait_until(lambda: len(daemon.status()["parked"]) >= 1, 10, "the worker to park")
        refused = daemon.wait_event("fd.park_refused")
        assert refusal in refused["reason"]
        wait_until(lambda: len(daemon.status()["parked"]) == kept, 10, f"{kept} parked fds")
        # a crashed worker is restarted with every parked fd, and an upgrade works too
        [pid] = daemon.worker_pids()
        mark = daemon.mark()
        os.kill(pid, signal.SIGKILL)
        daemon.wait_event("worker.started", start=mark)
        wait_until(lambda: daemon.worker_pids() and daemon.worker_pids() != [pid], 10, "restart")
        code, reply = daemon.upgrade()
        assert code == 0, reply
        [new] = daemon.worker_pids(2)
        # fds 3.. hold the listener and every kept parked fd
        assert len(os.listdir(f"/proc/{new}/fd")) >= 3 + 1 + kept
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        remove_tree(base)
