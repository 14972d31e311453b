"""Property: any JSON body sent to the generation endpoints gets either a well-formed response
(200, OpenAI's shape; a stream of JSON chunks ending in ``[DONE]``) or a 4xx in OpenAI's error
shape, never a 5xx or a hang; and afterwards every block is free.

Bodies are drawn two ways: arbitrary JSON values, and objects over the endpoint's real field names
(and misspellings of them) with values that are sometimes valid and sometimes any JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fast.api.llm import LLM  # noqa: E402
from fast.api.server import BackgroundServer, ServerConfig, build_app  # noqa: E402

ENGINE = dict(block_size=4, num_gpu_blocks=64, max_model_len=64)
EXAMPLES = 30

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=40)
numbers = st.floats(min_value=-1, max_value=3, allow_nan=False) | small_ints
text = st.text(max_size=30)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "robot"]),
        "content": text | json_values,
    }
)

COMMON: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["char", "other"]) | json_values,
    "max_tokens": small_ints | json_values,
    "temperature": numbers,
    "top_p": numbers,
    "top_k": small_ints,
    "min_p": numbers,
    "n": st.integers(min_value=-1, max_value=4),
    "seed": st.integers() | json_values,
    "stop": text | st.lists(text, max_size=3) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "user": text | json_values,
    "ignore_eos": st.booleans(),
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": numbers,
    "logit_bias": st.dictionaries(st.integers(-5, 80).map(str), numbers, max_size=3) | json_values,
    "max_tokn": json_values,  # a misspelling
}
COMPLETION = {
    **COMMON,
    "prompt": text | st.lists(st.integers(-2, 70), max_size=70) | st.lists(text, max_size=3),
    "echo": st.booleans() | json_values,
    "logprobs": st.integers(-1, 25) | json_values,
    "suffix": st.none() | text,
    "best_of": st.integers(0, 3),
}
CHAT = {
    **COMMON,
    "messages": st.lists(message, max_size=3) | json_values,
    "max_completion_tokens": small_ints,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": st.integers(-1, 25),
    "tools": st.none() | st.lists(json_values, max_size=1),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
}


words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=20)
GOOD_COMMON: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just("char"),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 40),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 2**32),
    "stop": words | st.lists(words, min_size=1, max_size=3),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.integers(0, 40).map(str), st.floats(-100, 100), max_size=3),
    "user": words,
}
GOOD_COMPLETION = {
    **GOOD_COMMON,
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "prompt": words | st.lists(words, min_size=1, max_size=3),
}
GOOD_CHAT = {
    **GOOD_COMMON,
    "logprobs": st.booleans(),
    "max_completion_tokens": st.integers(1, 8),
}


def bodies(
    fields: dict[str, st.SearchStrategy[Any]],
    good: dict[str, st.SearchStrategy[Any]],
    base: st.SearchStrategy[dict[str, Any]],
) -> st.SearchStrategy[Any]:
    """Valid bodies with valid extras (mostly 200), valid bodies with any extras, any JSON."""

    def extend(pool: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
        keys = st.lists(st.sampled_from(sorted(pool)), unique=True, max_size=6)
        extra = keys.flatmap(lambda ks: st.fixed_dictionaries({k: pool[k] for k in ks}))
        return st.tuples(base, extra).map(lambda t: {**t[0], **t[1]})

    return st.one_of(extend(good), extend(good), extend(fields), json_values)


completion_base = st.fixed_dictionaries({"prompt": words, "max_tokens": st.integers(1, 6)})
chat_base = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": words}),
            min_size=1,
            max_size=2,
        ),
        "max_tokens": st.integers(1, 6),
    }
)


@pytest.fixture(scope="module")
def server(char_model: Path) -> Iterator[BackgroundServer]:
    llm = LLM(str(char_model), **ENGINE)
    with BackgroundServer(build_app(llm, ServerConfig(served_model_name="char"))) as srv:
        yield srv
    assert llm.llm_engine.num_free_gpu_blocks == ENGINE["num_gpu_blocks"]


def check_response(r: httpx.Response, stream: bool) -> None:
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]
        return
    if not stream:
        body = r.json()
        assert body["object"] in ("text_completion", "chat.completion")
        assert isinstance(body["choices"], list) and body["choices"]
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        return
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", r.text[-300:]
    for item in data[:-1]:
        chunk = json.loads(item)
        assert "error" not in chunk, chunk
        assert chunk["object"] in ("text_completion", "chat.completion.chunk")


def _post(srv: BackgroundServer, path: str, body: Any) -> None:
    stream = isinstance(body, dict) and body.get("stream") is True
    r = httpx.post(srv.url + path, content=json.dumps(body).encode(), timeout=30)
    hypothesis.event(f"status {r.status_code}")
    check_response(r, stream)


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(body=bodies(COMPLETION, GOOD_COMPLETION, completion_base))
def test_any_completion_body(server: BackgroundServer, body: Any) -> None:
    _post(server, "/v1/completions", body)


@SETTINGS
@given(body=bodies(CHAT, GOOD_CHAT, chat_base))
def test_any_chat_body(server: BackgroundServer, body: Any) -> None:
    _post(server, "/v1/chat/completions", body)


def test_blocks_free_after_the_properties(server: BackgroundServer) -> None:
    front = server.app.state.pagedkv.front
    deadline = time.monotonic() + 20
    while front.snapshot.num_free_gpu_blocks != ENGINE["num_gpu_blocks"]:
        assert time.monotonic() < deadline, front.snapshot
        time.sleep(0.02)
    assert httpx.get(server.url + "/health").status_code == 200
