"""The runtime directory: resolved once, checked, held open, and everything created relative to it.

handoffd keeps its control socket and one notify socket per worker there. Whoever can replace
that directory, or a symlink on the way to it, receives what handoffd and its workers send there:
READY=1 (and so the right to end the previous generation) and every parked fd.

Design notes:
- The configured path is walked one component at a time from ``/``, each directory opened with
  ``O_DIRECTORY|O_NOFOLLOW`` relative to the previous one, so the checks are made on what is
  opened, not on a name that could change after it was checked. Missing directories are created
  on the way with ``mkdir`` relative to their parent's fd (the runtime dir itself 0700, parents
  0755), and checked after creation like any other.
- A symlink on the way is followed only if it is owned by root or by us: a root-owned link such
  as Debian's ``/var/run -> /run`` keeps working, a link another uid planted (or could swap) is
  refused. Every directory passed through must be owned by root or by us and not writable by
  others unless sticky (``/tmp``): another uid could rename it and put its own in its place. The
  runtime dir itself must be ours and writable by nobody else.
- The result is the real path (no symlink left in it) and an open fd of each directory. A later
  swap of a link in the configured path changes nothing: what handoffd creates goes to the
  directory it resolved at start.
- AF_UNIX ``bind`` takes a path, not a directory fd. We bind on the real path (checked, as above,
  so that only root or we could change any component of it) rather than on
  ``/proc/self/fd/N/NAME``: the sockets are connected to by other processes (workers through
  ``NOTIFY_SOCKET``, the CLI), which cannot use our ``/proc/self/fd`` and must find them by the
  real path anyway, so that path has to be trustworthy whatever we bind on; and ``/proc`` need not
  be mounted. After the control socket is bound, ``verify_control_socket`` checks that the real
  path still names the directory held open and that the socket is in it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

from . import _client
from ._errors import ConfigError, HandoffError, ListenerError
from ._generation import notify_dir_ok

if TYPE_CHECKING:
    from collections.abc import Callable

    _Fail = Callable[[str, str], ConfigError]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# path_resolution(7): the kernel gives up after 40 symlinks (ELOOP); so do we.
_MAX_SYMLINKS: Final = 40
# unix(7): sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX: Final = 107
# The runtime dir is ours alone; parents we create are traversable (allowed_uids need that).
_RUNTIME_DIR_MODE: Final = 0o700
_PARENT_MODE: Final = 0o755
_FIX: Final = "run as a user who may, or set it to a directory you own"


@final
class HeldDir:
    """A directory opened ``O_DIRECTORY|O_NOFOLLOW``, with the real path it had when opened."""

    def __init__(self, fd: int, real: Path) -> None:
        self.fd = fd
        self.real = real

    def identity(self) -> tuple[int, int]:
        info = os.fstat(self.fd)
        return info.st_dev, info.st_ino

    def still_at_real_path(self) -> bool:
        """Whether the real path still names this directory (nobody renamed or replaced it)."""
        try:
            info = os.stat(self.real, follow_symlinks=False)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.identity()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_dir(
    path: Path, setting: str, *, mode: int = _RUNTIME_DIR_MODE, ours: bool = True
) -> HeldDir:
    """Resolve ``path`` once, creating what is missing, and hold it open (see the module notes).

    ``setting`` names the config field for messages (``supervisor.runtime_dir``). With
    ``ours=False`` the directory itself is checked like its parents (root's or ours, not
    writable by others unless sticky) instead of having to be ours alone.

    Raises:
        ConfigError: a component is unsafe (owned or writable by another uid, a symlink owned
            by another uid), not a directory, or cannot be created; naming it and the fix.
    """
    uid = os.getuid()
    pending = list(reversed(path.absolute().parts[1:]))
    fd = os.open("/", _DIR_FLAGS)
    real: list[str] = []
    links = 0

    def fail(problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{setting} = {str(path)!r}: {problem}; {fix}")

    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                fd = _step(fd, "..")
                real = real[:-1]
                continue
            here = "/" + "/".join([*real, name])
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                _create(fd, name, mode if not pending else _PARENT_MODE, here, fail)
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid not in (0, uid):
                    raise fail(
                        f"{here} is a symlink owned by uid {info.st_uid}, who could point it "
                        "elsewhere at any time",
                        "use a directory (or a link) owned by root or by the user handoffd runs as",
                    )
                links += 1
                if links > _MAX_SYMLINKS:
                    raise fail(f"more than {_MAX_SYMLINKS} symlinks on the way", "fix the loop")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    fd = _step(fd, "/")
                    real = []
                pending.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(info.st_mode):
                kind = "a regular file" if stat.S_ISREG(info.st_mode) else "not a directory"
                raise fail(
                    f"{here} is {kind}, so nothing can be created below it",
                    f"set {setting} to a path whose every component is a directory",
                )
            # Checked before opening too, for the clearer message when we may not open it.
            _check(info, here, final=ours and not pending, uid=uid, fail=fail)
            fd = _step(fd, name)
            real.append(name)
            _check(os.fstat(fd), here, final=ours and not pending, uid=uid, fail=fail)
        if not real:
            _check(os.fstat(fd), "/", final=ours, uid=uid, fail=fail)
    except OSError as exc:
        os.close(fd)
        raise fail(f"cannot open or create it: {exc.strerror or exc}", _FIX) from exc
    except BaseException:
        os.close(fd)
        raise
    return HeldDir(fd, Path("/", *real))


def _step(fd: int, name: str) -> int:
    """Open ``name`` relative to ``fd`` (never through a symlink), then close ``fd``."""
    new = os.open(name, _DIR_FLAGS, dir_fd=fd)
    os.close(fd)
    return new


def _create(fd: int, name: str, mode: int, here: str, fail: _Fail) -> None:
    try:
        os.mkdir(name, mode, dir_fd=fd)
    except FileExistsError:
        pass  # someone else was faster: it is checked like any existing directory
    except OSError as exc:
        raise fail(f"cannot create {here}: {exc.strerror or exc}", _FIX) from exc


def _check(info: os.stat_result, here: str, *, final: bool, uid: int, fail: _Fail) -> None:
    """Refuse a directory another uid could replace (an ancestor) or write into (the dir)."""
    mode = stat.S_IMODE(info.st_mode)
    if final:
        if info.st_uid != uid:
            raise fail(
                f"{here} is owned by uid {info.st_uid}, not by uid {uid} that handoffd runs as",
                f"remove it, or chown it to uid {uid}",
            )
        if mode & 0o022:
            raise fail(
                f"{here} is writable by others (mode {mode:o}): they could replace the control "
                "and notify sockets in it",
                f"chmod go-w {here}",
            )
        return
    if info.st_uid not in (0, uid):
        raise fail(
            f"{here} is owned by uid {info.st_uid}, who could replace what is below it",
            "use a directory whose parents are owned by root or by the user handoffd runs as",
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise fail(
            f"{here} is writable by others (mode {mode:o}) and not sticky: they could replace "
            "what is below it",
            f"chmod go-w {here}, or use another directory",
        )


@final
class RuntimeDir:
    """The runtime dir, its ``notify`` dir and the control socket's dir, each held open."""

    def __init__(self, root: HeldDir, notify: HeldDir, control: HeldDir, control_name: str) -> None:
        self.root = root
        self.notify = notify
        self.control = control
        self.control_name = control_name

    @property
    def notify_dir(self) -> Path:
        """The real path of the notify dir: where workers' notify sockets are bound."""
        return self.notify.real

    @property
    def control_path(self) -> Path:
        """The real path of the control socket."""
        return self.control.real / self.control_name

    def allow_traverse(self) -> None:
        """Let other uids reach the control socket (``allowed_uids``): 0711, never listable."""
        os.fchmod(self.root.fd, 0o711)

    def verify_control_socket(self, path: Path) -> int:
        """Check the control socket bound at ``path`` is in the directory held open; its inode.

        Raises:
            ListenerError: the directory was replaced after it was resolved.
        """
        held = self.root if path.parent == self.root.real else self.control
        info = os.stat(path.name, dir_fd=held.fd, follow_symlinks=False)
        if not held.still_at_real_path() or not stat.S_ISSOCK(info.st_mode):
            raise ListenerError(
                f"the control socket {path} is not in the directory handoffd resolved at start "
                f"({held.real} was replaced meanwhile); check who changes it, then start again"
            )
        return info.st_ino

    def close(self) -> None:
        for held in {id(d): d for d in (self.notify, self.control, self.root)}.values():
            held.close()


