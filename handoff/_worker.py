"""The library for worker programs: the sockets you were given, and telling the supervisor how you are.

Works the same under handoffd and under systemd (both use LISTEN_FDS and NOTIFY_SOCKET), and
falls back to doing nothing where neither is present, so a worker runs unchanged on a laptop.

Example (try it without handoffd: ``systemd-socket-activate -l 8080 --fdname=http python3 app.py``
and then ``curl localhost:8080``)::

    import handoff

    sock = handoff.listen("&http")          # the inherited socket named "http"...
    # sock = handoff.listen("0.0.0.0:8080") # ...or one matching this address, else a fresh bind
    handoff.ready()                         # the supervisor may now retire the old generation
    while True:
        conn, _ = sock.accept()
        conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello\\n")
        conn.close()

Design notes:
- What a process was given is read once (``listeners()``), cached, and the variables are removed
  from ``os.environ`` so that a child the worker spawns does not take the fds for its own.
- Two deliveries (DESIGN.md): ``LISTEN_FDS`` (fds 3.., names in ``LISTEN_FDNAMES``) and
  ``HANDOFF_FD`` (one end of a SEQPACKET socketpair carrying the set, see ``_passing``). In both,
  the listeners come first and the fds parked by the previous generation follow; how many are
  listeners is ``HANDOFF_LISTENERS`` (LISTEN_FDS) or the payload's ``"listeners"`` (HANDOFF_FD).
  Without that count, every fd is a listener, which is what systemd passes.
- Predicates (``is_tcp_listener`` and friends) follow sd_is_socket(3): they look at an fd without
  taking ownership, and never change its flags (O_NONBLOCK is shared by every holder of a
  listener, see DESIGN.md "Pitfalls").
- Imports: standard library only, and what only one path needs is imported on that path
  (``_passing`` for HANDOFF_FD, ``_launchd`` and its ctypes for launchd, ``ipaddress`` for
  address matching), so that a worker that only notifies pays a bare interpreter's cost plus
  little more (bench/worker_import.py; tests/unit/test_worker_wing.py checks what loads).
  Records are ``NamedTuple``s: ``dataclasses`` loads ``inspect``, which costs more than all the
  rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import sys
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, final

from ._address import parse_address
from ._errors import ListenerError, ListenPidMismatchError, ProtocolError
from ._fdname import FDNAME_RULE, valid_fdname
from ._listen_fds import parse_listen_fds
from ._platform import SOCK_CLOEXEC
from ._sdnotify import notify

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from ._address import Address
    from ._launchd import LaunchdLibrary

#: How long ``listeners()`` waits for the set on ``HANDOFF_FD``. The supervisor Puts the set
#: before it starts the worker, so it is normally there already; this only bounds a broken one.
HANDOFF_GET_TIMEOUT: Final = 30.0

# Variables read by listeners() and then removed, so that children do not inherit them.
_CONSUMED_VARS: Final = (
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "HANDOFF_FD",
    "HANDOFF_LISTENERS",
)
_BACKLOG: Final = socket.SOMAXCONN


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


@final
class _Inherited(NamedTuple):
    """What this process was given, split into listeners and parked fds (raw, owned here)."""

    listeners: list[tuple[str, int]]
    parked: list[tuple[str, int]]


_inherited: _Inherited | None = None
_listener_socks: dict[str, list[socket.socket]] | None = None
# Parked fds are handed out once: the ones no caller has taken yet, and the sockets parked()
# took (returned again on each call, since closing a socket object twice is harmless).
_parked_pool: dict[str, list[int]] | None = None
_parked_socks: dict[str, list[socket.socket]] | None = None


def _socket_for(fd: int) -> socket.socket:
    # socket(fileno=) sets O_NONBLOCK when socket.setdefaulttimeout() is in force; the flag lives
    # on the open file description every generation shares, so keep it as it was (DESIGN.md).
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=fd)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    sock.set_inheritable(False)
    return sock


def _listener_count(value: str | None, total: int, source: str) -> int:
    if value is None:
        return total
    try:
        count = int(value)
    except ValueError:
        count = -1
    if not 0 <= count <= total:
        raise ListenerError(
            f"{source}={value!r} but {total} fd(s) were passed: it must be a number from 0 to "
            f"{total}; this is a supervisor bug, report it with your handoffd version"
        )
    return count


def _load(environ: Mapping[str, str]) -> _Inherited:
    """Read the fds this process was given; pure apart from the one read of ``HANDOFF_FD``."""
    pid = os.getpid()
    if "HANDOFF_FD" in environ:
        try:
            channel_fd = int(environ["HANDOFF_FD"])
            channel = socket.socket(fileno=channel_fd)
        except (ValueError, OSError) as exc:
            raise ListenerError(
                f"HANDOFF_FD={environ['HANDOFF_FD']!r} is not an open socket of this process "
                f"({exc}); start this program from handoffd, or unset HANDOFF_FD"
            ) from exc
        from ._passing import get_blocking  # see "Imports" in the module notes

        # The channel has done its job once the set is here: close it, so that the supervisor
        # sees end-of-file (the set was taken) and no child inherits it.
        with channel:
            try:
                received = get_blocking(channel, timeout=HANDOFF_GET_TIMEOUT)
            except ProtocolError as exc:
                raise ListenerError(f"cannot receive the fd set on HANDOFF_FD: {exc}") from exc
        value = received.payload.get("listeners")
        count = _listener_count(
            None if value is None else str(value), len(received.fds), 'the payload\'s "listeners"'
        )
        pairs = received.fds
        return _Inherited(listeners=pairs[:count], parked=pairs[count:])
    if "LISTEN_FDS" in environ and "LISTEN_PID" in environ and environ["LISTEN_PID"] != str(pid):
        raise ListenPidMismatchError(
            f"LISTEN_PID={environ['LISTEN_PID']} but this process is {pid}: the fds were "
            "meant for another process; do not pass LISTEN_* on to children"
        )
    try:
        passed = parse_listen_fds(environ, pid) or []
    except ValueError as exc:
        raise ListenerError(f"{exc}; the service manager set LISTEN_FDS wrongly") from exc
    pairs = [(item.name, item.fd) for item in passed]
    for _, fd in pairs:
        os.set_inheritable(fd, False)
    count = _listener_count(environ.get("HANDOFF_LISTENERS"), len(pairs), "HANDOFF_LISTENERS")
    return _Inherited(listeners=pairs[:count], parked=pairs[count:])


def _inherited_now(environ: Mapping[str, str] | None) -> _Inherited:
    global _inherited
    if _inherited is None:
        _inherited = _load(os.environ if environ is None else environ)
        if environ is None:
            for key in _CONSUMED_VARS:
                os.environ.pop(key, None)
    return _inherited


def listeners(environ: Mapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The listening sockets this process was given, by name, parsed once and cached.

    Reads ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (handoffd's default delivery, and
    systemd's socket activation) or receives the set on ``HANDOFF_FD`` (handoffd's
    ``fd_delivery = "scm_rights"``), then removes those variables from ``os.environ`` so that
    children do not take them for their own. Returns ``{}`` when nothing was passed. Fds the
    previous generation parked are not listeners: see ``parked()``.

    Example (``systemd-socket-activate -l 8080 --fdname=http python3 app.py``)::

        http = handoff.listeners()["http"][0]

    Args:
        environ: read this instead of ``os.environ`` (which is then left alone); for tests.

    Raises:
        ListenPidMismatchError: ``LISTEN_PID`` names another process.
        ListenerError: the variables are malformed, or the set on ``HANDOFF_FD`` did not arrive.
    """
    global _listener_socks
    if _listener_socks is None:
        result: dict[str, list[socket.socket]] = {}
        for name, fd in _inherited_now(environ).listeners:
            result.setdefault(name, []).append(_socket_for(fd))
        _listener_socks = result
    return _listener_socks


