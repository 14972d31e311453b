"""Sampler: greedy is argmax, top-k/top-p/min-p masks, penalties and processors, seeded rows
independent of the batch, logprobs with ranks.

Penalties and min-p are held to transformers' logits processors on the same logits;
presence/frequency penalties (which transformers does not have) to a float64 formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from fast.engine.sampler import (
    Sampler,
    SamplerInputError,
    apply_min_p,
    apply_top_k_top_p,
    process_logits,
    warp_logits,
)
from fast.engine.sampling_params import SamplingParams

V = 50


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_greedy_is_argmax() -> None:
    x = logits(6)
    tokens, lps, sampled = Sampler().sample(x, [SamplingParams(temperature=0.0)] * 6)
    assert tokens == x.argmax(-1).tolist()
    assert lps == [None] * 6
    raw = torch.log_softmax(x, -1)
    assert sampled == pytest.approx(raw.max(-1).values.tolist(), abs=1e-5)  # always computed


def test_top_k_mask_keeps_exactly_k_largest() -> None:
    x = logits(4, seed=1)
    out = apply_top_k_top_p(x, [1, 3, None, V], [1.0] * 4)
    kept = torch.isfinite(out).sum(-1).tolist()
    assert kept == [1, 3, V, V]
    top3 = set(x[1].topk(3).indices.tolist())
    assert set(torch.nonzero(torch.isfinite(out[1])).flatten().tolist()) == top3
    assert torch.equal(out[2], x[2])


def test_top_p_mask_is_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    x = probs.log()
    out = apply_top_k_top_p(x, [None, None], [0.8, 0.3])
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.5+0.3 >= 0.8
    assert int(torch.isfinite(out[1]).sum()) == 2  # 0.25 < 0.3 -> 2
    out = apply_top_k_top_p(x, [None, None], [0.01, 0.81])
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]  # top token stays
    assert torch.isfinite(out[1]).sum() == 4


def test_top_k_then_top_p_renormalizes_after_k() -> None:
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # after top-k=2 the distribution is (4/7, 3/7): top_p 0.5 keeps only the first
    out = apply_top_k_top_p(x, [2], [0.5])
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_sampled_tokens_respect_masks() -> None:
    x = logits(1, seed=2).repeat(200, 1)
    params = [SamplingParams(temperature=1.5, top_k=3)] * 200
    tokens = Sampler().sample(x, params).tokens
    assert set(tokens) <= set(x[0].topk(3).indices.tolist())
    assert len(set(tokens)) > 1


def test_sampling_frequencies_follow_temperature() -> None:
    torch.manual_seed(3)
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temp in (0.5, 1.0, 2.0):
        tokens = (
            Sampler()
            .sample(base.repeat(20000, 1), [SamplingParams(temperature=temp)] * 20000)
            .tokens
        )
        freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 20000
        want = torch.softmax(base[0] / temp, -1)
        assert (freq - want).abs().max().item() < 0.015


def test_seeded_rows_reproducible_across_batch_compositions() -> None:
    x = logits(5, seed=4)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    plain = SamplingParams(temperature=1.0, top_p=0.9)

    def run(rows: list[int], seeded_row: int, steps: int = 8) -> list[int]:
        gens = {seeded_row: torch.Generator().manual_seed(1234)}
        out = []
        for _ in range(steps):
            params = [seeded if r == seeded_row else plain for r in rows]
            tokens = Sampler().sample(x[rows], params, [gens.get(r) for r in rows]).tokens
            out.append(tokens[rows.index(seeded_row)])
        return out

    alone = run([2], 2)
    assert run([0, 1, 2, 3, 4], 2) == alone
    assert run([4, 2, 0], 2) == alone
    assert len(set(alone)) > 1  # it really samples
    other_seed = Sampler().sample(
        x[[2]].repeat(8, 1), [seeded] * 8, [torch.Generator().manual_seed(99)] * 8
    )[0]
    assert other_seed != alone


def test_logprobs_are_raw_distribution_with_top_alternatives() -> None:
    x = logits(3, seed=5)
    params = [
        SamplingParams(temperature=0.7, top_k=2, logprobs=4),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(),
    ]
    tokens, lps, _ = Sampler().sample(x, params)
    raw = torch.log_softmax(x, -1)
    first = lps[0]
    assert first is not None and tokens[0] in first
    top4 = raw[0].topk(4)
    for tid, val in zip(top4.indices.tolist(), top4.values.tolist()):
        assert math.isclose(first[tid].logprob, val, rel_tol=1e-6)
    assert math.isclose(first[tokens[0]].logprob, float(raw[0, tokens[0]]), rel_tol=1e-6)
    assert list(lps[1] or {}) == [tokens[1]]
    assert (lps[1] or {})[tokens[1]].logprob == pytest.approx(float(raw[1].max()))
    assert lps[2] is None


def test_one_host_copy_per_step_without_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    # each .tolist() of a CUDA tensor waits for the GPU: a step's tokens and their
    # log-probabilities come back together, in one copy, when no row asks for logprobs
    calls = []
    real = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> object:
        calls.append(tuple(self.shape))
        return real(self)

    logits = torch.randn(5, 40)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    out = Sampler().sample(logits, [greedy, sampled, greedy, sampled, greedy])
    monkeypatch.undo()
    assert calls == [(2, 5)]
    assert out.tokens[0] == int(logits[0].argmax()) and all(isinstance(t, int) for t in out.tokens)
    want = [float(torch.log_softmax(logits[i], -1)[t]) for i, t in enumerate(out.tokens)]
    assert out.sampled_logprobs == pytest.approx(want, abs=1e-6)


def test_mismatched_rows_raise_with_counts() -> None:
    with pytest.raises(SamplerInputError, match="3 logit rows, 2 params"):
        Sampler().sample(logits(3), [SamplingParams()] * 2)
    assert Sampler().sample(torch.empty(0, V), []) == ([], [], [])


def test_banned_tokens_never_chosen_but_logprobs_stay_raw() -> None:
    x = logits(4, seed=6)
    top = x.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.0),
    ]
    tokens, lps, _ = Sampler().sample(x, params, banned=[{top[0]}, set(), [top[2]], ()])
    assert tokens[0] != top[0] and tokens[0] == int(x[0].topk(2).indices[1])
    assert tokens[1] == top[1] and tokens[3] == top[3]
    assert tokens[2] != top[2]
    raw = torch.log_softmax(x[0], -1)
    assert lps[0] is not None and lps[0][top[0]].logprob == pytest.approx(float(raw[top[0]]))
    with pytest.raises(SamplerInputError, match="1 bans"):
        Sampler().sample(x, params, banned=[()])


@pytest.mark.gpu
def test_gpu_seeded_rows_batch_independent_and_greedy_argmax() -> None:
    x = logits(4, seed=8).cuda()
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=5)
    greedy = SamplingParams(temperature=0.0)

    def draw(rows: list[int]) -> int:
        gen = torch.Generator(device="cuda").manual_seed(5)
        params = [seeded if r == 1 else greedy for r in rows]
        gens = [gen if r == 1 else None for r in rows]
        out = [Sampler().sample(x[rows], params, gens)[0][rows.index(1)] for _ in range(6)]
        return hash(tuple(out))

    assert draw([1]) == draw([0, 1, 2, 3]) == draw([3, 1])
    tokens = Sampler().sample(x, [greedy] * 4).tokens
    assert tokens == x.argmax(-1).tolist()


# -- penalties, min-p and processors, against transformers ---------------------------------------


def histories(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n random (prompt, output) token histories with repeats."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        output = torch.randint(
            0, V // 2, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g
        )
        out.append((prompt.tolist(), output.tolist()))
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(8, seed=10)
    hist = histories(8, seed=11)
    params = [SamplingParams(repetition_penalty=penalty)] * 8
    ours = process_logits(x, params, hist)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for i, (prompt, output) in enumerate(hist):
        want = hf(torch.tensor([prompt + output]), x[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], want, rtol=0, atol=0)
    if penalty != 1.0:
        assert not torch.equal(ours, x)


def test_presence_and_frequency_match_float64_formula() -> None:
    x = logits(6, seed=12)
    hist = histories(6, seed=13)
    pres = [0.0, 0.5, -1.0, 2.0, 1.5, -2.0]
    freq = [0.7, 0.0, 0.3, -0.5, 2.0, 1.0]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in zip(pres, freq)]
    ours = process_logits(x, params, hist)
    for i, (prompt, output) in enumerate(hist):
        want = x[i].double().clone()
        for t in range(V):  # output tokens only: the prompt does not count
            c = output.count(t)
            want[t] -= freq[i] * c + pres[i] * (c > 0)
        torch.testing.assert_close(ours[i].double(), want, rtol=1e-6, atol=1e-5)
        untouched = [t for t in range(V) if t not in output]
        assert torch.equal(ours[i, untouched], x[i, untouched])


def test_all_penalties_apply_repetition_first() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(4, seed=14)
    hist = histories(4, seed=15)
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.25)
    ours = process_logits(x, [p] * 4, hist)
    for i, (prompt, output) in enumerate(hist):
        rep = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), x[i : i + 1])
        counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=V).float()
        want = rep[0] - 0.25 * counts - 0.4 * (counts > 0).float()
        torch.testing.assert_close(ours[i], want)


def test_rows_without_penalties_are_untouched_and_history_is_required() -> None:
    x = logits(3, seed=16)
    hist = histories(3, seed=17)
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0), SamplingParams()]
    ours = process_logits(x, params, [None, hist[1], None])
    assert torch.equal(ours[0], x[0]) and torch.equal(ours[2], x[2])
    assert not torch.equal(ours[1], x[1])
    with pytest.raises(SamplerInputError, match="row 1"):
        Sampler().sample(x, params)
    with pytest.raises(SamplerInputError, match="row 1"):
        Sampler().sample(x, params, histories=[None, None, None])


def test_penalties_steer_greedy_choice() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(16, seed=18)
    hist = [(p, o + [int(x[i].argmax())]) for i, (p, o) in enumerate(histories(16, seed=19))]
    params = [SamplingParams(temperature=0.0, repetition_penalty=3.0)] * 16
    tokens = Sampler().sample(x, params, histories=hist).tokens
    hf = RepetitionPenaltyLogitsProcessor(3.0)
    want = [
        int(hf(torch.tensor([p + o]), x[i : i + 1].clone())[0].argmax())
        for i, (p, o) in enumerate(hist)
    ]
    assert tokens == want
    assert tokens != x.argmax(-1).tolist()  # the penalty changed some choices
    # a presence penalty of 2 on a dominant token's repeat: greedy moves off it
    y = torch.zeros(1, V)
    y[0, 7], y[0, 9] = 3.0, 2.0
    again = Sampler().sample(
        y, [SamplingParams(temperature=0.0, presence_penalty=2.0)], histories=[([1], [7])]
    )
    assert again.tokens == [9]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.6, 1.0])
def test_min_p_matches_transformers(min_p: float) -> None:
    from transformers import MinPLogitsWarper

    x = logits(8, seed=20)
    ours = apply_min_p(x, [min_p] * 8)
    want = MinPLogitsWarper(min_p)(torch.zeros(8, 1, dtype=torch.long), x.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(want))
    assert torch.equal(ours[torch.isfinite(ours)], x[torch.isfinite(ours)])
    probs = torch.softmax(x, -1)
    kept = torch.isfinite(ours)
    assert bool((probs[kept] >= 0).all()) and int(kept.sum(-1).min()) >= 1


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(0.7, 0, 1.0, 0.1), (1.3, 10, 0.9, 0.05), (0.5, 5, 0.5, 0.3), (2.0, 0, 0.8, 0.02)],
)
def test_warp_order_matches_transformers_chain(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    """temperature, then top-k, then top-p, then min-p: the order of transformers' warpers and
    of vLLM's sampler."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = logits(8, seed=21)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = warp_logits(x, [p] * 8)
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    chain.extend([TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)])
    want = chain(torch.zeros(8, 1, dtype=torch.long), x.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(want))
    torch.testing.assert_close(ours[torch.isfinite(ours)], want[torch.isfinite(want)])


