"""LLM.beam_search: equal to transformers' beam search, on shared blocks, and transactional.

The reference is ``generate(num_beams=k, num_return_sequences=k, do_sample=False,
length_penalty=..., early_stopping=...)`` on a tiny random Llama written with
``save_pretrained``; its EOS is a token the model often generates, so beams finish early.
vLLM's length normalization (``"total"``), which transformers does not have, is held to a
plain-Python beam search over full forward passes written here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fast.api.llm import LLM  # noqa: E402
from fast.engine.beam_params import (  # noqa: E402
    BeamSearchParams,
    EngineBusyError,
    InvalidBeamSearchParamsError,
    UnknownBeamSearchParamError,
)
from fast.engine.beam_search import BeamSearchCapacityError  # noqa: E402
from fast.engine.inputs import InvalidPromptError  # noqa: E402
from fast.engine.sampling_params import SamplingParams  # noqa: E402

MAX_TOKENS = 10
PROMPT_LENS = (5, 17, 8)


class Tiny:
    def __init__(self, path: Path, model: Any, eos: int, prompts: list[list[int]]) -> None:
        self.path, self.model, self.eos, self.prompts = path, model, eos, prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]
    # EOS = the token the greedy continuations use most: some beams end early, not all
    seen: Counter[int] = Counter()
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
            seen.update(out[0, len(p) :].tolist())
    eos = seen.most_common(1)[0][0]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    path = tmp_path_factory.mktemp("beam") / "tiny"
    model.save_pretrained(path)
    return Tiny(path, model, eos, prompts)


@pytest.fixture(scope="module")
def llm(tiny: Tiny) -> LLM:
    return LLM(str(tiny.path), block_size=4, num_gpu_blocks=128, max_model_len=128)


def hf_beams(
    tiny: Tiny, prompt: list[int], p: BeamSearchParams
) -> tuple[list[list[int]], list[float]]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        r = tiny.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            num_beams=p.beam_width,
            num_return_sequences=p.beam_width,
            do_sample=False,
            max_new_tokens=p.max_tokens,
            length_penalty=p.length_penalty,
            early_stopping=p.early_stopping,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None if p.ignore_eos else tiny.eos,
            pad_token_id=tiny.eos,
        )
    seqs = []
    for row in r.sequences[:, len(prompt) :].tolist():
        if not p.ignore_eos and tiny.eos in row:  # padded after EOS
            row = row[: row.index(tiny.eos) + 1]
        seqs.append(row)
    if p.beam_width == 1:  # generate runs greedy search: no beam scores
        return seqs, []
    return seqs, r.sequences_scores.tolist()


CASES = [
    # (beam_width, early_stopping, length_penalty, ignore_eos)
    (1, True, 1.0, False),  # width 1, stopping at the first finished beam: greedy
    (2, False, 1.0, False),
    (4, "never", 1.0, False),
    (4, True, 0.5, False),
    (4, False, 0.0, False),
    (8, "never", 2.0, False),
    (8, False, 1.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_equals_transformers(tiny: Tiny, llm: LLM, case: tuple[Any, ...]) -> None:
    k, early, lp, ignore = case
    p = BeamSearchParams(
        beam_width=k,
        max_tokens=MAX_TOKENS,
        length_penalty=lp,
        early_stopping=early,
        ignore_eos=ignore,
    )
    outs = llm.beam_search([{"prompt_token_ids": q} for q in tiny.prompts], p)
    engine = llm.llm_engine
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    engine.block_manager.check_integrity()
    for q, out in zip(tiny.prompts, outs):
        seqs, scores = hf_beams(tiny, q, p)
        got = [s.output_token_ids for s in out.sequences]
        assert got == seqs
        assert all(s.tokens[: len(q)] == q for s in out.sequences)
        ours = [s.score for s in out.sequences]
        assert ours == sorted(ours, reverse=True)
        if scores:
            assert max(abs(a - b) for a, b in zip(ours, scores)) < 1e-4
        for s in out.sequences:
            n = len(s.output_token_ids)
            assert s.score == pytest.approx(s.cum_logprob / n**lp, rel=1e-6)
            assert s.cum_logprob == pytest.approx(
                sum(lp_[t].logprob for t, lp_ in zip(s.output_token_ids, s.logprobs)), abs=1e-4
            )
            assert s.finish_reason == (
                "stop" if s.output_token_ids[-1] == tiny.eos and not ignore else "length"
            )


def test_eos_finishes_beams_early(tiny: Tiny, llm: LLM) -> None:
    """The cases above do reach the EOS path: beams end with EOS before max_tokens."""
    p = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS)
    outs = llm.beam_search([{"prompt_token_ids": q} for q in tiny.prompts], p)
    reasons = [s.finish_reason for o in outs for s in o.sequences]
    lengths = [len(s.output_token_ids) for o in outs for s in o.sequences]
    assert "stop" in reasons and min(lengths) < MAX_TOKENS


def reference(
    model: Any, prompt: list[int], p: BeamSearchParams, eos: int
) -> list[tuple[list[int], float]]:
    """transformers' beam search in plain Python over full forward passes (no KV cache), with
    either length normalization: (generated tokens, score) best first."""
    k = p.beam_width

    def length(n: int, ends: bool) -> int:
        return n if p.length_normalization == "generated" else len(prompt) + n - int(ends)

    running: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for n in range(1, p.max_tokens + 1):
        cands = []
        for toks, cum in running:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + toks])).logits[0, -1].float()
            lps = torch.log_softmax(logits, -1)
            for t in range(lps.shape[0]):
                cands.append((cum + float(lps[t]), toks + [t]))
        cands.sort(key=lambda c: -c[0])
        cands = cands[: 2 * k]
        nxt = []
        for r, (cum, toks) in enumerate(cands):
            ends = toks[-1] == eos and not p.ignore_eos
            if ends or n == p.max_tokens:
                if r < k:
                    finished.append((toks, cum / length(n, ends) ** p.length_penalty))
            elif len(nxt) < k:
                nxt.append((toks, cum))
        finished = sorted(finished, key=lambda f: -f[1])[:k]
        running = nxt
        best = running[0][1] / length(p.max_tokens, False) ** p.length_penalty if running else None
        if len(finished) == k and (best is None or best <= finished[-1][1]):
            break  # early_stopping="never" with length_penalty > 0: nothing can change
    return finished


@pytest.mark.parametrize("normalization", ["generated", "total"])
def test_length_normalization_equals_a_plain_reference(
    tiny: Tiny, llm: LLM, normalization: str
) -> None:
    p = BeamSearchParams(beam_width=3, max_tokens=6, length_normalization=normalization)
    q = tiny.prompts[0]
    (out,) = llm.beam_search([{"prompt_token_ids": q}], p)
    want = reference(tiny.model, q, p, tiny.eos)
    assert [s.output_token_ids for s in out.sequences] == [t for t, _ in want]
    assert [s.score for s in out.sequences] == pytest.approx([s for _, s in want], abs=1e-4)


def test_vllm_normalization_divides_by_prompt_and_output_without_eos(tiny: Tiny, llm: LLM) -> None:
    p = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, length_normalization="total")
    for q, out in zip(
        tiny.prompts, llm.beam_search([{"prompt_token_ids": q} for q in tiny.prompts], p)
    ):
        for s in out.sequences:
            n = len(s.tokens) - (s.finish_reason == "stop")
            assert s.score == pytest.approx(s.cum_logprob / n, rel=1e-6)


def test_shared_blocks_counted_by_hand(tiny: Tiny, llm: LLM) -> None:
    """Blocks of 4, width 2, 3 tokens. An 8-token prompt: 2 full prompt blocks shared; after
    step 1 each beam has 9 tokens in its own 3rd block (4 physical, 6 unshared), after step 2
    too (10 tokens); step 3 ends. A 6-token prompt: 1 full block shared, and the partial 2nd
    block is copied on the first append (3 physical, 4 unshared, one copy)."""
    p = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    full, partial = llm.beam_search(
        [{"prompt_token_ids": tiny.prompts[2]}, {"prompt_token_ids": tiny.prompts[2][:6]}], p
    )
    b = full.blocks
    assert (b.peak_physical_blocks, b.peak_unshared_blocks) == (4, 6)
    assert (b.physical_block_steps, b.unshared_block_steps) == (2 + 4 + 4, 2 + 6 + 6)
    # step 1 forks the one beam (its last block is full: no copy); a fork at step 2 shares
    # the 9-token beam's partial 3rd block, and the first of the two to append copies it
    assert b.forks >= 1 and b.copied_blocks == b.forks - 1
    c = partial.blocks
    assert (c.peak_physical_blocks, c.peak_unshared_blocks) == (3, 4)
    assert (c.physical_block_steps, c.unshared_block_steps) == (2 + 3 + 3, 2 + 4 + 4)
    assert c.copied_blocks == c.forks  # every fork shares a partial block
    assert llm.llm_engine.num_free_gpu_blocks == llm.llm_engine.num_gpu_blocks


class Raising(torch.nn.Module):
    """The engine's model, raising ``error`` on its ``n``-th call."""

    def __init__(self, inner: Any, n: int, error: BaseException, before: Any = None) -> None:
        super().__init__()
        self.inner, self.n, self.error, self.calls, self.before = inner, n, error, 0, before

    def forward(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            if self.before is not None:
                self.before()
            raise self.error
        return self.inner(*args)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.compute_logits(hidden)  # type: ignore[no-any-return]


def snapshot(llm: LLM) -> tuple[Any, ...]:
    bm = llm.llm_engine.block_manager
    return (
        int(bm.num_free_gpu_blocks),
        [int(x) for x in bm.free_block_order()],
        sorted(int(x) for x in bm.cached_blocks()),
    )


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_a_failure_leaves_the_engine_as_it_was(tiny: Tiny, error: BaseException) -> None:
    llm = LLM(str(tiny.path), block_size=4, num_gpu_blocks=64, max_model_len=128)
    engine = llm.llm_engine
    p = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS)
    prompts = [{"prompt_token_ids": q} for q in tiny.prompts]
    want = llm.beam_search(prompts, p)
    before = snapshot(llm)
    real = engine.model
    engine.model = Raising(real, 3, error)
    with pytest.raises(type(error)):
        llm.beam_search(prompts, p)
    assert engine.model.calls == 3
    engine.model = real
    assert snapshot(llm) == before
    engine.block_manager.check_integrity()
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    again = llm.beam_search(prompts, p)
    assert [[s.tokens for s in o.sequences] for o in again] == [
        [s.tokens for s in o.sequences] for o in want
    ]


