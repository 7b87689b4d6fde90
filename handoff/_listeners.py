"""The listening sockets: bind, inherit, match, unlink policy, and the set handed to workers.

Design notes:
- A listener is opened once (or inherited) and held for handoffd's whole life: every generation
  gets the same open file description, so the kernel's accept queue outlives any worker and a
  connection arriving during an upgrade waits in it instead of being refused.
- handoffd only *holds* these sockets. It never wraps them in trio sockets and never sets their
  flags: O_NONBLOCK lives on the open file description shared with every worker, so setting it
  here would change what a worker's blocking ``accept()`` does. A worker may set it, though, and
  every later generation would inherit it: ``restore_flags`` puts the file status flags back as
  they were when handoffd bound (or inherited) the socket, before each spawn. This also reaches
  the workers still running (one open file description): a worker that wants O_NONBLOCK must set
  it itself, as event loops do, and tolerate a blocking listener until it has.
- Unix socket paths: ``socket-only`` and ``flock`` remove a stale socket file, never a live one
  (something answers a connect on it). At a clean stop handoffd removes the socket files it bound
  itself if they are still the same file (whatever the unlink policy), so ``unlink = "none"``
  can start again on the same path; a file left by a crash is reported with the command that
  removes it.
- An upgrade may change the listener list. A listener whose name and address are unchanged is
  kept (the same socket); a new one is bound; one that left the config is retired and closed
  only after every generation that used it has stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import structlog

from ._errors import ListenerError
from ._match import KIND_TYPES, address_matches
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._address import Address
    from ._config import ListenerConfig
    from ._listen_fds import InheritedFd

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


# The file status flags each held socket had when we bound or inherited it, by socket identity
# (st_dev, st_ino of the open file description): ``restore_flags`` gets fds, not Listeners.
_flags_as_held: dict[tuple[int, int], int] = {}
# Held inet stream listeners by socket identity, so ``revive_dead`` can be given fds.
_held_streams: dict[tuple[int, int], Listener] = {}


@final
@dataclass(eq=False)
class Listener:
    """One held socket. Never close it while a generation may still use it."""

    config: ListenerConfig
    sock: socket.socket
    origin: str  # "bound", "inherited", "handed-over" or "recovered" (from orphans: _custody)
    lock_fd: int | None = None
    users: int = field(default=0)
    # (st_dev, st_ino) of the socket file we bound, to remove it at a clean stop if still ours.
    path_identity: tuple[int, int] | None = None
    # An inet stream listener's address as bound (port 0 resolved), to bind again in revive().
    sockname: tuple[str, int] | tuple[str, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.origin and self.sock.type == socket.SOCK_STREAM and self.sock.family in _INET:
            with contextlib.suppress(OSError):
                self.sockname = self.sock.getsockname()
                _held_streams[_identity(self.fd)] = self
        if self.origin:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if self.origin in ("handed-over", "recovered"):
                # A worker may have set it before we took it; handoffd binds blocking.
                flags &= ~os.O_NONBLOCK
            _flags_as_held[_identity(self.fd)] = flags

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def bound_address(self) -> str:
        """The address as the kernel reports it (port 0 resolved)."""
        addr = self.config.parsed_address
        try:
            name = self.sock.getsockname()
        except OSError:
            return str(addr)
        if addr.is_unix:
            path = name.decode("latin-1").replace("\0", "@", 1) if isinstance(name, bytes) else name
            return f"{addr.kind}:{path}"
        host, port = name[0], name[1]
        host_text = f"[{host}]" if ":" in host else host
        return f"{'udp://' if addr.kind == 'udp' else ''}{host_text}:{port}"

    def restore_flags(self) -> None:
        """Put O_NONBLOCK (and the other status flags) back as bound (see the module notes)."""
        restore_flags([self.fd])

    def apply(self, config: ListenerConfig) -> None:
        """Take a changed config for this held socket (after a successful upgrade).

        The backlog is applied with ``listen()``; a Unix socket file's ``mode``, ``owner`` and
        ``group`` with chmod/chown on its path. A setting removed from the config leaves the file
        as it is. Failures are logged, never raised: the upgrade has already succeeded.
        """
        old, self.config = self.config, config
        if config.backlog != old.backlog and self.sock.type == socket.SOCK_STREAM:
            self.sock.listen(config.backlog)
        addr = config.parsed_address
        if not addr.is_unix or addr.is_abstract:
            return
        if (config.file_mode, config.owner, config.group) == (old.file_mode, old.owner, old.group):
            return
        where = f"listener {config.name!r} ({config.address})"
        try:
            _apply_ownership(config, addr.path, where)
        except ListenerError as exc:
            log.warning("listener.update_failed", listener=config.name, reason=str(exc))
            return
        log.info("listener.updated", listener=config.name, mode=config.mode, group=config.group)

    def is_listening(self) -> bool:
        """False once someone ``shutdown(2)`` this inet stream listener (SO_ACCEPTCONN).

        Datagram and Unix listeners always answer True: a datagram socket has no listen state,
        and a Unix stream listener keeps SO_ACCEPTCONN set after shutdown(2), so it cannot be
        told apart here (a documented limitation).
        """
        if self.sockname is None:
            return True
        try:
            listening = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            # listen() after a shutdown(2) binds a fresh ephemeral port: listening, but not
            # where anyone connects.
            return bool(listening) and self.sock.getsockname()[:2] == self.sockname[:2]
        except OSError:
            return False

    def revive(self) -> bool:
        """Make a listener someone shut down listen again, on the same open file description.

        Every generation holds this file description, so they all serve again. A plain
        ``listen()`` is not enough once every holder called shutdown: it listens on a fresh
        ephemeral port and the old one refuses. ``connect(AF_UNSPEC)`` resets the socket, it is
        bound to its old address again (a port-0 listener keeps the port it had) and listens.
        Returns whether it listens again (a failure is logged: another process took the port).
        """
        if self.is_listening() or self.sockname is None:
            return True
        try:
            _disconnect(self.fd)
            try:
                self.sock.bind(self.sockname)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: still bound there, listen() will do
                    raise
            self.sock.listen(self.config.backlog)
        except OSError as exc:
            log.error(
                "listener.not_revived",
                listener=self.name,
                address=self.bound_address(),
                error=exc.strerror,
                hint="another process may have taken the port; restart handoffd",
            )
            return False
        listening = self.is_listening()
        log.warning(
            "listener.revived" if listening else "listener.not_revived",
            listener=self.name,
            address=self.bound_address(),
            cause="a worker called shutdown(2) on its inherited listener, which stops it "
            "listening for every holder; handoffd made it listen again",
        )
        return listening

    def close(self, *, unlink: bool = False) -> None:
        """Close the socket; with ``unlink``, also remove the socket file we bound, if it is
        still the one (a clean stop; never after a handover, the successor serves on it)."""
        with contextlib.suppress(OSError):
            _flags_as_held.pop(_identity(self.fd), None)
            _held_streams.pop(_identity(self.fd), None)
        if unlink and self.path_identity is not None:
            path = self.config.parsed_address.path
            with contextlib.suppress(OSError):
                if _path_identity(path) == self.path_identity:
                    os.unlink(path)
                    log.info("listener.unlinked", listener=self.name, path=path)
        self.sock.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _path_identity(path: str) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


_INET: Final = (socket.AF_INET, socket.AF_INET6)
_libc: ctypes.CDLL | None = None


def _disconnect(fd: int) -> None:
    """connect(2) with AF_UNSPEC: dissolve the socket's association (Python's connect cannot)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    address = struct.pack("H14x", socket.AF_UNSPEC)  # struct sockaddr, sa_family only
    if _libc.connect(fd, ctypes.c_char_p(address), len(address)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def revive_dead(fds: Iterable[int]) -> list[str]:
    """Before a spawn: revive each held inet listener among ``fds`` that stopped listening.

    Returns the names of those that could not be revived.
    """
    dead = []
    for fd in fds:
        with contextlib.suppress(OSError):
            listener = _held_streams.get(_identity(fd))
            if listener is not None and not listener.revive():
                dead.append(listener.name)
    return dead


def restore_flags(fds: Iterable[int]) -> None:
    """Before a spawn: give each held listener among ``fds`` its status flags as bound back.

    A worker that set O_NONBLOCK on its inherited listener set it for every holder of the open
    file description, and so for every later generation (see the module notes). Fds that are
    not held listeners are left alone.
    """
    for fd in fds:
        try:
            want = _flags_as_held.get(_identity(fd))
            have = fcntl.fcntl(fd, fcntl.F_GETFL)
            if want is not None and have != want:
                fcntl.fcntl(fd, fcntl.F_SETFL, want)
                log.info("listener.flags_restored", fd=fd, nonblocking=bool(have & os.O_NONBLOCK))
        except OSError as exc:
            log.warning("listener.flags_not_restored", fd=fd, error=exc.strerror)


def _family_of(addr: Address) -> socket.AddressFamily:
    if addr.is_unix:
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in addr.host else socket.AF_INET


def _unix_sockaddr(addr: Address) -> str | bytes:
    return b"\0" + os.fsencode(addr.path[1:]) if addr.is_abstract else addr.path


def bind_listener(config: ListenerConfig) -> Listener:
    """Create, bind and (for streams) listen on the configured address.

    Raises:
        ListenerError: naming the listener and address, with the fix where there is one.
    """
    addr = config.parsed_address
    where = f"listener {config.name!r} ({config.address})"
    sock = socket.socket(_family_of(addr), KIND_TYPES[addr.kind] | SOCK_CLOEXEC)
    lock_fd: int | None = None
    path_identity: tuple[int, int] | None = None
    try:
        if addr.is_unix:
            lock_fd = _prepare_unix_path(config, addr, where)
            sock.bind(_unix_sockaddr(addr))
            if not addr.is_abstract:
                path_identity = _path_identity(addr.path)
                _apply_ownership(config, addr.path, where)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr.host, addr.port))
        if sock.type == socket.SOCK_STREAM:
            sock.listen(config.backlog)
    except OSError as exc:
        sock.close()
        if lock_fd is not None:
            os.close(lock_fd)
        hint = ""
        if exc.errno == 98:  # EADDRINUSE
            hint = "; another process holds it (find it with `ss -ltnp`), or pick another address"
        elif exc.errno == 13:  # EACCES
            hint = "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
        raise ListenerError(f"{where}: cannot bind: {exc.strerror}{hint}") from exc
    except BaseException:
        sock.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    log.info(
        "listener.bound", listener=config.name, address=_describe(sock, config), fd=sock.fileno()
    )
    return Listener(
        config=config, sock=sock, origin="bound", lock_fd=lock_fd, path_identity=path_identity
    )


