"""The config file: pydantic models and ``load_config(path)`` (addresses are ``_address``'s).

Design notes:
- Models are frozen and ``extra="forbid"``: a typo in a key is an error that names the key, never a
  silently ignored setting. Scalars are strict (``"30"`` is not a number of seconds).
- Errors name the file, the field and the value at fault, so that an operator reading a failed
  ``handoffd upgrade`` knows what to change: ``config /etc/handoffd.toml: program.drain_timeout:
  Input should be a valid number (got '30s')``.
- Loading is pure apart from reading the one file; defaults that depend on the environment
  (the runtime directory) are resolved by ``resolve_runtime_dir`` with an explicit ``environ``.
"""

from __future__ import annotations

import re
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal, final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._address import Address, parse_address
from ._errors import ConfigError
from ._paths import control_socket_for, runtime_dir_for
from ._paths import find_control_socket as find_control_socket
from ._validation import render_errors

if TYPE_CHECKING:
    from collections.abc import Mapping

UnlinkPolicy = Literal["none", "always", "socket-only", "flock"]
FdDelivery = Literal["listen_fds", "scm_rights"]
ReadyMode = Literal["auto", "accepting", "notify", "delay"]
_READY_MODES: Final = frozenset({"auto", "accepting", "notify"})
# The longest canary hold accepted: a hold keeps two generations (twice the memory) serving and
# blocks every other upgrade; ten minutes is already a deploy strategy, not a canary.
HOLD_MAX: Final = 600.0

# Names travel in LISTEN_FDNAMES, which is ':'-separated and limited to 255 bytes per name
# (sd_listen_fds_with_names(3)); a name is also used as FDNAME= in the systemd fd store.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")


def parse_signal(text: str) -> signal.Signals:
    """Turn ``"SIGTERM"``, ``"TERM"`` or ``"sigterm"`` into a signal; raises ``ValueError``."""
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError("expected a signal name such as SIGTERM, SIGQUIT or SIGINT") from None


_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@final
class SupervisorConfig(_Model):
    """``[supervisor]``: where handoffd keeps its sockets, and who may control it."""

    runtime_dir: Path | None = Field(default=None, strict=False)
    control_socket: Path | None = Field(default=None, strict=False)
    allowed_uids: list[int] = Field(default_factory=list)
    pid_file: Path | None = Field(default=None, strict=False)
    keep_unclaimed: bool = False
    restart_backoff_initial: _PositiveSeconds = 0.5
    restart_backoff_max: _PositiveSeconds = 30.0
    # How long the old supervisor waits for its successor to take over during a self-upgrade
    # (``handoffd upgrade --self``) before it kills it and carries on.
    self_upgrade_timeout: _PositiveSeconds = 30.0
    # How ``upgrade --self`` replaces the supervisor. "in-place": it re-executes itself and keeps
    # its pid (whatever started handoffd keeps waiting on the same process); "new-pid": a new
    # process takes over and tells systemd MAINPID= (only systemd follows that, or a manager
    # that re-reads pid_file); "auto": new-pid under systemd (NOTIFY_SOCKET set), else in-place.
    self_upgrade: Literal["auto", "in-place", "new-pid"] = "auto"


@final
class ListenerConfig(_Model):
    """One ``[[listener]]``: a socket handoffd binds (or inherits) and holds for its whole life."""

    name: str
    address: str
    backlog: int = Field(default=1024, gt=0)
    mode: int | str | None = None
    owner: str | int | None = None
    group: str | int | None = None
    unlink: UnlinkPolicy = "socket-only"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("a listener name is 1-255 characters of A-Z a-z 0-9 _ . - (no ':')")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str):
            try:
                parsed = int(value, 8)
            except ValueError:
                raise ValueError('expected an octal file mode such as "0660" or 0o660') from None
        else:
            parsed = value if value is not None else 0
        if not 0 <= parsed <= 0o7777:
            raise ValueError("a file mode is between 0 and 0o7777")
        return value

    @property
    def parsed_address(self) -> Address:
        return parse_address(self.address)

    @property
    def file_mode(self) -> int | None:
        if self.mode is None:
            return None
        return int(self.mode, 8) if isinstance(self.mode, str) else self.mode


