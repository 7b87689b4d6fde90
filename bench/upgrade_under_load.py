"""Benchmark: upgrades every second under saturating load, counted by wrk and by a strict client.

    python -m bench.upgrade_under_load --duration 60            # worker upgrades at 1 Hz
    python -m bench.upgrade_under_load --duration 60 --self     # handoffd replaces itself at 1 Hz
    python -m bench.upgrade_under_load --duration 60 --write    # also update bench/RESULTS.md

Needs wrk (Debian: `apt-get install wrk`) and handoffd installed in the running interpreter
(`pip install -e .`). It starts handoffd with the demo worker (2 processes) on 127.0.0.1, runs wrk
(keep-alive connections) and bench/strict_client.py (keep-alive and fresh connections, counting
every request that got no complete 200) for the whole duration, and runs `handoffd upgrade`
once a second. All traffic goes to 127.0.0.1 and stops at the end of the duration.

wrk counts error *events* (a refused connect, a read error), not failed requests; the strict
client counts failed requests. Both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers.handoffd import handoffd_config
from bench.strict_client import LoadClient

REPO = Path(__file__).resolve().parent.parent
LUA = REPO / "bench" / "wrk_report.lua"
SECTION = "## Upgrades under load (bench/upgrade_under_load.py)"


def start_handoffd(base: Path, processes: int) -> tuple[subprocess.Popen[bytes], Path]:
    config = base / "handoffd.toml"
    config.write_text(
        handoffd_config(base / "run", [sys.executable, "-m", "handoff.demo"], processes=processes)
    )
    log = open(base / "handoffd.log", "wb")  # noqa: SIM115  closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "handoff", "run", "--config", str(config), "--log-format", "json"],
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    log.close()
    deadline = time.monotonic() + 30
    while b'"supervisor.ready"' not in (base / "handoffd.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"handoffd did not start:\n{(base / 'handoffd.log').read_text()}")
        time.sleep(0.05)
    return proc, config


def cli(config: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "handoff", *args, "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    text = result.stdout
    start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.find("{")
    reply: dict[str, Any] = json.loads(text[start:]) if start >= 0 and text[start:].strip() else {}
    reply["_exit"] = result.returncode
    return reply


def listener_port(config: Path) -> int:
    status = cli(config, "status")
    return int(status["listeners"][0]["address"].rsplit(":", 1)[1])


def run(duration: float, self_upgrade: bool, processes: int, connections: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    base = Path(tempfile.mkdtemp(prefix="hd-bench-", dir="/tmp"))
    proc, config = start_handoffd(base, processes)
    try:
        port = listener_port(config)
        client = LoadClient(("127.0.0.1", port), keepalive=4, fresh=2, duration=duration + 1)
        wrk = subprocess.Popen(
            [
                "wrk",
                "-t2",
                f"-c{connections}",
                f"-d{int(duration)}s",
                "--timeout",
                "10s",
                "-s",
                str(LUA),
                f"http://127.0.0.1:{port}/",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        client.start()
        upgrades: list[dict[str, Any]] = []
        started = time.monotonic()
        next_at = started + 1.0
        while time.monotonic() < started + duration - 1.0:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic()
            reply = cli(config, "upgrade", *(["--self"] if self_upgrade else []))
            reply["_wall_s"] = time.monotonic() - t0
            upgrades.append(reply)
            next_at += 1.0
        wrk_out, _ = wrk.communicate(timeout=duration + 60)
        report = client.stop()
    finally:
        status = cli(config, "status")
        pid = int(status.get("pid", proc.pid))
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.poll()
    match = re.search(r"^WRKJSON (\{.*\})$", wrk_out, re.M)
    wrk_stats: dict[str, Any] = json.loads(match.group(1)) if match else {"raw": wrk_out}
    ok = [u for u in upgrades if u.get("_exit") == 0]
    shutil.rmtree(base, ignore_errors=True)
    return {
        "mode": "self-upgrade" if self_upgrade else "worker upgrade",
        "duration_s": duration,
        "processes": processes,
        "wrk_connections": connections,
        "upgrades_requested": len(upgrades),
        "upgrades_ok": len(ok),
        "upgrade_failures": [
            u.get("reason") or u.get("error") for u in upgrades if u.get("_exit") != 0
        ],
        "median_upgrade_s": statistics.median([u["duration_s"] for u in ok]) if ok else None,
        "median_upgrade_wall_s": statistics.median([u["_wall_s"] for u in ok]) if ok else None,
        "wrk": wrk_stats,
        "strict": {
            "requests": report.total,
            "ok": report.ok,
            "failed": report.failed,
            "failed_by_kind": dict(report.failures),
            "p50_ms": report.percentile(0.50) * 1000,
            "p99_ms": report.percentile(0.99) * 1000,
            "generations_seen": len([g for g in report.by_generation if g is not None]),
            "reconnects_on_connection_close": report.reconnects_on_close,
        },
    }


def render(result: dict[str, Any], command: str) -> str:
    w, s = result["wrk"], result["strict"]
    errors = {k: w.get(k) for k in ("connect", "read", "write", "status", "timeout")}
    lines = [
        f"Command: `{command}` ({result['mode']}, {result['processes']} demo workers, wrk -t2 "
        f"-c{result['wrk_connections']}, strict client 4 keep-alive + 2 fresh-connection loops)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| upgrades done / requested | {result['upgrades_ok']} / {result['upgrades_requested']} |",
        f"| median upgrade duration (daemon, request to N+1 ready) | {_ms(result['median_upgrade_s'])} |",
        f"| median `handoffd upgrade` wall time (incl. CLI start) | {_ms(result['median_upgrade_wall_s'])} |",
        f"| wrk requests | {w.get('requests')} |",
        f"| wrk error events by kind | {errors} |",
        f"| wrk latency p50 / p99 / max | {_us(w.get('p50_us'))} / {_us(w.get('p99_us'))} / {_us(w.get('max_us'))} |",
        f"| strict client requests | {s['requests']} |",
        f"| strict client failed requests | {s['failed']} {s['failed_by_kind'] or ''} |",
        f"| strict client latency p50 / p99 | {s['p50_ms']:.2f} ms / {s['p99_ms']:.2f} ms |",
        f"| generations that served the strict client | {s['generations_seen']} |",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1000:.2f} ms"


def write_results(text: str, mode: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    sub = f"### {mode}"
    block = f"{sub}\n\n{text}\n"
    if SECTION not in current:
        current = current.rstrip("\n") + f"\n\n{SECTION}\n\n"
    head, _, rest = current.partition(SECTION)
    # replace our subsection if present, keep everything else
    pattern = re.compile(rf"{re.escape(sub)}\n.*?(?=\n### |\n## |\Z)", re.S)
    if pattern.search(rest):
        rest = pattern.sub(block.rstrip("\n"), rest, count=1)
    else:
        rest = "\n\n" + block + rest.lstrip("\n") if rest.strip() else "\n\n" + block
    path.write_text(head + SECTION + rest.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument(
        "--self", dest="self_upgrade", action="store_true", help="upgrade handoffd itself"
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args(argv)
    result = run(args.duration, args.self_upgrade, args.processes, args.connections)
    command = "python -m bench.upgrade_under_load " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = render(result, command.strip())
    print(text)
    print(json.dumps(result, indent=2))
    if args.write:
        write_results(text, result["mode"])
    return (
        0
        if result["strict"]["failed"] == 0 and result["upgrades_ok"] == result["upgrades_requested"]
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
