"""The config file: pydantic models, ``load_config(path)``, and listener address parsing.

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

import os
import re
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import ConfigError
from ._paths import control_socket_for, runtime_dir_for
from ._paths import find_control_socket as find_control_socket

if TYPE_CHECKING:
    from collections.abc import Mapping

AddressKind = Literal["tcp", "udp", "unix", "unixgram"]
UnlinkPolicy = Literal["none", "always", "socket-only", "flock"]
FdDelivery = Literal["listen_fds", "scm_rights"]

# Names travel in LISTEN_FDNAMES, which is ':'-separated and limited to 255 bytes per name
# (sd_listen_fds_with_names(3)); a name is also used as FDNAME= in the systemd fd store.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
_HOST_PORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z0-9]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$"
)


@final
@dataclass(frozen=True)
class Address:
    """A parsed listener address.

    ``host:port`` and ``[v6]:port`` (optionally ``tcp://``) are TCP; ``udp://host:port`` is UDP;
    ``unix:/path`` and ``unixgram:/path`` are Unix stream and datagram sockets, where a path
    starting with ``@`` is in the abstract namespace. Port 0 asks the kernel for a free port.
    """

    kind: AddressKind
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.kind in ("unix", "unixgram")

    @property
    def is_abstract(self) -> bool:
        return self.is_unix and self.path.startswith("@")

    def __str__(self) -> str:
        if self.is_unix:
            return f"{self.kind}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = "udp://" if self.kind == "udp" else ""
        return f"{prefix}{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse a listener address; raises ``ValueError`` with the accepted forms on a bad one."""
    forms = "expected host:port, [v6]:port, tcp://host:port, udp://host:port, unix:/path or unixgram:/path"
    for prefix, kind in (("unixgram:", "unixgram"), ("unix:", "unix")):
        if text.startswith(prefix):
            path = text[len(prefix) :]
            if not path or not (path.startswith("/") or path.startswith("@")):
                raise ValueError(
                    f"a {kind} address needs an absolute path or @abstract name; {forms}"
                )
            # sun_path is 108 bytes including the terminating NUL (unix(7)).
            if len(os.fsencode(path)) > 107:
                raise ValueError("the socket path is longer than the 107 bytes unix(7) allows")
            return Address(kind=kind, path=path)  # type: ignore[arg-type]
    kind_tcp: AddressKind = "tcp"
    rest = text
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
    elif text.startswith("udp://"):
        kind_tcp, rest = "udp", text[len("udp://") :]
    m = _HOST_PORT_RE.match(rest)
    if m is None:
        raise ValueError(forms)
    port = int(m["port"])
    if port > 65535:
        raise ValueError("the port must be between 0 and 65535")
    host = m["v6"] if m["v6"] is not None else m["host"]
    if host in ("", "*"):
        host = "0.0.0.0"
    return Address(kind=kind_tcp, host=host, port=port)


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
    ready: str = "notify"
    ready_timeout: _PositiveSeconds = 30.0
    stop_signal: str = "SIGTERM"
    drain_timeout: _Seconds = 30.0
    fd_delivery: FdDelivery = "listen_fds"
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
        return self

    @property
    def ready_delay(self) -> float | None:
        """Seconds of ``delay:N`` readiness, or None for ``notify``."""
        return parse_ready(self.ready)

    @property
    def stop_signum(self) -> signal.Signals:
        return parse_signal(self.stop_signal)


def parse_ready(text: str) -> float | None:
    """``"notify"`` gives None; ``"delay:N"`` gives N seconds; anything else is a ``ValueError``."""
    if text == "notify":
        return None
    if text.startswith("delay:"):
        try:
            seconds = float(text[len("delay:") :])
        except ValueError:
            seconds = -1.0
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    raise ValueError('expected "notify" or "delay:SECONDS" such as "delay:2"')


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


def _render_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


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
        lines = []
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            got_text = "" if err["type"] == "missing" else f" (got {got!r})"
            lines.append(f"config {path}: {_render_loc(err['loc'])}: {msg}{got_text}")
        raise ConfigError("\n".join(lines)) from exc
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
