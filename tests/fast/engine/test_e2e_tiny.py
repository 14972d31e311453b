"""Greedy generation equals transformers token for token on tiny random checkpoints.

Each checkpoint is written with ``save_pretrained`` and loaded through ``fast.loader``; the
reference is ``generate(do_sample=False)`` one prompt at a time. The engine must reproduce it for
every batch composition, block size, pool size (with preemption by recompute and by swap),
chunked prefill, and prefix caching, and leave the whole pool free afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import Checkpoint, greedy_reference, save_with_reference

transformers = pytest.importorskip("transformers")

from fast.api.llm import LLM  # noqa: E402
from fast.engine.sampling_params import SamplingParams  # noqa: E402

MAX_TOKENS = 12
PROMPT_LENS = (5, 17, 33, 3, 26, 9)


def _make(tmp: Path, kind: str) -> Checkpoint:
    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **common
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        heads = {"mha": (4, 4, False), "gqa": (4, 2, False), "tied": (8, 2, True)}[kind]
        cfg = transformers.LlamaConfig(
            num_attention_heads=heads[0],
            num_key_value_heads=heads[1],
            tie_word_embeddings=heads[2],
            **common,
        )
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    path = tmp / kind
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return save_with_reference(model, path, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    tmp = tmp_path_factory.mktemp("tiny")
    return {k: _make(tmp, k) for k in ("mha", "gqa", "tied", "qwen2")}


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _generate(ck: Checkpoint, **kw: Any) -> tuple[list[list[int]], LLM]:
    kw.setdefault("num_gpu_blocks", 64)
    kw.setdefault("block_size", 4)
    llm = LLM(str(ck.path), **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in ck.prompts], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == ck.prompts
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    engine = llm.llm_engine
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks, "blocks leaked"
    assert not engine.has_unfinished_requests()
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("kind", ["mha", "gqa", "tied", "qwen2"])
def test_greedy_equals_transformers(checkpoints: dict[str, Checkpoint], kind: str) -> None:
    got, _ = _generate(checkpoints[kind])
    assert got == checkpoints[kind].reference


@pytest.mark.parametrize(
    "settings",
    [
        {"block_size": 1, "num_gpu_blocks": 512},
        {"block_size": 16, "num_gpu_blocks": 32},
        {"block_size": 128, "num_gpu_blocks": 8},
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 8, "max_num_seqs": 4},
        {"max_num_seqs": 2},
    ],
    ids=["bs1", "bs16", "bs128", "chunked", "two-seqs"],
)
def test_unchanged_by_engine_settings(
    checkpoints: dict[str, Checkpoint], settings: dict[str, Any]
) -> None:
    got, _ = _generate(checkpoints["gqa"], **settings)
    assert got == checkpoints["gqa"].reference


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunked", [False, True])
def test_unchanged_by_preemption(
    checkpoints: dict[str, Checkpoint], mode: str, chunked: bool
) -> None:
    # 12 blocks of 4 = 48 slots for 6 prompts of up to 33 + 12 tokens: preemption must happen.
    kw: dict[str, Any] = {"num_gpu_blocks": 12, "max_model_len": 48, "preemption_mode": mode}
    if mode == "swap":
        kw["swap_space"] = 0.001
    if chunked:
        kw.update(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=8)
    got, llm = _generate(checkpoints["gqa"], **kw)
    assert got == checkpoints["gqa"].reference
    stats = llm.llm_engine.stats
    if mode == "swap":
        assert stats.swapped_out > 0 and stats.swapped_in == stats.swapped_out
    else:
        assert stats.preempted > 0
    assert llm.llm_engine.block_manager.num_free_cpu_blocks == llm.llm_engine.num_cpu_blocks


def test_prefix_caching_reuses_blocks_and_keeps_outputs(checkpoints: dict[str, Checkpoint]) -> None:
    ck = checkpoints["gqa"]
    shared = ck.prompts[2][:24]  # 6 full blocks of 4 shared by two prompts
    prompts = [ck.prompts[2], shared + ck.prompts[4][:5]]
    llm = LLM(str(ck.path), num_gpu_blocks=64, block_size=4, enable_prefix_caching=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    computed = llm.llm_engine.stats.computed_tokens
    second = llm.generate([{"prompt_token_ids": prompts[1]}], GREEDY, use_tqdm=False)
    cached_run = llm.llm_engine.stats.computed_tokens - computed
    plain = LLM(str(ck.path), num_gpu_blocks=64, block_size=4)
    ref = plain.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert first[0].outputs[0].token_ids == ck.reference[2]
    assert second[0].outputs[0].token_ids == ref[1].outputs[0].token_ids
    # 29-token prompt, 24 cached: 5 computed for the prompt, then 11 decode steps.
    assert cached_run == 5 + MAX_TOKENS - 1
    assert llm.llm_engine.num_free_gpu_blocks == 64


def test_prefix_caching_keeps_outputs_in_every_sharing_case(
    checkpoints: dict[str, Checkpoint],
) -> None:
    """Greedy tokens with caching on = caching off = transformers, for prompts sharing a 32-token
    prefix: shared within one step, reused in a later call, evicted and recomputed, and shared
    while the first request's chunked prefill is still writing the prefix's blocks."""
    ck = checkpoints["gqa"]
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 96, (32,), generator=g).tolist()
    tails = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 6, 9, 4)]
    prompts = [prefix + t for t in tails]
    model = transformers.AutoModelForCausalLM.from_pretrained(ck.path).eval()
    ref = greedy_reference(model, prompts, MAX_TOKENS)

    def run(llm: LLM, ps: list[list[int]]) -> tuple[list[list[int]], list[int | None]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]

    off = LLM(str(ck.path), num_gpu_blocks=64, block_size=4, enable_prefix_caching=False)
    assert run(off, prompts)[0] == ref

    # the same step: nothing is cached before the step that writes it, so no hits, same tokens
    on = LLM(str(ck.path), num_gpu_blocks=64, block_size=4)
    toks, cached = run(on, prompts[:2])
    assert toks == ref[:2] and cached == [0, 0]
    # a later call reuses the 8 full prefix blocks
    toks, cached = run(on, prompts[2:])
    assert toks == ref[2:] and cached == [32, 32]
    assert on.llm_engine.stats.prefix_cache_hits == 64

    # evicted: a pool of 16 blocks, other prompts fill it between the two uses of the prefix
    small = LLM(str(ck.path), num_gpu_blocks=16, block_size=4, max_model_len=64)
    assert run(small, [prompts[0]])[0] == [ref[0]]
    filler = [torch.randint(0, 96, (40,), generator=g).tolist() for _ in range(2)]
    run(small, filler)
    toks, cached = run(small, [prompts[1]])
    assert toks == [ref[1]] and cached == [0]  # recomputed from scratch, same tokens

    # still being written: 8-token chunks; the second request is admitted while the first is
    # mid-prefill, and may reuse only the blocks a finished step has written
    chunked = LLM(
        str(ck.path), num_gpu_blocks=64, block_size=4, max_num_batched_tokens=8, max_num_seqs=4
    )
    toks, cached = run(chunked, prompts)
    assert toks == ref
    assert all(c is not None and c % 4 == 0 and c <= 32 for c in cached)
    assert any(c for c in cached[1:])  # later prompts did find computed prefix blocks
    for llm in (off, on, small, chunked):
        engine = llm.llm_engine
        assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
        engine.block_manager.check_integrity()
