#!/bin/bash
# systemd_harness.sh - run a private, unprivileged `systemd --user` manager for integration tests.
#
#   systemd_harness.sh up    NAME        start a manager (prints BASE dir), waits until it is running
#   systemd_harness.sh ctl   NAME ARGS…  systemctl --user ARGS… against it (runs as $SDH_USER)
#   systemd_harness.sh as    NAME CMD…   run CMD as $SDH_USER with the manager's XDG_RUNTIME_DIR
#   systemd_harness.sh down  NAME        stop it (graceful exit, then cgroup.kill), remove everything
#   systemd_harness.sh units NAME        print the unit directory (drop units there, then `ctl NAME daemon-reload`)
#
# The project's copy of the recipe in the team's systemd-harness notes (tests must not depend on
# them); tests/systemd_user.py drives it from pytest. Needs what scripts/setup-systemd-tests.sh sets up.
# NEVER replace this with a systemd *system* manager: its tmpfiles cleanup wipes /tmp on the host.
#
# systemd 252 facts the tests rely on (each was observed with this harness):
#   * the fd store survives `restart` and Restart=, and is flushed by `stop`;
#   * Type=notify-reload does not exist (the unit silently becomes Type=simple);
#   * after a MAINPID= handover, plain `stop` SIGKILLs the new main pid at once unless ExecStop= waits;
#   * `systemctl --user` only works as the manager's uid (hence `ctl`).
#
# Must be run as root (creates a cgroup, a mount+cgroup namespace, drops to $SDH_USER).
# Safety model (why this cannot wipe the host the way a system manager did):
#   * the manager runs as an unprivileged uid that owns nothing outside $SDH_ROOT;
#   * SYSTEMD_UNIT_PATH is *only* $BASE/units (no distro units: no tmpfiles, dbus, gpg-agent …);
#   * SYSTEMD_GENERATOR_PATH / SYSTEMD_ENVIRONMENT_GENERATOR_PATH point at an empty dir (no generators);
#   * /run/systemd (needed only so that sd_booted() is true) and /sys/fs/cgroup are replaced inside a
#     private mount namespace; everything else (/tmp, the repo) is shared so tests can exchange files;
#   * every process the manager spawns lives in one delegated cgroup that `down` kills with cgroup.kill.
set -euo pipefail

SDH_ROOT=${SDH_ROOT:-/tmp/sdh}            # all state lives below here
SDH_USER=${SDH_USER:-sdtest}              # unprivileged uid running the manager and the services
SDH_MAX_LIFETIME=${SDH_MAX_LIFETIME:-3600} # safety net: manager gets SIGTERM (graceful exit) after this
SYSTEMD=${SYSTEMD:-/usr/lib/systemd/systemd}

die() { echo "systemd_harness: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[ -x "$SYSTEMD" ] || die "$SYSTEMD missing (run scripts/setup-systemd-tests.sh)"
case "$SDH_ROOT" in /?*) ;; *) die "SDH_ROOT must be an absolute path";; esac

cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || die "usage: $0 up|ctl|as|down|units NAME [ARGS…]"
case "$name" in .*|*[!A-Za-z0-9_.-]*) die "bad NAME (use [A-Za-z0-9_.-], no leading dot)";; esac
shift 2

BASE=$SDH_ROOT/inst/$name

cgroot() {
    # pure cgroup v2 host: /sys/fs/cgroup; hybrid host (like Debian 12 here): /sys/fs/cgroup/unified
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then echo /sys/fs/cgroup
    elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup/unified
    else die "no cgroup v2 hierarchy mounted"; fi
}
CG=$(cgroot)/sdh-$name

as_user() {
    setpriv --reuid="$SDH_USER" --regid="$SDH_USER" --init-groups \
        env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME="$BASE/home" \
        XDG_RUNTIME_DIR="$BASE/runtime" "$@"
}
ctl() { as_user systemctl --user --no-pager "$@"; }
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }  # zombies count as dead

