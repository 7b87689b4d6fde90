"""SCM_RIGHTS Put/Get: hand a named set of fds, plus a small JSON payload, over a Unix socket.

The supervisor uses this to give a worker its fd set (``fd_delivery = "scm_rights"``) and to hand
everything to its successor during a self-upgrade; a worker uses it through ``listeners()``.

Design notes:
- Standard library only: this is the blocking Put/Get of the worker wing, and a worker must not
  load the daemon's dependencies (DESIGN.md "Layout"). The async ``put``/``get`` for trio
  programs are in ``_passing_trio``, on the same wire format and the same checks from here.
- The channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket, which keeps message boundaries, so one
  ``recvmsg`` returns exactly one message with exactly its fds: no framing, no partial reads.
- A message is one UTF-8 JSON object (``v``, ``op``, ``seq``, ``more``, ``names``, and
  ``payload`` on the first chunk only) with the chunk's fds attached as SCM_RIGHTS. The names
  are listed in the order of the fds, so a name/fd count mismatch is detectable per chunk.
  ``_decode_chunk`` checks a chunk in plain Python, as strictly as the daemon's pydantic models
  check theirs (``1.0`` is not an int, ``1`` is not a bool, no extra keys), and
  ``_chunk_problems`` words what is wrong as pydantic does (tests/unit/test_passing.py holds the
  equivalent pydantic model and cross-checks both against it).
- unix(7): the kernel accepts at most SCM_MAX_FD (253) fds in one message, so ``put`` splits the
  set into chunks of up to 253 and ``get`` reassembles them until ``more`` is false. A chunk whose
  JSON would not fit in ``MAX_MESSAGE_BYTES`` (very long names) is split further. A payload too
  large for one message (a self-upgrade's state with many parked fds) travels first, as a run of
  fd-less messages each carrying a ``payload_part`` (a piece of the payload's JSON text), which
  ``get`` joins and parses once the set is complete; a payload that fits keeps the one-message
  form, so peers of the same version that never send large payloads are unaffected.
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
  a quote count: it accepts only what ``_decode_chunk`` accepts, with the same result), and
  anything else (the payload chunk, escapes, another sender's spacing) goes through
  ``_decode_chunk`` (``json.loads``, then a few type tests).
"""

from __future__ import annotations

import array
import errno
import json
import os
import re
import select
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, TypeAlias, cast, final

from ._errors import ProtocolError
from ._sdnotify import SCM_MAX_FD

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

#: What ``json.loads`` returns; the payload of a set is a JSON object of these.
JsonValue: TypeAlias = dict[str, "JsonValue"] | list["JsonValue"] | str | int | float | bool | None

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
MSG_NOSIGNAL: Final[int] = int(getattr(socket, "MSG_NOSIGNAL", 0))
# Plain ints: the socket module's constants are enum members, whose ``&`` runs Python code.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)

# A chunk exactly as ``encode_messages`` writes it when it has no payload and its names need no JSON
# escape. Field order, spacing and the version are fixed; ``seq`` is a JSON integer (no leading
# zero). Anything else goes to ``_decode_chunk``, which then explains what is wrong.
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


class Channel(Protocol):
    """What the checks need of a channel: a stdlib socket or a trio one."""

    @property
    def family(self) -> int: ...

    @property
    def type(self) -> int: ...

    def fileno(self) -> int: ...


def channel_name(sock: Channel) -> str:
    return f"handoff channel (fd {sock.fileno()})"


def check_seqpacket(sock: Channel) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ValueError(
            f"{channel_name(sock)} is not an AF_UNIX SOCK_SEQPACKET socket; SCM_RIGHTS handoff "
            "needs message boundaries: create it with socket.socketpair(socket.AF_UNIX, "
            "socket.SOCK_SEQPACKET)"
        )


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


