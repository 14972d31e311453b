"""spec.scheduler: each rule of the policy on a hand-built scenario, over spec's block manager."""

from __future__ import annotations

import pytest

from spec.block_manager import BlockManager, BlockManagerConfig
from spec.errors import (
    InvalidArgumentError,
    SequenceExistsError,
    SequenceStateError,
    UnknownSequenceError,
)
from spec.scheduler import (
    ScheduledSequence,
    Scheduler,
    SchedulerConfig,
    SchedulerOrderError,
    StepOutcome,
)


def make(
    num_gpu_blocks: int = 16,
    block_size: int = 4,
    num_cpu_blocks: int = 0,
    prefix: bool = False,
    **cfg: object,
) -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(
        BlockManagerConfig(
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            num_cpu_blocks=num_cpu_blocks,
            enable_prefix_caching=prefix,
        )
    )
    kw: dict[str, object] = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "max_model_len": 32}
    kw.update(cfg)
    return Scheduler(SchedulerConfig(**kw), bm), bm  # type: ignore[arg-type]


def sample_all(s: Scheduler, token: int = 7, finished: frozenset[int] = frozenset()) -> None:
    """Finish the step in flight: every sampling sequence gets ``token``."""
    out = s._expected or set()
    s.update(StepOutcome({i: token for i in out}, finished))


def test_config_rejects_impossible_limits() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=4, max_model_len=4, enable_chunked_prefill=True
        )
    assert e.value.value == 4
    with pytest.raises(InvalidArgumentError):  # a prompt could never fit one step
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16)
    with pytest.raises(InvalidArgumentError):
        SchedulerConfig(preemption_mode="drop")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        SchedulerConfig(max_num_seqs=0)


def test_add_request_validates() -> None:
    s, _ = make()
    with pytest.raises(InvalidArgumentError):
        s.add_request(0, [])
    with pytest.raises(InvalidArgumentError) as e:
        s.add_request(0, list(range(33)))
    assert e.value.value == 33
    s.add_request(0, [1, 2])
    with pytest.raises(SequenceExistsError):
        s.add_request(0, [3])
    with pytest.raises(UnknownSequenceError):
        s.abort_request(5)


def test_fcfs_admission_stops_at_token_budget() -> None:
    s, bm = make(max_num_batched_tokens=32, max_model_len=32)
    for i, n in enumerate([12, 12, 12, 2]):
        s.add_request(i, list(range(n)))
    out = s.schedule()
    # 12 + 12 fit the 32-token budget; 12 more would not, and the short 4th may not overtake.
    assert out.scheduled == (ScheduledSequence(0, 0, 12, True), ScheduledSequence(1, 0, 12, True))
    assert s.waiting == (2, 3) and s.running == (0, 1)
    sample_all(s)
    out = s.schedule()
    # decodes first (1 token each), then the waiting ones in order.
    assert [(x.seq_id, x.num_tokens) for x in out.scheduled] == [(0, 1), (1, 1), (2, 12), (3, 2)]
    assert bm.num_tokens(0) == 13 and s.token_ids(0)[-1] == 7


def test_max_num_seqs_limits_running() -> None:
    s, _ = make(max_num_seqs=2)
    for i in range(3):
        s.add_request(i, [1, 2, 3])
    out = s.schedule()
    assert [x.seq_id for x in out.scheduled] == [0, 1] and s.waiting == (2,)


def test_chunked_prefill_splits_prompt_and_samples_once() -> None:
    s, _ = make(
        max_num_seqs=2, max_num_batched_tokens=10, max_model_len=32, enable_chunked_prefill=True
    )
    s.add_request(0, list(range(25)))
    shares = []
    for _ in range(3):
        out = s.schedule()
        shares += [(x.start, x.num_tokens, x.sample) for x in out.scheduled]
        sample_all(s)
    assert shares == [(0, 10, False), (10, 10, False), (20, 5, True)]
    out = s.schedule()
    assert out.scheduled == (ScheduledSequence(0, 25, 1, True),)


def test_chunked_prefill_shares_budget_after_decodes() -> None:
    s, _ = make(
        max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32, enable_chunked_prefill=True
    )
    s.add_request(0, [1, 2, 3])
    s.schedule()
    sample_all(s)
    s.add_request(1, list(range(20)))
    out = s.schedule()
    assert [(x.seq_id, x.start, x.num_tokens) for x in out.scheduled] == [(0, 3, 1), (1, 0, 7)]


