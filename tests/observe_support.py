"""A dict-backed ``/proc`` for handoff._observe, and a recorder that captures a real one.

``FakeProc`` answers the ``ProcReader`` calls from plain dicts: ``links`` (readlink targets),
``files`` (text), ``mem`` (bytes at an address) and ``errors`` (a path that raises). Directories
are derived from the keys, so ``"42/fd/3"`` makes ``listdir("42/fd")`` list ``"3"``.
``RecordingProc`` wraps the real reader and keeps everything it answered, in the JSON form
``FakeProc.load`` replays (tests/unit/fixtures/observe/*.json are recorded that way).
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from handoff._observe import ProcReader

_ERRORS: dict[str, type[OSError]] = {
    "ENOENT": FileNotFoundError,
    "ESRCH": ProcessLookupError,
    "EACCES": PermissionError,
}


@final
@dataclass
class FakeProc:
    links: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    mem: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unavailable_reason: str | None = None

    def unavailable(self) -> str | None:
        return self.unavailable_reason

    def _check(self, path: str) -> None:
        code = self.errors.get(path)
        if code is not None:
            raise _ERRORS[code](getattr(errno, code), path)

    def listdir(self, path: str) -> list[str]:
        self._check(path)
        prefix = path + "/"
        names = {
            key[len(prefix) :].split("/", 1)[0]
            for key in (*self.links, *self.files)
            if key.startswith(prefix)
        }
        if not names:
            raise FileNotFoundError(errno.ENOENT, path)
        return sorted(names)

    def readlink(self, path: str) -> str:
        return self._lookup(self.links, path)

    def read_text(self, path: str) -> str:
        return self._lookup(self.files, path)

    def _lookup(self, store: dict[str, str], path: str) -> str:
        self._check(path)
        try:
            return store[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, path) from None

    def read_mem(self, pid: int, address: int, size: int) -> bytes:
        self._check(f"{pid}/mem")
        for start, data in self.mem.get(pid, []):
            if start <= address and address + size <= start + len(data):
                return data[address - start : address - start + size]
        raise OSError(errno.EIO, f"{pid}/mem at {address:#x}")

    def process(
        self,
        pid: int,
        exe: str = "/usr/bin/python3",
        fds: dict[int, str] | None = None,
        fdinfo: dict[int, str] | None = None,
        syscalls: Iterable[str] = ("230 0x1 0x1 0x7ffe0 0x0 0x0 0x0 0x7ffd8 0x7fd53",),
        children: Iterable[int] = (),
    ) -> FakeProc:
        """Add one process by hand (its first thread has tid == pid)."""
        self.links[f"{pid}/exe"] = exe
        for fd, target in (fds or {0: "/dev/null"}).items():
            self.links[f"{pid}/fd/{fd}"] = target
        for fd, text in (fdinfo or {}).items():
            self.files[f"{pid}/fdinfo/{fd}"] = text
        kids = " ".join(map(str, children))
        for tid_offset, line in enumerate(syscalls):
            tid = pid + tid_offset * 10000
            self.files[f"{pid}/task/{tid}/syscall"] = line
            self.files[f"{pid}/task/{tid}/children"] = kids if tid_offset == 0 else ""
        return self

    @classmethod
    def load(cls, path: Path) -> tuple[FakeProc, dict[str, Any]]:
        """A recorded fixture: the fake and the metadata (listeners, roots, arch, verdict)."""
        data = json.loads(path.read_text())
        fake = cls(
            links=data["links"],
            files=data["files"],
            mem={
                int(pid): [(int(addr), bytes.fromhex(hexed)) for addr, hexed in ranges]
                for pid, ranges in data["mem"].items()
            },
            errors=data["errors"],
        )
        return fake, data["meta"]


@final
class RecordingProc:
    """Delegates to a real reader and records every answer for ``FakeProc.load``."""

    def __init__(self, inner: ProcReader) -> None:
        self._inner = inner
        self.links: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self.mem: dict[str, list[tuple[int, str]]] = {}
        self.errors: dict[str, str] = {}

    def _failed(self, path: str, exc: OSError) -> None:
        self.errors[path] = errno.errorcode.get(exc.errno or 0, "ENOENT")

    def unavailable(self) -> str | None:
        return self._inner.unavailable()

    def listdir(self, path: str) -> list[str]:
        try:
            return self._inner.listdir(path)
        except OSError as exc:
            self._failed(path, exc)
            raise

    def readlink(self, path: str) -> str:
        return self._keep(self.links, path, self._inner.readlink)

    def read_text(self, path: str) -> str:
        return self._keep(self.files, path, self._inner.read_text)

    def _keep(self, store: dict[str, str], path: str, read: Callable[[str], str]) -> str:
        try:
            store[path] = read(path)
        except OSError as exc:
            self._failed(path, exc)
            raise
        return store[path]

    def read_mem(self, pid: int, address: int, size: int) -> bytes:
        data = self._inner.read_mem(pid, address, size)
        self.mem.setdefault(str(pid), []).append((address, data.hex()))
        return data

    def dump(self, meta: dict[str, Any]) -> str:
        return json.dumps(
            {
                "meta": meta,
                "links": self.links,
                "files": self.files,
                "mem": self.mem,
                "errors": self.errors,
            },
            indent=1,
            sort_keys=True,
        )
