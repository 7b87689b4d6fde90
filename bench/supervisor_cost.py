"""What the handoffd supervisor itself costs: memory, idle CPU and wake-ups, upgrade overhead.

Usage::

    python -m bench.supervisor_cost            # 1,000 upgrades, 60 s idle
    python -m bench.supervisor_cost --quick    # 100 upgrades, 10 s idle

Measures, on a supervisor running 2 trivial workers (``sh`` + ``systemd-notify --ready``, so
the workers cost next to nothing and the supervisor's share shows):
- RSS (VmRSS from /proc/PID/status) after start, after the first 100 upgrades and after all of
  them (growth between the last two = leak);
- CPU seconds (utime + stime, proc(5)) and context switches (voluntary + involuntary, summed
  over the supervisor's threads: each is a wake-up) over an idle period;
- upgrade overhead: median wall time of an upgrade minus the median time the same worker
  command takes to send READY=1 when started directly (no supervisor), both with the CLI
  (``handoffd upgrade``, which includes the CLI's own interpreter start-up) and with one
  request on the control socket (the supervisor's own share).

Writes bench/supervisor_cost.json and its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import RESULTS_MD, machine, update_section, versions
from bench.peers import BENCH, which
from bench.peers.handoffd import handoffd_config

SECTION_BEGIN = "<!-- bench.supervisor_cost:begin -->"
SECTION_END = "<!-- bench.supervisor_cost:end -->"
OUT_JSON = BENCH / "supervisor_cost.json"
WORKER = ["sh", "-c", "systemd-notify --ready; exec sleep 3600"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A supervisor must answer within this long; any wait here has this deadline.
TIMEOUT = 30.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (proc(5) fields 14, 15)


def context_switches(pid: int) -> tuple[int, int]:
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def control_call(path: str, request: dict[str, object]) -> dict[str, Any]:
    """One NDJSON request on handoffd's control socket; returns the final (non-event) reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        reader = s.makefile("rb")
        while True:
            line = reader.readline()
            if not line:
                raise RuntimeError(f"{path} closed the connection before replying")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message


