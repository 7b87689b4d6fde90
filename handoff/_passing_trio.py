"""SCM_RIGHTS Put/Get for trio programs: ``put``/``get``, the async twins of ``_passing``'s.

Same wire format, same checks and same errors as ``put_blocking``/``get_blocking`` (the
encoding, the chunk checks and the reassembly are ``_passing``'s); this module only adds the
waiting, on trio. The supervisor uses it, and so can a worker written with trio; a worker that
is not never imports it, so ``import handoff`` does not load trio (``handoff.put``/``handoff.get``
import it on first use).

Design notes:
- The functions try each syscall first and wait for the socket only on EAGAIN, with one
  checkpoint per call rather than two scheduler round trips per chunk (bench/handoff_fds.py).
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

import trio

from ._passing import (
    MSG_NOSIGNAL,
    Assembly,
    Received,
    channel_name,
    check_seqpacket,
    encode_messages,
    receive_one,
    sent_error,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence


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
    check_seqpacket(sock)
    messages = encode_messages(fds, payload)
    await trio.lowlevel.checkpoint_if_cancelled()
    with _nonblocking_view(sock) as view:
        for data, ancillary in messages:
            while True:
                try:
                    view.sendmsg([data], ancillary, MSG_NOSIGNAL)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(view)
                except OSError as exc:  # EPIPE, ECONNRESET, ETOOMANYREFS, EBADF, EMSGSIZE...
                    raise sent_error(sock, exc) from exc
    await trio.lowlevel.cancel_shielded_checkpoint()


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
    check_seqpacket(sock)
    assembly = Assembly(channel_name(sock))
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        with _nonblocking_view(sock) as view:
            while True:
                try:
                    if receive_one(view, assembly):
                        break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(view)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return assembly.finish()
    except BaseException:
        assembly.close()
        raise
