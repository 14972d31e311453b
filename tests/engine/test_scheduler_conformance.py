"""fast.scheduler makes spec.scheduler's decisions on random request streams (and mutants don't)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from conformance.scheduler_protocol import (
    FastSchedulerAdapter,
    SpecSchedulerAdapter,
    scheduler_factory,
    scheduler_names,
)
from conformance.scheduler_run import (
    RequestSpec,
    SchedulerConformanceError,
    Workload,
    check_scheduler,
    run,
    run_lockstep,
    workloads,
)
from fast.scheduler import Scheduler as FastScheduler
from fast.sequence import Sequence
from spec.errors import OutOfBlocksError
from spec.scheduler import SchedulerConfig


@settings(max_examples=60, deadline=None, derandomize=True)
@given(workloads())
def test_spec_runs_every_stream_to_completion_without_leaks(wl: Workload) -> None:
    outputs = run(SpecSchedulerAdapter(wl.config, wl.bm_config), wl)
    assert len(outputs) >= 1


class _FastOverSpecBM(FastSchedulerAdapter):
    block_manager_name = "spec"


def test_fast_scheduler_matches_spec_step_by_step() -> None:
    check_scheduler(_FastOverSpecBM, max_examples=150)


def test_fast_scheduler_over_fast_block_manager_matches_spec() -> None:
    # the engine's configuration: fast.scheduler driven by the numba block manager
    check_scheduler(FastSchedulerAdapter, max_examples=150)


def test_registry_names() -> None:
    assert scheduler_names() == ["fast", "spec"]
    assert scheduler_factory("fast") is FastSchedulerAdapter
    with pytest.raises(KeyError, match="known"):
        scheduler_factory("nope")


class _OldestVictim(FastScheduler):
    """Mutant: preempts the oldest unscheduled running sequence instead of the newest."""

    def _newest_unscheduled(self, step: Any, exclude: Sequence) -> Sequence | None:
        for seq in self.running:
            if seq is not exclude and seq.seq_id not in step.done:
                return seq
        return None


class _SwapInIgnoresAppend(FastScheduler):
    """Mutant: swap-in capacity ignores the token about to be appended."""

    def _schedule_swapped(self, step: Any) -> None:
        bm = self.block_manager
        real = bm.can_swap_in
        bm.can_swap_in = lambda seq_id, n=1: real(seq_id, 0)  # type: ignore[method-assign]
        try:
            super()._schedule_swapped(step)
        finally:
            del bm.can_swap_in  # type: ignore[attr-defined]


class _NoFrontRequeue(FastScheduler):
    """Mutant: a preempted sequence goes to the back of the waiting queue."""

    def _preempt(self, step: Any, seq: Sequence) -> None:
        seq.arrival += 1000
        super()._preempt(step, seq)


def _mutant(cls: type[FastScheduler]) -> Any:
    def factory(config: SchedulerConfig, bm_config: Any) -> FastSchedulerAdapter:
        adapter = _FastOverSpecBM(config, bm_config)
        adapter.scheduler = cls(config, adapter.block_manager)
        return adapter
    return factory


@pytest.mark.parametrize("mutant", [_OldestVictim, _NoFrontRequeue])
def test_planted_mutants_are_caught(mutant: type[FastScheduler]) -> None:
    with pytest.raises(SchedulerConformanceError, match="differs"):
        check_scheduler(_mutant(mutant), max_examples=300, shrink=False)


def test_swap_in_capacity_mutant_is_caught() -> None:
    # 5 blocks of 2: after step 1, 0 takes the block of 2 (swapped) and 1 swaps itself out;
    # 2 blocks are free when 1 (2 full blocks + 1 for its pending token) asks to come back.
    from spec.block_manager import BlockManagerConfig

    wl = Workload(SchedulerConfig(4, 8, 8, False, "swap"),
                  BlockManagerConfig(block_size=2, num_gpu_blocks=5, num_cpu_blocks=5),
                  (RequestSpec(0, 0, (1, 2, 3, 4), 4), RequestSpec(1, 0, (5, 6, 7, 8), 4),
                   RequestSpec(2, 0, (9,), 4)))
    assert run_lockstep(SpecSchedulerAdapter, _FastOverSpecBM, wl) > 3
    with pytest.raises(OutOfBlocksError):
        run_lockstep(SpecSchedulerAdapter, _mutant(_SwapInIgnoresAppend), wl)
