"""The generations a supervisor runs: the current one, those draining, the one starting.

The supervisor decides *when* a generation starts, becomes current or drains; this owner does
it: it builds each generation's spec (fd set, environment, notify directory, spawner), starts it
in the supervisor's nursery, moves the current one to draining when a new one is promoted, and
forgets a draining one once its last process has gone.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, final

import structlog
import trio

from ._generation import Generation, GenerationSpec, run_adopted_generation, run_generation
from ._systemd import clean_worker_environ

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._config import ProgramConfig, SupervisorConfig
    from ._generation import ParkedFds
    from ._handover import AdoptedGeneration
    from ._listeners import Listener
    from ._processes import Spawner

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
    ) -> None:
        self.parked = parked
        self.notify_dir = notify_dir
        self.environ = _worker_environ(environ)
        self.spawner = spawner
        self.current: Generation | None = None
        self.draining: list[Generation] = []
        # The generation being started (1, or N+1 of an upgrade): a stop aborts it gracefully.
        self.starting: Generation | None = None
        self.next_number = 1
        self._on_drained = on_drained

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
    ) -> Generation:
        """Start the next generation in ``nursery`` and return it once every worker is ready.

        Raises:
            SpawnError: it could not become ready (it has been stopped like a drain).
        """
        spec = self._spec(self.next_number, program, supervisor, fdset)
        self.next_number += 1

        def created(gen: Generation) -> None:
            self.starting = gen
            on_created(gen)

        try:
            gen: Generation = await nursery.start(
                partial(run_generation, on_created=created), spec, self.parked
            )
        finally:
            self.starting = None
        nursery.start_soon(self._forget_when_stopped, gen)
        return gen

    def promote(self, gen: Generation) -> Generation | None:
        """Make ``gen`` current; the previous current one drains. Returns that one."""
        old, self.current = self.current, gen
        if old is not None:
            self.draining.append(old)
            old.request_drain()
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
            for slot in gen.slots:
                if slot.process is not None:
                    slot.process.kill()

    async def _forget_when_stopped(self, gen: Generation) -> None:
        await gen.stopped.wait()
        if gen in self.draining:
            self.draining.remove(gen)
            log.info("generation.drained", generation=gen.number)
            self._on_drained()

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
    """Our environment as workers get it: systemd's variables removed, the venv on PATH."""
    result = clean_worker_environ(environ)
    if sys.prefix != sys.base_prefix:
        # Run from a virtualenv: let workers find its interpreter and scripts as if the venv
        # were activated, so `command = ["python", ...]` means this venv's python.
        bindir = str(Path(sys.executable).parent)
        path = result.get("PATH", os.defpath)
        if bindir not in path.split(":"):
            result["PATH"] = f"{bindir}:{path}"
    return result
