"""SO_REUSEPORT overlap restart: start the new service on its own socket, then stop the old one.

The new instance (bench/apps/launch.py --bind --reuseport) binds the same port with
SO_REUSEPORT; once it reports READY=1 on a notify socket the harness gives it, the old instance
gets SIGTERM. If the new one exits before ready, the reload is reported failed and the old one
keeps serving. The flaw it shows: each socket of a reuseport group has its own accept queue, and
the old socket's queued connections are reset when it closes (DESIGN.md, pitfalls).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import ClassVar

from bench.peers import ReloadOutcome
from bench.peers.naive import NaivePeer


class ReuseportPeer(NaivePeer):
    name: ClassVar[str] = "reuseport-overlap"
    summary: ClassVar[str] = "start new on its own SO_REUSEPORT socket, wait READY=1, then stop old"

    def launch_ready(self, reuseport: bool = True) -> tuple[subprocess.Popen[bytes], str]:
        return super().launch_ready(reuseport=True)

    def reload(self) -> ReloadOutcome:
        proc, why = self.launch_ready()
        if why:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            return ReloadOutcome("failed", why)
        old, self.current = self.current, proc
        if old is not None:
            os.kill(old.pid, signal.SIGTERM)  # its socket, and the connections queued on it, go
        return ReloadOutcome("ok", "new instance ready; old one stopped")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m bench.compare --peers reuseport-overlap")
