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
