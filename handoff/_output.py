"""Worker output as log events (``program.output = "log"``): pipes, line splitting, the pump.

With ``output = "inherit"`` (the default) workers write to handoffd's own stdout and stderr,
which is right under systemd or docker, whose log collectors attribute lines by stream. Mixed
into handoffd's JSON log, though, a worker's line breaks the one-object-per-line format. With
``output = "log"`` every worker gets a pipe as stdout and one as stderr, and each line read from
them becomes a ``worker.output`` event with ``generation``, ``worker``, ``pid``, ``stream`` and
``line`` (and ``truncated: true`` when cut).

Design notes:
- Lines longer than ``OUTPUT_LINE_MAX`` (16 KiB) are cut there: the first 16 KiB are logged at
  once (``truncated``), the rest up to the next newline is dropped. So memory per pipe is
  bounded, and a line without a newline is still shown once it is long enough. Bytes that are
  not UTF-8 are replaced (U+FFFD); a trailing ``\\r`` is dropped.
- A flooding worker cannot starve the event loop: one read takes at most ``_READ_MAX`` bytes, and
  the pump yields to the scheduler after every ``_LINES_PER_TURN`` lines, so the control socket,
  signals and notify sockets are served in between. If the pump cannot keep up, the pipe fills
  (64 KiB, pipe(7)) and the *worker* blocks in write(2): a flood costs the flooder, never the
  supervisor.
- The read ends are close-on-exec (no other worker inherits them); the write ends are closed
  by us right after the spawn, so EOF comes when the last holder is gone: the worker and every
  descendant that kept its stdout/stderr. A pump therefore outlives the worker's exit and is
  owned by its generation, which, once its trees are gone, gives the pumps ``OUTPUT_FLUSH``
  seconds to log what is left and then closes them. A descendant that escaped the tree (setsid)
  and still writes then gets EPIPE.
- The pid in an event is the worker's (its tree's leader): a line does not say which process of
  the tree wrote it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, final

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

Stream = Literal["stdout", "stderr"]
_STREAMS: Final[tuple[Stream, Stream]] = ("stdout", "stderr")
#: The longest line logged whole; longer ones are cut here (documented in the README).
OUTPUT_LINE_MAX: Final = 16 * 1024
# One read(2) per wakeup at most this much: the pipe's default capacity (pipe(7)).
_READ_MAX: Final = 64 * 1024
# Lines logged between two yields to the scheduler (see the module notes).
_LINES_PER_TURN: Final = 64
#: Seconds a stopped generation waits for its pumps to reach EOF before closing them.
OUTPUT_FLUSH: Final = 1.0


@final
@dataclass(eq=False)
class OutputPipe:
    """One pipe for one stream of one worker: our read end, and the write end for the spawn."""

    stream: Stream
    read_fd: int
    write_fd: int

    def close_write(self) -> None:
        """After the spawn: the worker holds its copy; EOF must depend on it alone."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def open_output_pipes() -> tuple[OutputPipe, OutputPipe]:
    """A stdout and a stderr pipe, both ends close-on-exec (the spawn dup2s the write ends).

    Raises:
        OSError: out of fds.
    """
    pipes: list[OutputPipe] = []
    try:
        for stream in _STREAMS:
            r, w = os.pipe()  # non-inheritable (PEP 446): pipe2(O_CLOEXEC) where it exists
            pipes.append(OutputPipe(stream, r, w))
    except BaseException:
        for pipe in pipes:
            pipe.close()
        raise
    return pipes[0], pipes[1]


def take_read_ends(pipes: Sequence[OutputPipe]) -> dict[Stream, int]:
    """The read ends by stream; the caller owns them from now on (``pipes`` forget them)."""
    taken: dict[Stream, int] = {}
    for pipe in pipes:
        taken[pipe.stream], pipe.read_fd = pipe.read_fd, -1
    return taken


@final
class LineSplitter:
    """Bytes in, ``(line, truncated)`` out; holds at most ``limit`` bytes of a partial line."""

    def __init__(self, limit: int = OUTPUT_LINE_MAX) -> None:
        self._limit = limit
        self._partial = bytearray()
        # Dropping the rest of a line that was cut, up to its newline.
        self._skipping = False

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                room = self._limit - len(self._partial)
                piece = data[start:end]
                line = bytes(self._partial) + piece[:room]
                self._partial.clear()
                yield line, len(piece) > room
            start = end + 1
        if not self._skipping:
            self._partial += data[start : start + self._limit + 1 - len(self._partial)]
            if len(self._partial) > self._limit:
                yield bytes(self._partial[: self._limit]), True
                self._partial.clear()
                self._skipping = True

    def flush(self) -> Iterator[tuple[bytes, bool]]:
        """What is left at EOF: a last line without a newline."""
        if self._partial and not self._skipping:
            yield bytes(self._partial), False
        self._partial.clear()


def _emit(
    line: bytes, truncated: bool, stream: Stream, pid: int, generation: int, worker: int
) -> None:
    text = line.decode("utf-8", "replace").removesuffix("\r")
    extra = {"truncated": True} if truncated else {}
    log.info(
        "worker.output",
        generation=generation,
        worker=worker,
        pid=pid,
        stream=stream,
        line=text,
        **extra,
    )


async def pump_output(
    read_fd: int,
    stream: Stream,
    *,
    pid: int,
    generation: int,
    worker: int,
) -> None:
    """Log every line read from ``read_fd`` until EOF; owns ``read_fd`` and closes it.

    Cancelled (its generation is gone), it logs the lines already read before closing.
    """
    # Not trio's FdStream: closing it puts back the blocking mode it found, and O_NONBLOCK lives
    # on the open file description, which a self-upgrade shares with the successor's pump: it
    # would block the successor's event loop in read(2). Non-blocking it stays.
    os.set_blocking(read_fd, False)
    splitter = LineSplitter()
    pending: list[tuple[bytes, bool]] = []
    try:
        while True:
            try:
                data = os.read(read_fd, _READ_MAX)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(read_fd)
                continue
            if not data:
                break
            pending = list(splitter.feed(data))
            while pending:
                for line, truncated in pending[:_LINES_PER_TURN]:
                    _emit(line, truncated, stream, pid, generation, worker)
                del pending[:_LINES_PER_TURN]
                await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
    finally:
        for line, truncated in [*pending, *splitter.flush()]:
            _emit(line, truncated, stream, pid, generation, worker)
        trio.lowlevel.notify_closing(read_fd)
        os.close(read_fd)
