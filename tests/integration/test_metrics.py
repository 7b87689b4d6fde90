"""The [metrics] listener of a real handoffd: /metrics parsed with prometheus-client's own
parser during and after upgrades and across a self-upgrade, the accept-queue gauges under a
burst nobody accepts, and /readyz turning 503 before any worker is told to stop."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from handoff._metrics import DURATION_BUCKETS
from tests.daemon import short_tempdir, wait_until, write_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.daemon import Daemon

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    """Every sample, by (name, labels), through prometheus-client's text parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def upgrades(samples: Samples, kind: str, outcome: str) -> float:
    return value(samples, "handoffd_upgrades_total", kind=kind, outcome=outcome)


def bucket(samples: Samples, kind: str, le: str) -> float:
    return value(samples, "handoffd_upgrade_duration_seconds_bucket", kind=kind, le=le)


@pytest.mark.parametrize("mode", ["in-place", "new-pid"])
def test_metrics_count_upgrades_by_label_and_bucket_and_survive_a_self_upgrade(
    run_daemon: Callable[..., Daemon], mode: str
) -> None:
    port = free_port()
    base = short_tempdir()
    config = {
        "processes": 1,
        "metrics": f"127.0.0.1:{port}",
        "listeners": [("http", "127.0.0.1:0"), ("sock", f"unix:{base}/app.sock")],
        "extra_supervisor": f'self_upgrade = "{mode}"',
    }
    daemon = run_daemon(base=base, **config)
    start = scrape(port)
    assert value(start, "handoffd_generation") == 1
    assert value(start, "handoffd_generations_started_total") == 1
    assert upgrades(start, "workers", "ok") == 0

    code, ok_reply = daemon.upgrade()
    assert code == 0, ok_reply
    daemon.wait_event("generation.drained", where=lambda e: e["generation"] == 1)
    write_config(daemon.config, daemon.runtime_dir, env={"WORKER_MODE": "exit"}, **config)
    code, failed_reply = daemon.upgrade()
    assert code == 1, failed_reply

    after = scrape(port)
    assert upgrades(after, "workers", "ok") == 1
    assert upgrades(after, "workers", "failed") == 1
    assert upgrades(after, "supervisor", "ok") == 0
    durations = [ok_reply["duration_s"], failed_reply["duration_s"]]
    for bound in DURATION_BUCKETS:
        expected = sum(1 for d in durations if d <= bound)
        assert bucket(after, "workers", f"{bound:g}") == expected, (bound, durations)
    assert bucket(after, "workers", "+Inf") == 2
    assert value(after, "handoffd_upgrade_duration_seconds_sum", kind="workers") == pytest.approx(
        sum(durations)
    )
    # gen 1 drained (SIGTERM, then exit 0); gen 3's worker exited 1 before it was ready
    assert value(after, "handoffd_worker_exits_total", reason="exited") == 1
    assert value(after, "handoffd_worker_exits_total", reason="failed") == 1
    assert value(after, "handoffd_generations_started_total") == 3
    assert value(after, "handoffd_generation") == 2
    phases = {dict(k[1])["phase"] for k in after if k[0] == "handoffd_last_upgrade_phase_seconds"}
    assert "spawning" in phases, phases

    # During an upgrade: its canary hold has both generations ready and serving.
    write_config(daemon.config, daemon.runtime_dir, hold=3, **config)
    mark = daemon.mark()
    held: list[tuple[int, dict[str, object]]] = []
    thread = threading.Thread(target=lambda: held.append(daemon.upgrade()))
    thread.start()
    daemon.wait_event(
        "supervisor.phase_changed", where=lambda e: e["phase"] == "holding", start=mark
    )
    during = scrape(port)
    thread.join(30)
    assert len(held) == 1, held
    assert held[0][0] == 0, held
    assert value(during, "handoffd_workers", state="ready") == 2
    assert value(during, "handoffd_generation") == 2
    assert upgrades(during, "workers", "ok") == 1
    rss = {dict(k[1])["generation"] for k in during if k[0] == "handoffd_generation_rss_bytes"}
    assert rss == {"2", "4"}
    assert value(scrape(port), "handoffd_generation") == 4

    # `handoffd metrics` prints the same text over the control socket.
    cli = daemon.cli("metrics")
    assert cli.returncode == 0, cli.stderr
    by_cli = parse(cli.stdout)
    assert upgrades(by_cli, "workers", "ok") == 2

    before = scrape(port)
    code, reply = daemon.self_upgrade()
    assert code == 0, reply
    assert (daemon.pid != daemon.proc.pid) == (mode == "new-pid")
    successor = scrape(port)
    counters = {
        k: v
        for k, v in before.items()
        if k[0].endswith(("_total", "_bucket", "_count", "_sum"))
        and ("kind", "supervisor") not in k[1]
    }
    assert {k: successor[k] for k in counters} == counters  # nothing lost, nothing counted twice
    assert upgrades(successor, "supervisor", "ok") == 1
    assert value(successor, "handoffd_upgrade_duration_seconds_count", kind="supervisor") == 1
    assert value(successor, "handoffd_generations_started_total") == 4  # adopted: not new
    assert value(successor, "handoffd_generation") == 4
    assert value(successor, "handoffd_ready") == 1


