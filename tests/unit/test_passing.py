"""Put/Get over a real SEQPACKET socketpair in one process: wire format, chunking, failures."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import socket
import threading
from typing import TYPE_CHECKING, Literal

import pytest
import trio
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from handoff import ProtocolError, Received, get, get_blocking, put, put_blocking
from handoff._passing import MAX_MESSAGE_BYTES, PROTOCOL_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterator


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


@pytest.fixture
def pipes() -> Iterator[list[tuple[str, int]]]:
    """300 named pipe ends; enough for two chunks."""
    fds: list[tuple[str, int]] = []
    for i in range(150):
        r, w = os.pipe()
        fds += [(f"r{i}", r), (f"w{i}", w)]
    yield fds
    for _, fd in fds:
        os.close(fd)


def identity(fd: int) -> tuple[int, int]:
    """Which pipe end this is: the pipe's inode and the access mode (read or write end)."""
    return os.fstat(fd).st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def raw_messages(sock: socket.socket) -> list[tuple[dict[str, object], list[int]]]:
    """Read every queued message without Get, closing the fds; to look at the wire itself."""
    sock.setblocking(False)
    out: list[tuple[dict[str, object], list[int]]] = []
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 253)
            for fd in fds:
                os.close(fd)
            out.append((json.loads(data), fds))
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


def send_raw(sock: socket.socket, obj: object, fds: list[int]) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def test_blocking_round_trip_keeps_names_order_identity_and_payload(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    put_blocking(a, pipes[:5], {"listeners": 2, "generation": 5})
    received = get_blocking(b, timeout=5)
    assert isinstance(received, Received)
    assert [name for name, _ in received.fds] == [name for name, _ in pipes[:5]]
    assert received.payload == {"listeners": 2, "generation": 5}
    for (_, sent), (_, got) in zip(pipes[:5], received.fds, strict=True):
        assert got != sent
        assert identity(got) == identity(sent)
        assert not os.get_inheritable(got), "received fds must be close-on-exec"
    received.close()
    assert open_fds() == before


async def test_trio_round_trip_of_an_empty_set_and_no_payload(pair) -> None:
    a, b = (trio.socket.from_stdlib_socket(s) for s in pair)
    await put(a, [])
    with trio.fail_after(5):
        received = await get(b)
    assert received == Received(names=[], fd_numbers=[], payload={})
    assert received.fds == []


@pytest.mark.parametrize(("count", "chunks"), [(252, [252]), (253, [253]), (254, [253, 1])])
def test_sets_are_chunked_at_scm_max_fd(pair, pipes, count, chunks) -> None:
    a, b = pair
    put_blocking(a, pipes[:count], {"listeners": count})
    messages = raw_messages(b)
    assert [len(fds) for _, fds in messages] == chunks
    assert [len(m["names"]) for m, _ in messages] == chunks  # type: ignore[arg-type]
    assert [m["more"] for m, _ in messages] == [True] * (len(chunks) - 1) + [False]
    assert [m["seq"] for m, _ in messages] == list(range(len(chunks)))
    assert messages[0][0]["payload"] == {"listeners": count}
    assert all("payload" not in m for m, _ in messages[1:])
    assert all(m["v"] == PROTOCOL_VERSION and m["op"] == "put" for m, _ in messages)


@pytest.mark.parametrize("count", [252, 253, 254])
async def test_get_reassembles_chunks_at_the_boundaries(pair, pipes, count) -> None:
    a, b = (trio.socket.from_stdlib_socket(s) for s in pair)
    before = open_fds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, a, pipes[:count], {"listeners": 1})
        with trio.fail_after(5):
            received = await get(b)
    assert [n for n, _ in received.fds] == [n for n, _ in pipes[:count]]
    assert [identity(fd) for _, fd in received.fds] == [identity(fd) for _, fd in pipes[:count]]
    received.close()
    assert open_fds() == before


