"""LLM(...) with vLLM's keyword arguments: honoured, ignored with a warning, or refused; an
unknown one is a TypeError naming the close matches. Nothing is loaded before the check."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from fast.api.errors import IgnoredArgumentWarning, UnknownArgumentError, UnsupportedArgumentError
from fast.api.llm import LLM
from fast.api.vllm_args import ALIASES, IGNORED, REFUSED, engine_kwargs, known_arguments
from fast.engine.sampling_params import SamplingParams
from spec.errors import InvalidArgumentError, PagedKVError

MISSING = "/nonexistent/model.gguf"  # loading it would raise ModelNotFoundError


def _no_warning(kwargs: dict[str, Any]) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return engine_kwargs(None, kwargs)[0]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_values_raise_before_loading(name: str) -> None:
    bad: Any = {"tokenizer_mode": "mistral", "hf_overrides": {"x": 1}}.get(name, "something")
    with pytest.raises(UnsupportedArgumentError) as e:
        LLM(MISSING, **{name: bad})
    assert e.value.name == name and e.value.value == bad
    assert REFUSED[name][1] in str(e.value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_arguments_accept_what_pagedkv_does(name: str) -> None:
    for value in REFUSED[name][0]:
        if name in IGNORED and not any(value == f for f in IGNORED[name][0]):
            continue  # accepted, but with a warning (tokenizer_mode="slow")
        assert _no_warning({name: value}) == {}


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_ignored_arguments_warn_with_the_reason(name: str) -> None:
    fine, why = IGNORED[name]
    assert _no_warning({name: fine[0]}) == {}
    other: Any = {"tokenizer_mode": "slow"}.get(name, 12345)
    with pytest.warns(IgnoredArgumentWarning) as record:
        assert engine_kwargs(None, {name: other}) == ({}, None)
    (warning,) = record
    assert name in str(warning.message) and why in str(warning.message)


def test_common_vllm_call_warns_only_where_an_argument_asks_for_something() -> None:
    with pytest.warns(IgnoredArgumentWarning, match="trust_remote_code") as record:
        config, max_logprobs = engine_kwargs(
            None,
            {
                "trust_remote_code": True,
                "tensor_parallel_size": 1,
                "gpu_memory_utilization": 0.5,
                "swap_space": 2,
                "tokenizer_mode": "auto",
                "disable_log_stats": True,
                "seed": 7,
                "max_logprobs": 5,
            },
        )
    assert len(record) == 1
    assert config == {
        "tensor_parallel_size": 1,  # an EngineConfig field (docs/tensor-parallel.md)
        "gpu_memory_utilization": 0.5,
        "swap_space": 2,
        "seed": 7,
    }
    assert max_logprobs == 5


def test_pipeline_parallel_above_one_is_refused() -> None:
    with pytest.raises(UnsupportedArgumentError, match="tensor parallelism only"):
        LLM(MISSING, pipeline_parallel_size=2)
    with pytest.raises(UnsupportedArgumentError):
        LLM(MISSING, quantization="awq")


def test_a_bool_is_not_the_int_one() -> None:
    with pytest.raises(UnsupportedArgumentError):
        engine_kwargs(None, {"pipeline_parallel_size": True})


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("max_num_seq", "max_num_seqs"),
        ("trust_remote_cod", "trust_remote_code"),
        ("block_sise", "block_size"),
        ("gpu_memory_utilisation", "gpu_memory_utilization"),
    ],
)
def test_unknown_keyword_is_a_type_error_with_close_matches(typo: str, meant: str) -> None:
    with pytest.raises(UnknownArgumentError) as e:
        LLM(MISSING, **{typo: 1})
    assert isinstance(e.value, TypeError) and isinstance(e.value, PagedKVError)
    assert e.value.name == typo and e.value.close_matches[0] == meant
    assert f"did you mean {meant}" in str(e.value)


def test_unknown_keyword_without_close_match_says_so_plainly() -> None:
    with pytest.raises(UnknownArgumentError) as e:
        engine_kwargs(None, {"zzzzzz": 1})
    assert e.value.close_matches == [] and "did you mean" not in str(e.value)


def test_every_known_argument_is_classified() -> None:
    known = set(known_arguments())
    assert {"trust_remote_code", "tensor_parallel_size", "block_size", "seed"} <= known
    assert set(ALIASES) <= known


def test_num_gpu_blocks_override_is_num_gpu_blocks(tiny: Any) -> None:
    llm = LLM(tiny, num_gpu_blocks_override=40, block_size=4, max_model_len=64)
    assert llm.llm_engine.num_gpu_blocks == 40


def test_seed_none_draws_a_fresh_seed() -> None:
    seeds = {engine_kwargs(None, {"seed": None})[0]["seed"] for _ in range(4)}
    assert len(seeds) == 4 and all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


def test_tokenizer_is_only_the_models_own(tmp_path: Any) -> None:
    assert _no_warning({"tokenizer": None}) == {}
    assert engine_kwargs(str(tmp_path), {"tokenizer": str(tmp_path)}) == ({}, None)
    with pytest.raises(UnsupportedArgumentError, match="tokenizer"):
        engine_kwargs(str(tmp_path), {"tokenizer": "gpt2"})


def test_max_logprobs_is_honoured(tiny: Any) -> None:
    llm = LLM(tiny, block_size=4, num_gpu_blocks=32, max_model_len=64, max_logprobs=2)
    ok = SamplingParams(max_tokens=2, logprobs=2, temperature=0)
    assert len(llm.generate([1, 2, 3], ok, use_tqdm=False)[0].outputs[0].token_ids) == 2
    with pytest.raises(InvalidArgumentError, match="max_logprobs=2"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2, logprobs=3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(UnsupportedArgumentError):
        engine_kwargs(None, {"max_logprobs": -1})


def test_ignored_argument_warning_points_at_the_caller(tiny: Any) -> None:
    with pytest.warns(IgnoredArgumentWarning) as record:
        LLM(tiny, block_size=4, num_gpu_blocks=32, max_model_len=64, trust_remote_code=True)
    assert record[0].filename == __file__


def test_docs_list_every_decision() -> None:
    from pathlib import Path

    page = (Path(__file__).parents[3] / "docs" / "api.md").read_text()
    for name in [*REFUSED, *IGNORED, *ALIASES, "max_logprobs"]:
        assert f"`{name}" in page, name