write_std_units() {
    local u=$BASE/units
    # Copies of the stock 252 user units a normal service needs (user services have Requires=basic.target).
    # Deliberately NOT the distro unit dir: no .wants of gpg-agent/dbus/tmpfiles get pulled in.
    printf '[Unit]\nDescription=Basic System\nWants=sockets.target timers.target paths.target\nAfter=sockets.target timers.target paths.target\n' >"$u/basic.target"
    printf '[Unit]\nDescription=Main User Target\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n' >"$u/default.target"
    printf '[Unit]\nDescription=Sockets\n' >"$u/sockets.target"
    printf '[Unit]\nDescription=Paths\n' >"$u/paths.target"
    printf '[Unit]\nDescription=Timers\nDefaultDependencies=no\nConflicts=shutdown.target\n' >"$u/timers.target"
    printf '[Unit]\nDescription=Shutdown\nDefaultDependencies=no\nRefuseManualStart=yes\n' >"$u/shutdown.target"
    printf '[Unit]\nDescription=Exit the Session\nDefaultDependencies=no\nRequires=systemd-exit.service\nAfter=systemd-exit.service\nAllowIsolate=yes\n' >"$u/exit.target"
    printf '[Unit]\nDescription=Exit the Session\nDefaultDependencies=no\nRequires=shutdown.target\nAfter=shutdown.target\nSuccessAction=exit-force\n[Service]\nSlice=-.slice\n' >"$u/systemd-exit.service"
    printf '[Unit]\nDescription=User Application Slice\n' >"$u/app.slice"
}

