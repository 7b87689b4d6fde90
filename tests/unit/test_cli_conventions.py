"""The ``handoffd`` command's conventions: ``--version``, shipped completions, a light start.

``--version`` and the client commands run in a fresh interpreter (as the console script does),
which reports what it loaded: neither trio nor pydantic (the daemon's) nor shtab (only
``handoffd completion`` needs it) may load on the path every ``status`` and health check takes
(bench/RESULTS.md, "CLI start-up"). The shipped completion scripts must be what the parser
generates now, or a renamed option would complete wrongly for every user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from handoff._cli import completion_script

REPO = Path(__file__).resolve().parent.parent.parent
HEAVY = ("trio", "pydantic", "pydantic_core", "structlog", "shtab")
# What the console script runs, then the heavy modules it loaded, on the fd $REPORT_FD (stdout is
# the CLI's).
ENTRY = f"""
import atexit, json, os, sys
def report():
    os.write(int(os.environ['REPORT_FD']), json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})).encode())
atexit.register(report)
{{prelude}}
from handoff._cli import main
sys.exit(main())
"""


def run_cli(*argv: str, prelude: str = "") -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, heavy modules loaded) of one fresh ``handoffd ARGV``."""
    read, write = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ENTRY.format(prelude=prelude), *argv],
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "REPORT_FD": str(write)},
            cwd=REPO,
            pass_fds=(write,),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        os.close(write)
        write = -1
        with os.fdopen(read) as f:
            read = -1
            heavy: list[str] = json.loads(f.read())
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
    return proc.returncode, proc.stdout, proc.stderr, heavy


def test_version_prints_the_installed_version_and_loads_nothing_heavy() -> None:
    code, out, err, heavy = run_cli("--version")

    assert (code, out, err) == (0, f"handoffd {metadata.version('handoffd')}\n", "")
    assert heavy == []


def test_status_client_path_loads_neither_the_daemon_nor_shtab() -> None:
    code, out, err, heavy = run_cli("status", "--socket", "/nonexistent/handoffd.sock")

    assert (code, out) == (3, ""), err
    assert "/nonexistent/handoffd.sock" in err
    assert heavy == []


@pytest.mark.parametrize(("shell", "shipped"), [("bash", "handoffd.bash"), ("zsh", "_handoffd")])
def test_shipped_completion_is_what_the_parser_generates_now(shell: str, shipped: str) -> None:
    on_disk = (REPO / "deploy" / "completions" / shipped).read_text()

    assert completion_script(shell) == on_disk, f"stale; run scripts/completions ({shipped})"


def test_completion_scripts_complete_every_command_and_paths_as_files() -> None:
    bash = completion_script("bash")

    assert (
        "_shtab_handoffd_subparsers=(run upgrade status stop metrics check-config completion)"
        in bash
    )
    assert "_shtab_handoffd_status___config_COMPGEN=_shtab_compgen_files" in bash
    assert "_shtab_handoffd_check_config_pos_0_COMPGEN=_shtab_compgen_files" in bash


def test_completion_without_shtab_says_what_to_install() -> None:
    # None in sys.modules makes `import shtab` raise ImportError, as if it were not installed.
    code, out, err, _ = run_cli("completion", "bash", prelude="sys.modules['shtab'] = None")

    assert (code, out) == (2, "")
    assert err == (
        "handoffd: shell completion needs shtab, which is not installed: pip install shtab, or "
        "use the scripts in deploy/completions\n"
    )