def get_listeners(environ: Mapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """``listeners()`` under the name of the counterpart of ``get()``: the same cached dict.

    The Put/Get design (``fd_delivery = "scm_rights"``) names the worker's side of the handoff
    ``handoff.get_listeners()``: the supervisor ``put``s the set, the worker gets its listeners.
    Both names stay; ``listeners()`` is the one the examples use.
    """
    return listeners(environ)


def one_listener(name: str, *, launchd: LaunchdLibrary | None = None) -> socket.socket:
    """The one inherited listener called ``name``.

    Without LISTEN_FDS or HANDOFF_FD, on macOS, launchd is asked for the plist's ``Sockets``
    entry of that name (launch_activate_socket(3)); ``launchd`` injects the library (tests).

    Example::

        http = handoff.one_listener("http")

    Raises:
        ListenerError: there is no listener of that name, or there are several.
    """
    given = listeners()
    socks = given.get(name, [])
    if not socks:
        from ._launchd import launchd_sockets  # see "Imports" in the module notes

        found = launchd_sockets([name], library=launchd)
        if found:
            # launchd hands a name out once per process: keep them with the others.
            socks = given.setdefault(name, [])
            socks.extend(_socket_for(fd) for _, fd in found)
    if len(socks) == 1:
        return socks[0]
    if not socks:
        known = ", ".join(sorted(given)) or "none"
        raise ListenerError(
            f"no inherited listener is named {name!r} (this process has: {known}); name it in "
            f"the handoffd config or pass --fdname={name} to systemd-socket-activate"
        )
    raise ListenerError(
        f"{len(socks)} inherited listeners are named {name!r}; use handoff.listeners()[{name!r}] "
        "to take them all"
    )


def _find_inherited(address: Address) -> socket.socket | None:
    """An inherited listener whose type and address match ``address``, if there is one."""
    for socks in listeners().values():
        for sock in socks:
            if address.kind == "tcp" and is_tcp_listener(sock, str(address)):
                return sock
            if address.kind == "unix" and is_unix_listener(sock, address.path):
                return sock
            if address.kind == "udp" and is_udp(sock, str(address)):
                return sock
            if address.kind == "unixgram" and _is_unixgram(sock, address.path):
                return sock
    return None


def _bind(address: Address) -> socket.socket:
    if address.is_unix:
        kind = socket.SOCK_STREAM if address.kind == "unix" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_UNIX, kind | SOCK_CLOEXEC)
        target: str | bytes | tuple[str, int] = (
            b"\0" + os.fsencode(address.path[1:]) if address.is_abstract else address.path
        )
    else:
        kind = socket.SOCK_STREAM if address.kind == "tcp" else socket.SOCK_DGRAM
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, kind | SOCK_CLOEXEC)
        target = (address.host, address.port)
    try:
        if address.kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        if kind == socket.SOCK_STREAM:
            sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenerError(
            f"cannot bind {address} ({exc.strerror or exc}); another process holds it, or run "
            "this worker under handoffd and use listen('&name') to take the supervisor's socket"
        ) from exc
    return sock