def encode_messages(
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
    parts: list[str] = []
    if len(payload_json) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"the handoff payload is {len(payload_json)} characters of JSON, over "
            f"MAX_PAYLOAD_BYTES ({MAX_PAYLOAD_BYTES}); keep the payload small"
        )
    if len(payload_json) > MAX_MESSAGE_BYTES // 2:
        parts = [
            payload_json[i : i + _PAYLOAD_PART_CHARS]
            for i in range(0, len(payload_json), _PAYLOAD_PART_CHARS)
        ]
        payload_json = ""
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

    for part in parts:
        data = (
            f'{{"v":{PROTOCOL_VERSION},"op":"put","seq":{seq},"more":true,"names":[],'
            f'"payload_part":{json.dumps(part)}}}'
        ).encode()
        seq += 1
        yield data, []
    for start in range(0, max(total, 1), SCM_MAX_FD):
        yield from encode(start, min(start + SCM_MAX_FD, total))


def sent_error(sock: Channel, exc: OSError) -> ProtocolError:
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
        f"{channel_name(sock)}: cannot send the fd set ({exc.strerror or exc}); {hint}"
    )


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
    check_seqpacket(sock)
    for data, ancillary in encode_messages(fds, payload):
        try:
            sock.sendmsg([data], ancillary, MSG_NOSIGNAL)
        except OSError as exc:  # EPIPE, ECONNRESET, ETOOMANYREFS, EBADF, EMSGSIZE...
            raise sent_error(sock, exc) from exc


