"""A step that raises through ``LLM.generate``: the call's requests are aborted, the exception
reaches the caller, and the same ``LLM`` keeps working (issue: every later call used to raise
SchedulerOrderError)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fast.api.llm import LLM
from fast.engine.engine import LLMEngine
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
PROMPTS = [[1, 2, 3], list(range(5, 20)), [7] * 9]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield random_model(CONFIG, seed=1, dtype=torch.float32)
    torch.set_num_threads(threads)


def fresh(model: Any) -> LLM:
    return LLM(model, block_size=4, num_gpu_blocks=24, max_model_len=64, device="cpu")


def clean(llm: LLM) -> bool:
    e = llm.llm_engine
    e.block_manager.check_integrity()
    return not e.has_unfinished_requests() and e.num_free_gpu_blocks == e.num_gpu_blocks


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def raise_on_call(n: int, error: BaseException) -> Any:
    """A forward hook that raises ``error`` on its ``n``-th call (1-based)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise error

    return hook


@pytest.mark.parametrize("layer", [0, 1])
def test_keyboard_interrupt_in_the_model_aborts_the_call_and_keeps_the_engine(
    model: Any, layer: int
) -> None:
    expected = tokens(fresh(model))
    llm = fresh(model)
    handle = llm.llm_engine.model.model.layers[layer].register_forward_hook(
        raise_on_call(3, KeyboardInterrupt())
    )
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        handle.remove()
    assert clean(llm)  # the call's requests are gone, their blocks back
    assert tokens(llm) == expected  # and the engine works as if nothing happened


def test_keyboard_interrupt_in_the_sampler(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = tokens(fresh(model))
    llm = fresh(model)
    sampler = llm.llm_engine.sampler
    real, calls = sampler.sample, [0]

    def sample(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "sample", sample)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert clean(llm) and tokens(llm) == expected


def test_an_error_from_the_block_manager(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = tokens(fresh(model))
    llm = fresh(model)
    journal = llm.llm_engine.block_manager
    real = journal.append_batch

    def append_batch(*args: Any) -> Any:
        raise RuntimeError("planted")

    monkeypatch.setattr(journal, "append_batch", append_batch)
    with pytest.raises(RuntimeError, match="planted") as info:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert any("rolled back" in note for note in getattr(info.value, "__notes__", ["rolled back"]))
    monkeypatch.setattr(journal, "append_batch", real)
    assert clean(llm) and tokens(llm) == expected


def test_logprobs_beyond_the_vocabulary_never_break_the_engine(model: Any) -> None:
    """Refused before anything runs (SamplingParams or the engine), or run: either way the
    engine stays usable."""
    expected = tokens(fresh(model))
    llm = fresh(model)
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=3, logprobs=100_000), use_tqdm=False)
    except PagedKVError:
        pass
    assert clean(llm) and tokens(llm) == expected


def test_other_requests_continue_after_a_failed_step(model: Any) -> None:
    """Engine level: a step fails, the caller aborts one request, the others finish with the
    tokens they would have had."""
    expected = dict(zip("abc", tokens(fresh(model))))
    engine: LLMEngine = fresh(model).llm_engine
    for rid, prompt in zip("abc", PROMPTS):
        engine.add_request(rid, prompt, GREEDY)
    engine.step()
    handle = engine.model.model.layers[1].register_forward_hook(
        raise_on_call(1, ValueError("bad batch"))
    )
    with pytest.raises(ValueError, match="bad batch"):
        engine.step()
    handle.remove()
    engine.abort_request("b")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert done == {"a": expected["a"], "c": expected["c"]}
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
