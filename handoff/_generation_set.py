"""The generations a supervisor runs: the current one, those draining, the one starting.

The supervisor decides *when* a generation starts, becomes current or drains; this owner does
it: it builds each generation's spec (fd set, environment, notify directory, spawner), starts it
in the supervisor's nursery, moves the current one to draining when a new one is promoted, and
forgets a draining one once its last process has gone.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, final

import structlog
import trio

from ._errors import SpawnError
from ._generation import Generation, GenerationSpec, run_adopted_generation, run_generation
from ._limits import WORKER_NOFILE_ENV, current_soft_limit
from ._observe import listener_keys
from ._processes import REAP_TIMEOUT_S
from ._readiness import probe_proc
from ._spawn import NOFILE_ENV
from ._systemd import clean_worker_environ

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._config import ProgramConfig, SupervisorConfig
    from ._generation import ParkedFds, WorkerCounters
    from ._handover import AdoptedGeneration
    from ._listeners import Listener
    from ._processes import Spawner
    from ._readiness import ReadinessProbe

log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


@final
class GenerationSet:
    """Every live generation of one supervisor, and the numbering of the next."""

    def __init__(
        self,
        *,
        parked: ParkedFds,
        notify_dir: Path,
        environ: Mapping[str, str],
        spawner: Spawner,
        on_drained: Callable[[], None],
        probe: ReadinessProbe = probe_proc,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.parked = parked
        self.counters = counters
        self.notify_dir = notify_dir
        self.environ = _worker_environ(environ)
        self.spawner = spawner
        self.probe = probe
        self.current: Generation | None = None
        self.draining: list[Generation] = []
        # The generation being started (1, or N+1 of an upgrade) or in its canary hold: a stop
        # aborts it gracefully.
        self.starting: Generation | None = None
        self.holding: Generation | None = None
        self.rolling: Generation | None = None
        self.next_number = 1
        self._on_drained = on_drained
        #: Called when what is supervised changed: a worker spawned or adopted, a generation
        #: promoted, adopted or drained (``_custody`` keeps its record current with it).
        self.on_change: Callable[[], None] = lambda: None

    def all(self) -> list[Generation]:
        """The live generations: the current one first, then those still draining."""
        return ([self.current] if self.current else []) + self.draining

    def number(self) -> int:
        return self.current.number if self.current else 0

    async def start(
        self,
        nursery: trio.Nursery,
        program: ProgramConfig,
        supervisor: SupervisorConfig,
        fdset: Sequence[tuple[str, Listener]],
        on_created: Callable[[Generation], None],
        enabled: int | None = None,
    ) -> Generation:
        """Start the next generation in ``nursery`` and return it once every worker is ready.

        ``enabled``: start only that many slots (a rolling upgrade's first batch); the
        generation stays ``rolling`` (a stop aborts it) until it is promoted or discarded.

        Raises:
            SpawnError: it could not become ready (it has been stopped like a drain).
        """
        spec = self._spec(self.next_number, program, supervisor, fdset)
        self.next_number += 1
        if self.counters is not None:
            self.counters.generation_created()

        def created(gen: Generation) -> None:
            self.starting = gen
            if enabled is not None:
                gen.enabled = enabled
                self.rolling = gen
            on_created(gen)

        try:
            gen: Generation = await nursery.start(
                partial(run_generation, on_created=created), spec, self.parked
            )
        finally:
            self.starting = None
        nursery.start_soon(self._forget_when_stopped, gen)
        # The readiness gate: a generation whose listener a worker shut down (and that cannot
        # be revived) would be "ready" on a port that refuses every connection.
        dead = [name for name, li in fdset if not li.revive()]
        if dead:
            gen.request_drain()
            raise SpawnError(
                f"listener {', '.join(map(repr, dead))} stopped listening (a worker called "
                "shutdown(2) on it) and could not be made to listen again; see the log"
            )
        return gen

    def abort_new(self, reason: str) -> None:
        """Give up on the generation starting or holding (a stop): it drains, N is untouched."""
        for gen in (self.starting, self.rolling):
            if gen is not None:
                gen.abort(reason)
        if self.holding is not None:
            self.holding.lose_hold(reason)

    async def hold(self, gen: Generation, seconds: float, *, stopping: bool) -> str | None:
        """The canary hold: ``gen`` and the current generation serve side by side for
        ``seconds``; returns why ``gen`` failed meanwhile (a worker exited, or its tree stopped
        holding or waiting on the listeners; see ``Generation.begin_hold``), or None."""
        if seconds <= 0:
            return None
        self.holding = gen
        gen.begin_hold(seconds)
        if stopping:
            gen.lose_hold("handoffd is stopping")
        try:
            with trio.move_on_after(seconds):
                await gen.hold_lost.wait()
        finally:
            gen.end_hold()
            self.holding = None
        return gen.hold_failure

    async def stop_failed(self, gen: Generation) -> None:
        """Drain a generation that started but will not serve, and wait until it is gone."""
        self.discard(gen)
        with trio.move_on_after(gen.spec.program.drain_timeout + REAP_TIMEOUT_S):
            await gen.stopped.wait()

    def discard(self, gen: Generation) -> None:
        """Stop a generation that started but will not serve (its hold failed): it drains."""
        if self.rolling is gen:
            self.rolling = None
        if gen is not self.current and gen not in self.draining:
            self.draining.append(gen)
        gen.request_drain()

    def generation_of_group(self, pgid: int | None) -> int | None:
        """The generation whose worker leads process group ``pgid`` (orphan attribution)."""
        for gen in self.all():
            if pgid is not None and gen.owns_group(pgid):
                return gen.number
        return None

    def promote(self, gen: Generation) -> Generation | None:
        """Make ``gen`` current; the previous current one drains. Returns that one."""
        old, self.current = self.current, gen
        if self.rolling is gen:
            self.rolling = None
        if old is not None:
            self.draining.append(old)
            old.request_drain()
        self.on_change()
        return old

    async def adopt(
        self,
        nursery: trio.Nursery,
        handed: Sequence[AdoptedGeneration],
        current: int | None,
        supervisor: SupervisorConfig,
        listeners: Mapping[str, Listener],
    ) -> None:
        """Supervise the generations a previous supervisor handed over, as they were."""
        for adopted in handed:
            fdset = [(n, listeners[n]) for n in adopted.listeners if n in listeners]
            spec = self._spec(adopted.number, adopted.program, supervisor, fdset)
            gen: Generation = await nursery.start(
                partial(
                    run_adopted_generation,
                    spec,
                    self.parked,
                    adopted.workers,
                    draining=adopted.draining,
                    drain_remaining=adopted.drain_remaining,
                )
            )
            nursery.start_soon(self._forget_when_stopped, gen)
            if adopted.number == current and not adopted.draining:
                self.current = gen
            else:
                self.draining.append(gen)
            self.on_change()

    def live_workers(self) -> int:
        """Worker processes alive in any generation, including one starting or holding."""
        gens = {id(g): g for g in [*self.all(), self.starting, self.holding] if g is not None}
        return sum(
            1
            for g in gens.values()
            for s in g.slots
            if s.process is not None and s.process.returncode is None
        )

    def numbers(self) -> str:
        return ", ".join(str(g.number) for g in self.all())

    async def drain_all(self, grace: float) -> None:
        """Drain every generation (a stop) and wait up to ``grace`` seconds for the last to end."""
        gens = self.all()
        for gen in gens:
            gen.request_drain()
        with trio.move_on_after(grace):
            for gen in gens:
                await gen.stopped.wait()

    def thaw(self, gens: Sequence[Generation]) -> None:
        """A handover failed: ``gens`` are ours again (supervised, notify sockets read)."""
        for gen in gens:
            gen.thaw()

    def kill_all(self) -> None:
        """SIGKILL every worker of every generation (a second stop signal: stop *now*)."""
        for gen in self.all():
            for proc in gen.spawned:
                proc.signal_group(signal.SIGKILL)
                proc.kill()

    async def _forget_when_stopped(self, gen: Generation) -> None:
        await gen.stopped.wait()
        if gen in self.draining:
            self.draining.remove(gen)
            log.info("generation.drained", generation=gen.number)
            self._on_drained()
            self.on_change()

    def _spec(
        self,
        number: int,
        program: ProgramConfig,
        supervisor: SupervisorConfig,
        fdset: Sequence[tuple[str, Listener]],
    ) -> GenerationSpec:
        compat: dict[str, str] = {}
        if fdset:
            compat["EINHORN_FDS"] = " ".join(str(3 + i) for i in range(len(fdset)))
            compat["SERVER_STARTER_PORT"] = ";".join(
                f"{_starter_address(li)}={3 + i}" for i, (_, li) in enumerate(fdset)
            )
        return GenerationSpec(
            number=number,
            program=program,
            listeners=tuple((name, li.fd) for name, li in fdset),
            environ=self.environ,
            notify_dir=self.notify_dir,
            backoff_initial=supervisor.restart_backoff_initial,
            backoff_max=supervisor.restart_backoff_max,
            compat_environ=compat,
            spawner=self.spawner,
            listener_keys=listener_keys({name: li.sock for name, li in fdset}),
            probe=self.probe,
            live_workers=self.live_workers,
            counters=self.counters,
            on_spawned=lambda: self.on_change(),
        )


def _starter_address(listener: Listener) -> str:
    """The address as Server::Starter's ``SERVER_STARTER_PORT`` writes it."""
    addr = listener.bound_address()
    return (
        addr.split(":", 1)[1]
        if addr.startswith(("unix:", "unixgram:"))
        else addr.removeprefix("udp://")
    )


def _worker_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Our environment as workers get it: systemd's variables removed, the fd limit handoffd
    was started with (see ``_limits``), the venv on PATH."""
    result = clean_worker_environ(environ)
    nofile = result.pop(WORKER_NOFILE_ENV, None)
    if nofile is not None and nofile != str(current_soft_limit()):
        result[NOFILE_ENV] = nofile
    if sys.prefix != sys.base_prefix:
        # Run from a virtualenv: let workers find its interpreter and scripts as if the venv
        # were activated, so `command = ["python", ...]` means this venv's python.
        bindir = str(Path(sys.executable).parent)
        path = result.get("PATH", os.defpath)
        if bindir not in path.split(":"):
            result["PATH"] = f"{bindir}:{path}"
    return result
