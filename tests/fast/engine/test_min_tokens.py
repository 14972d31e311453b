"""min_tokens as vLLM defines it, held to transformers' ``min_new_tokens`` (greedy, float32).

Until a sequence has ``min_tokens`` output tokens, EOS (unless ``ignore_eos``) and the
``stop_token_ids`` are banned from sampling and stop strings do not finish it. The tiny
character model's EOS row is tilted so that greedy decoding reaches EOS after a few tokens.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_llm_model import EOS, make_char_model

from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams

PROMPTS = ["abc", "hello there", "x"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def eager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, LLM, Any]]:
    """(transformers model, our LLM on the same weights, tokenizer)."""
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = make_char_model(tmp_path_factory.mktemp("char") / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    # tilt EOS towards the token greedy decoding picks third: EOS now comes early
    ours = LLM(str(base), block_size=4, num_gpu_blocks=64, max_model_len=64, dtype="float32")
    tok = ours.get_tokenizer()
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    out = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    third = int(out[0, ids.shape[1] + 2])
    with torch.no_grad():
        hf.lm_head.weight[EOS] = hf.lm_head.weight[third] * 1.02
    tilted = tmp_path_factory.mktemp("tilted") / "m"
    hf.save_pretrained(tilted)
    for f in base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tilted / f.name)
    llm = LLM(str(tilted), block_size=4, num_gpu_blocks=64, max_model_len=64, dtype="float32")
    yield hf, llm, llm.get_tokenizer()
    torch.set_num_threads(threads)


def reference(hf: Any, ids: list[int], min_new: int, eos: list[int]) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=MAX_NEW,
        min_new_tokens=min_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=EOS,
    )
    return [int(t) for t in out[0, len(ids) :]]


def test_eos_comes_early_without_min_tokens(eager: tuple[Any, LLM, Any]) -> None:
    hf, llm, tok = eager
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    early = [o.outputs[0].token_ids for o in out if len(o.outputs[0].token_ids) < 6]
    assert early and all(t[-1] == EOS for t in early)  # the cases below are not vacuous


@pytest.mark.parametrize("min_tokens", [0, 1, 3, 6, MAX_NEW])
def test_min_tokens_equals_transformers_min_new_tokens(
    eager: tuple[Any, LLM, Any], min_tokens: int
) -> None:
    hf, llm, tok = eager
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=min_tokens)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
        got = out.outputs[0].token_ids
        assert got == reference(hf, tok.encode(prompt), min_tokens, [EOS]), prompt
        assert EOS not in got[:min_tokens]
        stopped = got[-1] == EOS
        assert out.outputs[0].finish_reason == ("stop" if stopped else "length")


@pytest.mark.parametrize("min_tokens", [0, 4])
def test_stop_token_ids_wait_for_min_tokens(eager: tuple[Any, LLM, Any], min_tokens: int) -> None:
    """A stop token id is banned like EOS; transformers treats both as end tokens."""
    hf, llm, tok = eager
    ids = tok.encode(PROMPTS[1])
    free = (
        llm.generate(
            {"prompt_token_ids": ids},
            SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    stop = next(t for t in free[1:] if t != EOS)  # a stop token that would end it early
    params = SamplingParams(
        temperature=0, max_tokens=MAX_NEW, min_tokens=min_tokens, stop_token_ids=[stop]
    )
    got = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == reference(hf, ids, min_tokens, [EOS, stop])
    assert stop not in got.token_ids[:min_tokens] and EOS not in got.token_ids[:min_tokens]
    if got.token_ids[-1] == stop:
        assert got.finish_reason == "stop" and got.stop_reason == stop


def test_ignore_eos_with_min_tokens_bans_only_stop_ids(eager: tuple[Any, LLM, Any]) -> None:
    hf, llm, tok = eager
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=3, ignore_eos=True)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == MAX_NEW and out.finish_reason == "length"


def test_stop_strings_do_not_finish_before_min_tokens(eager: tuple[Any, LLM, Any]) -> None:
    hf, llm, tok = eager
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    text = llm.generate(PROMPTS[2], greedy, use_tqdm=False)[0].outputs[0].text
    stop = text[0]  # the first character: a stop string that would end it at once
    cut = llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.text == "" and len(cut.token_ids) == 1
    later = llm.generate(
        PROMPTS[2],
        SamplingParams(
            temperature=0, max_tokens=MAX_NEW, stop=[stop], ignore_eos=True, min_tokens=3
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(later.token_ids) >= 3
    assert later.token_ids == greedy_prefix(llm, PROMPTS[2], len(later.token_ids))


def greedy_prefix(llm: LLM, prompt: str, n: int) -> list[int]:
    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
