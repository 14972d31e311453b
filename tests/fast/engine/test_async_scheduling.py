"""``EngineConfig.async_scheduling``: overlapped scheduling gives the synchronous engine's tokens.

With the flag on, a pure-decode step is launched before the previous step's sampled ids reach
the host (its input ids are read from that step's sampled-token tensor); on the CPU the "device"
has already finished when the host reads, but every part of the overlap logic runs: the input
ids come from the tensor, the pending tokens' slots come from ``peek_append`` before the ids are
known, finished sequences' rows of the step launched after them are computed and dropped, and
``step()`` returns the outputs one step late. These tests hold it to the synchronous engine:

- token for token, with the same finish and stop reasons, on ShareGPT-like traces (greedy,
  seeded temperature / top-k / top-p sampling, EOS, ``stop_token_ids``, ``max_tokens``; stop
  strings and DELTA streaming on a character-level model with a tokenizer), checking the block
  manager's integrity and the request tables after every step, and the pool whole at the end;
- features that need the host's tokens before the next launch (``logprobs``, penalties,
  ``min_tokens``, admission, preemption) drain, and still give the same tokens;
- an abort while a step is in flight frees the request's blocks when that step is processed;
- a fault injected in a call that has a step in flight (from the model, the device sampler,
  the block manager, the stop checker) leaves the engine exactly as before the call, the step
  in flight included; a retry or an abort then gives the fault-free tokens;
- a planted mutant (the launched step reading the host's stale ids instead of the device's)
  is caught by the equality check.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from test_fault_injection import CONFIG as FAULT_CONFIG
from test_fault_injection import check_consistent, state

from fast.engine.engine import LLMEngine
from fast.engine.outputs import RequestOutput
from fast.engine.sampling_params import RequestOutputKind, SamplingParams
from fast.loader import random_model

EOS = 40  # about one token in thirty of the random model's samples
# test_fault_injection's tiny model, with room for longer sequences and an EOS
CONFIG = dataclasses.replace(FAULT_CONFIG, max_position_embeddings=256, eos_token_id=EOS)
MODEL = random_model(CONFIG, seed=0, dtype=torch.float32)
MAX_LEN = 160


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trace(n: int, seed: int, scale: int = 8) -> tuple[list[list[int]], list[int]]:
    """ShareGPT-like lengths (docs/workloads.md, ``benchmarks/bench_engine_cpu.scaled_trace``)
    divided by ``scale``; token ids uniform over the vocabulary."""
    rng = np.random.default_rng(seed)
    hi = 1024 // scale
    n_in = np.clip(np.round(rng.lognormal(4.68, 1.0, n) / scale), 4, hi).astype(int)
    n_out = np.clip(np.round(rng.lognormal(5.76, 1.0, n) / scale), 4, hi).astype(int)
    prompts = [rng.integers(0, CONFIG.vocab_size, size=k).tolist() for k in n_in]
    return prompts, [int(k) for k in n_out]


def make_engine(async_scheduling: bool, **kw: Any) -> LLMEngine:
    args: dict[str, Any] = dict(
        block_size=4,
        num_gpu_blocks=600,
        max_model_len=MAX_LEN,
        max_num_seqs=32,
        device="cpu",
        dtype="float32",
    )
    args.update(kw)
    return LLMEngine(MODEL, async_scheduling=async_scheduling, **args)


Result = dict[str, tuple[list[list[int]], list[str | None], list[Any], list[float]]]


def add_all(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """Add request ``str(i)`` for each prompt (token ids) with its parameters."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), {"prompt_token_ids": p}, sp)


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> Result:
    """Step the engine as a server does, checking it after every step; the final outputs."""
    add_all(engine, prompts, params)
    done: Result = {}
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, "a request finished twice"
                done[out.request_id] = summary(out)
        check_consistent(engine)
    assert not engine.has_unfinished_requests()
    assert engine._flight is None
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks, "blocks leaked"
    return done