def _describe(sock: socket.socket, config: ListenerConfig) -> str:
    return Listener(config=config, sock=sock, origin="").bound_address()


def _prepare_unix_path(config: ListenerConfig, addr: Address, where: str) -> int | None:
    """Apply the unlink policy to a stale path; returns the lock fd for ``flock``."""
    if addr.is_abstract:
        return None
    lock_fd: int | None = None
    if config.unlink == "flock":
        lock_path = addr.path + ".lock"
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ListenerError(
                f"{where}: {lock_path} is locked by another process; another handoffd serves "
                "this socket, stop it first"
            ) from None
    try:
        st = os.lstat(addr.path)
    except FileNotFoundError:
        return lock_fd
    is_sock = stat.S_ISSOCK(st.st_mode)
    live = is_sock and config.unlink != "always" and _answers(addr.path)
    if live:
        if lock_fd is not None:
            os.close(lock_fd)
        raise ListenerError(
            f"{where}: {addr.path} is a live socket (another process answers a connect on it); "
            "refusing to remove it: stop that process, or give this listener another path"
        )
    if config.unlink == "always" or (config.unlink in ("socket-only", "flock") and is_sock):
        os.unlink(addr.path)
    elif config.unlink == "none":
        if lock_fd is not None:
            os.close(lock_fd)
        what = "a stale socket (nothing answers on it)" if is_sock else "not a socket"
        raise ListenerError(
            f'{where}: {addr.path} exists and unlink = "none" ({what}); remove it '
            f'(rm {addr.path}) or set unlink = "socket-only"'
        )
    else:
        if lock_fd is not None:
            os.close(lock_fd)
        raise ListenerError(
            f"{where}: {addr.path} exists and is not a socket; refusing to remove it "
            '(unlink = "always" would)'
        )
    return lock_fd