def test_a_failure_gives_back_evicted_prefix_cache_blocks(tiny: Tiny) -> None:
    """With prefix caching, a search evicts the cached blocks of an earlier one and writes
    them; a failure rolls the manager back (the blocks are cached again) and puts their KV
    back, so the earlier prompt's cache hits still give its own beams."""
    llm = LLM(
        str(tiny.path),
        block_size=4,
        num_gpu_blocks=14,
        max_model_len=48,
        enable_prefix_caching=True,
    )
    engine = llm.llm_engine
    a = [{"prompt_token_ids": tiny.prompts[1]}]  # 17 tokens: 4 full blocks
    small = BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True)
    (first,) = llm.beam_search(a, small)
    cached = set(snapshot(llm)[2])
    assert len(cached) >= 4
    before = snapshot(llm)
    evicted: list[set[int]] = []

    def note_evictions() -> None:
        evicted.append(cached - {int(b) for b in engine.block_manager.cached_blocks()})

    real = engine.model
    engine.model = Raising(real, MAX_TOKENS, RuntimeError("late"), before=note_evictions)
    p = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True)
    with pytest.raises(RuntimeError):
        llm.beam_search([{"prompt_token_ids": tiny.prompts[2]}], p)
    engine.model = real
    assert evicted and evicted[0], "the search did not evict the cached blocks: no test"
    assert snapshot(llm) == before
    engine.block_manager.check_integrity()
    (again,) = llm.beam_search(a, small)
    assert again.num_cached_tokens == 16
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
    assert [s.cum_logprob for s in again.sequences] == pytest.approx(
        [s.cum_logprob for s in first.sequences], abs=1e-5
    )


