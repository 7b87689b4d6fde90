"""What one observed-readiness check costs (handoff/_observe.py), on a 16-process tree.

Usage::

    python -m bench.observe_cost              # 1,000 checks per way of waiting
    python -m bench.observe_cost --checks 200

A root process holds a listener and forks 15 workers that wait on it (so 16 processes hold it,
as ``gunicorn -w 15`` would), each way in turn: blocked in ``accept`` (one syscall line read
per process), registered in an epoll set (an fdinfo read), and in ``select`` (a syscall line
plus an fd_set read from /proc/PID/mem). One check is ``check_readiness``: walk the tree,
observe every process, judge. Prints the median and p99 wall time of one check, its median CPU
time (the calling thread's, which the load on a shared box disturbs less), and the tree walk's; the checks run back to back in this process, as a generation's poll would.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

from handoff._observe import LinuxProc, check_readiness, listener_keys, walk_tree

WORKERS = 15
WAYS = {
    "accept": "lsock.accept()",
    "epoll": "import selectors\n"
    "sel = selectors.EpollSelector(); sel.register(lsock, selectors.EVENT_READ); sel.select()",
    "select": "import select; select.select([lsock], [], [])",
}
TREE = """
import os, signal, socket
lsock = socket.socket(fileno={fd})
for _ in range({workers}):
    if os.fork() == 0:
        {wait}
        os._exit(0)
signal.pause()
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(way: str, checks: int) -> tuple[list[float], list[float], list[float]]:
    listener = socket.create_server(("127.0.0.1", 0))
    keys = listener_keys({"http": listener})
    wait = WAYS[way].replace("\n", "\n        ")
    code = TREE.format(fd=listener.fileno(), workers=WORKERS, wait=wait)
    root = subprocess.Popen(
        [sys.executable, "-c", code], pass_fds=(listener.fileno(),), start_new_session=True
    )
    proc = LinuxProc()
    try:
        deadline = time.monotonic() + 30
        while True:
            readiness = check_readiness([root.pid], keys, reader=proc)
            if readiness.ready and len(readiness.waiting[next(iter(keys))]) == WORKERS:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{way}: the tree never became ready: {readiness.reason}")
            time.sleep(0.01)
        assert len(walk_tree([root.pid], proc)) == WORKERS + 1
        full: list[float] = []
        cpu: list[float] = []
        walk: list[float] = []
        for _ in range(checks):
            start, start_cpu = time.perf_counter(), time.thread_time()
            readiness = check_readiness([root.pid], keys, reader=proc)
            full.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
            assert readiness.ready, readiness.reason
            start = time.perf_counter()
            walk_tree([root.pid], proc)
            walk.append(time.perf_counter() - start)
        return full, cpu, walk
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=1000)
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, Linux {os.uname().release}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.2f}; {WORKERS + 1} processes, {args.checks} checks, ms"
    )
    print(
        f"{'way':>8} {'check median':>13} {'check p99':>10} {'check cpu':>10}"
        f" {'walk median':>12} {'walk p99':>9}"
    )
    for way in WAYS:
        full, cpu, walk = measure(way, args.checks)
        print(
            f"{way:>8} {statistics.median(full) * 1e3:13.3f} {percentile(full, 0.99) * 1e3:10.3f}"
            f" {statistics.median(cpu) * 1e3:10.3f}"
            f" {statistics.median(walk) * 1e3:12.3f} {percentile(walk, 0.99) * 1e3:9.3f}"
        )


if __name__ == "__main__":
    main()