def test_long_names_are_split_below_the_message_size_limit(pair, pipes) -> None:
    a, b = pair
    named = [(f"{i:04d}" + "n" * 600, fd) for i, (_, fd) in enumerate(pipes[:253])]
    put_blocking(a, named)
    messages = raw_messages(b)
    assert len(messages) > 1
    assert sum(len(fds) for _, fds in messages) == 253
    assert [n for m, _ in messages for n in m["names"]] == [n for n, _ in named]  # type: ignore[attr-defined]


def test_names_needing_json_escapes_survive(pair, pipes) -> None:
    a, b = pair
    named = [('quo"te', pipes[0][1]), ("back\\slash", pipes[1][1]), ("tab\there", pipes[2][1])]
    put_blocking(a, named)
    received = get_blocking(b, timeout=5)
    assert [n for n, _ in received.fds] == [n for n, _ in named]
    received.close()


def expect_protocol_error(b: socket.socket, before: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        get_blocking(b, timeout=5)
    assert open_fds() == before, "every fd received before the error must be closed"


def test_wrong_version_is_refused_and_closes_the_fds(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    fds = [fd for _, fd in pipes[:3]]
    send_raw(a, {"v": 99, "op": "put", "seq": 0, "names": ["a", "b", "c"], "more": False}, fds)
    expect_protocol_error(b, before, "protocol version 99, this end speaks 1")


def test_a_future_version_with_other_fields_is_reported_as_a_version_error(pair) -> None:
    a, b = pair
    send_raw(a, {"v": 2, "op": "hello", "whatever": 1}, [])
    expect_protocol_error(b, open_fds(), "protocol version 2")


def test_name_and_fd_count_mismatch_closes_the_fds(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    fds = [fd for _, fd in pipes[:3]]
    send_raw(a, {"v": 1, "op": "put", "seq": 0, "names": ["a", "b"], "more": False}, fds)
    expect_protocol_error(b, before, "names 2 fd.s. but carries 3")


def test_malformed_json_closes_the_fds(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    send_raw(a, b"{not json", [pipes[0][1]])
    expect_protocol_error(b, before, "not a JSON object")


def test_missing_field_is_named(pair) -> None:
    a, b = pair
    send_raw(a, {"v": 1, "op": "put", "seq": 0, "more": False}, [])
    expect_protocol_error(b, open_fds(), "names: Field required")


def test_hang_up_mid_set_closes_the_first_chunk(pair, pipes) -> None:
    a, b = pair
    names = [n for n, _ in pipes[:253]]
    send_raw(
        a,
        {"v": 1, "op": "put", "seq": 0, "names": names, "more": True},
        [fd for _, fd in pipes[:253]],
    )
    a.close()
    before = open_fds()  # the 253 fds in flight are not ours yet
    expect_protocol_error(b, before, "hung up after 253 fd.s. in 1 message")


def test_out_of_sequence_chunk_is_refused(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    send_raw(a, {"v": 1, "op": "put", "seq": 0, "names": ["a"], "more": True}, [pipes[0][1]])
    send_raw(a, {"v": 1, "op": "put", "seq": 0, "names": ["b"], "more": False}, [pipes[1][1]])
    expect_protocol_error(b, before, "expected message 1 of the set, got message 0")


def test_blocking_get_times_out_mid_set_and_closes_what_it_has(pair, pipes) -> None:
    a, b = pair
    before = open_fds()
    send_raw(a, {"v": 1, "op": "put", "seq": 0, "names": ["a"], "more": True}, [pipes[0][1]])
    with pytest.raises(ProtocolError, match=r"no complete fd set arrived within 0\.05 s"):
        get_blocking(b, timeout=0.05)
    assert open_fds() == before


async def test_cancelled_get_closes_the_fds_it_holds(pair, pipes) -> None:
    a, b = pair
    tb = trio.socket.from_stdlib_socket(b)
    before = open_fds()
    send_raw(
        a,
        {"v": 1, "op": "put", "seq": 0, "names": ["a", "b"], "more": True},
        [pipes[0][1], pipes[1][1]],
    )
    with trio.move_on_after(0.05) as scope:
        await get(tb)
    assert scope.cancelled_caught
    assert open_fds() == before


def test_put_refuses_a_stream_socket(pipes) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, pytest.raises(ValueError, match="SOCK_SEQPACKET"):
        put_blocking(a, pipes[:1])


def test_put_refuses_a_payload_that_is_not_json(pair, pipes) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="cannot be sent as JSON"):
        put_blocking(a, pipes[:1], {"when": object()})
    assert raw_messages(b) == [], "nothing may be sent when the payload is bad"


def test_put_refuses_an_fd_name_longer_than_a_message(pair, pipes) -> None:
    # A payload larger than a message travels in parts (below); one name cannot be split.
    a, b = pair
    with pytest.raises(ValueError, match="over MAX_MESSAGE_BYTES"):
        put_blocking(a, [("x" * MAX_MESSAGE_BYTES, pipes[0][1])])
    assert raw_messages(b) == []


def test_put_to_a_closed_peer_is_a_protocol_error(pair, pipes) -> None:
    a, b = pair
    b.close()
    with pytest.raises(ProtocolError, match="cannot send the fd set"):
        put_blocking(a, pipes[:1])


def test_put_refuses_a_bad_pair_before_sending_anything(pair, pipes) -> None:
    a, b = pair
    bad = [*pipes[:300], ("x", "not an fd")]
    with pytest.raises(ValueError, match=r"\(name: str, fd: int\) pairs"):
        put_blocking(a, bad)  # type: ignore[list-item]
    assert raw_messages(b) == [], "a bad pair in the last chunk must not leave the first one sent"


CHUNK_CASES = [
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[]}',
    b'{"v":1,"op":"put","seq":7,"more":true,"names":["a","b c","\xc3\xa9","]"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":[""]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["",""]}',
    b'{"v":1,"op":"put","seq":01,"more":false,"names":["a"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a"],"x":["b"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a"b"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a","b"c"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a\\"b"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a\tb"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["\xff"]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":[1]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":["a",]}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":"a"}',
    b'{"v":1,"op":"put","seq":1,"more":false,"names":[" a "]} ',
    b'{"v":2,"op":"put","seq":1,"more":false,"names":["a"]}',
    b'{"v":1,"op":"put","seq":-1,"more":false,"names":["a"]}',
    b'{"v": 1, "op": "put", "seq": 1, "more": false, "names": ["a"]}',
]


# Chunks the long way must judge as the pydantic model would: other types, missing and extra
# fields, payloads, other top-level values.
DECODE_CASES = [
    *CHUNK_CASES,
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":{"a":[1,2.5,"x",null,true]}}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":{"x":NaN}}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":{"x":1},"payload":{"y":2}}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":null}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":[1]}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[],"payload":"x"}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":["\\u00e9\\ud83d\\ude00"]}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":["\\ud800"]}',
    b'{"v":1.0,"op":"put","seq":0,"more":false,"names":[]}',
    b'{"v":true,"op":"put","seq":0,"more":false,"names":[]}',
    b'{"v":"1","op":"put","seq":0,"more":false,"names":[]}',
    b'{"op":"put","seq":0,"more":false,"names":[]}',
    b'{"v":1,"op":"put","seq":0,"more":0,"names":[]}',
    b'{"v":1,"op":"put","seq":true,"more":false,"names":[]}',
    b'{"v":1,"op":"put","seq":1.0,"more":false,"names":[]}',
    b'{"v":1,"op":"get","seq":-1,"more":false,"names":[1, 2],"x":1}',
    b'{"v":1}',
    b"[1]",
    b'"text"',
    b"",
    b'\xef\xbb\xbf{"v":1,"op":"put","seq":0,"more":false,"names":[]}',
    b'{"v":1,"op":"put","seq":0,"more":false,"names":[]}\x00',
]


