"""The server's requests take their missing sampling fields from the model's
generation_config.json, field by field (vLLM's server does the same); a field the request sets
wins, and a model without sampling fields in its file keeps the library's defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")

from fast.api import openai_protocol as proto  # noqa: E402
from fast.api.llm import LLM  # noqa: E402
from fast.api.server import BackgroundServer, ServerConfig, build_app  # noqa: E402

ENGINE = dict(block_size=4, num_gpu_blocks=64, max_model_len=64)
FILE = {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.2, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def llm(char_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = tmp_path_factory.mktemp("gc") / "char"
    shutil.copytree(char_model, path)
    (path / "generation_config.json").write_text(json.dumps(FILE))
    return LLM(str(path), **ENGINE)


def test_missing_fields_come_from_the_generation_config(llm: LLM) -> None:
    app = build_app(llm, ServerConfig(served_model_name="char"))
    info: proto.ModelInfo = app.state.pagedkv.info
    assert dict(info.sampling_defaults) == {
        "temperature": 0.0,
        "top_k": 5,
        "repetition_penalty": 1.2,
        "max_tokens": 3,
    }
    p = proto.parse_completion({"model": "char", "prompt": "ab", "top_k": 2}, info).params
    assert (p.temperature, p.top_k, p.repetition_penalty, p.max_tokens) == (0.0, 2, 1.2, 3)
    chat = {"model": "char", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    p = proto.parse_chat(chat, info).params
    assert (p.temperature, p.top_k, p.max_tokens) == (0.0, 5, 9)
    plain = proto.ModelInfo("char", info.tokenizer, info.vocab_size, info.max_model_len)
    p = proto.parse_completion({"model": "char", "prompt": "ab"}, plain).params
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 0, 16)  # the library's defaults


def test_a_request_without_max_tokens_stops_at_max_new_tokens(llm: LLM) -> None:
    with BackgroundServer(build_app(llm, ServerConfig(served_model_name="char"))) as srv:
        body = {"model": "char", "prompt": "abc", "ignore_eos": True}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
