"""spec.paged_decode / spec.paged_prefill: equal to dense attention on the gathered sequence.

A case holds each sequence's logical K/V and queries; ``layout`` scatters them into a paged cache
with a given block size and physical block order. Unused slots are NaN (the spec raises if it ever
reads one) and block tables are padded with -1 past the blocks in use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_dense import assert_states_close

from spec.attention import AttentionParams, AttentionShapeError, attention
from spec.paged_decode import paged_decode, paged_decode_with_lse
from spec.paged_prefill import paged_prefill, paged_prefill_with_lse

SETTINGS = settings(max_examples=60, deadline=None)


@dataclass(frozen=True)
class Layout:
    """Where the blocks of each sequence live: block size and the physical id of each block."""

    block_size: int
    order: tuple[int, ...]  # physical ids handed out in turn, a permutation of the pool
    num_blocks: int


@dataclass(frozen=True)
class PagedCase:
    """Sequences (k, v [L, Hkv, D], new queries q [q_len, Hq, D]) and two layouts of the cache."""

    ks: tuple[np.ndarray, ...]
    vs: tuple[np.ndarray, ...]
    qs: tuple[np.ndarray, ...]
    params: AttentionParams
    layouts: tuple[Layout, Layout]

    @property
    def seq_lens(self) -> np.ndarray:
        return np.array([k.shape[0] for k in self.ks], dtype=np.int64)

    @property
    def cu_seqlens_q(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([q.shape[0] for q in self.qs])]).astype(np.int64)

    @property
    def q(self) -> np.ndarray:
        return np.concatenate(self.qs, axis=0)

    @property
    def decode_q(self) -> np.ndarray:
        """[B, Hq, D]: the last new query of each sequence (zeros where it has none)."""
        hq, d = self.qs[0].shape[1:]
        return np.stack([q[-1] if q.shape[0] else np.zeros((hq, d)) for q in self.qs])


def layout(case: PagedCase, which: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k_cache, v_cache [N, bs, Hkv, D], block_tables [B, W]) holding the case's sequences."""
    lay = case.layouts[which]
    bs = lay.block_size
    hkv, d = case.ks[0].shape[1:]
    k_cache = np.full((lay.num_blocks, bs, hkv, d), np.nan)
    v_cache = np.full((lay.num_blocks, bs, hkv, d), np.nan)
    needed = [-(-k.shape[0] // bs) for k in case.ks]
    tables = np.full((len(case.ks), max(1, *needed)), -1, dtype=np.int64)
    free = iter(lay.order)
    for b, (k, v) in enumerate(zip(case.ks, case.vs)):
        for i in range(needed[b]):
            block = next(free)
            tables[b, i] = block
            rows = slice(i * bs, min((i + 1) * bs, k.shape[0]))
            k_cache[block, : rows.stop - rows.start] = k[rows]
            v_cache[block, : rows.stop - rows.start] = v[rows]
    return k_cache, v_cache, tables


@st.composite
def layouts(draw: st.DrawFn, lens: list[int]) -> Layout:
    bs = draw(st.sampled_from([1, 2, 3, 4, 8]))
    num_blocks = sum(-(-n // bs) for n in lens) + draw(st.integers(0, 3))
    order = draw(st.permutations(range(num_blocks)))
    return Layout(block_size=bs, order=tuple(order), num_blocks=num_blocks)


@st.composite
def paged_cases(draw: st.DrawFn) -> PagedCase:
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 2, 4]))
    lens = draw(st.lists(st.integers(0, 11), min_size=1, max_size=3))
    q_lens = [draw(st.integers(0, n)) for n in lens]
    params = AttentionParams(
        scale=draw(st.sampled_from([0.5, 1.0])),
        sliding_window=draw(st.none() | st.integers(1, 8)),
        softcap=draw(st.none() | st.sampled_from([0.5, 4.0])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return PagedCase(
        ks=tuple(rng.normal(size=(n, hkv, d)) for n in lens),
        vs=tuple(rng.normal(size=(n, hkv, d)) for n in lens),
        qs=tuple(rng.normal(size=(n, hq, d)) for n in q_lens),
        params=params,
        layouts=(draw(layouts(lens)), draw(layouts(lens))),
    )


def run_prefill(case: PagedCase, which: int = 0) -> tuple[np.ndarray, np.ndarray]:
    kc, vc, tables = layout(case, which)
    cu, lens = case.cu_seqlens_q, case.seq_lens
    return paged_prefill_with_lse(case.q, kc, vc, tables, cu, lens, **asdict(case.params))


def run_decode(case: PagedCase, which: int = 0) -> tuple[np.ndarray, np.ndarray]:
    kc, vc, tables = layout(case, which)
    args = (case.decode_q, kc, vc, tables, case.seq_lens)
    return paged_decode_with_lse(*args, **asdict(case.params))


def prop_prefill_equals_dense(case: PagedCase) -> None:
    """Each chunk equals dense attention over its sequence, causal mask aligned bottom right."""
    o, lse = run_prefill(case)
    cu = case.cu_seqlens_q
    for b in range(len(case.ks)):
        ref = attention(case.qs[b], case.ks[b], case.vs[b], case.params)
        assert_states_close((o[cu[b] : cu[b + 1]], lse[cu[b] : cu[b + 1]]), ref)


def prop_decode_equals_dense(case: PagedCase) -> None:
    """Each decode query equals dense attention from the last position of its sequence."""
    o, lse = run_decode(case)
    for b in range(len(case.ks)):
        ref = attention(
            case.decode_q[b : b + 1],
            case.ks[b],
            case.vs[b],
            case.params,
            q_positions=[case.ks[b].shape[0] - 1],
        )
        assert_states_close((o[b : b + 1], lse[b : b + 1]), ref)


def prop_layout_invariant(case: PagedCase) -> None:
    """Another block size and another physical block order give bit-identical results."""
    for run in (run_prefill, run_decode):
        a, b = run(case, 0), run(case, 1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def prop_decode_is_last_prefill_row(case: PagedCase) -> None:
    """Decode equals the last row of a prefill chunk that ends at the same token."""
    o_pre, lse_pre = run_prefill(case)
    o_dec, lse_dec = run_decode(case)
    ends = case.cu_seqlens_q[1:]
    for b, q in enumerate(case.qs):
        if q.shape[0] == 0:
            continue
        last = slice(ends[b] - 1, ends[b])
        assert_states_close((o_dec[b : b + 1], lse_dec[b : b + 1]), (o_pre[last], lse_pre[last]))


@SETTINGS
@given(paged_cases())
def test_paged_prefill_equals_dense(case: PagedCase) -> None:
    prop_prefill_equals_dense(case)


@SETTINGS
@given(paged_cases())
def test_paged_decode_equals_dense(case: PagedCase) -> None:
    prop_decode_equals_dense(case)


@SETTINGS
@given(paged_cases())
def test_paged_attention_layout_invariant(case: PagedCase) -> None:
    prop_layout_invariant(case)


@SETTINGS
@given(paged_cases())
def test_paged_decode_is_last_prefill_row(case: PagedCase) -> None:
    prop_decode_is_last_prefill_row(case)


def small_cache() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 2, 1, 2)), rng.normal(size=(4, 2, 1, 2))


def test_paged_decode_empty_sequence_gives_zero() -> None:
    kc, vc = small_cache()
    o, lse = paged_decode_with_lse(np.ones((2, 2, 2)), kc, vc, [[-1], [3]], [0, 2], scale=1.0)
    assert not o[0].any() and np.isneginf(lse[0]).all() and o[1].any()


def test_paged_prefill_zero_length_chunk_is_skipped() -> None:
    kc, vc = small_cache()
    q = np.ones((1, 1, 2))
    both = paged_prefill(q, kc, vc, [[0, 1], [2, 3]], [0, 0, 1], [3, 4], scale=1.0)
    one = paged_prefill(q, kc, vc, [[2, 3]], [0, 1], [4], scale=1.0)
    assert np.array_equal(both, one)


@pytest.mark.parametrize(
    ("q_shape", "tables", "lens", "needle"),
    [
        ((1, 3, 2), [[0]], [1], "num_q_heads=3, num_kv_heads=2"),
        ((1, 2, 2), [[0]], [3], "needed_blocks=2, table_len=1"),
        ((1, 2, 2), [[7]], [1], "block=7, num_blocks=4"),
        ((1, 2, 2), [[0]], [-1], "seq_len=-1"),
        ((2, 2, 2), [[0]], [1], "queries=2, sequences=1"),
        ((1, 2, 3), [[0]], [1], "q_head_dim=3, cache_head_dim=2"),
        ((1, 2, 2), [[0], [1]], [1], "block_tables=2, seq_lens=1"),
    ],
)
def test_paged_decode_rejects(
    q_shape: tuple[int, ...], tables: list[list[int]], lens: list[int], needle: str
) -> None:
    kc = np.zeros((4, 2, 2, 2))  # 4 blocks of 2 tokens, Hkv 2, D 2
    with pytest.raises(AttentionShapeError, match=needle):
        paged_decode(np.zeros(q_shape), kc, kc.copy(), tables, lens, scale=1.0)


@pytest.mark.parametrize(
    ("num_tokens", "tables", "cu", "lens", "needle"),
    [
        (3, [[0, 1]], [0, 3], [2], "q_len=3, seq_len=2"),
        (2, [[0], [1]], [0, 2, 1], [2, 2], "before=2, value=1"),
        (2, [[0]], [1, 2], [2], "first=1"),
        (2, [[0]], [0, 1], [2], "last=1, num_tokens=2"),
        (2, [[0]], [0, 2, 2], [2], "entries=3, sequences=1"),
    ],
)
def test_paged_prefill_rejects(
    num_tokens: int, tables: list[list[int]], cu: list[int], lens: list[int], needle: str
) -> None:
    kc = np.zeros((4, 2, 2, 2))
    q = np.zeros((num_tokens, 2, 2))
    with pytest.raises(AttentionShapeError, match=needle):
        paged_prefill(q, kc, kc.copy(), tables, cu, lens, scale=1.0)