# connect(2) errors on a Unix socket path that mean "nobody is bound there": a stale file.
_STALE_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.ENOENT})


def _answers(path: str) -> bool:
    """Whether something serves the Unix socket at ``path`` (a non-blocking connect succeeds).

    A full backlog (EAGAIN) and a socket of the other type (EPROTOTYPE) are live too; only
    ECONNREFUSED (or the file gone) means stale. Other errors (EACCES) mean we cannot tell, and
    count as live: removing a socket someone else serves is worse than asking the operator.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except OSError as exc:
            return exc.errno not in _STALE_ERRNOS
    return True


def _apply_ownership(config: ListenerConfig, path: str, where: str) -> None:
    try:
        if config.file_mode is not None:
            os.chmod(path, config.file_mode)
        if config.owner is not None or config.group is not None:
            uid = _lookup_id(config.owner, "owner", where, lambda n: pwd.getpwnam(n).pw_uid)
            gid = _lookup_id(config.group, "group", where, lambda n: grp.getgrnam(n).gr_gid)
            os.chown(path, uid, gid)
    except OSError as exc:
        raise ListenerError(f"{where}: cannot set mode/owner on {path}: {exc.strerror}") from exc


def _lookup_id(value: str | int | None, what: str, where: str, lookup: object) -> int:
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    try:
        return int(lookup(value))  # type: ignore[operator]
    except KeyError:
        raise ListenerError(f"{where}: {what} {value!r} does not exist on this host") from None


def socket_matches(sock: socket.socket, addr: Address) -> bool:
    """Whether an inherited socket is of the kind and address a listener wants (see ``_match``)."""
    return address_matches(sock, addr.kind, host=addr.host, port=addr.port, path=addr.path)


def adopt_inherited(
    configs: Sequence[ListenerConfig], inherited: Iterable[InheritedFd]
) -> tuple[dict[str, Listener], list[InheritedFd]]:
    """Claim inherited fds for configured listeners: first by name, then by type and address.

    Returns the claimed listeners by name and the fds no listener claimed (the caller logs and
    closes or keeps them).
    """
    pool = list(inherited)
    claimed: dict[str, Listener] = {}
    for config in configs:
        addr = config.parsed_address
        pick = next((item for item in pool if item.name == config.name), None)
        if pick is not None:
            sock = socket.socket(fileno=pick.fd)
            if not socket_matches(sock, addr) and addr.port != 0:
                log.warning(
                    "listener.inherited_mismatch",
                    listener=config.name,
                    configured=config.address,
                    inherited=Listener(config=config, sock=sock, origin="").bound_address(),
                )
            sock.detach()
        else:
            for item in pool:
                probe = socket.socket(fileno=item.fd)
                ok = socket_matches(probe, addr)
                probe.detach()
                if ok:
                    pick = item
                    break
        if pick is None:
            continue
        pool.remove(pick)
        sock = socket.socket(fileno=pick.fd)
        sock.set_inheritable(False)
        claimed[config.name] = Listener(config=config, sock=sock, origin="inherited")
        log.info("listener.inherited", listener=config.name, fd=pick.fd, fdname=pick.name)
    return claimed, pool
