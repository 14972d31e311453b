"""fast.blocks.prefix_ids.hash_intern_chain: prefix nodes as a memo of the spec's block hashes."""

from __future__ import annotations

import numpy as np

from fast.blocks import hash as fast_hash
from fast.blocks.hash import scratch_for
from fast.blocks.manager import BlockManager
from fast.blocks.prefix_ids import PrefixIds, hash_intern_chain, intern_chain
from spec.block_manager import BlockManager as SpecBlockManager
from spec.block_manager import BlockManagerConfig
from spec.prefix_cache import chain_hashes, hash_block_tokens


def _chain(ids: PrefixIds, tokens: np.ndarray, extra: int, key: bytes) -> tuple[list[int], ...]:
    n = tokens.shape[0] // ids.bs
    hashes, pids = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    kb = np.frombuffer(key, dtype=np.uint8)
    hashed = hash_intern_chain(
        tokens, ids.bs, extra, kb, scratch_for(ids.bs, kb.shape[0]), hashes, pids, ids.arrays
    )
    return hashes.tolist(), pids.tolist(), [int(hashed)]


def test_memo_hashes_only_new_prefixes_and_equals_the_spec_hash() -> None:
    bs = 4
    ids = PrefixIds(bs, capacity=16)
    rng = np.random.default_rng(0)
    system = rng.integers(0, 50_000, size=12)
    a = np.concatenate([system, rng.integers(0, 50_000, size=9)]).astype(np.int64)
    b = np.concatenate([system, rng.integers(0, 50_000, size=8)]).astype(np.int64)
    ha, pa, na = _chain(ids, a, -1, b"")
    assert ha == chain_hashes(a.tolist(), bs, None, hash_block_tokens)
    assert na == [5]  # every block of the first prompt is new
    hb, pb, nb = _chain(ids, b, -1, b"")
    assert hb == chain_hashes(b.tolist(), bs, None, hash_block_tokens)
    assert nb == [2]  # the 3 system-prompt blocks come from the memo
    assert pb[:3] == pa[:3] and pb[3] != pa[3]
    # the ids are the interned ones (same as intern_chain over the same hashes)
    again = intern_chain(b, bs, np.array(hb, dtype=np.int64), -1, False, ids.arrays)
    assert again.tolist() == pb
    # another extra key: a different prefix, hashed again with the key
    hk, pk, nk = _chain(ids, b, 0, b"tenant")
    assert hk == chain_hashes(b.tolist(), bs, "tenant", hash_block_tokens)
    assert nk == [5] and set(pk).isdisjoint(pb)
    assert hk == fast_hash.chain_hashes(b, bs, np.frombuffer(b"tenant", np.uint8), True).tolist()


def test_memo_survives_collection_and_growth() -> None:
    bs = 2
    ids = PrefixIds(bs, capacity=8)
    t = np.arange(10, dtype=np.int64)
    h1, p1, _ = _chain(ids, t, -1, b"")
    ids.collect(np.array([p1[2]], dtype=np.int64))  # keeps blocks 0..2, frees 3 and 4
    assert len(ids) == 3
    ids.reserve(40, None)
    h2, p2, n2 = _chain(ids, t, -1, b"")
    assert h2 == h1 and p2[:3] == p1[:3] and n2 == [2]


def test_allocate_over_shared_prompts_matches_the_spec() -> None:
    config = BlockManagerConfig(block_size=4, num_gpu_blocks=256, enable_prefix_caching=True)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    rng = np.random.default_rng(1)
    system = rng.integers(0, 1000, size=10)
    prompts = [
        np.concatenate([system, rng.integers(0, 1000, size=k)]).astype(np.int64)
        for k in (1, 6, 3, 9, 2, 7)
    ]
    want = [spec.allocate(i, p.tolist()) for i, p in enumerate(prompts)]
    assert [fast.allocate(i, p) for i, p in enumerate(prompts)] == want
    for i in range(6):
        assert fast.block_table(i) == spec.block_table(i)
    assert fast.cached_blocks() == sorted(spec.cached_blocks())
    fast.check_integrity()
    # rows grown by doubling, far past the initial 8 rows
    more = [rng.integers(0, 1000, size=5).astype(np.int64) for _ in range(40)]
    want = [spec.allocate(100 + i, p.tolist()) for i, p in enumerate(more)]
    assert [fast.allocate(100 + i, p) for i, p in enumerate(more)] == want
    assert fast.free_block_order() == spec.free_block_order()
    fast.check_integrity()


def test_the_table_rebuild_is_compiled_when_the_table_is_made() -> None:
    """numba compiles ``_rebuild`` at a new PrefixIds, not at its first collection or growth:
    that came mid-run, at step 1467 of the H200's 1,000-request trace (256-280 ms, the table's
    first growth). In a fresh interpreter, so no earlier test has compiled it."""
    import subprocess
    import sys

    code = (
        "from fast.blocks.prefix_ids import PrefixIds, _rebuild\n"
        "assert not _rebuild.signatures\n"
        "ids = PrefixIds(16, capacity=64)\n"
        "print(len(_rebuild.signatures), int((ids.arrays.slots == -1).all()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]
