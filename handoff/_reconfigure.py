"""What an upgrade may change in ``[supervisor]``, and applying it.

A worker upgrade reloads the whole config file. The ``[program]`` and ``[[listener]]`` parts go
to the new generation; the ``[supervisor]`` part belongs to the running daemon:

- applied at once: ``allowed_uids`` (the control socket's check and file mode follow),
  ``pid_file`` (the new file is written, the old one removed), ``restart_backoff_*`` (the new
  generation's restarts), ``self_upgrade_timeout`` (the next self-upgrade);
- read at start only, so a change has nothing to apply to: ``keep_unclaimed``;
- refused, failing the upgrade with the field named while N keeps serving: ``runtime_dir`` and
  ``control_socket``. Moving them under a running daemon would leave every later
  ``handoffd upgrade --config`` (the unit's ExecReload) looking for the daemon in the new place
  while it answers in the old one; ``upgrade --self`` or a restart moves them safely.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog

from ._errors import ConfigError
from ._pidfile import remove_pid_file, write_pid_file

if TYPE_CHECKING:
    from pathlib import Path

    from ._config import LoadedConfig, SupervisorConfig

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

_MOVED = "changes take effect with `handoffd upgrade --self` or a restart"


def refuse_unappliable(old: SupervisorConfig, new: LoadedConfig) -> None:
    """Fail the upgrade if ``new`` changes what an upgrade cannot apply.

    Raises:
        ConfigError: naming each such field, its running and its configured value, the fix.
    """
    refused = _refused(old, new.config.supervisor)
    if refused:
        raise ConfigError(f"config {new.path}: {'; '.join(refused)}")


def _refused(old: SupervisorConfig, new: SupervisorConfig) -> list[str]:
    return [
        f"supervisor.{field}: {_MOVED} (running with {before}, the config now says {after}); "
        "put it back, or run that"
        for field, before, after in (
            ("runtime_dir", old.runtime_dir, new.runtime_dir),
            ("control_socket", old.control_socket, new.control_socket),
        )
        if before != after
    ]


def apply_changes(
    old: SupervisorConfig,
    new: SupervisorConfig,
    *,
    allowed_uids: set[int],
    control_path: Path | None,
    runtime_dir: Path,
) -> None:
    """Apply the ``[supervisor]`` changes of a successful upgrade (see the module docstring)."""
    if old.pid_file != new.pid_file:
        if new.pid_file is not None:
            try:
                write_pid_file(new.pid_file)
            except OSError as exc:
                log.warning("pid_file.not_written", path=str(new.pid_file), error=exc.strerror)
        remove_pid_file(old.pid_file)
        log.info("supervisor.pid_file_moved", path=str(new.pid_file), was=str(old.pid_file))
    wanted = {0, os.getuid(), *new.allowed_uids}
    if wanted != set(allowed_uids):
        allowed_uids.clear()
        allowed_uids.update(wanted)
        others = bool(wanted - {0, os.getuid()})
        try:
            # Others than root and us can only connect if the socket file lets them (unix(7)).
            if control_path is not None:
                os.chmod(control_path, 0o666 if others else 0o600)
            os.chmod(runtime_dir, 0o711 if others else 0o700)
        except OSError as exc:
            log.warning("control_socket.mode_not_changed", error=exc.strerror)
        log.info("supervisor.allowed_uids_changed", allowed_uids=sorted(wanted))