class ReferenceChunk(BaseModel):
    """The wire format as the daemon's pydantic models would state it (the module notes).

    ``_passing`` checks chunks in plain Python (workers do not load pydantic); this model is the
    reference it is held to.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: int
    op: Literal["put"]
    seq: int = Field(ge=0)
    names: list[str]
    more: bool
    payload: dict[str, JsonValue] | None = None


def reference(data: bytes) -> ReferenceChunk | ValidationError:
    try:
        return ReferenceChunk.model_validate_json(data)
    except ValidationError as exc:
        return exc


@pytest.mark.parametrize("data", CHUNK_CASES)
def test_the_fast_chunk_check_accepts_only_what_pydantic_accepts_and_agrees(data: bytes) -> None:
    from handoff._passing import _parse_canonical

    fast = _parse_canonical(data)
    checked = reference(data)
    model = None if isinstance(checked, ValidationError) else checked
    if data in CHUNK_CASES[:4]:
        assert fast is not None, "a chunk in our canonical form must take the fast path"
    if fast is not None:
        assert model is not None, "the fast path accepted what pydantic refuses"
        assert model.v == PROTOCOL_VERSION
        assert model.payload is None
        assert fast == (model.seq, model.more, model.names)


@pytest.mark.parametrize("data", DECODE_CASES)
def test_the_plain_chunk_check_judges_as_the_pydantic_model_does(data: bytes) -> None:
    from handoff._passing import _Chunk, _decode_chunk

    plain = _decode_chunk(data, 0)
    checked = reference(data)
    if not isinstance(checked, ValidationError) and checked.v == PROTOCOL_VERSION:
        assert isinstance(plain, _Chunk), plain
        # NaN != NaN: compare the JSON text.
        assert json.dumps([plain.seq, plain.more, plain.names, plain.payload]) == json.dumps(
            [checked.seq, checked.more, checked.names, checked.payload]
        )
        return
    assert isinstance(plain, str), "the plain check accepted what pydantic refuses"
    try:
        obj = json.loads(data)
    except ValueError:
        assert "is not a JSON object" in plain
        return
    if isinstance(obj, dict) and obj.get("v") != PROTOCOL_VERSION:
        assert f"speaks protocol version {obj.get('v')!r}, this end speaks 1" in plain
    elif isinstance(checked, ValidationError) and "Invalid JSON" not in str(checked):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
            for err in checked.errors(include_url=False)[:3]
        )
        assert plain == f"message 0 is malformed ({problems})"
    else:
        assert "is not a JSON object" in plain


def test_the_fast_chunk_check_takes_every_chunk_our_put_writes(pair, pipes) -> None:
    from handoff._passing import _parse_canonical, encode_messages

    named = [(f"listener-{i}.é", fd) for i, (_, fd) in enumerate(pipes)]
    messages = list(encode_messages(named, {"listeners": 3}))
    assert len(messages) == 2
    assert _parse_canonical(messages[0][0]) is None, "the payload chunk takes the long way"
    assert _parse_canonical(messages[1][0]) == (1, False, [n for n, _ in named[253:]])


@pytest.mark.parametrize("size", [200_000, 1_000_000])
def test_a_payload_larger_than_one_message_travels_in_parts_with_the_fds(size: int) -> None:
    """A self-upgrade's state with thousands of parked fds exceeds MAX_MESSAGE_BYTES."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    payload = {
        "parked": [{"name": f'conn-{i}-é\\"', "fd": f"parked:{i}"} for i in range(size // 40)]
    }
    try:
        sender = threading.Thread(target=put_blocking, args=(a, [("x", r)] * 300, payload))
        sender.start()
        received = get_blocking(b, timeout=30)
        sender.join()
        assert received.payload == payload
        assert received.names == ["x"] * 300
        received.close()
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_a_peer_cannot_make_the_receiver_buffer_payload_parts_without_end() -> None:
    from handoff._passing import MAX_PAYLOAD_BYTES

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    part = "x" * 100_000
    message = (
        f'{{"v":{PROTOCOL_VERSION},"op":"put","seq":%d,"more":true,"names":[],'
        f'"payload_part":"{part}"}}'
    )
    count = MAX_PAYLOAD_BYTES // len(part) + 2

    def flood() -> None:
        with contextlib.suppress(OSError):
            for seq in range(count):
                a.sendall((message % seq).encode())

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD_BYTES"):
            get_blocking(b, timeout=30)
    finally:
        b.close()
        sender.join()
        a.close()
    with pytest.raises(ValueError, match="over MAX_PAYLOAD_BYTES"):
        put_blocking(a, [], {"blob": "x" * (MAX_PAYLOAD_BYTES + 1)})
