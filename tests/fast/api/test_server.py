"""``pagedkv serve`` with the official ``openai`` client (sync, async, streaming) on the tiny
character-level model: completions, chat, n = 2, seeds, stop strings, logprobs and streaming
usage equal ``LLM.generate`` / ``LLM.chat`` on the same inputs; the error shapes and statuses;
disconnects, back-pressure and shutdown free every block; the CLI serves and stops on SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")

from fast.api.llm import LLM  # noqa: E402
from fast.api.server import BackgroundServer, ServerConfig, build_app  # noqa: E402
from fast.engine.sampling_params import SamplingParams  # noqa: E402

NAME = "char"
ENGINE = dict(block_size=4, num_gpu_blocks=96, max_model_len=128)
TIMEOUT = 60.0


def _llm(model: Path) -> LLM:
    return LLM(str(model), **ENGINE)


@pytest.fixture(scope="module")
def reference(char_model: Path) -> LLM:
    """The same model and engine settings, called offline."""
    return _llm(char_model)


@pytest.fixture(scope="module", params=["engine-thread", "engine-process", "async-scheduling"])
def server(char_model: Path, request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    """The server with its engine in a thread of this process, then in a process of its own
    (``pagedkv serve --engine-process``), then there with overlapped scheduling
    (``--async-scheduling``): every test runs on all three."""
    llm: Any
    if request.param != "engine-thread":
        from fast.api.engine_process import EngineProcess

        overlap = request.param == "async-scheduling"
        llm = EngineProcess(str(char_model), **ENGINE, async_scheduling=overlap)
    else:
        llm = _llm(char_model)
    app = build_app(llm, ServerConfig(served_model_name=NAME))
    with BackgroundServer(app) as srv:
        yield srv
    if request.param != "engine-thread":
        assert not llm._proc.is_alive()  # the shutdown stopped the engine process


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT)


def _engine(srv: BackgroundServer) -> Any:
    return srv.app.state.pagedkv.front


def wait_all_free(srv: BackgroundServer, timeout: float = 20.0) -> None:
    """Every block free and no request left in the engine (aborts are applied between steps)."""
    front = _engine(srv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = front.snapshot
        if (
            snap.num_free_gpu_blocks == snap.num_gpu_blocks
            and snap.running + snap.waiting + snap.swapped == 0
            and not front._tracked
        ):
            return
        time.sleep(0.02)
    snap = front.snapshot
    raise AssertionError(f"blocks not freed: {snap}")


def _generate(llm: LLM, prompt: Any, **params: Any) -> Any:
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)


def _chat_reference(llm: LLM, messages: list[dict[str, str]], **params: Any) -> Any:
    return llm.chat(messages, SamplingParams(**params), use_tqdm=False)[0]


# -- results equal LLM.generate ------------------------------------------------------------


def test_completions_equal_generate(client: Any, reference: LLM) -> None:
    prompts = ["hello there", "the cat sat", "abc"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=12, temperature=0)
    expected = _generate(reference, prompts, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [e.outputs[0].text for e in expected]
    assert [c.finish_reason for c in r.choices] == [e.outputs[0].finish_reason for e in expected]
    n_prompt = sum(len(e.prompt_token_ids) for e in expected)
    n_out = sum(len(e.outputs[0].token_ids) for e in expected)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)
    assert r.usage.total_tokens == n_prompt + n_out


def test_token_id_prompts_and_echo(client: Any, reference: LLM) -> None:
    ids = reference.get_tokenizer().encode("hi you")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0, echo=True)
    expected = _generate(reference, {"prompt_token_ids": ids}, max_tokens=5, temperature=0)[0]
    prompt_text = reference.get_tokenizer().decode(ids, skip_special_tokens=False)
    assert r.choices[0].text == prompt_text + expected.outputs[0].text


def test_echo_with_logprobs_scores_the_prompt(client: Any, reference: LLM) -> None:
    """echo + logprobs returns the prompt tokens' log-probabilities (None for the first) before
    the generated ones, equal to LLM.generate's prompt_logprobs and logprobs."""
    r = client.completions.create(
        model=NAME, prompt="abc", max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    ref = _generate(reference, "abc", max_tokens=3, temperature=0, logprobs=1, prompt_logprobs=1)[0]
    lp = r.choices[0].logprobs
    ids = ref.prompt_token_ids + ref.outputs[0].token_ids
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    want = [e[t].logprob for t, e in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
    want += [e[t].logprob for t, e in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert r.choices[0].text == "abc" + ref.outputs[0].text


def test_chat_equals_llm_chat(client: Any, reference: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=10, temperature=0
    )
    expected = _chat_reference(reference, messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_n2_with_a_seed_is_reproducible_and_equals_generate(client: Any, reference: LLM) -> None:
    kw: dict[str, Any] = dict(max_tokens=10, temperature=1.0, n=2, seed=1234)
    a = client.completions.create(model=NAME, prompt="once upon", **kw)
    b = client.completions.create(model=NAME, prompt="once upon", **kw)
    expected = _generate(reference, "once upon", **kw)[0]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts == [o.text for o in expected.outputs]
    assert texts[0] != texts[1]  # two samples, not one twice
    other = client.completions.create(model=NAME, prompt="once upon", **{**kw, "seed": 99})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_stop_strings_sync_and_streamed(client: Any, reference: LLM) -> None:
    base = _generate(reference, "hello", max_tokens=30, temperature=0)[0].outputs[0].text
    stop = base[5:7]  # a two-character string the greedy text reaches
    assert len(stop) == 2
    expected = _generate(reference, "hello", max_tokens=30, temperature=0, stop=[stop])[0]
    assert expected.outputs[0].finish_reason == "stop"
    r = client.completions.create(
        model=NAME, prompt="hello", max_tokens=30, temperature=0, stop=stop
    )
    assert r.choices[0].text == expected.outputs[0].text
    assert r.choices[0].finish_reason == "stop"
    pieces = []
    for chunk in client.completions.create(
        model=NAME, prompt="hello", max_tokens=30, temperature=0, stop=[stop], stream=True
    ):
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == expected.outputs[0].text  # no prefix of the stop string leaked


def test_a_stream_holds_back_a_stop_string_once(client: Any, reference: LLM) -> None:
    """While it runs, a stream lags the text by ``len(stop) - 1`` characters, no more: in both
    arrangements (the engine process's outputs are already held back; the server must not
    withhold the same characters again). Each chunk's logprobs name the tokens it covers, so the
    lag is checked at every chunk whatever steps an engine process merged into one."""
    stop = "\u20ac" * 6  # never produced by the character model: holdback 5
    full = _generate(reference, "hello", max_tokens=12, temperature=0)[0].outputs[0].text
    assert stop not in full
    sent = seen = ""  # text streamed so far; text of the tokens streamed so far
    lags = []
    chunks = client.completions.create(
        model=NAME, prompt="hello", max_tokens=12, temperature=0, stop=[stop], stream=True,
        logprobs=0,
    )  # fmt: skip
    for chunk in chunks:
        c = chunk.choices[0]
        sent += c.text
        seen += "".join(c.logprobs.tokens) if c.logprobs is not None else ""
        lags.append((len(seen), len(seen) - len(sent)))
    assert sent == full == seen
    running = lags[:-1]  # the last chunk finishes the stream and sends the rest
    assert running and all(lag == min(n, 5) for n, lag in running), lags
    assert any(n > 5 for n, _ in running), lags  # a chunk where a double holdback would show


def test_concurrent_streams_equal_generate(client: Any, reference: LLM) -> None:
    """Streams running at once (the engine process sends the running n = 1 requests without
    logprobs as compact reports, the rest as full deltas) join to LLM.generate's texts: greedy
    and seeded, a stop string reached after its holdback began, n = 2, logprobs, and the usage
    counts."""
    from concurrent.futures import ThreadPoolExecutor

    base = _generate(reference, "the cat", max_tokens=25, temperature=0)[0].outputs[0].text
    cases = [
        ("hello", dict(max_tokens=20, temperature=0, stop=["\u20ac" * 6])),
        ("the cat", dict(max_tokens=25, temperature=0, stop=[base[8:11], "\u20ac" * 4])),
        ("the cat", dict(max_tokens=25, temperature=0)),
        ("once", dict(max_tokens=15, temperature=1.0, seed=5)),
        ("abc", dict(max_tokens=10, temperature=1.0, seed=3, n=2)),
        ("hey", dict(max_tokens=12, temperature=0, logprobs=1)),
    ]

    def stream(prompt: str, kw: dict[str, Any]) -> tuple[dict[int, str], Any]:
        texts: dict[int, str] = {}
        usage = None
        chunks = client.completions.create(
            model=NAME, prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw
        )
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
            usage = chunk.usage or usage
        return texts, usage

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: stream(*case), cases))
    for (prompt, kw), (texts, usage) in zip(cases, results, strict=True):
        expected = _generate(reference, prompt, **kw)[0]
        assert [texts[i] for i in sorted(texts)] == [o.text for o in expected.outputs], prompt
        assert usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)


def test_logprobs_equal_generate(client: Any, reference: LLM) -> None:
    r = client.completions.create(model=NAME, prompt="hey", max_tokens=6, temperature=0, logprobs=2)
    out = _generate(reference, "hey", max_tokens=6, temperature=0, logprobs=2)[0].outputs[0]
    lp = r.choices[0].logprobs
    tok = reference.get_tokenizer()
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in out.token_ids]
    want = [entry[t].logprob for t, entry in zip(out.token_ids, out.logprobs)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-5)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    messages = [{"role": "user", "content": "hey"}]
    c = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    ref = _chat_reference(reference, messages, max_tokens=4, temperature=0, logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    for item, t, entry in zip(content, ref.outputs[0].token_ids, ref.outputs[0].logprobs):
        assert item.logprob == pytest.approx(entry[t].logprob, abs=1e-5)
        assert len(item.top_logprobs) == 3
        ranked = [x.logprob for x in item.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert bytes(item.bytes).decode() == item.token


def test_streaming_usage_sync(client: Any, reference: LLM) -> None:
    messages = [{"role": "user", "content": "tell me"}]
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = _chat_reference(reference, messages, max_tokens=9, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected.outputs[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == expected.outputs[0].finish_reason and set(finals[:-1]) == {None}
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert last.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_async_client_streams_concurrently(server: BackgroundServer, reference: LLM) -> None:
    prompts = ["one", "two two", "three", "four", "five five", "six"]

    async def run() -> list[tuple[str, Any]]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT)

        async def one(p: str) -> tuple[str, Any]:
            stream = await aclient.completions.create(
                model=NAME,
                prompt=p,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].text
                usage = ch.usage or usage
            return text, usage

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    got = asyncio.run(run())
    expected = _generate(reference, prompts, max_tokens=8, temperature=0)
    assert [t for t, _ in got] == [e.outputs[0].text for e in expected]
    assert [u.completion_tokens for _, u in got] == [8] * len(prompts)
    wait_all_free(server)


def test_streamed_n2_choices_equal_generate(client: Any, reference: LLM) -> None:
    kw: dict[str, Any] = dict(max_tokens=7, temperature=0.8, n=2, seed=5)
    texts = ["", ""]
    for ch in client.completions.create(model=NAME, prompt="go", stream=True, **kw):
        texts[ch.choices[0].index] += ch.choices[0].text
    expected = _generate(reference, "go", **kw)[0]
    assert texts == [o.text for o in expected.outputs]


# -- the other endpoints --------------------------------------------------------------------


def test_models_health_tokenize_detokenize(server: BackgroundServer, client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "abc", "add_special_tokens": False})
    assert tok.json() == {"count": 3, "max_model_len": 128, "tokens": tok.json()["tokens"]}
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok.json()["tokens"]})
    assert back.json() == {"prompt": "abc"}
    chat = httpx.post(
        server.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.json()["count"] == len("u:x;a:")


def test_metrics_count_requests(server: BackgroundServer, client: Any, reference: LLM) -> None:
    def value(text: str, name: str) -> float:
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found)

    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=NAME, prompt="abcd", max_tokens=5, temperature=0)
    after = httpx.get(server.url + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "pagedkv:num_free_gpu_blocks",
        "pagedkv:preemptions_total",
        "pagedkv:copy_on_write_blocks_total",
    ):
        assert re.search(rf"^{re.escape(name)}[{{ ]", after, re.M), name
    d = lambda n: value(after, n) - value(before, n)  # noqa: E731
    assert d("vllm:generation_tokens_total") == 5
    assert d("vllm:prompt_tokens_total") == len(reference.get_tokenizer().encode("abcd"))
    assert d("vllm:request_success_total") == 1
    if reference.llm_engine.config.enable_prefix_caching:  # the engine's stats, scraped
        assert d("vllm:prefix_cache_queries_total") == len(reference.get_tokenizer().encode("abcd"))
    assert d("vllm:time_to_first_token_seconds_count") == 1
    assert d("vllm:inter_token_latency_seconds_count") == 4
    assert d("vllm:e2e_request_latency_seconds_count") == 1
    assert value(after, "pagedkv:num_free_gpu_blocks") == ENGINE["num_gpu_blocks"]


