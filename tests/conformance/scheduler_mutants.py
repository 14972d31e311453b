"""Planted bugs in the engine's scheduler, for the scheduler mutant tests.

Each mutant subclasses ``fast.engine.scheduler.Scheduler`` and changes one decision; the
conformance driver (``conformance.scheduler.run``) must see it differ from the spec scheduler.
``SCHEDULER_MUTANTS`` maps a name to a factory with the ``SchedulerFactory`` signature. These
are test material, not part of the ``conformance`` package.
"""

from __future__ import annotations

from typing import Any

from conformance.scheduler.protocol import FastSchedulerAdapter
from fast.engine.scheduler import Scheduler as FastScheduler
from fast.engine.sequence import Sequence, SequenceStatus
from spec.scheduler import SchedulerConfig

__all__ = ["SCHEDULER_MUTANTS", "FastOverSpecBM", "scheduler_mutant"]


class FastOverSpecBM(FastSchedulerAdapter):
    """The fast scheduler over the spec block manager (mutants plant bugs in the scheduler)."""

    block_manager_name = "spec"


class OldestVictim(FastScheduler):
    """Preempts the oldest unscheduled running sequence instead of the newest."""

    def _newest_unscheduled(self, step: Any, exclude: Sequence) -> Sequence | None:
        for seq in self.running:
            if seq is not exclude and seq.seq_id not in step.done:
                return seq
        return None


class NoFrontRequeue(FastScheduler):
    """A preempted sequence goes to the back of the waiting queue, not back in arrival order."""

    def _preempt(self, step: Any, seq: Sequence) -> None:
        seq.arrival += 1 << 40
        super()._preempt(step, seq)


class ForkToBack(FastScheduler):
    """A forked child goes to the back of the running queue, not right after its parent."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.arrival += 1 << 40
        super().fork(parent, child)


class ForkWithoutSharing(FastScheduler):
    """``fork`` gives the child fresh blocks instead of raising the parent's refcounts."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.block_manager.allocate(child.seq_id, child.token_ids[:-1])
        child.num_computed = parent.num_computed
        child.in_pool = child.pending = True
        self.seqs[child.seq_id] = child
        self._enqueue(self.running, child, SequenceStatus.RUNNING)


class SwapInIgnoresAppend(FastScheduler):
    """Swap-in capacity ignores the token about to be appended."""

    def _schedule_swapped(self, step: Any) -> None:
        bm = self.block_manager
        real = bm.can_swap_in
        bm.can_swap_in = lambda seq_id, n=1: real(seq_id, 0)  # type: ignore[method-assign]
        try:
            super()._schedule_swapped(step)
        finally:
            del bm.can_swap_in  # type: ignore[attr-defined]


class FreesInFlight(FastScheduler):
    """An abort between ``schedule()`` and ``update()`` frees the blocks the step still uses."""

    def abort_request(self, seq_id: int) -> None:
        self._in_step.discard(seq_id)  # bug: as if no step were in flight
        super().abort_request(seq_id)


def scheduler_mutant(cls: type[FastScheduler]) -> Any:
    """A ``SchedulerFactory`` running scheduler class ``cls`` over the spec block manager."""

    def factory(config: SchedulerConfig, bm_config: Any) -> FastSchedulerAdapter:
        adapter = FastOverSpecBM(config, bm_config)
        adapter.scheduler = cls(config, adapter.block_manager)
        return adapter

    factory.__name__ = cls.__name__
    return factory


SCHEDULER_MUTANTS: dict[str, Any] = {
    "oldest_victim": scheduler_mutant(OldestVictim),
    "no_front_requeue": scheduler_mutant(NoFrontRequeue),
    "fork_to_back": scheduler_mutant(ForkToBack),
    "fork_without_sharing": scheduler_mutant(ForkWithoutSharing),
    "swap_in_ignores_append": scheduler_mutant(SwapInIgnoresAppend),
    "freed_while_in_flight": scheduler_mutant(FreesInFlight),
}
