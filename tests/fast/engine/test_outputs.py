"""Outputs with vLLM's shapes: Logprob dicts with ranks and decoded tokens, cumulative_logprob,
prompt_logprobs, RequestOutput.metrics and num_cached_tokens, abort in a stream, sampling
values checked against the vocabulary at add-request time; log-probabilities and the
repetition penalty held to transformers on the same tiny checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_llm_model import VOCAB, make_char_model

from fast.api.llm import LLM
from fast.engine.outputs import Logprob, RequestOutput
from fast.engine.sampling_params import InvalidSamplingParamsError, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_char_model(tmp_path_factory.mktemp("char") / "m")


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make(model_dir: Path, **kw: Any) -> LLM:
    args: dict[str, Any] = dict(num_gpu_blocks=48, block_size=4, max_model_len=64)
    args.update(kw)
    return LLM(str(model_dir), **args)


def whole(llm: LLM) -> bool:
    e = llm.llm_engine
    return e.num_free_gpu_blocks == e.num_gpu_blocks and not e.has_unfinished_requests()


def greedy(n: int = 8, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def hf_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids``: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


PROMPT = [VOCAB.index(c) for c in "the cat sat"]


def test_logprobs_are_vllm_dicts_matching_transformers(model_dir: Path, hf: Any) -> None:
    llm = make(model_dir)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, greedy(6, logprobs=3), use_tqdm=False)
    c = out.outputs[0]
    assert isinstance(c.logprobs, list) and len(c.logprobs) == len(c.token_ids) == 6
    ref = hf_logprobs(hf, PROMPT + c.token_ids)
    tok = llm.get_tokenizer()
    total = 0.0
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(PROMPT) - 1 + i]  # the position that predicted output token i
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert len(entry) == 3 and entry[token].rank == 1  # greedy: the sampled one is the top
        top = row.topk(3)
        assert list(entry) == top.indices.tolist()
        assert [v.rank for v in entry.values()] == [1, 2, 3]
        for tid, want in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(want, abs=1e-4)
            assert entry[tid].decoded_token == tok.decode([tid], skip_special_tokens=False)
        total += entry[token].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-5)
    assert whole(llm)


def test_cumulative_logprob_is_set_without_logprobs(model_dir: Path, hf: Any) -> None:
    llm = make(model_dir)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, greedy(5), use_tqdm=False)
    c = out.outputs[0]
    assert c.logprobs is None and isinstance(c.cumulative_logprob, float)
    ref = hf_logprobs(hf, PROMPT + c.token_ids)
    want = sum(float(ref[len(PROMPT) - 1 + i, t]) for i, t in enumerate(c.token_ids))
    assert c.cumulative_logprob == pytest.approx(want, abs=1e-4)
    assert c.cumulative_logprob < 0
    # sampled (not greedy) sequences too, each with its own sum; n > 1 children included
    p = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, p, use_tqdm=False)
    for c in out.outputs:
        ref = hf_logprobs(hf, PROMPT + c.token_ids)
        want = sum(float(ref[len(PROMPT) - 1 + i, t]) for i, t in enumerate(c.token_ids))
        assert c.cumulative_logprob == pytest.approx(want, abs=1e-4)


def test_sampled_token_outside_the_top_k_has_its_rank(model_dir: Path, hf: Any) -> None:
    llm = make(model_dir)
    p = SamplingParams(temperature=5.0, seed=1, max_tokens=12, ignore_eos=True, logprobs=1)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, p, use_tqdm=False)
    c = out.outputs[0]
    assert c.logprobs is not None
    ref = hf_logprobs(hf, PROMPT + c.token_ids)
    outside = 0
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert entry[token].rank == int((row >= row[token] - 1e-5).sum())
        assert len(entry) == (1 if entry[token].rank == 1 else 2)
        outside += entry[token].rank > 1
    assert outside > 0  # at temperature 5 some sampled tokens are not the most likely


def test_no_decoded_tokens_without_detokenize(model_dir: Path) -> None:
    llm = make(model_dir)
    p = greedy(3, logprobs=2, prompt_logprobs=1, detokenize=False)
    (out,) = llm.generate("abc", p, use_tqdm=False)
    c = out.outputs[0]
    assert c.text == "" and c.logprobs is not None and out.prompt_logprobs is not None
    entries = [e for e in c.logprobs + out.prompt_logprobs if e is not None]
    assert len(entries) == 3 + 2 and all(
        v.decoded_token is None for e in entries for v in e.values()
    )


def test_prompt_logprobs_match_transformers(model_dir: Path, hf: Any) -> None:
    llm = make(model_dir)
    (out,) = llm.generate(
        {"prompt_token_ids": PROMPT}, greedy(2, prompt_logprobs=2), use_tqdm=False
    )
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(PROMPT) and plp[0] is None
    ref = hf_logprobs(hf, PROMPT)
    tok = llm.get_tokenizer()
    for pos in range(1, len(PROMPT)):
        entry, row, token = plp[pos], ref[pos - 1], PROMPT[pos]
        assert entry is not None and token in entry
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[token].rank == int((row >= row[token] - 1e-6).sum())
        assert entry[token].decoded_token == tok.decode([token], skip_special_tokens=False)
        top = row.topk(2).indices.tolist()
        assert set(top) <= set(entry) and len(entry) == len(set(top) | {token})
    assert out.outputs[0].logprobs is None  # prompt_logprobs alone does not ask for these
    (plain,) = llm.generate({"prompt_token_ids": PROMPT}, greedy(2), use_tqdm=False)
    assert plain.prompt_logprobs is None
    (one,) = llm.generate({"prompt_token_ids": [5]}, greedy(1, prompt_logprobs=0), use_tqdm=False)
    assert one.prompt_logprobs == [None]


def same_prompt_logprobs(a: list[RequestOutput], b: list[RequestOutput], tol: float = 1e-4) -> bool:
    """Same ids and ranks at every prompt position, log-probabilities within ``tol``."""
    for x, y in zip(a, b, strict=True):
        assert x.prompt_logprobs is not None and y.prompt_logprobs is not None
        assert len(x.prompt_logprobs) == len(y.prompt_logprobs) == len(x.prompt_token_ids)
        for ex, ey in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            assert ex is not None and ey is not None and list(ex) == list(ey)
            for t in ex:
                assert ex[t].rank == ey[t].rank
                assert ex[t].logprob == pytest.approx(ey[t].logprob, abs=tol)
    return True


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(model_dir: Path) -> None:
    prompts = [
        {"prompt_token_ids": [VOCAB.index(ch) for ch in text]}
        for text in ("a long prompt of many words", "short", "another prompt here!")
    ]
    p = greedy(20, prompt_logprobs=1)
    base = make(model_dir).generate(prompts, p, use_tqdm=False)
    chunked = make(
        model_dir, enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4
    ).generate(prompts, p, use_tqdm=False)
    small = make(model_dir, num_gpu_blocks=16, max_model_len=48)  # 64 slots: preempts
    squeezed = small.generate(prompts, p, use_tqdm=False)
    assert small.llm_engine.stats.preempted > 0
    assert [len(o.prompt_logprobs or []) for o in base] == [
        len(q["prompt_token_ids"]) for q in prompts
    ]
    assert same_prompt_logprobs(chunked, base)
    assert same_prompt_logprobs(squeezed, base)
    assert whole(small)


def test_values_beyond_the_vocabulary_are_refused_before_queueing(model_dir: Path) -> None:
    llm = make(model_dir)
    vocab = llm.llm_engine.model_config.vocab_size
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidSamplingParamsError) as info:
            llm.generate(["ok", "fine"], SamplingParams(**{name: vocab + 1}), use_tqdm=False)
        assert (info.value.name, info.value.value) == (name, vocab + 1)
        assert str(vocab) in str(info.value)
        assert whole(llm)
    (out,) = llm.generate("ok", greedy(2, logprobs=vocab), use_tqdm=False)  # the whole vocab
    assert out.outputs[0].logprobs is not None and len(out.outputs[0].logprobs[0]) == vocab
    assert whole(llm)


def test_prompt_logprobs_with_prefix_caching_compute_every_position(model_dir: Path) -> None:
    # a request asking for prompt logprobs never reuses cached blocks: every position is scored
    prompt = {"prompt_token_ids": [VOCAB.index(ch) for ch in "a prompt long enough to cache"]}
    off = make(model_dir, enable_prefix_caching=False)
    (want,) = off.generate(prompt, greedy(2, prompt_logprobs=1), use_tqdm=False)
    llm = make(model_dir, enable_prefix_caching=True)
    (warm,) = llm.generate(prompt, greedy(2), use_tqdm=False)  # caches the prompt's blocks
    (again,) = llm.generate(prompt, greedy(2), use_tqdm=False)
    assert again.num_cached_tokens and again.num_cached_tokens > 0
    (got,) = llm.generate(prompt, greedy(2, prompt_logprobs=1), use_tqdm=False)
    assert got.num_cached_tokens == 0
    assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
    assert len(got.prompt_logprobs) == len(prompt["prompt_token_ids"])
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert a is not None and b is not None
        for tok in b:
            assert math.isclose(a[tok].logprob, b[tok].logprob, abs_tol=1e-5)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids == warm.outputs[0].token_ids
    # the same request id twice through the engine (ids may come back once a request is
    # done): the private key of the first must not give the second its blocks
    engine = llm.llm_engine
    for _ in range(2):
        engine.add_request("same", prompt, greedy(2, prompt_logprobs=1))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step(finished_only=True)
        (twice,) = outs
        assert twice.num_cached_tokens == 0 and twice.prompt_logprobs is not None
        assert len(twice.prompt_logprobs) == len(prompt["prompt_token_ids"])
    assert whole(llm)


def test_penalties_match_transformers_generate(model_dir: Path, hf: Any) -> None:
    llm = make(model_dir)
    for penalty in (1.5, 0.7):
        (out,) = llm.generate(
            {"prompt_token_ids": PROMPT}, greedy(16, repetition_penalty=penalty), use_tqdm=False
        )
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([PROMPT]),
                do_sample=False,
                max_new_tokens=16,
                min_new_tokens=16,
                repetition_penalty=penalty,
                pad_token_id=0,
            )[0, len(PROMPT) :].tolist()
        assert out.outputs[0].token_ids == ref
    (plain,) = llm.generate({"prompt_token_ids": PROMPT}, greedy(16), use_tqdm=False)
    assert plain.outputs[0].token_ids != out.outputs[0].token_ids  # the penalty mattered


def test_presence_frequency_and_processors_follow_the_output(model_dir: Path, hf: Any) -> None:
    """A greedy loop over transformers' logits, applying the float64 formula to the tokens
    generated so far, picks the engine's tokens; a logits processor sees the same outputs."""
    llm = make(model_dir)
    calls: list[list[int]] = []

    def record(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        calls.append(list(output_ids))
        return row

    p = greedy(12, presence_penalty=0.8, frequency_penalty=0.6, logits_processors=[record])
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, p, use_tqdm=False)
    tokens = out.outputs[0].token_ids
    ids = list(PROMPT)
    for _ in range(12):
        with torch.no_grad():
            row = hf(torch.tensor([ids])).logits[0, -1].double()
        counts = torch.bincount(
            torch.tensor(ids[len(PROMPT) :], dtype=torch.int64), minlength=row.shape[0]
        )
        row = row - 0.6 * counts - 0.8 * (counts > 0).double()
        ids.append(int(row.argmax()))
    assert tokens == ids[len(PROMPT) :]
    assert calls == [tokens[:i] for i in range(12)]
    (plain,) = llm.generate({"prompt_token_ids": PROMPT}, greedy(12), use_tqdm=False)
    assert plain.outputs[0].token_ids != tokens


