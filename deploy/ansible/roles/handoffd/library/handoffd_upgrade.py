#!/usr/bin/python
"""Ansible module: upgrade one host's handoffd (``handoffd upgrade``) and report its outcome."""

from __future__ import annotations

DOCUMENTATION = r"""
module: handoffd_upgrade
short_description: Run C(handoffd upgrade) on a host and fail the host when the upgrade failed
description:
  - Decides whether the host needs an upgrade, runs C(handoffd upgrade --json) (or
    C(--self)) and reports its outcome. The exit code of C(handoffd upgrade) decides: 0 is ok,
    1 fails the task (the previous generation keeps serving), anything else fails it too.
  - A worker upgrade is needed when O(force) is true or the stamp file does not hold O(stamp)
    (the stamp is written only after a successful upgrade, so a host whose upgrade failed is
    upgraded again on the next run even if its files no longer change).
  - A self-upgrade (O(supervisor=true)) is needed when O(force) is true or the running
    supervisor's version differs from the handoffd installed for O(python).
  - In check mode it reads C(handoffd status) only and says whether it would upgrade.
options:
  handoffd: {description: the handoffd executable, type: path, required: true}
  config: {description: the daemon's config file (finds its control socket), type: path, required: true}
  stamp: {description: what this host should run (a digest of program version and config), type: str}
  stamp_path: {description: where the stamp of the last successful upgrade is kept, type: path}
  force: {description: upgrade even if the host looks up to date, type: bool, default: false}
  started: {description: the service was just started on the new config (record the stamp, do not upgrade), type: bool, default: false}
  supervisor: {description: replace the supervisor itself (C(upgrade --self --exec HANDOFFD)), type: bool, default: false}
  python: {description: with supervisor, the interpreter whose installed handoffd version is wanted, type: path}
  timeout: {description: give up waiting for the outcome after this many seconds, type: float}
"""

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.handoffd_cli import (
    EXIT_OK,
    EXIT_UPGRADE_FAILED,
    read_status,
    run_handoffd,
)


def read_stamp(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_stamp(module, path, stamp):
    """Atomically: a crash leaves the old stamp (an upgrade again next run), never half of one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stamp.")
    with os.fdopen(fd, "w") as f:
        f.write(stamp + "\n")
    module.atomic_move(tmp, path)


def installed_version(module, python):
    code = "import importlib.metadata as m; print(m.version('handoffd'))"
    rc, out, err = module.run_command([python, "-c", code])
    if rc != 0:
        module.fail_json(
            msg=f"cannot read the installed handoffd version with {python}: {err.strip()}; "
            "set handoffd_python to the interpreter of handoffd's virtualenv"
        )
    return out.strip()


def why_upgrade(module, status):
    """The reason this host needs an upgrade, or None when it is up to date."""
    p = module.params
    if p["force"]:
        return "forced (files changed on this run, or handoffd_force_upgrade)"
    if p["supervisor"]:
        if not p["python"]:
            return "no handoffd_python to compare versions with"
        want = installed_version(module, p["python"])
        if want != status.get("version"):
            return f"supervisor {status.get('version')} runs, {want} is installed"
        return None
    if p["stamp"] is None or p["stamp_path"] is None:
        return "no stamp to compare with"
    if read_stamp(p["stamp_path"]) != p["stamp"]:
        return "the deployed program or config is not the one the last successful upgrade ran"
    return None


def main():
    module = AnsibleModule(
        argument_spec={
            "handoffd": {"type": "path", "required": True},
            "config": {"type": "path", "required": True},
            "stamp": {"type": "str"},
            "stamp_path": {"type": "path"},
            "force": {"type": "bool", "default": False},
            "started": {"type": "bool", "default": False},
            "supervisor": {"type": "bool", "default": False},
            "python": {"type": "path"},
            "timeout": {"type": "float"},
        },
        supports_check_mode=True,
    )
    p = module.params
    what = "handoffd supervisor" if p["supervisor"] else "program"
    base = {"handoffd": p["handoffd"], "config": p["config"], "upgraded": False}
    # `handoffd status` costs a process start: read it only when the answer needs it (check
    # mode reports what serves now; a self-upgrade compares versions). A real worker upgrade
    # learns the generations from the upgrade's own reply.
    status = {}
    if module.check_mode:
        rc, found, _ = run_handoffd(module, p["handoffd"], p["config"], "status")
        if rc != EXIT_OK or found is None:
            module.warn(
                f"handoffd is not running (no answer on the control socket of {p['config']}): "
                "the real run fails here unless the service is started first"
            )
            module.exit_json(changed=False, msg="would fail: handoffd is not running", **base)
        status = found
    elif p["supervisor"]:
        status = read_status(module, p["handoffd"], p["config"])
    now = f" (generation {status['generation']} serves now)" if "generation" in status else ""
    if p["started"] and not p["supervisor"]:
        if not module.check_mode and p["stamp_path"] and p["stamp"]:
            write_stamp(module, p["stamp_path"], p["stamp"])
        module.exit_json(changed=False, msg="handoffd was just started on the new config", **base)
    reason = why_upgrade(module, status)
    if reason is None:
        module.exit_json(
            changed=False,
            msg=f"up to date: this host runs the wanted {what}{now}",
            generation=status.get("generation"),
            **base,
        )
    if module.check_mode:
        module.exit_json(
            changed=True,
            msg=f"would upgrade the {what}{now}: {reason}",
            generation=status.get("generation"),
            reason=reason,
            **base,
        )
    args = ["upgrade"]
    if p["supervisor"]:
        args += ["--self", "--exec", p["handoffd"]]
    if p["timeout"] is not None:
        args += ["--timeout", str(p["timeout"])]
    rc, reply, err = run_handoffd(module, p["handoffd"], p["config"], *args)
    reply = reply or {}
    result = {
        **base,
        "rc": rc,
        "reply": reply,
        "generation": reply.get("generation"),
        "previous_generation": reply.get("previous_generation"),
        "supervisor_pid": reply.get("supervisor_pid"),
        "duration_s": reply.get("duration_s"),
        "stderr": err,
    }
    if rc == EXIT_OK and reply.get("ok"):
        if not p["supervisor"] and p["stamp_path"] and p["stamp"]:
            write_stamp(module, p["stamp_path"], p["stamp"])
        result["upgraded"] = True
        module.exit_json(
            changed=True,
            msg=f"upgraded the {what}: generation {result['generation']} serves "
            f"(took {reply.get('duration_s')}s)",
            **result,
        )
    if rc == EXIT_UPGRADE_FAILED:
        module.fail_json(
            msg=f"the {what} upgrade failed: {reply.get('reason') or err}; generation "
            f"{reply.get('generation')} keeps serving. Fix the version for this host "
            "and re-run the play: hosts already done are skipped, hosts after this one were not "
            "touched",
            **result,
        )
    module.fail_json(
        msg=f"handoffd upgrade --config {p['config']} exited {rc}: "
        f"{(reply.get('error') or {}).get('message') or err or 'no output'}",
        **result,
    )


if __name__ == "__main__":
    main()
