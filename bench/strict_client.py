"""A strict HTTP/1.1 load client: counts every request that did not get a complete 200 response.

Why not wrk or hey alone: wrk counts error *events* (one 50 ms refusal window is thousands of
write errors) and only reports a timeout if a late response finally arrives; hey retries
silently. This client never retries: each request either gets a complete ``200`` with its whole
body, or is counted as failed under the reason it failed.

It runs ``keepalive`` connections that send request after request (reconnecting only when the
server says ``Connection: close``, which is the graceful way to retire a connection) and
``fresh`` loops that open a new connection per request. Every response records which
generation and pid answered (the demo's ``X-Handoff-Generation``/``X-Handoff-Pid`` headers).
Load is bounded: it stops at ``stop()``, at ``duration`` or at ``max_duration``, whichever comes
first. Only loopback or Unix-socket targets are meant.

Example::

    client = LoadClient(("127.0.0.1", 8080), keepalive=4, fresh=2)
    client.start()
    ...                      # upgrade the server
    report = client.stop()
    assert report.failed == 0, report.describe()
"""

from __future__ import annotations

import collections
import errno
import socket
import threading
import time
from dataclasses import dataclass, field

Address = tuple[str, int] | str

# A request with no response after this long counts as failed ("timeout"): far beyond any normal
# latency on loopback, short enough that a stuck accept queue shows up as failures, not a hang.
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    generation: int | None
    pid: int | None
    connection_close: bool


class RequestFailed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _connect(address: Address, timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except ConnectionRefusedError as exc:
        sock.close()
        raise RequestFailed("connect_refused", str(exc)) from None
    except TimeoutError as exc:
        sock.close()
        raise RequestFailed("connect_timeout", str(exc)) from None
    except OSError as exc:
        sock.close()
        raise RequestFailed(
            "connect_error", f"{errno.errorcode.get(exc.errno or 0, exc)}"
        ) from None
    if not isinstance(address, str):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise RequestFailed("timeout", "no complete response in time") from None
        except ConnectionResetError:
            raise RequestFailed(
                "reset", "connection reset while waiting for the response"
            ) from None
        except OSError as exc:
            raise RequestFailed("recv_error", str(exc)) from None
        if not chunk:
            kind = "closed_before_response" if not self.buf else "truncated_response"
            raise RequestFailed(kind, "the server closed the connection mid-request")
        self.buf += chunk

    def read_response(self, host_header: str) -> Response:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise RequestFailed("bad_response", f"bad status line {lines[0]!r}") from None
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        gen = headers.get("x-handoff-generation")
        pid = headers.get("x-handoff-pid")
        return Response(
            status=status,
            headers=headers,
            body=body,
            generation=int(gen) if gen else None,
            pid=int(pid) if pid else None,
            connection_close=headers.get("connection", "").lower() == "close",
        )


def _send(sock: socket.socket, request: bytes) -> None:
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise RequestFailed("send_failed", str(exc)) from None
    except TimeoutError:
        raise RequestFailed("timeout", "send timed out") from None


def _request_bytes(path: str, keepalive: bool) -> bytes:
    conn = "keep-alive" if keepalive else "close"
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\n\r\n".encode()


def request_once(address: Address, path: str = "/", timeout: float = REQUEST_TIMEOUT) -> Response:
    """One request on a fresh connection; raises ``RequestFailed`` unless a response arrives."""
    sock = _connect(address, timeout)
    try:
        _send(sock, _request_bytes(path, keepalive=False))
        return _Reader(sock).read_response("localhost")
    finally:
        sock.close()


@dataclass
class LoadReport:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    failure_samples: list[str] = field(default_factory=list)
    by_generation: collections.Counter[int | None] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    # (monotonic time of the response, generation, pid), in arrival order per thread
    responses: list[tuple[float, int | None, int | None]] = field(default_factory=list)
    reconnects_on_close: int = 0
    duration: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def describe(self) -> str:
        return (
            f"{self.ok} ok, {self.failed} failed {dict(self.failures)} "
            f"samples={self.failure_samples[:5]} generations={dict(self.by_generation)}"
        )


class LoadClient:
    """Bounded concurrent load from threads; see the module docstring."""

    def __init__(
        self,
        address: Address,
        *,
        keepalive: int = 4,
        fresh: int = 2,
        path: str = "/",
        duration: float | None = None,
        max_duration: float = 600.0,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.address = address
        self.keepalive = keepalive
        self.fresh = fresh
        self.path = path
        self.timeout = timeout
        self.deadline_s = min(duration if duration is not None else max_duration, max_duration)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._report = LoadReport()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        for i in range(self.keepalive):
            self._threads.append(
                threading.Thread(target=self._keepalive_loop, name=f"ka{i}", daemon=True)
            )
        for i in range(self.fresh):
            self._threads.append(
                threading.Thread(target=self._fresh_loop, name=f"fresh{i}", daemon=True)
            )
        for t in self._threads:
            t.start()

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        self._report.duration = time.monotonic() - self._started
        return self._report

    def snapshot(self) -> LoadReport:
        with self._lock:
            r = self._report
            return LoadReport(
                ok=r.ok,
                failures=collections.Counter(r.failures),
                failure_samples=list(r.failure_samples),
                by_generation=collections.Counter(r.by_generation),
                responses=list(r.responses),
            )

    def wait_for_responses(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` responses arrived in total (a liveness gate for tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._report.total >= count:
                    return True
            self._stop.wait(0.01)
        return False

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() - self._started < self.deadline_s

    def _record_ok(self, resp: Response, latency: float) -> None:
        with self._lock:
            if resp.status == 200:
                self._report.ok += 1
                self._report.by_generation[resp.generation] += 1
                self._report.latencies.append(latency)
                self._report.responses.append((time.monotonic(), resp.generation, resp.pid))
            else:
                self._report.failures[f"status_{resp.status}"] += 1

    def _record_fail(self, exc: RequestFailed) -> None:
        with self._lock:
            self._report.failures[exc.kind] += 1
            if len(self._report.failure_samples) < 50:
                self._report.failure_samples.append(f"{threading.current_thread().name}: {exc}")

    def _keepalive_loop(self) -> None:
        request = _request_bytes(self.path, keepalive=True)
        sock: socket.socket | None = None
        reader: _Reader | None = None
        while self._running():
            try:
                if sock is None:
                    sock = _connect(self.address, self.timeout)
                    reader = _Reader(sock)
                assert reader is not None
                t0 = time.monotonic()
                _send(sock, request)
                resp = reader.read_response("localhost")
                self._record_ok(resp, time.monotonic() - t0)
                if resp.connection_close:
                    with self._lock:
                        self._report.reconnects_on_close += 1
                    sock.close()
                    sock = None
            except RequestFailed as exc:
                self._record_fail(exc)
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def _fresh_loop(self) -> None:
        while self._running():
            t0 = time.monotonic()
            try:
                resp = request_once(self.address, self.path, self.timeout)
            except RequestFailed as exc:
                self._record_fail(exc)
                continue
            self._record_ok(resp, time.monotonic() - t0)
