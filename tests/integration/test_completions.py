"""The shipped completion scripts in real shells: bash sources and completes, zsh autoloads.

Each shell runs with no startup files; bash gets the words to complete the way readline passes
them (``COMP_WORDS``/``COMP_CWORD``) and the test reads ``COMPREPLY``. zsh is optional on a
developer's machine; its test skips with the reason when it is missing (``apt-get install zsh``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parent.parent.parent / "deploy" / "completions"


def bash(script: str) -> str:
    bash_path = shutil.which("bash")
    assert bash_path is not None
    done = subprocess.run(
        [bash_path, "--norc", "--noprofile", "-c", f"source {COMPLETIONS}/handoffd.bash\n{script}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stderr == ""
    return done.stdout


def complete_in_bash(*words: str) -> list[str]:
    """What bash offers after ``handoffd WORDS`` (the last word is the one being completed)."""
    quoted = " ".join(f"'{word}'" for word in ("handoffd", *words))
    out = bash(
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
        f'COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}; '
        "_shtab_handoffd; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    return out.split()


def test_bash_sources_the_script_and_registers_handoffd() -> None:
    assert bash("complete -p handoffd") == "complete -o bashdefault -F _shtab_handoffd handoffd\n"


def test_bash_completes_commands_options_and_choices() -> None:
    assert complete_in_bash("st") == ["status", "stop"]
    assert complete_in_bash("upgrade", "--s") == ["--socket", "--self"]
    assert complete_in_bash("completion", "") == ["bash", "zsh"]


def test_bash_completes_a_config_path_with_file_names(tmp_path: Path) -> None:
    (tmp_path / "handoffd.toml").touch()

    assert complete_in_bash("status", "--config", f"{tmp_path}/hand") == [
        f"{tmp_path}/handoffd.toml"
    ]


def test_zsh_autoloads_the_script_from_fpath_for_handoffd(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (apt-get install zsh)")
    done = subprocess.run(
        [
            zsh,
            "-f",
            "-c",
            f"fpath=({COMPLETIONS} $fpath); autoload -Uz compinit && compinit -u -D; "
            "print -r -- ${_comps[handoffd]}",
        ],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert (done.stdout, done.stderr) == ("_handoffd\n", "")
    syntax = subprocess.run(
        [zsh, "-n", str(COMPLETIONS / "_handoffd")], capture_output=True, text=True, check=False
    )
    assert (syntax.returncode, syntax.stderr) == (0, "")
