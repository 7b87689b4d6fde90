"""A minimal stand-in supervisor: is a real server's loss during a drain its own?

One listening socket, generation 1 of the server, generation 2 (2 s slow start) on the same
socket once observed accepting, 2 s side by side, SIGTERM to generation 1, under the same
fresh-connection load the real-server tests use; no handoffd anywhere. Prints, per run, the
requests answered and the failures the strict client counted.

    python bench/standin.py hypercorn 5
"""

import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, "/work/main")
from bench.strict_client import LoadClient
from handoff._observe import check_readiness, listener_keys
from tests.servers import commands

SERVERS = {"hypercorn": commands.hypercorn, "uvicorn": commands.uvicorn}
cmd = SERVERS[sys.argv[1] if len(sys.argv) > 1 else "hypercorn"]()
sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
keys = listener_keys({"http": sock})


def start(version, **extra):
    env = {
        **os.environ,
        **commands.APP_ENV,
        "APP_VERSION": str(version),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
        **extra,
    }
    p = subprocess.Popen(
        ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *cmd],
        env=env,
        pass_fds=[3],
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while not check_readiness([p.pid], keys).ready:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)
    return p


totals = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    g1 = start(1)
    client = LoadClient(sock.getsockname(), keepalive=0, fresh=2, max_duration=60, timeout=10)
    client.start()
    time.sleep(1.5)
    g2 = start(2, APP_IMPORT_DELAY="2")
    time.sleep(2.0)  # the hold
    os.killpg(g1.pid, signal.SIGTERM)
    g1.wait()
    time.sleep(1.5)
    report = client.stop()
    totals.append((report.ok, dict(report.failures)))
    os.killpg(g2.pid, signal.SIGTERM)
    g2.wait()
print(totals)
