"""Tensor parallelism over 2 gloo processes, multi-head attention (each rank 2 of 4 KV heads),
Q/K/V bias, untied LM head, an intermediate size that splits unevenly.

One group serves the whole module (spawning one costs seconds); its last test makes a worker
fail, which takes the group down.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tp_models import ENGINE, MIN_MARGIN, prompts, reference_margin, tiny, tokens

from fast.api.llm import LLM
from fast.distributed.errors import (
    TensorParallelError,
    TensorParallelGroupDownError,
    WorkerFailedError,
)
from fast.engine.beam_params import BeamSearchParams
from fast.engine.beam_search import run_beam_search
from fast.engine.sampling_params import SamplingParams
from spec.errors import InvalidArgumentError

# 14 blocks of 4 tokens for 6 sequences of 7..11 + 14 tokens: recompute preemptions
SETTINGS = {**ENGINE, "num_gpu_blocks": 14, "max_num_seqs": 6, "max_model_len": 32}
BATCH = prompts(seed=3, lens=(7, 11, 9, 8, 10, 7))
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny(4, 4, seed=5, bias=True)


@pytest.fixture(scope="module")
def ref(model) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(model, **SETTINGS)


@pytest.fixture(scope="module")
def tp(model) -> Iterator[LLM]:  # type: ignore[no-untyped-def]
    with LLM(model, tensor_parallel_size=2, **SETTINGS) as llm:
        yield llm


def test_each_rank_holds_half_the_heads(tp: LLM) -> None:
    engine = tp.llm_engine
    assert engine.model.config.num_attention_heads == 2
    assert engine.kv_caches[0][0].shape[2] == 2  # [blocks, block_size, Hkv local, D]


def test_greedy_output_is_the_single_process_engine_s(ref: LLM, tp: LLM) -> None:
    want = ref.generate(BATCH, GREEDY, use_tqdm=False)
    margin = reference_margin(want)
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    assert ref.llm_engine.stats.preempted > 0  # the small pool preempts by recompute
    got = tp.generate(BATCH, GREEDY, use_tqdm=False)
    assert tokens(got) == tokens(want)
    assert tp.llm_engine.stats.preempted == ref.llm_engine.stats.preempted
    for g, w in zip(got, want):  # logprobs gathered from both vocabulary shards
        for gs, ws in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or []):
            assert gs.keys() == ws.keys()
            assert all(abs(gs[t].logprob - ws[t].logprob) < 1e-4 for t in gs)


def test_n_above_one_and_seeded_sampling_match(ref: LLM, tp: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    want = ref.generate(BATCH[:3], params, use_tqdm=False)
    got = tp.generate(BATCH[:3], params, use_tqdm=False)
    assert tokens(got) == tokens(want)
    assert tp.llm_engine.stats.forked > 0


def test_prompt_logprobs_and_prefix_cache_hits_match(ref: LLM, tp: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    twice = BATCH[:2] + BATCH[:2]  # the second copies hit the first ones' cached blocks
    want = ref.generate(twice, params, use_tqdm=False)
    got = tp.generate(twice, params, use_tqdm=False)
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        for gp, wp in zip(g.prompt_logprobs or [], w.prompt_logprobs or []):
            assert (gp is None) == (wp is None)
            if gp is not None and wp is not None:
                assert all(abs(gp[t].logprob - wp[t].logprob) < 1e-4 for t in wp)
    assert tp.llm_engine.stats.prefix_cache_hits == ref.llm_engine.stats.prefix_cache_hits > 0


def test_beam_search_is_refused_under_tensor_parallelism(ref: LLM, tp: LLM) -> None:
    """By LLM.beam_search, by name; and called on the engine directly, its first forward
    (which the workers were not sent) raises at once instead of waiting in an all-reduce the
    workers never join. The group is unharmed."""
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="tensor_parallel_size=2"):
        tp.beam_search([BATCH[0]], params)
    with pytest.raises(TensorParallelError, match="not sent to the workers"):
        run_beam_search(tp.llm_engine, [BATCH[0]], params)
    assert tp.llm_engine.num_free_gpu_blocks == tp.llm_engine.num_gpu_blocks
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert tokens(tp.generate(BATCH[:2], greedy, use_tqdm=False)) == tokens(
        ref.generate(BATCH[:2], greedy, use_tqdm=False)
    )


def test_a_rolled_back_step_is_rolled_back_on_every_rank(
    ref: LLM, tp: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler fails on every third call (after the step's forward on every rank): each
    failed step is rolled back, the workers restore the KV they saved, and the retried steps
    give the reference's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    want = tokens(ref.generate(BATCH, params, use_tqdm=False))
    engine = tp.llm_engine
    real, calls = engine.sampler.sample, itertools.count()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(calls) % 3 == 1:
            raise RuntimeError("injected sampler fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.sampler, "sample", flaky)
    before = engine.stats.preempted
    for i, p in enumerate(BATCH):
        engine.add_request(f"flaky-{i}", p, params)
    final: dict[str, Any] = {}
    failed = 0
    while engine.has_unfinished_requests():
        try:
            final.update((o.request_id, o) for o in engine.step() if o.finished)
        except RuntimeError:
            failed += 1
    assert failed > 5 and engine.stats.preempted > before
    assert tokens([final[f"flaky-{i}"] for i in range(len(BATCH))]) == want


def _fail_at_first_preemption_then_keep_a_victim(llm: LLM, batch: list[Any]) -> dict[str, Any]:
    """Run ``batch``; the first step that preempts a running request fails in the sampler
    (after every rank's forward wrote that step's K/V, some into the preempted request's
    blocks) and is rolled back; then every request but one of those preempted is aborted,
    so the survivor decodes on from the KV the rollback restored. -> request id: output."""
    engine = llm.llm_engine
    real = engine.sampler.sample
    state: dict[str, Any] = {"fired": False, "before": set(), "victims": set()}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        victims = state["before"] - {s.request_id for s in engine.scheduler.running}
        if not state["fired"] and victims:
            state["fired"], state["victims"] = True, victims
            raise RuntimeError("injected sampler fault")
        return real(*args, **kwargs)

    engine.sampler.sample = flaky
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2)
    ids = [f"victim-{i}" for i in range(len(batch))]
    for rid, p in zip(ids, batch):
        engine.add_request(rid, p, params)
    final: dict[str, Any] = {}
    try:
        while engine.has_unfinished_requests():
            state["before"] = {s.request_id for s in engine.scheduler.running}
            try:
                final.update((o.request_id, o) for o in engine.step() if o.finished)
            except RuntimeError:
                keep = min(state["victims"])
                for rid in ids:
                    if rid != keep:
                        engine.abort_request(rid)
    finally:
        engine.sampler.sample = real
    assert state["fired"], "no step preempted: the test needs a smaller pool"
    return final


def test_the_workers_restore_the_kv_a_failed_step_overwrote(model, tp: LLM) -> None:  # type: ignore[no-untyped-def]
    """The rollback's KV restore on every rank: the surviving victim's tokens are the
    single-process engine's under the same procedure (checked by hand to differ when the
    workers skip RESTORE_KV: the survivor then reads its overwritten K/V on rank 1's heads)."""
    batch = prompts(seed=21, lens=(7, 11, 9, 8, 10, 7))
    want = _fail_at_first_preemption_then_keep_a_victim(LLM(model, **SETTINGS), batch)
    margin = reference_margin(list(want.values()))
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    got = _fail_at_first_preemption_then_keep_a_victim(tp, batch)
    assert {k: tokens([v]) for k, v in got.items()} == {k: tokens([v]) for k, v in want.items()}


def test_a_worker_error_brings_the_group_down_with_it(tp: LLM) -> None:
    """Last: a rank that raises in the middle of a step (told to, here) makes generate raise
    its error, named, with the rank, while rank 0 waits in the step's all-reduce; the engine
    is left as it was (nothing queued); every later call says the group is down."""
    tp.llm_engine.tensor_parallel.inject_failure(1, in_step=True)
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="InjectedFaultError") as info:
        tp.generate(BATCH[:2], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    assert info.value.rank == 1 and "rank 1 was told to fail in a step" in info.value.error
    assert "Traceback" in info.value.traceback
    assert isinstance(info.value.__cause__, RuntimeError)  # found through the failed collective
    assert not tp.llm_engine.has_unfinished_requests()
    assert tp.llm_engine.num_free_gpu_blocks == tp.llm_engine.num_gpu_blocks
    with pytest.raises(TensorParallelGroupDownError, match="rank 1 failed"):
        tp.generate(BATCH[:1], GREEDY, use_tqdm=False)