def test_metrics_are_ordered_times(model_dir: Path) -> None:
    import time

    llm = make(model_dir)
    before = time.time()
    outs = llm.generate(["abc", "de"], greedy(4), use_tqdm=False)
    after = time.time()
    for out in outs:
        m = out.metrics
        assert m is not None
        assert m.first_scheduled_time is not None and m.first_token_time is not None
        assert m.finished_time is not None and m.last_token_time is not None
        assert before <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time <= after
        assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)
    stream = llm.stream("abc", greedy(3))
    first = next(stream)
    assert first.metrics is not None and first.metrics.finished_time is None
    assert first.metrics.first_token_time == first.metrics.last_token_time
    rest = list(stream)
    m = rest[-1].metrics
    assert m is not None and m.finished_time is not None
    assert m.last_token_time is not None and m.last_token_time >= first.metrics.last_token_time
    assert first.metrics.finished_time is None  # each output holds its own snapshot


def test_num_cached_tokens(model_dir: Path) -> None:
    prompt = {"prompt_token_ids": [VOCAB.index(ch) for ch in "shared prefix here, then"]}
    n = len(prompt["prompt_token_ids"])
    off = make(model_dir, enable_prefix_caching=False)
    assert [
        o.num_cached_tokens for o in off.generate([prompt, prompt], greedy(2), use_tqdm=False)
    ] == [0, 0]
    on = make(model_dir, enable_prefix_caching=True)
    (first,) = on.generate(prompt, greedy(2), use_tqdm=False)
    (second,) = on.generate(prompt, greedy(2), use_tqdm=False)
    assert first.num_cached_tokens == 0
    cached = second.num_cached_tokens
    assert cached is not None and 0 < cached < n and cached % 4 == 0
    assert cached >= (n - 1) // 4 * 4 - 4  # every full block but at most the last
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert whole(on)


