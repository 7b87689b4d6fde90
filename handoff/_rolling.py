"""Bringing up an upgrade's new generation: all at once, or rolling ``max_surge`` at a time.

``all-at-once`` (the default) starts every worker of N+1, waits until each is ready, then holds
(both generations serve for ``hold`` seconds): it needs twice the workers for a moment.

``rolling`` is for memory-tight hosts. With ``processes = P`` and ``max_surge = k``, N+1 starts
with its first k slots only; once they are ready and their hold has passed, k workers of N are
retired (stop signal, ``drain_timeout``, SIGKILL) and waited for until their whole trees have
exited; then the next k slots of N+1 start, and so on. At no moment do more than P + k worker
process trees exist, draining ones included. N+1 becomes current when its last batch has held,
and what is left of N drains.

A failure in any batch (a new worker exits, misses ``ready_timeout``, or fails its hold) stops
every worker of N+1 like a failed start and then *rolls back*: the slots of N that were retired
start again, with N's own program, so N serves with all its workers as before the upgrade. The
outcome says which batch failed and how many workers had been replaced. While N+1's workers
drain and N's come back, fewer than P workers serve for a moment: the accept queue holds what
arrives (nothing is refused, as the listeners never close).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from ._errors import HandoffError, SpawnError, UpgradeError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._config import LoadedConfig
    from ._generation import Generation
    from ._generation_set import GenerationSet
    from ._listeners import Listener
    from ._phases import Phase


async def bring_up(
    gens: GenerationSet,
    nursery: trio.Nursery,
    loaded: LoadedConfig,
    listeners: Mapping[str, Listener],
    *,
    on_created: Callable[[Generation], None],
    phase: Callable[[str, str | None], None] | None,
    to_phase: Callable[[Phase], None],
    stopping: Callable[[], bool],
) -> Generation:
    """Start N+1 per ``program.strategy`` and return it once it has served through its hold.

    The fd set is ``listeners`` in the config's order (fds 3..) under the config's names (a
    reused socket may be renamed). ``phase`` reports progress to an upgrade's callers (None:
    generation 1, which has nothing to hold against), ``to_phase`` moves the supervisor's phase
    machine. Every worker of a generation that will not serve has exited when this raises.

    Raises:
        HandoffError: N+1 cannot serve (N serves on, with all its workers).
    """
    program = loaded.config.program
    fdset = [(lc.name, listeners[lc.name]) for lc in loaded.config.listener]
    if phase is None:
        return await gens.start(nursery, program, loaded.config.supervisor, fdset, on_created)
    rolling = program.strategy == "rolling" and program.max_surge < program.processes
    if rolling and gens.current is not None:
        return await _roll(gens, nursery, loaded, fdset, on_created, phase, to_phase, stopping)
    gen = await gens.start(nursery, program, loaded.config.supervisor, fdset, on_created)
    phase("ready", f"generation {gen.number} pids {gen.pids()}")
    await _hold(gens, gen, program.hold, phase, to_phase, stopping)
    return gen


async def _hold(
    gens: GenerationSet,
    gen: Generation,
    seconds: float,
    phase: Callable[[str, str | None], None],
    to_phase: Callable[[Phase], None],
    stopping: Callable[[], bool],
) -> None:
    to_phase("holding")
    if seconds > 0:
        phase("holding", f"{seconds:.1f}s")
    lost = await gens.hold(gen, seconds, stopping=stopping())
    if lost is not None:
        phase("stopping", f"generation {gen.number}")
        await gens.stop_failed(gen)
        raise UpgradeError(lost)


async def _roll(
    gens: GenerationSet,
    nursery: trio.Nursery,
    loaded: LoadedConfig,
    fdset: Sequence[tuple[str, Listener]],
    on_created: Callable[[Generation], None],
    phase: Callable[[str, str | None], None],
    to_phase: Callable[[Phase], None],
    stopping: Callable[[], bool],
) -> Generation:
    old = gens.current
    assert old is not None
    program = loaded.config.program
    total, surge = program.processes, program.max_surge
    batches = math.ceil(total / surge)
    replaced = 0
    batch = 1
    gen: Generation | None = None
    try:
        phase("rolling", f"{batches} batches of {surge} (max_surge), {total} workers")
        gen = await gens.start(
            nursery, program, loaded.config.supervisor, fdset, on_created, enabled=surge
        )
        while True:
            phase("ready", f"batch {batch} of {batches}: generation {gen.number} pids {gen.pids()}")
            await _hold(gens, gen, program.hold, phase, to_phase, stopping)
            done = min(batch * surge, total)
            replaced += await _retire(old, done - replaced if done < total else len(old.slots))
            if done >= total:
                return gen
            batch += 1
            to_phase("waiting_ready")
            gen.enable(min(batch * surge, total))
            phase("spawning", f"batch {batch} of {batches}: workers {done}..{gen.enabled - 1}")
            await _wait_batch(gen, program.ready_timeout)
    except HandoffError as exc:
        if gen is not None:
            await gens.stop_failed(gen)
        old.recall()
        raise UpgradeError(
            f"rolling upgrade failed in batch {batch} of {batches}: {exc}; the {replaced} "
            f"worker(s) of generation {old.number} it had replaced were started again"
        ) from exc
    except BaseException:
        old.recall()  # cancelled (handoffd exits): N's slots must not stay retired meanwhile
        raise


async def _retire(old: Generation, count: int) -> int:
    """Retire up to ``count`` slots of ``old`` (highest first), stopping their workers; how many."""
    # Slots in crash backoff (no process) count too: left alone they would restart mid-roll.
    chosen = [s for s in reversed(old.slots) if not s.retired][: max(count, 0)]
    async with trio.open_nursery() as nursery:
        for slot in chosen:
            nursery.start_soon(old.retire, slot)
    return len(chosen)


async def _wait_batch(gen: Generation, ready_timeout: float) -> None:
    """Until the enabled slots are ready; a stop fails the generation (``abort``) meanwhile."""
    with trio.move_on_after(ready_timeout):
        while not gen.batch_ready() and gen.failure is None:
            await gen.wait_changed()
    if gen.failure is not None:
        raise SpawnError(gen.failure)
    if not gen.batch_ready():
        waiting = [s.index for s in gen.slots[: gen.enabled] if not s.ever_ready]
        raise SpawnError(
            f"workers {waiting} were not ready within program.ready_timeout = {ready_timeout:g}s"
        )