def test_sampled_tokens_respect_min_p() -> None:
    torch.manual_seed(22)
    base = torch.tensor([[3.0, 2.5, 1.0, 0.0, -1.0]])
    probs = torch.softmax(base[0], -1)
    allowed = {i for i in range(5) if probs[i] >= 0.3 * probs.max()}
    assert allowed == {0, 1}
    tokens = Sampler().sample(base.repeat(4000, 1), [SamplingParams(min_p=0.3)] * 4000).tokens
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / 4000
    assert set(tokens) == allowed
    want = probs[:2] / probs[:2].sum()
    assert (freq[:2] - want).abs().max().item() < 0.03


def test_logits_processors_run_before_penalties_with_histories() -> None:
    seen: list[tuple[list[int], ...]] = []

    def ban_three(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append((output_ids,))
        row = row.clone()
        row[3] = float("-inf")
        return row

    def boost_first_prompt_token(
        prompt: list[int], output: list[int], row: torch.Tensor
    ) -> torch.Tensor:
        seen.append((prompt, output))
        return row + 100.0 * (torch.arange(row.shape[0]) == prompt[0])

    x = torch.zeros(2, V)
    x[:, 3] = 10.0
    params = [
        SamplingParams(temperature=0.0, logits_processors=[ban_three]),
        SamplingParams(temperature=0.0, logits_processors=[boost_first_prompt_token]),
    ]
    hist = [([1, 2], [4, 4]), ([8, 9], [5])]
    tokens = Sampler().sample(x, params, histories=hist).tokens
    assert tokens[0] != 3 and tokens[1] == 8
    assert seen == [([4, 4],), ([8, 9], [5])]
    # the processor's output is then penalized (vLLM's order): 8 boosted to 100, divided by 5
    p = SamplingParams(logits_processors=[boost_first_prompt_token], repetition_penalty=5.0)
    out = process_logits(torch.zeros(1, V), [p], [([8], [])])
    assert float(out[0, 8]) == pytest.approx(20.0)

    def broken(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        return row[:3]

    with pytest.raises(SamplerInputError, match="broken"):
        Sampler().sample(x[:1], [SamplingParams(logits_processors=[broken])], histories=hist[:1])


def test_logprob_ranks_and_sampled_token_outside_top_k() -> None:
    x = logits(4, seed=23)
    raw = torch.log_softmax(x, -1)
    order = raw.argsort(-1, descending=True)
    banned = [{int(order[i, 0]), int(order[i, 1]), int(order[i, 2])} for i in range(4)]
    params = [SamplingParams(temperature=0.0, logprobs=2)] * 4
    out = Sampler().sample(x, params, banned=banned)
    for i in range(4):
        token = out.tokens[i]
        assert token == int(order[i, 3])  # greedy after the three best are banned
        lp = out.logprobs[i]
        assert lp is not None and len(lp) == 3
        assert [lp[int(order[i, r])].rank for r in range(2)] == [1, 2]
        assert lp[token].rank == 4 and lp[token].decoded_token is None
        assert lp[token].logprob == pytest.approx(float(raw[i, token]), abs=1e-5)
        assert out.sampled_logprobs[i] == pytest.approx(float(raw[i, token]), abs=1e-5)


@pytest.mark.gpu
def test_gpu_penalties_warps_and_logprobs_equal_cpu() -> None:
    x = logits(6, seed=30)
    hist = histories(6, seed=31)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=3),
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.1, seed=1),
        SamplingParams(temperature=0.0, logits_processors=[lambda ids, r: r.flip(0)]),
        SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.2),
    ]
    cpu = process_logits(x, params, hist)
    gpu = process_logits(x.cuda(), params, hist)
    torch.testing.assert_close(gpu.cpu(), cpu)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    warped = [params[i] for i in rows]
    torch.testing.assert_close(
        warp_logits(x[rows].cuda(), warped).cpu(), warp_logits(x[rows], warped)
    )
    a = Sampler().sample(x, params, histories=hist)
    b = Sampler().sample(x.cuda(), params, histories=hist)
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    assert [a.tokens[i] for i in greedy_rows] == [b.tokens[i] for i in greedy_rows]
    for i in greedy_rows:
        assert b.sampled_logprobs[i] == pytest.approx(a.sampled_logprobs[i], abs=1e-5)
        la, lb = a.logprobs[i], b.logprobs[i]
        assert (la is None) == (lb is None)
        if la is not None and lb is not None:
            assert list(la) == list(lb) and [v.rank for v in la.values()] == [
                v.rank for v in lb.values()
            ]


