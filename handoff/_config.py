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

import grp
import importlib.util
import pwd
import re
import resource
import shutil
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal, final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ._address import Address, parse_address
from ._envfile import load_env_file
from ._errors import ConfigError
from ._paths import control_socket_for, runtime_dir_for
from ._paths import find_control_socket as find_control_socket
from ._validation import render_errors

if TYPE_CHECKING:
    from collections.abc import Mapping

UnlinkPolicy = Literal["none", "always", "socket-only", "flock"]
FdDelivery = Literal["listen_fds", "scm_rights"]
ReadyMode = Literal["auto", "accepting", "notify", "delay"]
OutputMode = Literal["inherit", "log"]
_READY_MODES: Final = frozenset({"auto", "accepting", "notify"})
# The longest canary hold accepted: a hold keeps two generations (twice the memory) serving and
# blocks every other upgrade; ten minutes is already a deploy strategy, not a canary.
HOLD_MAX: Final = 600.0
# The longest stop_delay accepted: a load balancer's health checks notice a 503 within a few
# intervals (seconds); past ten minutes a stop is more likely to be killed than delayed.
STOP_DELAY_MAX: Final = 600.0

# Names travel in LISTEN_FDNAMES, which is ':'-separated and limited to 255 bytes per name
# (sd_listen_fds_with_names(3)); a name is also used as FDNAME= in the systemd fd store.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
# setpriv(1) switches a worker's user and groups (posix_spawn cannot); looked up only here, never
# on the worker's PATH, which the config (and so whoever edits it) controls.
SETPRIV_PATH: Final = "/usr/bin:/bin:/usr/sbin:/sbin"
_SIZE_RE = re.compile(r"^([0-9]+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
    # Seconds between a stop (SIGTERM, ``handoffd stop``) and the first stop signal to a worker,
    # during which ``/readyz`` answers 503: a load balancer takes this instance out first.
    stop_delay: Annotated[float, Field(ge=0, le=STOP_DELAY_MAX, allow_inf_nan=False)] = 0.0


@final
class MetricsConfig(_Model):
    """``[metrics]``: the HTTP listener for ``/metrics``, ``/healthz`` and ``/readyz``.

    Absent: no listener, and prometheus-client is never imported. Opened at start only: a
    change takes effect with ``handoffd upgrade --self`` or a restart.
    """

    address: str = "127.0.0.1:9464"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parsed = parse_address(value)
        if parsed.kind != "tcp" or value.startswith("tcp://"):
            raise ValueError(
                'expected host:port or [v6]:port such as "127.0.0.1:9464" (the metrics '
                "listener is plain TCP, for Prometheus and load balancers)"
            )
        return value

    @model_validator(mode="after")
    def _library_installed(self) -> MetricsConfig:
        # find_spec locates the package without importing it: a config check stays cheap.
        if importlib.util.find_spec("prometheus_client") is None:
            raise ValueError(
                "[metrics] needs prometheus-client, which is not installed for this handoffd; "
                "install the extra (pip install 'handoffd[metrics]') or remove [metrics]"
            )
        return self

    @property
    def parsed_address(self) -> Address:
        return parse_address(self.address)


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
    # ``cwd`` is read as its old name (see ``_rename_cwd``).
    working_dir: Path | None = Field(default=None, strict=False)
    env_file: Path | None = Field(default=None, strict=False)
    user: str | int | None = None
    group: str | int | None = None
    umask: str | int | None = None
    nofile: int | None = Field(default=None, gt=0)
    core: Annotated[int, Field(ge=0)] | Literal["unlimited"] | None = None
    memory: int | str | None = None
    output: OutputMode = "inherit"
    _identity: WorkerIdentity | None = PrivateAttr(default=None)
    _file_env: dict[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _rename_cwd(cls, data: object) -> object:
        """``cwd`` was the first name of ``working_dir``: existing configs keep working."""
        if isinstance(data, dict) and "cwd" in data:
            if "working_dir" in data:
                raise ValueError(
                    "both cwd and working_dir are set; cwd is the old name of working_dir: "
                    "keep working_dir only"
                )
            data = {("working_dir" if k == "cwd" else k): v for k, v in data.items()}
        return data

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

    @field_validator("umask")
    @classmethod
    def _check_umask(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_umask(value)
        return value

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_size(value)
        return value

    @model_validator(mode="after")
    def _resolve_identity(self) -> ProgramConfig:
        self._identity = resolve_identity(self.user, self.group)
        return self

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

    @property
    def identity(self) -> WorkerIdentity | None:
        """Who the workers run as (``user``/``group`` resolved at load), None: as handoffd."""
        return self._identity

    @property
    def umask_bits(self) -> int | None:
        return None if self.umask is None else parse_umask(self.umask)

    @property
    def core_bytes(self) -> int | None:
        """RLIMIT_CORE in bytes, ``resource.RLIM_INFINITY`` for "unlimited", None: inherited."""
        return resource.RLIM_INFINITY if self.core == "unlimited" else self.core

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)

    def load_env_file(self) -> None:
        """Read ``env_file`` now (at config load, so a bad file fails the load that names it).

        Raises:
            ConfigError: the file is missing, unreadable, unsafe or malformed.
        """
        if self.env_file is not None:
            self._file_env = load_env_file(self.env_file)

    def worker_env(self) -> dict[str, str]:
        """``env_file``'s variables overridden by ``[program.env]``.

        A config validated without ``load_config`` (a handed-over generation) reads its file
        here, the first time.

        Raises:
            ConfigError: (only then) the file cannot be read.
        """
        if self.env_file is not None and self._file_env is None:
            self.load_env_file()
        return {**(self._file_env or {}), **self.env}


@final
@dataclass(frozen=True)
class WorkerIdentity:
    """``program.user``/``group`` resolved: the ids workers get, and how their groups are set.

    Supplementary groups: a ``user`` with a passwd entry gets its groups (initgroups(3), as
    login, su and systemd's ``User=`` do); otherwise (a numeric uid without an entry, or only
    ``group``) the workers get none, never handoffd's own (root's).
    """

    uid: int | None
    gid: int
    #: The passwd name (for initgroups and USER/LOGNAME), None for a uid without an entry.
    name: str | None
    home: str | None
    setting: str  # "program.user = 'nobody'", for messages
    setpriv: str


def resolve_identity(user: str | int | None, group: str | int | None) -> WorkerIdentity | None:
    """Look ``user`` and ``group`` up (names or numeric ids); None when neither is set.

    Raises:
        ValueError: an unknown name, a numeric uid without a group to use, or no setpriv(1).
    """
    if user is None and group is None:
        return None
    entry: pwd.struct_passwd | None = None
    uid: int | None = None
    if isinstance(user, str):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(
                f"user = {user!r}: no user of that name on this host (getpwnam); create it, or give a numeric "
                "uid such as user = 65534"
            ) from None
        uid = entry.pw_uid
    elif user is not None:
        if user < 0:
            raise ValueError(f"user = {user}: a uid is a number from 0 up")
        uid = user
        try:
            entry = pwd.getpwuid(user)
        except KeyError:
            entry = None
    if isinstance(group, str):
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(
                f"group = {group!r}: no group of that name on this host (getgrnam); create it, or give a "
                "numeric gid such as group = 65534"
            ) from None
    elif group is not None:
        if group < 0:
            raise ValueError(f"group = {group}: a gid is a number from 0 up")
        gid = group
    elif entry is not None:
        gid = entry.pw_gid
    else:
        raise ValueError(
            f"user = {user} has no passwd entry, so no primary group to run as; set program.group"
        )
    setting = f"program.user = {user!r}" if user is not None else f"program.group = {group!r}"
    setpriv = shutil.which("setpriv", path=SETPRIV_PATH)
    if setpriv is None:
        raise ValueError(
            f"{setting} needs setpriv(1) to start workers as another user, and it is not in "
            f"{SETPRIV_PATH}; install util-linux (apt-get install util-linux), or remove "
            "program.user and program.group (or set User= in handoffd's service unit)"
        )
    return WorkerIdentity(
        uid=uid,
        gid=gid,
        name=entry.pw_name if entry is not None else None,
        home=entry.pw_dir if entry is not None else None,
        setting=setting,
        setpriv=setpriv,
    )


def parse_umask(value: str | int) -> int:
    """``"027"``/``"0027"``/``"0o027"`` (octal text) or an int such as ``0o027``.

    Raises:
        ValueError: not octal, or outside 0..0o777.
    """
    if isinstance(value, str):
        try:
            parsed = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise ValueError('expected an octal umask such as "027" or 0o027') from None
    else:
        parsed = value
    if not 0 <= parsed <= 0o777:
        raise ValueError('a umask is between 0 and 0o777 (octal), such as "027"')
    return parsed


def parse_size(value: int | str) -> int:
    """Bytes from an int or ``"512M"``/``"2G"``/``"512MiB"`` (powers of 1024).

    Raises:
        ValueError: not a size, or zero.
    """
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value.strip())
        if match is None:
            raise ValueError('expected bytes as a number, or a size such as "512M" or "2G"')
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if size <= 0:
        raise ValueError("a memory limit is more than 0 bytes")
    return size


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
    metrics: MetricsConfig | None = None

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
    config = _resolve_paths(config, path.parent)
    try:
        config.program.load_env_file()
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    return LoadedConfig(path=path, config=config)


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
    new_prog = prog.model_copy(
        update={
            key: base / value
            for key, value in (("working_dir", prog.working_dir), ("env_file", prog.env_file))
            if value is not None and not value.is_absolute()
        }
    )
    return config.model_copy(
        update={"supervisor": sup.model_copy(update=updates), "program": new_prog}
    )


def resolve_runtime_dir(supervisor: SupervisorConfig, environ: Mapping[str, str]) -> Path:
    """Where the control socket and notify sockets live (see ``_paths.runtime_dir_for``)."""
    return runtime_dir_for(supervisor.runtime_dir, environ)


def control_socket_path(supervisor: SupervisorConfig, environ: Mapping[str, str]) -> Path:
    """The control socket: ``supervisor.control_socket`` or ``RUNTIME_DIR/control.sock``."""
    return control_socket_for(supervisor.control_socket, supervisor.runtime_dir, environ)
