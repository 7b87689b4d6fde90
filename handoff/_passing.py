"""SCM_RIGHTS Put/Get: hand a named set of fds, plus a small JSON payload, over a Unix socket.

The supervisor uses this to give a worker its fd set (``fd_delivery = "scm_rights"``) and to hand
everything to its successor during a self-upgrade; a worker uses it through ``listeners()``.

Design notes:
- The channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket, which keeps message boundaries, so one
  ``recvmsg`` returns exactly one message with exactly its fds: no framing, no partial reads.
- A message is one UTF-8 JSON object (``_FdChunk``: ``v``, ``op``, ``seq``, ``more``, ``names``,
  and ``payload`` on the first chunk only) with the chunk's fds attached as SCM_RIGHTS. The
  names are listed in the order of the fds, so a name/fd count mismatch is detectable per chunk.
- unix(7): the kernel accepts at most SCM_MAX_FD (253) fds in one message, so ``put`` splits the
  set into chunks of up to 253 and ``get`` reassembles them until ``more`` is false. A chunk whose
  JSON would not fit in ``MAX_MESSAGE_BYTES`` (very long names) is split further.
- Receiving uses ``MSG_CMSG_CLOEXEC`` so no fd leaks into a child exec'd between ``recvmsg`` and
  ``set_inheritable``. When anything is wrong (truncated ancillary data, a wrong version, a
  count mismatch, a hang-up mid-set) every fd received so far is closed before raising
  ``ProtocolError``: the caller never owns half a set, so there is nothing for it to leak.
- Speed (bench/handoff_fds.py compares us with a bare ``send_fds``/``recv_fds`` loop): the
  kernel's per-fd work (fget, fd install) is the floor, and nothing of ours runs per fd in Python.
  Names and fds travel as two parallel sequences (``Received.names``/``Received.fd_numbers``);
  ``put`` splits the pairs once with ``zip`` and packs the fds once into an ``array``, whose
  slices become the SCM_RIGHTS data; ``get`` accumulates fds in an ``array``. A chunk in the
  exact form our ``put`` writes is checked by ``_parse_canonical`` (one regex, one ``split``,
  a quote count: it accepts only what the pydantic model accepts, with the same result), and
  anything else (the payload chunk, escapes, another sender's spacing) goes through pydantic.
  The trio functions try each syscall first and wait for the socket only on EAGAIN, with one
  checkpoint per call rather than two scheduler round trips per chunk.
- The async functions are for trio programs (the supervisor); the ``*_blocking`` twins speak the
  same wire format for workers that are not.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import re
import select
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, final

import trio
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from ._errors import ProtocolError
from ._notify import SCM_MAX_FD

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

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
# Plain ints: the socket module's constants are enum members, whose ``&`` runs Python code.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)

# A chunk exactly as ``_messages`` writes it when it has no payload and its names need no JSON
# escape. Field order, spacing and the version are fixed; ``seq`` is a JSON integer (no leading
# zero). Anything else goes to pydantic, which then explains what is wrong.
_CANONICAL_CHUNK: Final = re.compile(
    rb'\{"v":' + str(PROTOCOL_VERSION).encode() + rb',"op":"put","seq":(0|[1-9][0-9]{0,17}),'
    rb'"more":(true|false),"names":\[(.*)\]\}',
    re.DOTALL,
)
# Bytes that JSON forbids raw in a string (U+0000..U+001F), or that a JSON string escapes ('"',
# '\\'). UTF-8 never uses bytes below 0x80 inside a multi-byte character, so looking for them in
# the encoded text is exact. ``bytes.translate`` deletes them in one C pass (a regex search is
# five times slower).
_JSON_SPECIAL: Final = bytes(range(0x20)) + b'"\\'
_JSON_SPECIAL_BUT_QUOTE: Final = bytes(range(0x20)) + b"\\"


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
    """A complete fd set from ``get``: the caller owns every fd in it and must close them.

    Names and fds are kept as two parallel lists, which is how they travel; ``fds`` pairs them.

    Attributes:
        names: the fds' names, in the order they were put.
        fd_numbers: the fds, in the same order as ``names``.
        payload: the JSON object sent with the set (``{}`` when none was sent).
    """

    names: list[str]
    fd_numbers: list[int]
    payload: dict[str, JsonValue]

    @property
    def fds(self) -> list[tuple[str, int]]:
        """``(name, fd)`` pairs in the order they were put (a new list on each access).

        Example::

            http = socket.socket(fileno=dict(received.fds)["http"])
        """
        return list(zip(self.names, self.fd_numbers, strict=True))

    def close(self) -> None:
        """Close every fd of the set, for a receiver that decides not to keep them."""
        _close_all(self.fd_numbers)


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


@contextlib.contextmanager
def _nonblocking_view(sock: trio.socket.SocketType) -> Iterator[socket.socket]:
    """A stdlib socket over a trio socket's fd, for syscalls without trio's per-call checkpoints.

    It never owns the fd (``detach``), and is non-blocking, as trio sockets always are (so this
    changes no flag), whatever ``socket.setdefaulttimeout`` says.
    """
    view = socket.socket(fileno=sock.fileno())
    try:
        view.setblocking(False)
        yield view
    finally:
        view.detach()


def _split_pairs(fds: Sequence[tuple[str, int]]) -> tuple[tuple[str, ...], memoryview, bytes]:
    """The names, the fds packed as C ints, and all the names concatenated in UTF-8."""
    if not fds:
        return (), memoryview(b""), b""
    try:
        names, numbers = zip(*fds, strict=True)
        packed = array.array("i", numbers)
        # A TypeError names the first name that is not a str; a UnicodeEncodeError a lone
        # surrogate, which UTF-8 JSON cannot carry.
        joined = "".join(names).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"a handoff set is a sequence of (name: str, fd: int) pairs with names in valid "
            f"Unicode ({exc}); nothing was sent"
        ) from None
    return names, memoryview(packed).cast("B"), joined


def _messages(
    fds: Sequence[tuple[str, int]], payload: Mapping[str, object] | None
) -> Iterator[tuple[bytes, list[tuple[int, int, memoryview]]]]:
    """Yield the set's messages, ``(json bytes, ancillary data)``, one chunk at a time.

    Everything that can be wrong with the arguments (a bad payload, a pair that is not
    ``(str, int)``) raises ``ValueError`` before the first message is yielded. A generator, so
    that the first chunk is on its way while the next one is encoded.
    """
    try:
        payload_json = "" if payload is None else json.dumps(dict(payload), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"the handoff payload cannot be sent as JSON ({exc}); pass only dicts, lists, "
            "strings, numbers, booleans and None"
        ) from exc
    names, packed, joined = _split_pairs(fds)
    # Names that need no JSON escape (all sane names) are joined directly, several times faster
    # than json.dumps; anything else takes the always-correct way.
    plain = len(joined.translate(None, _JSON_SPECIAL)) == len(joined)
    total = len(names)
    seq = 0

    def encode(start: int, end: int) -> list[tuple[bytes, list[tuple[int, int, memoryview]]]]:
        nonlocal seq
        chunk = names[start:end]
        if not chunk:
            names_json = "[]"
        elif plain:
            names_json = '["' + '","'.join(chunk) + '"]'
        else:
            names_json = json.dumps(chunk, ensure_ascii=False)
        more = "true" if end < total else "false"
        extra = f',"payload":{payload_json}' if seq == 0 and payload_json else ""
        data = (
            f'{{"v":{PROTOCOL_VERSION},"op":"put","seq":{seq},"more":{more},'
            f'"names":{names_json}{extra}}}'
        ).encode()
        if len(data) <= MAX_MESSAGE_BYTES:
            seq += 1
            raw = packed[start * _FD_SIZE : end * _FD_SIZE]
            return [(data, [(_SOL_SOCKET, _SCM_RIGHTS, raw)] if raw else [])]
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


def _sent_error(sock: socket.socket | trio.socket.SocketType, exc: OSError) -> ProtocolError:
    if exc.errno == errno.ETOOMANYREFS:
        hint = (
            "more fds are in flight than this user's RLIMIT_NOFILE allows (unix(7)); raise it "
            "(LimitNOFILE= under systemd) or park fewer fds"
        )
    elif exc.errno in (errno.EPIPE, errno.ECONNRESET):
        hint = (
            "the receiving process has probably exited or closed its end: check that it is "
            "alive and reads with handoff.get"
        )
    else:
        hint = "an fd of the set may have been closed meanwhile, or the message is too large"
    return ProtocolError(
        f"{_channel(sock)}: cannot send the fd set ({exc.strerror or exc}); {hint}"
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
        received = await handoff.get(b)   # received.fds == [("http", 7)], received.payload

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_SEQPACKET`` trio socket.
        fds: ``(name, fd)`` pairs, in the order the receiver should see them.
        payload: a JSON-able mapping sent once with the set.

    Raises:
        ProtocolError: the peer has gone away.
        ValueError: the socket is not SEQPACKET, a pair is not ``(str, int)``, or the payload is
            not JSON-able or too large; nothing has been sent then.
    """
    _check_seqpacket(sock)
    messages = _messages(fds, payload)
    await trio.lowlevel.checkpoint_if_cancelled()
    with _nonblocking_view(sock) as view:
        for data, ancillary in messages:
            while True:
                try:
                    view.sendmsg([data], ancillary, _MSG_NOSIGNAL)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(view)
                except OSError as exc:  # EPIPE, ECONNRESET, ETOOMANYREFS, EBADF, EMSGSIZE...
                    raise _sent_error(sock, exc) from exc
    await trio.lowlevel.cancel_shielded_checkpoint()


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
    for data, ancillary in _messages(fds, payload):
        try:
            sock.sendmsg([data], ancillary, _MSG_NOSIGNAL)
        except OSError as exc:  # EPIPE, ECONNRESET, ETOOMANYREFS, EBADF, EMSGSIZE...
            raise _sent_error(sock, exc) from exc