def _listen(address_text: str, packet: bool) -> socket.socket:
    wanted = "packet socket (udp://, unixgram:)" if packet else "stream socket (host:port, unix:)"
    if address_text.startswith("&"):
        sock = one_listener(address_text[1:])
        if (sock.type == socket.SOCK_DGRAM) != packet:
            raise ListenerError(
                f"the inherited socket {address_text[1:]!r} is not a {wanted}; use "
                f"{'listen' if packet else 'listen_packet'}({address_text!r})"
            )
        return sock
    try:
        address = parse_address(address_text)
    except ValueError as exc:
        raise ListenerError(f"listen address {address_text!r}: {exc}, or &name") from exc
    if (address.kind in ("udp", "unixgram")) != packet:
        raise ListenerError(
            f"{address_text!r} is not a {wanted} address; use "
            f"{'listen' if packet else 'listen_packet'}({address_text!r})"
        )
    inherited = None if address.port == 0 and not address.is_unix else _find_inherited(address)
    return inherited if inherited is not None else _bind(address)


def listen(address: str) -> socket.socket:
    """A listening stream socket: inherited if possible, freshly bound otherwise.

    ``"&name"`` is the inherited listener of that name (an error if there is none). Anything else
    is an address in the config's syntax (``host:port``, ``[v6]:port``, ``unix:/path``,
    ``unix:@abstract``): an inherited listener bound to that address is returned if there is one,
    so the same code works under handoffd and on a laptop; otherwise a new socket is bound.

    Example::

        sock = handoff.listen("&http")            # under handoffd or systemd
        sock = handoff.listen("127.0.0.1:8080")   # anywhere

    Raises:
        ListenerError: no such inherited socket, a bad address, or the bind failed.
    """
    return _listen(address, packet=False)