def test_accept_queue_gauges_count_a_burst_no_worker_accepts(
    run_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    base = short_tempdir()
    daemon = run_daemon(
        base=base,
        processes=1,
        metrics=f"127.0.0.1:{port}",
        env={"WORKER_NO_ACCEPT": "1"},
        listeners=[("http", "127.0.0.1:0"), ("sock", f"unix:{base}/app.sock")],
    )
    assert value(scrape(port), "handoffd_listener_accept_queue", listener="http") == 0
    clients: list[socket.socket] = []
    try:
        for _ in range(5):
            clients.append(socket.create_connection(daemon.address(), timeout=5))
        for _ in range(3):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(unix)
            unix.connect(f"{base}/app.sock")

        def queued() -> bool:
            samples = scrape(port)
            return (
                value(samples, "handoffd_listener_accept_queue", listener="http") == 5
                and value(samples, "handoffd_listener_accept_queue", listener="sock") == 3
            )

        wait_until(queued, 10, "5 TCP and 3 unix connections in the accept queues")
        samples = scrape(port)
        assert value(samples, "handoffd_listener_accept_queue_high_water", listener="http") == 5
        assert value(samples, "handoffd_listener_accept_queue_high_water", listener="sock") == 3
        assert value(samples, "handoffd_listener_backlog", listener="http") == 1024
    finally:
        for client in clients:
            client.close()


def test_readyz_fails_before_any_worker_is_told_to_stop_and_no_request_fails(
    run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    port = free_port()
    term_log = tmp_path / "term.log"
    stop_delay = 1.0
    daemon = run_daemon(
        processes=2,
        metrics=f"127.0.0.1:{port}",
        # strict: the worker exits 3 if it inherited any fd beyond its listeners (the metrics
        # listener must not leak into workers)
        env={"WORKER_MODE": "strict", "WORKER_TERM_LOG": str(term_log)},
        extra_supervisor=f"stop_delay = {stop_delay}",
    )
    host, app_port = daemon.address()
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (200, "ready\n")
    assert get(port, "/nowhere")[0] == 404
    results = {"ok": 0, "failed": 0}
    first_ok = threading.Event()
    seen_503: list[float] = []

    def load_balanced_client() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, _ = get(port, "/readyz")
            if status == 503:
                seen_503.append(time.monotonic())
                return
            try:
                conn = http.client.HTTPConnection(host, app_port, timeout=5)
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                response.read()
                conn.close()
                results["ok" if response.status == 200 else "failed"] += 1
            except OSError:
                results["failed"] += 1
            first_ok.set()
            time.sleep(0.005)  # pacing: about a hundred requests a second, not a sync

    client = threading.Thread(target=load_balanced_client)
    client.start()
    assert first_ok.wait(10)
    sent = time.monotonic()
    os.kill(daemon.pid, signal.SIGTERM)
    client.join(30)
    assert daemon.proc.wait(30) == 0
    terms = [float(line.split()[1]) for line in term_log.read_text().splitlines()]
    assert len(terms) == 2, terms  # both workers of the last (only) generation
    assert seen_503, "the client never saw /readyz answer 503"
    assert seen_503[0] < min(terms), (seen_503[0], terms)
    assert min(terms) - sent >= stop_delay * 0.95, (sent, terms)
    assert results["failed"] == 0, results
    assert results["ok"] > 0, results


def test_handoffd_metrics_names_the_missing_section(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(processes=1)
    result = daemon.cli("metrics")
    assert result.returncode == 2, result
    assert "[metrics]" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_idle_supervisor_with_metrics_makes_no_wakeups(
    run_daemon: Callable[..., Daemon],
) -> None:
    """The metrics listener waits in accept(2): no timer, no polling while nothing happens."""
    from tests.integration.test_hygiene import blocked_in_epoll, context_switches

    port = free_port()
    daemon = run_daemon(processes=1, metrics=f"127.0.0.1:{port}")
    assert get(port, "/readyz")[0] == 200
    pid = daemon.proc.pid
    wait_until(lambda: blocked_in_epoll(pid), 10, "the supervisor to block in epoll_wait")
    before = context_switches(pid)
    time.sleep(2.0)  # the measurement window, not a synchronisation
    assert context_switches(pid) - before == 0


def test_a_successor_that_cannot_bind_the_metrics_address_refuses_the_handover(
    run_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    new_pid = 'self_upgrade = "new-pid"'  # in place, the address is bound again after the exec
    daemon = run_daemon(processes=1, metrics=f"127.0.0.1:{port}", extra_supervisor=new_pid)
    pid = daemon.pid
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        write_config(
            daemon.config,
            daemon.runtime_dir,
            processes=1,
            metrics=f"127.0.0.1:{busy}",
            extra_supervisor=new_pid,
        )
        code, reply = daemon.self_upgrade()
    assert code == 1, reply
    assert f"cannot listen for metrics on 127.0.0.1:{busy}" in reply["reason"], reply
    assert daemon.status()["pid"] == pid
    samples = scrape(port)  # the old supervisor still answers, and counted the failure
    assert upgrades(samples, "supervisor", "failed") == 1
    assert value(samples, "handoffd_ready") == 1