def test_every_token_after_the_first_is_one_inter_token_observation(reference: LLM) -> None:
    """Tokens that arrive together (an engine process merges the steps the server has not read
    yet) are still one inter-token observation each, those that came with the first token with
    no time between them: the count is the tokens less one whatever the grouping."""
    from fast.api.async_engine import AsyncEngine, RequestStream, _Tracked

    seen: dict[str, list[float]] = {"ttft": [], "gaps": []}

    class Observer:
        def first_token(self, ttft: float, prompt_tokens: int) -> None:
            seen["ttft"].append(ttft)

        def token_gap(self, seconds: float) -> None:
            seen["gaps"].append(seconds)

        def finished(self, *args: Any) -> None:
            pass

    front = AsyncEngine(reference.llm_engine, 4)
    front.observer = Observer()
    front._tracked["r"] = _Tracked(time.monotonic(), time.time(), RequestStream(front, ["r"]))
    first = _generate(reference, "abcd", max_tokens=2, temperature=0)[0]
    final = _generate(reference, "abcd", max_tokens=5, temperature=0)[0]
    front._deliver([first.__class__(**{**first.__dict__, "request_id": "r", "finished": False})])
    front._deliver([final.__class__(**{**final.__dict__, "request_id": "r"})])
    assert len(seen["ttft"]) == 1 and len(seen["gaps"]) == 4
    assert seen["gaps"][0] == 0.0 and all(g > 0 for g in seen["gaps"][1:])


