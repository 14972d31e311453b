"""The once-per-step validated CPU decode path equals the per-layer checked path and still
rejects bad metadata with the kernels' named errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model_random import TINY

import fast.model.llama as llama_mod
from fast.loader import random_model
from fast.model import allocate_kv_caches
from fast.model.attention_context import AttentionContext
from fast.model.step_plan import plan_decode_step
from kernels.errors import DTypeMismatchError, IndexOutOfRangeError

BS = 4
TABLES = [[6, 1, 4], [2, 0, 0], [3, 5, 7]]
CACHED = [9, 3, 10]


def _decode_ctx(slots: list[int], lens: list[int]) -> AttentionContext:
    return AttentionContext(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(TABLES, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32),
        max_seqlen_q=1,
        is_decode=True,
    )


def _step(
    window: int | None,
    slots: list[int],
    planned: bool,
    monkeypatch: pytest.MonkeyPatch,
    layers: tuple[bool, ...] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cfg = dataclasses.replace(TINY, sliding_window=window, sliding_layers=layers)
    model = random_model(cfg, seed=1, dtype=torch.float32).model
    caches = allocate_kv_caches(cfg, 8, BS, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(2)
    for k, v in caches:  # earlier tokens: random K/V
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    if not planned:
        monkeypatch.setattr(llama_mod, "plan_decode_step", lambda *a: None)
    ctx = _decode_ctx(slots, [c + 1 for c in CACHED])
    with torch.no_grad():
        hidden = model(torch.tensor([5, 9, 77]), torch.tensor(CACHED), ctx, caches)
    monkeypatch.undo()
    return hidden, [c for pair in caches for c in pair]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("pad", [False, True])
def test_planned_decode_equals_checked_path(
    window: int | None, pad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = [4 * 4 + 1, 0 * 4 + 3, 5 * 4 + 2]  # position 9 of table 0, 3 of 1, 10 of 2
    if pad:
        slots[1] = -1
    h_fast, c_fast = _step(window, slots, True, monkeypatch)
    h_ref, c_ref = _step(window, slots, False, monkeypatch)
    assert h_fast.shape == (3, 64)
    assert (h_fast - h_ref).abs().max().item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(c_fast, c_ref))


@pytest.mark.parametrize("layers", [(True, False), (False, True)])
def test_per_layer_windows_planned_equals_checked(
    layers: tuple[bool, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One gather plan per distinct window (Gemma, Qwen2): each layer reads its own."""
    slots = [4 * 4 + 1, 0 * 4 + 3, 5 * 4 + 2]
    h_fast, c_fast = _step(3, slots, True, monkeypatch, layers)
    h_ref, c_ref = _step(3, slots, False, monkeypatch, layers)
    h_full, _ = _step(None, slots, True, monkeypatch)
    h_all, _ = _step(3, slots, True, monkeypatch)
    assert (h_fast - h_ref).abs().max().item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(c_fast, c_ref))
    # the window acts on one layer only: the result is neither all-full nor all-windowed
    assert (h_fast - h_full).abs().max().item() > 1e-3
    assert (h_fast - h_all).abs().max().item() > 1e-3
    cfg = dataclasses.replace(TINY, sliding_window=3, sliding_layers=layers)
    caches = allocate_kv_caches(cfg, 8, BS, torch.float32, "cpu")
    plan = plan_decode_step(cfg, _decode_ctx(slots, [10, 4, 11]), torch.float32, caches)
    assert plan is not None and sorted(plan.attend, key=str) == [3, None]


def test_soft_capped_model_takes_checked_path() -> None:
    cfg = dataclasses.replace(TINY, attn_logit_softcap=5.0)
    caches = allocate_kv_caches(cfg, 8, BS, torch.float32, "cpu")
    ctx = _decode_ctx([17, 3, 22], [10, 4, 11])
    assert plan_decode_step(cfg, ctx, torch.float32, caches) is None
    assert plan_decode_step(TINY, ctx, torch.float32, caches) is not None


def test_plan_only_for_uniform_cpu_decode() -> None:
    caches = allocate_kv_caches(TINY, 8, BS, torch.float32, "cpu")
    ctx = _decode_ctx([17, 3, 22], [10, 4, 11])
    assert plan_decode_step(TINY, ctx, torch.float32, caches) is not None
    assert plan_decode_step(TINY, ctx, torch.float64, caches) is None  # dtype: checked path
    prefill = AttentionContext.build([[1, 2]], [0], [5], BS)
    assert plan_decode_step(TINY, prefill, torch.float32, caches) is None


@pytest.mark.parametrize(
    "slots,lens",
    [
        ([17, 3, 99], [10, 4, 11]),  # slot past the cache
        ([17, 3, 22], [10, 4, 13]),
    ],
)  # length past the table
def test_bad_metadata_raises_named_error(slots: list[int], lens: list[int]) -> None:
    model = random_model(TINY, seed=1, dtype=torch.float32).model
    caches = allocate_kv_caches(TINY, 8, BS, torch.float32, "cpu")
    with pytest.raises(IndexOutOfRangeError), torch.no_grad():
        model(torch.tensor([5, 9, 77]), torch.tensor(CACHED), _decode_ctx(slots, lens), caches)


def test_cache_dtype_mismatch_still_raises() -> None:
    model = random_model(TINY, seed=1, dtype=torch.float32).model
    caches = allocate_kv_caches(TINY, 8, BS, torch.float64, "cpu")
    ctx = _decode_ctx([17, 3, 22], [10, 4, 11])
    with pytest.raises(DTypeMismatchError), torch.no_grad():
        model(torch.tensor([5, 9, 77]), torch.tensor(CACHED), ctx, caches)
