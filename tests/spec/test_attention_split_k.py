"""spec.split_k: partial states over any partition of the keys, and the log-sum-exp merge.

Properties take the merge under test as ``merge`` so the mutation tests can hand them a broken one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_dense import DenseCase, assert_states_close, dense_cases

from spec.attention import AttentionParams, AttentionShapeError, attention
from spec.split_k import merge_states, partial_attention, split_k_attention

Merge = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
SETTINGS = settings(max_examples=80, deadline=None)


@dataclass(frozen=True)
class SplitCase:
    """A dense case and an assignment of each key to one of ``num_parts`` parts (any partition)."""

    dense: DenseCase
    part_of_key: tuple[int, ...]
    num_parts: int


@st.composite
def split_cases(draw: st.DrawFn) -> SplitCase:
    dense = draw(dense_cases())
    num_parts = draw(st.integers(1, 5))
    num_k = dense.k.shape[0]
    parts = draw(st.lists(st.integers(0, num_parts - 1), min_size=num_k, max_size=num_k))
    return SplitCase(dense=dense, part_of_key=tuple(parts), num_parts=num_parts)


@dataclass(frozen=True)
class StateCase:
    """Arbitrary partial states: o [S, R, D] and lse [S, R] with some empty (-inf) entries."""

    os: np.ndarray
    lses: np.ndarray


@st.composite
def state_cases(draw: st.DrawFn) -> StateCase:
    s, r, d = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lses = rng.normal(scale=draw(st.sampled_from([1.0, 30.0])), size=(s, r))
    empty = rng.random(size=(s, r)) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    os = np.where(empty[..., None], 0.0, rng.normal(size=(s, r, d)))
    return StateCase(os=os, lses=np.where(empty, -np.inf, lses))


def partial_states(case: SplitCase) -> tuple[np.ndarray, np.ndarray]:
    """(os [P, Q, Hq, D], lses [P, Q, Hq]) of each part of the keys."""
    d = case.dense
    keys = np.array(case.part_of_key, dtype=np.int64)
    picks = [np.flatnonzero(keys == j) for j in range(case.num_parts)]
    states = [partial_attention(d.q, d.k[i], d.v[i], d.params, d.q_positions, i) for i in picks]
    return np.stack([s[0] for s in states]), np.stack([s[1] for s in states])


def prop_split_equals_dense(case: SplitCase, merge: Merge = merge_states) -> None:
    """Merging the parts of any partition gives attention over all keys, o and lse."""
    d = case.dense
    ref = attention(d.q, d.k, d.v, d.params, q_positions=d.q_positions)
    assert_states_close(merge(*partial_states(case)), ref)


def prop_merge_commutative(case: StateCase, merge: Merge = merge_states) -> None:
    """Merge order does not matter."""
    order = np.random.default_rng(len(case.lses)).permutation(len(case.lses))[::-1]
    assert_states_close(merge(case.os[order], case.lses[order]), merge(case.os, case.lses))


def prop_merge_associative(case: StateCase, merge: Merge = merge_states) -> None:
    """Merging groups first, at every cut, equals merging all at once."""
    whole = merge(case.os, case.lses)
    for cut in range(len(case.lses) + 1):
        left = merge(case.os[:cut], case.lses[:cut])
        right = merge(case.os[cut:], case.lses[cut:])
        assert_states_close(
            merge(np.stack([left[0], right[0]]), np.stack([left[1], right[1]])), whole
        )


def prop_empty_state_is_identity(case: StateCase, merge: Merge = merge_states) -> None:
    """Adding an empty part (o = 0, lse = -inf) changes nothing; merging nothing gives it."""
    empty_o = np.zeros((1,) + case.os.shape[1:])
    empty_lse = np.full((1,) + case.lses.shape[1:], -np.inf)
    with_empty = merge(np.concatenate([case.os, empty_o]), np.concatenate([case.lses, empty_lse]))
    assert_states_close(with_empty, merge(case.os, case.lses))
    o, lse = merge(empty_o, empty_lse)
    assert np.array_equal(o, empty_o[0]) and np.array_equal(lse, empty_lse[0])


@SETTINGS
@given(split_cases())
def test_split_k_any_partition_equals_dense(case: SplitCase) -> None:
    prop_split_equals_dense(case)


@SETTINGS
@given(state_cases())
def test_merge_states_commutative(case: StateCase) -> None:
    prop_merge_commutative(case)


@SETTINGS
@given(state_cases())
def test_merge_states_associative(case: StateCase) -> None:
    prop_merge_associative(case)


@SETTINGS
@given(state_cases())
def test_merge_states_empty_is_identity(case: StateCase) -> None:
    prop_empty_state_is_identity(case)


@SETTINGS
@given(dense_cases(), st.lists(st.integers(0, 9), max_size=4))
def test_split_k_attention_contiguous_splits(case: DenseCase, cuts: list[int]) -> None:
    cuts = sorted(min(c, case.k.shape[0]) for c in cuts)
    got = split_k_attention(case.q, case.k, case.v, case.params, cuts, q_positions=case.q_positions)
    ref = attention(case.q, case.k, case.v, case.params, q_positions=case.q_positions)
    assert_states_close(got, ref)


def test_merge_states_of_nothing_is_empty() -> None:
    o, lse = merge_states(np.zeros((0, 2, 3)), np.zeros((0, 2)))
    assert o.shape == (2, 3) and not o.any() and np.isneginf(lse).all()


def test_merge_states_huge_lse_does_not_overflow() -> None:
    o, lse = merge_states([[1.0], [3.0]], [800.0, 800.0])  # exp(800) overflows float64
    assert o.tolist() == [2.0] and lse == pytest.approx(800.0 + np.log(2.0))


def test_merge_states_rejects() -> None:
    with pytest.raises(AttentionShapeError, match=r"os=\(2, 3\), lses=\(3,\)"):
        merge_states(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(AttentionShapeError, match="NaN or \\+inf"):
        merge_states(np.zeros((1, 3)), [np.nan])
    with pytest.raises(AttentionShapeError, match="NaN or \\+inf"):
        merge_states(np.zeros((1, 3)), [np.inf])
    with pytest.raises(AttentionShapeError, match="boundaries=\\[3, 1\\]"):
        kv = np.zeros((4, 1, 1))
        split_k_attention(np.zeros((1, 1, 1)), kv, kv, AttentionParams(scale=1.0), [3, 1])
