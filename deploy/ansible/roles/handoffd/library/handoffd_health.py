#!/usr/bin/python
"""Ansible module: fail unless a host's handoffd serves, every current worker ready."""

from __future__ import annotations

DOCUMENTATION = r"""
module: handoffd_health
short_description: The health gate between batches, from C(handoffd status --json)
description:
  - Passes when the supervisor is running (not in an upgrade, not stopping), every worker of the
    generation that serves is ready, and (when O(generation) is given) that generation is the one
    the rollout produced on this host. Read only: it runs the same in check mode.
options:
  handoffd: {description: the handoffd executable, type: path, required: true}
  config: {description: the daemon's config file, type: path, required: true}
  generation: {description: the generation that should serve, type: int}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.handoffd_cli import current_workers, read_status


def main():
    module = AnsibleModule(
        argument_spec={
            "handoffd": {"type": "path", "required": True},
            "config": {"type": "path", "required": True},
            "generation": {"type": "int"},
        },
        supports_check_mode=True,
    )
    p = module.params
    status = read_status(module, p["handoffd"], p["config"])
    generation = status.get("generation")
    workers = current_workers(status)
    ready = [w for w in workers if w.get("state") == "ready"]
    facts = {"generation": generation, "state": status.get("state"), "ready": len(ready)}
    problems = []
    if status.get("state") != "running":
        problems.append(f"the supervisor is {status.get('state')!r}, not running")
    if not workers or len(ready) < len(workers):
        problems.append(f"{len(ready)}/{len(workers)} workers of generation {generation} ready")
    if p["generation"] is not None and generation != p["generation"]:
        problems.append(
            f"generation {generation} serves, the rollout left generation {p['generation']} "
            "(was handoffd restarted or upgraded by someone else?)"
        )
    if problems:
        module.fail_json(msg="unhealthy: " + "; ".join(problems), **facts)
    module.exit_json(
        changed=False,
        msg=f"healthy: generation {generation}, {len(ready)}/{len(workers)} workers ready",
        **facts,
    )


if __name__ == "__main__":
    main()
