"""``program.env_file``: ``KEY=VALUE`` lines read into the workers' environment.

Design notes:
- The format is the common subset of systemd's ``EnvironmentFile=`` and dotenv: one
  ``KEY=VALUE`` per line, blank lines and lines starting with ``#`` or ``;`` ignored, an optional
  ``export`` in front, values bare (surrounding blanks stripped), in ``'single quotes'`` (taken
  literally) or in ``"double quotes"`` (``\\"``, ``\\\\``, ``\\n``, ``\\t`` and ``\\$``
  unescaped). No ``$VAR`` expansion and no multi-line values: what the file says is what the
  worker gets.
- The file usually holds secrets: errors name the file and the line number, never a value.
- A file another uid may write could put ``LD_PRELOAD`` into every worker (run as root, when
  ``program.user`` is not set): it must be owned by root or by handoffd's user and not be
  writable by others, the rule ``_runtime_dir`` applies to directories.
"""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING, Final

from ._errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "$": "$"}
# An env file is a handful of settings; this bounds what a wrong path (a log file) makes us read.
ENV_FILE_MAX_BYTES: Final = 1024 * 1024


def load_env_file(path: Path, setting: str = "program.env_file") -> dict[str, str]:
    """Read and parse ``path`` (see the module notes).

    Raises:
        ConfigError: the file is missing, unreadable, unsafe or malformed; naming the path (and
            line) and the fix, never a value.
    """
    where = f"{setting} = {str(path)!r}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read it: {exc.strerror}; create it, fix the path, or remove {setting}"
        ) from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        problem = _unsafe(info)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        data = f.read(ENV_FILE_MAX_BYTES + 1)
    if len(data) > ENV_FILE_MAX_BYTES:
        raise ConfigError(f"{where}: larger than {ENV_FILE_MAX_BYTES} bytes; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason})") from exc
    return parse_env_file(text, where)


def _unsafe(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file; point it at a file of KEY=VALUE lines"
    uid = os.geteuid()
    if info.st_uid not in (0, uid):
        return (
            f"owned by uid {info.st_uid}, who could put any variable (LD_PRELOAD) into every "
            f"worker; chown it to root or to uid {uid}"
        )
    if info.st_mode & stat.S_IWOTH:
        return "writable by everyone, who could put any variable into every worker; chmod o-w it"
    return None


def parse_env_file(text: str, where: str = "env file") -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines; ``where`` prefixes errors (``program.env_file = '/x'``).

    Raises:
        ConfigError: naming the line at fault (not its value) and what is expected.
    """
    result: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[len("export") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            raise ConfigError(
                f"{where}: line {number} is not KEY=VALUE with KEY of letters, digits and _ "
                "(not starting with a digit); fix or comment out that line"
            )
        try:
            result[key] = _unquote(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{where}: line {number} ({key}): {exc}") from None
    return result


def _unquote(value: str) -> str:
    if not value or value[0] not in "'\"":
        return value
    quote = value[0]
    if len(value) < 2 or value[-1] != quote:
        raise ValueError(f"the value opens a {quote} quote it does not close on the same line")
    body = value[1:-1]
    if quote == "'":
        if "'" in body:
            raise ValueError("a single-quoted value cannot contain '; use double quotes")
        return body
    out: list[str] = []
    chars = iter(body)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
        elif ch == '"':
            raise ValueError('an unescaped " inside a double-quoted value; write \\"')
        else:
            out.append(ch)
    return "".join(out)