def _parse_canonical(data: bytes) -> tuple[int, bool, list[str]] | None:
    """``(seq, more, names)`` of a chunk in our canonical form, or None for ``_decode_chunk``.

    Returns a result only for a message that ``_decode_chunk`` accepts with the
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
        # The '"' are checked below, after the split; '\\' and control bytes take the long way.
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
class _Chunk(NamedTuple):
    """One message of the handoff channel, checked (see the module notes)."""

    seq: int
    more: bool
    names: list[str]
    payload: dict[str, JsonValue] | None
    payload_part: str | None = None


# The fields of a chunk, in the order their problems are reported (the order pydantic reports
# them in for the equivalent model); all but ``payload`` are required.
_CHUNK_FIELDS: Final = ("v", "op", "seq", "names", "more", "payload", "payload_part")
# The largest piece of a payload's JSON in one message: room is left for the envelope and for
# the JSON escaping of the piece itself (at worst 6 bytes per character, \uXXXX).
_PAYLOAD_PART_CHARS: Final = (MAX_MESSAGE_BYTES - 1024) // 6
#: The largest payload a set may carry in parts (a self-upgrade's state is far below): a peer
#: cannot make the receiver buffer without end.
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024


def _chunk_problems(obj: dict[str, object]) -> list[str]:
    """What is wrong with a decoded chunk, as ``field: problem`` strings; empty when valid."""
    problems: list[str] = []
    for key in _CHUNK_FIELDS[:5]:
        if key not in obj:
            problems.append(f"{key}: Field required")
    v, op, seq, names, more = (obj.get(key) for key in _CHUNK_FIELDS[:5])
    # type() is: a JSON true is a Python int too, and 1.0 == 1.
    if "v" in obj and type(v) is not int:
        problems.append("v: Input should be a valid integer")
    if "op" in obj and op != "put":
        problems.append("op: Input should be 'put'")
    if "seq" in obj and type(seq) is not int:
        problems.append("seq: Input should be a valid integer")
    elif isinstance(seq, int) and seq < 0:
        problems.append("seq: Input should be greater than or equal to 0")
    if isinstance(names, list):
        problems += [
            f"names.{i}: Input should be a valid string"
            for i, name in enumerate(names)
            if not isinstance(name, str)
        ]
    elif "names" in obj:
        problems.append("names: Input should be a valid array")
    if "more" in obj and not isinstance(more, bool):
        problems.append("more: Input should be a valid boolean")
    payload = obj.get("payload")
    if payload is not None and not isinstance(payload, dict):
        problems.append("payload: Input should be an object")
    if "payload_part" in obj and not isinstance(obj["payload_part"], str):
        problems.append("payload_part: Input should be a valid string")
    problems += [
        f"{key}: Extra inputs are not permitted" for key in obj if key not in _CHUNK_FIELDS
    ]
    return problems


def _decode_chunk(data: bytes, expected_seq: int) -> _Chunk | str:
    """The chunk in ``data``, or what is wrong with it (a sentence for ``Assembly.fail``)."""
    try:
        obj: object = json.loads(data.decode())
        if b"\\u" in data:
            # json.loads takes a lone surrogate escape ("\\ud800"), which UTF-8 cannot carry.
            json.dumps(obj, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError are ValueErrors
        return f"message {expected_seq} is not a JSON object ({data[:60]!r})"
    if not isinstance(obj, dict):
        return f"message {expected_seq} is malformed (message: Input should be an object)"
    fields = cast("dict[str, object]", obj)
    version = fields.get("v")
    if version != PROTOCOL_VERSION:
        return (
            f"message {expected_seq} speaks protocol version {version!r}, this end speaks "
            f"{PROTOCOL_VERSION}"
        )
    seq, more, names, payload = (fields.get(key) for key in ("seq", "more", "names", "payload"))
    # The common case in a few C-speed tests (a missing field reads as None and fails its type;
    # join raises TypeError for a name that is not a str); _chunk_problems says what is wrong.
    if (
        type(version) is int
        and fields.get("op") == "put"
        and type(seq) is int
        and seq >= 0
        and type(more) is bool
        and type(names) is list
        and (payload is None or type(payload) is dict)
        and type(part := fields.get("payload_part", "")) is str
        and len(fields) == 5 + ("payload" in fields) + ("payload_part" in fields)
    ):
        try:
            "".join(names)
        except TypeError:
            pass
        else:
            return _Chunk(
                seq,
                more,
                names,
                cast("dict[str, JsonValue] | None", payload),
                part if "payload_part" in fields else None,
            )
    return f"message {expected_seq} is malformed ({'; '.join(_chunk_problems(fields)[:3])})"


@final
class Assembly:
    """The part of a set received so far; owns its fds until ``finish`` hands them over."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.fds = array.array("i")
        self.names: list[str] = []
        self.payload: dict[str, JsonValue] = {}
        self.payload_parts: list[str] = []
        self.payload_size = 0
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
            chunk = _decode_chunk(data, self.seq)
            if isinstance(chunk, str):
                raise self.fail(chunk)
            seq, more, names = chunk.seq, chunk.more, chunk.names
            if seq == 0 and chunk.payload is not None:
                self.payload = chunk.payload
            if chunk.payload_part is not None:
                self.payload_size += len(chunk.payload_part)
                if self.payload_size > MAX_PAYLOAD_BYTES:
                    raise self.fail(
                        f"the payload sent in parts exceeds MAX_PAYLOAD_BYTES ({MAX_PAYLOAD_BYTES})"
                    )
                self.payload_parts.append(chunk.payload_part)
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

    def finish(self) -> Received:
        if self.payload_parts:
            try:
                joined: object = json.loads("".join(self.payload_parts))
            except (ValueError, RecursionError):
                joined = None
            if not isinstance(joined, dict):
                raise self.fail(
                    f"the payload sent in {len(self.payload_parts)} parts is not a JSON object"
                )
            self.payload = cast("dict[str, JsonValue]", joined)
        received = Received(names=self.names, fd_numbers=self.fds.tolist(), payload=self.payload)
        self.fds = array.array("i")
        return received


def receive_one(sock: socket.socket, assembly: Assembly) -> bool:
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
    check_seqpacket(sock)
    assembly = Assembly(channel_name(sock))
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
            if receive_one(sock, assembly):
                return assembly.finish()
    except BaseException:
        assembly.close()
        raise
