"""Where handoffd keeps its sockets: pure path logic shared by the daemon and the CLI client.

Kept free of pydantic and trio so that ``handoffd status`` and ``handoffd upgrade`` start in
tens of milliseconds: they only need to find the control socket.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping


#: The variable naming the handover channel's fd in a successor supervisor (see ``_handover``);
#: here so that a start-up that is not a handover need not load the handover's models.
HANDOVER_FD_ENV: Final = "HANDOFF_SUPERVISOR_FD"
#: The variable naming the memfd of the state in a supervisor that re-executed itself in place.
REEXEC_FD_ENV: Final = "HANDOFF_REEXEC_FD"
#: The longest path a Unix socket address can hold: sun_path is 108 bytes with its NUL (unix(7)).
SUN_PATH_MAX: Final = 107


def runtime_dir_for(configured: Path | None, environ: Mapping[str, str]) -> Path:
    """The runtime directory: the configured one; else systemd's ``RUNTIME_DIRECTORY``
    (RuntimeDirectory=); else ``/run/handoffd`` for root and ``$XDG_RUNTIME_DIR/handoffd``
    (or ``/tmp/handoffd-UID``) for other users."""
    if configured is not None:
        return configured
    if environ.get("RUNTIME_DIRECTORY"):
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.getuid() == 0:
        return Path("/run/handoffd")
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "handoffd"
    return Path(f"/tmp/handoffd-{os.getuid()}")


def control_socket_for(
    configured_socket: Path | None, configured_runtime: Path | None, environ: Mapping[str, str]
) -> Path:
    """The control socket: the configured one, else ``RUNTIME_DIR/control.sock``."""
    if configured_socket is not None:
        return configured_socket
    return runtime_dir_for(configured_runtime, environ) / "control.sock"


def find_control_socket(path: Path, environ: Mapping[str, str], *, named: bool = False) -> Path:
    """The control socket named by the config at ``path``, read leniently.

    Only ``supervisor.runtime_dir`` and ``supervisor.control_socket`` are looked at, so that a
    config the operator just broke still lets ``handoffd upgrade`` reach the running daemon,
    which then reports the config error as the reason the upgrade failed.

    Args:
        path: the config file.
        environ: where the default runtime directory is looked up.
        named: the user named ``path`` (``--config``): a file that cannot be read is then an
            error, not the default socket, which may belong to another daemon.

    Raises:
        ConfigError: ``named`` and the file cannot be read.
    """
    path = path.absolute()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        if named:
            raise ConfigError(
                f"config {path}: cannot read it ({exc.strerror}); name the config the daemon "
                "runs with, or its control socket with --socket PATH"
            ) from exc
        raw = {}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raw = {}
    section = raw.get("supervisor")
    found: dict[str, Path] = {}
    if isinstance(section, dict):
        for key in ("runtime_dir", "control_socket"):
            value = section.get(key)
            if isinstance(value, str):
                found[key] = path.parent / value
    return control_socket_for(found.get("control_socket"), found.get("runtime_dir"), environ)
