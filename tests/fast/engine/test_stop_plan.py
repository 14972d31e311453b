"""StopChecker.check reads a per-sequence StopPlan (made once) instead of the sampling
parameters every token: it must decide exactly as the rules read from the parameters do."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import pytest

from fast.engine.sampling_params import SamplingParams
from fast.engine.sequence import Sequence, SequenceStatus
from fast.engine.stop import StopChecker

EOS = (2, 3)
PROMPT = [11, 12, 13]


def reference_check(seq: Sequence, eos: frozenset[int], max_model_len: int) -> bool:
    """The rules as written before the plan (no tokenizer: no text, no stop strings)."""
    params = seq.sampling_params
    ids = seq.token_ids
    token = ids[-1]
    n_out = len(ids) - len(seq.prompt_token_ids)
    stop: tuple[SequenceStatus, Any] | None = None
    if n_out >= params.min_tokens:
        if not params.ignore_eos and token in eos:
            stop = (SequenceStatus.FINISHED_STOPPED, None)
        elif params.stop_token_ids and token in params.stop_token_ids:
            stop = (SequenceStatus.FINISHED_STOPPED, token)
    if stop is None and params.max_tokens is not None and n_out >= params.max_tokens:
        stop = (SequenceStatus.FINISHED_LENGTH, None)
    if stop is None and len(ids) >= max_model_len:
        stop = (SequenceStatus.FINISHED_LENGTH, None)
    if stop is None:
        return False
    seq.status, seq.stop_reason = stop
    return True


def run(check: Any, params: SamplingParams, tokens: list[int]) -> tuple[Any, ...]:
    seq = Sequence(0, "r", 0, list(PROMPT), sampling_params=params)
    for i, token in enumerate(tokens):
        seq.token_ids.append(token)
        if check(seq):
            return i, seq.status, seq.stop_reason
    return None, seq.status, seq.stop_reason


@pytest.mark.parametrize("max_model_len", [len(PROMPT) + 4, 64])
def test_plan_decides_as_the_parameters(max_model_len: int) -> None:
    checker = StopChecker(None, SimpleNamespace(eos_token_id=list(EOS)), max_model_len)  # type: ignore[arg-type]
    rng = random.Random(0)
    streams = [[rng.choice([1, 2, 3, 5, 9]) for _ in range(8)] for _ in range(40)]
    streams += [[2] * 8, [5] * 8, [1] * 8]
    combos = itertools.product((False, True), (None, [5], [2, 5], []), (0, 2), (None, 1, 3, 6))
    checked = 0
    for ignore_eos, stop_ids, min_tokens, max_tokens in combos:
        if max_tokens is not None and min_tokens > max_tokens:
            continue
        params = SamplingParams(
            ignore_eos=ignore_eos,
            stop_token_ids=stop_ids,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
        )
        for tokens in streams:
            want = run(lambda s: reference_check(s, frozenset(EOS), max_model_len), params, tokens)
            assert run(checker.check, params, tokens) == want, (params, tokens)
            checked += 1
    assert checked > 1000


def test_plan_is_made_once_and_kept() -> None:
    checker = StopChecker(None, SimpleNamespace(eos_token_id=2), 64)  # type: ignore[arg-type]
    seq = Sequence(0, "r", 0, list(PROMPT), sampling_params=SamplingParams(max_tokens=4))
    assert seq.stop_plan is None
    seq.token_ids.append(7)
    assert not checker.check(seq)
    plan = seq.stop_plan
    assert plan is not None and plan.length == len(PROMPT) + 4 and plan.stop_ids == {2}
    seq.token_ids.append(7)
    checker.check(seq)
    assert seq.stop_plan is plan
