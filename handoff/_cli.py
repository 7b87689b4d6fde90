"""The ``handoffd`` command: argument parsing, rendering for people or JSON, exit codes.

Exit codes (the only place they are turned into process exits): 0 ok; 1 the upgrade failed
(or generation 1 never became ready); 2 usage or config error; 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._client import call
from ._errors import EXIT_OK, EXIT_UPGRADE_FAILED, EXIT_USAGE, HandoffError
from ._paths import find_control_socket

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_CONFIG = Path("/etc/handoffd/handoffd.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handoffd",
        description="Zero-downtime reload supervisor: holds your listening sockets and replaces "
        "worker generations without refusing a connection.",
    )
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

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", type=Path)
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("HANDOFFD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return find_control_socket(_config_path(args), os.environ)


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

    loaded = load_config(args.path)
    cfg = loaded.config
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
    if args.json:
        _print_json(reply)
    elif "error" in reply:
        print(f"handoffd: {reply['error']['message']}", file=sys.stderr)  # type: ignore[index]
    elif reply.get("ok"):
        print(f"upgrade ok: generation {reply['generation']} serving, took {reply['duration_s']}s")
    else:
        print(
            f"upgrade failed after {reply.get('duration_s')}s: {reply.get('reason')}\n"
            f"generation {reply.get('generation')} keeps serving",
            file=sys.stderr,
        )
    if "error" in reply:
        return EXIT_USAGE
    return EXIT_OK if reply.get("ok") else EXIT_UPGRADE_FAILED


def _error_reply(reply: dict[str, object]) -> int | None:
    """Print the daemon's error reply (if it is one) and return the exit code for it."""
    error = reply.get("error")
    if reply.get("ok") is False and isinstance(error, dict):
        print(f"handoffd: {error.get('message', error)}", file=sys.stderr)
        return EXIT_USAGE
    return None


def _cmd_status(args: argparse.Namespace) -> int:
    reply = call(_socket_path(args), {"op": "status"}, timeout=10)
    if args.json:
        _print_json(reply)
        return EXIT_OK if reply.get("ok") is not False else EXIT_USAGE
    failed = _error_reply(reply)
    if failed is not None:
        return failed
    print(
        f"handoffd pid {reply['pid']} ({reply['version']}) {reply['state']}, config {reply['config']}"
    )
    print(f"generation {reply['generation']}")
    for w in reply["workers"]:  # type: ignore[attr-defined]
        status = f"  {w['status']!r}" if w.get("status") else ""
        extra = f"  restarts={w['restarts']}" if w.get("restarts") else ""
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
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    if not args.json:
        print("handoffd is stopping: draining workers", flush=True)
    reply = call(path, {"op": "stop"}, timeout=10, wait_closed=not args.no_wait)
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
        return EXIT_UPGRADE_FAILED


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
