"""``LLM.generate`` runs its steps with the heap it started with frozen (fast.api.gc_policy):
frozen during every step, given back on return and on a failure, and a heap frozen before the
call is left frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams


@pytest.fixture()
def llm(tiny: object) -> Iterator[LLM]:
    assert gc.get_freeze_count() == 0, "a test before this one left the heap frozen"
    with LLM(tiny, device="cpu") as engine:
        yield engine
    gc.unfreeze()


def _watch_steps(llm: LLM, fail_at: int | None = None) -> list[int]:
    """Record the freeze count inside every engine step; raise at step ``fail_at``."""
    counts: list[int] = []
    step = llm.llm_engine.step

    def watched(*args: Any, **kwargs: Any) -> Any:
        counts.append(gc.get_freeze_count())
        if fail_at is not None and len(counts) == fail_at:
            raise RuntimeError("injected")
        return step(*args, **kwargs)

    llm.llm_engine.step = watched  # type: ignore[method-assign]
    return counts


PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def test_generate_steps_with_the_heap_frozen_and_unfreezes_after(llm: LLM) -> None:
    before = gc.get_freeze_count()
    counts = _watch_steps(llm)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5]
    assert len(counts) >= 5 and min(counts) > 10_000  # the model, torch, pytest: all frozen
    assert before == 0 and gc.get_freeze_count() == 0


def test_a_failed_step_unfreezes_the_heap(llm: LLM) -> None:
    counts = _watch_steps(llm, fail_at=2)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert counts[-1] > 10_000 and gc.get_freeze_count() == 0
    assert not llm.llm_engine.has_unfinished_requests()  # the call's requests were aborted


def test_a_heap_frozen_before_the_call_stays_frozen(llm: LLM) -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    counts = _watch_steps(llm)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    # (frozen objects freed by reference counting leave the count: it only drops a little)
    assert min(counts) > frozen // 2 and gc.get_freeze_count() > frozen // 2
