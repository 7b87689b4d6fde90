"""How long handing over 1, 100, 1,000 and 10,000 fds takes with Put/Get, against the floor.

The floor is a bare ``socket.send_fds``/``socket.recv_fds`` loop doing the same work as Put/Get:
it starts from the same ``(name, fd)`` pairs, sends the fds in chunks of SCM_MAX_FD (253) over the
same kind of socket with the chunk's names as the message ("\n"-joined, the least a bare loop
can send to keep names with their fds), and the receiver ends with the same two lists, names (as
``str``) and fds, received with ``MSG_CMSG_CLOEXEC``. The floor splits the pairs the cheapest way
CPython offers (one ``zip``), knows the set size in advance and checks nothing. What remains
between the two is our JSON, checks and bookkeeping.

Each method gets its own sender process (forked before any trio loop runs) and socketpair; the
parent times from the moment it tells the sender "go" (one byte on a pipe) until it holds the whole
set, then closes the received fds outside the timed region. Rounds cycle through the methods so
that noise from other processes on the box hits all of them alike. Reported: the median.

Run::

    .venv/bin/python bench/handoff_fds.py            # add --rounds-scale 0.2 for a quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import struct
import sys
import time
import traceback
from typing import TYPE_CHECKING

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from handoff._passing import get_blocking, put_blocking
from handoff._passing_trio import get, put

if TYPE_CHECKING:
    from collections.abc import Callable

SCM_MAX_FD = 253
MSG_CMSG_CLOEXEC = socket.MSG_CMSG_CLOEXEC
SIZES = (1, 100, 1_000, 10_000)
ROUNDS = {1: 2000, 100: 1000, 1_000: 300, 10_000: 60}
METHODS = ("floor send_fds/recv_fds", "put_blocking/get_blocking", "trio put/get")


def make_fds(n: int) -> list[int]:
    fds: list[int] = []
    while len(fds) < n:
        r, w = os.pipe()
        fds.append(r)
        if len(fds) < n:
            fds.append(w)
        else:
            os.close(w)
    return fds


def send_floor(sock: socket.socket, named: list[tuple[str, int]]) -> None:
    names, fds = zip(*named, strict=True)
    for start in range(0, len(fds), SCM_MAX_FD):
        end = start + SCM_MAX_FD
        socket.send_fds(sock, ["\n".join(names[start:end]).encode()], fds[start:end])


def sender_child(method: str, sock: socket.socket, ctl: int, res: int, fds: list[int]) -> None:
    """Send the set on each "g" from the parent, then report the CPU seconds it took on ``res``."""
    named = [(f"fd{i}", fd) for i, fd in enumerate(fds)]
    if method == METHODS[0]:
        while os.read(ctl, 1) == b"g":
            cpu = time.process_time()
            send_floor(sock, named)
            os.write(res, struct.pack("d", time.process_time() - cpu))
    elif method == METHODS[1]:
        while os.read(ctl, 1) == b"g":
            cpu = time.process_time()
            put_blocking(sock, named, {"listeners": len(named)})
            os.write(res, struct.pack("d", time.process_time() - cpu))
    else:
        tsock = trio.socket.from_stdlib_socket(sock)

        async def loop() -> None:
            while True:
                await trio.lowlevel.wait_readable(ctl)
                if os.read(ctl, 1) != b"g":
                    return
                cpu = time.process_time()
                await put(tsock, named, {"listeners": len(named)})
                os.write(res, struct.pack("d", time.process_time() - cpu))

        trio.run(loop)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def receive_floor(sock: socket.socket, n: int) -> tuple[list[str], list[int]]:
    names: list[str] = []
    got: list[int] = []
    while len(got) < n:
        data, fds, _, _ = socket.recv_fds(sock, 65536, SCM_MAX_FD, MSG_CMSG_CLOEXEC)
        names += data.decode().split("\n")
        got += fds
    return names, got


def receive_blocking(sock: socket.socket) -> tuple[list[str], list[int]]:
    received = get_blocking(sock)
    return received.names, received.fd_numbers


# method, the parent's end of the socketpair, "go" pipe, CPU report pipe, sender pid
Channel = tuple[str, socket.socket, int, int, int]


def start_senders(n: int) -> list[Channel]:
    """Fork one sender per method; outside any trio loop, since a forked child runs its own."""
    fds = make_fds(n)
    channels: list[Channel] = []
    for method in METHODS:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl_r, ctl_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            os.close(ctl_w)
            os.close(res_r)
            code = 0
            try:
                sender_child(method, child_sock, ctl_r, res_w, fds)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        child_sock.close()
        os.close(ctl_r)
        os.close(res_w)
        channels.append((method, parent_sock, ctl_w, res_r, pid))
    close_all(fds)
    return channels


def stop_senders(channels: list[Channel]) -> None:
    for _method, sock, ctl_w, res_r, pid in channels:
        os.write(ctl_w, b"q")
        os.close(ctl_w)
        os.waitpid(pid, 0)
        os.close(res_r)
        sock.close()


async def measure(
    n: int, rounds: int, channels: list[Channel]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds per round, and CPU seconds per round (receiver plus sender), per method."""
    trio_receiver = trio.socket.from_stdlib_socket(channels[2][1].dup())
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpus: dict[str, list[float]] = {m: [] for m in METHODS}
    receivers: dict[str, Callable[[], tuple[list[str], list[int]]]] = {
        METHODS[0]: lambda: receive_floor(channels[0][1], n),
        METHODS[1]: lambda: receive_blocking(channels[1][1]),
    }
    for _ in range(rounds):
        for method, _sock, ctl_w, res_r, _pid in channels:
            cpu = time.process_time()
            start = time.perf_counter()
            os.write(ctl_w, b"g")
            if method == METHODS[2]:
                received = await get(trio_receiver)
                names, got = received.names, received.fd_numbers
            else:
                names, got = receivers[method]()
            times[method].append(time.perf_counter() - start)
            cpu = time.process_time() - cpu
            (sender_cpu,) = struct.unpack("d", os.read(res_r, 8))
            cpus[method].append(cpu + sender_cpu)
            assert len(got) == n, (method, len(got))
            assert names[-1] == f"fd{n - 1}", (method, names[-1])
            close_all(got)
    trio_receiver.close()
    return times, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds-scale", type=float, default=1.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        f"python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; median of N rounds, ms "
        "of wall time (and of CPU time, receiver + sender, in brackets)"
    )
    header = f"{'fds':>6} {'rounds':>6} " + " ".join(f"{m:>26}" for m in METHODS)
    print(header + f" {'blocking/floor':>15} {'trio/floor':>11}")
    for n in SIZES:
        rounds = max(5, int(ROUNDS[n] * args.rounds_scale))
        channels = start_senders(n)
        try:
            times, cpus = trio.run(measure, n, rounds, channels)
        finally:
            stop_senders(channels)
        medians = [statistics.median(times[m]) * 1e3 for m in METHODS]
        cpu = [statistics.median(cpus[m]) * 1e3 for m in METHODS]
        cells = " ".join(f"{f'{v:.3f} ({c:.3f})':>26}" for v, c in zip(medians, cpu, strict=True))
        print(
            f"{n:>6} {rounds:>6} {cells} {medians[1] / medians[0]:>15.2f}x"
            f" {medians[2] / medians[0]:>10.2f}x   cpu {cpu[1] / cpu[0]:.2f}x {cpu[2] / cpu[0]:.2f}x",
            flush=True,
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
