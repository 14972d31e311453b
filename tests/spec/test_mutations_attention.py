"""Each attention property fails on a planted error: hypothesis must find a counterexample.

A mutant is either a patched module attribute of the spec (the spec calls it through its module,
so the patch takes effect) or a broken implementation handed to a property that takes the
operation under test. Without the mutant the same properties pass (the test_attention_* files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_attention_dense import (
    dense_cases,
    prop_dense_matches_loops,
    prop_gqa_equals_mha,
    prop_softcap_large_is_plain,
    prop_window_is_recent_keys,
)
from test_attention_kv_cache import (
    copy_cases,
    prop_copy_blocks_exact,
    prop_swap_blocks_exact,
    prop_write_then_gather,
    swap_cases,
    write_cases,
)
from test_attention_paged import (
    paged_cases,
    prop_decode_equals_dense,
    prop_decode_is_last_prefill_row,
    prop_layout_invariant,
    prop_prefill_equals_dense,
)
from test_attention_split_k import (
    prop_empty_state_is_identity,
    prop_merge_associative,
    prop_merge_commutative,
    prop_split_equals_dense,
    split_cases,
    state_cases,
)
from test_attention_tolerances import prop_non_finite_never_passes

import spec.attention
import spec.kv_cache
import spec.paged_decode
import spec.paged_prefill
import spec.split_k
from spec.attention import AttentionShapeError
from spec.kv_cache import copy_blocks, write_kv

MUTANT_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    phases=[Phase.generate],  # a counterexample is enough; no shrinking
    suppress_health_check=list(HealthCheck),
)


def assert_caught(
    prop: Callable[[Any], None],
    strategy: st.SearchStrategy[Any],
    mutant: contextlib.AbstractContextManager[Any] | None = None,
    caught_by: tuple[type[BaseException], ...] = (AssertionError,),
) -> None:
    """Run ``prop`` under hypothesis with ``mutant`` active and require a counterexample."""

    @MUTANT_SETTINGS
    @given(strategy)
    def search(case: Any) -> None:
        prop(case)

    with mutant or contextlib.nullcontext(), pytest.raises(caught_by):
        search()


# -- mutants of spec.attention ------------------------------------------------------------------


def kv_head_modulo(num_q_heads: int, num_kv_heads: int) -> np.ndarray:
    return np.arange(num_q_heads, dtype=np.int64) % num_kv_heads  # should be h // group


def window_one_wider(
    q_positions: np.ndarray, k_positions: np.ndarray, sliding_window: int | None
) -> np.ndarray:
    mask = k_positions[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        mask &= k_positions[None, :] >= q_positions[:, None] - sliding_window  # should be >
    return mask


def softcap_without_c(
    q: np.ndarray, k: np.ndarray, params: spec.attention.AttentionParams
) -> np.ndarray:
    heads = spec.attention.kv_head_map(q.shape[1], k.shape[1])
    s = params.scale * np.einsum("qhd,khd->qhk", q, k[:, heads, :])
    return (
        np.tanh(s / params.softcap) if params.softcap is not None else s
    )  # should be c * tanh(s / c)


@pytest.mark.parametrize("prop", [prop_gqa_equals_mha, prop_dense_matches_loops])
def test_mutant_gqa_head_mapping_modulo(prop: Callable[[Any], None]) -> None:
    assert_caught(
        prop,
        dense_cases(min_kv_heads=2, min_group=2),
        mock.patch.object(spec.attention, "kv_head_map", kv_head_modulo),
    )


@pytest.mark.parametrize("prop", [prop_window_is_recent_keys, prop_dense_matches_loops])
def test_mutant_window_off_by_one(prop: Callable[[Any], None]) -> None:
    assert_caught(
        prop, dense_cases(), mock.patch.object(spec.attention, "visible", window_one_wider)
    )


@pytest.mark.parametrize("prop", [prop_softcap_large_is_plain, prop_dense_matches_loops])
def test_mutant_softcap_missing_factor(prop: Callable[[Any], None]) -> None:
    assert_caught(
        prop, dense_cases(), mock.patch.object(spec.attention, "logits", softcap_without_c)
    )


# -- mutants of paged prefill / decode / gather ---------------------------------------------------


def top_left_positions(seq_len: int, q_len: int) -> np.ndarray:
    return np.arange(q_len, dtype=np.int64)  # should be seq_len - q_len + i


def decode_one_position_late(*args: Any, **kwargs: Any) -> Any:
    kwargs["q_positions"] = [p + 1 for p in kwargs["q_positions"]]  # should be seq_len - 1
    return spec.attention.attention(*args, **kwargs)


def slots_ignoring_order(block_table: Any, seq_len: int, block_size: int) -> np.ndarray:
    table = np.sort(np.asarray(block_table)[: -(-seq_len // block_size)])  # logical order lost
    t = np.arange(seq_len, dtype=np.int64)
    return table[t // block_size] * block_size + t % block_size


@pytest.mark.parametrize("prop", [prop_prefill_equals_dense, prop_decode_is_last_prefill_row])
def test_mutant_causal_alignment_top_left(prop: Callable[[Any], None]) -> None:
    mutant = mock.patch.object(spec.paged_prefill, "query_positions", top_left_positions)
    assert_caught(prop, paged_cases(), mutant)


def test_mutant_decode_position_off_by_one() -> None:
    assert_caught(
        prop_decode_equals_dense,
        paged_cases(),
        mock.patch.object(spec.paged_decode, "attention", decode_one_position_late),
    )


@pytest.mark.parametrize("prop", [prop_layout_invariant, prop_prefill_equals_dense])
def test_mutant_gather_ignores_block_order(prop: Callable[[Any], None]) -> None:
    # Reading a block out of order may also land on a poisoned (NaN) slot: the spec then raises.
    mutant = mock.patch.object(spec.kv_cache, "slots_of", slots_ignoring_order)
    assert_caught(prop, paged_cases(), mutant, caught_by=(AssertionError, AttentionShapeError))


# -- mutants of the merge -------------------------------------------------------------------------


def merge_linear_weights(os: np.ndarray, lses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    os, lses = np.asarray(os, dtype=float), np.asarray(lses, dtype=float)
    m = lses.max(axis=0, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    w = np.where(np.isfinite(lses), lses - m_safe + 1.0, 0.0)  # should be exp(lses - m)
    total = np.where(w.sum(axis=0) != 0, w.sum(axis=0), 1.0)
    o = (w[..., None] * os).sum(axis=0) / total[..., None]
    return o, spec.split_k.merge_states(os, lses)[1]


def merge_lse_is_max(os: np.ndarray, lses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o, lse = spec.split_k.merge_states(os, lses)
    return o, np.asarray(lses, dtype=float).max(axis=0, initial=-np.inf)  # should be m + log sum w


def merge_unguarded(os: np.ndarray, lses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    os, lses = np.asarray(os, dtype=float), np.asarray(lses, dtype=float)
    m = lses.max(axis=0, initial=-np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.exp(lses - m)  # all parts empty: -inf - -inf = NaN
        return (w[..., None] * os).sum(axis=0) / w.sum(axis=0)[..., None], m + np.log(w.sum(axis=0))


@pytest.mark.parametrize(
    ("mutant", "prop", "strategy"),
    [
        (merge_linear_weights, prop_split_equals_dense, split_cases()),
        (merge_linear_weights, prop_merge_associative, state_cases()),
        (merge_lse_is_max, prop_split_equals_dense, split_cases()),
        (merge_lse_is_max, prop_merge_associative, state_cases()),
        (merge_unguarded, prop_empty_state_is_identity, state_cases()),
    ],
    ids=["no-exp/split", "no-exp/assoc", "lse-max/split", "lse-max/assoc", "unguarded/empty"],
)
def test_mutant_merge(
    mutant: Callable[..., Any], prop: Callable[..., None], strategy: st.SearchStrategy[Any]
) -> None:
    assert_caught(partial(prop, merge=mutant), strategy)


def merge_first_wins(os: np.ndarray, lses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o, lse = spec.split_k.merge_states(os, lses)
    return np.asarray(os, dtype=float)[0] if len(os) else o, lse  # order-dependent output


def test_mutant_merge_order_dependent() -> None:
    assert_caught(partial(prop_merge_commutative, merge=merge_first_wins), state_cases())


# -- mutants of the KV cache operations -----------------------------------------------------------


def write_kv_padding_too(
    k: Any, v: Any, k_cache: np.ndarray, v_cache: np.ndarray, slot_mapping: Any
) -> None:
    slots = np.asarray(slot_mapping)
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k  # slot -1 lands on the last slot of the pool
    v_cache[slots // bs, slots % bs] = v


def copy_blocks_k_only(k_cache: np.ndarray, v_cache: np.ndarray, pairs: Any) -> None:
    copy_blocks(k_cache, v_cache.copy(), pairs)  # V never copied


def swap_blocks_wrong_column(src: np.ndarray, dst: np.ndarray, mapping: Any) -> None:
    pairs = np.asarray(mapping, dtype=np.int64).reshape(-1, 2)
    dst[pairs[:, 1]] = src[pairs[:, 1] % len(src)]  # should read src[pairs[:, 0]]


def test_mutant_write_kv_writes_padding() -> None:
    assert_caught(partial(prop_write_then_gather, write=write_kv_padding_too), write_cases())


def test_mutant_copy_blocks_forgets_v() -> None:
    assert_caught(partial(prop_copy_blocks_exact, copy=copy_blocks_k_only), copy_cases())


def test_mutant_swap_blocks_reads_wrong_source() -> None:
    assert_caught(partial(prop_swap_blocks_exact, swap=swap_blocks_wrong_column), swap_cases())


def test_unmutated_write_kv_passes_the_same_search() -> None:
    # The harness itself: without a mutant, the same search finds nothing.
    with pytest.raises(pytest.fail.Exception):
        assert_caught(partial(prop_write_then_gather, write=write_kv), write_cases())


# -- mutant of the tolerance measure --------------------------------------------------------------


def relative_error_nan_blind(out: np.ndarray, ref: np.ndarray) -> float:
    o, r = np.nan_to_num(np.asarray(out, dtype=float)), np.asarray(ref, dtype=float)
    return float(np.linalg.norm(o - r) / np.linalg.norm(r))


def test_mutant_relative_error_ignores_nan() -> None:
    prop = partial(prop_non_finite_never_passes, measure=relative_error_nan_blind)
    assert_caught(prop, st.integers(0, 2**32 - 1))