def test_an_abort_that_comes_after_the_engine_finished_counts_the_request_once(
    reference: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine in its own process runs ahead of the server's engine thread: a client's abort
    can reach it after the request finished there, and the engine answers None (unknown id)
    while the request's final output waits, already decoded, behind that answer. The request
    stays tracked until that output arrives and is counted once, by its own finish reason (it
    was counted nowhere before: the abort forgot it and the final output found nothing)."""
    from fast.api.async_engine import AsyncEngine, RequestStream, _Abort, _Tracked

    seen: list[tuple[str, str | None, bool]] = []

    class Observer:
        def first_token(self, ttft: float, prompt_tokens: int) -> None:
            pass

        def token_gap(self, seconds: float) -> None:
            pass

        def finished(self, out: Any, e2e: float, queue: float | None, aborted: bool) -> None:
            seen.append((out.request_id, out.outputs[0].finish_reason, aborted))

    front = AsyncEngine(reference.llm_engine, 4)
    front.observer = Observer()
    monkeypatch.setattr(front, "_call_many", lambda calls: [(True, None) for _ in calls])
    front._tracked["r"] = _Tracked(time.monotonic(), time.time(), RequestStream(front, ["r"]))
    front._commands.append(_Abort("r"))
    front._drain()
    assert "r" in front._tracked and seen == []  # not forgotten, not counted yet
    final = _generate(reference, "abcd", max_tokens=3, temperature=0)[0]
    front._deliver([final.__class__(**{**final.__dict__, "request_id": "r"})])
    assert seen == [("r", "length", False)] and "r" not in front._tracked


# -- errors ---------------------------------------------------------------------------------


def _post(url: str, body: Any, raw: bytes | None = None, **kw: Any) -> httpx.Response:
    if raw is not None:
        return httpx.post(url, content=raw, timeout=TIMEOUT, **kw)
    return httpx.post(url, json=body, timeout=TIMEOUT, **kw)


BAD: list[tuple[str, Any, int, str | None, str]] = [
    # (endpoint, body, status, param, a word of the message)
    ("completions", {"prompt": "x", "max_token": 4}, 400, "max_token", "did you mean max_tokens"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", "n"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "at most 20"),
    (
        "completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream",
    ),  # fmt: skip
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    ("completions", {"prompt": "x" * 200}, 400, "prompt", "longer than max_model_len 128"),
    ("completions", {"prompt": "x" * 100, "max_tokens": 40}, 400, "max_tokens", "128 tokens"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"prompt": []}, 400, "prompt", "empty"),
    ("completions", {"prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    ("completions", {"prompt": {"text": "x"}}, 400, "prompt", "prompt"),
    ("completions", {}, 400, "prompt", "required"),
    ("completions", [1, 2], 400, None, "JSON object"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("chat/completions", {"messages": []}, 400, "messages", "empty"),
    (
        "chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0]",
        "unknown role",
    ),  # fmt: skip
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0]", "content"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "array"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]},
        400,
        "tools",
        "tool calling",
    ),  # fmt: skip
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        "logprobs=true",
    ),  # fmt: skip
]


@pytest.mark.parametrize("endpoint,body,status,param,word", BAD)
def test_bad_requests_get_openai_errors(
    server: BackgroundServer, endpoint: str, body: Any, status: int, param: str | None, word: str
) -> None:
    r = _post(f"{server.url}/v1/{endpoint}", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert word in err["message"], err["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{bad json", b"", b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"prompt": "x",}', b"null"],
)
def test_malformed_bodies_are_400(server: BackgroundServer, raw: bytes) -> None:
    r = _post(server.url + "/v1/completions", None, raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_sees_the_errors(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * 300, max_tokens=4)
    assert "300 tokens" in str(e.value) or "longer than max_model_len" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=4)


def test_unknown_path_and_method(server: BackgroundServer) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.fixture()
def small_server(char_model: Path) -> Iterator[BackgroundServer]:
    """Its own engine: API key, 2 KiB bodies, one running sequence, one waiting request."""
    config = ServerConfig(
        served_model_name=NAME,
        api_key="sekret",
        max_request_bytes=2048,
        max_waiting_requests=1,
        shutdown_timeout_s=1,
    )
    llm = LLM(str(char_model), **{**ENGINE, "max_num_seqs": 1})
    with BackgroundServer(build_app(llm, config)) as srv:
        yield srv
    assert llm.llm_engine.num_free_gpu_blocks == ENGINE["num_gpu_blocks"]
    assert not llm.llm_engine.has_unfinished_requests()


def test_api_key_and_body_limit(small_server: BackgroundServer) -> None:
    url = small_server.url
    body = {"prompt": "x", "max_tokens": 2}
    r = _post(url + "/v1/completions", body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = _post(url + "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    ok = {"Authorization": "Bearer sekret"}
    assert _post(url + "/v1/completions", body, headers=ok).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # open
    assert httpx.get(url + "/metrics").status_code == 200  # open
    r = _post(url + "/v1/completions", {"prompt": "x" * 5000}, headers=ok)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", timeout=TIMEOUT)
    assert c.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope").models.list()


def test_back_pressure_503_then_recovers(small_server: BackgroundServer) -> None:
    """The engine thread is held before its step (a gate around ``step``), so the first
    request stays waiting; a second one finds the bound (1) reached."""
    url = small_server.url + "/v1/completions"
    ok = {"Authorization": "Bearer sekret"}
    front = _engine(small_server)
    engine = front.engine
    gate = threading.Event()
    real_step = engine.step

    def gated_step(*args: Any, **kwargs: Any) -> Any:
        gate.wait(TIMEOUT)
        return real_step(*args, **kwargs)

    engine.step = gated_step
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post, url, json={"prompt": "a", "max_tokens": 3}, headers=ok, timeout=TIMEOUT
            )
            deadline = time.monotonic() + 20
            while front.num_waiting < 1:  # queued, not scheduled: the step is held
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url, json={"prompt": "b", "max_tokens": 2}, headers=ok, timeout=TIMEOUT)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            assert "limit 1" in r.json()["error"]["message"]
            gate.set()
            assert first.result(TIMEOUT).status_code == 200
    finally:
        gate.set()
        del engine.step  # the class's method again
    wait_all_free(small_server)
    r = httpx.post(url, json={"prompt": "b", "max_tokens": 2}, headers=ok, timeout=TIMEOUT)
    assert r.status_code == 200


# -- disconnects and shutdown ---------------------------------------------------------------


@contextlib.contextmanager
def slow_steps(srv: BackgroundServer, seconds: float = 0.02) -> Iterator[None]:
    """Every engine step takes ``seconds`` longer: a 100-token request outlives the test's
    reads however loaded the machine is."""
    engine = _engine(srv).engine
    real_step = engine.step

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real_step(*args, **kwargs)

    engine.step = slow
    try:
        yield
    finally:
        del engine.step


def _aborts(srv: BackgroundServer) -> float:
    text = httpx.get(srv.url + "/metrics").text
    found = re.findall(
        r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M
    )
    return sum(float(v) for v in found)


def test_disconnect_mid_stream_aborts(server: BackgroundServer) -> None:
    body = {"prompt": "abc", "max_tokens": 100, "ignore_eos": True, "stream": True}
    before = _aborts(server)
    with slow_steps(server), httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        wait_all_free(server)
    assert _aborts(server) == before + 1


def test_disconnect_before_the_first_token_aborts(server: BackgroundServer) -> None:
    """A raw client sends a request (plain, then streamed) and hangs up at once."""
    front = _engine(server)
    before = _aborts(server)
    with slow_steps(server):
        for stream in (False, True):
            body = json.dumps(
                {"prompt": "abc", "max_tokens": 120, "ignore_eos": True, "stream": stream}
            ).encode()
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(head + body)
                deadline = time.monotonic() + 10
                while not front._tracked:  # the engine has the request
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            wait_all_free(server)  # aborted long before its 120 tokens
    assert _aborts(server) == before + 2


def test_shutdown_aborts_running_requests_and_frees_everything(char_model: Path) -> None:
    llm = _llm(char_model)
    srv = BackgroundServer(build_app(llm, ServerConfig(shutdown_timeout_s=1))).start()
    body = {"prompt": "abc", "max_tokens": 120, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", srv.url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            lines.append(next(it))
            t0 = time.monotonic()
            srv.stop()
            assert time.monotonic() - t0 < 15
            try:
                lines.extend(it)
            except httpx.HTTPError:
                pass  # the connection was cut after the graceful timeout
    assert llm.llm_engine.num_free_gpu_blocks == ENGINE["num_gpu_blocks"]
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("mode", ["--no-engine-process", "--engine-process"])
def test_cli_serve_starts_answers_and_stops_on_sigint(char_model: Path, mode: str) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group (the server and, with
    --engine-process, its engine process); the server shuts down and nothing is left running."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fast.api.cli", "serve", "--model", str(char_model), mode]
    cmd += ["--port", "0", "--device", "cpu", "--max-model-len", "128", "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"on (http://\S+) ", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        url = m.group(1)
        name = char_model.name
        r = httpx.post(
            url + "/v1/completions",
            json={"model": name, "prompt": "hi", "max_tokens": 3},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the engine process, if any, has exited too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a process of the server's group outlived it")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_cli_serve_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from fast.api.cli import main

    assert main(["serve", "--model", "/nonexistent/model.gguf", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagedkv: error:") and "model.gguf" in err
    # refused before any model is loaded (the path does not exist: loading would fail first)
    args = ["serve", "--model", "/nonexistent/m.gguf", "--engine-process"]
    assert main([*args, "--tensor-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--engine-process" in err and "--tensor-parallel-size 2" in err


def test_cli_serve_runs_the_engine_in_its_own_process_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``pagedkv serve`` builds an EngineProcess unless told ``--no-engine-process`` or run with
    tensor parallelism (whose workers a daemon process cannot start); the constructors are
    replaced by stand-ins that record which one ran and stop the command there."""
    import fast.api.engine_process
    import fast.api.llm
    from fast.api.cli import main

    made: list[str] = []

    class Built(Exception):
        pass

    def stand_in(kind: str) -> Any:
        def build(*args: Any, **kwargs: Any) -> Any:
            made.append(kind)
            raise Built

        return build

    monkeypatch.setattr(fast.api.engine_process, "EngineProcess", stand_in("process"))
    monkeypatch.setattr(fast.api.llm, "LLM", stand_in("thread"))
    cases = [([], "process"), (["--no-engine-process"], "thread")]
    cases += [(["--engine-process"], "process"), (["--tensor-parallel-size", "2"], "thread")]
    for extra, want in cases:
        with pytest.raises(Built):
            main(["serve", "--model", "m.gguf", "--device", "cpu", "--port", "0", *extra])
        assert made.pop() == want, extra
