"""What handoffd counts and measures, its Prometheus text exposition, and its readiness answer.

The supervisor owns one ``Metrics`` and calls it at a few points (an upgrade starts or
finishes, a stop is announced); its generations call ``worker_exited``/``worker_restarted``.
Gauges are read from the supervisor's own state when scraped.

Design notes:
- Counting is plain Python and always on (a few dict updates per upgrade or worker exit), so
  that ``[metrics]`` costs nothing when absent: prometheus-client is imported only by
  ``render``, which only an enabled daemon calls. The library is used for what it is
  maintained for: the metric families, the registry and the text format (``generate_latest``);
  the values are ours, exposed through a custom collector.
- Counters survive a self-upgrade: ``dump()`` goes into the handover state
  (``SupervisorState.metrics``) when the generations are frozen, and the successor
  ``restore()``s it, then counts the self-upgrade itself once it is in charge. Adopted
  generations and workers are not counted again (``generations_started`` counts spawns only).
- Accept queues. A TCP listener answers ``getsockopt(TCP_INFO)`` (tcp(7)); for a socket in
  LISTEN, ``struct tcp_info`` (linux/tcp.h) has ``tcpi_unacked`` = the connections waiting in
  the accept queue (sk_ack_backlog) at byte offset 24 and ``tcpi_sacked`` = the backlog
  (sk_max_ack_backlog) at offset 28, both u32 after 8 u8 fields and 4 u32 ones (rto, ato,
  snd_mss, rcv_mss). A Unix stream listener is asked through sock_diag (sock_diag(7),
  NETLINK_SOCK_DIAG, ``UDIAG_SHOW_RQLEN``; what ``ss -xl`` shows as Recv-Q/Send-Q): for a
  listener ``udiag_rqueue`` is the accept queue and ``udiag_wqueue`` the backlog. A kernel
  without unix_diag answers ENOENT: the gauge is then absent for that listener. Datagram
  listeners have no accept queue.
- The high-water mark is the largest queue seen since the last upgrade started, sampled every
  ``_held.GUARD_INTERVAL_S`` while an upgrade runs (the supervisor's one polling, which an idle
  supervisor never runs) and at every scrape; a burst between two scrapes outside an upgrade
  is not seen. It is reset when an upgrade starts.
- Kernel listen overflows and drops (TcpExt ListenOverflows/ListenDrops of /proc/net/netstat)
  are read when an upgrade starts and ends: the delta is what the whole network namespace saw
  meanwhile (every TCP listener in it, not only ours). IPv4 and IPv6 share these counters.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import socket
import struct
from typing import TYPE_CHECKING, Final, final

import structlog

from ._status import generation_rss_kib, serving_now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from prometheus_client.core import Metric
    from pydantic import JsonValue

    from ._control import UpgradeReply
    from ._generation import Generation, ParkedFds
    from ._generation_set import GenerationSet
    from ._held import HeldListeners
    from ._listeners import Listener
    from ._processes import ProcessHandle

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

#: Upgrade durations (seconds): a worker upgrade takes from ~0.1 s (ready at once, no hold) to
#: minutes (a slow start plus the canary hold); ready_timeout caps what a failure takes.
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
UPGRADE_KINDS: Final = ("workers", "supervisor")
OUTCOMES: Final = ("ok", "failed")

# linux/tcp.h: tcpi_state is byte 0; tcpi_unacked/tcpi_sacked are the u32s at offsets 24/28.
_TCP_INFO_SIZE: Final = 32
_TCP_LISTEN: Final = 10  # TCP_LISTEN in include/net/tcp_states.h
# Linux only (0 elsewhere: other kernels' TCP_INFO is another structure, and there is no netlink).
_TCP_INFO: Final[int] = int(getattr(socket, "TCP_INFO", 0))
_AF_NETLINK: Final[int] = int(getattr(socket, "AF_NETLINK", 0))
# linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 1
_NLMSG_ERROR: Final = 2
_UDIAG_SHOW_RQLEN: Final = 0x10
_UNIX_DIAG_RQLEN: Final = 4
_NO_COOKIE: Final = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by inode alone
_NLMSG_HEADER: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_UNIX_DIAG_REQ: Final = struct.Struct(
    "=BBHIIIII"
)  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG_SIZE: Final = 16  # family, type, state, pad, ino, cookie[2]


def tcp_accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting to be accepted, backlog) of a TCP listener; None if not listening
    (or not Linux: other kernels' TCP_INFO is another structure)."""
    if not _TCP_INFO:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _TCP_INFO_SIZE or info[0] != _TCP_LISTEN:
        return None
    unacked, sacked = struct.unpack_from("=II", info, 24)
    return unacked, sacked


