"""How long the ``handoffd`` command takes to start: ``status`` (the client path) and ``--version``.

Every command a user or a health check runs (``status`` every few seconds in a Docker
HEALTHCHECK, ``upgrade`` from ``systemctl reload``) pays the interpreter's start plus the CLI's
imports, so nothing heavy may load on that path: not trio or pydantic (the daemon's), not shtab
(only ``handoffd completion`` needs it). Each run is a fresh interpreter executing what the
``handoffd`` console script executes, against a checkout's ``handoff`` put first on
``PYTHONPATH``; runs of every checkout and command are interleaved so that noise from other
processes on the box hits them alike, and the medians are reported. ``status`` is pointed at a
socket that does not exist, so it measures the start and the client up to its ``connect``
(exit 3) and needs no daemon.

Measured by the parent: the wall time of the process, from spawn to exit, and its CPU time (user
+ system, from ``getrusage(RUSAGE_CHILDREN)``), which load on the box disturbs less. Reported by
the child at exit: how many modules it loaded and whether trio, pydantic or shtab were among them.

Run (``--tree`` is a checkout, repeat it to compare, e.g. with ``git worktree add /tmp/base
main``)::

    .venv/bin/python bench/cli_startup.py
    .venv/bin/python bench/cli_startup.py --runs 40 --tree /tmp/base --tree .
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# What the console script runs (pip's generated ``bin/handoffd``), plus a report at exit.
ENTRY = """
import atexit, os, sys
def report():
    heavy = ",".join(m for m in ("trio", "pydantic", "shtab") if m in sys.modules) or "-"
    with open(os.environ["CLI_STARTUP_REPORT"], "w") as f:
        f.write(f"{len(sys.modules)} {heavy}")
atexit.register(report)
from handoff._cli import main
sys.argv[0] = "handoffd"
sys.exit(main())
"""
COMMANDS = {
    "status": ["status", "--socket", "/nonexistent/handoffd.sock"],
    "--version": ["--version"],
}


def run_once(tree: str, argv: list[str], report: str) -> tuple[float, float, int, str, int]:
    """(wall ms, CPU ms, modules, heavy modules loaded, exit code) of one fresh ``handoffd``."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": tree,
        "CLI_STARTUP_REPORT": report,
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, *argv], env=env, capture_output=True, cwd="/", check=False
    )
    wall = (time.perf_counter() - start) * 1e3
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3
    with open(report) as f:
        modules, heavy = f.read().split()
    return wall, cpu, int(modules), heavy, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tree", action="append", help="checkout whose handoff to run (repeat to compare)"
    )
    parser.add_argument("--runs", type=int, default=30, help="fresh interpreters per case")
    args = parser.parse_args()
    trees = [os.path.abspath(tree) for tree in args.tree or ["."]]
    results: dict[tuple[str, str], list[tuple[float, float, int, str, int]]] = {
        (tree, name): [] for tree in trees for name in COMMANDS
    }
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report")
        for _ in range(args.runs):
            for tree in trees:
                for name, argv in COMMANDS.items():
                    results[tree, name].append(run_once(tree, argv, report))
    print(
        f"python {sys.version.split()[0]} ({sys.executable}), {os.uname().sysname} "
        f"{os.uname().release}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; "
        f"median of {args.runs} fresh interpreters per case"
    )
    print(f"{'tree':<32} {'command':<10} {'wall ms':>8} {'CPU ms':>7} {'modules':>7}  exit  heavy")
    for (tree, name), runs in results.items():
        wall = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        modules = statistics.median(run[2] for run in runs)
        heavy = ",".join(sorted({run[3] for run in runs}))
        codes = ",".join(str(code) for code in sorted({run[4] for run in runs}))
        print(
            f"{tree[-32:]:<32} {name:<10} {wall:>8.1f} {cpu:>7.1f} {modules:>7.0f}  {codes:>4}  "
            f"{heavy}"
        )


if __name__ == "__main__":
    main()
