"""The listening sockets: bind, inherit, match, unlink policy, and the set handed to workers.

Design notes:
- A listener is opened once (or inherited) and held for handoffd's whole life: every generation
  gets the same open file description, so the kernel's accept queue outlives any worker and a
  connection arriving during an upgrade waits in it instead of being refused.
- handoffd only *holds* these sockets. It never wraps them in trio sockets and never changes their
  flags: O_NONBLOCK lives on the open file description shared with every worker, so setting it
  here would change what a worker's blocking ``accept()`` does.
- An upgrade may change the listener list. A listener whose name and address are unchanged is
  kept (the same socket); a new one is bound; one that left the config is retired and closed
  only after every generation that used it has stopped.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

import structlog

from ._errors import ListenerError
from ._platform import SOCK_CLOEXEC

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._config import Address, ListenerConfig
    from ._systemd import InheritedFd

log: structlog.stdlib.BoundLogger = structlog.get_logger()

_KIND_TYPE = {
    "tcp": socket.SOCK_STREAM,
    "unix": socket.SOCK_STREAM,
    "udp": socket.SOCK_DGRAM,
    "unixgram": socket.SOCK_DGRAM,
}


@final
@dataclass(eq=False)
class Listener:
    """One held socket. Never close it while a generation may still use it."""

    config: ListenerConfig
    sock: socket.socket
    origin: str  # "bound", "inherited" or "handed-over"
    lock_fd: int | None = None
    users: int = field(default=0)

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

    def close(self) -> None:
        self.sock.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


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
    sock = socket.socket(_family_of(addr), _KIND_TYPE[addr.kind] | SOCK_CLOEXEC)
    lock_fd: int | None = None
    try:
        if addr.is_unix:
            lock_fd = _prepare_unix_path(config, addr, where)
            sock.bind(_unix_sockaddr(addr))
            if not addr.is_abstract:
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
    return Listener(config=config, sock=sock, origin="bound", lock_fd=lock_fd)


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
    if config.unlink == "always" or (config.unlink in ("socket-only", "flock") and is_sock):
        os.unlink(addr.path)
    elif config.unlink == "none":
        if lock_fd is not None:
            os.close(lock_fd)
        raise ListenerError(
            f'{where}: {addr.path} exists and unlink = "none"; remove it or set unlink = '
            '"socket-only"'
        )
    else:
        if lock_fd is not None:
            os.close(lock_fd)
        raise ListenerError(
            f"{where}: {addr.path} exists and is not a socket; refusing to remove it "
            '(unlink = "always" would)'
        )
    return lock_fd


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
    """Whether an inherited socket is of the kind and address a listener wants (sd_is_socket)."""
    try:
        if sock.type != _KIND_TYPE[addr.kind] or sock.family != _family_of(addr):
            return False
        name = sock.getsockname()
    except OSError:
        return False
    if addr.is_unix:
        want = _unix_sockaddr(addr)
        have = name if isinstance(name, bytes) else os.fsencode(name)
        return have == (want if isinstance(want, bytes) else os.fsencode(want))
    if addr.port == 0:
        return False
    try:
        want_ip = socket.inet_pton(sock.family, addr.host)
        have_ip = socket.inet_pton(sock.family, name[0])
    except OSError:
        return False
    return want_ip == have_ip and name[1] == addr.port


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
