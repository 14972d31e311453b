"""Validation at the door: arbitrary prompts and sampling values either run correctly or raise a
named pagedkv error before anything runs; never a raw TypeError, never a broken engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_llm_model import VOCAB, make_char_model

from fast.api.llm import LLM
from fast.engine.inputs import InvalidPromptError
from fast.engine.sampling_params import SamplingParams
from spec.errors import InvalidArgumentError, PagedKVError

MAX_LEN = 24


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = make_char_model(tmp_path_factory.mktemp("char") / "m")
    yield LLM(str(path), num_gpu_blocks=2 * MAX_LEN, block_size=2, max_model_len=MAX_LEN)
    torch.set_num_threads(threads)


def untouched(llm: LLM) -> bool:
    e = llm.llm_engine
    return not e.has_unfinished_requests() and e.num_free_gpu_blocks == e.num_gpu_blocks


@pytest.mark.parametrize(
    ("prompts", "index", "words"),
    [
        (["hi", 5, "bye"], 1, "bare token id"),
        (b"hello", None, "bytes"),
        ({"prompt_token_ids": [1.7, 2.9]}, 0, "float"),
        ({"prompt_token_ids": "hello"}, 0, "not a str"),
        (None, None, "NoneType"),
        (7, None, "int is not a prompt"),
        (2.5, None, "float"),
        ([True, 4], 0, "bool"),
        ([[3, 4], [len(VOCAB)]], 1, f"outside the vocabulary [0, {len(VOCAB)})"),
        ([[3, 4], [-1]], 1, "outside the vocabulary"),
        (["ok", ""], 1, "empty prompt"),
        ([[3] * (MAX_LEN + 1)], 0, f"{MAX_LEN + 1} tokens, longer than max_model_len {MAX_LEN}"),
        ({"prompt": 5}, 0, "must be a string"),
        ({"text": "hi"}, 0, "unknown keys ['text']"),
        ([{"prompt": "a"}, {}], 1, "needs 'prompt' or 'prompt_token_ids'"),
    ],
)
def test_bad_prompts_are_named_by_index(
    llm: LLM, prompts: Any, index: int | None, words: str
) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    with pytest.raises(InvalidPromptError) as info:
        llm.generate(prompts, greedy, use_tqdm=False)
    assert info.value.index == index and words in str(info.value)
    assert isinstance(info.value, InvalidArgumentError)
    assert untouched(llm)  # the good prompts before the bad one were not queued either


def test_every_form_vllm_accepts(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode("hey")
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    forms: list[Any] = [
        "hey",
        ["hey"],
        ids,
        [ids],
        tuple(ids),
        {"prompt": "hey"},
        {"prompt_token_ids": ids},
        {"prompt_token_ids": ids, "prompt": "hey"},
        ["hey", {"prompt_token_ids": ids}, ids],
    ]
    expected = llm.generate("hey", greedy, use_tqdm=False)[0].outputs[0].token_ids
    for form in forms:
        outs = llm.generate(form, greedy, use_tqdm=False)
        assert all(o.prompt_token_ids == ids for o in outs), form
        assert [o.outputs[0].token_ids for o in outs] == [expected] * len(outs), form
    assert len(llm.generate(["hey", "hey", "hey"], greedy, use_tqdm=False)) == 3
    assert llm.generate([], greedy, use_tqdm=False) == []
    assert untouched(llm)


# -- arbitrary values --------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, len(VOCAB) + 2),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(alphabet="abc xyz?!é", max_size=8),
    st.binary(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "x"]), inner, max_size=2),
    ),
    max_leaves=8,
)
token_lists = st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=MAX_LEN - 2)
good_prompts = st.one_of(
    st.text(alphabet="abcdef ghij", min_size=1, max_size=10),
    token_lists,
    st.builds(lambda ids: {"prompt_token_ids": ids}, token_lists),
)
prompts = st.one_of(values, good_prompts, st.lists(st.one_of(good_prompts, values), max_size=3))
sampling_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 4),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.integers(-1, 70), max_size=2),
)
sampling_kwargs = st.dictionaries(
    st.sampled_from(
        [
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "max_tokens",
            "min_tokens",
            "logprobs",
            "stop",
            "stop_token_ids",
            "n",
            "ignore_eos",
        ]
    ),
    sampling_values,
    max_size=3,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(prompt=prompts, kwargs=sampling_kwargs)
def test_arbitrary_input_runs_or_raises_a_named_error(
    llm: LLM, prompt: Any, kwargs: dict[str, Any]
) -> None:
    kwargs = {"max_tokens": 4, **kwargs}
    if isinstance(kwargs.get("n"), int) and kwargs["n"] > 4:
        kwargs["n"] = 4  # keep the run short; n's validation is tested with small values
    try:
        params = SamplingParams(**kwargs)
        outs = llm.generate(prompt, params, use_tqdm=False)
    except PagedKVError:
        assert untouched(llm)
        return
    expected = llm.llm_engine.parse_prompts(prompt)
    assert [o.prompt_token_ids for o in outs] == [p.token_ids for p in expected]
    for out in outs:
        assert out.finished and len(out.outputs) == params.n
        for c in out.outputs:
            assert 1 <= len(c.token_ids) and c.finish_reason in ("stop", "length")
            total = len(out.prompt_token_ids) + len(c.token_ids)
            assert total <= max(MAX_LEN, len(out.prompt_token_ids) + 1)
    assert untouched(llm)
