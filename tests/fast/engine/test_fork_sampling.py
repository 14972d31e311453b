"""n > 1 by fork: one prefill per request, children share the prompt blocks, copy-on-write.

Every engine test ends with the pool whole again and nothing unfinished. Reference outputs come
from transformers' greedy generation on a tiny random Llama (GQA) checkpoint, and from separate
n = 1 requests with seeds ``seed + i`` (what n > 1 gave before it was done by fork).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_reference import Checkpoint, save_with_reference

transformers = pytest.importorskip("transformers")

from fast.api.llm import LLM  # noqa: E402
from fast.engine.engine import BlockUsage, LLMEngine  # noqa: E402
from fast.engine.sampling_params import SamplingParams  # noqa: E402
from fast.engine.sequence import Sequence  # noqa: E402
from spec.errors import (  # noqa: E402
    InvalidArgumentError,
    SequenceExistsError,
    UnknownSequenceError,
)

BS = 4
MAX_TOKENS = 10
PROMPT_LENS = (5, 17, 8, 9)  # 8 is a multiple of the block size: no copy-on-write


@pytest.fixture(scope="module")
def ck(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("fork") / "gqa"
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return save_with_reference(model, path, prompts, MAX_TOKENS)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def seeded(n: int, seed: int = 7) -> SamplingParams:
    return SamplingParams(
        n=n, temperature=1.0, top_k=40, top_p=0.9, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True
    )


def engine(ck: Checkpoint, **kw: Any) -> LLMEngine:
    kw.setdefault("num_gpu_blocks", 96)
    kw.setdefault("block_size", BS)
    kw.setdefault("max_model_len", 64)
    return LLM(str(ck.path), **kw).llm_engine


def run(
    eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]]
) -> tuple[list[list[list[int]]], int]:
    """Token ids of every completion of every request, and the peak of blocks in use."""
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(str(i), {"prompt_token_ids": prompt}, params)
    done: dict[str, list[list[int]]] = {}
    peak = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                assert all(c.finish_reason == "length" for c in out.outputs)
                done[out.request_id] = [c.token_ids for c in out.outputs]
        peak = max(peak, eng.num_gpu_blocks - eng.num_free_gpu_blocks)
    assert_whole(eng)
    return [done[str(i)] for i in range(len(requests))], peak


def assert_whole(eng: LLMEngine) -> None:
    assert not eng.has_unfinished_requests()
    assert eng.num_free_gpu_blocks == eng.num_gpu_blocks, "device blocks leaked"
    assert eng.block_manager.num_free_cpu_blocks == eng.num_cpu_blocks, "host blocks leaked"
    assert not eng._children and not eng._requests and not eng._generators


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_num_seqs": 2}, {"block_size": 1, "num_gpu_blocks": 400}],
    ids=["roomy", "two-seqs", "bs1"],
)
def test_greedy_children_equal_transformers(ck: Checkpoint, settings: dict[str, Any]) -> None:
    eng = engine(ck, **settings)
    got, _ = run(eng, [(p, greedy(4)) for p in ck.prompts])
    assert got == [[ref] * 4 for ref in ck.reference]
    assert eng.stats.forked == 3 * len(ck.prompts)


def test_one_prefill_and_copy_on_write_per_shared_partial_block(ck: Checkpoint) -> None:
    eng = engine(ck)
    got, _ = run(eng, [(p, greedy(4)) for p in ck.prompts])
    assert got == [[ref] * 4 for ref in ck.reference]
    # Each prompt is computed once; each of the 4 sequences then decodes MAX_TOKENS - 1 tokens.
    assert eng.stats.computed_tokens == sum(PROMPT_LENS) + 4 * len(PROMPT_LENS) * (MAX_TOKENS - 1)
    # A partial last block shared by 4 is copied by 3 of them; a full one (8 tokens) never.
    partial = sum(1 for n in PROMPT_LENS if n % BS)
    assert eng.stats.copied_blocks == 3 * partial > 0


def test_seeded_children_equal_separate_requests(ck: Checkpoint) -> None:
    prompt = ck.prompts[1]
    forked, fork_peak = run(engine(ck), [(prompt, seeded(3))])
    separate, sep_peak = run(engine(ck), [(prompt, seeded(1, 7 + i)) for i in range(3)])
    assert forked == [[s[0] for s in separate]]
    assert len({tuple(t) for t in forked[0]}) > 1  # the samples differ from each other
    again, _ = run(engine(ck), [(prompt, seeded(3))])
    assert again == forked


def test_fewer_blocks_at_peak_than_independent(ck: Checkpoint) -> None:
    prompt = ck.prompts[1]  # 17 tokens: 5 blocks of 4
    forked, fork_peak = run(engine(ck), [(prompt, greedy(4))])
    separate, sep_peak = run(engine(ck), [(prompt, greedy(1)) for _ in range(4)])
    assert forked == [[s[0] for s in separate]]
    # Separate: 4 x ceil(26 / 4) = 28 blocks at the end. Fork: the 4 full prompt blocks are
    # shared, each sequence owns blocks for tokens 16..25 (3 blocks): 4 + 4 x 3 = 16.
    assert sep_peak == 4 * -(-(17 + MAX_TOKENS - 1) // BS) == 28
    assert fork_peak == 4 + 4 * 3 == 16 < sep_peak


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_outputs_and_frees_everything(ck: Checkpoint, mode: str) -> None:
    kw: dict[str, Any] = {"num_gpu_blocks": 14, "max_model_len": 56, "preemption_mode": mode}
    if mode == "swap":
        kw["swap_space"] = 0.002
    requests = [(ck.prompts[1], greedy(3)), (ck.prompts[3], seeded(3)), (ck.prompts[0], greedy(2))]
    roomy, _ = run(engine(ck, max_model_len=56), requests)
    eng = engine(ck, **kw)
    got, peak = run(eng, requests)
    assert got == roomy
    assert roomy[0] == [ck.reference[1]] * 3 and roomy[2] == [ck.reference[0]] * 2
    assert peak <= 14
    if mode == "swap":
        assert eng.stats.swapped_out > 0 and eng.stats.swapped_in == eng.stats.swapped_out
    else:
        assert eng.stats.preempted > 0


def test_abort_frees_every_child(ck: Checkpoint) -> None:
    eng = engine(ck)
    eng.add_request("before", {"prompt_token_ids": ck.prompts[2]}, greedy(3))
    eng.abort_request("before")  # never scheduled, children never forked
    assert_whole(eng)
    eng.add_request("a", {"prompt_token_ids": ck.prompts[1]}, greedy(4))
    eng.add_request("b", {"prompt_token_ids": ck.prompts[0]}, greedy(2))
    for _ in range(3):
        eng.step()
    assert eng.stats.forked == 4
    assert eng.num_free_gpu_blocks < eng.num_gpu_blocks
    running = {s.request_id for s in eng.scheduler.running}
    assert running == {"a", "b"} and len(eng.scheduler.running) == 6
    eng.abort_request("a")
    assert {s.request_id for s in eng.scheduler.running} == {"b"}
    eng.abort_request("b")
    assert_whole(eng)


def test_children_that_finish_at_their_first_token(ck: Checkpoint) -> None:
    eng = engine(ck)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=1, ignore_eos=True)
    eng.add_request("one", {"prompt_token_ids": ck.prompts[0]}, params)
    (out,) = eng.step()
    assert out.finished and [c.token_ids for c in out.outputs] == [ck.reference[0][:1]] * 3
    assert eng.stats.forked == 0 and eng.stats.steps == 1
    assert_whole(eng)


def test_scheduler_fork_checks(ck: Checkpoint) -> None:
    eng = engine(ck)
    eng.add_request("a", {"prompt_token_ids": ck.prompts[0]}, greedy(1))
    (waiting,) = eng.scheduler.waiting
    stranger = Sequence(1000, "x", 1000, [1, 2])
    with pytest.raises(InvalidArgumentError):
        eng.scheduler.fork(waiting, stranger)  # no blocks yet
    with pytest.raises(UnknownSequenceError):
        eng.scheduler.fork(Sequence(999, "y", 999, [1]), stranger)
    with pytest.raises(SequenceExistsError):
        eng.scheduler.fork(waiting, waiting)
    eng.abort_request("a")
    assert_whole(eng)


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fork_on_cuda_equals_separate_requests(eager: bool, temperature: float) -> None:
    # CUDA graphs or eager decode, Triton copy_blocks (head_dim 64 for the Triton kernels).
    from fast.loader import random_model
    from fast.model.config import ModelConfig

    config = ModelConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
    )
    tiny = random_model(config, seed=0, dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 8, 33, 13)]
    kw: dict[str, Any] = dict(
        block_size=16,
        num_gpu_blocks=64,
        max_model_len=128,
        dtype="float32",
        max_num_seqs=32,
        enforce_eager=eager,
    )

    def params(i: int, n: int, j: int = 0) -> SamplingParams:
        return SamplingParams(
            n=n, temperature=temperature, seed=3 + 10 * i + j, max_tokens=20, ignore_eos=True
        )

    fork = LLM(tiny, **kw)
    outs = fork.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [params(i, 4) for i in range(len(prompts))],
        use_tqdm=False,
    )
    alone = LLM(tiny, **kw)
    sep = alone.generate(
        [{"prompt_token_ids": p} for p in prompts for _ in range(4)],
        [params(i, 1, j) for i in range(len(prompts)) for j in range(4)],
        use_tqdm=False,
    )
    assert [c.token_ids for o in outs for c in o.outputs] == [o.outputs[0].token_ids for o in sep]
    eng = fork.llm_engine
    assert eng.stats.copied_blocks == 3 * len(prompts)  # no prompt fills its last block
    assert eng.stats.computed_tokens < alone.llm_engine.stats.computed_tokens
    assert_whole(eng)


def test_block_usage_counts_what_the_fork_shares(ck: Checkpoint) -> None:
    prompt = ck.prompts[1]  # 17 tokens: 5 blocks of 4
    eng = engine(ck, enable_prefix_caching=False)
    assert eng.block_usage() == BlockUsage(0, 0) and eng.block_usage().saved == 0.0
    eng.add_request("r", {"prompt_token_ids": prompt}, greedy(4))
    usages = []
    while eng.has_unfinished_requests():
        eng.step()
        usages.append(eng.block_usage())
    assert all(u.in_use <= u.unshared for u in usages)
    # the last step before the four finish: 4 shared prompt blocks + 4 x 3 own tail blocks,
    # against 4 x ceil(25 / 4) = 28 unshared (the 26th token is sampled, never appended)
    peak = max(usages, key=lambda u: u.in_use)
    assert (peak.in_use, peak.unshared) == (16, 28)
    assert peak.saved == pytest.approx(12 / 28)
    assert eng.block_usage() == BlockUsage(0, 0)
