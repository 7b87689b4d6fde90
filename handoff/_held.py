"""The one owner of the listening sockets handoffd holds: open, plan, commit, roll back, retire.

The supervisor holds every listener for its whole life; generations only receive copies at
spawn. An upgrade first *plans* the listeners its new config wants (``plan``: held sockets are
reused by address, the rest bound fresh), and then either *commits* the plan once the new
generation serves (renames, backlog changes and fd-store updates are applied, listeners that
left the config are *retired*: closed once no generation that used them remains) or *rolls it
back* (the fresh sockets are closed; nothing held was changed).

Design notes:
- Never close a held listener while a generation may use it: the kernel's accept queue lives on
  it, and closing it would reset every connection waiting there.
- A held socket is reused when its address is unchanged, even under a new name: binding the
  same address again would fail (or, for a Unix path, unlink the path the current generation
  serves on).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from ._errors import ListenerError
from ._launchd import launchd_sockets
from ._listen_fds import InheritedFd, parse_listen_fds
from ._listeners import Listener, adopt_inherited, bind_listener

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._config import ListenerConfig, LoadedConfig
    from ._generation import Generation
    from ._launchd import LaunchdLibrary
    from ._systemd import SystemdNotifier

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# How often listeners are checked while a generation starts, holds or drains (a getsockopt
# each): a listener a worker shut down refuses connections until the next check.
GUARD_INTERVAL_S: Final = 0.02


@final
@dataclass
class ListenerPlan:
    """What an upgrade's config wants: every listener by name, and what changes on commit."""

    wanted: dict[str, Listener]
    fresh: list[Listener] = field(default_factory=list)
    updates: list[tuple[Listener, ListenerConfig]] = field(default_factory=list)


