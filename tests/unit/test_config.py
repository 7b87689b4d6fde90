"""Config validation: every bad input names the file, the field and the value at fault."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import pytest

from handoff._address import parse_address
from handoff._config import find_control_socket, load_config, parse_signal
from handoff._errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

GOOD = """
[supervisor]
runtime_dir = "run"
[[listener]]
name = "http"
address = "127.0.0.1:8080"
[program]
command = ["python", "-m", "handoff.demo"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handoffd.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, GOOD))
    cfg = loaded.config
    assert cfg.supervisor.runtime_dir == tmp_path / "run"
    assert cfg.program.processes == 1
    assert cfg.program.ready_delay is None
    assert cfg.program.stop_signum == signal.SIGTERM
    assert cfg.listener[0].parsed_address.port == 8080


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("drain_timeout", 'drain_timeout = "30s"'),
            "program.drain_timeout: Input should be a valid number (got '30s')",
        ),
        (
            ("processes", "processes = 0"),
            "program.processes: Input should be greater than or equal to 1 (got 0)",
        ),
        (("ready", 'ready = "soon"'), 'program.ready: expected "notify" or "delay:SECONDS"'),
        (("stop_signal", 'stop_signal = "SIGNOPE"'), "program.stop_signal: expected a signal name"),
        (("surprise", "surprise = 1"), "program.surprise: Extra inputs are not permitted (got 1)"),
    ],
)
def test_bad_program_field_is_named_with_file_and_value(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    path = write(tmp_path, GOOD + change[1] + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config {path}: ")
    assert expected in str(info.value)


def test_bad_listener_address_names_the_listener_index(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("127.0.0.1:8080", "localhost"))
    with pytest.raises(
        ConfigError, match=r"listener\[0\]\.address: expected host:port.*\(got 'localhost'\)"
    ):
        load_config(path)


def test_duplicate_listener_names_are_rejected(tmp_path: Path) -> None:
    extra = '[[listener]]\nname = "http"\naddress = "127.0.0.1:9090"\n'
    path = write(tmp_path, GOOD.replace("[program]", extra + "[program]"))
    with pytest.raises(ConfigError, match="two listeners are named 'http'"):
        load_config(path)


def test_missing_program_and_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"program: Field required$"):
        load_config(write(tmp_path, "[supervisor]\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[program\n"))
    with pytest.raises(ConfigError, match="cannot read it: No such file or directory"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "kind", "host", "port", "path"),
    [
        ("127.0.0.1:80", "tcp", "127.0.0.1", 80, ""),
        ("tcp://[::1]:0", "tcp", "::1", 0, ""),
        (":8080", "tcp", "0.0.0.0", 8080, ""),
        ("udp://0.0.0.0:53", "udp", "0.0.0.0", 53, ""),
        ("unix:/run/app.sock", "unix", "", 0, "/run/app.sock"),
        ("unix:@abstract", "unix", "", 0, "@abstract"),
        ("unixgram:/run/log.sock", "unixgram", "", 0, "/run/log.sock"),
    ],
)
def test_parse_address_forms(text: str, kind: str, host: str, port: int, path: str) -> None:
    addr = parse_address(text)
    assert (addr.kind, addr.host, addr.port, addr.path) == (kind, host, port, path)


@pytest.mark.parametrize("text", ["", "8080", "host:99999", "unix:relative", "unix:/" + "x" * 120])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected|port|path|bytes"):
        parse_address(text)


def test_parse_signal_accepts_common_spellings() -> None:
    assert parse_signal("TERM") == parse_signal("sigterm") == signal.SIGTERM
    with pytest.raises(ValueError, match="expected a signal name"):
        parse_signal("SIGWHAT")


def test_find_control_socket_reads_a_broken_config_leniently(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("[program]", "[program]\nprocesses = -3"))
    assert find_control_socket(path, {}) == tmp_path / "run" / "control.sock"


def test_delay_not_shorter_than_ready_timeout_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + 'ready = "delay:30"\nready_timeout = 30\n')
    with pytest.raises(
        ConfigError, match=r"program: Value error|program: ready = \"delay:30\" waits 30s"
    ):
        load_config(path)
