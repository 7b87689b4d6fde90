"""The pid file: written atomically and safely, removed at exit if it still names us.

Design notes:
- The pid file often lives in a directory that another user may write (a service user's
  ``/var/run/app``, ``/tmp``). A predictable temp name that follows symlinks lets that user make
  root overwrite any file: the temp file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` under a
  random name, in the pid file's own directory (so ``rename(2)`` is atomic), and renamed over
  the pid file. ``rename`` replaces a symlink at the pid file's name; it never follows it.
- The mode is set with ``fchmod`` to 0644, whatever the umask: a world-writable pid file lets
  anyone point ``kill $(cat handoffd.pid)`` at another process.
- Everything is done relative to an fd of the directory, opened once, so the directory cannot be
  swapped between the create and the rename.
"""

from __future__ import annotations

import os
import secrets
from contextlib import suppress
from typing import TYPE_CHECKING, Final

import structlog

from ._errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

#: The pid file's mode: readable by everyone (``kill $(cat ...)``), writable by us only.
PID_FILE_MODE: Final = 0o644
# Random temp names collide only if someone plants them on purpose; give up after a few.
_TEMP_ATTEMPTS: Final = 8
_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


def write_pid_file(path: Path) -> None:
    """Write our pid to ``path`` atomically (random O_EXCL temp + rename), mode 0644.

    Raises:
        OSError: the directory cannot be opened or written.
    """
    dir_fd = os.open(path.parent, _OPEN_DIR)
    try:
        write_file_at(dir_fd, path.name, f"{os.getpid()}\n".encode(), PID_FILE_MODE)
    finally:
        os.close(dir_fd)


def write_file_at(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data`` atomically, with ``mode``.

    A random ``O_EXCL|O_NOFOLLOW`` temp file next to it, ``fchmod`` (whatever the umask), then
    ``rename(2)``, which replaces a symlink at ``name`` and never follows it.

    Raises:
        OSError: the directory cannot be written.
    """
    temp, fd = _create_temp(dir_fd, name)
    try:
        try:
            os.fchmod(fd, mode)
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


def _create_temp(dir_fd: int, name: str) -> tuple[str, int]:
    for _ in range(_TEMP_ATTEMPTS):
        temp = f".{name}.{secrets.token_hex(8)}"
        try:
            return temp, os.open(temp, _CREATE, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(f"{_TEMP_ATTEMPTS} random temp names next to {name} already exist")


def write_configured_pid_file(path: Path | None) -> None:
    """``write_pid_file`` for ``supervisor.pid_file`` (nothing when it is not set).

    Raises:
        ConfigError: naming the setting, the reason and the fix.
    """
    if path is None:
        return
    try:
        write_pid_file(path)
    except OSError as exc:
        raise ConfigError(
            f"supervisor.pid_file = {str(path)!r}: cannot write it: {exc.strerror or exc}; use a "
            "writable path, such as one under supervisor.runtime_dir"
        ) from exc


def remove_pid_file(path: Path | None) -> None:
    """Remove the pid file if it still names us (a successor rewrites it with its own pid).

    A symlink at the pid file's name is never followed: it is not a file we wrote.
    """
    if path is None:
        return
    with suppress(OSError):
        dir_fd = os.open(path.parent, _OPEN_DIR)
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                content = os.read(fd, 64)
            finally:
                os.close(fd)
            if content.strip() == str(os.getpid()).encode():
                os.unlink(path.name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def restore_pid_file(path: Path | None) -> None:
    """After a failed handover: the new one wrote its pid before saying in_charge; ours again."""
    if path is None:
        return
    try:
        write_pid_file(path)
    except OSError as exc:
        log.warning("pid_file.not_restored", path=str(path), error=exc.strerror)
