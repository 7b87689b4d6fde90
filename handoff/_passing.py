"""SCM_RIGHTS Put/Get: hand a named set of fds, plus a small JSON payload, over a Unix socket.

The supervisor uses this to give a worker its fd set (``fd_delivery = "scm_rights"``) and to hand
everything to its successor during a self-upgrade; a worker uses it through ``listeners()``.

Design notes:
- The channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket, which keeps message boundaries, so one
  ``recvmsg`` returns exactly one message with exactly its fds: no framing, no partial reads.
- A message is one UTF-8 JSON object (``_FdChunk``: ``v``, ``op``, ``seq``, ``names``, ``more``,
  and ``payload`` on the first chunk only) with the chunk's fds attached as SCM_RIGHTS. The
  names are listed in the order of the fds, so a name/fd count mismatch is detectable per chunk.
- unix(7): the kernel accepts at most SCM_MAX_FD (253) fds in one message, so ``put`` splits the
  set into chunks of up to 253 and ``get`` reassembles them until ``more`` is false. A chunk whose
  JSON would not fit in ``MAX_MESSAGE_BYTES`` (very long names) is split further.
- Receiving uses ``MSG_CMSG_CLOEXEC`` so no fd leaks into a child exec'd between ``recvmsg`` and
  ``set_inheritable``. When anything is wrong (truncated ancillary data, a wrong version, a
  count mismatch, a hang-up mid-set) every fd received so far is closed before raising
  ``ProtocolError``: the caller never owns half a set, so there is nothing for it to leak.
- Speed: the kernel's per-fd work (fget, fd install) is the floor. On top of it we pay one
  ``json.dumps`` and one pydantic validation per chunk of 253, never per fd; fd numbers go
  through ``array`` as one bytes blob. bench/handoff_fds.py measures the overhead.
- The async functions are for trio programs (the supervisor); the ``*_blocking`` twins speak the
  same wire format for workers that are not.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Final, Literal, final

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from ._errors import ProtocolError
from ._notify import SCM_MAX_FD

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    import trio

#: Version of the wire format; a peer speaking another one is refused with ProtocolError.
PROTOCOL_VERSION: Final = 1

# One message's JSON must fit the receiver's buffer, and the kernel refuses a SEQPACKET message
# larger than the socket's send buffer (EMSGSIZE; net.core.wmem_default is 208 KiB). 128 KiB holds
# 253 names of the maximal 255 bytes (sd_listen_fds_with_names(3)) with room for the payload.
MAX_MESSAGE_BYTES: Final = 128 * 1024

# unix(7): SCM_RIGHTS carries C ints.
_FD_SIZE: Final = array.array("i").itemsize
# Room for one full chunk of fds. An SCM_CREDENTIALS message (if someone enabled SO_PASSCRED on
# the channel) gets its own space so that it cannot crowd the fds out and truncate them.
_ANCBUF_SIZE: Final = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE) + socket.CMSG_SPACE(12)
# Linux-only flags; elsewhere we fall back to set_inheritable after the fact.
_MSG_CMSG_CLOEXEC: Final[int] = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_NOSIGNAL: Final[int] = int(getattr(socket, "MSG_NOSIGNAL", 0))
# Plain ints: the socket module's MsgFlag members are enum.IntFlag, whose ``&`` runs Python code.
_NAME_OF: Final = itemgetter(0)
_FD_OF: Final = itemgetter(1)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)


class _FdChunk(BaseModel):
    """One message of the handoff channel (see the module notes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: int
    op: Literal["put"]
    seq: int = Field(ge=0)
    names: list[str]
    more: bool
    payload: dict[str, JsonValue] | None = None


@final
@dataclass(frozen=True)
class Received:
    """A complete fd set from ``get``: the caller owns every fd in ``fds`` and must close them.

    Attributes:
        fds: ``(name, fd)`` pairs in the order they were put.
        payload: the JSON object sent with the set (``{}`` when none was sent).
    """

    fds: list[tuple[str, int]]
    payload: dict[str, JsonValue]

    def close(self) -> None:
        """Close every fd of the set, for a receiver that decides not to keep them."""
        _close_all(fd for _, fd in self.fds)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:  # EBADF: already closed, which is what we want
            continue


def _channel(sock: socket.socket | trio.socket.SocketType) -> str:
    return f"handoff channel (fd {sock.fileno()})"


def _check_seqpacket(sock: socket.socket | trio.socket.SocketType) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ValueError(
            f"{_channel(sock)} is not an AF_UNIX SOCK_SEQPACKET socket; SCM_RIGHTS handoff needs "
            "message boundaries: create it with socket.socketpair(socket.AF_UNIX, "
            "socket.SOCK_SEQPACKET)"
        )


def _names_json(names: Sequence[str]) -> str:
    joined = "".join(names)
    # Printable names without '"' or '\\' (all sane names) need no JSON escaping and are joined
    # directly: several times faster than json.dumps on 253 strings. Anything else takes the slow,
    # always-correct path.
    if joined.isprintable() and '"' not in joined and "\\" not in joined:
        return '["' + '","'.join(names) + '"]' if names else "[]"
    return json.dumps(list(names), ensure_ascii=False)


def _messages(
    fds: Sequence[tuple[str, int]], payload: Mapping[str, object] | None
) -> Iterator[tuple[bytes, bytes]]:
    """Yield the set's messages, ``(json bytes, SCM_RIGHTS bytes)``, one chunk at a time.

    A generator, so that the first chunk is on its way while the next one is encoded; the
    splitting of pairs is done per chunk with C-level ``map``, which is the cheapest way CPython
    offers. A bad payload raises ``ValueError`` before the first message is yielded; a bad pair
    (not ``(str, int)``) is a type error that mypy catches, and at run time raises ``ValueError``
    at its chunk, after which the receiver sees a hang-up or a sequence error, never a wrong set.
    """
    try:
        payload_json = "" if payload is None else json.dumps(dict(payload), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"the handoff payload cannot be sent as JSON ({exc}); pass only dicts, lists, "
            "strings, numbers, booleans and None"
        ) from exc
    total = len(fds)
    seq = 0

    def encode(start: int, end: int) -> list[tuple[bytes, bytes]]:
        nonlocal seq
        chunk = fds[start:end]
        try:
            names = list(map(_NAME_OF, chunk))
            raw_fds = struct.pack(f"{len(chunk)}i", *map(_FD_OF, chunk))
            names_json = _names_json(names)
        except (TypeError, struct.error, IndexError) as exc:
            raise ValueError(
                f"a handoff set is a sequence of (name: str, fd: int) pairs ({exc})"
            ) from None
        more = "true" if end < total else "false"
        extra = f',"payload":{payload_json}' if seq == 0 and payload_json else ""
        data = (
            f'{{"v":{PROTOCOL_VERSION},"op":"put","seq":{seq},"more":{more},'
            f'"names":{names_json}{extra}}}'
        ).encode()
        if len(data) <= MAX_MESSAGE_BYTES:
            seq += 1
            return [(data, raw_fds)]
        if end - start > 1:
            # Long names: halve the chunk until its JSON fits one message.
            middle = (start + end) // 2
            return encode(start, middle) + encode(middle, end)
        raise ValueError(
            f"a handoff message would be {len(data)} bytes, over MAX_MESSAGE_BYTES "
            f"({MAX_MESSAGE_BYTES}); keep the payload small (pass bulk state another way) and "
            "fd names short"
        )

    for start in range(0, max(total, 1), SCM_MAX_FD):
        yield from encode(start, min(start + SCM_MAX_FD, total))


def _ancillary(raw_fds: bytes) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, raw_fds)] if raw_fds else []