def listen_packet(address: str) -> socket.socket:
    """``listen`` for datagram sockets: ``"&name"``, ``udp://host:port`` or ``unixgram:/path``.

    Example::

        dns = handoff.listen_packet("udp://0.0.0.0:5353")
    """
    return _listen(address, packet=True)


# ---- predicates, like sd_is_socket(3) ----------------------------------------------------------


def _fd_of(fd: int | _HasFileno) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


@contextlib.contextmanager
def _borrowed(fd: int | _HasFileno) -> Iterator[socket.socket | None]:
    """A socket object over ``fd`` that does not own it; None when ``fd`` is not a socket."""
    number = _fd_of(fd)
    try:
        if not stat.S_ISSOCK(os.fstat(number).st_mode):
            yield None
            return
    except OSError:
        yield None
        return
    # socket(fileno=) sets O_NONBLOCK when socket.setdefaulttimeout() is in force; that flag is
    # shared by every holder of the listener, so put the flags back as they were.
    flags = fcntl.fcntl(number, fcntl.F_GETFL)
    sock = socket.socket(fileno=number)
    try:
        yield sock
    finally:
        sock.detach()
        if fcntl.fcntl(number, fcntl.F_GETFL) != flags:
            fcntl.fcntl(number, fcntl.F_SETFL, flags)


def is_socket(
    fd: int | _HasFileno,
    family: int | None = None,
    sock_type: int | None = None,
    listening: bool | None = None,
) -> bool:
    """Whether ``fd`` is a socket, optionally of this family, type and listening state.

    Example::

        handoff.is_socket(3, socket.AF_INET6, socket.SOCK_STREAM, listening=True)
    """
    with _borrowed(fd) as sock:
        if sock is None:
            return False
        if family is not None and sock.family != family:
            return False
        if sock_type is not None and sock.type != sock_type:
            return False
        return listening is None or _accepting(sock) == listening


