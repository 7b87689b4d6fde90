#!/bin/bash
# setup-systemd-tests.sh - prepare a machine (as root) for the tests that need systemd's tools or a
# real `systemd --user` manager (tests/integration/test_systemd_*.py, tests/integration/test_launchd.py).
#
# Idempotent: every step checks first and only changes what is missing, so .ci/run can call it on
# every run and a developer can re-run it at will.
#
#   1. Debian packages: systemd (the manager binary, systemd-socket-activate, systemd-notify),
#      util-linux (setpriv, unshare), procps (ps), gcc + libc6-dev (the launchd stand-in library),
#      python3 + python3-venv (the interpreter the unprivileged services run on).
#   2. The `sdtest` system user: the unprivileged uid that runs the test manager and its services.
#      It owns nothing outside /tmp/sdh, which is what makes the harness safe (see tests/systemd_harness.sh).
#   3. /opt/handoffd-test-venv: a world-readable venv made with /usr/bin/python3 that holds handoffd's
#      runtime dependencies (not handoffd itself: the tests put the checkout under test on PYTHONPATH).
#      Why: services run as sdtest, and the developers' interpreters live under /root (mode 0700),
#      which sdtest cannot read.
#
# Environment: HANDOFF_TEST_VENV overrides the venv path; SDH_USER the user name.
set -euo pipefail

SDH_USER=${SDH_USER:-sdtest}
VENV=${HANDOFF_TEST_VENV:-/opt/handoffd-test-venv}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "setup-systemd-tests: $*" >&2; }
die() { say "$*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it creates a system user and installs packages)"

# --- 1. packages -----------------------------------------------------------------------------
need=()
[ -x /usr/lib/systemd/systemd ] || need+=(systemd)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v systemd-notify >/dev/null || need+=(systemd)
command -v setpriv >/dev/null || need+=(util-linux)
command -v unshare >/dev/null || need+=(util-linux)
command -v ps >/dev/null || need+=(procps)
command -v cc >/dev/null || need+=(gcc libc6-dev)
[ -e /usr/include/stdlib.h ] || need+=(libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    # shellcheck disable=SC2207
    need=($(printf '%s\n' "${need[@]}" | sort -u))
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for tool in setpriv unshare timeout ps cc systemd-socket-activate systemd-notify; do
    command -v "$tool" >/dev/null || die "$tool still missing after the package step"
done
[ -x /usr/lib/systemd/systemd ] || die "/usr/lib/systemd/systemd still missing after the package step"

# --- 2. the unprivileged user --------------------------------------------------------------
if ! id "$SDH_USER" >/dev/null 2>&1; then
    say "creating system user $SDH_USER"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$SDH_USER"
fi

# --- 3. the interpreter the services use ---------------------------------------------------
# The dependency list is read from pyproject.toml so that it cannot drift from the package's.
deps=$(/usr/bin/python3 - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
probe='import trio, structlog, pydantic'
if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "$probe" 2>/dev/null \
    || ! "$VENV/bin/python" -m pip install --dry-run --quiet --no-index $deps >/dev/null 2>&1; then
    say "creating $VENV with: $(echo $deps)"
    [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $deps
fi
chmod -R a+rX "$VENV"
setpriv --reuid="$SDH_USER" --regid="$SDH_USER" --init-groups \
    "$VENV/bin/python" -c "$probe" || die "$SDH_USER cannot import handoffd's dependencies from $VENV"

# --- checks that cannot be fixed here ------------------------------------------------------
if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] \
    && [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" != cgroup2fs ]; then
    say "warning: no cgroup v2 hierarchy mounted; the real-manager tests will skip"
fi
say "ok: user $SDH_USER, interpreter $VENV/bin/python"