def summary(out: RequestOutput) -> tuple[list[list[int]], list[str | None], list[Any], list[float]]:
    cs = out.outputs
    return (
        [c.token_ids for c in cs],
        [c.finish_reason for c in cs],
        [c.stop_reason for c in cs],
        [c.cumulative_logprob for c in cs],
    )


def assert_same(sync: Result, overlapped: Result) -> None:
    assert sync.keys() == overlapped.keys()
    for rid in sync:
        a, b = sync[rid], overlapped[rid]
        assert a[:3] == b[:3], f"request {rid}"
        # the batch holds other rows (finished sequences' dropped ones): float sums differ
        assert np.allclose(a[3], b[3], rtol=1e-5, atol=1e-4), f"request {rid} logprob"


def both(
    prompts: list[list[int]], params: list[SamplingParams], **kw: Any
) -> tuple[Result, Result, LLMEngine]:
    sync = run(make_engine(False, **kw), prompts, params)
    engine = make_engine(True, **kw)
    return sync, run(engine, prompts, params), engine


def mixed_params(n_out: list[int], sampled: bool) -> list[SamplingParams]:
    """EOS on for two requests in three, stop_token_ids on every fourth, max_tokens the
    trace's length; seeded temperature / top-k / top-p when ``sampled``."""
    out = []
    for i, k in enumerate(n_out):
        out.append(
            SamplingParams(
                temperature=0.8 if sampled else 0.0,
                top_k=20 if sampled and i % 2 else 0,
                top_p=0.9 if sampled and i % 3 == 1 else 1.0,
                seed=1000 + i if sampled else None,
                max_tokens=k,
                ignore_eos=i % 3 == 0,
                stop_token_ids=[53] if i % 4 == 1 else None,
            )
        )
    return out


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_trace_same_tokens(sampled: bool, caching: bool) -> None:
    prompts, n_out = trace(24, seed=1)
    params = mixed_params(n_out, sampled)
    sync, overlapped, engine = both(prompts, params, enable_prefix_caching=caching)
    assert_same(sync, overlapped)
    reasons = {r for v in sync.values() for r in v[1]}
    assert reasons == {"stop", "length"}, reasons  # EOS / stop ids and max_tokens both ran
    assert any(53 in v[2] for v in sync.values()), "no stop_token_ids finish"
    assert engine.stats.overlapped > 100, engine.stats  # the overlap path did the decoding


def test_shared_prefixes_and_fresh_blocks_from_the_cache() -> None:
    """Prompts sharing prefixes, a pool small enough that fresh blocks are evicted from the
    prefix cache while steps are in flight (their K/V is saved for the undo) but large
    enough not to preempt."""
    prompts, n_out = trace(16, seed=2)
    shared = prompts[0][:12]
    prompts = [shared + p for p in prompts]
    params = mixed_params(n_out, sampled=True)
    sync, overlapped, engine = both(prompts, params, num_gpu_blocks=260, max_num_seqs=8)
    assert_same(sync, overlapped)
    assert engine.stats.overlapped > 0 and engine.stats.prefix_cache_hits > 0


def test_small_pool_preempts_and_drains() -> None:
    prompts, n_out = trace(12, seed=3)
    params = mixed_params(n_out, sampled=False)
    for mode in ("recompute", "swap"):
        sync, overlapped, engine = both(
            prompts,
            params,
            num_gpu_blocks=MAX_LEN // 4,
            preemption_mode=mode,
            swap_space=0.001,
        )
        assert_same(sync, overlapped)
        assert engine.stats.preempted + engine.stats.swapped_out > 0
        assert engine.stats.overlapped > 0 and engine.stats.drained > 0


