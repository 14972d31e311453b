"""SamplingParams: vLLM defaults, normalization, and named errors carrying the bad values."""

from __future__ import annotations

from typing import Any

import pytest

from fast.engine.sampling_params import InvalidSamplingParamsError, SamplingParams
from spec.errors import PagedKVError


def test_defaults_are_vllms() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.min_tokens) == (
        1,
        1.0,
        1.0,
        0,
        None,
        16,
        0,
    )
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (None, None, False, None)
    assert not p.is_greedy and p.top_k_or_none is None


def test_normalization() -> None:
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(top_k=-1).top_k_or_none is None
    assert SamplingParams(top_k=5).top_k_or_none == 5


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n=0), "n"),
        (dict(n=1.5), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(seed="7"), "seed"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop_token_ids=[1, -2]), "stop_token_ids"),
        (dict(n=True), "n"),
    ],
)
def test_invalid_values_raise_with_name_and_value(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**kwargs)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, PagedKVError)
    assert err.name == name
    assert err.value == kwargs[name] or err.value != err.value  # NaN
    assert name in str(err) and repr(kwargs[name])[:3] in str(err)


def test_min_tokens_error_names_max_tokens() -> None:
    with pytest.raises(InvalidSamplingParamsError, match="max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_vllm_sampling_fields_and_defaults() -> None:
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (
        0.0,
        0.0,
        1.0,
        0.0,
    )
    assert (p.prompt_logprobs, p.logits_processors) == (None, None)
    assert not p.has_penalties and not p.needs_history
    assert SamplingParams(repetition_penalty=1.2).needs_history
    assert SamplingParams(logits_processors=[lambda ids, x: x]).needs_history


NUMBER_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
]
INT_FIELDS = ["n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed"]


@pytest.mark.parametrize("name", NUMBER_FIELDS + INT_FIELDS)
def test_booleans_are_not_numbers(name: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{name: True})
    assert info.value.name == name and info.value.value is True


@pytest.mark.parametrize("name", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "0.5", None])
def test_floats_must_be_finite_numbers(name: str, value: Any) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{name: value})
    assert info.value.name == name


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(prompt_logprobs=2.0), "prompt_logprobs"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(seed=2**64 - 1, n=2), "seed"),  # sequence 1 would use seed + 1 = 2**64
        (dict(seed=1.0), "seed"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(detokenize="yes"), "detokenize"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(logits_processors=lambda ids, x: x), "logits_processors"),
        (dict(logits_processors=[1]), "logits_processors"),
    ],
)
def test_more_invalid_values(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.name == name
    assert info.value.value is kwargs[name] or info.value.value == kwargs[name]


def test_seed_range_ends_are_accepted() -> None:
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(seed=2**64 - 3, n=3).seed == 2**64 - 3
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2, min_p=1).min_p == 1


def test_unknown_keyword_names_close_matches() -> None:
    from fast.engine.sampling_params import UnknownSamplingParamError

    with pytest.raises(UnknownSamplingParamError) as info:
        SamplingParams(temprature=0.5)  # type: ignore[call-arg]
    err = info.value
    assert err.name == "temprature" and err.value == 0.5
    assert err.suggestions[0] == "temperature" and "temperature" in str(err)
    assert isinstance(err, TypeError) and isinstance(err, InvalidSamplingParamsError)
    with pytest.raises(UnknownSamplingParamError) as info:
        SamplingParams(best_of_everything=2)  # type: ignore[call-arg]
    assert info.value.suggestions == [] and "did you mean" not in str(info.value)


def test_check_vocab_size_names_the_field() -> None:
    SamplingParams(logprobs=10, prompt_logprobs=10).check_vocab_size(10)
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(logprobs=100000).check_vocab_size(49152)
    assert (info.value.name, info.value.value) == ("logprobs", 100000)
    assert "49152" in str(info.value)
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(prompt_logprobs=11).check_vocab_size(10)
    assert (info.value.name, info.value.value) == ("prompt_logprobs", 11)


def test_copy_and_replace_keep_working() -> None:
    import copy
    import dataclasses
    import pickle

    p = SamplingParams(temperature=0.5, stop=["x"], seed=3)
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    assert dataclasses.replace(p, seed=4).seed == 4
    with pytest.raises(InvalidSamplingParamsError):
        dataclasses.replace(p, seed=True)


def test_any_values_give_a_named_error_or_params_the_sampler_runs() -> None:
    """Arbitrary values for every field: either InvalidSamplingParamsError naming a field, or
    parameters that the vocabulary check and the sampler take without any other error."""
    import math

    import torch
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fast.engine.sampler import Sampler

    vocab = 12
    anything = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.integers(min_value=-3, max_value=20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-3, max_value=3),
        st.text(max_size=3),
        st.lists(st.integers(min_value=-2, max_value=15), max_size=3),
    )
    fields = st.dictionaries(st.sampled_from(_FIELD_NAMES), anything, max_size=5)

    @settings(max_examples=300, deadline=None)
    @given(fields, st.integers(min_value=0, max_value=2**31))
    def check(kwargs: dict[str, Any], seed: int) -> None:
        try:
            p = SamplingParams(**kwargs)
            p.check_vocab_size(vocab)
        except InvalidSamplingParamsError as e:
            assert e.name in _FIELD_NAMES and e.name in str(e)
            return
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, vocab, generator=g)
        gens = [
            torch.Generator().manual_seed(p.seed + i) if p.seed is not None else None
            for i in range(2)
        ]
        hist = [([1, 2], [3, 3]), ([0], [])]
        out = Sampler().sample(x, [p, p], gens, histories=hist)
        assert all(0 <= t < vocab for t in out.tokens)
        assert all(math.isfinite(v) and v <= 0 for v in out.sampled_logprobs)
        if p.logprobs is not None:
            assert all(lp is not None and len(lp) >= max(1, p.logprobs) for lp in out.logprobs)

    check()


_FIELD_NAMES = [
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "detokenize",
    "skip_special_tokens",
    "include_stop_str_in_output",
]


def test_stop_strings_need_text() -> None:
    # matched in the detokenized text: without it they would be ignored, silently
    with pytest.raises(InvalidSamplingParamsError, match="detokenize=True") as e:
        SamplingParams(stop="###", detokenize=False)
    assert (e.value.name, e.value.value) == ("stop", "###")
    assert SamplingParams(stop_token_ids=[7], detokenize=False).stop_token_ids == [7]


def test_stop_strings_on_a_model_without_tokenizer_are_refused() -> None:
    import torch

    from fast.engine.engine import LLMEngine
    from fast.loader import random_model
    from fast.model.config import ModelConfig
    from spec.errors import InvalidArgumentError

    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    engine = LLMEngine(random_model(cfg, dtype=torch.float32, device="cpu"), device="cpu")
    with pytest.raises(InvalidArgumentError, match="tokenizer") as e:
        engine.add_request("r", [1, 2, 3], SamplingParams(stop="x"))
    assert e.value.name == "stop" and not engine.has_unfinished_requests()
