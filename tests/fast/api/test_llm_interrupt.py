"""A generate call that raises (Ctrl-C between steps, a prompt refused after others were queued)
leaves nothing queued: the next call runs only its own prompts and gives what a fresh LLM
gives."""

from __future__ import annotations

from typing import Any

import pytest

from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams
from spec.errors import InvalidArgumentError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _llm(tiny: Any) -> LLM:
    return LLM(tiny, block_size=4, num_gpu_blocks=64, max_model_len=64)


def _tokens(outs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def test_ctrl_c_between_steps_aborts_the_calls_requests(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _tokens(_llm(tiny).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = _llm(tiny)
    real_step = llm.llm_engine.step
    calls = 0

    def step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(llm.llm_engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.num_free_gpu_blocks == 64  # the aborted requests' blocks came back
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in again] == PROMPTS
    assert _tokens(again) == expected


def test_a_prompt_refused_by_the_engine_leaves_the_earlier_ones_unqueued(tiny: Any) -> None:
    llm = _llm(tiny)
    vocab = llm.llm_engine.model_config.vocab_size
    with pytest.raises(InvalidArgumentError):
        llm.generate([[1, 2, 3], [4, vocab + 5]], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    (out,) = llm.generate([[8, 9]], GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == [8, 9]
