"""The pid file: written at start (and by a successor), removed at a clean stop if still ours."""

from __future__ import annotations

import os
from contextlib import suppress
from typing import TYPE_CHECKING

import structlog

from ._errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (temp file + rename), so a reader never sees a partial file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(f"{os.getpid()}\n")
    os.rename(temp, path)


def write_pid_file_or_fail(path: Path | None) -> None:
    """``write_pid_file`` at start-up, where failing to write it is a config error."""
    if path is None:
        return
    try:
        write_pid_file(path)
    except OSError as exc:
        raise ConfigError(
            f"supervisor.pid_file = {str(path)!r}: cannot write it: {exc.strerror}; use a "
            "writable path, such as one under supervisor.runtime_dir"
        ) from exc


def restore_pid_file(path: Path | None) -> None:
    """After a failed handover: the new one wrote its pid before saying in_charge; ours again."""
    if path is None:
        return
    try:
        write_pid_file(path)
    except OSError as exc:
        log.warning("pid_file.not_restored", path=str(path), error=exc.strerror)


def remove_pid_file(path: Path | None) -> None:
    """Remove the pid file if it still names us (a successor rewrites it with its own pid)."""
    if path is None:
        return
    with suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
