"""Rolling upgrades with real workers under load: never more than processes + max_surge trees."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from bench.strict_client import LoadClient, request_once
from tests.daemon import write_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.daemon import Daemon

ROLLING = 'strategy = "rolling"\nmax_surge = 1'


def worker_trees(supervisor: int) -> int:
    """handoffd's children: each is the root of one worker's tree (its process group)."""
    children: set[str] = set()
    for task in os.listdir(f"/proc/{supervisor}/task"):
        try:
            with open(f"/proc/{supervisor}/task/{task}/children") as f:
                children.update(f.read().split())
        except FileNotFoundError:
            continue
    return len(children)


class TreeSampler(threading.Thread):
    """Samples the number of worker trees every millisecond until stopped."""

    def __init__(self, supervisor: int) -> None:
        super().__init__(daemon=True)
        self.supervisor = supervisor
        self.most = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.most = max(self.most, worker_trees(self.supervisor))
            self.samples += 1


def upgrade_under_load(daemon: Daemon, **config: object) -> tuple[int, dict, TreeSampler, object]:
    write_config(daemon.config, daemon.runtime_dir, **config)  # type: ignore[arg-type]
    client = LoadClient(daemon.address(), keepalive=2, fresh=2, max_duration=120)
    sampler = TreeSampler(daemon.pid)
    client.start()
    sampler.start()
    try:
        assert client.wait_for_responses(20, timeout=30)
        code, reply = daemon.upgrade()
        seen = client.snapshot().total
        assert client.wait_for_responses(seen + 20, timeout=30)
    finally:
        sampler.done.set()
        sampler.join()
        report = client.stop()
    return code, reply, sampler, report


def test_rolling_upgrade_never_runs_more_than_processes_plus_surge_trees_and_fails_no_request(
    run_daemon: Callable[..., Daemon],
) -> None:
    config = {"processes": 4, "hold": 0.3, "extra_program": ROLLING}
    daemon = run_daemon(**config)
    code, reply, sampler, report = upgrade_under_load(daemon, **config)
    assert code == 0, reply
    assert sampler.samples > 50
    assert sampler.most <= 5, sampler.most
    assert report.failed == 0, report.describe()  # type: ignore[attr-defined]
    assert sum(p["phase"] == "holding" for p in reply["phases"]) == 4
    status = daemon.status()
    assert status["generation"] == 2
    assert len(daemon.worker_pids(2)) == 4


def test_a_rolling_upgrade_that_fails_in_batch_2_rolls_back_to_the_old_workers(
    run_daemon: Callable[..., Daemon],
) -> None:
    config = {"processes": 4, "hold": 0.3, "extra_program": ROLLING}
    daemon = run_daemon(**config)
    code, reply, sampler, report = upgrade_under_load(
        daemon, **config, env={"WORKER_EXIT_INDEX": "1"}
    )
    assert code == 1, reply
    assert "rolling upgrade failed in batch 2 of 4" in reply["reason"], reply["reason"]
    assert sampler.most <= 5, sampler.most
    assert report.failed == 0, report.describe()  # type: ignore[attr-defined]
    status = daemon.status()
    assert status["generation"] == 1
    assert len(daemon.worker_pids(1)) == 4
    assert daemon.worker_pids(2) == []
    assert request_once(daemon.address()).generation == 1
