"""Tensor parallelism over 2 gloo processes, grouped-query attention where the KV heads divide
(4 query / 2 KV heads: one KV head per rank), tied embeddings (the vocabulary-parallel
embedding is also the LM head), Q/K norms, preemption by swap.

Its last test kills a worker: the group goes down with it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from tp_models import ENGINE, MIN_MARGIN, prompts, reference_margin, tiny, tokens

from fast.api.llm import LLM
from fast.distributed.errors import TensorParallelGroupDownError, WorkerDiedError
from fast.engine.sampling_params import SamplingParams

SETTINGS = {
    **ENGINE,
    "num_gpu_blocks": 12,
    "max_model_len": 32,
    "max_num_seqs": 6,
    "preemption_mode": "swap",
    "swap_space": 0.0005,  # GiB: ~2000 host blocks of this tiny model
}
BATCH = prompts(seed=4, lens=(9, 7, 10, 8, 6))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny(4, 2, seed=7, tie=True, qk_norm=True)


@pytest.fixture(scope="module")
def tp(model) -> Iterator[LLM]:  # type: ignore[no-untyped-def]
    with LLM(model, tensor_parallel_size=2, **SETTINGS) as llm:
        yield llm


def test_greedy_output_with_swap_preemption_is_the_single_process_engine_s(
    model,  # type: ignore[no-untyped-def]
    tp: LLM,
) -> None:
    assert tp.llm_engine.kv_caches[0][0].shape[2] == 1  # one of the 2 KV heads on each rank
    ref = LLM(model, **SETTINGS)
    want = ref.generate(BATCH, GREEDY, use_tqdm=False)
    margin = reference_margin(want)
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    assert ref.llm_engine.stats.swapped_out > 0 and ref.llm_engine.stats.swapped_in > 0
    got = tp.generate(BATCH, GREEDY, use_tqdm=False)
    assert tokens(got) == tokens(want)
    stats = tp.llm_engine.stats
    assert (stats.swapped_out, stats.swapped_in) == (
        ref.llm_engine.stats.swapped_out,
        ref.llm_engine.stats.swapped_in,
    )


def test_a_killed_worker_makes_generate_raise_promptly(tp: LLM) -> None:
    """Last: SIGKILL rank 1 between two calls; the next generate raises WorkerDiedError with
    its rank and exit code (the liveness check before each command), and the group stays
    down."""
    (pid,) = tp.llm_engine.tensor_parallel.worker_pids
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError) as info:
        tp.generate(BATCH[:1], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    assert (info.value.rank, info.value.exitcode) == (1, -signal.SIGKILL)
    assert not tp.llm_engine.has_unfinished_requests()
    with pytest.raises(TensorParallelGroupDownError, match="rank 1 died"):
        tp.generate(BATCH[:1], GREEDY, use_tqdm=False)
