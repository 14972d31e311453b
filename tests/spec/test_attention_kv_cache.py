"""spec.kv_cache: write_kv then gather reads back; copy/swap move exactly the named blocks.

Properties take the operation under test so the mutation tests can hand them a broken one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.attention import AttentionShapeError
from spec.kv_cache import copy_blocks, gather_kv, slots_of, swap_blocks, write_kv

SETTINGS = settings(max_examples=80, deadline=None)


@dataclass(frozen=True)
class WriteCase:
    """A filled cache [N, bs, Hkv, D], a sequence's block table, and T new tokens at some slots."""

    k_cache: np.ndarray
    v_cache: np.ndarray
    block_table: np.ndarray
    seq_len: int
    positions: np.ndarray  # [T] logical positions written, -1 = padding token
    k: np.ndarray  # [T, Hkv, D]
    v: np.ndarray


@st.composite
def write_cases(draw: st.DrawFn) -> WriteCase:
    bs, hkv, d = draw(st.sampled_from([1, 2, 4])), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 10))
    used = -(-seq_len // bs)
    num_blocks = used + draw(st.integers(0, 3))
    table = np.array(draw(st.permutations(range(num_blocks)))[:used], dtype=np.int64)
    written = draw(st.sets(st.integers(0, seq_len - 1), min_size=1))
    positions = list(written) + [-1] * draw(st.integers(0, 3))
    positions = draw(st.permutations(positions))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (num_blocks, bs, hkv, d)
    return WriteCase(
        k_cache=rng.normal(size=shape),
        v_cache=rng.normal(size=shape),
        block_table=table,
        seq_len=seq_len,
        positions=np.array(positions, dtype=np.int64),
        k=rng.normal(size=(len(positions), hkv, d)),
        v=rng.normal(size=(len(positions), hkv, d)),
    )


def prop_write_then_gather(case: WriteCase, write: Callable[..., None] = write_kv) -> None:
    """Written tokens read back at their positions; every other slot keeps its old value."""
    kc, vc = case.k_cache.copy(), case.v_cache.copy()
    all_slots = slots_of(case.block_table, case.seq_len, kc.shape[1])  # [L]
    slots = np.where(case.positions >= 0, all_slots[case.positions], -1)
    write(case.k, case.v, kc, vc, slots)
    k, v = gather_kv(kc, vc, case.block_table, case.seq_len)
    live = case.positions >= 0
    assert np.array_equal(k[case.positions[live]], case.k[live])
    assert np.array_equal(v[case.positions[live]], case.v[live])
    untouched = np.ones(kc.shape[:2], dtype=bool)
    untouched[slots[live] // kc.shape[1], slots[live] % kc.shape[1]] = False
    assert np.array_equal(kc[untouched], case.k_cache[untouched])
    assert np.array_equal(vc[untouched], case.v_cache[untouched])


@dataclass(frozen=True)
class BlockMoveCase:
    """Two pools [N, bs, Hkv, D] (K and V of one pool, or source and destination pools) and
    pairs."""

    a: np.ndarray
    b: np.ndarray
    pairs: np.ndarray  # [M, 2]


@st.composite
def copy_cases(draw: st.DrawFn) -> BlockMoveCase:
    num_blocks = draw(st.integers(2, 10))
    ids = draw(st.permutations(range(num_blocks)))
    num_src = draw(st.integers(1, num_blocks - 1))
    srcs, free = ids[:num_src], ids[num_src:]
    dsts = draw(st.lists(st.sampled_from(free), unique=True, max_size=len(free)))
    pairs = np.array([(draw(st.sampled_from(srcs)), dst) for dst in dsts], dtype=np.int64).reshape(
        -1, 2
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (num_blocks, draw(st.integers(1, 3)), 1, 2)
    return BlockMoveCase(a=rng.normal(size=shape), b=rng.normal(size=shape), pairs=pairs)


@st.composite
def swap_cases(draw: st.DrawFn) -> BlockMoveCase:
    n_src, n_dst = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dsts = draw(st.lists(st.integers(0, n_dst - 1), unique=True, max_size=n_dst))
    pairs = np.array([(draw(st.integers(0, n_src - 1)), d) for d in dsts], dtype=np.int64).reshape(
        -1, 2
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    block = (draw(st.integers(1, 3)), 2, 2)
    a, b = rng.normal(size=(n_src,) + block), rng.normal(size=(n_dst,) + block)
    return BlockMoveCase(a=a, b=b, pairs=pairs)


def prop_copy_blocks_exact(case: BlockMoveCase, copy: Callable[..., None] = copy_blocks) -> None:
    """Each destination becomes its source, in K and in V; every other block is unchanged."""
    kc, vc = case.a.copy(), case.b.copy()
    copy(kc, vc, case.pairs)
    expected_k, expected_v = case.a.copy(), case.b.copy()
    for src, dst in case.pairs.tolist():
        expected_k[dst], expected_v[dst] = case.a[src], case.b[src]
    assert np.array_equal(kc, expected_k) and np.array_equal(vc, expected_v)


def prop_swap_blocks_exact(case: BlockMoveCase, swap: Callable[..., None] = swap_blocks) -> None:
    """dst[d] = src[s] for each pair; the source pool and other destination blocks are unchanged."""
    src, dst = case.a.copy(), case.b.copy()
    swap(src, dst, case.pairs)
    expected = case.b.copy()
    for s, d in case.pairs.tolist():
        expected[d] = case.a[s]
    assert np.array_equal(dst, expected) and np.array_equal(src, case.a)


@SETTINGS
@given(write_cases())
def test_write_kv_then_gather_reads_back(case: WriteCase) -> None:
    prop_write_then_gather(case)


@SETTINGS
@given(copy_cases())
def test_copy_blocks_moves_exactly_the_named_blocks(case: BlockMoveCase) -> None:
    prop_copy_blocks_exact(case)


@SETTINGS
@given(swap_cases())
def test_swap_blocks_moves_exactly_the_named_blocks(case: BlockMoveCase) -> None:
    prop_swap_blocks_exact(case)


def cache() -> tuple[np.ndarray, np.ndarray]:
    return np.arange(16.0).reshape(4, 2, 1, 2), -np.arange(16.0).reshape(4, 2, 1, 2)


@pytest.mark.parametrize(
    ("slots", "needle"),
    [([0, 8], "index=1, slot=8, num_slots=8"), ([-2, 0], "index=0, slot=-2"), ([3, 3], "slot=3")],
)
def test_write_kv_rejects_bad_slots_and_changes_nothing(slots: list[int], needle: str) -> None:
    kc, vc = cache()
    with pytest.raises(AttentionShapeError, match=needle):
        write_kv(np.ones((2, 1, 2)), np.ones((2, 1, 2)), kc, vc, slots)
    assert np.array_equal(kc, cache()[0]) and np.array_equal(vc, cache()[1])


def test_write_kv_rejects_shapes() -> None:
    kc, vc = cache()
    with pytest.raises(AttentionShapeError, match="expected=\\(1, 1, 2\\)"):
        write_kv(np.ones((1, 2, 2)), np.ones((1, 2, 2)), kc, vc, [0])
    with pytest.raises(AttentionShapeError, match="k_cache and v_cache shapes differ"):
        write_kv(np.ones((1, 1, 2)), np.ones((1, 1, 2)), kc, vc[:2], [0])
    with pytest.raises(AttentionShapeError, match="ndarray"):
        write_kv(np.ones((1, 1, 2)), np.ones((1, 1, 2)), kc.tolist(), vc, [0])
    with pytest.raises(AttentionShapeError, match="integers"):
        write_kv(np.ones((1, 1, 2)), np.ones((1, 1, 2)), kc, vc, [0.0])


@pytest.mark.parametrize(
    ("pairs", "needle"),
    [
        ([[0, 4]], "destination block out of range.*block=4, num_blocks=4"),
        ([[-1, 2]], "source block out of range.*block=-1"),
        ([[0, 2], [1, 2]], "destination block named twice.*block=2"),
        ([[0, 1], [1, 2]], "both a copy source and a destination.*block=1"),
        ([[0, 1, 2]], "must be \\[N, 2\\]"),
    ],
)
def test_copy_blocks_rejects_and_changes_nothing(pairs: list[list[int]], needle: str) -> None:
    kc, vc = cache()
    with pytest.raises(AttentionShapeError, match=needle):
        copy_blocks(kc, vc, pairs)
    assert np.array_equal(kc, cache()[0]) and np.array_equal(vc, cache()[1])


def test_copy_blocks_empty_is_noop_and_fork_to_many() -> None:
    kc, vc = cache()
    copy_blocks(kc, vc, [])
    assert np.array_equal(kc, cache()[0])
    copy_blocks(kc, vc, [[0, 2], [0, 3]])
    assert np.array_equal(kc[2], kc[0]) and np.array_equal(vc[3], vc[0])


def test_swap_blocks_rejects() -> None:
    kc, _ = cache()
    with pytest.raises(AttentionShapeError, match="block shapes differ"):
        swap_blocks(kc, np.zeros((4, 3, 1, 2)), [[0, 0]])
    with pytest.raises(
        AttentionShapeError, match="destination block out of range.*block=2, num_blocks=2"
    ):
        swap_blocks(kc, np.zeros((2, 2, 1, 2)), [[0, 2]])


def test_gather_reads_only_blocks_in_use() -> None:
    kc, vc = cache()
    k, _ = gather_kv(kc, vc, [2, 99, -5], seq_len=2)  # entries past the first block are padding
    assert k[:, 0].tolist() == [[8.0, 9.0], [10.0, 11.0]]
    with pytest.raises(AttentionShapeError, match="block=99, num_blocks=4"):
        gather_kv(kc, vc, [2, 99], seq_len=3)
