"""Observed readiness on recorded /proc text: the parsing, the syscall tables and the rule."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from handoff._observe import (
    SYSCALL_TABLES,
    ListenerKey,
    TreeObservation,
    check_readiness,
    fd_set_size,
    judge_readiness,
    observe_tree,
    parse_epoll_targets,
    parse_syscall,
    polled_for_input,
    process_tree,
    selected_for_input,
    walk_tree,
)
from tests.observe_support import FakeProc

FIXTURES = Path(__file__).parent / "fixtures" / "observe"
X86 = SYSCALL_TABLES["x86_64"]
ARM = SYSCALL_TABLES["aarch64"]
SOCKFS = 9  # st_dev of sockfs on the recording host: major 0, minor 9
HTTP = ListenerKey("http", inode=0xD5807, dev=SOCKFS, kind="stream")
ADMIN = ListenerKey("admin", inode=0xD5808, dev=SOCKFS, kind="stream")
UDP = ListenerKey("dns", inode=0xD5809, dev=SOCKFS, kind="datagram")
KEYS = {k.inode: k for k in (HTTP, ADMIN, UDP)}
PY = "/usr/bin/python3.11"


def sock(key: ListenerKey) -> str:
    return f"socket:[{key.inode}]"


def epoll_fdinfo(*targets: tuple[int, int, int], sdev: int = SOCKFS) -> str:
    """An eventpoll fdinfo as fs/eventpoll.c prints it: (tfd, events, inode) per target."""
    head = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t17\n"
    return head + "".join(
        f"tfd: {tfd:8d} events: {events:8x} data: {tfd:16x}  pos:0 ino:{ino:x} sdev:{sdev:x}\n"
        for tfd, events, ino in targets
    )


SLEEPING = (
    "230 0x1 0x1 0x7ffe0a1b00f0 0x0 0x0 0x0 0x7ffe0a1b00d8 0x7fdad86ed503"  # x86_64 clock_nanosleep
)


def judge(fake: FakeProc, roots: list[int], arch: str = "x86_64", min_waiting: int = 1):
    tree = walk_tree(roots, fake)
    return judge_readiness(observe_tree(tree, KEYS, fake, arch), KEYS, min_waiting=min_waiting)


# -- parsing -------------------------------------------------------------------------------------


def test_parse_syscall_reads_number_and_six_hex_arguments() -> None:
    # recorded: uvicorn's worker in accept4 (x86_64), a running task, a task outside a syscall
    line = "288 0x3 0x7fff4c4a1c10 0x7fff4c4a1c04 0x80000 0x0 0x0 0x7fff4c4a1bd8 0x7f3ab1328f63\n"
    assert parse_syscall(line) == (288, (3, 0x7FFF4C4A1C10, 0x7FFF4C4A1C04, 0x80000, 0, 0))
    assert parse_syscall("running\n") is None
    assert parse_syscall("-1 0x7ffd58ae3ad8 0x7f24a9ef1dd0\n") is None
    assert parse_syscall("-1 0x0 0x0\n") is None  # a zombie
    assert parse_syscall("43 0xzz 0 0 0 0 0 0 0") is None


def test_parse_epoll_targets_reads_hex_inode_device_and_events() -> None:
    # recorded from node: the listener (tfd 3) and an eventfd (sdev f, another filesystem)
    text = (
        "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t17\n"
        "tfd:        3 events:       19 data:                3  pos:0 ino:d56d3 sdev:9\n"
        "tfd:       12 events: 80000019 data:     7f7c0000000c  pos:0 ino:d56e9 sdev:f\n"
    )
    assert parse_epoll_targets(text) == [(0xD56D3, 9, 0x19), (0xD56E9, 0xF, 0x80000019)]
    assert parse_epoll_targets("pos:\t0\nflags:\t02\n") == []


def test_pollfd_array_counts_only_input_interest() -> None:
    pollfds = b"".join(
        struct.pack("<ihh", fd, events, 0)
        for fd, events in [(5, 0x1), (6, 0x4), (7, 0x40), (-1, 0x1), (9, 0x1)]
    )
    assert polled_for_input(pollfds, [5, 6, 7, 8], X86) == {5, 7}  # POLLIN, POLLRDNORM; not POLLOUT


def test_fd_set_is_an_array_of_native_longs() -> None:
    fd_set = (1 << 7 | 1 << 3).to_bytes(8, "little") + (1 << (70 - 64)).to_bytes(8, "little")
    assert selected_for_input(fd_set, [3, 4, 7, 70, 71], X86) == {3, 7, 70}
    assert selected_for_input(fd_set[:8], [70], X86) == set()  # beyond what was read
    assert fd_set_size(1, X86) == 8
    assert fd_set_size(64, X86) == 8
    assert fd_set_size(65, X86) == 16


def test_syscall_tables_follow_the_kernel_headers() -> None:
    # asm/unistd_64.h and asm-generic/unistd.h (aarch64 has no poll, select or plain accept4 288)
    assert X86.accept == {43, 288}
    assert X86.poll == {7, 271}
    assert X86.select == {23, 270}
    assert X86.recv == {0, 45, 47, 299}
    assert ARM.accept == {202, 242}
    assert ARM.poll == {73}
    assert ARM.select == {72}
    assert ARM.recv == {63, 207, 212, 243}


# -- recorded real servers -----------------------------------------------------------------------


def recorded(name: str) -> tuple[FakeProc, dict[int, ListenerKey], dict[str, Any]]:
    fake, meta = FakeProc.load(FIXTURES / f"{name}.json")
    keys = {
        entry["inode"]: ListenerKey(entry["name"], entry["inode"], entry["dev"], entry["kind"])
        for entry in meta["listeners"]
    }
    return fake, keys, meta


FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recorded_server_gets_the_verdict_seen_live(name: str) -> None:
    fake, keys, meta = recorded(name)
    readiness = check_readiness(meta["roots"], keys, reader=fake)
    assert readiness.verdict == meta["verdict"], readiness.reason
    assert {str(i): sorted(p) for i, p in readiness.waiting.items()} == meta["waiting"]
    assert sorted(readiness.pending) == meta["pending"]


def waits_by_pid(name: str) -> dict[int, set[str]]:
    fake, keys, meta = recorded(name)
    tree = walk_tree(meta["roots"], fake)
    seen = observe_tree(tree, keys, fake, str(meta["arch"]))
    return {
        pid: {h for hows in p.waits.values() for h in hows} for pid, p in seen.processes.items()
    }


def test_gunicorn_sync_workers_wait_in_pselect6_and_the_arbiter_is_exempt() -> None:
    waits = waits_by_pid("gunicorn_sync_w2")
    assert sorted(waits.values(), key=len) == [set(), {"select"}, {"select"}]
    (arbiter,) = recorded("gunicorn_sync_w2")[2]["roots"]
    assert waits[arbiter] == set()


def test_gunicorn_with_a_worker_still_booting_is_not_ready() -> None:
    fake, keys, meta = recorded("gunicorn_w2_second_booting")
    readiness = check_readiness(meta["roots"], keys, reader=fake)
    assert readiness.verdict == "not-accepting"
    assert "1 of 2 worker processes not waiting" in readiness.reason
    assert len(readiness.pending) == 1


def test_epoll_servers_are_seen_through_their_registration() -> None:
    for name in ("gunicorn_gthread_w2", "uvicorn_fd_one_of_two", "hypercorn", "node_http"):
        assert {"epoll"} in waits_by_pid(name).values(), name


def test_uvicorn_serving_one_of_two_inherited_sockets_is_ready() -> None:
    fake, keys, meta = recorded("uvicorn_fd_one_of_two")
    readiness = check_readiness(meta["roots"], keys, reader=fake)
    assert readiness.ready
    assert readiness.idle_listeners == ("spare",)


def test_sleep_helper_started_by_the_shell_holds_the_listeners_but_is_exempt() -> None:
    fake, keys, meta = recorded("sh_helper_exec_gunicorn")
    tree = walk_tree(meta["roots"], fake)
    seen = observe_tree(tree, keys, fake, "x86_64")
    helpers = [p for p in seen.processes.values() if p.exe == "/usr/bin/sleep"]
    assert len(helpers) == 1
    assert helpers[0].holds
    assert not helpers[0].waits
    assert judge_readiness(seen, keys).ready


# -- the rule, on hand-made trees ----------------------------------------------------------------


def prefork(worker_syscalls: list[str], arbiter_exe: str = PY) -> FakeProc:
    """An arbiter (pid 100) holding http at fd 3 with workers 101.. holding it at fd 3 too."""
    workers = [101 + i for i in range(len(worker_syscalls))]
    fake = FakeProc().process(100, arbiter_exe, {3: sock(HTTP)}, children=workers)
    for pid, line in zip(workers, worker_syscalls, strict=True):
        fake.process(pid, PY, {3: sock(HTTP)}, syscalls=[line])
    return fake


ACCEPT_FD3 = "43 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x7f3a"


def test_prefork_is_ready_only_when_every_worker_accepts() -> None:
    assert judge(prefork([ACCEPT_FD3, SLEEPING]), [100]).verdict == "not-accepting"
    readiness = judge(prefork([ACCEPT_FD3, ACCEPT_FD3]), [100])
    assert readiness.ready
    assert readiness.waiting == {HTTP.inode: frozenset({101, 102})}
    assert judge(prefork([]), [100]).verdict == "not-accepting"  # the arbiter alone is a leaf


def test_min_waiting_covers_a_worker_not_forked_yet() -> None:
    assert judge(prefork([ACCEPT_FD3]), [100]).ready
    assert judge(prefork([ACCEPT_FD3]), [100], min_waiting=2).verdict == "not-accepting"


def test_a_helper_of_another_executable_is_exempt_but_one_of_the_same_is_not() -> None:
    fake = FakeProc().process(200, PY, {3: sock(HTTP)}, syscalls=[ACCEPT_FD3], children=[201])
    fake.process(201, "/usr/bin/sleep", {3: sock(HTTP)})
    assert judge(fake, [200]).ready
    # The documented cost of the rule: a same-executable helper that never waits blocks readiness.
    fake.links["201/exe"] = PY
    readiness = judge(fake, [200])
    assert readiness.verdict == "not-accepting"
    assert readiness.pending == {201}
    assert "pid 201 (/usr/bin/python3.11)" in readiness.reason


def test_wrapper_shell_that_does_not_exec_is_exempt() -> None:
    fake = FakeProc().process(300, "/usr/bin/dash", {3: sock(HTTP)}, children=[301])
    fake.process(301, PY, {3: sock(HTTP)}, fdinfo={5: epoll_fdinfo((3, 0x19, HTTP.inode))})
    fake.links["301/fd/5"] = "anon_inode:[eventpoll]"
    assert judge(fake, [300]).ready


def test_listener_is_matched_by_inode_at_any_fd_number() -> None:
    fake = FakeProc().process(
        400,
        PY,
        {3: sock(HTTP), 17: sock(HTTP)},
        syscalls=["288 0x11 0x0 0x0 0x80800 0x0 0x0 0x1 0x2"],
    )
    assert judge(fake, [400]).waiting == {HTTP.inode: frozenset({400})}


def test_epoll_entry_counts_only_for_input_on_a_held_socket_of_sockfs() -> None:
    def one(events: int, held: bool = True, sdev: int = SOCKFS) -> bool:
        fds = {5: "anon_inode:[eventpoll]", 7: "pipe:[99]"}
        if held:
            fds[3] = sock(HTTP)
        fake = FakeProc().process(
            500, PY, fds, fdinfo={5: epoll_fdinfo((3, events, HTTP.inode), sdev=sdev)}
        )
        return judge(fake, [500]).ready

    assert one(0x19)  # EPOLLIN|EPOLLERR|EPOLLHUP, as asyncio registers
    assert one(0x40)  # EPOLLRDNORM
    assert one(0x80000001)  # EPOLLIN|EPOLLET, as Go registers
    assert not one(0x4)  # EPOLLOUT only
    assert not one(0x40000000)  # a disarmed EPOLLONESHOT entry keeps only its flag
    assert not one(0x19, held=False)  # closed its fd: the entry lives on, it cannot accept
    assert not one(0x19, sdev=0x800001)  # same inode number on another filesystem (sda1)


def test_poll_and_select_are_read_from_process_memory() -> None:
    pollfds = struct.pack("<ihhihh", 8, 0x1, 0, 3, 0x1, 0)  # a pipe and the listener
    fd_set = (1 << 3 | 1 << 8).to_bytes(8, "little")
    cases = {
        "7 0x7f0000001000 0x2 0xffffffff 0x0 0x0 0x0 0x1 0x2": "poll",
        "271 0x7f0000001000 0x2 0x0 0x0 0x8 0x0 0x1 0x2": "poll",
        "23 0x9 0x7f0000002000 0x0 0x0 0x0 0x0 0x1 0x2": "select",
        "270 0x9 0x7f0000002000 0x0 0x0 0x7ffd 0x0 0x1 0x2": "select",
    }
    for line, how in cases.items():
        fake = FakeProc().process(600, PY, {3: sock(HTTP), 8: "pipe:[1]"}, syscalls=[line])
        fake.mem[600] = [(0x7F0000001000, pollfds), (0x7F0000002000, fd_set)]
        seen = observe_tree({600: None}, KEYS, fake, "x86_64")
        assert seen.processes[600].waits == {HTTP.inode: {how}}, line


def test_select_with_nfds_below_the_listener_does_not_count() -> None:
    fake = FakeProc().process(
        601, PY, {3: sock(HTTP)}, syscalls=["270 0x3 0x7f00 0x0 0x0 0x0 0x0 0x1 0x2"]
    )
    fake.mem[601] = [(0x7F00, (1 << 3).to_bytes(8, "little"))]
    assert not judge(fake, [601]).ready


def test_aarch64_numbers_are_those_of_asm_generic() -> None:
    accept4 = "242 0x3 0x0 0x0 0x80800 0x0 0x0 0x1 0x2"
    assert judge(
        FakeProc().process(700, PY, {3: sock(HTTP)}, syscalls=[accept4]), [700], "aarch64"
    ).ready
    assert not judge(FakeProc().process(700, PY, {3: sock(HTTP)}, syscalls=[accept4]), [700]).ready
    x86_accept4 = "288 0x3 0x0 0x0 0x80800 0x0 0x0 0x1 0x2"  # is not accept4 on arm64
    fake = FakeProc().process(700, PY, {3: sock(HTTP)}, syscalls=[x86_accept4])
    assert not judge(fake, [700], "aarch64").ready
    ppoll = "73 0x7f0000001000 0x1 0x0 0x0 0x8 0x0 0x1 0x2"
    fake = FakeProc().process(701, PY, {3: sock(HTTP)}, syscalls=[ppoll])
    fake.mem[701] = [(0x7F0000001000, struct.pack("<ihh", 3, 0x1, 0))]
    assert judge(fake, [701], "aarch64").ready
    pselect6 = "72 0x4 0x7f0000002000 0x0 0x0 0x0 0x0 0x1 0x2"
    fake = FakeProc().process(702, PY, {3: sock(HTTP)}, syscalls=[pselect6])
    fake.mem[702] = [(0x7F0000002000, (1 << 3).to_bytes(8, "little"))]
    assert judge(fake, [702], "aarch64").ready
    recvfrom = "207 0x4 0x0 0x0 0x0 0x0 0x0 0x1 0x2"
    fake = FakeProc().process(703, PY, {4: sock(UDP)}, syscalls=[recvfrom])
    assert judge(fake, [703], "aarch64").ready


def test_datagram_listener_counts_when_read_and_a_stream_one_does_not() -> None:
    fake = FakeProc().process(
        800,
        PY,
        {3: sock(HTTP), 4: sock(UDP)},
        syscalls=[
            "45 0x4 0x7f 0x10 0x0 0x0 0x0 0x1 0x2",  # recvfrom(dns)
            "0 0x3 0x7f 0x10 0x0 0x0 0x0 0x1 0x2",  # read(http): reading a listener is no accept
        ],
    )
    assert judge(fake, [800]).waiting == {UDP.inode: frozenset({800})}
    fake = FakeProc().process(
        801, PY, {4: sock(UDP)}, syscalls=["43 0x4 0x0 0x0 0x0 0x0 0x0 0x1 0x2"]
    )
    assert not judge(fake, [801]).ready  # accept on a datagram socket waits on nothing


def test_threads_are_scanned_one_by_one() -> None:
    fake = FakeProc().process(900, PY, {3: sock(HTTP)}, syscalls=[SLEEPING, "running", ACCEPT_FD3])
    assert judge(fake, [900]).ready


# -- what cannot be observed ---------------------------------------------------------------------


def test_no_proc_is_unobservable_with_the_reason() -> None:
    fake = FakeProc(unavailable_reason="not Linux (sys.platform='darwin')")
    readiness = judge(fake, [1])
    assert readiness.verdict == "unobservable"
    assert "darwin" in readiness.reason


def test_io_uring_makes_a_silent_worker_unobservable_but_not_a_waiting_one() -> None:
    fake = prefork([ACCEPT_FD3, SLEEPING])
    fake.links["102/fd/9"] = "anon_inode:[io_uring]"
    readiness = judge(fake, [100])
    assert readiness.verdict == "unobservable"
    assert "io_uring" in readiness.reason
    fake = prefork([ACCEPT_FD3, ACCEPT_FD3])
    fake.links["102/fd/9"] = "anon_inode:[io_uring]"
    assert judge(fake, [100]).ready


def test_permission_denied_is_unobservable_never_a_guess() -> None:
    fake = prefork([ACCEPT_FD3, SLEEPING])
    fake.errors["102/task/102/syscall"] = "EACCES"
    readiness = judge(fake, [100])
    assert readiness.verdict == "unobservable"
    assert "ptrace" in readiness.reason
    fake = prefork([SLEEPING])
    fake.errors["101/fd"] = "EACCES"
    assert judge(fake, [100]).verdict == "unobservable"


def test_poll_array_unreadable_is_unobservable() -> None:
    fake = FakeProc().process(
        610, PY, {3: sock(HTTP)}, syscalls=["7 0x7f0000001000 0x1 0xffffffff 0x0 0x0 0x0 0x1 0x2"]
    )
    fake.errors["610/mem"] = "EACCES"
    assert judge(fake, [610]).verdict == "unobservable"
    del fake.errors["610/mem"]  # the array went away (EIO): simply not waiting
    assert judge(fake, [610]).verdict == "not-accepting"


def test_unknown_architecture_still_sees_epoll() -> None:
    fake = FakeProc().process(
        620,
        PY,
        {3: sock(HTTP), 5: "anon_inode:[eventpoll]"},
        fdinfo={5: epoll_fdinfo((3, 1, HTTP.inode))},
    )
    assert judge(fake, [620], arch="s390x").ready
    fake = FakeProc().process(621, PY, {3: sock(HTTP)}, syscalls=[ACCEPT_FD3])
    readiness = judge(fake, [621], arch="s390x")
    assert readiness.verdict == "unobservable"
    assert "s390x" in readiness.reason


# -- the tree ------------------------------------------------------------------------------------


def test_tree_walk_follows_every_thread_and_skips_what_vanished() -> None:
    fake = FakeProc().process(10, children=[11])
    fake.process(11, syscalls=[SLEEPING, SLEEPING])
    fake.files["11/task/10011/children"] = "12 13"  # forked by the second thread
    fake.process(12)
    fake.errors["13/task"] = "ESRCH"  # exited mid-scan
    assert walk_tree([10], fake) == {10: None, 11: 10, 12: 11}
    assert process_tree(10, fake) == [10, 11, 12]


def test_tree_from_several_roots_keeps_parents_found_below() -> None:
    fake = FakeProc().process(20, children=[21]).process(21).process(30)  # 30: reparented orphan
    assert walk_tree([21, 30, 20], fake) == {20: None, 21: 20, 30: None}


def test_process_gone_between_walk_and_observation_is_left_out() -> None:
    fake = prefork([ACCEPT_FD3, ACCEPT_FD3])
    tree = walk_tree([100], fake)
    fake.errors["102/fd"] = "ENOENT"
    fake.errors["102/exe"] = "ENOENT"
    seen = observe_tree(tree, KEYS, fake, "x86_64")
    assert sorted(seen.processes) == [100, 101]
    assert judge_readiness(seen, KEYS).ready


def test_empty_tree_and_tree_without_holders_are_not_accepting() -> None:
    assert "no process of the tree is alive" in judge_readiness(TreeObservation({}), KEYS).reason
    readiness = judge(FakeProc().process(40), [40])
    assert readiness.verdict == "not-accepting"
    assert "no process holds a listener yet" in readiness.reason


def test_recorded_fixtures_exist() -> None:
    assert len(FIXTURE_NAMES) >= 9
    meta = json.loads((FIXTURES / "node_http.json").read_text())["meta"]
    assert meta["arch"] == "x86_64"
