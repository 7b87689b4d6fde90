"""Metrics and health without a daemon: the counters against fake workers on the virtual clock,
the stop delay, the handover round trip, the kernel queries, the HTTP server's limits, and
that prometheus-client is imported only when [metrics] is configured."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from handoff._config import load_config
from handoff._control import UpgradePhase, UpgradeReply
from handoff._errors import ConfigError
from handoff._metrics import (
    listen_drops,
    phase_durations,
    tcp_accept_queue,
    unix_accept_queue,
)
from handoff._metrics_http import MAX_CONNECTIONS, MAX_REQUEST, serve_metrics_http
from tests.daemon import write_config
from tests.fakes import FakeSpawner
from tests.unit.test_supervisor import base, by_generation, start, upgrade

__all__ = ["base"]  # the fixture, imported for its use here


async def test_counters_label_upgrades_exits_and_restarts(autojump_clock, base):
    spawner = FakeSpawner(behaviour=by_generation(3, lambda p: p.exit(3)))
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, processes=1)
        assert (await upgrade(sup)).ok
        assert not (await upgrade(sup)).ok
        crashing = spawner.of_generation(2)[0]
        crashing.exit(-signal.SIGSEGV)
        await spawner.next_spawn()
        await spawner.next_spawn()
        await spawner.next_spawn()
        await trio.testing.wait_all_tasks_blocked()
        metrics = sup.metrics
        assert metrics.upgrades == {"workers/ok": 1, "workers/failed": 1}
        # gen 1 drained with SIGTERM (the fake dies of it), gen 3 exited 3, gen 2's crashed
        assert metrics.worker_exits == {"SIGTERM": 1, "failed": 1, "SIGSEGV": 1}
        assert metrics.restarts == 1
        assert metrics.generations_started == 3
        assert sum(metrics.durations["workers"]) == 2
        sup.stop()


async def test_stop_delay_is_not_ready_before_any_worker_gets_its_stop_signal(autojump_clock, base):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, extra_supervisor="stop_delay = 5")
        assert sup.metrics.ready() == (True, None)
        worker = spawner.processes[0]
        with capture_logs() as logs:
            sup.stop()
        stopped_at = trio.current_time()
        assert sup.metrics.ready() == (False, "handoffd is stopping")
        assert [e["event"] for e in logs] == ["supervisor.unready"]
        assert not (await upgrade(sup)).ok  # no upgrade starts during the delay
        assert await worker.next_signal() == signal.SIGTERM
        assert trio.current_time() - stopped_at == pytest.approx(5)
        assert all(p.signals for p in spawner.processes)


async def test_a_second_stop_ends_the_stop_delay(autojump_clock, base):
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        sup = await start(nursery, base, spawner, extra_supervisor="stop_delay = 30")
        sup.stop()
        await trio.sleep(1)
        sup.stop()
        stopped_at = trio.current_time()
        assert await spawner.processes[0].next_signal() == signal.SIGTERM
        assert trio.current_time() == stopped_at


def reply(duration: float, *phases: tuple[str, float], ok: bool = True) -> UpgradeReply:
    return UpgradeReply(
        ok=ok,
        outcome="ok" if ok else "failed",
        generation=2,
        duration_s=duration,
        phases=[UpgradePhase(phase=name, elapsed_s=at) for name, at in phases],
    )


def test_phase_durations_run_from_each_event_to_the_next():
    got = phase_durations(reply(3.5, ("config_loaded", 0.01), ("spawning", 0.02), ("ready", 1.5)))
    assert got == {"config_loaded": 0.01, "spawning": 1.48, "ready": 2.0}
    rolling = reply(4.0, ("spawning", 0.0), ("ready", 1.0), ("spawning", 2.0), ("ready", 2.5))
    assert phase_durations(rolling) == {"spawning": 1.5, "ready": 2.5}  # batches add up


def test_the_counters_survive_a_dump_and_restore_and_bad_state_costs_only_them(base):
    cfg = base / "handoffd.toml"
    write_config(cfg, base / "run", command=["fake-worker"])
    from handoff._supervisor import Supervisor

    sup = Supervisor(load_config(cfg), {}, FakeSpawner())
    old = sup.metrics
    old.on_upgrade_finished(reply(0.3, ("spawning", 0.0)), supervisor=False)
    old.on_upgrade_finished(reply(45.0, ok=False), supervisor=False)
    old.worker_exits["SIGKILL"] = 2
    old.restarts = 4
    state = old.dump()
    new = Supervisor(load_config(cfg), {}, FakeSpawner()).metrics
    new.restore(state)
    assert new.dump() == state
    text = new.render().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    le = "handoffd_upgrade_duration_seconds_bucket"
    assert samples[(le, (("kind", "workers"), ("le", "0.25")))] == 0
    assert samples[(le, (("kind", "workers"), ("le", "0.5")))] == 1
    assert samples[(le, (("kind", "workers"), ("le", "30")))] == 1
    assert samples[(le, (("kind", "workers"), ("le", "60")))] == 2
    assert samples[("handoffd_worker_exits_total", (("reason", "SIGKILL"),))] == 2
    assert samples[("handoffd_worker_restarts_total", ())] == 4

    broken = Supervisor(load_config(cfg), {}, FakeSpawner()).metrics
    with capture_logs() as logs:
        broken.restore({**state, "restarts": "many"})
    assert [e["event"] for e in logs] == ["metrics.not_restored"]
    assert broken.restarts == 0


def test_a_tcp_listener_reports_its_accept_queue_and_backlog():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        assert tcp_accept_queue(listener) is None  # not listening yet
        listener.listen(7)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            assert tcp_accept_queue(listener) == (3, 7)
        finally:
            for c in clients:
                c.close()


def test_a_unix_listener_reports_its_accept_queue_through_sock_diag(tmp_path):
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(9)
        clients = []
        try:
            for _ in range(2):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.connect(path)
            found = unix_accept_queue(os.fstat(listener.fileno()).st_ino)
            if found is None:
                pytest.skip("this kernel has no unix_diag (sock_diag for AF_UNIX)")
            assert found == (2, 9)
        finally:
            for c in clients:
                c.close()
    assert unix_accept_queue(1) is None  # no such socket: an answer, not an error


def test_listen_drops_reads_tcpext_of_proc_net_netstat(tmp_path):
    netstat = tmp_path / "netstat"
    netstat.write_text(
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 12 15\n"
        "IpExt: InNoRoutes\nIpExt: 0\n"
    )
    assert listen_drops(str(netstat)) == (12, 15)
    assert listen_drops(str(tmp_path / "missing")) is None
    assert listen_drops() is not None  # this machine's own


async def serve(nursery: trio.Nursery, **options) -> tuple[str, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def answer(path: str) -> tuple[int, str, bytes]:
        if path == "/boom":
            raise RuntimeError("a bug")
        return 200, "text/plain", f"you asked for {path}".encode()

    async def run() -> None:
        try:
            await serve_metrics_http(listener, answer, **options)
        finally:
            listener.close()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return listener.getsockname()


async def ask(address: tuple[str, int], raw: bytes) -> bytes:
    sock = trio.socket.socket()
    await sock.connect(address)
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(raw)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_the_http_server_answers_bad_requests_and_survives_them():
    async with trio.open_nursery() as nursery:
        address = await serve(nursery)
        ok = await ask(address, b"GET /readyz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert ok.endswith(b"you asked for /readyz")
        head = await ask(address, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert head.endswith(b"\r\n\r\n")
        assert (await ask(address, b"POST / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await ask(address, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * (2 * MAX_REQUEST)
        assert (await ask(address, huge)).startswith(b"HTTP/1.1 431 ")
        with capture_logs() as logs:
            assert (await ask(address, b"GET /boom HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
        assert [e["event"] for e in logs] == ["metrics.render_failed"]
        assert (await ask(address, b"GET /still HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


async def test_idle_connections_cannot_lock_the_http_server_out():
    async with trio.open_nursery() as nursery:
        address = await serve(nursery, request_timeout=0.3)
        idle = []
        for _ in range(MAX_CONNECTIONS + 4):
            sock = trio.socket.socket()
            await sock.connect(address)
            idle.append(sock)
        try:
            with trio.fail_after(5):  # served once the idle ones time out
                answer = await ask(address, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in idle:
                sock.close()
        nursery.cancel_scope.cancel()


def test_metrics_config_names_a_bad_address_and_the_missing_library(tmp_path, monkeypatch):
    cfg = tmp_path / "handoffd.toml"
    write_config(cfg, tmp_path / "run", command=["w"], metrics="unix:/tmp/m.sock")
    with pytest.raises(ConfigError, match=r"metrics\.address: expected host:port"):
        load_config(cfg)
    write_config(cfg, tmp_path / "run", command=["w"], metrics="127.0.0.1:9464")
    assert load_config(cfg).config.metrics is not None
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # find_spec: not installed
    with pytest.raises(ConfigError, match=r"pip install 'handoffd\[metrics\]'"):
        load_config(cfg)
    write_config(cfg, tmp_path / "run", command=["w"], extra_supervisor="stop_delay = -1")
    with pytest.raises(ConfigError, match=r"supervisor\.stop_delay"):
        load_config(cfg)


def test_prometheus_client_is_imported_only_when_metrics_are_rendered():
    code = textwrap.dedent(
        """
        import sys
        import handoff._cli, handoff._startup, handoff._metrics, handoff._metrics_http
        assert "prometheus_client" not in sys.modules, "imported without [metrics]"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