def test_recompute_preempts_newest_and_requeues_at_front() -> None:
    # 4 blocks of 2 tokens: two 4-token prompts fill the pool.
    s, bm = make(
        num_gpu_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=8
    )
    s.add_request(0, [1, 2, 3, 4])
    s.add_request(1, [5, 6, 7, 8])
    s.add_request(2, [9])
    out = s.schedule()
    assert [x.seq_id for x in out.scheduled] == [0, 1] and bm.num_free_gpu_blocks == 0
    sample_all(s, token=42)
    out = s.schedule()
    # 0 needs a new block: 1 (the newest running) is preempted, 0 decodes, 2 may not start.
    assert out.preempted == (1,)
    assert out.scheduled == (ScheduledSequence(0, 4, 1, True),)
    assert s.waiting == (1, 2) and s.token_ids(1) == [5, 6, 7, 8, 42]
    sample_all(s, token=43, finished=frozenset({0}))
    out = s.schedule()
    # 1 comes back with prompt + generated as its prompt: 5 tokens recomputed.
    assert out.scheduled[0] == ScheduledSequence(1, 0, 5, True)


def test_preempted_victim_frees_room_for_the_older() -> None:
    s, _ = make(
        num_gpu_blocks=2, block_size=2, max_num_seqs=2, max_num_batched_tokens=4, max_model_len=4
    )
    s.add_request(0, [1, 2])
    s.add_request(1, [3, 4])
    s.schedule()
    sample_all(s)
    out = s.schedule()
    # 0 needs a block: 1 goes; then 0 can append into the freed block.
    assert out.preempted == (1,) and [x.seq_id for x in out.scheduled] == [0]


def test_swap_out_then_swap_in_before_waiting() -> None:
    s, bm = make(
        num_gpu_blocks=4,
        block_size=2,
        num_cpu_blocks=4,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        max_model_len=8,
        preemption_mode="swap",
    )
    s.add_request(0, [1, 2, 3, 4])
    s.add_request(1, [5, 6, 7, 8])
    s.schedule()
    sample_all(s)
    s.add_request(2, [9])
    out = s.schedule()
    assert out.swapped_out == (1,) and len(out.blocks_to_swap_out) == 2
    assert s.swapped == (1,) and bm.is_swapped(1)
    sample_all(s, finished=frozenset({0}))
    out = s.schedule()
    # swapped 1 returns before waiting 2; its blocks plus the appended token's block counted.
    assert out.swapped_in == (1,) and len(out.blocks_to_swap_in) == 2
    assert out.scheduled[0] == ScheduledSequence(1, 4, 1, True)
    assert [x.seq_id for x in out.scheduled] == [1, 2]


def test_swap_falls_back_to_recompute_when_host_pool_full() -> None:
    s, _ = make(
        num_gpu_blocks=4,
        block_size=2,
        num_cpu_blocks=1,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        max_model_len=8,
        preemption_mode="swap",
    )
    s.add_request(0, [1, 2, 3, 4])
    s.add_request(1, [5, 6, 7, 8])
    s.schedule()
    sample_all(s)
    out = s.schedule()
    assert out.preempted == (1,) and out.swapped_out == ()


def test_prefix_cache_hit_skips_cached_tokens() -> None:
    s, _ = make(prefix=True)
    s.add_request(0, list(range(10)))
    s.schedule()
    sample_all(s, finished=frozenset({0}))
    s.add_request(1, list(range(10)) + [99])
    out = s.schedule()
    assert out.scheduled == (ScheduledSequence(1, 8, 3, True),)  # two full blocks cached


def test_abort_frees_blocks_everywhere() -> None:
    s, bm = make(
        num_gpu_blocks=4,
        block_size=2,
        num_cpu_blocks=4,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        max_model_len=8,
        preemption_mode="swap",
    )
    s.add_request(0, [1, 2, 3, 4])
    s.add_request(1, [5, 6, 7, 8])
    s.add_request(2, [9])
    s.schedule()
    sample_all(s)
    s.schedule()  # 1 swapped out
    s.abort_request(0)  # running, in flight: its sample is no longer expected
    sample_all(s)
    for i in (1, 2):
        s.abort_request(i)
    assert not s.has_unfinished_requests()
    assert bm.num_free_gpu_blocks == 4 and bm.num_free_cpu_blocks == 4


def test_schedule_and_update_must_alternate() -> None:
    s, _ = make()
    s.add_request(0, [1, 2])
    with pytest.raises(SchedulerOrderError):
        s.update(StepOutcome())
    s.schedule()
    with pytest.raises(SchedulerOrderError):
        s.schedule()
    with pytest.raises(InvalidArgumentError):
        s.update(StepOutcome({1: 3}))
    with pytest.raises(InvalidArgumentError):
        s.update(StepOutcome({0: 3}, frozenset({0, 1})))
    s.update(StepOutcome({0: 3}))
    assert s.token_ids(0) == [1, 2, 3]


def test_max_model_len_must_finish() -> None:
    s, _ = make(max_model_len=4, max_num_batched_tokens=4)
    s.add_request(0, [1, 2, 3, 4])
    s.schedule()
    with pytest.raises(InvalidArgumentError):
        s.update(StepOutcome({0: 5}))
    s.update(StepOutcome({0: 5}, frozenset({0})))
    assert not s.has_unfinished_requests()