def _sent_error(sock: socket.socket | trio.socket.SocketType, exc: OSError) -> ProtocolError:
    return ProtocolError(
        f"{_channel(sock)}: cannot send the fd set ({exc.strerror or exc}); the receiving process "
        "has probably exited or closed its end: check that it is alive and reads with handoff.get"
    )


async def put(
    sock: trio.socket.SocketType,
    fds: Sequence[tuple[str, int]],
    payload: Mapping[str, object] | None = None,
) -> None:
    """Send a named fd set and an optional JSON payload over a SEQPACKET channel.

    The fds stay open and owned by the caller: the receiver gets new fds for the same open file
    descriptions. Sets larger than 253 fds (SCM_MAX_FD, unix(7)) go in several messages.

    Example::

        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await handoff.put(a, [("http", http_sock.fileno())], {"listeners": 1, "generation": 5})
        received = await handoff.get(b)   # Received(fds=[("http", 7)], payload={...})

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_SEQPACKET`` trio socket.
        fds: ``(name, fd)`` pairs, in the order the receiver should see them.
        payload: a JSON-able mapping sent once with the set.

    Raises:
        ProtocolError: the peer has gone away.
        ValueError: the socket is not SEQPACKET, or the payload is not JSON-able or too large.
    """
    _check_seqpacket(sock)
    for data, raw_fds in _messages(fds, payload):
        try:
            await sock.sendmsg([data], _ancillary(raw_fds), _MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _sent_error(sock, exc) from exc


def put_blocking(
    sock: socket.socket,
    fds: Sequence[tuple[str, int]],
    payload: Mapping[str, object] | None = None,
) -> None:
    """``put`` for programs that do not run trio; same wire format, same errors.

    Example::

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff.put_blocking(a, [("stdin-copy", 0)], {"hello": "worker"})
    """
    _check_seqpacket(sock)
    for data, raw_fds in _messages(fds, payload):
        try:
            sock.sendmsg([data], _ancillary(raw_fds), _MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _sent_error(sock, exc) from exc


@final
class _Assembly:
    """The part of a set received so far; owns its fds until ``finish`` hands them over."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.fds: list[int] = []
        self.pairs: list[tuple[str, int]] = []
        self.payload: dict[str, JsonValue] = {}
        self.seq = 0
        self.buffer = bytearray(MAX_MESSAGE_BYTES)

    def close(self) -> None:
        _close_all(self.fds)
        self.fds = []

    def fail(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"{self.channel}: {what}; closed the {len(self.fds)} fd(s) received so far. The "
            "sender is not handoffd's Put of this version or died mid-set: run the same handoffd "
            "version on both ends"
        )

    def feed(self, nbytes: int, ancdata: list[tuple[int, int, bytes]], flags: int) -> bool:
        """Take one message; True when the set is complete. Raises ProtocolError."""
        chunk_fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                chunk_fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
        # Own the fds first, so that every error below closes them.
        self.fds.extend(chunk_fds)
        if not _MSG_CMSG_CLOEXEC:
            for fd in chunk_fds:
                os.set_inheritable(fd, False)
        if flags & _MSG_CTRUNC:
            raise self.fail(
                f"message {self.seq} had its fds truncated (MSG_CTRUNC): the kernel dropped fds "
                "that did not fit, most likely because this process reached RLIMIT_NOFILE "
                "(raise it with ulimit -n or LimitNOFILE=)"
            )
        if flags & _MSG_TRUNC:
            raise self.fail(
                f"message {self.seq} is larger than MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES})"
            )
        if nbytes == 0 and not chunk_fds:
            if self.seq == 0:
                raise self.fail("the peer closed the channel before sending an fd set")
            raise self.fail(
                f"the peer hung up after {len(self.fds)} fd(s) in {self.seq} message(s), "
                "before the end of the set"
            )
        chunk = self._decode(self.buffer[:nbytes])
        if len(chunk.names) != len(chunk_fds):
            raise self.fail(
                f"message {self.seq} names {len(chunk.names)} fd(s) but carries {len(chunk_fds)}"
            )
        if chunk.seq != self.seq:
            raise self.fail(
                f"expected message {self.seq} of the set, got message {chunk.seq} (two writers "
                "on one channel?)"
            )
        if chunk.seq == 0 and chunk.payload is not None:
            self.payload = chunk.payload
        # Pairing per chunk, not at the end: the work hides in the wait for the next message.
        self.pairs.extend(zip(chunk.names, chunk_fds, strict=True))
        self.seq += 1
        return not chunk.more

    def _decode(self, data: bytearray) -> _FdChunk:
        try:
            chunk = _FdChunk.model_validate_json(data)
        except ValidationError as exc:
            raise self.fail(self._explain(data, exc)) from exc
        if chunk.v != PROTOCOL_VERSION:
            raise self.fail(
                f"message {self.seq} speaks protocol version {chunk.v}, this end speaks "
                f"{PROTOCOL_VERSION}"
            )
        return chunk

    def _explain(self, data: bytearray, exc: ValidationError) -> str:
        try:
            obj: object = json.loads(data)
        except ValueError:
            return f"message {self.seq} is not a JSON object ({data[:60]!r})"
        if isinstance(obj, dict) and obj.get("v") != PROTOCOL_VERSION:
            return (
                f"message {self.seq} speaks protocol version {obj.get('v')!r}, this end speaks "
                f"{PROTOCOL_VERSION}"
            )
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:3]
        )
        return f"message {self.seq} is malformed ({problems})"

    def finish(self) -> Received:
        self.fds = []
        return Received(fds=self.pairs, payload=self.payload)


async def get(sock: trio.socket.SocketType) -> Received:
    """Receive one fd set sent by ``put``/``put_blocking``; the caller owns the fds.

    Waits without a deadline: wrap it in ``trio.fail_after``. On cancellation, as on any error,
    the fds received so far are closed.

    Example::

        with trio.fail_after(5):
            received = await handoff.get(channel)
        http = socket.socket(fileno=dict(received.fds)["http"])

    Raises:
        ProtocolError: truncated fds (MSG_CTRUNC), a name/fd count mismatch, another protocol
            version, malformed JSON, or a peer that hung up before the end of the set.
    """
    _check_seqpacket(sock)
    assembly = _Assembly(_channel(sock))
    try:
        while True:
            try:
                nbytes, ancdata, flags, _ = await sock.recvmsg_into(
                    [assembly.buffer], _ANCBUF_SIZE, _MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError:
                nbytes, ancdata, flags = 0, [], 0
            if assembly.feed(nbytes, ancdata, flags):
                return assembly.finish()
    except BaseException:
        assembly.close()
        raise


def get_blocking(sock: socket.socket, timeout: float | None = None) -> Received:
    """``get`` for programs that do not run trio; same wire format, same errors.

    ``timeout`` bounds the whole set, in seconds; None waits for ever. The socket's own flags are
    left alone (the deadline is kept with ``poll``), so a blocking socket stays blocking.

    Example::

        channel = socket.socket(fileno=int(os.environ["HANDOFF_FD"]))
        received = handoff.get_blocking(channel, timeout=10)

    Raises:
        ProtocolError: as ``get``, or when the set is not complete within ``timeout``.
    """
    _check_seqpacket(sock)
    assembly = _Assembly(_channel(sock))
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    try:
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    raise assembly.fail(
                        f"no complete fd set arrived within {timeout} s; the sender stalled "
                        "(raise the timeout if the set is huge)"
                    )
            try:
                nbytes, ancdata, flags, _ = sock.recvmsg_into(
                    [assembly.buffer], _ANCBUF_SIZE, _MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError:
                nbytes, ancdata, flags = 0, [], 0
            if assembly.feed(nbytes, ancdata, flags):
                return assembly.finish()
    except BaseException:
        assembly.close()
        raise
