"""Each planted scheduler mutant is caught by the scheduler check at CI's budget and seed.

``conformance.api.check_scheduler`` runs every named scheduler property with
``SCHEDULER_CI_EXAMPLES`` request streams each, exactly as ``python -m conformance`` does.
"""

from __future__ import annotations

import pytest
from scheduler_mutants import SCHEDULER_MUTANTS, FastOverSpecBM

from conformance.api import check_scheduler
from conformance.blocks.runner import ci_seed
from conformance.report import ConformanceFailure
from conformance.scheduler.protocol import FastSchedulerAdapter, SpecSchedulerAdapter
from conformance.scheduler.run import (
    CHILD_ID_STRIDE,
    RequestSpec,
    SchedulerConformanceError,
    Workload,
    run,
    run_lockstep,
)
from spec.scheduler import SchedulerConfig


@pytest.mark.parametrize("name", sorted(SCHEDULER_MUTANTS))
def test_mutant_is_caught_at_the_ci_budget(name: str) -> None:
    # a short shrink: the test is about finding the bug; the report still shows the stream
    report = check_scheduler(SCHEDULER_MUTANTS[name], seed=ci_seed(), name=name, shrink_seconds=2)
    assert report.status == "failed", report.summary()
    assert report.failures[0].counterexample  # the failing request stream, printed


def test_the_real_schedulers_pass_at_the_ci_budget() -> None:
    for factory in (FastOverSpecBM, FastSchedulerAdapter):
        report = check_scheduler(factory, seed=ci_seed(), raise_on_failure=True)
        assert report.ok and report.runs >= 3 * 100


def test_freed_while_in_flight_is_reported_by_name() -> None:
    with pytest.raises(ConformanceFailure, match="freed_while_in_flight"):
        check_scheduler(
            SCHEDULER_MUTANTS["freed_while_in_flight"],
            properties=["freed_while_in_flight"],
            seed=ci_seed(),
            raise_on_failure=True,
            shrink_seconds=2,
        )


def _in_flight_workload() -> Workload:
    from spec.block_manager import BlockManagerConfig

    return Workload(
        SchedulerConfig(4, 16, 16, False, "recompute"),
        BlockManagerConfig(block_size=2, num_gpu_blocks=12),
        (
            RequestSpec(0, 0, (1, 2, 3), 6, abort_step=1, abort_in_flight=True),
            RequestSpec(1, 0, (5, 6, 7, 8), 4, abort_step=2, n=2, abort_in_flight=True),
        ),
    )


def test_abort_in_flight_keeps_blocks_until_update() -> None:
    from spec.block_manager import BlockManager, BlockManagerConfig
    from spec.scheduler import Scheduler, StepOutcome

    bm = BlockManager(BlockManagerConfig(block_size=2, num_gpu_blocks=8))
    sched = Scheduler(SchedulerConfig(4, 16, 16), bm)
    sched.add_request(0, [1, 2, 3])
    out = sched.schedule()
    assert [s.seq_id for s in out.scheduled] == [0]
    free = bm.num_free_gpu_blocks
    sched.abort_request(0)  # the step computing 0's prompt is still running
    assert bm.num_free_gpu_blocks == free and bm.has_sequence(0)
    assert not sched.has_unfinished_requests()
    sched.update(StepOutcome())
    assert bm.num_free_gpu_blocks == 8 and not bm.has_sequence(0)


def test_in_flight_workload_matches_and_catches_the_mutant() -> None:
    wl = _in_flight_workload()
    assert run_lockstep(SpecSchedulerAdapter, FastSchedulerAdapter, wl) >= 2
    assert len(run(SpecSchedulerAdapter(wl.config, wl.bm_config), wl)) >= 2
    with pytest.raises(SchedulerConformanceError, match="freed_while_in_flight"):
        run_lockstep(SpecSchedulerAdapter, SCHEDULER_MUTANTS["freed_while_in_flight"], wl)
    assert CHILD_ID_STRIDE > 1  # request 1's child is aborted in flight too
