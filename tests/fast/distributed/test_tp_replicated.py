"""Tensor parallelism over 2 gloo processes where KV heads must be copied: 6 query heads and
3 KV heads over 2 ranks (3 query heads each, so each rank stores 3 local KV heads: a uniform
group of one query per KV head, model head 1 on both ranks).

Then the group's end: ``close()`` stops the workers, later calls say the group is down; and a
one-KV-head model whose LLM is dropped without ``close()``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from tp_models import ENGINE, MIN_MARGIN, prompts, reference_margin, tiny, tokens

from fast.api.llm import LLM
from fast.distributed.errors import TensorParallelGroupDownError
from fast.engine.sampling_params import SamplingParams

SETTINGS = {**ENGINE, "num_gpu_blocks": 32, "max_model_len": 32}
BATCH = prompts(seed=6, lens=(8, 5, 11))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny(6, 3, seed=8)


@pytest.fixture(scope="module")
def tp(model) -> Iterator[LLM]:  # type: ignore[no-untyped-def]
    with LLM(model, tensor_parallel_size=2, **SETTINGS) as llm:
        yield llm


def test_copied_kv_heads_give_the_single_process_engine_s_output(
    model,  # type: ignore[no-untyped-def]
    tp: LLM,
) -> None:
    assert tp.llm_engine.tensor_parallel.plan.kv_heads == ((0, 0, 1), (1, 2, 2))
    assert tp.llm_engine.kv_caches[0][0].shape[2] == 3
    want = LLM(model, **SETTINGS).generate(BATCH, GREEDY, use_tqdm=False)
    margin = reference_margin(want)
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    assert tokens(tp.generate(BATCH, GREEDY, use_tqdm=False)) == tokens(want)


def test_close_stops_the_workers_and_later_calls_say_so(tp: LLM) -> None:
    (pid,) = tp.llm_engine.tensor_parallel.worker_pids
    tp.close()
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(pid, 0)
    tp.close()  # idempotent
    with pytest.raises(TensorParallelGroupDownError, match="shut down") as e:
        tp.generate(BATCH[:1], GREEDY, use_tqdm=False)
    assert str(e.value) == "the tensor-parallel group is down: shut down"  # said once
    assert e.value.reason == "shut down"
    assert not tp.llm_engine.has_unfinished_requests()


def test_one_kv_head_on_both_ranks_and_a_dropped_llm_stops_its_workers() -> None:
    """MQA (4 query heads, 1 KV head): each rank stores a copy of the one head, and the tokens
    are the single-process engine's. Then the LLM is dropped without close(): its workers end
    with it (LLM.__del__; the driver holds no reference cycle)."""
    model = tiny(4, 1, seed=17)
    want = LLM(model, **SETTINGS).generate(BATCH, GREEDY, use_tqdm=False)
    margin = reference_margin(want)
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    llm = LLM(model, tensor_parallel_size=2, **SETTINGS)
    assert llm.llm_engine.tensor_parallel.plan.kv_heads == ((0,), (0,))
    assert tokens(llm.generate(BATCH, GREEDY, use_tqdm=False)) == tokens(want)
    (pid,) = llm.llm_engine.tensor_parallel.worker_pids
    del llm
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(pid, 0)