def test_sequence_preempts_itself_when_only_scheduled_ones_remain() -> None:
    s, _ = make(
        num_gpu_blocks=4, block_size=2, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=8
    )
    s.add_request(0, [1, 2, 3])  # 2 blocks, one free slot
    s.add_request(1, [4, 5, 6, 7])  # 2 full blocks
    s.schedule()
    sample_all(s)
    out = s.schedule()
    # 0 appends into its free slot; 1 needs a block and only the scheduled 0 is left.
    assert out.preempted == (1,)
    assert out.scheduled == (ScheduledSequence(0, 3, 1, True),)


# -- fork (n > 1) ---------------------------------------------------------------------------
def test_fork_shares_blocks_and_puts_child_right_after_parent() -> None:
    s, bm = make(num_gpu_blocks=16, block_size=4)
    s.add_request(0, [1, 2, 3, 4, 5])
    s.add_request(1, [6, 7])
    s.schedule()  # both prefill; both sample
    free_before = bm.num_free_gpu_blocks
    s.fork(0, 100)
    assert bm.num_free_gpu_blocks == free_before  # shared blocks, no new ones
    assert bm.block_table(100) == bm.block_table(0)
    assert [bm.refcount(b) for b in bm.block_table(0)] == [2, 2]
    assert s.running == (0, 100, 1)  # after the parent, before the newer request
    assert s.num_computed(100) == 5 and s.token_ids(100) == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidArgumentError):  # the child's first token is missing
        s.update(StepOutcome({0: 8, 1: 9}))
    s.update(StepOutcome({0: 8, 1: 9, 100: 10}))
    assert s.token_ids(100) == [1, 2, 3, 4, 5, 10]
    out = s.schedule()  # child decodes its own token
    assert [x.seq_id for x in out.scheduled] == [0, 100, 1]
    assert len(out.blocks_to_copy) == 1  # copy-on-write of the shared last block
    sample_all(s, finished=frozenset({0, 100, 1}))
    assert bm.num_free_gpu_blocks == 16


def test_later_children_sort_after_earlier_ones() -> None:
    s, _ = make()
    s.add_request(0, [1, 2])
    s.add_request(1, [3])
    s.schedule()
    s.fork(0, 10)
    s.fork(0, 20)
    assert s.running == (0, 10, 20, 1)


def test_fork_rejects_bad_calls_with_named_errors() -> None:
    s, _ = make(num_gpu_blocks=4, block_size=4, max_num_seqs=1)
    s.add_request(0, [1, 2])
    s.add_request(1, [3])
    with pytest.raises(UnknownSequenceError) as u:
        s.fork(9, 5)
    assert u.value.seq_id == 9
    s.schedule()  # 0 runs, 1 waits (max_num_seqs 1)
    with pytest.raises(SequenceExistsError):
        s.fork(0, 1)
    with pytest.raises(InvalidArgumentError) as e:  # parent not running
        s.fork(1, 5)
    assert e.value.value == "waiting"
    sample_all(s)
    s.schedule()  # 0 decodes: its token is not first-sampled
    s.update(StepOutcome({0: 3}))
    with pytest.raises(SchedulerOrderError):
        s.fork(0, 5)


def test_fork_of_a_swapped_parent_raises_sequence_state_error() -> None:
    s, _ = make(
        num_gpu_blocks=4,
        block_size=2,
        num_cpu_blocks=4,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        max_model_len=8,
        preemption_mode="swap",
    )
    s.add_request(0, [1, 2, 3, 4])
    s.add_request(1, [5, 6, 7, 8])
    s.schedule()
    sample_all(s)
    s.schedule()  # 1 swapped out; 0 decodes
    assert s.swapped == (1,)
    with pytest.raises(SequenceStateError) as e:
        s.fork(1, 5)
    assert e.value.seq_id == 1 and e.value.swapped


def test_update_returns_the_finished_in_arrival_order_in_spec_and_fast() -> None:
    from fast.engine.scheduler import Scheduler as FastScheduler
    from fast.engine.sequence import Sequence

    spec_s, _ = make()
    fast_bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=16))
    fast_s = FastScheduler(spec_s.config, fast_bm)
    for i, prompt in enumerate([[1, 2], [3], [4, 5, 6]]):
        spec_s.add_request(i, prompt)
        fast_s.add_request(Sequence(i, str(i), i, list(prompt)))
    spec_s.schedule(), fast_s.schedule()
    done = frozenset({2, 0})
    sampled = {2: 9, 1: 9, 0: 9}  # the outcome's order does not matter
    for seq_id in (0, 1, 2):
        fast_s.seqs[seq_id].append_token(9)
    assert spec_s.update(StepOutcome(sampled, done)) == [0, 2]
    assert [seq.seq_id for seq in fast_s.update(StepOutcome(sampled, done))] == [0, 2]
    assert spec_s.has_unfinished_requests() and fast_s.has_unfinished_requests()
    spec_s.abort_request(1)
    assert fast_s.abort_request(1) is None
    assert not spec_s.has_unfinished_requests() and not fast_s.has_unfinished_requests()