@pytest.mark.gpu
def test_gpu_sample_device_never_synchronizes() -> None:
    """``Sampler.sample_device`` (overlapped scheduling's sampling) queues its work without a
    synchronizing call: greedy, temperature, top-k, top-p and min-p rows, seeded and not, run
    under ``torch.cuda.set_sync_debug_mode("error")`` (a copy from pageable memory, an
    ``.item()`` or a list used as an index would raise); the tokens equal ``sample``'s."""
    logits = torch.randn(6, 300, device="cuda", generator=None)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(temperature=1.0, top_k=20),
        SamplingParams(temperature=0.9, top_p=0.8, seed=4),
        SamplingParams(temperature=1.1, min_p=0.05),
        SamplingParams(temperature=0.5, top_k=5, top_p=0.9, seed=5),
    ]

    def gens() -> list[torch.Generator | None]:
        out: list[torch.Generator | None] = []
        for p in params:
            if p.seed is None:
                out.append(None)
            else:
                g = torch.Generator(device="cuda")
                g.manual_seed(p.seed)
                out.append(g)
        return out

    sampler = Sampler()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, packed = sampler.sample_device(logits, params, gens())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    seeded = [i for i, p in enumerate(params) if p.seed is not None or p.temperature == 0.0]
    again = sampler.sample(logits, params, gens())
    got = tokens.tolist()
    assert [got[i] for i in seeded] == [again.tokens[i] for i in seeded]
    assert packed.shape == (2, 6)