def test_host_features_drain() -> None:
    """logprobs, penalties and min_tokens rows need the host's tokens before the next launch:
    a step with one of them runs synchronously; the tokens are the same."""
    prompts, n_out = trace(6, seed=4)
    base = mixed_params(n_out, sampled=False)
    for extra in (
        dict(logprobs=2),
        dict(repetition_penalty=1.3),
        dict(min_tokens=10),
    ):
        params = list(base)
        prompts[2] = prompts[2][:4]
        longest = MAX_LEN - 8  # in every decode step (the others stop by 128 tokens)
        params[2] = SamplingParams(
            **{**dict(temperature=0.0, max_tokens=longest, ignore_eos=True), **extra}
        )
        sync, overlapped, engine = both(prompts, params)
        assert_same(sync, overlapped)
        if "min_tokens" in extra:  # drains for its first tokens only, then overlaps
            assert engine.stats.drained > 0 and engine.stats.overlapped > 0, engine.stats
        else:
            assert engine.stats.overlapped == 0, (extra, engine.stats)


def test_n_greater_than_one() -> None:
    """The fork's children share the parent's last block: copy-on-write drains, then the
    children decode overlapped like any sequence."""
    prompts, n_out = trace(4, seed=5)
    params = [
        SamplingParams(n=3, temperature=0.7, seed=10 + i, max_tokens=k, ignore_eos=True)
        for i, k in enumerate(n_out)
    ]
    sync, overlapped, engine = both(prompts, params)
    assert_same(sync, overlapped)
    assert engine.stats.forked > 0 and engine.stats.overlapped > 0


def test_abort_while_in_flight() -> None:
    prompts, n_out = trace(4, seed=6)
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True) for _ in n_out]
    reference = run(make_engine(False), prompts, params)
    engine = make_engine(True)
    add_all(engine, prompts, params)
    while engine._flight is None:
        engine.step()
    engine.step()
    assert engine._flight is not None
    free = engine.num_free_gpu_blocks
    final = engine.abort_request("1")
    assert final is not None and final.outputs[0].finish_reason == "abort"
    assert engine.num_free_gpu_blocks == free, "freed while the device still writes them"
    engine.block_manager.check_integrity()
    assert engine.scheduler._deferred == [1]  # sequence 1: freed when the step is processed
    done: Result = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "1"
            if out.finished:
                done[out.request_id] = summary(out)
        check_consistent(engine)
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    assert_same({k: v for k, v in reference.items() if k != "1"}, done)
    # aborting everything in flight processes the step at once: the pool is whole
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"b{i}", {"prompt_token_ids": p}, sp)
    while engine._flight is None:
        engine.step()
    for i in range(len(prompts)):
        engine.abort_request(f"b{i}")
    assert engine._flight is None and not engine.has_unfinished_requests()
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks


