"""What ``import handoff; handoff.ready()`` costs a worker process: import time and memory.

Each case runs in a fresh interpreter (``python -c``), many times, interleaved so that noise from
other processes on the box hits all cases alike; reported are the medians. The cases:

- ``bare``: an interpreter that runs nothing (``site`` included, as for any worker);
- ``stdlib``: the standard-library modules the worker library uses on that path, imported
  directly: what the library cannot cost less than;
- ``handoff``: ``import handoff; handoff.ready()``, with ``NOTIFY_SOCKET`` pointing to a datagram
  socket this script binds and reads, so that ``ready()`` really sends ``READY=1``.

Measured inside the child: the time the case's code takes (``time.perf_counter`` around it), the
number of modules loaded, and ``VmRSS``/``VmHWM`` from ``/proc/self/status`` after it ran. Measured
by the parent: the wall time of the whole process, from spawn to exit, and its CPU time (user +
system, from ``getrusage(RUSAGE_CHILDREN)``), which other load on the box disturbs less.

Run (``--python`` picks the interpreter, hence the checkout whose ``handoff`` it imports; give
it several times to compare checkouts, with their runs interleaved)::

    .venv/bin/python bench/worker_import.py
    .venv/bin/python bench/worker_import.py --runs 40 \\
        --python /work/main/.venv/bin/python --python .venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# The standard-library modules the worker wing imports on the way to ready(): at module level in
# handoff/__init__.py, _worker.py and what they import (json, select, ipaddress and ctypes are
# imported only on the paths that need them).
STDLIB_MODULES = "array, contextlib, fcntl, os, re, socket, stat, sys, typing"
CASES = {
    "bare": "pass",
    "stdlib": f"import {STDLIB_MODULES}",
    "handoff": "import handoff; handoff.ready()",
}
# The child reports with nothing but builtins, so that reporting loads no module.
PROBE = """
import sys, time
t0 = time.perf_counter()
{code}
t1 = time.perf_counter()
with open('/proc/self/status') as f:
    mem = {{k: int(v.split()[0]) for k, _, v in (line.partition(':') for line in f)
           if k in ('VmRSS', 'VmHWM')}}
print((t1 - t0) * 1e3, len(sys.modules), mem['VmRSS'], mem['VmHWM'])
"""


def run_case(
    python: str, code: str, env: dict[str, str]
) -> tuple[float, float, float, int, int, int]:
    """(process wall ms, process CPU ms, code ms, modules, VmRSS KiB, VmHWM KiB) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(
        [python, "-c", PROBE.format(code=code)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    wall = (time.perf_counter() - start) * 1e3
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3
    inner, modules, rss, hwm = out.stdout.split()
    return wall, cpu, float(inner), int(modules), int(rss), int(hwm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        help="interpreter to measure (repeat it to compare checkouts, runs interleaved)",
    )
    parser.add_argument("--runs", type=int, default=30, help="fresh interpreters per case")
    args = parser.parse_args()
    pythons: list[str] = [os.path.abspath(py) for py in args.python or [sys.executable]]
    results: dict[tuple[str, str], list[tuple[float, float, float, int, int, int]]] = {
        (py, case): [] for py in pythons for case in CASES
    }
    readies = 0
    with (
        tempfile.TemporaryDirectory() as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink,
    ):
        path = os.path.join(tmp, "notify")
        sink.bind(path)
        sink.setblocking(False)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": path}
        for _ in range(args.runs):
            for py in pythons:
                for case, code in CASES.items():
                    results[py, case].append(run_case(py, code, env))
                    # The child has exited: its READY=1 is queued (and the queue, 10 deep by
                    # default, must not fill up, or the next ready() would wait for room).
                    with contextlib.suppress(BlockingIOError):
                        readies += sink.recv(4096) == b"READY=1"
    print(
        f"python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; median of {args.runs} "
        f"fresh interpreters per case; READY=1 received {readies} times of "
        f"{args.runs * len(pythons)}"
    )
    for py in pythons:
        print(
            f"\n{py}\n{'case':<8} {'process ms':>10} {'CPU ms':>7} {'code ms':>8} {'modules':>7} "
            f"{'VmRSS MiB':>9} {'VmHWM MiB':>9} {'+CPU ms vs bare':>15} {'+RSS MiB vs bare':>16}"
        )
        medians = {
            case: [statistics.median(run[i] for run in results[py, case]) for i in range(6)]
            for case in CASES
        }
        bare = medians["bare"]
        for case, (wall, cpu, inner, modules, rss, hwm) in medians.items():
            print(
                f"{case:<8} {wall:>10.1f} {cpu:>7.1f} {inner:>8.1f} {modules:>7.0f} "
                f"{rss / 1024:>9.1f} {hwm / 1024:>9.1f} {cpu - bare[1]:>15.1f} "
                f"{(rss - bare[4]) / 1024:>16.1f}"
            )


if __name__ == "__main__":
    main()
