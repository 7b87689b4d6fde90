"""The ``handoffd`` command: argument parsing, rendering for people or JSON, exit codes.

Exit codes (the only place they are turned into process exits): 0 ok; 1 the upgrade failed
(or generation 1 never became ready); 2 usage or config error; 3 the daemon cannot be reached;
4 (``status``) the daemon answers but its current generation is not serving; 5 ``--timeout``
passed while handoffd goes on with the request; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._client import STOPPING_REASON, call
from ._errors import (
    EXIT_INTERRUPTED,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_UPGRADE_FAILED,
    EXIT_USAGE,
    ConfigError,
    DaemonUnreachableError,
    GaveUpWaitingError,
    HandoffError,
    UsageError,
)
from ._paths import SUN_PATH_MAX, find_control_socket

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_CONFIG = Path("/etc/handoffd/handoffd.toml")
#: How long ``status`` and ``stop`` wait for the daemon's reply (not for the drain after it).
STATUS_TIMEOUT = 10.0
#: Error replies saying the daemon could not take the request now (the control socket's limits),
#: not that the request was wrong: the daemon was not reachable for it.
_NOT_NOW_CODES = frozenset({"busy", "evicted", "idle_timeout"})
#: What an interrupted command says: a request handoffd already has goes on without the CLI.
_INTERRUPTED = {
    "upgrade": "interrupted; an upgrade handoffd has received goes on; see `handoffd status`",
    "stop": "interrupted; a stop handoffd has received goes on",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handoffd",
        description="Zero-downtime reload supervisor: holds your listening sockets and replaces "
        "worker generations without refusing a connection.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="the daemon's config (finds its control socket)")
        p.add_argument("--socket", type=Path, help="the control socket, instead of --config")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    run = sub.add_parser("run", help="run the supervisor in the foreground")
    run.add_argument(
        "--config", type=Path, default=None, help=f"config file (default {DEFAULT_CONFIG})"
    )
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    # A self-upgrade's check of a new executable (see _handover.run_preflight); not for users.
    run.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)

    up = sub.add_parser("upgrade", help="start a new generation and retire the old one")
    client_options(up)
    up.add_argument(
        "--self",
        dest="supervisor",
        action="store_true",
        help="replace the handoffd supervisor itself, keeping the workers",
    )
    up.add_argument(
        "--exec",
        dest="exec_path",
        default=None,
        help="with --self: the handoffd executable to start (default: as found now)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up waiting for the outcome after this many seconds",
    )

    st = sub.add_parser("status", help="show generations, workers, listeners, last upgrade")
    client_options(st)

    stop = sub.add_parser("stop", help="drain every worker and stop the daemon")
    client_options(stop)
    stop.add_argument(
        "--no-wait", action="store_true", help="return once the daemon accepted the request"
    )

    metrics = sub.add_parser(
        "metrics", help="print the metrics in Prometheus' text format (needs [metrics])"
    )
    client_options(metrics)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", type=Path)

    completion = sub.add_parser(
        "completion", help="print the shell completion script (deploy/completions has them)"
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    return parser


class _VersionAction(argparse.Action):
    """``--version``: reads the installed metadata only when asked for it.

    argparse's own ``action="version"`` wants the string when the parser is built, and
    ``importlib.metadata`` would then load on every command's start.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from ._version import version

        print(f"handoffd {version()}")
        parser.exit()


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh"), generated from this parser by shtab.

    shtab is imported here only: the other commands never load it (they start as fast as before).
    ``scripts/completions`` writes the scripts shipped in deploy/completions with it.

    Raises:
        UsageError: shtab is not installed.
    """
    try:
        import shtab
    except ImportError:
        raise UsageError(
            "shell completion needs shtab, which is not installed: pip install shtab, or use the "
            "scripts in deploy/completions"
        ) from None
    parser = _parser()
    for action in _all_actions(parser):
        if action.type is Path:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    script: str = shtab.complete(parser, shell=shell)
    return script


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_actions(sub)
    return found


def _cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell))
    return EXIT_OK


def _named_config(args: argparse.Namespace) -> Path | None:
    """The config the user named (``--config``, else ``$HANDOFFD_CONFIG``), if any."""
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("HANDOFFD_CONFIG")
    return Path(env) if env else None


def _config_path(args: argparse.Namespace) -> Path:
    return _named_config(args) or DEFAULT_CONFIG


def _socket_path(args: argparse.Namespace) -> Path:
    """The control socket to talk to: ``--socket``, else the one the config names.

    Raises:
        UsageError: ``--socket`` is longer than a Unix socket path may be.
        ConfigError: a named config cannot be read, or gives such a path.
    """
    if args.socket is not None:
        path = Path(args.socket)
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:
            raise UsageError(
                f"--socket {path}: the path is {size} bytes, longer than a Unix socket path may "
                f"be ({SUN_PATH_MAX}, unix(7)); use a shorter path or a symlinked directory"
            )
        return path
    named = _named_config(args)
    config = named or DEFAULT_CONFIG
    path = find_control_socket(config, os.environ, named=named is not None)
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise ConfigError(
            f"config {config}: the control socket path {path} is {size} bytes, longer than "
            f"unix(7) allows ({SUN_PATH_MAX}); set a shorter supervisor.runtime_dir or "
            "supervisor.control_socket"
        )
    return path


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _cmd_run(args: argparse.Namespace) -> int:
    # Imported here: client commands must not pay for trio, structlog and pydantic.
    import trio

    from ._config import load_config
    from ._logs import configure_logging

    fmt = args.log_format
    configure_logging(json=None if fmt == "auto" else fmt == "json")
    loaded = load_config(_config_path(args))
    if args.preflight:
        from ._handover import run_preflight

        timeout = loaded.config.supervisor.self_upgrade_timeout
        trio.run(run_preflight, loaded.path, dict(os.environ), timeout)
        return EXIT_OK
    from ._startup import run_supervisor

    trio.run(run_supervisor, loaded, dict(os.environ))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from ._config import load_config
    from ._spawn import resolve_command

    loaded = load_config(args.path)
    cfg = loaded.config
    try:
        # The rule a spawn applies, with the PATH handoffd would run it with from this shell.
        resolve_command(
            cfg.program.command, {**os.environ, **cfg.program.env}, cfg.program.working_dir
        )
    except HandoffError as exc:
        # A warning, not an error: the program may be installed after the config is checked
        # (a deploy that validates first), and handoffd's own PATH may differ from this one.
        print(f"config {loaded.path}: warning: {exc}", file=sys.stderr)
    print(
        f"config {loaded.path}: ok ({len(cfg.listener)} listener(s), "
        f"{cfg.program.processes} worker(s) of {cfg.program.command[0]!r})"
    )
    return EXIT_OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    path = _socket_path(args)

    def on_event(event: dict[str, object]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            detail = f"  {event['detail']}" if event.get("detail") else ""
            print(
                f"upgrade: {event['phase']:<14} +{float(str(event['elapsed_s'])):.3f}s{detail}",
                flush=True,
            )

    request = {"op": "upgrade", "supervisor": args.supervisor, "exec_path": args.exec_path}
    reply = call(path, request, on_event=on_event, timeout=args.timeout)
    failed = _show(args, reply, _print_outcome)
    if failed is not None:
        return failed
    return EXIT_OK if reply.get("ok") else EXIT_UPGRADE_FAILED


def _show(
    args: argparse.Namespace,
    reply: dict[str, object],
    render: Callable[[dict[str, object]], object],
) -> int | None:
    """Print ``reply`` as JSON (``--json``) or ``render`` it; the exit code of an error reply."""
    if args.json:
        _print_json(reply)
        return _exit_for_error(reply)
    failed = _error_reply(reply)
    if failed is None:
        render(reply)
    return failed


def _print_outcome(reply: dict[str, object]) -> None:
    if reply.get("ok"):
        print(f"upgrade ok: generation {reply['generation']} serving, took {reply['duration_s']}s")
        return
    reason = str(reply.get("reason"))
    after = (
        "handoffd is shutting down: its workers drain and none keeps serving once it has exited"
        if STOPPING_REASON in reason
        else f"generation {reply.get('generation')} keeps serving"
    )
    print(f"upgrade failed after {reply.get('duration_s')}s: {reason}\n{after}", file=sys.stderr)


def _exit_for_error(reply: dict[str, object]) -> int | None:
    """The exit code for the daemon's error reply, or None if it is not one."""
    error = reply.get("error")
    if reply.get("ok") is False and isinstance(error, dict):
        return EXIT_UNREACHABLE if error.get("code") in _NOT_NOW_CODES else EXIT_USAGE
    return None


