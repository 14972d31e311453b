"""benchmarks/bench_memory.py on tiny traces: the properties its table rests on.

The benchmark lives outside the packages: benchmark_module.load_benchmark loads it from its file.
"""

from __future__ import annotations

import math

import pytest
from benchmark_module import load_benchmark

bm = load_benchmark("bench_memory")


def test_traces_follow_workloads_md() -> None:
    trace = bm.make_trace(bm.SHAREGPT, 5, seed=0)
    prompts = sum(trace.prompt_lens)
    # docs/workloads.md: the same generator draws prompt then output lengths
    import numpy as np

    rng = np.random.default_rng(0)
    want = np.clip(np.round(rng.lognormal(4.68, 1.0, 5)), 4, 1024).astype(int)
    assert prompts == int(want.sum())
    assert all(4 <= n <= 1024 for n in trace.prompt_lens + trace.output_lens)


def test_block_size_one_holds_only_tokens() -> None:
    trace = bm.make_trace(bm.ALPACA, 40, seed=1)
    s = bm.run_engine(trace, block_size=1, num_blocks=4000, max_num_seqs=8, check=True)
    assert s.tokens == s.physical  # every allocated slot holds a token, at every step
    assert bm.utilization(s)["paged"] == 1.0
    bigger = bm.utilization(bm.run_engine(trace, block_size=16, num_blocks=400, max_num_seqs=8))
    assert bigger["paged"] < 1.0


def _hand_made() -> tuple[object, list[list[tuple[int, int, int]]]]:
    """Two requests admitted together; per step, (tokens in pool, prompt, output) of each
    resident request, worked out by hand: a request holds its prompt in its first step and
    one more token per step after, and leaves after the step that samples its last token."""
    trace = bm.Trace("hand", (3, 5), (4, 2))
    steps = [
        [(3, 3, 4), (5, 5, 2)],
        [(4, 3, 4), (6, 5, 2)],
        [(5, 3, 4)],
        [(6, 3, 4)],
    ]
    return trace, steps


def test_layouts_equal_their_closed_forms() -> None:
    trace, steps = _hand_made()
    bs, max_len = 4, 16
    s = bm.run_engine(trace, block_size=bs, num_blocks=64, max_model_len=max_len, check=True)
    assert s.seqs == [len(step) for step in steps]
    u = bm.utilization(s, max_model_len=max_len)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    tokens = [sum(t for t, _, _ in step) for step in steps]
    contiguous = mean([t / (len(step) * max_len) for t, step in zip(tokens, steps)])
    oracle = mean([t / sum(p + o - 1 for _, p, o in step) for t, step in zip(tokens, steps)])
    paged = mean(
        [t / (bs * sum(math.ceil(n / bs) for n, _, _ in step)) for t, step in zip(tokens, steps)]
    )
    assert u["contiguous_max"] == pytest.approx(contiguous, rel=1e-12)
    assert u["oracle"] == pytest.approx(oracle, rel=1e-12)
    assert u["paged"] == pytest.approx(paged, rel=1e-12)
    assert bm.contiguous_batch(10_000, 2048) == 4


def test_kv_budget_arithmetic() -> None:
    budget = bm.kv_budget()
    per_token = 32 * 8 * 128 * 2 * 2
    assert budget["bytes_per_token"] == per_token == 128 * 1024
    assert budget["budget_tokens"] == math.floor((0.9 * 141e9 - 16e9) / per_token)


def test_sharing_saves_nothing_without_siblings() -> None:
    trace = bm.make_trace(bm.ALPACA, 30, seed=2)
    one = bm.run_engine(trace, block_size=16, num_blocks=2000, max_num_seqs=16, width=1)
    assert bm.sharing_saving(one) == 0.0
    beam_one = bm.run_beam(trace, width=1, block_size=16, num_blocks=2000, max_num_seqs=16)
    assert bm.sharing_saving(beam_one) == 0.0
    assert beam_one.tokens == one.tokens  # one beam is plain decoding, step for step
    assert bm.predicted_parallel_saving(trace, 1, 16) == 0.0
    assert 0.0 < bm.predicted_parallel_saving(trace, 2, 16) < 0.5


@pytest.mark.parametrize("width", [2, 4])
def test_sharing_saves_at_most_all_but_one_copy(width: int) -> None:
    trace = bm.make_trace(bm.ALPACA, 12, seed=3)
    par = bm.run_engine(
        trace, block_size=16, num_blocks=4000, max_num_seqs=16, width=width, check=True
    )
    beam = bm.run_beam(
        trace, width=width, block_size=16, num_blocks=4000, max_num_seqs=16, check=True
    )
    for s in (par, beam):
        saving = bm.sharing_saving(s)
        assert 0.0 < saving <= 1 - 1 / width
        assert all(p <= lg for p, lg in zip(s.physical, s.logical))


def test_pool_limited_run_decides_like_the_engine_scheduler() -> None:
    trace = bm.Trace(
        "small",
        tuple(3 + (7 * i) % 13 for i in range(40)),
        tuple(4 + (5 * i) % 17 for i in range(40)),
    )
    kw = {"block_size": 4, "num_blocks": 30, "max_num_seqs": 12, "max_num_batched_tokens": 64}
    engine = bm.run_engine(trace, max_model_len=64, window=6, check=True, **kw)
    pooled = bm.run_pool_limited(trace, window=6, **kw)
    assert sum(engine.preempted) > 0  # the pool binds: preemption is exercised
    assert pooled.running == engine.seqs
    assert pooled.preempted == engine.preempted
    assert pooled.tokens == engine.tokens
    assert pooled.blocks == engine.physical