@final
class ProgramConfig(_Model):
    """``[program]``: the worker command and how a generation of it is started and stopped."""

    command: list[str] = Field(min_length=1)
    processes: int = Field(default=1, ge=1, le=1024)
    ready: str = "auto"
    ready_timeout: _PositiveSeconds = 30.0
    # Seconds both generations serve side by side before the old one drains (the canary hold);
    # 2 s catches a worker that crashes 1 s after READY=1. 0 turns it off.
    hold: _Seconds = 2.0
    stop_signal: str = "SIGTERM"
    drain_timeout: _Seconds = 30.0
    fd_delivery: FdDelivery = "listen_fds"
    # How an upgrade replaces the workers: all at once (twice the workers for the hold), or
    # ``max_surge`` at a time (never more than processes + max_surge worker trees).
    strategy: Literal["all-at-once", "rolling"] = "all-at-once"
    max_surge: int = Field(default=1, ge=1, le=1024)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = Field(default=None, strict=False)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the program to run (command[0]) is empty")
        return value

    @field_validator("ready")
    @classmethod
    def _check_ready(cls, value: str) -> str:
        parse_ready(value)
        return value

    @field_validator("stop_signal")
    @classmethod
    def _check_signal(cls, value: str) -> str:
        parse_signal(value)
        return value

    @model_validator(mode="after")
    def _delay_fits_timeout(self) -> ProgramConfig:
        delay = parse_ready(self.ready)
        if delay is not None and delay >= self.ready_timeout:
            raise ValueError(
                f'ready = "{self.ready}" waits {delay:g}s, which is not shorter than ready_timeout '
                f"= {self.ready_timeout:g}s: every generation would fail; raise ready_timeout"
            )
        if self.hold > HOLD_MAX:
            raise ValueError(
                f"hold = {self.hold:g} keeps two generations serving for over {HOLD_MAX:g}s and "
                f"blocks every other upgrade meanwhile; use at most hold = {HOLD_MAX:g}"
            )
        return self

    @property
    def ready_delay(self) -> float | None:
        """Seconds of ``delay:N`` readiness, or None for the other modes."""
        return parse_ready(self.ready)

    @property
    def ready_mode(self) -> ReadyMode:
        """``auto``, ``accepting``, ``notify`` or ``delay`` (``ready_delay`` has the seconds)."""
        if self.ready == "auto":
            return "auto"
        if self.ready == "accepting":
            return "accepting"
        return "notify" if self.ready == "notify" else "delay"

    @property
    def observed(self) -> bool:
        """Whether readiness (and the hold) watch the worker's tree accept (``auto``/``accepting``)."""
        return self.ready in ("auto", "accepting")

    @property
    def stop_signum(self) -> signal.Signals:
        return parse_signal(self.stop_signal)


def parse_ready(text: str) -> float | None:
    """``"delay:N"`` gives N seconds; ``auto``/``accepting``/``notify`` give None; anything else
    is a ``ValueError``."""
    if text in _READY_MODES:
        return None
    if text.startswith("delay:"):
        try:
            seconds = float(text[len("delay:") :])
        except ValueError:
            seconds = -1.0
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    raise ValueError(
        'expected "notify" or "delay:SECONDS" such as "delay:2" (the explicit modes), or "auto" '
        'or "accepting" (readiness observed in /proc)'
    )


@final
class Config(_Model):
    """The whole config file."""

    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    listener: list[ListenerConfig] = Field(default_factory=list)
    program: ProgramConfig

    @field_validator("listener")
    @classmethod
    def _unique_names(cls, value: list[ListenerConfig]) -> list[ListenerConfig]:
        seen: set[str] = set()
        for item in value:
            if item.name in seen:
                raise ValueError(f"two listeners are named {item.name!r}; names must be unique")
            seen.add(item.name)
        return value


@final
@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and the file it came from (relative paths are relative to its folder)."""

    path: Path
    config: Config


def load_config(path: Path | str) -> LoadedConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: naming the file, the field and the value at fault, one line per problem.
    """
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = render_errors(exc, inputs=True)
        raise ConfigError("\n".join(f"config {path}: {line}" for line in lines)) from exc
    return LoadedConfig(path=path, config=_resolve_paths(config, path.parent))


def _resolve_paths(config: Config, base: Path) -> Config:
    sup = config.supervisor
    updates = {
        key: base / value
        for key, value in (
            ("runtime_dir", sup.runtime_dir),
            ("control_socket", sup.control_socket),
            ("pid_file", sup.pid_file),
        )
        if value is not None and not value.is_absolute()
    }
    prog = config.program
    new_prog = prog
    if prog.cwd is not None and not prog.cwd.is_absolute():
        new_prog = prog.model_copy(update={"cwd": base / prog.cwd})
    return config.model_copy(
        update={"supervisor": sup.model_copy(update=updates), "program": new_prog}
    )


def resolve_runtime_dir(supervisor: SupervisorConfig, environ: Mapping[str, str]) -> Path:
    """Where the control socket and notify sockets live (see ``_paths.runtime_dir_for``)."""
    return runtime_dir_for(supervisor.runtime_dir, environ)


def control_socket_path(supervisor: SupervisorConfig, environ: Mapping[str, str]) -> Path:
    """The control socket: ``supervisor.control_socket`` or ``RUNTIME_DIR/control.sock``."""
    return control_socket_for(supervisor.control_socket, supervisor.runtime_dir, environ)