def worker_time_to_ready(tmp: Path) -> float:
    """Wall time from spawning the worker command to its READY=1, with no supervisor."""
    path = str(tmp / f"notify-{time.monotonic_ns()}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nsock:
        nsock.bind(path)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        t0 = time.perf_counter()
        proc = subprocess.Popen(WORKER, env=env, stdin=subprocess.DEVNULL)
        readable, _, _ = select.select([nsock], [], [], TIMEOUT)
        elapsed = time.perf_counter() - t0
        proc.terminate()
        proc.wait(TIMEOUT)
        os.unlink(path)
        if not readable or b"READY=1" not in nsock.recv(4096):
            raise RuntimeError("the worker did not send READY=1")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.supervisor_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="100 upgrades, 10 s idle")
    parser.add_argument("--upgrades", type=int)
    parser.add_argument("--idle", type=float)
    parser.add_argument("--samples", type=int, default=30, help="upgrades timed for the overhead")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    upgrades = args.upgrades or (100 if args.quick else 1000)
    idle = args.idle or (10.0 if args.quick else 60.0)
    handoffd = which("handoffd")
    if handoffd is None or which("systemd-notify") is None:
        print(
            "needs the handoffd console script (pip install -e .) and systemd-notify (apt-get install systemd)",
            file=sys.stderr,
        )
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="supervisor-cost-", dir=BENCH / "out"))
    runtime = workdir / "run"
    runtime.mkdir()
    config = workdir / "handoffd.toml"
    config.write_text(handoffd_config(runtime, WORKER, drain_timeout=5))
    cli = [handoffd]
    log = open(workdir / "handoffd.log", "wb")  # noqa: SIM115
    sup = subprocess.Popen(
        [*cli, "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    result: dict[str, Any] = {"upgrades": upgrades, "idle_s": idle, "worker": WORKER}
    try:
        deadline = time.monotonic() + TIMEOUT
        control = str(runtime / "control.sock")
        while True:
            if sup.poll() is not None:
                raise RuntimeError(
                    f"handoffd exited {sup.returncode}; see {workdir / 'handoffd.log'}"
                )
            if os.path.exists(control):
                try:
                    status = control_call(control, {"v": 1, "op": "status"})
                    if status.get("workers"):
                        break
                except (OSError, RuntimeError):
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("handoffd did not come up")
            time.sleep(0.02)
        pid = sup.pid
        result["rss_after_start_kib"] = rss_kib(pid)

        # Idle: nothing happens; every context switch is a wake-up.
        cpu0, (v0, i0) = cpu_seconds(pid), context_switches(pid)
        time.sleep(idle)  # the measurement window itself
        cpu1, (v1, i1) = cpu_seconds(pid), context_switches(pid)
        result.update(
            idle_cpu_s=round(cpu1 - cpu0, 3),
            idle_voluntary_switches=v1 - v0,
            idle_involuntary_switches=i1 - i0,
            idle_threads=len(os.listdir(f"/proc/{pid}/task")),
        )

        # Overhead: the worker alone, the CLI, the control socket.
        alone = [worker_time_to_ready(workdir) for _ in range(args.samples)]
        cli_wall = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            rc = subprocess.run(
                [*cli, "upgrade", "--config", str(config)],
                capture_output=True,
                check=False,
                timeout=TIMEOUT,
            ).returncode
            cli_wall.append(time.perf_counter() - t0)
            if rc != 0:
                raise RuntimeError(f"handoffd upgrade exited {rc}")
        sock_wall = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            reply = control_call(control, {"v": 1, "op": "upgrade"})
            sock_wall.append(time.perf_counter() - t0)
            if reply.get("outcome") != "ok":
                raise RuntimeError(f"upgrade failed: {reply}")
        med = statistics.median
        result.update(
            worker_ready_median_ms=round(med(alone) * 1000, 2),
            cli_upgrade_median_ms=round(med(cli_wall) * 1000, 2),
            socket_upgrade_median_ms=round(med(sock_wall) * 1000, 2),
            overhead_cli_ms=round((med(cli_wall) - med(alone)) * 1000, 2),
            overhead_socket_ms=round((med(sock_wall) - med(alone)) * 1000, 2),
        )

        # Memory across many upgrades.
        done = 2 * args.samples
        t0 = time.monotonic()
        rss_series = []
        while done < upgrades:
            reply = control_call(control, {"v": 1, "op": "upgrade"})
            if reply.get("outcome") != "ok":
                raise RuntimeError(f"upgrade {done} failed: {reply}")
            done += 1
            if done % 100 == 0:
                rss_series.append((done, rss_kib(pid)))
        result.update(
            upgrades_done=done,
            upgrades_wall_s=round(time.monotonic() - t0, 1),
            rss_series_kib=rss_series,
            rss_after_upgrades_kib=rss_kib(pid),
        )
        first = next((r for n, r in rss_series if n >= 100), result["rss_after_start_kib"])
        result["rss_growth_after_first_100_kib"] = result["rss_after_upgrades_kib"] - first
    finally:
        subprocess.run(
            [*cli, "stop", "--config", str(config)], capture_output=True, timeout=60, check=False
        )
        try:
            sup.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        log.close()

    result.update(
        machine=machine(),
        versions={k: v for k, v in versions().items() if k in ("python", "handoffd", "trio")},
        command="python -m bench.supervisor_cost "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    print(json.dumps(result, indent=2))
    if not args.no_write:
        OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
        update_section(RESULTS_MD, SECTION_BEGIN, SECTION_END, render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
    return "\n".join(
        [
            SECTION_BEGIN,
            "## Supervisor cost (bench/supervisor_cost.py)",
            "",
            f"{r['finished']}, command `{r['command']}`; {r['machine']['cpus']} x {r['machine']['cpu']}, "
            f"kernel {r['machine']['kernel']}; "
            + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            + ".",
            f"Workers: 2 x `{' '.join(r['worker'])}`.",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| supervisor RSS after start | {mib(r['rss_after_start_kib'])} | ≤ 40 MB |",
            f"| RSS after {r['upgrades_done']} upgrades | {mib(r['rss_after_upgrades_kib'])} | no growth |",
            f"| RSS growth after the first 100 upgrades | {r['rss_growth_after_first_100_kib']} KiB | 0 |",
            f"| idle CPU over {r['idle_s']:g} s | {r['idle_cpu_s']} s | ~0 |",
            f"| idle wake-ups over {r['idle_s']:g} s (voluntary + involuntary context switches, {r['idle_threads']} thread(s)) | "
            f"{r['idle_voluntary_switches']} + {r['idle_involuntary_switches']} | 0 |",
            f"| worker alone: spawn → READY=1 (median) | {r['worker_ready_median_ms']} ms | |",
            f"| `handoffd upgrade` CLI wall time (median) | {r['cli_upgrade_median_ms']} ms | |",
            f"| upgrade over the control socket (median) | {r['socket_upgrade_median_ms']} ms | |",
            f"| overhead, CLI - worker alone | {r['overhead_cli_ms']} ms | ≤ 5 ms |",
            f"| overhead, control socket - worker alone | {r['overhead_socket_ms']} ms | ≤ 5 ms |",
            "",
            f"RSS every 100 upgrades (KiB): {r['rss_series_kib']}. Raw: bench/supervisor_cost.json.",
            SECTION_END,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
