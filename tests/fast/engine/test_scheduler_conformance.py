"""fast.engine.scheduler makes spec.scheduler's decisions on random request streams (and mutants
don't: the planted scheduler mutants and their CI-budget tests live in tests/conformance)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from conformance.scheduler.protocol import (
    FastSchedulerAdapter,
    SpecSchedulerAdapter,
    scheduler_factory,
    scheduler_names,
)
from conformance.scheduler.run import (
    CHILD_ID_STRIDE,
    RequestSpec,
    SchedulerConformanceError,
    Workload,
    check_scheduler,
    run,
    run_lockstep,
    workloads,
)
from fast.engine.scheduler import Scheduler as FastScheduler
from fast.engine.sequence import Sequence
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
    check_scheduler(_FastOverSpecBM)  # CI's budget: SCHEDULER_CI_EXAMPLES


def test_fast_scheduler_over_fast_block_manager_matches_spec() -> None:
    # the engine's configuration: fast.engine.scheduler driven by the numba block manager
    check_scheduler(FastSchedulerAdapter)


def test_registry_names() -> None:
    assert scheduler_names() == ["fast", "spec"]
    assert scheduler_factory("fast") is FastSchedulerAdapter
    with pytest.raises(KeyError, match="known"):
        scheduler_factory("nope")


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


def _mutant(cls: type[FastScheduler]) -> Any:
    def factory(config: SchedulerConfig, bm_config: Any) -> FastSchedulerAdapter:
        adapter = _FastOverSpecBM(config, bm_config)
        adapter.scheduler = cls(config, adapter.block_manager)
        return adapter

    return factory


class _ForkToBack(FastScheduler):
    """Mutant: a forked child goes to the back of the running queue, not after its parent."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.arrival += 1 << 40
        super().fork(parent, child)


def test_swap_in_capacity_mutant_is_caught() -> None:
    # 5 blocks of 2: after step 1, 0 takes the block of 2 (swapped) and 1 swaps itself out;
    # 2 blocks are free when 1 (2 full blocks + 1 for its pending token) asks to come back.
    from spec.block_manager import BlockManagerConfig

    wl = Workload(
        SchedulerConfig(4, 8, 8, False, "swap"),
        BlockManagerConfig(block_size=2, num_gpu_blocks=5, num_cpu_blocks=5),
        (
            RequestSpec(0, 0, (1, 2, 3, 4), 4),
            RequestSpec(1, 0, (5, 6, 7, 8), 4),
            RequestSpec(2, 0, (9,), 4),
        ),
    )
    assert run_lockstep(SpecSchedulerAdapter, _FastOverSpecBM, wl) > 3
    with pytest.raises(OutOfBlocksError):
        run_lockstep(SpecSchedulerAdapter, _mutant(_SwapInIgnoresAppend), wl)


def _fork_workload() -> Workload:
    from spec.block_manager import BlockManagerConfig

    return Workload(
        SchedulerConfig(4, 16, 16, False, "recompute"),
        BlockManagerConfig(block_size=2, num_gpu_blocks=12),
        (RequestSpec(0, 0, (1, 2, 3), 5, None, 3), RequestSpec(1, 0, (5, 6, 7, 8), 4)),
    )


def test_n_greater_than_one_forks_children_after_the_parent_in_lockstep() -> None:
    wl = _fork_workload()
    outs = run(SpecSchedulerAdapter(wl.config, wl.bm_config), wl)
    c1, c2 = CHILD_ID_STRIDE, 2 * CHILD_ID_STRIDE
    # step 1 decodes the parent, its two children (shared prompt blocks), then request 1
    assert [x.seq_id for x in outs[1].scheduled] == [0, c1, c2, 1]
    assert all(x.start == 3 for x in outs[1].scheduled[:3])
    assert len(outs[1].blocks_to_copy) == 2  # each child copies the shared last block
    assert run_lockstep(SpecSchedulerAdapter, FastSchedulerAdapter, wl) == len(outs)
    assert run_lockstep(SpecSchedulerAdapter, _FastOverSpecBM, wl) == len(outs)
    with pytest.raises(SchedulerConformanceError, match="differs"):
        run_lockstep(SpecSchedulerAdapter, _mutant(_ForkToBack), wl)


def test_drawn_workloads_exercise_fork() -> None:
    forks: list[int] = []

    class Counting(SpecSchedulerAdapter):
        def fork(self, parent_id: int, child_id: int) -> bool:
            done = super().fork(parent_id, child_id)
            forks.append(int(done))
            return done

    check_scheduler(Counting, max_examples=40)
    assert sum(forks) >= 10