def _accepting(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def is_listening(fd: int | _HasFileno) -> bool:
    """Whether ``fd`` is a socket in the listening state (``listen()`` was called on it)."""
    with _borrowed(fd) as sock:
        return sock is not None and _accepting(sock)


def has_reuseport(fd: int | _HasFileno) -> bool:
    """Whether ``fd`` is a socket with SO_REUSEPORT set.

    handoffd shares one socket between generations and never needs it; a listener with it set
    belongs to a reuseport group whose members each drop their queue on close (DESIGN.md).
    """
    with _borrowed(fd) as sock:
        return sock is not None and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _inet_matches(sock: socket.socket, addr: str | None, kind: str) -> bool:
    if addr is None:
        return True
    from ._match import inet_matches  # ipaddress: see "Imports" in the module notes

    try:
        want = parse_address(addr if kind == "tcp" else f"udp://{addr.removeprefix('udp://')}")
    except ValueError:
        return False
    return inet_matches(sock, want.host, want.port)


def is_tcp_listener(fd: int | _HasFileno, addr: str | None = None) -> bool:
    """Whether ``fd`` is a listening TCP socket, bound to ``addr`` (``host:port``) if given.

    A wildcard ``addr`` (``:8080``, ``0.0.0.0:8080``, ``[::]:8080``) matches a socket bound to
    either wildcard, since ``systemd-socket-activate -l 8080`` binds ``[::]:8080``.

    Example::

        http = next(s for s in handoff.listeners()["web"] if handoff.is_tcp_listener(s, ":8080"))
    """
    with _borrowed(fd) as sock:
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if sock.type != socket.SOCK_STREAM or not _accepting(sock):
            return False
        return _inet_matches(sock, addr, "tcp")


def is_udp(fd: int | _HasFileno, addr: str | None = None) -> bool:
    """Whether ``fd`` is a UDP socket, bound to ``addr`` (``host:port``) if given."""
    with _borrowed(fd) as sock:
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        return sock.type == socket.SOCK_DGRAM and _inet_matches(sock, addr, "udp")


def _unix_path_matches(sock: socket.socket, path: str | None) -> bool:
    from ._match import unix_matches

    return path is None or unix_matches(sock, path)


def is_unix_listener(fd: int | _HasFileno, path: str | None = None) -> bool:
    """Whether ``fd`` is a listening Unix stream socket, bound to ``path`` if given.

    ``path`` is a filesystem path or ``@name`` for the abstract namespace.
    """
    with _borrowed(fd) as sock:
        if sock is None or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            return False
        return _accepting(sock) and _unix_path_matches(sock, path)


def _is_unixgram(fd: int | _HasFileno, path: str | None) -> bool:
    with _borrowed(fd) as sock:
        if sock is None or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
            return False
        return _unix_path_matches(sock, path)


def is_fifo(fd: int | _HasFileno, path: str | None = None) -> bool:
    """Whether ``fd`` is a FIFO (named pipe or pipe), and the FIFO at ``path`` if given."""
    try:
        st = os.fstat(_fd_of(fd))
        if not stat.S_ISFIFO(st.st_mode):
            return False
        if path is None:
            return True
        other = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


# ---- notify: readiness, status and parked fds ---------------------------------------------------


def _notify(message: str, fds: list[int] | tuple[()] = ()) -> bool:
    """sd_notify(3) semantics for workers: never raise, never block for long.

    A worker must keep serving when its supervisor is gone or slow: a notify socket nobody reads
    (ECONNREFUSED) or whose queue stays full (net.unix.max_dgram_qlen is 10 by default) for
    ``_NOTIFY_TIMEOUT_S`` makes this return False, logged once to stderr, instead of raising or
    stalling the worker for good. The short wait keeps READY=1 from being dropped while the
    supervisor is briefly busy (a self-upgrade pauses its reading).
    """
    global _notify_warned
    try:
        return notify(message, fds, timeout=_NOTIFY_TIMEOUT_S)
    except OSError as exc:
        if not _notify_warned:
            _notify_warned = True
            print(
                f"handoff: cannot notify {os.environ.get('NOTIFY_SOCKET')!r} ({exc.strerror}); "
                "the supervisor may be gone or busy: carrying on",
                file=sys.stderr,
            )
        return False


_notify_warned = False
# How long a notify may wait for room in the supervisor's queue before it is given up.
_NOTIFY_TIMEOUT_S: Final = 5.0


def ready(status: str | None = None) -> bool:
    """Tell the supervisor this worker serves: ``READY=1``. False where nobody listens.

    Install your signal handlers before calling this (DESIGN.md "Pitfalls").
    """
    return _notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """Set this worker's one-line status (``STATUS=``), shown by ``handoffd status``."""
    return _notify(f"STATUS={text}")


def stopping() -> bool:
    """Say this worker is shutting down (``STOPPING=1``)."""
    return _notify("STOPPING=1")


def reloading() -> bool:
    """Say this worker is reloading its own state (``RELOADING=1``)."""
    return _notify("RELOADING=1")


def watchdog() -> bool:
    """Keep-alive ping (``WATCHDOG=1``)."""
    return _notify("WATCHDOG=1")


def _check_fdname(name: str) -> None:
    reason = valid_fdname(name)
    if reason is not None:
        raise ValueError(
            f"fd name {name!r} is not valid: {reason}; use {FDNAME_RULE} (sd_pid_notify_with_fds(3))"
        )


def park(name: str, fd: int | _HasFileno, *more: int | _HasFileno) -> bool:
    """Store ``fd`` (and ``more``) with the supervisor under ``name``, for the next generation.

    Use it for what must outlive this process: a long-lived client connection, a connected UDP
    socket. The supervisor (or systemd, with ``FileDescriptorStoreMax=``) keeps a copy; the next
    generation gets it from ``parked()``. This process keeps its own fd, to close when done.
    Several fds parked in one call travel in one datagram (``FDSTORE=1``, sd_notify(3)), so the
    supervisor stores them together, in this order: a connection and a file holding its state.
    Returns False, sending nothing, without ``NOTIFY_SOCKET``.

    Example::

        conn, _ = sock.accept()
        handoff.park("client-42", conn)    # the next generation carries on with this client

    Raises:
        ValueError: ``name`` is not a valid fd name.
    """
    _check_fdname(name)
    return _notify(f"FDSTORE=1\nFDNAME={name}", [_fd_of(f) for f in (fd, *more)])


def unpark(name: str) -> bool:
    """Drop the fds stored under ``name`` (``FDSTOREREMOVE=1``), e.g. when the client left.

    Returns False, sending nothing, without ``NOTIFY_SOCKET``.
    """
    _check_fdname(name)
    return _notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def parked_fds(environ: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """The raw fds the previous generation parked, by name; the caller owns them and closes them.

    Use this instead of ``parked()`` for fds that are not sockets (pipes, memfds). Each parked fd
    is handed out once, as a socket by ``parked()`` or as a number here: this returns the names
    ``parked()`` did not take, once. A later call returns ``{}``, since two owners of one fd
    number would both close it (the second close may hit an unrelated file that reused the
    number).

    Example::

        for name, fds in handoff.parked_fds().items():
            state = os.read(fds[0], 4096)   # a memfd of state parked with the connection
    """
    global _parked_pool
    pool = _parked_untaken(environ)
    _parked_pool = {}
    return pool


def parked(environ: Mapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The sockets the previous generation parked with ``park()``, by name.

    Example::

        for name, (conn,) in handoff.parked().items():
            serve(conn)                     # same TCP connection, the client noticed nothing
            handoff.unpark(name)            # when this client is done

    Only sockets are returned: a name parked with other kinds of fds too (a memfd of state, a
    pipe) is left to ``parked_fds()``, so that a program that does not know those never breaks.
    The first call takes those sockets; every call returns the same socket objects (closing one
    twice is harmless), and ``parked_fds()`` no longer hands out their fds. After
    ``parked_fds()``, this returns ``{}``.
    """
    global _parked_socks, _parked_pool
    if _parked_socks is None:
        pool = _parked_untaken(environ)
        taken = {
            name
            for name, fds in pool.items()
            if all(stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in fds)
        }
        _parked_socks = {name: [_socket_for(fd) for fd in pool[name]] for name in taken}
        _parked_pool = {name: fds for name, fds in pool.items() if name not in taken}
    return _parked_socks


def _parked_untaken(environ: Mapping[str, str] | None) -> dict[str, list[int]]:
    """The parked fds neither ``parked()`` nor ``parked_fds()`` has handed out yet."""
    global _parked_pool
    if _parked_pool is None:
        pool: dict[str, list[int]] = {}
        for name, fd in _inherited_now(environ).parked:
            pool.setdefault(name, []).append(fd)
        _parked_pool = pool
    return _parked_pool
