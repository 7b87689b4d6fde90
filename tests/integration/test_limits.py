"""handoffd raises its own fd limit and starts workers with the one it was given."""

from __future__ import annotations

import pytest

from tests.daemon import Daemon, remove_tree, short_tempdir, write_config


def nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


@pytest.mark.parametrize("delivery", ["listen_fds", "scm_rights"])
def test_handoffd_raises_its_soft_fd_limit_and_workers_keep_the_original(no_fd_leak, delivery):
    base = short_tempdir()
    cfg = base / "handoffd.toml"
    command = None if delivery == "listen_fds" else ["python3", "-m", "handoff.demo"]
    write_config(
        cfg, base / "run", processes=1, command=command, extra_program=f'fd_delivery = "{delivery}"'
    )
    daemon = Daemon(cfg, base / "run", wrap=["prlimit", "--nofile=1024:8192", "--"])
    try:
        daemon.wait_ready()
        assert nofile(daemon.pid) == (8192, 8192)
        assert [nofile(pid) for pid in daemon.worker_pids()] == [(1024, 8192)]
        code, reply = daemon.upgrade()
        assert code == 0, reply
        assert [nofile(pid) for pid in daemon.worker_pids(2)] == [(1024, 8192)]
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        remove_tree(base)