def unix_accept_queue(inode: int) -> tuple[int, int] | None:
    """(connections waiting to be accepted, backlog) of the Unix listener with socket inode
    ``inode``, from sock_diag; None if the kernel cannot say (no unix_diag, not Linux) or it is
    gone."""
    if not _AF_NETLINK:
        return None
    request = _UNIX_DIAG_REQ.pack(
        socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, inode, _UDIAG_SHOW_RQLEN, _NO_COOKIE, _NO_COOKIE
    )
    header = _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
    )
    try:
        with socket.socket(_AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.send(header + request)
            # The kernel answers within send(): nothing to wait for.
            data = nl.recv(8192, socket.MSG_DONTWAIT)
    except OSError:
        return None
    if len(data) < _NLMSG_HEADER.size:
        return None
    length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None  # _NLMSG_ERROR: no such listener, or no unix_diag in this kernel
    offset = _NLMSG_HEADER.size + _UNIX_DIAG_MSG_SIZE
    end = min(length, len(data))
    while offset + 4 <= end:
        rta_len, rta_type = struct.unpack_from("=HH", data, offset)
        if rta_len < 4:
            break
        if rta_type == _UNIX_DIAG_RQLEN and offset + 12 <= end:
            rqueue, wqueue = struct.unpack_from("=II", data, offset + 4)
            return rqueue, wqueue
        offset += (rta_len + 3) & ~3
    return None


def accept_queue(listener: Listener) -> tuple[int, int] | None:
    """(queue, backlog) of a held stream listener, or None (datagram, or not answerable)."""
    kind = listener.config.parsed_address.kind
    if kind == "tcp":
        return tcp_accept_queue(listener.sock)
    if kind == "unix":
        try:
            inode = os.fstat(listener.fd).st_ino
        except OSError:
            return None
        return unix_accept_queue(inode)
    return None


def listen_drops(path: str = "/proc/net/netstat") -> tuple[int, int] | None:
    """TcpExt (ListenOverflows, ListenDrops) of our network namespace, or None if unreadable."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            with contextlib.suppress(KeyError, ValueError):
                return int(table["ListenOverflows"]), int(table["ListenDrops"])
    return None


def exit_reason(proc: ProcessHandle | None) -> str:
    """The ``reason`` label of a worker exit: exited (status 0), failed (another status), the
    signal's name, unknown (an adopted worker: not our child), or spawn_failed (None)."""
    if proc is None:
        return "spawn_failed"
    code = proc.returncode
    if not proc.is_child or code is None:
        return "unknown"
    if code < 0:
        try:
            return _signal_name(-code)
        except ValueError:
            return f"signal_{-code}"
    return "exited" if code == 0 else "failed"


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def phase_durations(reply: UpgradeReply) -> dict[str, float]:
    """Seconds from each phase event of ``reply`` to the next one (the last: to its end),
    summed over a phase that repeats (the batches of a rolling upgrade)."""
    ends = [p.elapsed_s for p in reply.phases[1:]] + [reply.duration_s]
    found: dict[str, float] = {}
    for phase, end in zip(reply.phases, ends, strict=False):  # no phases: nothing
        spent = max(end - phase.elapsed_s, 0.0)
        found[phase.phase] = round(found.get(phase.phase, 0.0) + spent, 4)
    return found


@final
class Metrics:
    """The supervisor's counters and gauges (see the module docstring)."""

    def __init__(self, held: HeldListeners, parked: ParkedFds, gens: GenerationSet) -> None:
        self.held = held
        self.parked = parked
        self.gens = gens
        #: Whether ``[metrics]`` was configured at start (the listener is open).
        self.enabled = False
        #: The control server's live connection count (set once it runs).
        self.control_connections: Callable[[], int] = lambda: 0
        #: Set at the first stop: ``/readyz`` answers 503 from then on (``stop_delay``).
        self.stopping = False
        self.upgrades: dict[str, int] = {}
        self.durations: dict[str, list[int]] = {}
        self.duration_sums: dict[str, float] = {}
        self.last_phases: dict[str, float] = {}
        self.worker_exits: dict[str, int] = {}
        self.restarts = 0
        self.generations_started = 0
        self.listen_overflows = 0
        self.listen_drops = 0
        self.last_listen: tuple[int, int] | None = None
        self.high_water: dict[str, int] = {}
        self._netstat_base: tuple[int, int] | None = None
        self._exposition: Callable[[], bytes] | None = None

    # ---- what the supervisor and its generations report ----

    def on_upgrade_started(self) -> None:
        self.high_water = {}
        self._netstat_base = listen_drops()
        self.sample()

    def on_upgrade_finished(self, reply: UpgradeReply | None, *, supervisor: bool) -> None:
        """Count one upgrade; ``reply`` None: a handover whose commit could not be read."""
        kind = UPGRADE_KINDS[supervisor]
        outcome = "ok" if reply is None or reply.ok else "failed"
        key = f"{kind}/{outcome}"
        self.upgrades[key] = self.upgrades.get(key, 0) + 1
        if reply is not None:
            counts = self.durations.setdefault(kind, [0] * (len(DURATION_BUCKETS) + 1))
            counts[bisect.bisect_left(DURATION_BUCKETS, reply.duration_s)] += 1
            self.duration_sums[kind] = self.duration_sums.get(kind, 0.0) + reply.duration_s
            self.last_phases = phase_durations(reply)
        now, base = listen_drops(), self._netstat_base
        if now is not None and base is not None:
            self.last_listen = (max(now[0] - base[0], 0), max(now[1] - base[1], 0))
            self.listen_overflows += self.last_listen[0]
            self.listen_drops += self.last_listen[1]
        self._netstat_base = None

    def generation_created(self) -> None:
        self.generations_started += 1

    def worker_exited(self, proc: ProcessHandle | None) -> None:
        reason = exit_reason(proc)
        self.worker_exits[reason] = self.worker_exits.get(reason, 0) + 1

    def worker_restarted(self) -> None:
        self.restarts += 1

    def sample(self) -> dict[str, tuple[int, int]]:
        """Read every listener's accept queue now and raise the high-water marks."""
        queues: dict[str, tuple[int, int]] = {}
        for listener in self.held.values():
            found = accept_queue(listener)
            if found is not None:
                queues[listener.name] = found
                mark = self.high_water.get(listener.name, 0)
                self.high_water[listener.name] = max(mark, found[0])
        return queues

    def announce_stop(self) -> bool:
        """A stop begins: from now on not ready. False if one was announced already."""
        first, self.stopping = not self.stopping, True
        return first

    def ready(self) -> tuple[bool, str | None]:
        """What ``/readyz`` says: the current generation serves and no stop has begun."""
        if self.stopping:
            return False, "handoffd is stopping"
        return serving_now(self.gens.current)

    # ---- a self-upgrade ----

    def dump(self) -> dict[str, JsonValue]:
        """The counters for the handover state (JSON)."""
        return {
            "upgrades": dict(self.upgrades),
            "buckets": list(DURATION_BUCKETS),
            "durations": {k: list(v) for k, v in self.durations.items()},
            "duration_sums": dict(self.duration_sums),
            "last_phases": dict(self.last_phases),
            "worker_exits": dict(self.worker_exits),
            "restarts": self.restarts,
            "generations_started": self.generations_started,
            "listen_overflows": self.listen_overflows,
            "listen_drops": self.listen_drops,
            "last_listen": None if self.last_listen is None else list(self.last_listen),
            "netstat_base": None if self._netstat_base is None else list(self._netstat_base),
            "high_water": dict(self.high_water),
        }

    def restore(self, state: dict[str, JsonValue] | None) -> None:
        """Take the counters of the previous supervisor (``dump``); a state we cannot read
        (another version's) costs only the counters, which then start from zero."""
        if state is None:
            return
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("metrics.not_restored", error=repr(exc)[:200])

    def _restore(self, state: dict[str, JsonValue]) -> None:
        def ints(value: JsonValue) -> dict[str, int]:
            assert isinstance(value, dict)
            return {str(k): int(v) for k, v in value.items()}  # type: ignore[arg-type]

        def pair(value: JsonValue) -> tuple[int, int] | None:
            return None if value is None else (int(value[0]), int(value[1]))  # type: ignore[index,arg-type]

        durations: dict[str, list[int]] = {}
        if state["buckets"] == list(DURATION_BUCKETS):
            raw = state["durations"]
            assert isinstance(raw, dict)
            durations = {str(k): [int(c) for c in v] for k, v in raw.items()}  # type: ignore[union-attr,arg-type]
            if any(len(v) != len(DURATION_BUCKETS) + 1 for v in durations.values()):
                raise ValueError("histogram buckets do not match")
        sums, phases = state["duration_sums"], state["last_phases"]
        assert isinstance(sums, dict)
        assert isinstance(phases, dict)
        self.upgrades = ints(state["upgrades"])
        self.durations = durations
        self.duration_sums = {str(k): float(v) for k, v in sums.items()} if durations else {}  # type: ignore[arg-type]
        self.last_phases = {str(k): float(v) for k, v in phases.items()}  # type: ignore[arg-type]
        self.worker_exits = ints(state["worker_exits"])
        self.restarts = int(state["restarts"])  # type: ignore[arg-type]
        self.generations_started = int(state["generations_started"])  # type: ignore[arg-type]
        self.listen_overflows = int(state["listen_overflows"])  # type: ignore[arg-type]
        self.listen_drops = int(state["listen_drops"])  # type: ignore[arg-type]
        self.last_listen = pair(state["last_listen"])
        self._netstat_base = pair(state["netstat_base"])
        self.high_water = ints(state["high_water"])

    # ---- exposition ----

    def render(self) -> bytes:
        """The Prometheus text exposition (version 0.0.4) of everything, sampled now."""
        if self._exposition is None:
            self._exposition = _exposition(self)
        return self._exposition()

    def collect(self) -> Iterator[Metric]:
        """The metric families, for prometheus-client's registry (a custom collector)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        queues = self.sample()
        upgrades = CounterMetricFamily(
            "handoffd_upgrades",
            "Upgrades finished, by kind and outcome.",
            labels=["kind", "outcome"],
        )
        for kind in UPGRADE_KINDS:
            for outcome in OUTCOMES:
                upgrades.add_metric([kind, outcome], self.upgrades.get(f"{kind}/{outcome}", 0))
        yield upgrades
        durations = HistogramMetricFamily(
            "handoffd_upgrade_duration_seconds",
            "How long upgrades took, from the request being taken to the outcome.",
            labels=["kind"],
        )
        for kind in UPGRADE_KINDS:
            counts = self.durations.get(kind, [0] * (len(DURATION_BUCKETS) + 1))
            bounds = [*(f"{b:g}" for b in DURATION_BUCKETS), "+Inf"]
            cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
            durations.add_metric(
                [kind], list(zip(bounds, cumulative, strict=True)), self.duration_sums.get(kind, 0)
            )
        yield durations
        yield _gauge(
            "handoffd_last_upgrade_phase_seconds",
            "Seconds from each phase event of the last upgrade to the next one.",
            "phase",
            self.last_phases,
        )
        generations = self._generations()
        yield _gauge(
            "handoffd_generation",
            "The current generation's number.",
            None,
            {"": self.gens.number()},
        )
        states: dict[str, float] = dict.fromkeys(
            ("starting", "ready", "backoff", "draining", "exited"), 0
        )
        for gen in generations:
            for slot in gen.slots:
                states[slot.state] = states.get(slot.state, 0) + 1
        yield _gauge(
            "handoffd_workers", "Worker slots of the live generations, by state.", "state", states
        )
        ready, _ = self.ready()
        yield _gauge("handoffd_ready", "1 while /readyz answers 200.", None, {"": int(ready)})
        exits = CounterMetricFamily(
            "handoffd_worker_exits", "Worker processes that ended, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self.worker_exits.items()):
            exits.add_metric([reason], count)
        yield exits
        yield CounterMetricFamily(
            "handoffd_worker_restarts", "Workers restarted after a crash.", value=self.restarts
        )
        yield CounterMetricFamily(
            "handoffd_generations_started",
            "Generations spawned (adopted ones are not counted).",
            value=self.generations_started,
        )
        yield _gauge(
            "handoffd_listener_accept_queue",
            "Connections waiting in the listener's accept queue now.",
            "listener",
            {name: q for name, (q, _) in queues.items()},
        )
        yield _gauge(
            "handoffd_listener_backlog",
            "The listener's accept queue limit (listen(2) backlog).",
            "listener",
            {name: b for name, (_, b) in queues.items()},
        )
        yield _gauge(
            "handoffd_listener_accept_queue_high_water",
            "The longest accept queue seen since the last upgrade started (sampled during upgrades and at scrapes).",
            "listener",
            self.high_water,
        )
        yield CounterMetricFamily(
            "handoffd_upgrade_listen_overflows",
            "TcpExt ListenOverflows seen during upgrades (whole network namespace).",
            value=self.listen_overflows,
        )
        yield CounterMetricFamily(
            "handoffd_upgrade_listen_drops",
            "TcpExt ListenDrops seen during upgrades (whole network namespace).",
            value=self.listen_drops,
        )
        if self.last_listen is not None:
            yield _gauge(
                "handoffd_last_upgrade_listen_overflows",
                "TcpExt ListenOverflows during the last upgrade.",
                None,
                {"": self.last_listen[0]},
            )
            yield _gauge(
                "handoffd_last_upgrade_listen_drops",
                "TcpExt ListenDrops during the last upgrade.",
                None,
                {"": self.last_listen[1]},
            )
        yield _gauge(
            "handoffd_parked_fds",
            "File descriptors parked by workers.",
            None,
            {"": len(self.parked.items())},
        )
        yield _gauge(
            "handoffd_control_connections",
            "Control socket connections being served.",
            None,
            {"": self.control_connections()},
        )
        yield _gauge(
            "handoffd_generation_rss_bytes",
            "Resident memory of each live generation's process trees.",
            "generation",
            {str(g.number): generation_rss_kib(g) * 1024 for g in generations},
        )

    def _generations(self) -> list[Generation]:
        """Every live generation once: current, draining, and one starting or holding."""
        found = {id(g): g for g in [*self.gens.all(), self.gens.starting, self.gens.holding] if g}
        return sorted(found.values(), key=lambda g: g.number)

    def http_answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path`` on the metrics listener."""
        if path == "/metrics":
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            return 200, CONTENT_TYPE_LATEST, self.render()
        if path == "/healthz":
            return 200, _TEXT, b"ok: the supervisor runs\n"
        if path == "/readyz":
            ready, why = self.ready()
            return (
                (200, _TEXT, b"ready\n") if ready else (503, _TEXT, f"not ready: {why}\n".encode())
            )
        return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n"


_TEXT: Final = "text/plain; charset=utf-8"


def _gauge(name: str, doc: str, label: str | None, values: Mapping[str, float]) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=[] if label is None else [label])
    for key, value in sorted(values.items()):
        family.add_metric([] if label is None else [key], value)
    return family


def _exposition(metrics: Metrics) -> Callable[[], bytes]:
    """A registry holding only ``metrics`` (no process/platform collectors: the supervisor's
    own process metrics would change meaning at every self-upgrade), rendered on each call."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return lambda: generate_latest(registry)
