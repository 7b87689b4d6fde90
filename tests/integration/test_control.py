"""The control socket: permissions, bad requests answered with errors, the daemon carries on."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.daemon import REPO, Daemon

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def converse(path: Path, payload: bytes, replies: int = 1) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        reader = sock.makefile("rb")
        out = []
        for _ in range(replies):
            line = reader.readline()
            if not line:
                break
            out.append(json.loads(line))
        reader.close()
        return out


def test_control_socket_is_private_to_its_owner(run_daemon: Callable[..., Daemon]) -> None:
    daemon = run_daemon(processes=1)
    mode = stat.S_IMODE((daemon.runtime_dir / "control.sock").stat().st_mode)
    assert mode == 0o600


def test_malformed_requests_get_error_replies_on_the_same_connection(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    path = daemon.runtime_dir / "control.sock"
    lines = b"".join(
        [
            b"this is not json\n",
            b'{"v":1,"op":"explode"}\n',
            b'{"v":2,"op":"status"}\n',
            b'{"v":1,"op":"status","extra":true}\n',
            b"[1,2,3]\n",
            b'{"v":1,"op":"status"}\n',
        ]
    )
    replies = converse(path, lines, replies=6)
    codes = [r.get("error", {}).get("code") for r in replies[:5]]  # type: ignore[union-attr]
    assert codes == ["bad_json", "bad_request", "bad_version", "bad_request", "bad_request"]
    assert "explode" in replies[1]["error"]["message"]  # type: ignore[index]
    assert replies[5]["op"] == "status"
    assert replies[5]["generation"] == 1
    assert daemon.proc.poll() is None


def test_oversized_request_is_refused_and_daemon_carries_on(
    run_daemon: Callable[..., Daemon],
) -> None:
    daemon = run_daemon(processes=1)
    path = daemon.runtime_dir / "control.sock"
    (reply,) = converse(path, b"x" * (200 * 1024))
    assert reply["ok"] is False
    assert reply["error"]["code"] == "too_long"  # type: ignore[index]
    assert daemon.status()["generation"] == 1


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[program]\ncommand = ["true"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[program]\ncommand = ["true"]\nprocesses = "two"\n')
    run = lambda p: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "handoff", "check-config", str(p)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    ok, ko = run(good), run(bad)
    assert ok.returncode == 0
    assert "ok" in ok.stdout
    assert ko.returncode == 2
    assert (
        f"config {bad}: program.processes: Input should be a valid integer (got 'two')" in ko.stderr
    )