def _error_reply(reply: dict[str, object]) -> int | None:
    """Print the daemon's error reply (if it is one) and return the exit code for it."""
    code = _exit_for_error(reply)
    if code is not None:
        error = reply["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        print(f"handoffd: {message}", file=sys.stderr)
    return code


def _cmd_status(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    try:
        reply = call(path, {"op": "status"}, timeout=STATUS_TIMEOUT)
    except GaveUpWaitingError as exc:
        raise DaemonUnreachableError(
            f"handoffd at {path} took the connection but did not answer status within "
            f"{STATUS_TIMEOUT:g}s: it is overloaded or hung; see its log"
        ) from exc
    # An older daemon has no "serving" field: it says nothing, so nothing is claimed.
    serving = EXIT_NOT_SERVING if reply.get("serving") is False else EXIT_OK
    if args.json:
        _print_json(reply)
        failed = _exit_for_error(reply)
        return serving if failed is None else failed
    failed = _error_reply(reply)
    if failed is not None:
        return failed
    print(
        f"handoffd pid {reply['pid']} ({reply['version']}) {reply['state']}, config {reply['config']}"
    )
    why = f": {reply['not_serving']}" if reply.get("not_serving") else ""
    print(f"generation {reply['generation']}, {'serving' if not serving else 'NOT serving'}{why}")
    rss = {g["number"]: g for g in reply.get("generations") or []}  # type: ignore[attr-defined]
    for number, g in rss.items():
        print(f"  gen {number}: {g['processes']} processes, RSS {g['rss_kib'] / 1024:.1f} MiB")
    for w in reply["workers"]:  # type: ignore[attr-defined]
        status = f"  {w['status']!r}" if w.get("status") else ""
        extra = f"  restarts={w['restarts']}" if w.get("restarts") else ""
        extra += f"  descendants={w['descendants']}" if w.get("descendants") else ""
        extra += f"  readiness: {w['readiness']}" if w.get("readiness") else ""
        extra += f"  notify_rejected={w['notify_rejected']}" if w.get("notify_rejected") else ""
        print(
            f"  gen {w['generation']} worker {w['index']}  pid {w['pid'] or '-':<8} {w['state']:<9}{status}{extra}"
        )
    print("listeners:")
    for li in reply["listeners"]:  # type: ignore[attr-defined]
        print(f"  {li['name']:<12} {li['address']}  (fd {li['fd']}, {li['origin']})")
    parked = reply.get("parked")
    if isinstance(parked, list) and parked:
        # One name per parked set; a name parked with several fds is listed once, with a count.
        counts: dict[str, int] = {}
        for name in parked:
            counts[str(name)] = counts.get(str(name), 0) + 1
        shown = [name if n == 1 else f"{name} ({n} fds)" for name, n in counts.items()]
        print(f"parked fds: {', '.join(shown)}")
    last = reply.get("last_upgrade")
    if isinstance(last, dict):
        why = f": {last['reason']}" if last.get("reason") else ""
        print(
            f"last upgrade: {last['outcome']} (generation {last['generation']}, {last['duration_s']}s){why}"
        )
    return serving


def _cmd_metrics(args: argparse.Namespace) -> int:
    """The daemon's text exposition, as its ``GET /metrics`` serves it (the daemon renders it:
    this client stays free of prometheus-client)."""
    path = _socket_path(args)
    reply = call(path, {"op": "metrics"}, timeout=STATUS_TIMEOUT)
    failed = _show(args, reply, lambda r: sys.stdout.write(str(r.get("text", ""))))
    return EXIT_OK if failed is None else failed


def _cmd_stop(args: argparse.Namespace) -> int:
    path = _socket_path(args)

    def on_reply(reply: dict[str, object]) -> None:
        # Said only once the daemon has answered: before that it may not be running at all.
        if not args.json and reply.get("ok") is True:
            print("handoffd is stopping: draining workers", flush=True)

    reply = call(
        path,
        {"op": "stop"},
        on_reply=on_reply,
        timeout=STATUS_TIMEOUT,
        wait_closed=not args.no_wait,
    )
    failed = _error_reply(reply)
    if failed is not None:
        return failed
    if not args.json and not args.no_wait:
        print("handoffd stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``handoffd`` console script."""
    args = _parser().parse_args(argv)
    handlers = {
        "run": _cmd_run,
        "check-config": _cmd_check,
        "upgrade": _cmd_upgrade,
        "status": _cmd_status,
        "stop": _cmd_stop,
        "metrics": _cmd_metrics,
        "completion": _cmd_completion,
    }
    try:
        return handlers[args.command](args)
    except HandoffError as exc:
        print(f"handoffd: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # The daemon's nurseries raise groups; ours (HandoffError) are reported, one line each,
        # and anything else is a bug that keeps its traceback.
        ours, rest = group.split(HandoffError)
        if ours is None or rest is not None:
            raise
        errors = _leaves(ours)
        for error in errors:
            print(f"handoffd: {error}", file=sys.stderr)
        return errors[0].exit_code
    except KeyboardInterrupt:
        print(f"handoffd: {_INTERRUPTED.get(args.command, 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _leaves(group: BaseExceptionGroup[HandoffError]) -> list[HandoffError]:
    found: list[HandoffError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc)
        else:
            found.append(exc)
    return found


if __name__ == "__main__":
    sys.exit(main())