@final
class HeldListeners:
    """The listeners handoffd holds, by name, and those retired but still in use."""

    def __init__(self, systemd: SystemdNotifier) -> None:
        self.by_name: dict[str, Listener] = {}
        # Names of listeners that left the config, closed once no generation uses them.
        self.retired: set[str] = set()
        self.systemd = systemd

    def values(self) -> list[Listener]:
        return list(self.by_name.values())

    def ordered(self, loaded: LoadedConfig) -> list[Listener]:
        """The held listeners in the config's order (the fd set's order: fds 3..)."""
        return [self.by_name[lc.name] for lc in loaded.config.listener]

    def adopt(self, listeners: Mapping[str, Listener]) -> None:
        """Hold ``listeners`` (opened at start, or handed over) and record them with systemd."""
        self.by_name = dict(listeners)
        for li in self.by_name.values():
            # After a handover these are stored already (systemd ignores a duplicate fd);
            # storing them again records them as ours for FDSTOREREMOVE.
            self.systemd.store_fd(li.name, li.fd)

    def plan(self, loaded: LoadedConfig) -> ListenerPlan:
        """Reuse every held socket whose address is still configured; bind the rest.

        Nothing held is changed; ``commit`` applies the plan, ``roll_back`` undoes it.

        Raises:
            ListenerError: a new listener cannot be bound (those bound so far are closed).
        """
        plan = ListenerPlan(wanted={})
        held = self.values()
        with ExitStack() as cleanup_on_fail:
            for config in loaded.config.listener:
                existing = self._reusable(config, held, plan)
                if existing is not None:
                    plan.wanted[config.name] = existing
                    if existing.config != config:
                        plan.updates.append((existing, config))
                    continue
                listener = self._bind(config, held)
                cleanup_on_fail.callback(listener.close)
                plan.wanted[config.name] = listener
                plan.fresh.append(listener)
            cleanup_on_fail.pop_all()
        return plan

    def _reusable(
        self, config: ListenerConfig, held: Sequence[Listener], plan: ListenerPlan
    ) -> Listener | None:
        address = config.parsed_address
        existing = self.by_name.get(config.name)
        if existing is not None and existing.config.parsed_address != address:
            existing = None
        if existing is None and (address.is_unix or address.port != 0):
            # The same concrete address under a new name: the same socket.
            existing = next((li for li in held if li.config.parsed_address == address), None)
        if existing is not None and any(existing is li for li in plan.wanted.values()):
            return None
        return existing

    @staticmethod
    def _bind(config: ListenerConfig, held: Sequence[Listener]) -> Listener:
        address = config.parsed_address
        try:
            return bind_listener(config)
        except ListenerError as exc:
            clash = next(
                (
                    li
                    for li in held
                    if not address.is_unix
                    and li.config.parsed_address.kind == address.kind
                    and li.config.parsed_address.port == address.port
                ),
                None,
            )
            if clash is None:
                raise
            raise ListenerError(
                f"{exc}; handoffd itself holds port {address.port} as listener "
                f"{clash.name!r} ({clash.config.address}): moving a listener to another "
                "host on the same port needs a restart of handoffd"
            ) from exc

    def roll_back(self, plan: ListenerPlan) -> None:
        """The upgrade failed: close what it bound; what we hold is unchanged."""
        for li in plan.fresh:
            li.close()

    def commit(
        self, plan: ListenerPlan, users: Sequence[Generation], nursery: trio.Nursery
    ) -> None:
        """The upgrade succeeded: hold the plan's listeners; retire those it dropped.

        ``users`` are the generations that may still use a dropped listener (the draining
        ones): it is closed once they have stopped.
        """
        kept = {id(li) for li in plan.wanted.values()}
        retired = [li for li in self.by_name.values() if id(li) not in kept]
        for listener, config in plan.updates:
            if listener.name != config.name:
                self.systemd.remove_fd(listener.name, listener.fd)
                self.systemd.store_fd(config.name, listener.fd)
                log.info("listener.renamed", listener=config.name, was=listener.name)
            listener.apply(config)
        self.by_name = dict(plan.wanted)
        for li in plan.fresh:
            self.systemd.store_fd(li.name, li.fd)
        if retired:
            self.retired.update(li.name for li in retired)
            nursery.start_soon(self._close_retired, retired, list(users))
        for gen in users:
            nursery.start_soon(self.guard, gen.stopped)

    async def _close_retired(self, retired: list[Listener], users: list[Generation]) -> None:
        for gen in users:
            await gen.stopped.wait()
        for li in retired:
            log.info("listener.closed", listener=li.name, address=li.bound_address())
            self.systemd.remove_fd(li.name, li.fd)
            self.retired.discard(li.name)
            li.close()

    async def forget_retired(self, users: Sequence[Generation]) -> None:
        """Listeners retired under the previous supervisor (we have no fd): drop them from
        systemd's fd store once the generations that used them have stopped."""
        names = sorted(self.retired)
        if not names:
            return
        for gen in users:
            await gen.stopped.wait()
        for name in names:
            if name not in self.by_name:
                log.info("listener.closed", listener=name)
                self.systemd.remove_fd(name)
                self.retired.discard(name)

    def revive_dead(self) -> list[str]:
        """Make every held listener someone shut down listen again; the names that cannot."""
        return [li.name for li in self.by_name.values() if not li.revive()]

    async def guard(self, until: trio.Event, on_check: Callable[[], object] | None = None) -> None:
        """Check the listeners every ``GUARD_INTERVAL_S`` until ``until`` is set.

        Runs while a generation starts, holds or drains: those are the moments a worker's
        shutdown(2) of its inherited listener would turn an upgrade into an outage. Polling,
        because the kernel offers no event for it; an idle supervisor runs none. ``on_check``
        runs at each check too (the metrics' accept-queue sampling rides on this one poll).
        """
        while True:
            self.revive_dead()
            if on_check is not None:
                on_check()
            if until.is_set():
                return  # after one last check: the fault often comes with a worker's exit
            with trio.move_on_after(GUARD_INTERVAL_S):
                await until.wait()

    def close_all(self, *, unlink: bool) -> None:
        """Close every held listener; ``unlink``: remove the socket files we bound (not after a
        handover: the successor serves on them)."""
        for li in self.by_name.values():
            li.close(unlink=unlink)