def open_runtime_dir(runtime_dir: Path, control_path: Path) -> RuntimeDir:
    """Resolve, check and hold the runtime dir (creating it 0700) and the control socket's dir.

    Raises:
        ConfigError: an unsafe or unusable directory, or a socket path too long for unix(7).
    """
    setting = "supervisor.runtime_dir"
    held: list[HeldDir] = []
    try:
        root = open_dir(runtime_dir, setting)
        held.append(root)
        notify = open_dir(root.real / "notify", setting)
        held.append(notify)
        problem = notify_dir_ok(notify.real)
        if problem is not None:
            raise ConfigError(f"{setting} = {str(runtime_dir)!r}: {problem}")
        if control_path.parent == runtime_dir:
            control = root
        else:
            control = open_dir(
                control_path.parent,
                "supervisor.control_socket's directory",
                mode=_PARENT_MODE,
                ours=False,
            )
            held.append(control)
        result = RuntimeDir(root, notify, control, control_path.name)
        check_socket_path(result.control_path, "supervisor.control_socket")
    except BaseException:
        for each in held:
            each.close()
        raise
    return result


def check_socket_path(path: Path, setting: str) -> None:
    """Refuse a Unix socket path longer than unix(7) allows, with the fix.

    Raises:
        ConfigError: naming the path, its length and the setting to change.
    """
    length = len(os.fsencode(str(path)))
    if length > _SUN_PATH_MAX:
        raise ConfigError(
            f"the control socket path {path} is {length} bytes, longer than the "
            f"{_SUN_PATH_MAX} unix(7) allows; set {setting} (or supervisor.runtime_dir) to a "
            "shorter path"
        )


def refuse_if_running(control_path: Path) -> None:
    """Refuse to start over a live daemon: binding would steal its control socket.

    Raises:
        ConfigError: the control socket path cannot be a Unix socket path (too long).
        ListenerError: another handoffd answers on it.
    """
    check_socket_path(control_path, "supervisor.control_socket")
    try:
        reply = _client.call(control_path, {"op": "status"}, timeout=2.0)
    except (HandoffError, NotADirectoryError):
        return  # nothing answers there: the path is free (or stale, or unusable: open says why)
    raise ListenerError(
        f"another handoffd (pid {reply.get('pid')}) already serves the control socket "
        f"{control_path}; stop it first, or give this one another supervisor.runtime_dir"
    )


def unlink_if_ours(path: Path, inode: int | None) -> None:
    """Remove the control socket unless a successor supervisor has already replaced it."""
    with contextlib.suppress(OSError):
        if inode is not None and os.stat(path, follow_symlinks=False).st_ino == inode:
            path.unlink()
