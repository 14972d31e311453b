"""Sampler: greedy is argmax, top-k/top-p masks, seeded rows independent of the batch, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from fast.engine.sampler import Sampler, SamplerInputError, apply_top_k_top_p
from fast.engine.sampling_params import SamplingParams

V = 50


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_greedy_is_argmax() -> None:
    x = logits(6)
    tokens, lps = Sampler().sample(x, [SamplingParams(temperature=0.0)] * 6)
    assert tokens == x.argmax(-1).tolist()
    assert lps == [None] * 6


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
    tokens, _ = Sampler().sample(x, params)
    assert set(tokens) <= set(x[0].topk(3).indices.tolist())
    assert len(set(tokens)) > 1


def test_sampling_frequencies_follow_temperature() -> None:
    torch.manual_seed(3)
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temp in (0.5, 1.0, 2.0):
        tokens, _ = Sampler().sample(
            base.repeat(20000, 1), [SamplingParams(temperature=temp)] * 20000
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
            tokens, _ = Sampler().sample(x[rows], params, [gens.get(r) for r in rows])
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
    tokens, lps = Sampler().sample(x, params)
    raw = torch.log_softmax(x, -1)
    first = lps[0]
    assert first is not None and tokens[0] in first
    top4 = raw[0].topk(4)
    for tid, val in zip(top4.indices.tolist(), top4.values.tolist()):
        assert math.isclose(first[tid], val, rel_tol=1e-6)
    assert math.isclose(first[tokens[0]], float(raw[0, tokens[0]]), rel_tol=1e-6)
    assert lps[1] == {tokens[1]: pytest.approx(float(raw[1].max()))}
    assert lps[2] is None


def test_mismatched_rows_raise_with_counts() -> None:
    with pytest.raises(SamplerInputError, match="3 logit rows, 2 params"):
        Sampler().sample(logits(3), [SamplingParams()] * 2)
    assert Sampler().sample(torch.empty(0, V), []) == ([], [])


def test_banned_tokens_never_chosen_but_logprobs_stay_raw() -> None:
    x = logits(4, seed=6)
    top = x.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.0),
    ]
    tokens, lps = Sampler().sample(x, params, banned=[{top[0]}, set(), [top[2]], ()])
    assert tokens[0] != top[0] and tokens[0] == int(x[0].topk(2).indices[1])
    assert tokens[1] == top[1] and tokens[3] == top[3]
    assert tokens[2] != top[2]
    raw = torch.log_softmax(x[0], -1)
    assert lps[0] is not None and lps[0][top[0]] == pytest.approx(float(raw[top[0]]))
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
    tokens, _ = Sampler().sample(x, [greedy] * 4)
    assert tokens == x.argmax(-1).tolist()
