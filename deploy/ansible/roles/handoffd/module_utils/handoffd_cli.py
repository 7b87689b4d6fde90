"""Run the ``handoffd`` CLI on a managed host and read its JSON, for the role's modules.

The modules talk to handoffd only through its command line (``status --json``,
``upgrade --json``): that is the interface handoffd keeps stable, and it needs nothing on the
host but handoffd itself. Exit codes are handoffd's: 0 ok, 1 the upgrade failed (the previous
generation keeps serving), 2 usage or config error, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import json

EXIT_OK = 0
EXIT_UPGRADE_FAILED = 1
EXIT_UNREACHABLE = 3


def json_documents(text):
    """Every JSON document in ``text``, in order.

    ``upgrade --json`` prints one event per line, then the reply indented over several lines,
    so the output is a sequence of documents, not one document per line.
    """
    decoder = json.JSONDecoder()
    found = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return found
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError:
            return found
        found.append(value)


def run_handoffd(module, handoffd, config, *args):
    """``handoffd ARGS --json --config CONFIG``: (exit code, last JSON document or None, stderr)."""
    argv = [handoffd, *args, "--json", "--config", config]
    rc, out, err = module.run_command(argv)
    docs = [d for d in json_documents(out) if isinstance(d, dict)]
    return rc, (docs[-1] if docs else None), err.strip()


def read_status(module, handoffd, config):
    """The daemon's ``status --json``; fails the task with a sentence when it cannot be read."""
    rc, status, err = run_handoffd(module, handoffd, config, "status")
    if rc == EXIT_OK and status is not None:
        return status
    if rc == EXIT_UNREACHABLE:
        module.fail_json(
            msg=f"handoffd is not running on this host (no answer on the control socket of "
            f"{config}): start it (systemctl start handoffd) and re-run the play",
            stderr=err,
            rc=rc,
        )
    module.fail_json(
        msg=f"handoffd status --config {config} failed (exit {rc}): {err or 'no output'}",
        stderr=err,
        rc=rc,
    )
    return None  # not reached: fail_json exits


def current_workers(status):
    """The workers of the generation that serves (not those draining)."""
    return [w for w in status.get("workers", []) if w.get("generation") == status.get("generation")]