def test_stop_strings_and_delta_streaming(tmp_path: Any) -> None:
    from test_llm_model import VOCAB, make_char_model

    from fast.api.llm import LLM

    path = make_char_model(tmp_path / "char")
    texts = ["the cat sat", "a dog ran far", "on the mat", "xyz", "so it goes", "oj"]
    prompts = [{"prompt_token_ids": [VOCAB.index(c) for c in t]} for t in texts]
    results = []
    for flag in (False, True):
        llm = LLM(str(path), num_gpu_blocks=128, block_size=4, max_model_len=96,
                  async_scheduling=flag)  # fmt: skip
        params = [
            SamplingParams(temperature=0.0, max_tokens=40, stop=["oj:", "xyz", "a"], seed=1),
            SamplingParams(temperature=0.9, seed=3, max_tokens=30, stop=["e "]),
            SamplingParams(
                temperature=0.0, max_tokens=25, include_stop_str_in_output=True, stop=["t"]
            ),  # fmt: skip
            SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True),
            SamplingParams(temperature=0.5, seed=9, max_tokens=20),
            SamplingParams(temperature=0.0, max_tokens=30, stop=["zz", "q"]),
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        final = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
                  o.outputs[0].stop_reason) for o in outs]  # fmt: skip
        engine = llm.llm_engine
        delta = [dataclasses.replace(p, output_kind=RequestOutputKind.DELTA) for p in params]
        for i, (pr, sp) in enumerate(zip(prompts, delta)):
            engine.add_request(f"d{i}", pr, sp)
        acc: dict[str, tuple[list[int], str]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tok, text = acc.get(out.request_id, ([], ""))
                c = out.outputs[0] if out.outputs else None
                if c is not None:
                    acc[out.request_id] = (tok + c.token_ids, text + c.text)
        assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
        streamed = [acc[f"d{i}"] for i in range(len(prompts))]
        assert streamed == [(f[0], f[1]) for f in final]
        results.append((final, engine.stats.overlapped))
    assert results[0][0] == results[1][0]
    assert {f[2] for f in results[0][0]} == {"stop", "length"}
    assert any(isinstance(f[3], str) for f in results[0][0]), "no stop string finish"
    assert results[1][1] > 0


# -- faults with a step in flight -----------------------------------------------------------------
class Fault(Exception):
    """The injected failure."""


@contextmanager
def armed(engine: LLMEngine, where: str, after: bool, nth: int, fired: list[int]) -> Iterator[None]:
    """Raise once from ``where`` at its ``nth`` call made while a step is in flight (before
    or ``after`` the call did its work)."""
    calls = [0]

    def due() -> bool:
        if fired or not _in_flight_call[0]:
            return False
        calls[0] += 1
        if calls[0] < nth:
            return False
        fired.append(engine.stats.steps)
        return True

    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, name: str) -> None:
        real = getattr(owner, name)
        if name not in dir(type(owner)):  # the journal's live manager's: looked up per call
            real = lambda *a, **k: getattr(owner.live, name)(*a, **k)  # noqa: E731

        def call(*args: Any, **kwargs: Any) -> Any:
            if not after and due():
                raise Fault(where)
            result = real(*args, **kwargs)
            if after and due():
                raise Fault(where)
            return result

        setattr(owner, name, call)
        undo.append(lambda: vars(owner).pop(name) and None)

    if where == "model":
        layer = engine.model.model.layers[nth % CONFIG.num_hidden_layers]

        def hook(*_: Any) -> None:
            if due():
                raise Fault(where)

        undo.append(layer.register_forward_hook(hook).remove)
    elif where == "sampler":
        wrap(engine.sampler, "sample_device")
    elif where == "stop":
        wrap(engine._stop, "check_all")
    elif where == "report":  # step_compact's tuples: after some requests' marks were replaced
        wrap(engine, "_compact_report")
    else:
        for name in ("append_batch", "free", "mark_computed_batch", "peek_append"):
            wrap(engine.block_manager, name)
    real_step = engine._async_step

    def step(finished_only: bool, compact: bool) -> Any:
        _in_flight_call[0] = engine._flight is not None
        try:
            return real_step(finished_only, compact)
        finally:
            _in_flight_call[0] = False

    engine._async_step = step  # type: ignore[method-assign]
    undo.append(lambda: vars(engine).pop("_async_step") and None)
    try:
        yield
    finally:
        for u in undo:
            u()


_in_flight_call = [False]


def check_deferred(engine: LLMEngine) -> None:
    """``check_consistent`` after an abort while a step is in flight: the aborted sequences
    keep their blocks until that step is processed."""
    sched, bm = engine.scheduler, engine.block_manager
    if not sched._deferred:
        check_consistent(engine)
        return
    bm.check_integrity()
    held = {s.seq_id for s in sched.running if s.in_pool} | set(sched._deferred)
    assert set(bm.sequence_ids()) == held
    assert engine._flight is not None


def full_state(engine: LLMEngine) -> dict[str, Any]:
    s = state(engine)
    flight = engine._flight
    s["flight"] = None if flight is None else (id(flight), flight.host.tolist())
    s["in_flight"] = sorted(engine.scheduler.in_flight() or {})
    s["stats"] = dict(vars(engine.stats))
    s["outputs"] = {
        rid: [(list(q.token_ids), q.cumulative_logprob, q.status) for q in group]
        for rid, group in engine._requests.items()
    }
    return s


