"""[program] worker settings and output: parsing, the shim they build, line splitting."""

from __future__ import annotations

import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from handoff._config import ProgramConfig, load_config
from handoff._envfile import parse_env_file
from handoff._errors import ConfigError
from handoff._output import OUTPUT_LINE_MAX, LineSplitter
from handoff._processes import WorkerSettings
from handoff._spawn import build_shim

BASE = """
[program]
command = ["python3", "-c", "pass"]
"""


def load(tmp_path: Path, extra: str) -> ProgramConfig:
    path = tmp_path / "handoffd.toml"
    path.write_text(BASE + extra + "\n")
    return load_config(path).config.program


def test_env_file_takes_comments_export_and_both_quotes() -> None:
    text = (
        "# comment\n; also a comment\n\nA=1\nexport B = two words \n"
        'C=\'$HOME \\n literal\'\nD="a\\"b\\\\c\\nd"\nE=\n'
    )
    assert parse_env_file(text) == {
        "A": "1",
        "B": "two words",
        "C": "$HOME \\n literal",
        "D": 'a"b\\c\nd',
        "E": "",
    }


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("NOEQUALS", "line 2 is not KEY=VALUE"),
        ("1X=1", "line 2 is not KEY=VALUE"),
        ("X='open", "line 2 (X): the value opens a ' quote it does not close"),
        ('X="a"b"', 'line 2 (X): an unescaped " inside a double-quoted value'),
    ],
)
def test_env_file_errors_name_the_line_never_the_value(line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_env_file(f"OK=1\n{line}\n", "program.env_file = '/x'")
    assert expected in str(info.value)
    assert str(info.value).startswith("program.env_file = '/x': ")


def test_env_file_is_read_at_load_relative_to_the_config_and_program_env_wins(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.env").write_text("A=file\nB=file\n")
    program = load(
        tmp_path, 'env_file = "app.env"\nworking_dir = "srv"\n[program.env]\nB = "config"'
    )
    assert program.env_file == tmp_path / "app.env"
    assert program.working_dir == tmp_path / "srv"
    assert program.worker_env() == {"A": "file", "B": "config"}


def test_a_missing_or_world_writable_env_file_fails_the_load_naming_the_path(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"program.env_file = '.*/nope.env': cannot read it"):
        load(tmp_path, 'env_file = "nope.env"')
    (tmp_path / "open.env").write_text("A=1\n")
    (tmp_path / "open.env").chmod(0o666)
    with pytest.raises(ConfigError, match=r"open.env': writable by everyone"):
        load(tmp_path, 'env_file = "open.env"')


def test_cwd_is_read_as_working_dir_and_both_at_once_is_an_error(tmp_path: Path) -> None:
    assert load(tmp_path, 'cwd = "/srv"').working_dir == Path("/srv")
    with pytest.raises(ConfigError, match="cwd is the old name of working_dir"):
        load(tmp_path, 'cwd = "/srv"\nworking_dir = "/srv"')


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('user = "no-such-user-x"', "user = 'no-such-user-x': no user of that name"),
        ('group = "no-such-group-x"', "group = 'no-such-group-x': no group of that name"),
        ("user = 4242424", "user = 4242424 has no passwd entry, so no primary group"),
        ('umask = "8"', "program.umask: expected an octal umask"),
        ("umask = 0o1777", "program.umask: a umask is between 0 and 0o777"),
        ('memory = "lots"', "program.memory: expected bytes as a number"),
        ('core = "big"', "program.core"),
        ("nofile = 0", "program.nofile: Input should be greater than 0"),
        ('output = "file"', "program.output: Input should be 'inherit' or 'log'"),
    ],
)
def test_bad_worker_settings_are_named_at_load(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    assert expected in str(info.value)


def test_settings_resolve_names_and_units(tmp_path: Path) -> None:
    if shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
        pytest.skip("setpriv(1) is not installed: user = ... is refused at load")
    program = load(tmp_path, 'user = "nobody"\numask = "027"\ncore = "unlimited"\nmemory = "2G"')
    identity = program.identity
    assert identity is not None
    assert (identity.uid, identity.name) == (65534, "nobody")
    assert program.umask_bits == 0o027
    assert program.core_bytes == resource.RLIM_INFINITY
    assert program.memory_bytes == 2 << 30


def run_shim(settings: WorkerSettings, tmp_path: Path) -> str:
    """Run the shim for real with ``sh`` and a command that prints what it got."""
    shim = build_shim(cwd=tmp_path, inherited_nofile=False, settings=settings, set_listen_pid=True)
    assert shim is not None
    script, before = shim
    probe = 'echo "pid=$$ listen=$LISTEN_PID cwd=$(pwd) umask=$(umask) core=$(ulimit -c) n=$(ulimit -n)"'
    result = subprocess.run(
        ["/bin/sh", "-c", script, "handoffd-worker", *before, "/bin/sh", "-c", probe],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr


def test_the_shim_applies_directory_limits_and_umask_and_keeps_listen_pid(tmp_path: Path) -> None:
    out = run_shim(WorkerSettings(umask=0o027, nofile=300, core=0), tmp_path)
    fields = dict(word.split("=", 1) for word in out.split())
    assert fields["pid"] == fields["listen"]
    assert fields["cwd"] == str(tmp_path)
    assert (fields["umask"], fields["core"], fields["n"]) == ("0027", "0", "300")


def test_a_shim_step_that_fails_names_its_setting(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = run_shim(WorkerSettings(nofile=10**9), tmp_path)
    assert "handoffd: cannot apply program.nofile" in out, (out, hard)


def test_the_shim_execs_setpriv_with_the_ids_and_groups() -> None:
    shim = build_shim(
        cwd=None,
        inherited_nofile=False,
        settings=WorkerSettings(uid=65534, gid=65534, user_name="nobody", setpriv="/s"),
        set_listen_pid=True,
    )
    assert shim is not None
    assert shim[1] == ["/s", "--reuid=65534", "--regid=65534", "--init-groups", "--"]
    shim = build_shim(
        cwd=None,
        inherited_nofile=False,
        settings=WorkerSettings(gid=5, setpriv="/s"),
        set_listen_pid=False,
    )
    assert shim is not None
    assert shim[1] == ["/s", "--regid=5", "--clear-groups", "--"]
    assert (
        build_shim(
            cwd=None, inherited_nofile=False, settings=WorkerSettings(), set_listen_pid=False
        )
        is None
    )


def test_lines_are_split_across_reads_and_long_ones_cut_once() -> None:
    splitter = LineSplitter(limit=8)
    got = [*splitter.feed(b"ab"), *splitter.feed(b"c\n\nde"), *splitter.feed(b"f\n")]
    assert got == [(b"abc", False), (b"", False), (b"def", False)]
    got = list(splitter.feed(b"0123456789abcdef\nnext\n"))
    assert got == [(b"01234567", True), (b"next", False)]
    got = [*splitter.feed(b"0123"), *splitter.feed(b"456789"), *splitter.feed(b"xyz\nok")]
    assert got == [(b"01234567", True)]
    assert list(splitter.flush()) == [(b"ok", False)]
    assert OUTPUT_LINE_MAX == 16 * 1024