def _parse_canonical(data: bytes) -> tuple[int, bool, list[str]] | None:
    """``(seq, more, names)`` of a chunk in our canonical form, or None to use pydantic.

    Returns a result only for a message that ``_FdChunk.model_validate_json`` accepts with the
    same ``seq``, ``more`` and ``names`` and no payload: the regex fixes every field but the
    names; with no escape and no control byte, the only '"' in the names part are those of the
    '","' separators (the quote count proves it), so splitting on them gives the JSON strings.
    """
    match = _CANONICAL_CHUNK.fullmatch(data)
    if match is None:
        return None
    seq_text, more_text, body = match.groups()
    if not body:
        names: list[str] = []
    else:
        if body[:1] != b'"' or body[-1:] != b'"' or len(body) < 2:
            return None
        # The '"' are checked below, after the split; '\\' and control bytes go to pydantic.
        if len(body.translate(None, _JSON_SPECIAL_BUT_QUOTE)) != len(body):
            return None
        try:
            inner = body[1:-1].decode()
        except UnicodeDecodeError:
            return None
        names = inner.split('","')
        if inner.count('"') != 2 * (len(names) - 1):
            return None
    return int(seq_text), more_text == b"true", names


@final
class _Assembly:
    """The part of a set received so far; owns its fds until ``finish`` hands them over."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.fds = array.array("i")
        self.names: list[str] = []
        self.payload: dict[str, JsonValue] = {}
        self.seq = 0
        self.buffer = bytearray(MAX_MESSAGE_BYTES)
        self.view = memoryview(self.buffer)

    def close(self) -> None:
        _close_all(self.fds)
        self.fds = array.array("i")

    def fail(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"{self.channel}: {what}; closed the {len(self.fds)} fd(s) received so far. The "
            "sender is not handoffd's Put of this version or died mid-set: run the same handoffd "
            "version on both ends"
        )

    def feed(self, nbytes: int, ancdata: list[tuple[int, int, bytes]], flags: int) -> bool:
        """Take one message; True when the set is complete. Raises ProtocolError."""
        fds = self.fds
        before = len(fds)
        for level, kind, data in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                # Own the fds first, so that every error below closes them.
                fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
        count = len(fds) - before
        if not _MSG_CMSG_CLOEXEC:
            for fd in fds[before:]:
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
        if nbytes == 0 and not count:
            if self.seq == 0:
                raise self.fail("the peer closed the channel before sending an fd set")
            raise self.fail(
                f"the peer hung up after {len(fds)} fd(s) in {self.seq} message(s), "
                "before the end of the set"
            )
        data = bytes(self.view[:nbytes])
        canonical = _parse_canonical(data)
        if canonical is not None:
            seq, more, names = canonical
        else:
            chunk = self._decode(data)
            seq, more, names = chunk.seq, chunk.more, chunk.names
            if seq == 0 and chunk.payload is not None:
                self.payload = chunk.payload
        if len(names) != count:
            raise self.fail(f"message {self.seq} names {len(names)} fd(s) but carries {count}")
        if seq != self.seq:
            raise self.fail(
                f"expected message {self.seq} of the set, got message {seq} (two writers "
                "on one channel?)"
            )
        self.names += names
        self.seq += 1
        return not more

    def _decode(self, data: bytes) -> _FdChunk:
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

    def _explain(self, data: bytes, exc: ValidationError) -> str:
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
        received = Received(names=self.names, fd_numbers=self.fds.tolist(), payload=self.payload)
        self.fds = array.array("i")
        return received


def _receive_one(sock: socket.socket, assembly: _Assembly) -> bool:
    """Read one message into ``assembly``; True when the set is complete.

    Raises:
        BlockingIOError: nothing to read yet, on a non-blocking socket.
        ProtocolError: see ``get``.
    """
    try:
        nbytes, ancdata, flags, _ = sock.recvmsg_into(
            [assembly.buffer], _ANCBUF_SIZE, _MSG_CMSG_CLOEXEC
        )
    except ConnectionResetError:
        nbytes, ancdata, flags = 0, [], 0
    return assembly.feed(nbytes, ancdata, flags)


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
        await trio.lowlevel.checkpoint_if_cancelled()
        with _nonblocking_view(sock) as view:
            while True:
                try:
                    if _receive_one(view, assembly):
                        break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(view)
        await trio.lowlevel.cancel_shielded_checkpoint()
    except BaseException:
        assembly.close()
        raise
    return assembly.finish()


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
            if _receive_one(sock, assembly):
                return assembly.finish()
    except BaseException:
        assembly.close()
        raise