def test_needs_an_idle_engine(tiny: Tiny, llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2))
    try:
        with pytest.raises(EngineBusyError) as info:
            llm.beam_search([[4, 5, 6]], BeamSearchParams(beam_width=2, max_tokens=2))
        assert info.value.num_unfinished == 1
        assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    finally:
        engine.abort_request("busy")


def test_refusals_before_anything_runs(tiny: Tiny) -> None:
    llm = LLM(str(tiny.path), block_size=4, num_gpu_blocks=8, max_model_len=32)
    with pytest.raises(BeamSearchCapacityError) as cap:  # 8 beams of up to 20 tokens
        llm.beam_search([list(range(1, 11)), [1, 2]], BeamSearchParams(beam_width=8, max_tokens=10))
    assert (cap.value.index, cap.value.needed, cap.value.available) == (0, 2 + 8 * 3, 8)
    with pytest.raises(InvalidPromptError):  # 32 tokens: no room to generate
        llm.beam_search([list(range(32))], BeamSearchParams(beam_width=2, max_tokens=2))
    with pytest.raises(InvalidPromptError):
        llm.beam_search([[1, 2], [1000]], BeamSearchParams(beam_width=2, max_tokens=2))
    assert llm.llm_engine.num_free_gpu_blocks == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beam_width=True, max_tokens=4),
        dict(beam_width=0, max_tokens=4),
        dict(beam_width=2, max_tokens=2.0),
        dict(beam_width=2, max_tokens=4, ignore_eos=1),
        dict(beam_width=2, max_tokens=4, temperature=-0.5),
        dict(beam_width=2, max_tokens=4, temperature=float("nan")),
        dict(beam_width=2, max_tokens=4, length_penalty=True),
        dict(beam_width=2, max_tokens=4, early_stopping="always"),
        dict(beam_width=2, max_tokens=4, early_stopping=1),
        dict(beam_width=2, max_tokens=4, length_normalization="prompt"),
        dict(beam_width=2, max_tokens=4, include_stop_str_in_output="yes"),
    ],
)
def test_params_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidBeamSearchParamsError) as info:
        BeamSearchParams(**kwargs)
    assert info.value.name in kwargs


def test_unknown_param_names_the_close_ones() -> None:
    with pytest.raises(UnknownBeamSearchParamError) as info:
        BeamSearchParams(beam_width=2, max_tokens=4, lenght_penalty=2.0)
    assert info.value.suggestions == ["length_penalty"]
    with pytest.raises(dataclasses_error()):
        BeamSearchParams(beam_width=2, max_tokens=4).beam_width = 3  # type: ignore[misc]


def dataclasses_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError
