"""Run every reload scenario against every peer under the same load, and write the results.

Usage::

    python -m bench.compare --check              # list what is installed / missing, run nothing
    python -m bench.compare --quick              # < 3 minutes
    python -m bench.compare                      # full run (scenario 1 lasts 60 s per peer)
    python -m bench.compare --quick --peers handoffd gunicorn --scenarios healthy broken

Installs nothing: peers whose packages are missing are reported as skipped, with the reason.

Each (peer, scenario) run starts the peer fresh on 127.0.0.1, puts it under saturating load from
wrk plus bench/strict_client.py's LoadClient (4 keep-alive + 2 connection-per-request threads,
which counts every request that got no complete 200), samples the listen queue (Recv-Q) with
``ss -ltn`` every SS_INTERVAL, performs the scenario's reloads through the peer's own mechanism,
and stops the peer. The app writes its version into every response, so the time from a reload
request to the new version serving is read off the strict client's responses.

Scenarios: healthy (a reload every second, or as soon as the previous reload command returned),
slow (the new version needs 2 s before it can serve), broken (the new version exits 1 at
start-up), self (the supervisor replaces itself, then one ordinary reload proves the new
supervisor works), steady (no reloads: handoffd vs the same 2 workers run by launch.py alone).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers import BENCH, Peer, ReloadOutcome, all_peers, which
from bench.peers.handoffd import HandoffdPeer
from bench.peers.naive import NaivePeer
from bench.strict_client import LoadClient

WRK_LUA = BENCH / "wrk_report.lua"
RESULTS_MD = BENCH / "RESULTS.md"
RESULTS_JSON = BENCH / "results.json"
# How often the listen queue is sampled; a stall of this length or more shows as a peak.
SS_INTERVAL = 0.05
# wrk's load: one thread is enough to saturate 2 Python workers on this 2-core machine.
WRK_THREADS = 1
WRK_CONNECTIONS = 32
# The strict client's share of the load.
STRICT_KEEPALIVE = 4
STRICT_FRESH = 2
# A request with no complete response after this long is a failure ("timeout"); shorter than the
# strict client's default so a stalled peer does not hold the run up, far above any healthy latency.
STRICT_TIMEOUT = 5.0

STOP_NOTE = "after the load ended and a stop request"
SECTION_BEGIN = "<!-- bench.compare:begin -->"
SECTION_END = "<!-- bench.compare:end -->"


@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    quick: float  # seconds of load
    full: float
    action: Callable[[Context], None]
    # "own": each peer's usual app; "gunicorn": an unmodified gunicorn (no --preload) as the app
    app: str = "own"


@dataclasses.dataclass
class ReloadRecord:
    kind: str  # "reload" | "self"
    target: int | None  # the generation that should serve afterwards, if any
    requested: float
    done: float = 0.0
    outcome: ReloadOutcome | None = None
    new_serving_after: float | None = None


@dataclasses.dataclass
class Context:
    peer: Peer
    t0: float
    duration: float
    generation: int = 1
    records: list[ReloadRecord] = dataclasses.field(default_factory=list)

    def write_version(self, generation: int, mode: str) -> None:
        write_version(self.peer.version_file, generation, mode)
        self.generation = generation

    def at(self, offset: float) -> None:
        """Wait for a point of the load schedule (not a synchronisation: the schedule is time)."""
        delay = self.t0 + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def reload(self, kind: str = "reload", target: int | None = None) -> ReloadRecord:
        rec = ReloadRecord(kind, target if kind == "self" else self.generation, time.monotonic())
        try:
            rec.outcome = self.peer.self_upgrade() if kind == "self" else self.peer.reload()
        except Exception as exc:  # a harness error for this peer: recorded, not fatal to the run
            rec.outcome = ReloadOutcome("error", f"{type(exc).__name__}: {exc}")
        rec.done = time.monotonic()
        self.records.append(rec)
        return rec


def write_version(path: Path, generation: int, mode: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generation": generation, "mode": mode}))
    os.replace(tmp, path)


# -- scenarios --------------------------------------------------------------------------------
def act_healthy(ctx: Context) -> None:
    k = 1
    while True:
        ctx.at(float(k))
        if time.monotonic() - ctx.t0 > ctx.duration - 1.0:
            return
        ctx.write_version(ctx.generation + 1, "ok")
        ctx.reload()
        k = max(k + 1, int(time.monotonic() - ctx.t0) + 1)


def act_slow(ctx: Context) -> None:
    ctx.at(1.0)
    ctx.write_version(2, "slow")
    ctx.reload()


def act_broken(ctx: Context) -> None:
    ctx.at(1.0)
    ctx.write_version(2, "broken")
    ctx.reload()


def act_import_error(ctx: Context) -> None:
    ctx.at(1.0)
    ctx.write_version(2, "import-error")
    ctx.reload()


def act_self(ctx: Context) -> None:
    ctx.at(1.0)
    ctx.write_version(2, "ok")
    target = 2 if ctx.peer.self_upgrade_restarts_workers else None
    ctx.reload("self", target)
    ctx.at(max(3.0, time.monotonic() - ctx.t0 + 0.5))
    ctx.write_version(3, "ok")
    ctx.reload()


def act_none(ctx: Context) -> None:
    pass


SCENARIOS = [
    # --quick: 10 s, so that 7 peers x 5 scenarios fit in 3 minutes; --healthy-seconds overrides.
    Scenario("healthy", "1. Healthy upgrades, one per second", 10.0, 60.0, act_healthy),
    # Whole seconds: wrk's -d takes no fractions.
    Scenario("slow", "2. Slow-starting new version (2 s before it can serve)", 4.0, 10.0, act_slow),
    Scenario("broken", "3. Broken new version (exits 1 at start-up)", 3.0, 10.0, act_broken),
    Scenario("self", "4. Self-upgrade of the supervisor, then one reload", 5.0, 10.0, act_self),
    Scenario("steady", "5. Steady state, no reloads", 4.0, 15.0, act_none),
    # The app is an unmodified gunicorn (2 sync workers, no --preload) under every peer that can
    # host it: gunicorn's READY=1 comes before its workers have imported the app.
    Scenario(
        "gunicorn-slow",
        "6. Unmodified gunicorn, slow import (2 s)",
        6.0,
        10.0,
        act_slow,
        app="gunicorn",
    ),
    Scenario(
        "gunicorn-broken",
        "7. Unmodified gunicorn, broken import (ImportError)",
        6.0,
        10.0,
        act_import_error,
        app="gunicorn",
    ),
]
BROKEN = ("broken", "gunicorn-broken")


# -- measurement ------------------------------------------------------------------------------
class QueueSampler:
    """Samples the listen queue (Recv-Q of the LISTEN sockets on ``port``) with ``ss -ltn``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        cmd = ["ss", "-Hltn", f"sport = :{self.port}"]
        while not self._stop.wait(SS_INTERVAL):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            total = 0
            for line in out.splitlines():
                fields = line.split()
                if len(fields) >= 2 and fields[1].isdigit():
                    total += int(fields[1])  # reuseport: one line per socket, add them up
            self.samples += 1
            self.peak = max(self.peak, total)