def open_listeners(
    loaded: LoadedConfig,
    environ: Mapping[str, str],
    systemd: SystemdNotifier | None = None,
    launchd: LaunchdLibrary | None = None,
    taken: Mapping[str, Listener] | None = None,
) -> dict[str, Listener]:
    """Inherit what the service manager passed (by name, then by address), bind the rest.

    ``taken`` are listeners already held by name (taken back from orphans, ``_custody``); this
    owns them from the call on: what an inherited fd of the same name shadows is closed.

    systemd's LISTEN_FDS come first; without them, on macOS, launchd is asked for a socket
    named like each listener (``launchd`` injects its library, for tests on Linux).

    An unclaimed fd that is closed is also removed from systemd's fd store: after a crash the
    store may still hold a listener that an upgrade dropped, and it would stay bound (accepting
    into a queue nobody serves) for as long as the unit runs.

    Raises:
        ListenerError: the inherited fds are unusable, or a listener cannot be bound.
    """
    config = loaded.config
    inherited = _inherited(loaded, environ, launchd)
    claimed, unclaimed = adopt_inherited(config.listener, _without_duplicates(inherited))
    for item in unclaimed:
        if config.supervisor.keep_unclaimed:
            os.set_inheritable(item.fd, False)  # kept by us, not passed to every worker
            log.info("listener.unclaimed_kept", fd=item.fd, fdname=item.name)
        else:
            log.warning(
                "listener.unclaimed_closed",
                fd=item.fd,
                fdname=item.name,
                hint="add a [[listener]] with this name, or set keep_unclaimed = true",
            )
            os.close(item.fd)
            if systemd is not None:
                systemd.remove_fd(item.name)
    result: dict[str, Listener] = {}
    taken = dict(taken or {})
    with ExitStack() as cleanup_on_fail:
        for li in [*claimed.values(), *taken.values()]:
            cleanup_on_fail.callback(li.close)
        for lc in config.listener:
            if lc.name in claimed:
                result[lc.name] = claimed[lc.name]
                continue
            if lc.name in taken:
                result[lc.name] = taken.pop(lc.name)
                continue
            listener = bind_listener(lc)
            cleanup_on_fail.callback(listener.close)
            result[lc.name] = listener
        cleanup_on_fail.pop_all()
    for li in taken.values():  # shadowed by what the service manager passed
        li.close()
    return result


def _inherited(
    loaded: LoadedConfig, environ: Mapping[str, str], launchd: LaunchdLibrary | None
) -> list[InheritedFd]:
    try:
        inherited = parse_listen_fds(environ, os.getpid())
    except ValueError as exc:
        raise ListenerError(f"cannot use the fds passed by the service manager: {exc}") from exc
    if inherited is None and "LISTEN_FDS" in environ:
        log.warning(
            "systemd.listen_fds_ignored",
            listen_pid=environ.get("LISTEN_PID"),
            pid=os.getpid(),
            reason="LISTEN_PID names another process",
        )
    if inherited is None:
        names = [lc.name for lc in loaded.config.listener]
        from_launchd = launchd_sockets(names, library=launchd)
        if from_launchd:
            inherited = [InheritedFd(fd=fd, name=name) for name, fd in from_launchd]
            log.info("launchd.sockets_inherited", names=sorted({n for n, _ in from_launchd}))
    return inherited or []


def _without_duplicates(inherited: list[InheritedFd]) -> list[InheritedFd]:
    """Drop (and close) fds that are another copy of an earlier one.

    With a .socket unit and the fd store together, systemd can pass the same socket twice
    (the socket unit's fd and the stored copy) after a restart.
    """
    seen: set[tuple[int, int]] = set()
    unique: list[InheritedFd] = []
    for item in inherited:
        st = os.fstat(item.fd)
        if (st.st_dev, st.st_ino) in seen:
            log.info("listener.duplicate_closed", fd=item.fd, fdname=item.name)
            os.close(item.fd)
            continue
        seen.add((st.st_dev, st.st_ino))
        unique.append(item)
    return unique
