"""The installed version of handoffd, read once."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    """The installed version, read once: it cannot change under a running process."""
    try:
        return metadata.version("handoffd")
    except metadata.PackageNotFoundError:
        return "0+unknown"