@pytest.mark.parametrize("where", ["model", "sampler", "blocks", "stop"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("then", ["retry", "abort"])
@pytest.mark.parametrize("nth", [1, 3, 7])
def test_fault_with_a_step_in_flight(where: str, after: bool, then: str, nth: int) -> None:
    prompts, n_out = trace(6, seed=7)
    params = mixed_params([min(k, 30) for k in n_out], sampled=True)
    kw: dict[str, Any] = dict(num_gpu_blocks=90, max_num_seqs=8)
    reference = run(make_engine(False, **kw), prompts, params)
    engine = make_engine(True, **kw)
    add_all(engine, prompts, params)
    fired: list[int] = []
    done: Result = {}
    aborted: str | None = None
    with armed(engine, where, after, nth, fired):
        for _ in range(2000):
            if not engine.has_unfinished_requests():
                break
            before = full_state(engine)
            try:
                outs = engine.step()
            except Fault:
                assert full_state(engine) == before, "the failed call left changes behind"
                check_consistent(engine)
                if then == "abort":
                    aborted = next(iter(sorted(engine._requests)))
                    engine.abort_request(aborted)
                    check_deferred(engine)
                continue
            for out in outs:
                if out.finished and out.request_id != aborted:
                    done[out.request_id] = summary(out)
            check_consistent(engine)
    assert fired, "the fault never fired"
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    expected = {k: v for k, v in reference.items() if k != aborted}
    assert_same(expected, {k: v for k, v in done.items() if k != aborted})


@pytest.mark.parametrize("where", ["model", "blocks", "stop", "report"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_fault_in_step_compact_with_a_step_in_flight(where: str, after: bool) -> None:
    """The engine process's ``step_compact()`` on the overlapped path, with a fault every third
    call: a failed call changes nothing (the "already sent" marks included, which the compact
    tuples replace), and the retried run's new tokens, compact or full, add up to the
    synchronous engine's."""
    prompts, n_out = trace(6, seed=11)
    plain = mixed_params([min(k, 30) for k in n_out], sampled=True)
    params = [dataclasses.replace(sp, output_kind=RequestOutputKind.DELTA) for sp in plain]
    kw: dict[str, Any] = dict(num_gpu_blocks=90, max_num_seqs=8)
    reference = run(make_engine(False, **kw), prompts, plain)
    engine = make_engine(True, **kw)
    add_all(engine, prompts, params)
    fired: list[int] = []
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    tuples = 0
    with armed(engine, where, after, 3, fired):
        for _ in range(2000):
            if not engine.has_unfinished_requests():
                break
            before, sent = full_state(engine), copy.deepcopy(engine._sent)
            try:
                _, outs = engine.step_compact()
            except Fault:
                assert full_state(engine) == before, "the failed call left changes behind"
                assert engine._sent == sent, "the failed call left its marks behind"
                check_consistent(engine)
                continue
            for out in outs:
                if isinstance(out, tuple):
                    got[out[0]].extend(out[1])
                    tuples += 1
                    continue
                for c in out.outputs:
                    got.setdefault(out.request_id, []).extend(c.token_ids)
                if out.finished:
                    finished.add(out.request_id)
            check_consistent(engine)
    assert fired, "the fault never fired"
    assert tuples > 10, tuples
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    assert finished == set(reference)
    assert {k: [v] for k, v in got.items()} == {k: v[0] for k, v in reference.items()}


def test_a_mutant_reading_host_ids_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launched step fed the host batch's placeholder ids instead of the device's: the
    equality check above fails."""
    real = LLMEngine._launch

    def stale(self: LLMEngine, seqs: Any, batch: Any, ids: Any) -> Any:
        return real(self, seqs, batch, None)

    monkeypatch.setattr(LLMEngine, "_launch", stale)
    prompts, n_out = trace(6, seed=1)
    params = mixed_params(n_out, sampled=False)
    sync, overlapped, _ = both(prompts, params)
    with pytest.raises(AssertionError):
        assert_same(sync, overlapped)


def test_fault_after_launch_gives_back_evicted_cached_kv() -> None:
    """The step launched by a failed call wrote into a fresh block taken from the prefix cache
    (its owner finished, its K/V still cached): the undo puts that K/V back."""
    engine = make_engine(True, num_gpu_blocks=12, max_model_len=44, max_num_seqs=4)
    bm = engine.block_manager
    engine.add_request("a", {"prompt_token_ids": list(range(1, 9))}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(bm.cached_blocks()) == 2  # a's two full prompt blocks, free and cached
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("b", {"prompt_token_ids": [9, 9, 9, 9]}, greedy)
    real = engine._launch_next
    hit: list[int] = []

    def launch_then_fail(flight: Any, plan: Any) -> Any:
        launched = real(flight, plan)
        cached = set(bm.cached_blocks()) & set(plan.fresh.tolist())
        if cached and not hit:
            hit.extend(cached)
            raise Fault("after launch")
        return launched

    engine._launch_next = launch_then_fail  # type: ignore[method-assign]
    while engine.has_unfinished_requests():
        blocks = sorted(bm.cached_blocks())
        kv = [(k[blocks].clone(), v[blocks].clone()) for k, v in engine.kv_caches]
        try:
            engine.step()
        except Fault:
            assert sorted(bm.cached_blocks()) == blocks
            for (k, v), (k0, v0) in zip(engine.kv_caches, kv):
                assert torch.equal(k[blocks], k0) and torch.equal(v[blocks], v0)
    assert hit, "no fresh block came from the prefix cache"
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks


def test_step_compact_with_async_scheduling_adds_up_to_the_synchronous_engine() -> None:
    """The engine process calls ``step_compact()``; with ``async_scheduling`` the overlapped
    steps report compact tuples too, and the new tokens of the full ``DELTA`` outputs and the
    tuples add up to the synchronous engine's, each tuple's time the step's token time."""
    prompts, n_out = trace(12, seed=3)
    plain = mixed_params(n_out, False)
    sync = run(make_engine(False), prompts, plain)
    engine = make_engine(True)
    delta = RequestOutputKind.DELTA
    add_all(engine, prompts, [dataclasses.replace(sp, output_kind=delta) for sp in plain])
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    compact = 0
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        before = engine.stats.overlapped
        when, outs = engine.step_compact()
        assert isinstance(when, float)
        for out in outs:
            if isinstance(out, tuple):  # (request id, new ids, new text, cumulative logprob)
                request_id, new_ids, _, _ = out
                assert new_ids and request_id in got and request_id not in finished
                assert engine._metrics[request_id].last_token_time == when
                got[request_id].extend(new_ids)
                compact += engine.stats.overlapped > before or bool(engine._flight)
                continue
            for c in out.outputs:
                got.setdefault(out.request_id, []).extend(c.token_ids)
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(sync)
    assert {k: [v] for k, v in got.items()} == {k: v[0] for k, v in sync.items()}
    assert engine.stats.overlapped > 20, engine.stats
    assert compact > 20, compact  # tuples from overlapped steps, not only synchronous ones


def test_serve_takes_async_scheduling() -> None:
    """``pagedkv serve --async-scheduling`` passes ``async_scheduling=True`` to the engine; off
    (the engine's default) when not given."""
    from fast.api.cli import SERVE_ENGINE_OPTIONS, build_parser

    assert "async_scheduling" in SERVE_ENGINE_OPTIONS
    assert build_parser().parse_args(["serve", "--async-scheduling"]).async_scheduling is True
    assert build_parser().parse_args(["serve"]).async_scheduling is None
    assert build_parser().parse_args(["serve", "--no-async-scheduling"]).async_scheduling is False
