"""Fault injection: a step that raises leaves the engine exactly as it was before the step.

Random request streams run on a tiny random Llama, once without faults (the reference) and once
with one exception raised at a chosen step from the model (after a chosen layer has written its
K/V), the sampler, or the block manager (at a chosen call; a call that raises changes nothing,
as the block managers promise). After the fault:

- the engine's observable state is the one it had before the failed step (scheduler queues and
  sequence fields, the block manager's tables, free queue and prefix cache, request records,
  generated tokens and text, seeded generators);
- the engine is consistent (``check_integrity``, every block accounted for, queues match the
  request tables);
- then either the step is retried (a transient fault) or one request is aborted, and every
  other request's output equals the reference, and the pool is whole at the end.

``test_a_mutant_is_caught`` plants engines that skip one part of the rollback (the scheduler,
the block manager, the sampled sequences, the seeded generators) and checks that the same budget
of examples finds each; the KV of blocks a failed step overwrote after preempting their owner
has a targeted example (random streams reach it too rarely for the budget).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fast.engine.engine as engine_module
from fast.engine.engine import LLMEngine, _StepUndo
from fast.engine.journal import JournaledBlockManager
from fast.engine.sampling_params import SamplingParams
from fast.loader import random_model
from fast.model.config import ModelConfig
from spec.errors import PagedKVError

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
)
MODEL = random_model(CONFIG, seed=0, dtype=torch.float32)
MAX_LEN = 40
BUDGET = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    database=None,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls: threads only contend (the budget below is timed with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Fault(Exception):
    """The injected failure."""


@dataclass(frozen=True)
class Setup:
    block_size: int
    num_gpu_blocks: int
    preemption_mode: str
    prefix_caching: bool
    chunked: bool


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    where: str  # "model", "sampler", "blocks" or "stop" (the stop checker, after sampling)
    after: bool  # sampler, blocks: raise after the call did its work instead of before
    step: int  # the first step (1-based) that may fail
    preempting: bool  # ... and only a step that preempts or swaps out a sequence
    call: int  # model: the layer after which it raises; blocks, stop: which call of the step
    then: str  # "retry" or "abort"
    victim: int  # the request aborted when then == "abort"
    interrupt: bool  # raise KeyboardInterrupt instead of Fault


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    bs = draw(st.sampled_from([2, 4]))
    caching = draw(st.booleans())
    return Setup(
        block_size=bs,
        # from one sequence of MAX_LEN tokens (preemption in most streams) to plenty
        num_gpu_blocks=draw(
            st.one_of(st.just(MAX_LEN // bs), st.integers(MAX_LEN // bs, 3 * MAX_LEN // bs))
        ),
        preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
        prefix_caching=caching,
        chunked=not caching and draw(st.booleans()),
    )


@st.composite
def requests(draw: st.DrawFn) -> list[Request]:
    shared = draw(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=0, max_size=8))
    out = []
    for i in range(draw(st.integers(1, 5))):
        tail = draw(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=14))
        prompt = (shared + tail)[: MAX_LEN - 2]
        greedy = draw(st.sampled_from([True, False, False]))
        params = SamplingParams(
            n=draw(st.sampled_from([1, 1, 2])),
            temperature=0.0 if greedy else 0.9,
            seed=None if greedy else 100 + i,
            max_tokens=draw(st.integers(1, 12)),
            ignore_eos=True,
        )
        out.append(Request(prompt, params))
    return out


def plans(num_requests: int) -> st.SearchStrategy[Plan]:
    return st.builds(
        Plan,
        where=st.sampled_from(["model", "sampler", "blocks", "stop"]),
        after=st.booleans(),
        step=st.integers(1, 8),
        preempting=st.booleans(),
        call=st.integers(0, 3),
        then=st.sampled_from(["retry", "abort"]),
        victim=st.integers(0, num_requests - 1),
        interrupt=st.booleans(),
    )


def make_engine(setup: Setup) -> LLMEngine:
    block_bytes = setup.block_size * CONFIG.num_key_value_heads * CONFIG.head_dim * 4 * 2 * 2
    return LLMEngine(
        MODEL,
        block_size=setup.block_size,
        num_gpu_blocks=setup.num_gpu_blocks,
        max_model_len=MAX_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=16 if setup.chunked else None,
        enable_chunked_prefill=setup.chunked,
        enable_prefix_caching=setup.prefix_caching,
        preemption_mode=setup.preemption_mode,
        swap_space=8 * block_bytes / 2**30,
        device="cpu",
        dtype="float32",
    )


def add_all(engine: LLMEngine, reqs: list[Request]) -> None:
    for i, r in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": r.prompt}, r.params)


def outputs(engine: LLMEngine, reqs: list[Request]) -> dict[str, list[list[int]]]:
    done: dict[str, list[list[int]]] = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
    assert not engine.has_unfinished_requests()
    return done


# -- the engine's observable state ------------------------------------------------------------
def state(engine: LLMEngine) -> dict[str, Any]:
    """Everything a step may change that a later step or a caller can observe."""
    sched, bm = engine.scheduler, engine.block_manager
    ids = bm.sequence_ids()
    kv = hashlib.sha1()
    for seq in sched.running:  # the KV that the running sequences' next steps read
        table = bm.block_table(seq.seq_id)
        for k, v in engine.kv_caches:
            for p in range(seq.num_computed):
                b, o = table[p // engine.config.block_size], p % engine.config.block_size
                kv.update(k[b, o].numpy().tobytes() + v[b, o].numpy().tobytes())
    return {
        "queues": [[s.seq_id for s in q] for q in (sched.waiting, sched.running, sched.swapped)],
        "seqs": {
            i: (s.num_computed, s.in_pool, s.pending, s.status, list(s.token_ids), s.output_text)
            for i, s in sched.seqs.items()
        },
        "tables": {i: (bm.block_table(i), bm.is_swapped(i), bm.num_tokens(i)) for i in ids},
        "free": (bm.free_block_order(), bm.num_free_cpu_blocks, bm.cached_blocks()),
        "requests": {
            rid: [(s.status, list(s.token_ids), s.output_text) for s in group]
            for rid, group in engine._requests.items()
        },
        "children": {p: [c.seq_id for c in cs] for p, cs in engine._children.items()},
        "generators": {i: g.get_state().tolist() for i, g in engine._generators.items()},
        "steps": engine.stats.steps,
        "kv": kv.hexdigest(),
    }


def check_consistent(engine: LLMEngine) -> None:
    sched, bm = engine.scheduler, engine.block_manager
    bm.check_integrity()
    queued = sched.waiting + sched.running + sched.swapped
    assert sorted(s.seq_id for s in queued) == sorted(sched.seqs), "queues vs sequences"
    for q, status in ((sched.waiting, "waiting"), (sched.running, "running")):
        assert all(s.status.value == status for s in q)
    assert set(bm.sequence_ids()) == {s.seq_id for s in queued if s.in_pool}
    live = {s.seq_id for group in engine._requests.values() for s in group if not s.is_finished}
    unforked = {c.seq_id for cs in engine._children.values() for c in cs}
    assert live == set(sched.seqs) | unforked, "request tables vs scheduler"
    used = {b for i in bm.sequence_ids() if not bm.is_swapped(i) for b in bm.block_table(i)}
    free = bm.num_free_gpu_blocks
    assert len(used) + free == engine.num_gpu_blocks, "a block is neither used nor free"


# -- injecting a fault --------------------------------------------------------------------------
_BLOCK_OPS = ("allocate", "append", "append_batch", "fork", "free", "swap_out", "swap_in")


@contextmanager
def fault(engine: LLMEngine, plan: Plan, fired: list[int]) -> Iterator[None]:
    """Arm ``plan`` on ``engine`` (fires once; ``fired`` records the step)."""
    error: Callable[[], BaseException] = (
        (lambda: KeyboardInterrupt()) if plan.interrupt else (lambda: Fault(plan.where))
    )
    schedule = engine.scheduler.schedule
    step = {"preempts": False, "calls": 0, "number": -1}

    def scheduled() -> Any:
        out = schedule()
        step.update(preempts=bool(out.preempted or out.swapped_out), calls=0)
        step["number"] = engine.stats.steps
        return out

    def due(counted: bool = False) -> bool:
        if (
            fired
            or engine.stats.steps + 1 < plan.step
            or (plan.preempting and not step["preempts"])
        ):
            return False
        if counted:
            step["calls"] += 1
            if step["calls"] <= plan.call:
                return False
        fired.append(engine.stats.steps)
        return True

    def wrap(owner: Any, name: str, counted: bool) -> Callable[[], None]:
        real = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if not plan.after and due(counted):
                raise error()
            result = real(*args, **kwargs)
            if plan.after and due(counted):
                raise error()
            return result

        setattr(owner, name, call)
        return lambda: vars(owner).pop(name) and None

    engine.scheduler.schedule = scheduled  # type: ignore[method-assign]
    undo: list[Callable[[], None]] = [lambda: vars(engine.scheduler).pop("schedule") and None]
    if plan.where == "model":
        layer = engine.model.model.layers[plan.call % CONFIG.num_hidden_layers]

        def hook(*_: Any) -> None:
            if due():
                raise error()

        undo.append(layer.register_forward_hook(hook).remove)
    elif plan.where == "sampler":
        undo.append(wrap(engine.sampler, "sample", False))
    elif plan.where == "stop":
        undo.append(wrap(engine._stop, "check", True))
    else:
        undo.extend(wrap(engine.block_manager, name, True) for name in _BLOCK_OPS)
    try:
        yield
    finally:
        for u in undo:
            u()


def run_with_fault(setup: Setup, reqs: list[Request], plan: Plan) -> bool:
    """One stream with ``plan`` armed, checked as the module says; False if it never fired."""
    reference_engine = make_engine(setup)
    add_all(reference_engine, reqs)
    reference = outputs(reference_engine, reqs)
    engine = make_engine(setup)
    add_all(engine, reqs)
    fired: list[int] = []
    aborted: str | None = None
    final: dict[str, list[list[int]]] = {}
    with fault(engine, plan, fired):
        for _ in range(500):
            if not engine.has_unfinished_requests():
                break
            before = state(engine)
            try:
                outs = engine.step()
            except (Fault, KeyboardInterrupt):
                assert state(engine) == before, "the failed step left changes behind"
                check_consistent(engine)
                if plan.then == "abort":
                    aborted = str(plan.victim)
                    engine.abort_request(aborted)
                    check_consistent(engine)
                continue
            final.update(
                (out.request_id, [c.token_ids for c in out.outputs]) for out in outs if out.finished
            )
    assert not engine.has_unfinished_requests()
    check_consistent(engine)
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks, "blocks leaked"
    final.pop(aborted or "", None)
    assert final == {rid: v for rid, v in reference.items() if rid != aborted}
    return bool(fired)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Setup, list[Request], Plan]:
    reqs = draw(requests())
    return draw(setups()), reqs, draw(plans(len(reqs)))


@BUDGET
@given(scenarios())
def test_a_failed_step_changes_nothing(scenario: tuple[Setup, list[Request], Plan]) -> None:
    run_with_fault(*scenario)


def _property(scenario: tuple[Setup, list[Request], Plan]) -> None:
    run_with_fault(*scenario)


MUTANTS: dict[str, tuple[Any, str, Any]] = {
    # the scheduler's queues and sequence fields are not put back
    "scheduler": (engine_module, "restore", lambda scheduler, saved: None),
    # the block manager keeps the failed step's operations
    "block manager": (JournaledBlockManager, "rollback", JournaledBlockManager.commit),
    # sampled tokens, text and stop state are not put back (faults after sampling)
    "sequences": (LLMEngine, "_saved_sequences", lambda self, seqs: None),
    # seeded generators keep the failed step's draws
    "generators": (_StepUndo, "save_rng", lambda self, *args: None),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_mutant_is_caught(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each planted mutant fails the property within the same budget (no shrinking)."""
    monkeypatch.setattr(*MUTANTS[mutant])
    with pytest.raises((AssertionError, PagedKVError)):
        settings(BUDGET, phases=[Phase.generate])(given(scenarios())(_property))()


def test_the_kv_a_failed_step_overwrote_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five prompts in 20 blocks of 2: the step that fails has preempted a sequence and
    written the K/V of layer 0 into its freed blocks; rollback restores those blocks."""
    setup = Setup(2, 20, "recompute", prefix_caching=False, chunked=False)
    reqs = [
        Request([0] * n, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
        for n, m in ((7, 1), (8, 6), (7, 6), (7, 6), (12, 5))
    ]
    plan = Plan("model", False, 1, True, 0, "retry", 0, False)
    assert run_with_fault(setup, reqs, plan)
    monkeypatch.setattr(LLMEngine, "_save_overwritten_kv", lambda self, out: None)
    with pytest.raises(AssertionError, match="left changes behind"):
        run_with_fault(setup, reqs, plan)
