"""Run ``handoffd`` as launchd would start it, with the C stand-in as libSystem (tests only).

    python tests/launchd_stub/run_handoffd.py STUB.so NAME[,NAME] PYTHON -m handoff run ...

The stand-in declares each NAME as a plist ``Sockets`` entry; handoffd then asks it for its
listeners by name through the real ctypes binding (``_launchd``), exactly as it asks libSystem
on macOS. Only the library differs: ``launchd_sockets`` is given the stand-in.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

from handoff import _held
from handoff._cli import main
from handoff._launchd import LaunchdLibrary, launchd_sockets

stub_path, names, *command = sys.argv[1:]
stub = ctypes.CDLL(stub_path)
stub.stub_declare.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
for name in names.split(","):
    stub.stub_declare(name.encode(), 1)
stand_in = LaunchdLibrary.from_cdll(stub, free_symbol="stub_free")


def from_stub(
    names: Sequence[str], *, library: LaunchdLibrary | None = None
) -> list[tuple[str, int]] | None:
    return launchd_sockets(names, library=library or stand_in)


_held.launchd_sockets = from_stub
sys.exit(main(command[command.index("handoff") + 1 :]))