up() {
    [ -e "$BASE" ] && die "$BASE exists (run: $0 down $name)"
    [ -e "$CG" ] && die "$CG exists (run: $0 down $name)"
    id "$SDH_USER" >/dev/null 2>&1 || die "user $SDH_USER missing (run scripts/setup-systemd-tests.sh)"
    mkdir -p "$SDH_ROOT/inst"; chmod 755 "$SDH_ROOT" "$SDH_ROOT/inst"
    mkdir -p "$BASE"/{runtime,home/.config/systemd,units,empty,state}
    chmod 700 "$BASE/runtime"
    write_std_units
    # services inherit the manager's stdout/stderr => their output lands in $BASE/manager.log
    printf '[Manager]\nDefaultStandardOutput=inherit\nDefaultStandardError=inherit\nDefaultTimeoutStopSec=10s\n' \
        >"$BASE/home/.config/systemd/user.conf"
    chown -R "$SDH_USER:" "$BASE"
    : >"$BASE/manager.log"

    # The user manager never logs to its stderr: log target "console" means a re-opened /dev/console, which
    # must be a tty (a FIFO gets ENOTTY), and "kmsg" is rate-limited to 200 lines/5s. So we give it a pty:
    # this logger owns the master, appends everything to manager.log, and publishes the slave's path;
    # inside the namespace the slave is bind-mounted over /dev/console.
    /usr/bin/python3 -c '
import os, pty, pwd, sys, tty
base, user = sys.argv[1], sys.argv[2]
m, s = pty.openpty()
tty.setraw(s)                                   # no echo, no CR/LF rewriting
pw = pwd.getpwnam(user)
os.fchown(s, pw.pw_uid, pw.pw_gid)
with open(base + "/console.tmp", "w") as f:
    f.write(os.ttyname(s))
os.rename(base + "/console.tmp", base + "/console.path")
sys.stdin.close(); sys.stdout.close()
with open(base + "/manager.log", "ab", buffering=0) as log:
    while True:                                 # we keep s open, so this never sees EIO/EOF
        log.write(os.read(m, 65536))
' "$BASE" "$SDH_USER" </dev/null >/dev/null 2>>"$BASE/manager.log" &
    echo $! >"$BASE/logger.pid"
    local i
    for i in $(seq 1 100); do [ -s "$BASE/console.path" ] && break; sleep 0.01; done
    [ -s "$BASE/console.path" ] || { down; die "pty logger did not start"; }

    # Delegated cgroup: the manager must be able to create init.scope/app.slice/… below it.
    mkdir "$CG"
    chown "$SDH_USER:" "$CG" "$CG/cgroup.procs" "$CG/cgroup.threads" "$CG/cgroup.subtree_control"

    local t0; t0=$(date +%s%N)
    # 1. move this shell into the cgroup, 2. new mount+cgroup ns (cgroup ns root = $CG),
    # 3. cgroup2 on /sys/fs/cgroup (mounted inside the new cgroup ns, so no global mount flags change),
    # 4. tmpfs on /run/systemd + /run/systemd/system (systemd --user refuses to start unless sd_booted();
    #    64M because daemon-reload demands 16M free there) + /run/systemd/unit-root,
    # 5. a tmpfs on /run/user with /run/user/UID bound to $BASE/runtime. 4 and 5 are what sandboxing
    #    options (ProtectSystem=, PrivateTmp=, ... with PrivateUsers=yes) need in a user manager: it
    #    mounts the unit's root at /run/systemd/unit-root and takes its "inaccessible" nodes from
    #    /run/user/UID/systemd/ whatever XDG_RUNTIME_DIR says (otherwise status=226/NAMESPACE, ENOENT).
    # 6. pty slave over /dev/console, 7. drop to $SDH_USER.
    setsid timeout --signal=TERM --kill-after=10 "$SDH_MAX_LIFETIME" sh -c '
        echo $$ > "$1/cgroup.procs" || exit 1
        exec unshare --mount --cgroup --propagation private -- sh -c "
            set -e
            mount -t cgroup2 sdh-cgroup2 /sys/fs/cgroup
            mount -t tmpfs -o mode=755,size=64m sdh-run-systemd /run/systemd
            mkdir /run/systemd/system /run/systemd/unit-root
            if [ -d /run/user ]; then
                mount -t tmpfs -o mode=755,size=1m sdh-run-user /run/user
                mkdir -m 700 /run/user/\$(id -u \"\$1\")
                mount --bind \"\$0/runtime\" /run/user/\$(id -u \"\$1\")
            fi
            mount --bind \"\$(cat \$0/console.path)\" /dev/console
            exec setpriv --reuid=\"\$1\" --regid=\"\$1\" --init-groups env -i \
                PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME=\"\$0/home\" \
                XDG_RUNTIME_DIR=\"\$0/runtime\" XDG_CONFIG_HOME=\"\$0/home/.config\" \
                SYSTEMD_UNIT_PATH=\"\$0/units\" SYSTEMD_GENERATOR_PATH=\"\$0/empty\" \
                SYSTEMD_ENVIRONMENT_GENERATOR_PATH=\"\$0/empty\" SDH_STATE=\"\$0/state\" \
                \"\$2\" --user --unit=default.target --log-target=console --log-level=\${SDH_LOG_LEVEL:-info}
        " "$2" "$3" "$4"
    ' sdh "$CG" "$BASE" "$SDH_USER" "$SYSTEMD" </dev/null >>"$BASE/manager.log" 2>&1 &
    echo $! >"$BASE/launcher.pid"

    # ready = private bus answers and SystemState=running (is-system-running prints "offline" outside the ns)
    local i state=""
    for i in $(seq 1 250); do
        if [ -S "$BASE/runtime/systemd/private" ]; then
            state=$(ctl show -p SystemState --value 2>/dev/null || true)
            [ "$state" = running ] && break
        fi
        alive "$(cat "$BASE/launcher.pid")" || { cat "$BASE/manager.log" >&2; down; die "manager died"; }
        sleep 0.02
    done
    [ "$state" = running ] || { cat "$BASE/manager.log" >&2; down; die "manager not running (state=$state)"; }
    echo "sdh: up in $(( ($(date +%s%N) - t0) / 1000000 )) ms; BASE=$BASE CG=$CG" >&2
    echo "$BASE"
}

down() {
    local t0; t0=$(date +%s%N)
    if [ -S "$BASE/runtime/systemd/private" ] && [ -d "$CG" ]; then
        # graceful: exit.target stops every unit (STOPPING=1 etc. observable), then the manager exits
        timeout 10 setpriv --reuid="$SDH_USER" --regid="$SDH_USER" --init-groups env -i PATH=/usr/bin:/bin \
            XDG_RUNTIME_DIR="$BASE/runtime" systemctl --user exit >/dev/null 2>&1 || true
    fi
    if [ -d "$CG" ]; then
        local i
        for i in $(seq 1 $(( ${SDH_DOWN_GRACE:-3} * 50 ))); do   # units get SDH_DOWN_GRACE s to stop
            grep -q '^populated 0' "$CG/cgroup.events" && break; sleep 0.02
        done
        if ! grep -q '^populated 0' "$CG/cgroup.events"; then
            echo "sdh: graceful exit timed out, cgroup.kill" >&2
            echo 1 >"$CG/cgroup.kill"
            for i in $(seq 1 250); do grep -q '^populated 0' "$CG/cgroup.events" && break; sleep 0.02; done
        fi
        find "$CG" -mindepth 1 -depth -type d -exec rmdir {} \;
        rmdir "$CG"
    fi
    if [ -f "$BASE/logger.pid" ]; then    # only if that PID is still our logger (its argv names $BASE)
        local lp; lp=$(cat "$BASE/logger.pid")
        if tr '\0' '\n' <"/proc/$lp/cmdline" 2>/dev/null | grep -qxF "$BASE"; then kill "$lp" || true; fi
    fi
    [ -n "${SDH_KEEP_LOG:-}" ] && [ -f "$BASE/manager.log" ] && cp "$BASE/manager.log" "$SDH_ROOT/$name.manager.log"
    # $BASE is below $SDH_ROOT by construction; never rm anything else
    case "$BASE" in "$SDH_ROOT"/inst/?*) rm -rf --one-file-system "$BASE";; esac
    echo "sdh: down in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
}

case "$cmd" in
    up)    up ;;
    down)  down ;;
    ctl)   ctl "$@" ;;
    as)    as_user "$@" ;;
    units) echo "$BASE/units" ;;
    *)     die "unknown command $cmd" ;;
esac