def connections_per_process(port: int) -> list[int]:
    """How many established connections to ``port`` each server process holds, largest first.

    Kept-alive load sticks to the process that accepted it, so this says how many of the
    workers the load actually exercises (steady state: both, or one).
    """
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        for pid in set(re.findall(r"pid=(\d+)", line)):
            counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


def parse_wrk(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            return data
    return {"error": stdout.strip()[-300:] or "no output"}


def run_one(
    peer_cls: type[Peer], scenario: Scenario, duration: float, workroot: Path
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{peer_cls.name}-{scenario.key}-", dir=workroot))
    version_file = workdir / "version.json"
    write_version(version_file, 1, "ok")
    peer = peer_cls(workdir=workdir, version_file=version_file, app=scenario.app)
    result: dict[str, Any] = {
        "peer": peer_cls.name,
        "scenario": scenario.key,
        "duration_s": duration,
    }
    try:
        t_start = time.monotonic()
        peer.start()
        result["start_s"] = round(time.monotonic() - t_start, 3)
    except Exception as exc:
        result["error"] = f"start failed: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            peer.stop()
        return result
    url = f"http://{peer.address[0]}:{peer.address[1]}/"
    phases: dict[str, float] = {}
    conns: list[int] = []
    ctx = Context(peer, time.monotonic(), duration)
    try:
        with QueueSampler(peer.address[1]) as sampler:
            client = LoadClient(
                peer.address,
                keepalive=STRICT_KEEPALIVE,
                fresh=STRICT_FRESH,
                max_duration=duration + 60,
                timeout=STRICT_TIMEOUT,
            )
            wrk = subprocess.Popen(
                [
                    "wrk",
                    f"-t{WRK_THREADS}",
                    f"-c{WRK_CONNECTIONS}",
                    f"-d{round(duration)}s",
                    "--timeout",
                    "10s",
                    "-s",
                    str(WRK_LUA),
                    url,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            client.start()
            ctx.t0 = time.monotonic()
            action = threading.Thread(target=scenario.action, args=(ctx,), daemon=True)
            action.start()
            conns_timer = threading.Timer(
                min(1.5, duration / 2),
                lambda: conns.extend(connections_per_process(peer.address[1])),
            )
            conns_timer.start()
            wrk_out, _ = wrk.communicate(timeout=duration + 60)
            conns_timer.join()
            phases = {"load": time.monotonic() - ctx.t0}
            action.join(timeout=60)
            phases["reloads_done"] = time.monotonic() - ctx.t0
            report = client.stop()
            phases["client_stopped"] = time.monotonic() - ctx.t0
            # A reload still blocked when the load ended (start_server --restart on a broken
            # version) is not waited for: the peer is stopped below, which ends it.
    finally:
        peer_stop_error = None
        try:
            peer.stop()
        except Exception as exc:
            peer_stop_error = f"{type(exc).__name__}: {exc}"
        phases["peer_stopped"] = time.monotonic() - ctx.t0
    wrk_data = parse_wrk(wrk_out)
    responses = sorted(report.responses)
    for rec in ctx.records:
        if rec.target is None:
            continue
        for t, gen, _pid in responses:
            if t >= rec.requested and gen is not None and gen >= rec.target:
                rec.new_serving_after = t - rec.requested
                break
    after_broken: dict[str, int] = {}
    if scenario.key in BROKEN and ctx.records:
        t_req = ctx.records[0].requested
        for t, gen, _pid in responses:
            if t >= t_req:
                after_broken[str(gen)] = after_broken.get(str(gen), 0) + 1
    result.update(
        {
            "wrk": wrk_data,
            "strict": {
                "ok": report.ok,
                "failed": report.failed,
                "failures": dict(report.failures),
                "failure_samples": report.failure_samples[:5],
                "p50_ms": round(report.percentile(0.50) * 1000, 3) if report.latencies else None,
                "p99_ms": round(report.percentile(0.99) * 1000, 3) if report.latencies else None,
                "max_ms": round(max(report.latencies) * 1000, 3) if report.latencies else None,
                "by_generation": {
                    str(k): v for k, v in sorted(report.by_generation.items(), key=str)
                },
                "reconnects_on_close": report.reconnects_on_close,
            },
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "recv_q_peak": sampler.peak,
            "connections_per_process": conns,
            "recv_q_samples": sampler.samples,
            "reloads": [
                {
                    "kind": r.kind,
                    "target_generation": r.target,
                    "at_s": round(r.requested - ctx.t0, 3),
                    "command_s": round(r.done - r.requested, 3),
                    "reported": r.outcome.reported if r.outcome else "none",
                    "detail": r.outcome.detail if r.outcome else "",
                    "new_version_serving_after_s": (
                        round(r.new_serving_after, 3) if r.new_serving_after is not None else None
                    ),
                }
                for r in ctx.records
            ],
        }
    )
    if scenario.key in BROKEN:
        result["responses_after_broken_reload_by_generation"] = after_broken
    if peer_stop_error:
        result["stop_error"] = peer_stop_error
    if peer.killed:
        result["stop_killed"] = peer.killed
    return result


def run_steady(duration: float, rounds: int, workroot: Path) -> dict[str, Any]:
    """handoffd vs the same 2 workers run by launch.py alone, alternating to spread the noise."""
    steady = next(s for s in SCENARIOS if s.key == "steady")
    runs: dict[str, list[dict[str, Any]]] = {"handoffd": [], "alone": []}

    class AlonePeer(NaivePeer):
        name = "alone"

    for i in range(rounds):
        # Alternate which runs first: the second of a pair starts on a machine the first has
        # just left (TIME_WAIT sockets, page cache, another session's load moving in).
        pair = [(HandoffdPeer, "handoffd"), (AlonePeer, "alone")]
        for cls, key in pair if i % 2 == 0 else pair[::-1]:
            runs[key].append(run_one(cls, steady, duration, workroot))
    out: dict[str, Any] = {"rounds": rounds, "runs": runs}
    try:
        per_run = {
            k: [r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6) for r in v]
            for k, v in runs.items()
        }
        rps = {k: statistics.mean(v) for k, v in per_run.items()}
        p99 = {k: statistics.mean(r["wrk"]["p99_us"] / 1000 for r in v) for k, v in runs.items()}
        # Each round runs the two back to back, so a per-round ratio cancels slow drifts of a
        # shared machine; the median of those is the figure, with its spread.
        paired = sorted(h / a for h, a in zip(per_run["handoffd"], per_run["alone"], strict=True))
        out["pairs"] = [
            {
                "first": "handoffd" if i % 2 == 0 else "alone",
                "ratio": h / a,
                "handoffd_rps": h,
                "alone_rps": a,
                "handoffd_conns": runs["handoffd"][i].get("connections_per_process"),
                "alone_conns": runs["alone"][i].get("connections_per_process"),
            }
            for i, (h, a) in enumerate(zip(per_run["handoffd"], per_run["alone"], strict=True))
        ]
        out.update(
            rps=rps,
            p99_ms=p99,
            ratio=statistics.median(paired),
            ratio_min=paired[0],
            ratio_max=paired[-1],
            ratio_of_means=rps["handoffd"] / rps["alone"],
        )
    except (KeyError, ZeroDivisionError, statistics.StatisticsError, TypeError) as exc:
        out["error"] = f"incomplete runs: {type(exc).__name__}: {exc}"
    return out


# -- requirements, machine, versions ----------------------------------------------------------
def requirements() -> list[tuple[str, str, bool]]:
    """(kind, package, installed) for everything the benchmark uses."""
    items: list[tuple[str, str, bool]] = [
        ("apt", "wrk", shutil.which("wrk") is not None),
        ("apt", "iproute2 (ss)", shutil.which("ss") is not None),
    ]
    for peer in all_peers():
        for req in peer.requires:
            if req.kind == "apt":
                pkg = req.name
                ok = subprocess.run(
                    ["dpkg-query", "-W", "-f=${Status}", pkg],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.endswith("installed")
            else:
                ok = peer.missing() is None
            items.append((req.kind, req.name, ok))
    return items


def cmd_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def versions() -> dict[str, str]:
    def pkg(name: str) -> str:
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:
            return "not installed"

    def deb(name: str) -> str:
        return cmd_version(["dpkg-query", "-W", "-f=${Version}", name]) or "not installed"

    return {
        "python": sys.version.split()[0],
        "handoffd": pkg("handoffd"),
        "trio": pkg("trio"),
        "gunicorn": pkg("gunicorn"),
        "circus": pkg("circus"),
        "start_server (libserver-starter-perl)": deb("libserver-starter-perl"),
        "go": cmd_version(["go", "version"]) if which("go") else "not installed",
        "tableflip (golang-github-cloudflare-tableflip-dev)": deb(
            "golang-github-cloudflare-tableflip-dev"
        ),
        "wrk": deb("wrk"),
    }


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        mem = f"{int(f.readline().split()[1]) // 1024 // 1024} GiB"
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "os": platform.platform(),
    }


# -- rendering --------------------------------------------------------------------------------
def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.1f}"


def _served(rs: list[dict[str, Any]]) -> str:
    times = [r["new_version_serving_after_s"] for r in rs if r["target_generation"] is not None]
    done = [t for t in times if t is not None]
    if not times:
        return "n/a"
    if not done:
        return "never"
    text = f"{statistics.median(done) * 1000:.0f}" + (
        f" / {max(done) * 1000:.0f}" if len(done) > 1 else ""
    )
    if len(done) < len(times):
        text += f" ({len(times) - len(done)} never)"
    return text


def _reported(rs: list[dict[str, Any]]) -> str:
    if not rs:
        return "-"
    counts: dict[str, int] = {}
    for r in rs:
        counts[r["reported"]] = counts.get(r["reported"], 0) + 1
    names = {"none": "not reported"}
    return ", ".join(f"{n} {names.get(k, k)}" for k, n in counts.items())


def render_row(r: dict[str, Any]) -> str:
    name = r["peer"]
    if "skipped" in r:
        return f"| {name} | skipped: {r['skipped']} |" + " |" * 9
    if "error" in r and "wrk" not in r:
        return f"| {name} | error: {r['error'][:150]} |" + " |" * 9
    w, s = r["wrk"], r["strict"]
    if "requests" not in w:
        return f"| {name} | wrk failed: {w.get('error', '?')[:150]} |" + " |" * 9
    errs = (
        ", ".join(f"{k} {w[k]}" for k in ("connect", "read", "write", "timeout", "status") if w[k])
        or "0"
    )
    fails = str(s["failed"]) + (
        " (" + ", ".join(f"{k} {v}" for k, v in s["failures"].items()) + ")" if s["failed"] else ""
    )
    rps = w["requests"] / (w["duration_us"] / 1e6) if w["duration_us"] else 0
    reloads = r["reloads"]
    return (
        f"| {name} | {w['requests'] + s['ok']:,} | {rps:,.0f} | **{fails}** | {errs} | "
        f"{_ms(w['p50_us'])} / {_ms(w['p99_us'])} / {_ms(w['max_us'])} | {s['max_ms'] or '-'} | "
        f"{len(reloads)} | {_served(reloads)} | {_reported(reloads)} | {r['recv_q_peak']} |"
    )


HEADER = (
    "| peer | requests completed (wrk + strict) | wrk req/s | strict client: failed requests | "
    "wrk error events | wrk latency p50 / p99 / max (ms) | strict max (ms) | reloads | "
    "reload → new version serving, median / max (ms) | outcome told to the caller | Recv-Q peak |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def render_markdown(data: dict[str, Any]) -> str:
    lines = [
        SECTION_BEGIN,
        "## Peer comparison (bench/compare.py)",
        "",
        f"Mode **{data['mode']}**, {data['finished']}. Command: `{data['command']}` "
        f"(total {data['wall_s']:.0f} s).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in data["machine"].items()) + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        f"Load on each run: wrk `-t{WRK_THREADS} -c{WRK_CONNECTIONS}` (keep-alive) plus the strict client "
        f"({STRICT_KEEPALIVE} keep-alive + {STRICT_FRESH} connection-per-request threads), all to 127.0.0.1. "
        '"failed requests" is the strict client\'s count of requests with no complete 200 (it never retries); '
        "wrk's columns are error *events*. Recv-Q peak is the listen queue sampled every "
        f"{SS_INTERVAL * 1000:.0f} ms with `ss -ltn`. Raw figures: bench/results.json.",
        "",
        "Peers:",
        "",
    ]
    for name, info in data["peers"].items():
        lines.append(
            f"- **{name}**: {info['summary']}"
            + (f" — skipped: {info['skipped']}" if info.get("skipped") else "")
        )
    lines.append("")
    for sc in SCENARIOS:
        if sc.key == "steady" or sc.key not in data["scenarios"]:
            continue
        lines += [f"### {sc.title}", "", HEADER]
        for r in data["scenarios"][sc.key]:
            lines.append(
                render_row(r) if "n/a" not in r else f"| {r['peer']} | n/a: {r['n/a']} |" + " |" * 9
            )
        notes = []
        for r in data["scenarios"][sc.key]:
            if r.get("stop_killed"):
                notes.append(
                    f"- {r['peer']}: still running {STOP_NOTE}, SIGKILLed: {'; '.join(r['stop_killed'])[:300]}"
                )
            if r.get("stop_error"):
                notes.append(f"- {r['peer']}: stop failed: {r['stop_error'][:200]}")
            bad = [
                x
                for x in r.get("reloads", [])
                if x["reported"] in ("error", "failed") and sc.key not in BROKEN
            ]
            for x in bad[:3]:
                notes.append(
                    f"- {r['peer']}: {x['kind']} at {x['at_s']} s: {x['reported']}: {x['detail'][:200]}"
                )
        if notes:
            lines += ["", "Notes:", "", *notes]
        if sc.key in BROKEN:
            lines += [
                "",
                "Responses after the broken reload, by generation (1 = old version kept serving):",
                "",
            ]
            for r in data["scenarios"][sc.key]:
                if "responses_after_broken_reload_by_generation" in r:
                    lines.append(
                        f"- {r['peer']}: {r['responses_after_broken_reload_by_generation']}; "
                        f"outcome: {_reported(r['reloads'])} "
                        f"({'; '.join(x['detail'] for x in r['reloads'])[:200]})"
                    )
        lines.append("")
    st = data["scenarios"].get("steady")
    if st:
        lines += ["### 5. Steady state, no reloads: handoffd vs the same workers alone", ""]
        if "ratio" in st:
            lines += [
                "| run | wrk req/s | wrk p99 (ms) |",
                "|---|---|---|",
                f"| handoffd-managed | {st['rps']['handoffd']:,.0f} | {st['p99_ms']['handoffd']:.2f} |",
                f"| alone (launch.py, same 2 workers) | {st['rps']['alone']:,.0f} | {st['p99_ms']['alone']:.2f} |",
                "",
                f"Ratio handoffd / alone: **{st['ratio']:.3f}** (target >= 0.98), the median of "
                f"{st['rounds']} back-to-back pairs (range {st.get('ratio_min', st['ratio']):.3f}"
                f"-{st.get('ratio_max', st['ratio']):.3f}; ratio of the means "
                f"{st.get('ratio_of_means', st['ratio']):.3f}). handoffd is not in the data path, so any "
                "difference is the machine's noise.",
            ]
            if st.get("pairs"):
                lines += [
                    "",
                    "| pair | first | handoffd req/s | alone req/s | ratio | "
                    "connections per worker, handoffd / alone |",
                    "|---|---|---|---|---|---|",
                ]
                lines += [
                    f"| {i + 1} | {p['first']} | {p['handoffd_rps']:,.0f} | {p['alone_rps']:,.0f} | "
                    f"{p['ratio']:.3f} | {p['handoffd_conns']} / {p['alone_conns']} |"
                    for i, p in enumerate(st["pairs"])
                ]
        else:
            lines.append(f"Not measured: {st.get('error') or st.get('skipped')}")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines)


def update_section(path: Path, begin: str, end: str, body: str) -> None:
    """Replace our marked section of a shared file (or append it), leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short scenarios (under 3 minutes)")
    parser.add_argument("--peers", nargs="+", help="peer names (default: all)")
    parser.add_argument("--scenarios", nargs="+", choices=[s.key for s in SCENARIOS])
    parser.add_argument("--check", action="store_true", help="list requirements and exit")
    parser.add_argument(
        "--healthy-seconds", type=float, help="length of scenario 1 (default 10 quick, 60 full)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print, do not write RESULTS.md/results.json"
    )
    parser.add_argument(
        "--steady-rounds",
        type=int,
        help="alternating rounds of scenario 5 (default 1 quick, 3 full)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args(argv)

    reqs = requirements()
    missing = [(k, n) for k, n, ok in reqs if not ok]
    print("requirements:")
    for kind, name, ok in reqs:
        print(f"  [{'x' if ok else ' '}] {kind}: {name}")
    if missing:
        apt = " ".join(n.split()[0] for k, n in missing if k == "apt")
        pip = " ".join(n.split()[0] for k, n in missing if k == "pip")
        print("missing (the peers that need them are skipped):")
        if apt:
            print(f"  apt-get install -y {apt}")
        if pip:
            print(f"  {sys.executable} -m pip install {pip}")
    if args.check:
        return 0
    if shutil.which("wrk") is None or shutil.which("ss") is None:
        print("wrk and ss are required: apt-get install -y wrk iproute2", file=sys.stderr)
        return 2

    peers = all_peers()
    if args.peers:
        unknown = set(args.peers) - {p.name for p in peers}
        if unknown:
            parser.error(f"unknown peers {sorted(unknown)}; choose from {[p.name for p in peers]}")
        peers = [p for p in peers if p.name in args.peers]
    scenarios = [s for s in SCENARIOS if not args.scenarios or s.key in args.scenarios]
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    workroot = BENCH / "out" / "compare"
    workroot.mkdir(parents=True, exist_ok=True)

    peer_info: dict[str, dict[str, str]] = {}
    available: list[type[Peer]] = []
    for p in peers:
        why = p.missing()
        peer_info[p.name] = {"summary": p.summary, **({"skipped": why} if why else {})}
        if why:
            print(f"skip {p.name}: {why}")
        else:
            available.append(p)

    results: dict[str, Any] = {}
    for sc in scenarios:
        duration = sc.quick if args.quick else sc.full
        if sc.key == "healthy" and args.healthy_seconds:
            duration = args.healthy_seconds
        if sc.key == "steady":
            if HandoffdPeer in available:
                rounds = args.steady_rounds or (1 if args.quick else 3)
                results["steady"] = run_steady(duration, rounds, workroot)
                print(
                    f"steady: {json.dumps({k: results['steady'].get(k) for k in ('rps', 'p99_ms', 'ratio', 'error')})}"
                )
            else:
                results["steady"] = {
                    "skipped": peer_info.get("handoffd", {}).get("skipped", "handoffd not selected")
                }
            continue
        rows: list[dict[str, Any]] = []
        for p in peers:
            if p.name in peer_info and "skipped" in peer_info[p.name]:
                rows.append({"peer": p.name, "skipped": peer_info[p.name]["skipped"]})
                continue
            if sc.key == "self" and p.self_upgrade_na:
                rows.append({"peer": p.name, "n/a": p.self_upgrade_na})
                continue
            if sc.app == "gunicorn" and (p.gunicorn_na or which("gunicorn") is None):
                rows.append(
                    {
                        "peer": p.name,
                        "n/a": p.gunicorn_na or "gunicorn is not installed (pip install gunicorn)",
                    }
                )
                continue
            t = time.monotonic()
            r = run_one(p, sc, duration, workroot)
            rows.append(r)
            print(f"{sc.key:8} {p.name:18} {time.monotonic() - t:5.1f}s  " + render_row(r))
        results[sc.key] = rows

    data = {
        "mode": mode,
        "command": "python -m bench.compare "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": time.monotonic() - started,
        "machine": machine(),
        "versions": versions(),
        "peers": peer_info,
        "scenarios": results,
    }
    md = render_markdown(data)
    if args.no_write:
        (workroot / "last.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(md)
    else:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        update_section(RESULTS_MD, SECTION_BEGIN, SECTION_END, md)
        print(f"wrote {args.json} and {RESULTS_MD} ({data['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