def test_abort_in_a_stream_ends_with_finish_reason_abort(model_dir: Path) -> None:
    llm = make(model_dir)
    stream = llm.stream(["one", "two", "three"], greedy(10))
    first = next(stream)
    llm.abort(first.request_id)
    llm.abort(first.request_id)  # twice: ignored
    final = next(stream)
    assert final.request_id == first.request_id and final.finished
    assert final.outputs[0].finish_reason == "abort" and final.outputs[0].stop_reason is None
    assert final.metrics is not None and final.metrics.finished_time is not None
    rest = list(stream)
    assert first.request_id not in {o.request_id for o in rest}
    assert {o.request_id for o in rest if o.finished} == {"1", "2"} - {first.request_id} | (
        {"0"} - {first.request_id}
    )
    assert whole(llm)
    llm.abort(first.request_id)  # after the stream: nothing queued for the next one
    (again,) = llm.generate("x", greedy(2), use_tqdm=False)
    assert again.outputs[0].finish_reason == "length"
    assert math.isfinite(again.outputs[0].cumulative_logprob or 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_outputs_equal_cpu(enforce_eager: bool) -> None:
    """Logprobs, prompt logprobs and penalized greedy tokens on the GPU (decode graphs on and
    off) equal the CPU engine's, float32, on a random Llama the Triton kernels accept."""
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
    model = random_model(config, seed=0, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [
        {"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (5, 33, 17)
    ]
    params = [
        SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2
        ),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.0, logprobs=1
        ),
    ]
    kw: dict[str, Any] = dict(block_size=16, num_gpu_blocks=64, max_model_len=128)
    cpu = LLM(model, device="cpu", dtype="float32", **kw).generate(prompts, params, use_tqdm=False)
    gpu_llm = LLM(model, device="cuda", dtype="float32", enforce_eager=enforce_eager, **kw)
    gpu = gpu_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(cpu, gpu, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        assert cb.cumulative_logprob == pytest.approx(ca.cumulative_logprob, abs=1e-3)
        assert (ca.logprobs is None) == (cb.logprobs is None)
        for sa, sb in zip(ca.logprobs or [], cb.logprobs or []):
            assert list(sa) == list(sb)
            assert [v.logprob for v in sb.values()] == pytest.approx(
                [v.logprob for v in sa.values()], abs=1e-3
            )
    assert same_prompt_logprobs([cpu[0]], [gpu[0]], tol=1e-3)
    assert whole(gpu_llm)
